"""Primaries for the delivery tests: Postfix's smtp-sink, and aiosmtpd stand-ins for what
smtp-sink cannot do: refuse some recipients of a transaction and take others (`PickyPrimary`),
and check what it is sent against the 8BITMIME and SMTPUTF8 rules (`StrictSink`).

`SmtpSink` runs ``/usr/sbin/smtp-sink`` on a loopback address and dumps every
transaction it accepts to one file (``-d DIR/%M.``).  As root smtp-sink must
drop privileges (``-u nobody``), so the dump directory is a world-writable
temporary directory outside pytest's 0700 ``tmp_path``; it is removed by
`close`.  Extra options choose the replies: ``-r RCPT`` (450 to every RCPT),
``-f RCPT`` (500-class), ``-Q MAIL`` (421 and disconnect); see smtp-sink(1).

The dump format (smtp-sink(1), DUMP FILE FORMAT) has LF line ends: smtp-sink
strips each line's CRLF and writes LF, undoes dot-stuffing, and ends the record
with an empty line.  `Dumped.content` is the message as the client sent it
(after un-stuffing), with LF; compare it with ``stored.replace(b"\\r\\n", b"\\n")``
— exact, because a stored body has no bare CR or LF (docs/queue.md#invariants, invariant 6).

Every wait is bounded: start-up by `START_SECONDS`, stop by `STOP_SECONDS`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from aiosmtpd.controller import Controller

from tests.support.waiting import ProcessExited, wait_for_process_port

SMTP_SINK = "/usr/sbin/smtp-sink"
START_SECONDS = 10.0
STOP_SECONDS = 10.0
BACKLOG = 128
_ADDRESS = re.compile(r"<([^>]*)>")


@dataclass(frozen=True)
class Dumped:
    """One transaction smtp-sink accepted."""

    path: Path
    mail_args: str  # "<alice@sender.test> SIZE=123"
    rcpt_args: tuple[str, ...]  # one per RCPT command, in order
    content: bytes  # the message as received, LF line ends

    @property
    def sender(self) -> str:
        match = _ADDRESS.match(self.mail_args)
        assert match, self.mail_args
        return match.group(1)

    @property
    def recipients(self) -> tuple[str, ...]:
        found = []
        for args in self.rcpt_args:
            match = _ADDRESS.match(args)
            assert match, args
            found.append(match.group(1))
        return tuple(found)


def parse_dump(path: Path) -> Dumped:
    lines = path.read_bytes().split(b"\n")
    # smtp-sink's own Received: (three lines: "from …", "\tby … (smtp-sink) …", "\tdate")
    # ends its headers; our Received: is the first line of the content after it.
    received = next(i for i, line in enumerate(lines) if line.startswith(b"Received: "))
    mail_args = ""
    rcpt_args: list[str] = []
    for line in lines[:received]:
        name, _, value = line.decode().partition(": ")
        if name == "X-Mail-Args":
            mail_args = value
        elif name == "X-Rcpt-Args":
            rcpt_args.append(value)
    start = received + 3
    assert all(x.startswith(b"\t") for x in lines[received + 1 : start]), path
    content = b"\n".join(lines[start:])
    assert content.endswith(b"\n\n") or content == b"\n", f"{path}: incomplete dump"
    return Dumped(path, mail_args, tuple(rcpt_args), content[:-1])


class SmtpSink:
    """One smtp-sink process on ``host:port`` that dumps what it accepts."""

    def __init__(
        self,
        host: str,
        port: int,
        *options: str,
        name: str = "primary.test",
        dump_root: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.options = options
        self.name = name
        self.dump_dir = Path(tempfile.mkdtemp(prefix="backupmx-sink-", dir=dump_root))
        self.dump_dir.chmod(0o777)  # smtp-sink writes as nobody
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self, *options: str) -> SmtpSink:
        """Start (again), optionally with other reply options; wait for the port."""
        assert self.process is None, "already running"
        if options:
            self.options = options
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        self.process = subprocess.Popen(
            [
                SMTP_SINK,
                *user,
                "-d",
                f"{self.dump_dir}/%M.",
                "-h",
                self.name,
                *self.options,
                f"{self.host}:{self.port}",
                str(BACKLOG),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            wait_for_process_port(self.process, self.host, self.port, START_SECONDS, interval=0.02)
        except ProcessExited:
            error = self.process.stderr.read().decode() if self.process.stderr else ""
            self.process = None
            raise RuntimeError(f"smtp-sink on {self.host}:{self.port} exited: {error}") from None
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"smtp-sink did not listen on {self.host}:{self.port}") from None
        self.started_at = time.monotonic()
        return self

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stderr is not None:
            self.process.stderr.close()
        self.process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dump_dir, ignore_errors=True)

    def files(self) -> list[Path]:
        return sorted(p for p in self.dump_dir.rglob("*") if p.is_file())

    def count(self) -> int:
        return len(self.files())

    def messages(self) -> list[Dumped]:
        return [parse_dump(path) for path in self.files()]


# --------------------------------------------------------------------------- aiosmtpd


@dataclass
class Transaction:
    sender: str
    recipients: list[str]
    content: bytes  # as received, CRLF line ends, dot-stuffing undone
    mail_options: tuple[str, ...] = ()  # MAIL parameters, upper-case: "BODY=8BITMIME"


@dataclass
class _PickyHandler:
    refuse: dict[str, str]  # address -> reply
    received: list[Transaction] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        reply = self.refuse.get(address.lower())
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.received.append(
                Transaction(envelope.mail_from, list(envelope.rcpt_tos), bytes(envelope.content))
            )
        return "250 2.0.0 Ok: queued"


class _AiosmtpdPeer:
    """An aiosmtpd server in a thread on a loopback address; its handler keeps the
    transactions it took in `received`, under its `lock`."""

    def __init__(self, handler: Any, host: str, port: int, **options: Any) -> None:
        self.handler = handler
        self.controller = Controller(
            handler, hostname=host, port=port, ready_timeout=START_SECONDS, **options
        )

    @property
    def received(self) -> list[Transaction]:
        with self.handler.lock:
            return list(self.handler.received)

    def start(self) -> Self:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()


class PickyPrimary(_AiosmtpdPeer):
    """An aiosmtpd primary that refuses some recipients (e.g. 550 5.1.1) and takes the rest."""

    def __init__(
        self, host: str, port: int, refuse: dict[str, str], smtputf8: bool = False
    ) -> None:
        handler = _PickyHandler({k.lower(): v for k, v in refuse.items()})
        super().__init__(handler, host, port, enable_SMTPUTF8=smtputf8)


# --------------------------------------------------------------------------- slow greeting


class SlowGreeting:
    """A loopback TCP forwarder in front of a primary that holds back everything the
    primary says for the first `delay` seconds of each connection: a primary that
    greets late (RFC 5321 §4.5.3.2.1 gives it 5 minutes).

    What the client sends goes through at once.  Each connection lives at most
    `delay` + `LIFETIME_SECONDS`; `greeted` lists, per connection, the seconds from
    accept to the first byte handed to the client.
    """

    LIFETIME_SECONDS = 60.0
    POLL_SECONDS = 0.2

    def __init__(self, host: str, port: int, upstream: tuple[str, int], delay: float) -> None:
        self.upstream = upstream
        self.delay = delay
        self.greeted: list[float] = []
        self._stopped = threading.Event()
        self._listener = socket.create_server((host, port))
        self._listener.settimeout(self.POLL_SECONDS)
        self._threads: list[threading.Thread] = []

    def start(self) -> SlowGreeting:
        self._spawn(self._accept)
        return self

    def stop(self) -> None:
        self._stopped.set()
        for thread in list(self._threads):
            thread.join(STOP_SECONDS)
        self._listener.close()

    def _spawn(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            self._spawn(self._connection, client)

    def _connection(self, client: socket.socket) -> None:
        accepted = time.monotonic()
        deadline = accepted + self.delay + self.LIFETIME_SECONDS
        with client, socket.create_connection(self.upstream, timeout=START_SECONDS) as server:
            client.settimeout(self.POLL_SECONDS)
            server.settimeout(self.POLL_SECONDS)
            self._spawn(self._pump, client, server, deadline)
            if self._stopped.wait(self.delay):
                return
            first = self._pump(server, client, deadline)
            if first is not None:
                self.greeted.append(first - accepted)

    def _pump(self, source: socket.socket, sink: socket.socket, deadline: float) -> float | None:
        """Copy until either side closes, the deadline, or stop; returns when the first
        byte went through."""
        first = None
        while not self._stopped.is_set() and time.monotonic() < deadline:
            try:
                data = source.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            first = first or time.monotonic()
            try:
                sink.sendall(data)
            except OSError:
                break
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
        return first


# --------------------------------------------------------------------------- strict


MAX_LINE = 998  # RFC 5321 §4.5.3.1.6, RFC 5322 §2.1.1: octets, without the CRLF


def transport_problem(
    sender: str, recipients: list[str], options: tuple[str, ...], content: bytes
) -> str | None:
    """Why a strict receiver refuses this transaction, or None: what `StrictSink` checks.

    * 8-bit content needs BODY=8BITMIME (RFC 6152 §3), SMTPUTF8 or not;
    * a non-ASCII address or a non-ASCII byte in the message's own header section
      needs SMTPUTF8 (RFC 6531 §3.4, RFC 6532 §3);
    * no line is longer than 998 octets.
    """
    utf8 = "SMTPUTF8" in options
    if not utf8 and not all(a.isascii() for a in (sender, *recipients)):
        return "553 5.6.7 non-ASCII address without SMTPUTF8 (RFC 6531 section 3.4)"
    if not content.isascii() and "BODY=8BITMIME" not in options:
        return "554 5.6.1 8-bit content without BODY=8BITMIME (RFC 6152 section 3)"
    end = content.find(b"\r\n\r\n")
    if not utf8 and not content[: len(content) if end < 0 else end].isascii():
        return "554 5.6.7 non-ASCII header without SMTPUTF8 (RFC 6532 section 3)"
    if any(len(line) > MAX_LINE for line in content.split(b"\r\n")):
        return f"554 5.6.0 a line is longer than {MAX_LINE} octets (RFC 5322 section 2.1.1)"
    return None


@dataclass
class _StrictHandler:
    received: list[Transaction] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if not address.isascii() and "SMTPUTF8" not in options:
            return self._refuse("553 5.6.7 non-ASCII sender without SMTPUTF8")
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if not address.isascii() and "SMTPUTF8" not in envelope.mail_options:
            return self._refuse("553 5.6.7 non-ASCII recipient without SMTPUTF8")
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        transaction = Transaction(
            envelope.mail_from,
            list(envelope.rcpt_tos),
            bytes(envelope.content),
            tuple(envelope.mail_options),
        )
        problem = transport_problem(
            transaction.sender,
            transaction.recipients,
            transaction.mail_options,
            transaction.content,
        )
        if problem:
            return self._refuse(problem)
        with self.lock:
            self.received.append(transaction)
        return "250 2.0.0 Ok: queued"

    def _refuse(self, reply: str) -> str:
        with self.lock:
            self.refused.append(reply)
        return reply


class StrictSink(_AiosmtpdPeer):
    """An aiosmtpd receiver (SMTPUTF8 and 8BITMIME offered, no DSN) that refuses what
    `transport_problem` finds and keeps the rest; what it refused is in `refused`."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(
            _StrictHandler(),
            host,
            port,
            decode_data=False,
            enable_SMTPUTF8=True,
            data_size_limit=0,
        )

    @property
    def refused(self) -> list[str]:
        with self.handler.lock:
            return list(self.handler.refused)
