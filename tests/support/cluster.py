"""Several `backupmx serve` nodes on one queue database, and what the cluster tests
need around them: a quick submitter that remembers every ``250``, the nodes' log
events, and the queue read straight from the database.

Each node is a `ServerProcess` with its own directory, listen port, metrics port
and ``hostname`` (``bmx-a.backup.test``, ``bmx-b.backup.test``, …), so that its
lease owner name ``<gethostname()>:<hostname>`` differs from the others' on one
machine; all share one `database` and one static primary for ``example.test``.
Nodes start one after the other: the first migrates the schema, the next find it
done.

Every wait is bounded: start-up by `ServerProcess.start`, the submitter by its
`deadline`, each SMTP command by `SMTP_TIMEOUT`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import smtplib
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from tests.support.counting_primary import CountingPrimary
from tests.support.ports import free_port
from tests.support.server import DOMAIN, POSTGRES_ADMIN_URL, ServerProcess

# Every node's [delivery] and [limits] unless a test says otherwise: probes every second
# (a primary that comes back is found at once), short retries, room for many clients.
DELIVERY: dict[str, Any] = {"probe_interval": "1s", "retry_min": "1s", "retry_max": "5s"}
LIMITS: dict[str, Any] = {"max_connections": 500, "max_connections_per_ip": 500}
NODE_HOSTNAMES = tuple(f"bmx-{letter}.backup.test" for letter in "abcdefgh")
SMTP_TIMEOUT = 30.0
SUBMIT_SECONDS = 300.0  # default bound on a whole submission
RECONNECT_PAUSE = 0.2
QUEUED = re.compile(r"queued as ([0-9A-Fa-f]+)")
PENDING = ("queued", "sending", "held")

ServerMaker = Callable[..., ServerProcess]
T = TypeVar("T")


def node_name(hostname: str) -> str:
    """The lease owner name `backupmx serve` uses with this ``hostname`` setting."""
    return f"{socket.gethostname()}:{hostname}"


# --------------------------------------------------------------------------- log events


def read_events(server: ServerProcess, *names: str) -> list[dict[str, Any]]:
    """The JSON log records of `server` (serve and its intake), in order; only those
    whose ``event`` is one of `names` if any are given.  Lines that are not JSON
    (a traceback, a record still being written) are skipped."""
    wanted = set(names)
    found = []
    for line in server.log().splitlines():
        if not line.startswith("{"):
            continue
        if wanted and not any(f'"event": "{name}"' in line for name in wanted):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and (not wanted or record.get("event") in wanted):
            found.append(record)
    return found


def event_time(record: dict[str, Any]) -> float:
    """A record's ``timestamp`` (ISO 8601, UTC) as seconds since the epoch."""
    return datetime.fromisoformat(str(record["timestamp"]).replace("Z", "+00:00")).timestamp()


# --------------------------------------------------------------------------- nodes


@dataclass
class Node:
    """One `backupmx serve` of the cluster."""

    server: ServerProcess
    hostname: str

    @property
    def name(self) -> str:
        """The node's lease owner name, as its log events and the ``nodes`` table say."""
        return node_name(self.hostname)

    @property
    def pid(self) -> int | None:
        process = self.server.process
        return process.pid if process is not None else None

    @property
    def running(self) -> bool:
        process = self.server.process
        return process is not None and process.poll() is None

    def events(self, *names: str) -> list[dict[str, Any]]:
        return read_events(self.server, *names)

    def delivered(self) -> list[dict[str, Any]]:
        """This node's delivery events: one per message here, as each has one recipient
        (``message_delivered``, or ``recipient_delivered`` beside another outcome)."""
        return self.events("message_delivered", "recipient_delivered")

    def signal(self, sig: int) -> None:
        self.server.signal(sig)

    def kill(self) -> None:
        self.server.kill()

    def __str__(self) -> str:
        return self.name


class Cluster:
    """`count` nodes on `database`, all backing up example.test with `primary` as its
    static route.  `settings` go to every node's config (``delivery`` and ``limits``
    are merged into `DELIVERY` and `LIMITS`); `make` builds a `ServerProcess` from
    settings (the tests' ``server_factory`` fixture, which also kills what is left at
    the end)."""

    def __init__(
        self,
        make: ServerMaker,
        database: str,
        primary: str,
        count: int = 2,
        **settings: Any,
    ) -> None:
        assert 1 <= count <= len(NODE_HOSTNAMES)
        self.database = database
        self.primary = primary
        delivery = {**DELIVERY, **settings.pop("delivery", {})}
        limits = {**LIMITS, **settings.pop("limits", {})}
        self.nodes: list[Node] = []
        for hostname in NODE_HOSTNAMES[:count]:
            own: dict[str, Any] = {
                "hostname": hostname,
                "database": database,
                "domain": [{"name": DOMAIN, "primary": [primary]}],
                "delivery": dict(delivery),
                "limits": dict(limits),
                "metrics": {"listen": f"127.0.0.1:{free_port()}"},
            }
            server = make(**{**own, **settings})
            self.nodes.append(Node(server, hostname))

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __getitem__(self, index: int) -> Node:
        return self.nodes[index]

    def __len__(self) -> int:
        return len(self.nodes)

    def start(self) -> Cluster:
        """Start every node, one after the other (the first migrates the schema)."""
        for node in self.nodes:
            node.server.start()
        return self

    def stop(self) -> None:
        """SIGTERM every running node and wait (bounded by `ServerProcess.stop`)."""
        for node in self.nodes:
            if node.running:
                node.server.stop()

    def pids(self) -> dict[int, str]:
        """pid -> node name of the running nodes, for `CountingPrimary.name_nodes`."""
        return {node.pid: node.name for node in self.nodes if node.running and node.pid}

    def node(self, name: str) -> Node:
        return next(node for node in self.nodes if node.name == name)

    def events(self, *names: str) -> list[tuple[Node, dict[str, Any]]]:
        """Every node's events of `names`, each with its node."""
        return [(node, record) for node in self.nodes for record in node.events(*names)]

    def delivered_by_node(self) -> dict[str, int]:
        """Node name -> its delivery events (`Node.delivered`)."""
        return {node.name: len(node.delivered()) for node in self.nodes}

    def logs(self, lines: int = 40) -> str:
        """The last lines of each node's log, for a failure message."""
        return "\n".join(
            f"--- {node.name}\n" + "\n".join(node.server.log().splitlines()[-lines:])
            for node in self.nodes
        )


# --------------------------------------------------------------------------- submitting


@dataclass(frozen=True)
class Submitted:
    """One message a client sent and the node answered 250."""

    index: int
    message_id: str  # the Message-ID header, "<prefix-index@sender.test>"
    recipient: str
    node: str  # the node's name
    queue_id: str


@dataclass
class Submission:
    """What the clients saw, shared by the client threads under `lock`."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    acked: dict[str, Submitted] = field(default_factory=dict)  # Message-ID -> it
    refused: dict[str, str] = field(default_factory=dict)  # Message-ID -> reply or error
    unanswered: set[str] = field(default_factory=set)  # DATA sent, no reply (connection lost)
    errors: list[str] = field(default_factory=list)  # connection-level failures
    seconds: float = 0.0

    def by_queue_id(self) -> dict[str, Submitted]:
        with self.lock:
            return {s.queue_id: s for s in self.acked.values()}

    def message_ids(self) -> set[str]:
        with self.lock:
            return set(self.acked)

    def summary(self) -> str:
        with self.lock:
            return (
                f"{len(self.acked)} acked, {len(self.refused)} refused, "
                f"{len(self.unanswered)} unanswered, {len(self.errors)} connection errors "
                f"in {self.seconds:.1f} s"
            )


def message_id(prefix: str, index: int) -> str:
    return f"<{prefix}-{index}@sender.test>"


def recipient(prefix: str, index: int) -> str:
    return f"{prefix}-{index}@{DOMAIN}"


def message(prefix: str, index: int, size: int = 0) -> bytes:
    """A message with one recipient and a unique Message-ID; padded to about `size`."""
    head = [
        f"From: sender{index}@sender.test",
        f"To: {recipient(prefix, index)}",
        f"Subject: {prefix} {index}",
        f"Message-ID: {message_id(prefix, index)}",
        "",
        f"message {index} of {prefix}",
    ]
    text = "\r\n".join(head) + "\r\n"
    line = "x" * 76 + "\r\n"
    if size > len(text):
        text += line * ((size - len(text)) // len(line) + 1)
    return text.encode()


def submit(
    nodes: Sequence[Node],
    count: int,
    *,
    prefix: str = "cluster",
    first: int = 0,
    sessions_per_node: int = 4,
    size: int = 0,
    deadline: float = SUBMIT_SECONDS,
    keep_going: bool = False,
    submission: Submission | None = None,
    stop: threading.Event | None = None,
) -> Submission:
    """Send messages `first` … `first + count - 1` over persistent SMTP sessions,
    round-robin over `nodes` and `sessions_per_node` sessions each, in parallel.

    Each message has one recipient and its own Message-ID; every ``250 … queued as ID``
    is recorded in the returned `Submission`.  Without `keep_going` any refusal or
    connection error fails the submission (AssertionError); with it, a session that
    fails is recorded and reconnects, and the message is not sent again (load during a
    database restart).  Bounded by `deadline` seconds and by `stop`.
    """
    submission = submission or Submission()
    stop = stop or threading.Event()
    ends = time.monotonic() + deadline
    shares: list[tuple[Node, list[int]]] = []
    for n, node in enumerate(nodes):
        mine = list(range(first + n, first + count, len(nodes)))
        for s in range(sessions_per_node):
            shares.append((node, mine[s::sessions_per_node]))
    started = time.monotonic()
    threads = [
        threading.Thread(
            target=_client,
            args=(node, share, prefix, size, submission, ends, keep_going, stop),
            daemon=True,
        )
        for node, share in shares
        if share
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(ends - time.monotonic(), 0) + SMTP_TIMEOUT)
    submission.seconds += time.monotonic() - started
    if any(thread.is_alive() for thread in threads):
        raise AssertionError(f"the submitter did not finish within {deadline:g} s")
    if not keep_going:
        with submission.lock:
            problems = [*submission.errors, *submission.refused.values()]
        assert not problems, f"{len(problems)} submission failures, e.g. {problems[:3]}"
        assert len(submission.acked) >= count, submission.summary()
    return submission


def _client(
    node: Node,
    share: list[int],
    prefix: str,
    size: int,
    submission: Submission,
    ends: float,
    keep_going: bool,
    stop: threading.Event,
) -> None:
    server = node.server
    pending = list(reversed(share))
    client: smtplib.SMTP | None = None
    try:
        while pending and time.monotonic() < ends and not stop.is_set():
            if client is None:
                try:
                    client = smtplib.SMTP(server.host, server.port, timeout=SMTP_TIMEOUT)
                    client.ehlo(f"client-{share[0]}.sender.test")
                except (OSError, smtplib.SMTPException) as error:
                    _close(client)
                    client = None
                    with submission.lock:
                        submission.errors.append(f"{node.name}: connect: {error!r}")
                    if not keep_going:
                        return
                    time.sleep(RECONNECT_PAUSE)
                    continue
            index = pending.pop()
            ok, broken = _send(client, node, prefix, index, size, submission)
            if broken:
                _close(client)
                client = None
            if not ok:
                if not keep_going:
                    return
                if broken:
                    time.sleep(RECONNECT_PAUSE)
    finally:
        _close(client, quit=True)


def _send(
    client: smtplib.SMTP, node: Node, prefix: str, index: int, size: int, submission: Submission
) -> tuple[bool, bool]:
    """One message over `client`, recorded in `submission`: (acked, connection broken)."""
    mid = message_id(prefix, index)
    address = recipient(prefix, index)
    in_data = False
    reply: bytes | str
    try:
        code, reply = client.mail(f"sender{index}@sender.test")
        if code == 250:
            code, reply = client.rcpt(address)
        if code == 250:
            in_data = True
            code, reply = client.data(message(prefix, index, size))
    except smtplib.SMTPResponseException as error:  # DATA refused before 354
        code, reply = error.smtp_code, error.smtp_error
    except (OSError, smtplib.SMTPException) as error:
        with submission.lock:
            if in_data:
                submission.unanswered.add(mid)
            submission.errors.append(f"{node.name}: {mid}: {error!r}")
        return False, True
    text = reply.decode(errors="replace") if isinstance(reply, bytes) else reply
    match = QUEUED.search(text)
    with submission.lock:
        if code == 250 and match:
            submission.acked[mid] = Submitted(index, mid, address, node.name, match.group(1))
            return True, False
        submission.refused[mid] = f"{code} {text}"
    if code == 421:
        return False, True
    try:
        client.rset()
    except (OSError, smtplib.SMTPException):
        return False, True
    return False, False


def _close(client: smtplib.SMTP | None, quit: bool = False) -> None:
    """Close `client`, with QUIT first if asked (and the server still listens)."""
    if client is None:
        return
    try:
        if quit:
            client.quit()
    except (OSError, smtplib.SMTPException):
        pass
    client.close()


# --------------------------------------------------------------------------- the queue


def _postgres(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def query(database: str, sql: str) -> list[tuple[Any, ...]]:
    """Rows of `sql` read straight from the queue database (SQLite or PostgreSQL)."""
    if database.startswith("sqlite:///"):
        path = database.removeprefix("sqlite:///")
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as conn:
            return list(conn.execute(sql).fetchall())
    import psycopg

    with psycopg.connect(_postgres(database), connect_timeout=10) as conn:
        return list(conn.execute(sql).fetchall())


def states(database: str) -> dict[str, int]:
    """Recipients by state."""
    rows = query(database, "SELECT state, count(*) FROM recipients GROUP BY state")
    return {str(state): int(n) for state, n in rows}


def pending(database: str) -> int:
    """Recipients not yet final (queued, sending, held)."""
    return sum(n for state, n in states(database).items() if state in PENDING)


def recipient_states(database: str) -> dict[str, list[str]]:
    """Queue id -> the states of its recipients, for every message in the queue."""
    found: dict[str, list[str]] = {}
    for queue_id, state in query(database, "SELECT message_id, state FROM recipients"):
        found.setdefault(str(queue_id), []).append(str(state))
    return found


def leases(database: str) -> dict[str | None, int]:
    """Lease owner -> its ``sending`` recipients."""
    rows = query(
        database,
        "SELECT lease_owner, count(*) FROM recipients WHERE state = 'sending' GROUP BY lease_owner",
    )
    return {owner: int(n) for owner, n in rows}


# --------------------------------------------------------------------------- waiting


def wait_delivered(
    primary: CountingPrimary,
    message_ids: Iterable[str],
    timeout: float,
    cluster: Cluster | None = None,
    interval: float = 0.2,
) -> float:
    """Wait until the primary has every one of `message_ids`; the seconds it took.
    Fails naming how many are missing (and the nodes' last log lines)."""
    wanted = set(message_ids)
    started = time.monotonic()
    deadline = started + timeout
    while True:
        missing = wanted - primary.counts().keys()
        if not missing:
            return time.monotonic() - started
        if time.monotonic() > deadline:
            raise AssertionError(
                f"after {timeout:g} s {len(missing)} of {len(wanted)} messages never reached "
                f"the primary, e.g. {sorted(missing)[:5]}; {primary.summary()}"
                + ("" if cluster is None else f"\n{describe(cluster)}")
            )
        time.sleep(interval)


def describe(cluster: Cluster) -> str:
    """The queue's states and leases and the nodes' last log lines, for a failure."""
    try:
        queue = f"queue: {states(cluster.database)}, leases: {leases(cluster.database)}"
    except Exception as error:  # the database may be what failed
        queue = f"queue unreadable: {error!r}"
    return f"{queue}\n{cluster.logs()}"


def wait_cluster(
    cluster: Cluster, check: Callable[[], T], timeout: float, what: str, interval: float = 0.2
) -> T:
    """Poll `check` until it returns something true and return that; after `timeout`
    fail naming `what`, with the queue's state and the nodes' last log lines then."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout:g} s waiting for {what}\n{describe(cluster)}"
            )
        time.sleep(interval)


def wait_for_event(
    nodes: Iterable[Node], event: str, timeout: float, **fields: Any
) -> tuple[Node, dict[str, Any]]:
    """Wait until one of `nodes` logs `event` with these `fields`; that node and record."""
    chosen = list(nodes)
    deadline = time.monotonic() + timeout
    while True:
        for node in chosen:
            for record in node.events(event):
                if all(record.get(key) == value for key, value in fields.items()):
                    return node, record
        if time.monotonic() > deadline:
            tails = "\n".join(
                f"--- {n.name}\n" + "\n".join(n.server.log().splitlines()[-30:]) for n in chosen
            )
            raise AssertionError(f"no {event} {fields} within {timeout:g} s\n{tails}")
        time.sleep(0.05)


# --------------------------------------------------------------------------- PostgreSQL


@dataclass(frozen=True)
class PostgresCluster:
    """A Debian PostgreSQL cluster (`pg_lsclusters`)."""

    version: str
    name: str
    port: int
    status: str


def postgres_cluster(port: int | None = None) -> PostgresCluster | None:
    """The local cluster listening on `port` (default: the tests' admin URL's), or None
    without `pg_lsclusters`."""
    if shutil.which("pg_lsclusters") is None:
        return None
    if port is None:
        match = re.search(r":(\d+)/", POSTGRES_ADMIN_URL)
        port = int(match.group(1)) if match else 5432
    result = subprocess.run(
        ["pg_lsclusters", "--no-header"], capture_output=True, text=True, timeout=30, check=False
    )
    for line in result.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[2].isdigit() and int(fields[2]) == port:
            return PostgresCluster(fields[0], fields[1], int(fields[2]), fields[3])
    return None


def restart_skip_reason() -> str | None:
    """Why this machine cannot restart the tests' PostgreSQL, or None if it can."""
    if os.geteuid() != 0:
        return "restarting PostgreSQL needs root (pg_ctlcluster)"
    if shutil.which("pg_ctlcluster") is None or shutil.which("pg_lsclusters") is None:
        return "pg_ctlcluster/pg_lsclusters not found (Debian's postgresql-common)"
    found = postgres_cluster()
    if found is None:
        return f"no local PostgreSQL cluster serves {POSTGRES_ADMIN_URL.split('@')[-1]}"
    if found.status != "online":
        return f"PostgreSQL {found.version}/{found.name} is {found.status}"
    return None


def restart_postgres(found: PostgresCluster, timeout: float = 120.0) -> float:
    """``pg_ctlcluster VERSION NAME restart`` and wait until it accepts a query again;
    the seconds the restart took."""
    import psycopg

    started = time.monotonic()
    subprocess.run(
        ["pg_ctlcluster", found.version, found.name, "restart"],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    deadline = started + timeout
    while True:
        try:
            with psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=5) as conn:
                conn.execute("SELECT 1")
            return time.monotonic() - started
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
