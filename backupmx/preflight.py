"""What `serve` needs from the machine, checked before it needs it: the files the
configuration names, the addresses it listens on, the queue database and its driver.

`backupmx config check` runs every check and `serve` the same ones at start, so a
file that `config check` approves does not fail the service on the next restart,
and a start-up failure is one line naming the key or the file instead of a
traceback in the journal.  A `Problem` is either the file's (exit status 2: fix
the configuration) or the machine's (exit status 1: a port in use, a database
down, a driver missing; systemd's restart may see it gone).
"""

from __future__ import annotations

import errno
import importlib.util
import os
import shutil
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from backupmx.config import Config
from backupmx.mail.hosts import HostPort, listening_socket, parse_host_port


@dataclass(frozen=True)
class Problem:
    key: str  # the configuration key, "listen[0]", "tls.cert", "database"
    text: str
    environment: bool = False  # the machine's, not the file's

    def __str__(self) -> str:
        return f"{self.key}: {self.text}"

    def to_json(self) -> dict[str, object]:
        return {"key": self.key, "problem": self.text, "environment": self.environment}


class StartupFailure(Exception):
    """`serve` cannot start; each problem is one line for the operator."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(str(p) for p in problems))
        self.problems = problems

    @property
    def exit_status(self) -> int:
        return 1 if all(p.environment for p in self.problems) else 2


def file_problems(config: Config) -> list[Problem]:
    """The certificate and key, the recipient lists and the spam-check command."""
    found = []
    tls = config.tls
    if bool(tls.cert) != bool(tls.key):
        found.append(Problem("tls.cert" if tls.key else "tls.key", "is needed with the other"))
    elif tls.cert:
        unreadable = [
            p for p in (_unreadable("tls.cert", tls.cert), _unreadable("tls.key", tls.key)) if p
        ]
        found += unreadable
        if not unreadable:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            try:
                context.load_cert_chain(tls.cert, tls.key)
            except (ssl.SSLError, ValueError) as error:
                found.append(
                    Problem(
                        "tls.cert",
                        f"{tls.cert} and {tls.key}: not a certificate and its key"
                        f" ({getattr(error, 'reason', None) or error})",
                    )
                )
    for i, domain in enumerate(config.domain):
        if domain.recipients == "list" and domain.recipient_list:
            problem = _unreadable(f"domain[{i}].recipient_list", domain.recipient_list)
            found += [problem] if problem else []
    command = config.spamcheck.command
    if config.spamcheck.backend == "command" and command and not shutil.which(command[0]):
        found.append(
            Problem("spamcheck.command", f"{command[0]}: no such executable", environment=True)
        )
    return found


def _unreadable(key: str, path: str) -> Problem | None:
    try:
        with open(path, "rb"):
            return None
    except OSError as error:
        return Problem(key, f"{path}: {error.strerror}", environment=True)


def address_problems(config: Config, bind: bool) -> list[Problem]:
    """Every listen address (and the metrics one) is one this host can listen on and,
    with `bind`, is free: the same bind the server makes, released at once."""
    found = []
    addresses = [(f"listen[{i}]", text) for i, text in enumerate(config.listen)]
    if config.metrics.listen:
        addresses.append(("metrics.listen", config.metrics.listen))
    for key, text in addresses:
        address = parse_host_port(text)  # config.load checked the form
        try:
            infos = socket.getaddrinfo(
                address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except socket.gaierror as error:
            found.append(Problem(key, f"{text}: not an address to listen on ({error.strerror})"))
            continue
        if bind:
            found += [p for info in infos if (p := _bind(key, address, info[0], info[4]))]
    return found


def _bind(key: str, address: HostPort, family: int, sockaddr: tuple[object, ...]) -> Problem | None:
    try:
        listening_socket(family, sockaddr).close()
    except OSError as error:
        return not_bound(key, str(address), error)
    return None


def not_bound(key: str, address: str, error: OSError) -> Problem:
    """An address that could not be bound, in the operator's terms."""
    return Problem(key, f"{address}: {_bind_failure(error)}", environment=True)


def _bind_failure(error: OSError) -> str:
    if error.errno == errno.EADDRINUSE:
        return "address already in use (another server, or a backupmx serve already running)"
    if error.errno == errno.EADDRNOTAVAIL:
        return "not an address of this host"
    if error.errno == errno.EACCES:
        return (
            "permission denied (a port below 1024 needs root or CAP_NET_BIND_SERVICE,"
            " which deploy/backupmx.service grants)"
        )
    return error.strerror or str(error)


def startup_problems(config: Config) -> list[Problem]:
    """What `serve` checks before it opens anything (the database comes next)."""
    return file_problems(config) + driver_problems(config) + address_problems(config, bind=True)


def unreachable(config: Config, error: DBAPIError) -> Problem:
    from backupmx.queue.database import safe_url

    reason = " ".join(str(error.orig or error).split())
    return Problem("database", f"{safe_url(config.database)}: unreachable: {reason}", True)


def driver_problems(config: Config) -> list[Problem]:
    """The PostgreSQL driver is an extra: without it the URL cannot even be opened."""
    postgresql = make_url(config.database).get_backend_name() == "postgresql"
    if postgresql and importlib.util.find_spec("psycopg") is None:
        return [
            Problem(
                "database",
                "a postgresql:// queue needs the PostgreSQL driver:"
                " pip install 'backupmx[postgres]'",
                environment=True,
            )
        ]
    return []


async def database_problems(config: Config) -> tuple[list[Problem], list[str]]:
    """The database answers and its schema is one this version can migrate; also
    what `serve` will do about it (create the SQLite file, migrate the schema)."""
    from backupmx.queue.database import (  # as `serve` does: alembic only when needed
        current_revision,
        head_revision,
        known_revision,
        missing_sqlite_file,
        open_engine,
    )

    missing = missing_sqlite_file(config.database)
    if missing:
        directory = Path(missing).parent
        if os.access(directory, os.W_OK | os.X_OK):
            return [], [f"database: {missing} does not exist yet; serve creates it"]
        return [Problem("database", f"{missing}: cannot create it in {directory}", True)], []
    engine = open_engine(config.database)
    try:
        revision = await current_revision(engine)
    except DBAPIError as error:
        return [unreachable(config, error)], []
    finally:
        await engine.dispose()
    head = head_revision()
    if revision == head:
        return [], []
    if revision is None:
        return [], ["database: no schema yet; serve creates it"]
    if not known_revision(revision):
        return [
            Problem(
                "database",
                f"schema revision {revision} is newer than this version of backupmx knows"
                f" ({head}): upgrade backupmx",
                True,
            )
        ], []
    return [], [f"database: schema revision {revision}; serve migrates it to {head} at start"]
