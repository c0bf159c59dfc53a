"""One SMTP connection to a primary host, sending queued messages as stored (aiosmtplib).

Promises:

* The body goes out exactly as stored (our ``Received:`` header first); only
  SMTP's own dot-stuffing is applied on the wire.  Envelope addresses are sent as
  received — aiosmtplib's address parser is bypassed, and ``<>`` stays ``<>``.
* Each message is sent once per connection with all its recipients for this
  destination; the result is one `Outcome` per recipient.
* What the primary supports is passed through: SIZE (a message over the
  primary's limit bounces 5.3.4), BODY=8BITMIME, SMTPUTF8 (a message that needs
  it bounces 5.6.7 at a primary without it), and the DSN parameters RET, ENVID,
  NOTIFY and ORCPT when the primary advertises DSN.
* STARTTLS is opportunistic (``tls = "may"``: a failed handshake is retried in
  the clear, as Postfix does) or required with a valid certificate
  (``"verify"``: otherwise the recipients are deferred).

A primary that offers PIPELINING (RFC 2920; Postfix does, and smtp-sink) gets
MAIL, every RCPT and DATA in one write and answers them in one go: two round
trips per message instead of four, which halves the replies the event loop waits
for and wakes up on in a flush (`PipelinedReplies`).  One without it gets one
command at a time, and no RCPT after a refused MAIL nor DATA without an accepted
recipient.  Pipelined, those go out anyway and the server refuses them; if it
answers 354 to a DATA with nothing to send, the data is ended at once with an
empty message, which it must refuse too (RFC 2920 §3.1, as Postfix does).

Every wait is bounded by its own figure (`Timeouts`): the TCP connect by
``connect_timeout``, the 220 greeting by ``greeting_timeout`` (RFC 5321
§4.5.3.2.1: 5 minutes, for a primary that greets slowly under load).

Network failures never raise out of `send`: they become deferrals, and the
report says whether the connection can be reused and whether the failure was a
sign of congestion (421, 4xx to MAIL or DATA, timeouts) for the pacer.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

import aiosmtplib
from aiosmtplib import SMTPResponse

from backupmx.deliver.attempt import (
    SendReport,
    accepted,
    after_data,
    broken_off,
    congestion,
    refusal,
)
from backupmx.deliver.route import is_ip
from backupmx.mail.reply import Outcome, classify
from backupmx.mail.wire import on_the_wire
from backupmx.queue.records import Claim, Outbound

# A constant, not a setting: QUIT goes out after every result of the connection is
# decided, so a primary that does not answer it only delays the close by this much.
QUIT_SECONDS = 5.0
# aiosmtplib's bounds on a reply, kept for pipelined replies too: a line, and the lines
# of one multi-line reply.
MAX_REPLY_LINE = 8192
MAX_REPLY_LINES = 100


class ConnectFailed(Exception):
    """No usable SMTP session with this host: refused, timed out, 4xx/5xx greeting, TLS."""


class TlsFailed(ConnectFailed):
    """The STARTTLS handshake failed (retried in the clear when tls = "may")."""


class DataRefused(aiosmtplib.SMTPDataError):
    """A reply other than 354 to DATA: the body was not sent."""


@dataclass(frozen=True)
class Timeouts:
    """Seconds to wait at each step (RFC 5321 §4.5.3.2 gives the minimums)."""

    connect: float  # TCP connection set-up only
    greeting: float  # the 220 greeting: 5 min (§4.5.3.2.1)
    command: float  # EHLO, STARTTLS, MAIL, RCPT, RSET: 5 min (§4.5.3.2.2-3)
    data: float  # DATA's 354 (2 min, §4.5.3.2.4) and the transfer up to the final reply


@dataclass(frozen=True)
class Target:
    host: str  # the MX name (for TLS verification and logs)
    address: str  # the IP address connected to
    port: int

    def __str__(self) -> str:
        address = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.host}[{address}]:{self.port}"

    @property
    def dns_name(self) -> str | None:
        """The host's DNS name (RFC 3464 §2.3.5 Remote-MTA); None for a bare address
        (a static primary or an address literal)."""
        return None if is_ip(self.host) else self.host


@dataclass
class PrimaryConnection:
    target: Target
    smtp: aiosmtplib.SMTP
    timeouts: Timeouts
    tls: str | None = None
    sent: int = 0
    features: dict[str, str] = field(default_factory=dict)

    @property
    def size_limit(self) -> int:
        value = self.features.get("size", "")
        return int(value) if value.isdigit() else 0

    def supports(self, extension: str) -> bool:
        return extension.lower() in self.features

    async def send(
        self,
        message: Outbound,
        recipients: Sequence[Claim],
        hold_5xx: bool,
        may_send: Callable[[], bool] = lambda: True,
    ) -> SendReport:
        """Send one message to its recipients at this destination; never raises.
        `may_send` is asked again right before the body: if it says no (the node's
        fence fell while DATA waited for its 354), the connection is closed before the
        end of data, so the primary delivers nothing, and the report is `abandoned`."""
        report = SendReport([], dsn_supported=self.supports("DSN"))
        refusal = self._refusal(message)
        if refusal is not None:
            report.outcomes = [refusal] * len(recipients)
            return report
        try:
            await self._transaction(message, recipients, hold_5xx, report, may_send)
        except aiosmtplib.SMTPTimeoutError as error:
            report.congestion, report.usable = True, False
            reason = f"timeout talking to {self.target}: {error}"
            report.outcomes = broken_off(report.outcomes, len(recipients), reason)
        except (aiosmtplib.SMTPException, OSError) as error:
            report.usable = False
            reason = f"lost connection with {self.target}: {error}"
            report.outcomes = broken_off(report.outcomes, len(recipients), reason)
        self.sent += 1
        return report

    def _refusal(self, message: Outbound) -> Outcome | None:
        return refusal(message, str(self.target), self.supports("SMTPUTF8"), self.size_limit)

    async def _transaction(
        self,
        message: Outbound,
        recipients: Sequence[Claim],
        hold_5xx: bool,
        report: SendReport,
        may_send: Callable[[], bool],
    ) -> None:
        if self.supports("PIPELINING"):
            await self._pipelined(message, recipients, hold_5xx, report, may_send)
            return
        smtp = self.smtp
        mail = await smtp.execute_command(
            b"MAIL", b"FROM:<" + message.sender.encode() + b">", *self._mail_options(message)
        )
        if not accepted(mail.code):
            outcome = classify(mail.code, mail.message, hold_5xx=hold_5xx)
            report.outcomes = [outcome] * len(recipients)
            report.congestion = congestion(mail.code)
            await self._reset(mail.code, report)
            return
        taken: list[int] = []
        outcomes: list[Outcome | None] = []
        for index, recipient in enumerate(recipients):
            rcpt = await smtp.execute_command(
                b"RCPT", b"TO:<" + recipient.address.encode() + b">", *self._rcpt_options(recipient)
            )
            if accepted(rcpt.code):
                taken.append(index)
                outcomes.append(None)
            else:
                outcomes.append(classify(rcpt.code, rcpt.message, hold_5xx=hold_5xx))
                if rcpt.code == 421:
                    report.congestion = True
        if not taken:
            report.outcomes = [o for o in outcomes if o is not None]
            await self._reset(0, report)
            return
        try:
            done = await self._data(message.loaded_body(), may_send)
            if done is None:
                self._abandon(report, len(recipients))
                return
            data_outcome = classify(done.code, done.message)
        except aiosmtplib.SMTPDataError as error:
            sent = not isinstance(error, DataRefused)
            data_outcome = after_data(error.code, error.message, hold_5xx, sent)
            report.congestion = congestion(error.code)
            await self._reset(error.code, report)
        report.outcomes = [data_outcome if o is None else o for o in outcomes]

    async def _pipelined(
        self,
        message: Outbound,
        recipients: Sequence[Claim],
        hold_5xx: bool,
        report: SendReport,
        may_send: Callable[[], bool],
    ) -> None:
        """The transaction with MAIL, every RCPT and DATA in one write (RFC 2920), then
        the body if DATA was answered 354 and a recipient was accepted."""
        group = [
            command(
                b"MAIL", b"FROM:<" + message.sender.encode() + b">", self._mail_options(message)
            )
        ]
        group += [
            command(b"RCPT", b"TO:<" + r.address.encode() + b">", self._rcpt_options(r))
            for r in recipients
        ]
        group.append(b"DATA\r\n")
        protocol = self.smtp.protocol
        transport = cast(asyncio.Transport | None, protocol.transport if protocol else None)
        if protocol is None or transport is None or transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("connection lost before the message")
        replies = PipelinedReplies(protocol)
        transport.set_protocol(replies)
        try:
            transport.write(b"".join(group))
            answers = []
            for index in range(len(group)):
                last = index == len(group) - 1
                answers.append(
                    await replies.next(self.timeouts.data if last else self.timeouts.command)
                )
                if answers[-1].code == 421:  # the server closes the connection (RFC 5321 §3.8)
                    break
            mail, rcpts = answers[0], answers[1 : len(recipients) + 1]
            data = answers[-1] if len(answers) == len(group) else None
            taken = accepted(mail.code) and any(accepted(r.code) for r in rcpts)
            done = None
            if data is not None and data.code == 354:
                if taken and not may_send():
                    self._abandon(report, len(recipients))
                    return
                transport.write(on_the_wire(message.loaded_body()) if taken else b".\r\n")
                done = await replies.next(self.timeouts.data)
        except (aiosmtplib.SMTPException, OSError):
            self.smtp.close()  # out of step with the server: the connection is not reused
            raise
        finally:
            if not transport.is_closing():
                transport.set_protocol(protocol)
        if not accepted(mail.code):
            report.outcomes = [classify(mail.code, mail.message, hold_5xx=hold_5xx)] * len(
                recipients
            )
            report.congestion = congestion(mail.code)
            await self._reset(mail.code, report)
            return
        closing = next((a for a in answers if a.code == 421), None)
        outcomes = [
            None if accepted(r.code) else classify(r.code, r.message, hold_5xx=hold_5xx)
            for r in rcpts
        ]
        if closing is not None:  # every recipient not refused yet waits for another time
            gone = classify(closing.code, closing.message)
            report.outcomes = [gone if o is None else o for o in outcomes]
            report.outcomes += [gone] * (len(recipients) - len(outcomes))
            report.congestion, report.usable = True, False
            self.smtp.close()
            return
        if not taken:
            report.outcomes = [o for o in outcomes if o is not None]
            await self._reset(0, report)
            return
        assert data is not None
        if done is None:  # DATA refused: nothing was sent
            data_outcome = after_data(data.code, data.message, hold_5xx, False)
            report.congestion = congestion(data.code)
            await self._reset(data.code, report)
        elif done.code == 250:
            data_outcome = classify(done.code, done.message)
        else:
            data_outcome = after_data(done.code, done.message, hold_5xx, True)
            report.congestion = congestion(done.code)
            await self._reset(done.code, report)
        report.outcomes = [data_outcome if o is None else o for o in outcomes]

    async def _data(
        self, body: bytes, may_send: Callable[[], bool]
    ) -> aiosmtplib.SMTPResponse | None:
        """DATA, then the body as stored with SMTP's dot-stuffing.  aiosmtplib's `data`
        rewrites every line ending with a regular expression first, which was a
        quarter of the event loop's time in a flush; stored bodies have CRLF line
        endings only (the receive invariant), so that pass is skipped when none is bare."""
        timeout = self.timeouts.data
        start = await self.smtp.execute_command(b"DATA", timeout=timeout)
        if start.code != 354:
            raise DataRefused(start.code, start.message)
        if not may_send():
            return None  # not a byte of the body: see `send`
        protocol = self.smtp.protocol
        if protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("connection lost before the message")
        protocol.write(on_the_wire(body))
        done = await protocol.read_response(timeout=timeout)
        if done.code != 250:
            raise aiosmtplib.SMTPDataError(done.code, done.message)
        return done

    def _abandon(self, report: SendReport, count: int) -> None:
        """Close the connection inside DATA, before the end of data (RFC 5321 §4.1.1.4:
        no end of data, no delivery)."""
        self.smtp.close()
        report.abandoned, report.usable = True, False
        report.outcomes = broken_off([], count, f"fence lost before the body to {self.target}")

    async def _reset(self, code: int, report: SendReport) -> None:
        if code == 421:
            report.usable = False
            return
        reply = await self.smtp.execute_command(b"RSET")
        report.usable = reply.code == 250

    def _mail_options(self, message: Outbound) -> list[bytes]:
        options = []
        if self.supports("SIZE"):
            options.append(f"SIZE={message.size}".encode())
        if message.body_type == "8BITMIME" and self.supports("8BITMIME"):
            options.append(b"BODY=8BITMIME")
        if message.smtputf8:
            options.append(b"SMTPUTF8")
        if self.supports("DSN"):
            if message.ret:
                options.append(f"RET={message.ret}".encode())
            if message.envid:
                options.append(f"ENVID={message.envid}".encode())
        return options

    def _rcpt_options(self, recipient: Claim) -> list[bytes]:
        if not self.supports("DSN"):
            return []
        options = []
        if recipient.notify:
            options.append(f"NOTIFY={recipient.notify}".encode())
        if recipient.orcpt:
            options.append(f"ORCPT={recipient.orcpt}".encode())
        return options

    async def close(self) -> None:
        try:
            await self.smtp.quit(timeout=QUIT_SECONDS)
        except (aiosmtplib.SMTPException, OSError):
            self.smtp.close()


def command(verb: bytes, argument: bytes, options: Sequence[bytes]) -> bytes:
    """One command line, checked as aiosmtplib checks what it sends: no CR or LF inside."""
    line = b" ".join((verb, argument, *options))
    if b"\r" in line or b"\n" in line:
        raise ValueError("Command arg contains a prohibited control character")
    return line + b"\r\n"


class PipelinedReplies(asyncio.Protocol):
    """The replies to a pipelined command group, in order (RFC 2920).

    aiosmtplib reads one reply per command written, and drops what arrives while a
    reply waits to be taken; so for one transaction the transport is lent to this
    reader (`asyncio.Transport.set_protocol`) and then given back, every reply read.
    What concerns the connection itself (its loss, EOF, flow control) is passed on
    to aiosmtplib's protocol, which so keeps `is_connected` true to the socket."""

    def __init__(self, owner: asyncio.Protocol) -> None:
        self._owner = owner
        self._buffer = bytearray()
        self._lines: list[bytes] = []
        self._replies: deque[SMTPResponse] = deque()
        self._failure: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None

    async def next(self, seconds: float) -> SMTPResponse:
        """The next reply, within `seconds`; raise what broke the connection, or a timeout."""
        if not self._replies and self._failure is None:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self._waiter, seconds)
            except TimeoutError as error:
                raise aiosmtplib.SMTPReadTimeoutError(
                    "Timed out waiting for server response"
                ) from error
            finally:
                self._waiter = None
        if self._replies:
            return self._replies.popleft()
        assert self._failure is not None
        raise self._failure

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while self._failure is None:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_REPLY_LINE:
                    self._fail(aiosmtplib.SMTPResponseException(-1, "Response too long"))
                break
            line = bytes(self._buffer[: end + 1])
            del self._buffer[: end + 1]
            if len(line) > MAX_REPLY_LINE or len(self._lines) >= MAX_REPLY_LINES:
                self._fail(aiosmtplib.SMTPResponseException(-1, "Response too long"))
            elif not line[:3].isdigit():
                text = line.decode("utf-8", errors="ignore")
                self._fail(
                    aiosmtplib.SMTPResponseException(-1, f"Malformed SMTP response line: {text}")
                )
            else:
                self._lines.append(line[4:].strip(b" \t\r\n"))
                if line[3:4] != b"-":
                    text = b"\n".join(self._lines).decode("utf-8", "surrogateescape")
                    self._replies.append(SMTPResponse(int(line[:3]), text))
                    self._lines = []
        self._wake()

    def eof_received(self) -> bool | None:
        self._fail(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return self._owner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(aiosmtplib.SMTPServerDisconnected("Connection lost"))
        self._owner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._owner.pause_writing()

    def resume_writing(self) -> None:
        self._owner.resume_writing()

    def _fail(self, error: Exception) -> None:
        self._failure = self._failure or error
        self._wake()

    def _wake(self) -> None:
        if (
            self._waiter is not None
            and not self._waiter.done()
            and (self._replies or self._failure)
        ):
            self._waiter.set_result(None)


def tls_context(mode: str, ca_file: str) -> ssl.SSLContext:
    if mode == "verify":
        return ssl.create_default_context(cafile=ca_file or None)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def connect(
    target: Target,
    helo: str,
    tls_mode: str,
    ca_file: str,
    timeouts: Timeouts,
    starttls: bool = True,
) -> PrimaryConnection:
    """Open an SMTP session (banner, EHLO, STARTTLS when offered); raise ConnectFailed."""
    try:
        return await _open(target, helo, tls_mode, ca_file, timeouts, use_tls=starttls)
    except TlsFailed:
        if tls_mode != "may":
            raise
        return await _open(target, helo, tls_mode, ca_file, timeouts, use_tls=False)


async def _open(
    target: Target, helo: str, tls_mode: str, ca_file: str, timeouts: Timeouts, use_tls: bool
) -> PrimaryConnection:
    sock = await _tcp_connect(target, timeouts.connect)
    smtp = aiosmtplib.SMTP(
        hostname=target.address,
        sock=sock,
        local_hostname=helo,
        timeout=timeouts.command,
        start_tls=False,
        use_tls=False,
    )
    try:
        # aiosmtplib's connect(timeout=) bounds the TCP connect and the greeting
        # with one figure; the socket is already connected, so here it is the
        # greeting's alone.
        greeting = await smtp.connect(timeout=timeouts.greeting)
        if greeting.code != 220:
            raise ConnectFailed(f"{target} greeted with {greeting.code} {greeting.message}")
        if greeting.message.split(" ", 1)[0].lower() == helo.lower():
            # Postfix's last line of defence against loops: the "primary" is us,
            # reached through an address our self-detection did not know.
            raise ConnectFailed(f"mail for {target} loops back to myself")
        ehlo = await smtp.ehlo()
        if ehlo.code != 250:
            raise ConnectFailed(f"{target} refused EHLO: {ehlo.code} {ehlo.message}")
        tls = None
        if use_tls and smtp.supports_extension("STARTTLS"):
            try:
                await smtp.starttls(
                    tls_context=tls_context(tls_mode, ca_file),
                    server_hostname=target.host,
                    validate_certs=tls_mode == "verify",
                )
            except (aiosmtplib.SMTPException, ssl.SSLError, OSError) as error:
                raise TlsFailed(f"TLS with {target} failed: {error}") from error
            await smtp.ehlo()
            ssl_object = smtp.get_transport_info("ssl_object")
            if ssl_object is not None:
                tls = f"{ssl_object.version()} {ssl_object.cipher()[0]}"
        elif tls_mode == "verify":
            raise ConnectFailed(f"{target} does not offer STARTTLS (tls = verify)")
    except ConnectFailed:
        smtp.close()
        sock.close()
        raise
    except (aiosmtplib.SMTPException, OSError) as error:
        smtp.close()
        sock.close()
        raise _connect_failed(target, error) from error
    return PrimaryConnection(target, smtp, timeouts, tls=tls, features=dict(smtp.esmtp_extensions))


async def _tcp_connect(target: Target, seconds: float) -> socket.socket:
    """A connected, non-blocking socket to the target within `seconds` (Postfix's
    smtp_connect_timeout); raise ConnectFailed.  The greeting is not read here."""
    family = socket.AF_INET6 if ":" in target.address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    connecting = asyncio.get_running_loop().sock_connect(sock, (target.address, target.port))
    try:
        await asyncio.wait_for(connecting, seconds)
    except TimeoutError as error:
        sock.close()
        raise ConnectFailed(f"connect to {target}: timed out after {seconds:g} s") from error
    except OSError as error:
        sock.close()
        raise _connect_failed(target, error) from error
    except BaseException:
        sock.close()
        raise
    return sock


def _connect_failed(target: Target, error: Exception) -> ConnectFailed:
    """The reason by its errno ("Connection refused"): uvloop's text for a refused
    connect is "Connect call failed ('192.0.2.1', 25)", which names no cause."""
    cause = error.__cause__ if isinstance(error.__cause__, OSError) else error
    if isinstance(cause, OSError) and cause.errno:
        reason = os.strerror(cause.errno)
    elif isinstance(cause, OSError) and cause.strerror:
        reason = cause.strerror
    else:
        reason = str(error)
    return ConnectFailed(f"connect to {target}: {reason}")
