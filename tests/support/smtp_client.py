"""A raw-socket SMTP client for the integration tests, plus the swaks runner and queue helpers.

smtplib hides what the tests need to see: it fixes line endings, stuffs dots,
refuses odd addresses and never pipelines.  `RawClient` sends bytes exactly as
given and reads replies one at a time, so a test can pipeline a whole session in
one write and then check every reply the server sent — and that it sent no more.

Every read is bounded by a deadline and a line count; nothing here waits forever.

`serving` shares one `backupmx serve` among the tests of a module, and
`stored_in_parallel` runs `queue show --raw` for many messages at once: each
CLI call costs about a second of Python start-up, and the suite has a budget.
"""

from __future__ import annotations

import re
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

from tests.support.server import ServerProcess

SWAKS = "/usr/bin/swaks"
MAX_REPLY_LINES = 200  # an EHLO reply has about ten
_QUEUED = re.compile(r"queued as ([0-9A-Fa-f]+)")


@dataclass(frozen=True)
class Reply:
    """One complete SMTP reply; `lines` keep their code prefix ("250-PIPELINING")."""

    lines: tuple[str, ...]

    @property
    def code(self) -> int:
        return int(self.lines[-1][:3])

    @property
    def extensions(self) -> list[str]:
        """EHLO keywords with their parameters, the greeting line left out."""
        return [line[4:] for line in self.lines[1:]]

    def __str__(self) -> str:
        return "\n".join(self.lines)

    def startswith(self, prefix: str) -> bool:
        return str(self).startswith(prefix)


def queue_id(reply: Reply | str) -> str:
    """The queue id from a ``250 2.0.0 Ok: queued as ID`` reply."""
    match = _QUEUED.search(str(reply))
    assert match, f"not a queued reply: {reply}"
    return match.group(1)


class RawClient:
    """One SMTP connection that sends exactly the bytes it is given."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout: float = 10.0,
        source: str | None = None,
    ) -> None:
        self.timeout = timeout
        self.sock = socket.create_connection(
            (host, port), timeout=timeout, source_address=(source, 0) if source else None
        )
        self._buffer = b""
        self.greeting = self.reply()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, line: str | bytes) -> Reply:
        data = line.encode() if isinstance(line, str) else line
        self.send(data + b"\r\n")
        return self.reply()

    def transaction(
        self, sender: str, recipients: Sequence[str], content: bytes, *, mail_params: str = ""
    ) -> Reply:
        """MAIL, RCPT and DATA pipelined (RFC 2920), then `content` as given; the final reply.

        `content` is sent byte for byte and must carry its own end of data.
        """
        envelope = f"MAIL FROM:<{sender}>{mail_params}\r\n"
        envelope += "".join(f"RCPT TO:<{r}>\r\n" for r in recipients) + "DATA\r\n"
        self.send(envelope.encode())
        replies = self.replies(len(recipients) + 2)
        assert replies[-1].code == 354, replies
        self.send(content)
        return self.reply()

    def start_tls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        """Switch to TLS after the server's 220 to STARTTLS."""
        assert not self._buffer, f"the server sent plaintext after its 220: {self._buffer!r}"
        self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)

    def _line(self, deadline: float) -> bytes | None:
        """The next reply line without its CRLF; None at end of stream."""
        while b"\r\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no complete reply line; got {self._buffer!r}")
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\r\n")
        return line

    def reply(self) -> Reply:
        reply = self.next_reply()
        if reply is None:
            raise ConnectionError("server closed the connection instead of replying")
        return reply

    def next_reply(self) -> Reply | None:
        """The next complete reply, or None if the server closed the connection first."""
        deadline = time.monotonic() + self.timeout
        lines: list[str] = []
        for _ in range(MAX_REPLY_LINES):
            raw = self._line(deadline)
            if raw is None:
                if lines:
                    raise ConnectionError(f"connection closed inside a reply: {lines}")
                return None
            line = raw.decode("utf-8", "replace")
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return Reply(tuple(lines))
        raise AssertionError(f"reply longer than {MAX_REPLY_LINES} lines")

    def replies(self, count: int) -> list[Reply]:
        return [self.reply() for _ in range(count)]

    def replies_until_closed(self, limit: int = 100) -> list[Reply]:
        """Every reply until the server closes the connection (at most `limit`)."""
        found: list[Reply] = []
        for _ in range(limit):
            reply = self.next_reply()
            if reply is None:
                return found
            found.append(reply)
        raise AssertionError(f"more than {limit} replies: {found}")

    def silent_for(self, seconds: float) -> bool:
        """True if the server sends nothing for `seconds` (and keeps the connection open)."""
        if self._buffer:
            return False
        self.sock.settimeout(seconds)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            return True
        self._buffer += chunk
        return False


class RawSession:
    """A loopback TCP connection that speaks SMTP by hand, one reply at a time, as text.

    Unlike `RawClient` it does not read the greeting itself: the lifecycle and
    hostile-client tests watch what the server sends, and when, from the start.
    """

    def __init__(
        self, server: ServerProcess, source: str | None = None, timeout: float = 20
    ) -> None:
        self.sock = socket.create_connection(
            (server.host, server.port),
            timeout=timeout,
            source_address=(source, 0) if source else None,
        )
        self.file = self.sock.makefile("rb")

    def reply(self) -> str:
        """One whole reply (continuation lines included), or EOFError if the server closed."""
        lines = []
        while True:
            line = self.file.readline(65536)
            if not line:
                raise EOFError("connection closed by the server")
            lines.append(line.decode("utf-8", "replace").rstrip("\r\n"))
            if line[3:4] != b"-":
                return "\n".join(lines)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, line: str) -> str:
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def closed_by_server(self) -> bool:
        try:
            return self.file.read(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def swaks(
    server: ServerProcess, *args: str, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run the real swaks against `server`; its transcript is in stdout."""
    return subprocess.run(
        [SWAKS, "--server", f"{server.host}:{server.port}", "--timeout", "10", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def stored_in_parallel(server: ServerProcess, ids: Sequence[str]) -> dict[str, bytes]:
    """`queue show ID --raw` for many ids at once (each CLI start costs about a second)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(ids, pool.map(server.raw, ids), strict=True))


@contextmanager
def serving(server: ServerProcess) -> Iterator[ServerProcess]:
    """Start `server` for a whole test module (one start instead of one per test)."""
    try:
        yield server.start()
    finally:
        server.stop(timeout=15)


def split_received(stored: bytes) -> tuple[bytes, bytes]:
    """Split a stored message into our prepended Received: field and the body as sent."""
    assert stored.startswith(b"Received: "), stored[:80]
    end = stored.index(b"\r\n") + 2
    while stored[end : end + 1] in (b"\t", b" "):
        end = stored.index(b"\r\n", end) + 2
    return stored[:end], stored[end:]


def bare_newlines(data: bytes) -> list[int]:
    """Offsets of every CR not followed by LF and every LF not preceded by CR."""
    return [m.start() for m in re.finditer(rb"\r(?!\n)|(?<!\r)\n", data)]
