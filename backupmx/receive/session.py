"""One SMTP session: an aiosmtpd protocol subclass with backupmx's own command layer.

aiosmtpd supplies the connection plumbing (transport, STARTTLS switch-over,
idle timer).  Everything a client can see is decided here, because aiosmtpd's
defaults are wrong for a backup MX (anchors.md): it answers permanent 500s to
handler exceptions and long lines, upper-cases parameters, refuses DSN ones,
accepts every RCPT, advertises AUTH after STARTTLS, has no connection limit and
reads DATA line by line.

Promises:

* RCPT is accepted only for a backed-up domain (`RelayDomains`); nothing else
  relays (design.md invariant 5).
* ``250`` after DATA only once the queue store has committed the message
  (invariant 1); any failure on the way answers 4xx — ``452 4.3.1`` when storage
  is full, ``451 4.3.0`` otherwise — never 5xx, never 250.
* Every reply carries an enhanced status code (RFC 2034), except the greeting
  and the EHLO/HELO lines.
* An exception in any command answers ``451 4.3.0`` and the session goes on.
"""

from __future__ import annotations

import asyncio
import secrets
import ssl
from asyncio import sslproto
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
from aiosmtpd.smtp import SMTP, TLSSetupException

from backupmx import metrics
from backupmx.config import normalize_domain
from backupmx.queue.database import storage_full
from backupmx.queue.store import BodySource, NewMessage, NewRecipient, new_queue_id, utcnow
from backupmx.receive.address import Address, AddressError, parse_path
from backupmx.receive.clients import Screen
from backupmx.receive.data import DataDecoder, count_received_headers
from backupmx.receive.parameters import (
    MailParameters,
    RcptParameters,
    parse_mail_parameters,
    parse_rcpt_parameters,
)
from backupmx.receive.received import TraceFacts, protocol_name, received_header
from backupmx.receive.spamcheck import Facts, Verdict
from backupmx.receive.spool import Spool

if TYPE_CHECKING:
    from backupmx.receive.listener import Listener, ReceivePolicy

log = structlog.get_logger("backupmx.receive")

MAX_COMMAND_LINE = 2048  # Postfix's line_length_limit; RFC 5321 §4.5.3.1.4 asks for 512+
# The stream reader's limit also sets how much it buffers before pausing the
# socket (twice this), so it is sized for bulk DATA reads, not for commands.
READER_LIMIT = 64 * 1024
WRITE_BUFFER_LIMIT = 64 * 1024  # replies are small: wait for the client only past this


@dataclass
class Envelope:
    sender: Address | None = None  # None with `started` means the null sender <>
    started: bool = False
    mail: MailParameters = field(default_factory=MailParameters)
    recipients: list[tuple[Address, RcptParameters]] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)


class Session(SMTP):
    def __init__(self, listener: Listener) -> None:
        # aiosmtpd's __init__ scans the handler and this class with inspect on every
        # connection (a millisecond each, the largest cost of a short session); set
        # only the state its connection plumbing (connection_made/lost, the idle
        # timer, the STARTTLS switch-over, push) reads.  aiosmtpd is pinned to 1.4.6.
        loop = asyncio.get_running_loop()
        asyncio.StreamReaderProtocol.__init__(
            self,
            asyncio.StreamReader(limit=READER_LIMIT, loop=loop),
            client_connected_cb=self._cb_client_connected,
            loop=loop,
        )
        policy = listener.policy
        self.loop = loop
        self.hostname = policy.hostname
        self.enable_SMTPUTF8 = True
        self.tls_context = policy.tls_context
        self._timeout_duration = policy.limits.command_timeout
        self._timeout_handle: asyncio.TimerHandle | None = None
        self._idle_deadline = 0.0
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self._handler_coroutine = None
        self._handle_hooks = {}
        self.session = None
        self.envelope = None
        self.transport = None
        self.listener = listener
        self.screen = Screen(listener.checks, lambda: listener.policy, "")
        self.session_id = secrets.token_hex(6)
        self.client_ip = ""
        self.helo = ""
        self.extended = False
        self.tls: str | None = None
        self.mail = Envelope()
        self.errors = 0
        self.in_data = False
        self.refusal: str | None = None
        self._data_decoder: DataDecoder | None = None
        self._data_done: asyncio.Future[None] | None = None
        self._data_deadline = 0.0
        self._data_armed_at = 0.0
        self._commands: dict[str, Callable[[str], Awaitable[None]]] = {
            "HELO": self.cmd_helo,
            "EHLO": self.cmd_ehlo,
            "MAIL": self.cmd_mail,
            "RCPT": self.cmd_rcpt,
            "DATA": self.cmd_data,
            "RSET": self.cmd_rset,
            "NOOP": self.cmd_noop,
            "QUIT": self.cmd_quit,
            "VRFY": self.cmd_vrfy,
            "EXPN": self.cmd_expn,
            "ETRN": self.cmd_etrn,
            "HELP": self.cmd_help,
            "STARTTLS": self.cmd_starttls,
        }

    # ------------------------------------------------------------------ connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        if first:
            peer = transport.get_extra_info("peername")
            self.client_ip = self.screen.client_ip = str(peer[0]) if peer else "unknown"
            self.refusal = self.listener.admit(self)
            metrics.connection_opened(self.refusal)
        super().connection_made(transport)

    def eof_received(self) -> bool:
        # aiosmtpd returns True here, leaving the socket half-open (CLOSE_WAIT) and the
        # connection slot taken until the idle timeout; a client that left is gone.
        super().eof_received()
        return False

    def connection_lost(self, error: Exception | None) -> None:
        self.listener.forget(self)
        self.screen.close()
        super().connection_lost(error)

    def _reset_timeout(self, duration: float | None = None) -> None:
        """Move the idle deadline; the timer itself is re-armed only when it would fire
        too late.  aiosmtpd cancels and re-creates a timer for every command, which
        cost about a twelfth of the event loop's time per message."""
        self._idle_deadline = self.loop.time() + (duration or self._timeout_duration)
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or handle.when() > self._idle_deadline:
            if handle is not None:
                handle.cancel()
            self._timeout_handle = self.loop.call_at(self._idle_deadline, self._timeout_cb)

    def _timeout_cb(self) -> None:
        if self.loop.time() < self._idle_deadline:
            self._timeout_handle = self.loop.call_at(self._idle_deadline, self._timeout_cb)
            return
        self._write_now(b"421 4.4.2 " + self.hostname.encode() + b" Error: timeout exceeded\r\n")
        log.info("session_timeout")
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    @property
    def policy(self) -> ReceivePolicy:
        """Read per command, so a SIGHUP reload reaches sessions already open."""
        return self.listener.policy

    async def reply(self, text: str) -> None:
        """Send one reply; 4xx/5xx replies count against the session's error limit."""
        code = text[:3]
        if code[0] in "45" and not text.startswith("452 4.5.3"):
            self.errors += 1
        await self.push(text)
        if self.errors >= self.policy.limits.max_errors and self.transport is not None:
            await self.push("421 4.7.0 Error: too many errors")
            log.info("session_closed", reason="too many errors")
            self.transport.close()

    async def push(self, status: str) -> None:  # type: ignore[override]
        """Write one reply; wait for the socket only when its buffer is backed up."""
        self._writer.write(status.encode("utf-8", "surrogateescape") + b"\r\n")
        if self._writer.transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT:
            await self._writer.drain()

    def close_with(self, text: str) -> None:
        """Send a last reply without waiting for the client, and close."""
        self._write_now(text.encode() + b"\r\n")
        if self.transport is not None:
            self.transport.close()

    def _write_now(self, data: bytes) -> None:
        if isinstance(self.transport, asyncio.WriteTransport):
            self.transport.write(data)

    async def _handle_client(self) -> None:
        structlog.contextvars.bind_contextvars(session=self.session_id, client=self.client_ip)
        if self.refusal:
            log.info("connection_refused", reason=self.refusal)
            self.close_with(self.refusal)
            return
        log.debug("connection_opened")  # the accept line carries client and session
        refusal = await self.screen.greet(
            self._reader,
            lambda: len(self._reader._buffer),  # type: ignore[attr-defined]
            lambda client_ip: self.listener.readmit(self, client_ip),
        )
        if refusal is not None:
            log.info("connection_refused", reason=refusal)
            self.close_with(refusal)
            return
        structlog.contextvars.bind_contextvars(client=self.client_ip)
        await self.push(f"220 {self.hostname} ESMTP backupmx")
        while self.transport is not None:
            if self.listener.draining:
                self.close_with("421 4.3.2 Service shutting down, try again later")
                return
            line = await self._read_command()
            if line is None:
                continue
            verb, _, arg = line.partition(" ")
            try:
                command = self._commands.get(verb.upper())
                if command is None:
                    await self.reply("502 5.5.2 Error: command not recognized")
                    continue
                self._reset_timeout()
                await command(arg.strip(" "))
            except (asyncio.CancelledError, ConnectionError):
                raise
            except TLSSetupException:
                log.info("tls_failed")
                if self.transport is not None:
                    self.transport.close()
                return
            except Exception as error:
                log.exception("command_failed", command=verb.upper(), error=str(error))
                await self.reply("451 4.3.0 Error: internal error, try again later")

    async def _read_command(self) -> str | None:
        try:
            raw = await self._reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as error:
            await self._discard_line(error.consumed)
            await self.reply("500 5.5.2 Error: line too long")
            return None
        except asyncio.IncompleteReadError:
            if self.transport is not None:
                self.transport.close()
            return None
        if len(raw) > MAX_COMMAND_LINE:
            await self.reply("500 5.5.2 Error: line too long")
            return None
        line = raw.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
        if not line:
            await self.reply("500 5.5.2 Error: bad syntax")
            return None
        return line

    async def _discard_line(self, consumed: int) -> None:
        await self._reader.readexactly(consumed)
        while True:
            try:
                await self._reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as error:
                await self._reader.readexactly(error.consumed)

    # ------------------------------------------------------------------ commands

    async def cmd_helo(self, arg: str) -> None:
        if not arg:
            await self.reply("501 5.5.4 Syntax: HELO hostname")
            return
        self.helo, self.extended, self.mail = arg, False, Envelope()
        await self.push(f"250 {self.hostname}")

    async def cmd_ehlo(self, arg: str) -> None:
        if not arg:
            await self.reply("501 5.5.4 Syntax: EHLO hostname")
            return
        self.helo, self.extended, self.mail = arg, True, Envelope()
        lines = [
            self.hostname,
            "PIPELINING",
            f"SIZE {self.policy.limits.max_message_size}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "DSN",
        ]
        if self.policy.tls_context is not None and self.tls is None:
            lines.append("STARTTLS")
        if self.listener.etrn is not None and self.policy.may_etrn(self.client_ip):
            lines.append("ETRN")
        # One write for the whole reply: each write is a send() system call.
        await self.push("".join(f"250-{line}\r\n" for line in lines[:-1]) + f"250 {lines[-1]}")

    async def cmd_mail(self, arg: str) -> None:
        if not self.helo:
            await self.reply("503 5.5.1 Error: send HELO/EHLO first")
            return
        if self.mail.started:
            await self.reply("503 5.5.1 Error: nested MAIL command")
            return
        if arg[:5].upper() != "FROM:":
            await self.reply("501 5.5.4 Syntax: MAIL FROM:<address>")
            return
        try:
            sender, rest = parse_path(arg[5:], allow_null=True, utf8=True)
            if rest and not self.extended:
                raise AddressError(
                    "501 5.5.4 Syntax: MAIL FROM:<address> (no parameters after HELO)"
                )
            params = parse_mail_parameters(rest)
            if sender is not None and not sender.is_ascii and not params.smtputf8:
                raise AddressError("553 5.6.7 Non-ASCII address requires SMTPUTF8")
        except AddressError as error:
            await self.reply(error.reply)
            return
        if params.size is not None and params.size > self.policy.limits.max_message_size:
            await self.reply("552 5.3.4 Message size exceeds fixed limit")
            return
        refusal = self.screen.message()
        if refusal is not None:
            await self.reply(refusal)
            return
        self.mail = Envelope(sender=sender, started=True, mail=params)
        await self.push("250 2.1.0 Ok")

    async def cmd_rcpt(self, arg: str) -> None:
        if not self.mail.started:
            await self.reply("503 5.5.1 Error: need MAIL command")
            return
        if arg[:3].upper() != "TO:":
            await self.reply("501 5.5.4 Syntax: RCPT TO:<address>")
            return
        if len(self.mail.recipients) >= self.policy.limits.max_recipients:
            await self.reply("452 4.5.3 Error: too many recipients")
            return
        try:
            address, rest = parse_path(arg[3:], allow_null=False, utf8=self.mail.mail.smtputf8)
            assert address is not None
            if rest and not self.extended:
                raise AddressError("501 5.5.4 Syntax: RCPT TO:<address> (no parameters after HELO)")
            self.policy.relay_domains.check_recipient(address)
            params = parse_rcpt_parameters(rest)
        except AddressError as error:
            log.info("recipient_rejected", recipient=arg[3:].strip(), reply=error.reply)
            metrics.recipient_rejected(error.reply)
            await self.reply(error.reply)
            return
        refusal = await self.screen.recipient(address, str(self.mail.sender or ""))
        if refusal is not None:
            metrics.recipient_rejected(refusal)
            if refusal.startswith("421"):
                self.close_with(refusal)
            else:
                await self.reply(refusal)
            return
        # Local parts are case-sensitive (RFC 5321 §2.4); only the domain is folded.
        key = f"{address.local}@{address.routing_domain}"
        if key not in self.mail.seen:
            self.mail.seen.add(key)
            self.mail.recipients.append((address, params))
        await self.push("250 2.1.5 Ok")

    async def cmd_rset(self, arg: str) -> None:
        self.mail = Envelope()
        await self.push("250 2.0.0 Ok")

    async def cmd_noop(self, arg: str) -> None:
        await self.push("250 2.0.0 Ok")

    async def cmd_quit(self, arg: str) -> None:
        await self.push("221 2.0.0 Bye")
        if self.transport is not None:
            self.transport.close()

    async def cmd_vrfy(self, arg: str) -> None:
        # Postfix's disable_vrfy_command: a backup MX must not help address harvesting.
        await self.reply("502 5.5.1 VRFY command is disabled")

    async def cmd_expn(self, arg: str) -> None:
        await self.reply("502 5.5.1 EXPN command is disabled")

    async def cmd_etrn(self, arg: str) -> None:
        """RFC 1985: an allowed client (the primary, back up) asks for its mail now."""
        if self.listener.etrn is None or not self.policy.may_etrn(self.client_ip):
            await self.reply("459 4.7.1 Error: ETRN not allowed from this client")
            return
        if self.mail.started:
            await self.reply("503 5.5.1 Error: ETRN not allowed inside a mail transaction")
            return
        try:
            domain = normalize_domain(arg.removeprefix("@").removeprefix("#"))
        except ValueError:
            await self.reply("501 5.5.4 Syntax: ETRN domain")
            return
        if not self.policy.relay_domains.covers(domain):
            await self.reply(f"458 4.7.1 Error: unable to queue messages for {domain}")
            return
        due = await self.listener.etrn(domain)
        log.info("etrn", domain=domain, recipients=due)
        await self.push(f"250 2.0.0 Queuing for node {domain} started")

    async def cmd_help(self, arg: str) -> None:
        await self.push("214 2.0.0 See RFC 5321")

    async def cmd_starttls(self, arg: str) -> None:
        context: ssl.SSLContext | None = self.policy.tls_context
        if context is None:
            await self.reply("502 5.5.1 Error: command not implemented")
            return
        if self.tls is not None:
            await self.reply("503 5.5.1 Error: TLS already active")
            return
        if arg:
            await self.reply("501 5.5.4 Syntax: STARTTLS")
            return
        await self.push("220 2.0.0 Ready to start TLS")
        await self._start_tls(context)
        ssl_object = self.transport.get_extra_info("ssl_object") if self.transport else None
        if ssl_object is not None:
            name, _, bits = ssl_object.cipher()
            self.tls = f"{ssl_object.version()} with cipher {name} ({bits}/{bits} bits)"
        # RFC 3207 §4.2: forget everything learned before the handshake.
        self.helo, self.mail = "", Envelope()
        log.info("tls_started", tls=self.tls)

    async def _start_tls(self, context: ssl.SSLContext) -> None:
        """aiosmtpd's transport switch-over, with our own 220 reply sent first."""
        waiter = self.loop.create_future()
        self._tls_protocol = sslproto.SSLProtocol(
            self.loop, self, context, waiter, server_side=True
        )
        self._original_transport = self.transport
        assert self._original_transport is not None
        self._original_transport.set_protocol(self._tls_protocol)
        self.transport = self._tls_protocol._app_transport
        self._tls_protocol.connection_made(self._original_transport)
        try:
            await waiter
        except asyncio.CancelledError:
            raise
        except Exception as error:
            raise TLSSetupException() from error

    # ------------------------------------------------------------------ DATA

    async def cmd_data(self, arg: str) -> None:
        if not self.mail.started:
            await self.reply("503 5.5.1 Error: need MAIL command")
            return
        if not self.mail.recipients:
            await self.reply("554 5.5.1 Error: no valid recipients")
            return
        if arg:
            await self.reply("501 5.5.4 Syntax: DATA")
            return
        self.in_data = True
        try:
            await self._receive_message()
        finally:
            self.in_data = False
            self.mail = Envelope()

    async def _receive_message(self) -> None:
        limits = self.policy.limits
        queue_id = new_queue_id()
        structlog.contextvars.bind_contextvars(queue_id=queue_id)
        try:
            received_at = utcnow()
            recipients = self.mail.recipients
            header = received_header(
                TraceFacts(
                    helo=self.helo,
                    client_ip=self.client_ip,
                    hostname=self.hostname,
                    protocol=protocol_name(
                        self.extended, self.tls is not None, self.mail.mail.smtputf8
                    ),
                    queue_id=queue_id,
                    tls=self.tls,
                    single_recipient=str(recipients[0][0]) if len(recipients) == 1 else None,
                    date=received_at,
                )
            )
            spool = Spool()
            spool_error: list[OSError] = []

            def sink(block: bytes) -> None:
                if spool_error:
                    return
                try:
                    spool.write(block)
                except OSError as error:
                    spool_error.append(error)

            sink(header)
            decoder = DataDecoder(sink, limits.max_message_size, limits.bare_newline == "normalize")
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            try:
                await self._read_data(decoder)
                data_ended = metrics.clock()
                reply = self._judge(decoder, spool, spool_error)
                if reply is None:
                    spam, body = await self._spam_check(spool, queue_id)
                    reply = (spam and spam.reply) or await self._enqueue(
                        queue_id, body, received_at, spam
                    )
                metrics.message_answered(reply, data_ended)
            finally:
                spool.close()
            await self.reply(reply)
        finally:
            structlog.contextvars.unbind_contextvars("queue_id")

    async def _read_data(self, decoder: DataDecoder) -> None:
        """Feed the connection to `decoder` until the end of data.

        While DATA lasts, `data_received` hands each chunk from the socket straight
        to the decoder: no stream-reader buffering and no task switch per chunk,
        which at 100 KiB per message was most of the cost.  If the client goes
        away, aiosmtpd cancels this task (CancelledError).
        """
        self._data_deadline = self.loop.time() + self.policy.limits.data_timeout
        self._data_armed_at = -1.0
        self._data_decoder = decoder
        self._data_done = self.loop.create_future()
        try:
            buffered = bytes(self._reader._buffer)  # type: ignore[attr-defined]
            self._reader._buffer.clear()  # type: ignore[attr-defined]
            if buffered:
                self._feed_data(buffered)
            else:
                self._keep_data_alive()
            await self._data_done
        finally:
            self._data_decoder = None
        self._reset_timeout()

    def data_received(self, data: bytes) -> None:
        if self._data_decoder is None:
            super().data_received(data)
        else:
            self._feed_data(data)

    def _feed_data(self, data: bytes) -> None:
        decoder = self._data_decoder
        assert decoder is not None and self._data_done is not None
        used = decoder.feed(data)
        if not decoder.done:
            self._keep_data_alive()
            return
        self._data_decoder = None
        if used < len(data):
            # Pipelined commands after the final dot go to the command reader.
            super().data_received(data[used:])
        if not self._data_done.done():
            self._data_done.set_result(None)

    def _keep_data_alive(self) -> None:
        """Data re-arms the idle timer (at most once a second: chunks come by thousands),
        never past the whole DATA phase's deadline."""
        now = self.loop.time()
        if now - self._data_armed_at < 1.0:
            return
        self._data_armed_at = now
        remaining = self._data_deadline - now
        if remaining <= 0:
            log.info("data_timeout")
            self._timeout_cb()
        else:
            self._reset_timeout(min(self.policy.limits.command_timeout, remaining))

    def _judge(self, decoder: DataDecoder, spool: Spool, spool_error: list[OSError]) -> str | None:
        """The reply for a message that must not be queued, or None to queue it."""
        limits = self.policy.limits
        if decoder.too_big:
            log.info("message_rejected", reason="too big", size=decoder.size)
            return "552 5.3.4 Error: message size exceeds fixed limit"
        if decoder.bare_newline and limits.bare_newline == "reject":
            log.info("message_rejected", reason="bare CR or LF")
            return "550 5.6.0 Error: bare CR or LF in message (see RFC 5321 §2.3.8)"
        if spool_error:
            log.error("spool_failed", error=str(spool_error[0]))
            if storage_full(spool_error[0]):
                return "452 4.3.1 Error: insufficient system storage"
            return "451 4.3.0 Error: local error in processing"
        hops = count_received_headers(spool.head) - 1  # ours is the first
        if hops > limits.max_received_headers:
            log.info("message_rejected", reason="mail loop", received_headers=hops)
            return "554 5.4.6 Error: too many hops (mail loop?)"
        return None

    async def _spam_check(self, spool: Spool, queue_id: str) -> tuple[Verdict | None, BodySource]:
        """The spam hook on the stored form (our Received: first); the body to queue."""
        settings = self.policy.spamcheck
        if settings.backend == "none":
            return None, spool
        mail = self.mail
        facts = Facts(
            self.client_ip,
            self.helo,
            str(mail.sender) if mail.sender else "",
            [str(a) for a, _ in mail.recipients],
            queue_id,
            self.hostname,
        )
        return await self.listener.spam.check(spool, facts, settings)

    async def _enqueue(
        self, queue_id: str, spool: BodySource, received_at: Any, spam: Verdict | None = None
    ) -> str:
        mail = self.mail
        message = NewMessage(
            id=queue_id,
            sender=str(mail.sender) if mail.sender else "",
            recipients=[
                NewRecipient(str(a), a.routing_domain, p.notify, p.orcpt)
                for a, p in mail.recipients
            ],
            body=spool,
            client_ip=self.client_ip,
            client_helo=self.helo,
            protocol=protocol_name(self.extended, self.tls is not None, mail.mail.smtputf8),
            session_id=self.session_id,
            tls=self.tls,
            body_type=mail.mail.body,
            smtputf8=mail.mail.smtputf8,
            ret=mail.mail.ret,
            envid=mail.mail.envid,
            received_at=received_at,
            spam_verdict=spam.label if spam else None,
            spam_score=spam.score if spam else None,
            spam_detail=spam.detail if spam else None,
        )
        try:
            await self.listener.store.enqueue(message)
        except Exception as error:
            full = storage_full(error)
            log.error("enqueue_failed", error=str(error), storage_full=full)
            if full:
                return "452 4.3.1 Error: insufficient system storage"
            return "451 4.3.0 Error: queue file write error, try again later"
        log.info(
            "message_accepted",
            sender=message.sender,
            size=spool.size,
            rcpts=len(message.recipients),
        )
        return f"250 2.0.0 Ok: queued as {queue_id}"
