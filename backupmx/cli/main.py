"""The ``backupmx`` command: one entry point, the verbs of docs/contracts.md#command-line.

Exit status: 0 ok, 1 the operation failed (unknown queue id, database down),
2 usage or configuration error (the message names the key and the problem).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import Any

import uvloop
from sqlalchemy.exc import SQLAlchemyError

from backupmx import config as configuration
from backupmx.cli import CommandError
from backupmx.cli import domains as domain_commands
from backupmx.cli import nodes as node_commands
from backupmx.cli import queue as queue_commands
from backupmx.cli import status as status_commands
from backupmx.logs import configure as configure_logs
from backupmx.queue.database import safe_url
from backupmx.queue.records import UnknownMessage


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="backupmx", description="A backup MX that holds mail while the primary is down."
    )
    parser.add_argument(
        "--config", help="TOML file (default: $BACKUPMX_CONFIG, then /etc/backupmx/backupmx.toml)"
    )
    parser.add_argument("--database", help="queue database URL, overriding the file")
    verbs = parser.add_subparsers(dest="verb", required=True)

    serve = verbs.add_parser("serve", help="listener, deliverer and probes")
    serve.add_argument("--listen", action="append", metavar="HOST:PORT", help="repeatable")
    serve.add_argument(
        "--domain", action="append", metavar="NAME", help="a domain to back up; repeatable"
    )
    serve.add_argument("--hostname", help="our name in the banner, EHLO and Received:")
    # Also after the verb, with the other quick-start flags.  SUPPRESS: a sub-parser's
    # default would overwrite a --database given before the verb.
    serve.add_argument(
        "--database", default=argparse.SUPPRESS, help="queue database URL, overriding the file"
    )
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
    config.add_parser("check", help="validate the configuration file").add_argument(
        "--json", action="store_true"
    )
    return parser


def load_config(args: argparse.Namespace) -> configuration.Config:
    overrides: dict[str, Any] = {}
    if args.database:
        overrides["database"] = args.database
    if args.verb == "serve":  # quick-start flags; `queue list --domain` is a filter
        if args.listen:
            overrides["listen"] = args.listen
        if args.domain:
            overrides["domain"] = [{"name": name} for name in args.domain]
        if args.hostname:
            overrides["hostname"] = args.hostname
    return configuration.load(configuration.default_path(args.config), overrides)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args)
        return run(args, config)
    except configuration.ConfigError as error:
        print(f"backupmx: configuration error: {error}", file=sys.stderr)
        return 2
    except UnknownMessage as error:
        print(f"backupmx: {error}", file=sys.stderr)
        return 1
    except CommandError as error:
        print(f"backupmx: {error}", file=sys.stderr)
        return 1
    except SQLAlchemyError as error:
        print(f"backupmx: database error: {getattr(error, 'orig', None) or error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


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
        path = configuration.default_path(args.config)
        if args.json:
            print(
                queue_commands._json(
                    {
                        "file": str(path) if path else None,
                        "ok": True,
                        "domains": [d.name for d in config.domain],
                        "database": safe_url(config.database),
                    }
                )
            )
            return 0
        where = path if path else "built-in defaults"
        print(f"{where}: ok ({len(config.domain)} domain(s), database {config.database})")
        for warning in configuration.warnings(config):
            print(f"warning: {warning}")
        return 0
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


async def _db_upgrade(url: str, as_json: bool) -> int:
    from backupmx.queue.database import current_revision, open_engine, upgrade  # as for serve

    engine = open_engine(url)
    try:
        await upgrade(engine)
        revision = await current_revision(engine)
        if as_json:
            print(queue_commands._json({"revision": revision}))
        else:
            print(f"database schema at revision {revision}")
    finally:
        await engine.dispose()
    return 0
