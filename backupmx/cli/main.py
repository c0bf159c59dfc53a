"""The ``backupmx`` command: one entry point, the verbs of docs/contracts.md#command-line.

Exit status: 0 ok, 1 the operation failed (unknown queue id, database down, a port
in use), 2 usage or configuration error (the message names the key and the problem).
An expected failure is one line on stderr, never a traceback; a reader that goes away
(`backupmx queue list | head`) ends the output quietly.

The options of every verb (`--config`, `--database`, `--json`) are accepted before
the verb and after it: `backupmx --config X config check` and `backupmx config check
--config X` are the same command.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from typing import Any

import uvloop
from sqlalchemy.exc import SQLAlchemyError

from backupmx import config as configuration
from backupmx import preflight
from backupmx.cli import CommandError, UsageError
from backupmx.cli import domains as domain_commands
from backupmx.cli import nodes as node_commands
from backupmx.cli import queue as queue_commands
from backupmx.cli import status as status_commands
from backupmx.cli.output import json_text
from backupmx.logs import configure as configure_logs
from backupmx.mail.domains import normalize_domain
from backupmx.mail.hosts import parse_host_port
from backupmx.queue.database import safe_url
from backupmx.queue.records import UnknownMessage


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="backupmx", description="A backup MX that holds mail while the primary is down."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    add_global_options(parser, default=None)
    verbs = parser.add_subparsers(dest="verb", required=True)

    serve = verbs.add_parser("serve", help="receive, hold and deliver: the server itself")
    serve.add_argument("--listen", action="append", metavar="HOST:PORT", help="repeatable")
    serve.add_argument(
        "--domain", action="append", metavar="NAME", help="a domain to back up; repeatable"
    )
    serve.add_argument(
        "--primary",
        action="append",
        metavar="DOMAIN=HOST[:PORT]",
        type=_primary,
        help="back up DOMAIN and deliver it to HOST (port 25 by default), not its MX; repeatable",
    )
    serve.add_argument("--hostname", help="our name in the banner, EHLO and Received:")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    queue_commands.add_parsers(verbs.add_parser("queue", help="show and manage the held queue"))
    domain_commands.add_parsers(verbs)
    node_commands.add_parser(verbs)
    status_commands.add_parser(verbs)

    db = verbs.add_parser("db", help="queue database schema").add_subparsers(
        dest="db_verb", required=True
    )
    db.add_parser("upgrade", help="apply migrations (alembic upgrade head)").add_argument(
        "--json", action="store_true"
    )

    config = verbs.add_parser("config", help="configuration").add_subparsers(
        dest="config_verb", required=True
    )
    config.add_parser(
        "check", help="validate the configuration and what serve needs from the machine"
    ).add_argument("--json", action="store_true")
    for verb in _verbs(parser):
        # A verb's own --json would reset one given before the verb to False.
        for action in verb._actions:
            if "--json" in action.option_strings:
                action.default = argparse.SUPPRESS
        add_global_options(verb, default=argparse.SUPPRESS)
    return parser


def add_global_options(parser: argparse.ArgumentParser, default: Any) -> None:
    """--config and --database, for the top level (default None) and again for every
    verb (default SUPPRESS, so that a verb does not reset what came before it)."""
    if not any("--config" in a.option_strings for a in parser._actions):
        parser.add_argument(
            "--config",
            default=default,
            help="TOML file (default: $BACKUPMX_CONFIG, then /etc/backupmx/backupmx.toml)",
        )
    if not any("--database" in a.option_strings for a in parser._actions):
        parser.add_argument(
            "--database", default=default, help="queue database URL, overriding the file"
        )
    if default is None:
        parser.add_argument("--json", action="store_true", help="JSON output, for scripts")


def _verbs(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every sub-parser below `parser`, each with its one-line help as its description
    (what `backupmx queue hold --help` shows first)."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, verb in action.choices.items():
                if verb.description is None and helps.get(name):
                    verb.description = str(helps[name])
                found += [verb, *_verbs(verb)]
    return found


def _primary(text: str) -> tuple[str, str]:
    """--primary example.test=127.0.0.1:2526: the domain (checked) and its route."""
    domain, equals, route = text.partition("=")
    try:
        if not equals or not domain or not route:
            raise ValueError("is not DOMAIN=HOST[:PORT]")
        parse_host_port(route, default_port=25)
        return normalize_domain(domain), route
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: {error}") from error


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("backupmx")
    except PackageNotFoundError:
        return "unknown"


def load_config(args: argparse.Namespace) -> configuration.Config:
    overrides: dict[str, Any] = {}
    if args.database:
        overrides["database"] = args.database
    if args.verb == "serve":  # quick-start flags; `queue list --domain` is a filter
        if args.listen:
            overrides["listen"] = args.listen
        routes = dict(args.primary or [])
        names = list(dict.fromkeys([*(args.domain or []), *routes]))
        if names:
            overrides["domain"] = [
                {"name": name, **({"primary": [routes[name]]} if name in routes else {})}
                for name in names
            ]
        if args.hostname:
            overrides["hostname"] = args.hostname
    return configuration.load(configuration.default_path(args.config), overrides)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)  # --help into a closed pipe, too
        config = load_config(args)
        status = run(args, config)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return status
    except configuration.ConfigError as error:
        return _fail(f"configuration error: {error}", 2)
    except preflight.StartupFailure as failure:
        for problem in failure.problems:
            _fail(f"cannot start: {problem}", 0)
        return failure.exit_status
    except UsageError as error:
        return _fail(str(error), 2)
    except (UnknownMessage, CommandError) as error:
        return _fail(str(error), 1)
    except SQLAlchemyError as error:
        return _fail(f"database error: {getattr(error, 'orig', None) or error}", 1)
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and keep the interpreter's
        # own flush at exit from failing again on the closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a shell reports a process ended by SIGPIPE
    except OSError as error:
        where = f"{error.filename}: " if error.filename else ""
        return _fail(f"{where}{error.strerror or error}", 1)
    except KeyboardInterrupt:
        return 130


def _fail(text: str, status: int) -> int:
    print(f"backupmx: {text}", file=sys.stderr)
    return status


def run(args: argparse.Namespace, config: configuration.Config) -> int:
    if args.verb == "serve":
        # The whole server (receive, deliver, bounce) is imported only to serve: the
        # queue verbs an operator types often start without it.
        from backupmx.app import serve

        configure_logs(args.log_level)
        # libuv's event loop: the receiver's accept, read and write paths in C measured
        # about a tenth less CPU per message than asyncio's own loop.
        uvloop.run(serve(config, lambda: load_config(args)))
        return 0
    if args.verb == "config":
        return asyncio.run(_config_check(args, config))
    if args.verb == "db":
        return asyncio.run(_db_upgrade(config.database, args.json))
    if args.verb == "status":
        return asyncio.run(status_commands.run(args, config))
    if args.verb == "nodes":
        return asyncio.run(node_commands.run(args, config))
    if args.verb == "domains":
        return asyncio.run(domain_commands.run_domains(args, config))
    if args.verb == "probe":
        return asyncio.run(domain_commands.run_probe(args, config))
    if args.verb == "queue":
        return asyncio.run(queue_commands.run(args, config))
    raise CommandError(f"unknown command {args.verb}")


async def _config_check(args: argparse.Namespace, config: configuration.Config) -> int:
    """The file is valid (`load` raised otherwise); then everything `serve` would fail
    on at start: files, addresses, the database.  Exit 1 or 2 as `serve` would."""
    path = configuration.default_path(args.config)
    problems = preflight.file_problems(config) + preflight.driver_problems(config)
    notes: list[str] = []
    if await _serving(config):
        # Its own listeners hold the ports: binding them again would only say "in use".
        problems += preflight.address_problems(config, bind=False)
        notes.append("serve is running (it answers on its control socket): ports not re-bound")
    else:
        problems += preflight.address_problems(config, bind=True)
    if not any(p.key == "database" for p in problems):
        found, facts = await preflight.database_problems(config)
        problems += found
        notes += facts
    warnings = configuration.warnings(config)
    if args.json:
        report = {
            "file": str(path) if path else None,
            "ok": not problems,
            "domains": [d.name for d in config.domain],
            "database": safe_url(config.database),
            "problems": [p.to_json() for p in problems],
            "warnings": warnings,
            "notes": notes,
        }
        print(json_text(report))
    else:
        where = path if path else "built-in defaults"
        verdict = "ok" if not problems else f"{len(problems)} problem(s)"
        database = safe_url(config.database)
        print(f"{where}: {verdict} ({len(config.domain)} domain(s), database {database})")
        for line in [*(f"error: {p}" for p in problems), *(f"note: {n}" for n in notes)]:
            print(line)
        for warning in warnings:
            print(f"warning: {warning}")
    return preflight.StartupFailure(problems).exit_status if problems else 0


async def _serving(config: configuration.Config) -> bool:
    from backupmx import control

    try:
        await control.ask(control.socket_path(config))
    except control.NoAnswer:
        return False
    return True


async def _db_upgrade(url: str, as_json: bool) -> int:
    from backupmx.queue.database import current_revision, open_engine, upgrade  # as for serve

    engine = open_engine(url)
    try:
        await upgrade(engine)
        revision = await current_revision(engine)
        if as_json:
            print(json_text({"revision": revision}))
        else:
            print(f"database schema at revision {revision}")
    finally:
        await engine.dispose()
    return 0
