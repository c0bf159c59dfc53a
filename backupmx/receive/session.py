"""One SMTP session: an aiosmtpd protocol subclass with backupmx's own command layer.

aiosmtpd supplies the connection plumbing (transport, the handler task that
greets the client, STARTTLS switch-over, idle timer).  Everything a client can
see is decided here, because aiosmtpd's defaults are wrong for a backup MX
(anchors.md): it answers permanent 500s to handler exceptions and long lines,
upper-cases parameters, refuses DSN ones, accepts every RCPT, advertises AUTH
after STARTTLS, has no connection limit and reads DATA line by line.

Theory of operation.  After the greeting, commands are answered straight from
`data_received`: the bytes go to an inbox, and each complete line is answered
at once when its command needs nothing but the session's own state (HELO,
MAIL, DATA's ``354``, QUIT, …).  A command that must wait — RCPT's checks
(callouts, DNSBL, greylisting), the commit after the end of data, ETRN,
STARTTLS — runs as one *step*, a task; while it runs, further input waits in
the inbox (reading pauses past `INBOX_LIMIT`), and when it ends the inbox is
answered on.  So replies keep the order of the commands, and a pipelined
session costs no task switch per command (aiosmtpd's reader task cost one,
plus a stream-reader pass, per command: about a quarter of the event loop's
time per message).  During DATA the decoder takes the socket's bytes in bulk.

Promises:

* RCPT is accepted only for a backed-up domain (`RelayDomains`); nothing else
  relays (design.md invariant 5).
* Postmaster is always reachable (RFC 5321 §4.5.1): ``postmaster@`` every
  backed-up domain, and the bare ``<Postmaster>`` (stored as the configured
  ``postmaster`` address), pass every recipient check but the rate, and the spam
  hook tags their mail but never refuses it.  So that a postmaster recipient
  cannot carry others past the spam hook, postmaster recipients get a transaction
  of their own: a RCPT of the other kind answers ``452 4.5.3``, which clients
  retry in a new transaction (RFC 5321 §4.5.3.1.10).
* VRFY and EXPN answer ``252`` whatever the argument (RFC 5321 §7.3): they are
  disabled, and a reply must not look like a verification, either way.
* ``250`` after DATA only once the queue store has committed the message
  (invariant 1); any failure on the way answers 4xx — ``452 4.3.1`` when storage
  is full, ``451 4.3.0`` otherwise — never 5xx, never 250.
* A HELO argument, address or parameter the queue cannot keep byte for byte
  (invalid UTF-8, NUL, control characters: `storable`) is refused with a 5xx
  naming the flaw, so it never reaches the intake's group commit and another
  client's message.
* Every reply carries an enhanced status code (RFC 2034), except the greeting
  and the EHLO/HELO lines.
* An exception in any command answers ``451 4.3.0`` and the session goes on.
* A session's last reply (``221`` to QUIT, a ``421``) reaches the client: the
  connection is half-closed and what the client still sends is dropped until
  its end of file (at most `LINGER`), since closing with unread input would
  reset the connection and could destroy the reply unread.
"""

from __future__ import annotations

import asyncio
import contextvars
import random
import ssl
from asyncio import sslproto
from collections.abc import Callable, Coroutine, Generator
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

import structlog
from aiosmtpd.smtp import SMTP, TLSSetupException

from backupmx import metrics
from backupmx.config import Limits
from backupmx.mail.address import Address, AddressError, parse_path
from backupmx.mail.domains import normalize_domain
from backupmx.mail.storable import flaw
from backupmx.queue.database import storage_full
from backupmx.queue.records import BodySource, NewMessage, NewRecipient, new_queue_id, utcnow
from backupmx.receive.clients import Screen
from backupmx.receive.data import DataDecoder
from backupmx.receive.parameters import (
    MailParameters,
    RcptParameters,
    parse_mail_parameters,
    parse_rcpt_parameters,
)
from backupmx.receive.policy import ReceivePolicy
from backupmx.receive.received import TraceFacts, protocol_name, received_header
from backupmx.receive.spamcheck import Facts, Verdict
from backupmx.receive.spool import Spool

if TYPE_CHECKING:
    from backupmx.receive.listener import Listener

log = structlog.get_logger("backupmx.receive")

MAX_COMMAND_LINE = 2048  # Postfix's line_length_limit; RFC 5321 §4.5.3.1.4 asks for 512+
# The stream reader (used only before the greeting, for a PROXY header) pauses the
# socket past twice its limit.
READER_LIMIT = 64 * 1024
INBOX_LIMIT = 64 * 1024  # pipelined input held while a step runs, before reading pauses
WRITE_BUFFER_LIMIT = 64 * 1024  # replies are small: wait for the client only past this
# After a session's last reply the connection stays half-open this long, reading and
# dropping what the client still sends: closing a socket with unread input makes the
# kernel answer with a reset, which can destroy the reply before the client has read
# it (the fuzzer saw it with input pipelined past QUIT).  Closed at the client's EOF.
LINGER = 2.0
# 452 4.5.3 ("too many recipients") is retried in a new transaction (RFC 5321 §4.5.3.1.10)
# and does not count against max_errors.
SEPARATE_POSTMASTER = (
    "452 4.5.3 Error: too many recipients (postmaster gets a transaction of its own)"
)


@dataclass
class Envelope:
    sender: Address | None = None  # None with `started` means the null sender <>
    started: bool = False
    mail: MailParameters = field(default_factory=MailParameters)
    recipients: list[tuple[Address, RcptParameters]] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    postmaster: bool = False  # the recipients are postmaster's (then only postmaster's)


class Incoming:
    """A message between DATA and its reply: spooled as the decoder passes it on."""

    def __init__(self, queue_id: str, received_at: datetime, limits: Limits) -> None:
        self.queue_id = queue_id
        self.received_at = received_at
        self.spool = Spool()
        self.spool_error: list[OSError] = []
        self.decoder = DataDecoder(
            self.sink, limits.max_message_size, limits.bare_newline == "normalize"
        )

    def sink(self, block: bytes) -> None:
        if self.spool_error:
            return
        try:
            self.spool.write(block)
        except OSError as error:
            self.spool_error.append(error)


Step = Coroutine[Any, Any, None]


class Started:
    """The rest of a coroutine that `Session._start` ran by hand until it first waited:
    awaiting this hands the task each future the coroutine waits on, as ``await`` would
    (what Python 3.12's eager tasks do)."""

    def __init__(self, coroutine: Step, waiting_on: Any) -> None:
        self._coroutine = coroutine
        self._waiting_on = waiting_on

    def __await__(self) -> Generator[Any, Any, None]:
        waiting_on = self._waiting_on
        while True:
            try:
                sent = yield waiting_on
            except BaseException as error:  # the task was cancelled: pass it on
                try:
                    waiting_on = self._coroutine.throw(error)
                except StopIteration:
                    return
            else:
                try:
                    waiting_on = self._coroutine.send(sent)
                except StopIteration:
                    return


class Session(SMTP):
    def __init__(self, listener: Listener) -> None:
        # aiosmtpd's __init__ scans the handler and this class with inspect on every
        # connection (a millisecond each, the largest cost of a short session); set
        # only the state its connection plumbing (connection_made/lost, the idle
        # timer, the STARTTLS switch-over) reads.  aiosmtpd is pinned to 1.4.6.
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
        self.session_id = f"{random.getrandbits(48):012x}"
        self.client_ip = ""
        self.helo = ""
        self.extended = False
        self.tls: str | None = None
        self.mail = Envelope()
        self.errors = 0
        self.in_data = False
        self.refusal: str | None = None
        self._context: contextvars.Context | None = None  # set once greeted
        self._inbox = bytearray()
        self._skipping = False  # dropping an over-long line
        self._step: asyncio.Task[None] | None = None
        self._reading_paused = False
        self._incoming: Incoming | None = None
        self._data_deadline = 0.0
        self._data_armed_at = 0.0
        self._lingering = False  # the last reply is sent: input is dropped until the close

    # ------------------------------------------------------------------ connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        if first:
            peer = transport.get_extra_info("peername")
            self.client_ip = self.screen.client_ip = str(peer[0]) if peer else "unknown"
            self.refusal = self.listener.admit(self)
            metrics.connection_opened(self.refusal)
        else:
            self._inbox.clear()  # RFC 3207 §4.2: nothing sent before the handshake counts
        super().connection_made(transport)

    def eof_received(self) -> bool:
        # aiosmtpd returns True here, leaving the socket half-open (CLOSE_WAIT) and the
        # connection slot taken until the idle timeout; a client that left is gone.
        super().eof_received()
        return False

    def connection_lost(self, error: Exception | None) -> None:
        self.listener.forget(self)
        self.screen.close()
        if self._step is not None:
            self._step.cancel()
        super().connection_lost(error)

    def _tls_failed(self) -> None:
        """A failed handshake ends the session here: asyncio tells the protocol above an
        SSL transport of a lost connection only once its handshake has completed."""
        for transport in (self.transport, self._original_transport):
            if transport is not None:
                transport.close()
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        self.listener.forget(self)
        self.screen.close()

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
        self._write(b"421 4.4.2 " + self.hostname.encode() + b" Error: timeout exceeded\r\n")
        log.info("session_timeout")
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    @property
    def policy(self) -> ReceivePolicy:
        """Read per command, so a SIGHUP reload reaches sessions already open."""
        return self.listener.policy

    @property
    def open(self) -> bool:
        return (
            self.transport is not None and not self.transport.is_closing() and not self._lingering
        )

    def reply(self, text: str) -> None:
        """Send one reply; 4xx/5xx replies count against the session's error limit."""
        if text[0] in "45" and not text.startswith("452 4.5.3"):
            self.errors += 1
        self._write(text.encode("utf-8", "surrogateescape") + b"\r\n")
        if self.errors >= self.policy.limits.max_errors and self.open:
            log.info("session_closed", reason="too many errors")
            self.close_with("421 4.7.0 Error: too many errors")

    def close_with(self, text: str) -> None:
        """Send a last reply without waiting for the client, and end the session: by a
        half-close and `LINGER` (see the module docstring) once greeted; at once for a
        refusal before the greeting (the client has sent nothing), over TLS (no
        half-close) and when already lingering (the drain's cut)."""
        self._write(text.encode() + b"\r\n")
        transport = cast(asyncio.WriteTransport | None, self.transport)
        if transport is None:
            return
        if self._context is None or self._lingering or not transport.can_write_eof():
            transport.close()
            return
        self._lingering = True
        self._inbox.clear()
        transport.write_eof()
        self.loop.call_later(LINGER, transport.close)

    def _write(self, data: bytes) -> None:
        if self.open:
            self.transport.write(data)  # type: ignore[union-attr]

    # ------------------------------------------------------------------ greeting

    async def _handle_client(self) -> None:
        """aiosmtpd's handler task: admission and the greeting, then `data_received`
        answers the commands."""
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
        # Everything the session does from here on runs in this context: its log
        # lines carry the session and the client.
        self._context = contextvars.copy_context()
        self._inbox += self._reader._buffer  # type: ignore[attr-defined]
        self._reader._buffer.clear()  # type: ignore[attr-defined]
        self.reply(f"220 {self.hostname} ESMTP backupmx")
        self._context.run(self._answer)

    # ------------------------------------------------------------------ input

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        if self._context is None:
            super().data_received(data)  # before the greeting: the PROXY header reader
        else:
            self._context.run(self._received, data)

    def _received(self, data: bytes) -> None:
        if self._incoming is not None and not self._incoming.decoder.done:
            self._feed_data(data)
            if self._incoming is None:  # refused without waiting: go on with what follows
                self._answer()
            return
        self._inbox += data
        if self._step is None:
            self._answer()
        elif len(self._inbox) > INBOX_LIMIT and self.transport is not None:
            self.transport.pause_reading()  # type: ignore[attr-defined]
            self._reading_paused = True

    def _answer(self) -> None:
        """Answer the commands in the inbox, in order, until one starts a step."""
        while self._step is None and self._incoming is None and self.open:
            if self.listener.draining:
                self.close_with("421 4.3.2 Service shutting down, try again later")
                return
            if self.transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT:  # type: ignore[union-attr]
                self._start(self._writer.drain())  # the client does not read its replies
                return
            line = self._next_line()
            if line is None:
                break
            if line:
                self._command(line)
        if self._reading_paused and self._step is None and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()  # type: ignore[attr-defined]

    def _next_line(self) -> str | None:
        """The next command line ("" if there was only an error to answer), or None
        until more input comes."""
        end = self._inbox.find(b"\n")
        if end < 0:
            if len(self._inbox) > MAX_COMMAND_LINE:
                self._skipping = True  # answered once the line ends, as Postfix does
                self._inbox.clear()
            return None
        raw = bytes(self._inbox[: end + 1])
        del self._inbox[: end + 1]
        if self._skipping or len(raw) > MAX_COMMAND_LINE:
            self._skipping = False
            self.reply("500 5.5.2 Error: line too long")
            return ""
        line = raw.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
        if not line:
            self.reply("500 5.5.2 Error: bad syntax")
        return line

    def _command(self, line: str) -> None:
        verb, _, arg = line.partition(" ")
        command = _COMMANDS.get(verb.upper())
        if command is None:
            self.reply("502 5.5.2 Error: command not recognized")
            return
        self._reset_timeout()
        try:
            step = command(self, arg.strip(" "))
        except Exception as error:
            log.exception("command_failed", command=verb.upper(), error=str(error))
            self.reply("451 4.3.0 Error: internal error, try again later")
            return
        if step is not None:
            self._start(step)

    def _start(self, step: Step) -> None:
        """Run `step` at once, up to its first real wait: only a step that waits becomes a
        task (an RCPT whose checks are all in memory never does)."""
        context = contextvars.copy_context()  # the step's own, as a task would have
        try:
            waiting_on = context.run(step.send, None)
        except StopIteration:
            return
        except Exception as error:
            self._step_failed(error)
            return
        self._step = self.loop.create_task(self._run(Started(step, waiting_on)), context=context)

    async def _run(self, step: Started) -> None:
        """The rest of a step; then the inbox is answered on (in the session's context)."""
        try:
            await step
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self._step_failed(error)
        finally:
            self._step = None
        assert self._context is not None
        self._context.run(self._answer)

    def _step_failed(self, error: Exception) -> None:
        if isinstance(error, TLSSetupException):
            log.info("tls_failed")
            self._tls_failed()
        elif isinstance(error, ConnectionError):
            log.info("connection_failed", error=str(error))
            if self.transport is not None:
                self.transport.close()
        else:
            log.exception("command_failed", error=str(error))
            self.reply("451 4.3.0 Error: internal error, try again later")

    # ------------------------------------------------------------------ commands

    def cmd_helo(self, arg: str) -> None:
        refusal = helo_refusal("HELO", arg)
        if refusal:
            self.reply(refusal)
            return
        self.helo, self.extended, self.mail = arg, False, Envelope()
        self.reply(f"250 {self.hostname}")

    def cmd_ehlo(self, arg: str) -> None:
        refusal = helo_refusal("EHLO", arg)
        if refusal:
            self.reply(refusal)
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
        self.reply("".join(f"250-{line}\r\n" for line in lines[:-1]) + f"250 {lines[-1]}")

    def cmd_mail(self, arg: str) -> None:
        if not self.helo:
            self.reply("503 5.5.1 Error: send HELO/EHLO first")
            return
        if self.mail.started:
            self.reply("503 5.5.1 Error: nested MAIL command")
            return
        if arg[:5].upper() != "FROM:":
            self.reply("501 5.5.4 Syntax: MAIL FROM:<address>")
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
            self.reply(error.reply)
            return
        if params.size is not None and params.size > self.policy.limits.max_message_size:
            self.reply("552 5.3.4 Message size exceeds fixed limit")
            return
        refusal = self.screen.message()
        if refusal is not None:
            self.reply(refusal)
            return
        self.mail = Envelope(sender=sender, started=True, mail=params)
        self.reply("250 2.1.0 Ok")

    def cmd_rcpt(self, arg: str) -> Step | None:
        if not self.mail.started:
            self.reply("503 5.5.1 Error: need MAIL command")
            return None
        if arg[:3].upper() != "TO:":
            self.reply("501 5.5.4 Syntax: RCPT TO:<address>")
            return None
        if len(self.mail.recipients) >= self.policy.limits.max_recipients:
            self.reply("452 4.5.3 Error: too many recipients")
            return None
        try:
            address, rest = parse_path(
                arg[3:],
                allow_null=False,
                utf8=self.mail.mail.smtputf8,
                postmaster=self.policy.postmaster,
            )
            assert address is not None
            if rest and not self.extended:
                raise AddressError("501 5.5.4 Syntax: RCPT TO:<address> (no parameters after HELO)")
            self.policy.relay_domains.check_recipient(address)
            params = parse_rcpt_parameters(rest)
        except AddressError as error:
            log.info("recipient_rejected", recipient=arg[3:].strip(), reply=error.reply)
            metrics.recipient_rejected(error.reply)
            self.reply(error.reply)
            return None
        postmaster = self.policy.is_postmaster(address)
        if self.mail.recipients and postmaster != self.mail.postmaster:
            reply = SEPARATE_POSTMASTER
            log.info("recipient_rejected", recipient=str(address), reply=reply)
            metrics.recipient_rejected(reply)
            self.reply(reply)
            return None
        return self._screen_recipient(address, params, postmaster)

    async def _screen_recipient(
        self, address: Address, params: RcptParameters, postmaster: bool
    ) -> None:
        refusal = await self.screen.recipient(address, str(self.mail.sender or ""), postmaster)
        if refusal is not None:
            metrics.recipient_rejected(refusal)
            if refusal.startswith("421"):
                self.close_with(refusal)
            else:
                self.reply(refusal)
            return
        # Local parts are case-sensitive (RFC 5321 §2.4); only the domain is folded.
        key = f"{address.local}@{address.routing_domain}"
        if key not in self.mail.seen:
            self.mail.seen.add(key)
            self.mail.recipients.append((address, params))
            self.mail.postmaster = postmaster
        self.reply("250 2.1.5 Ok")

    def cmd_rset(self, arg: str) -> None:
        self.mail = Envelope()
        self.reply("250 2.0.0 Ok")

    def cmd_noop(self, arg: str) -> None:
        self.reply("250 2.0.0 Ok")

    def cmd_quit(self, arg: str) -> None:
        self.close_with("221 2.0.0 Bye")

    def cmd_vrfy(self, arg: str) -> None:
        # Disabled, as Postfix's disable_vrfy_command: a backup MX must not help address
        # harvesting.  RFC 5321 §7.3: a site that disables VRFY and EXPN MUST answer 252,
        # never a code that could pass for a verification, positive or negative.
        if not arg:
            self.reply("501 5.5.4 Syntax: VRFY address")
            return
        self.reply("252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery")

    def cmd_expn(self, arg: str) -> None:
        if not arg:
            self.reply("501 5.5.4 Syntax: EXPN mailing-list")
            return
        self.reply("252 2.5.0 Cannot EXPN list, but will accept message and attempt delivery")

    def cmd_etrn(self, arg: str) -> Step | None:
        """RFC 1985: an allowed client (the primary, back up) asks for its mail now."""
        if self.listener.etrn is None or not self.policy.may_etrn(self.client_ip):
            self.reply("459 4.7.1 Error: ETRN not allowed from this client")
            return None
        if self.mail.started:
            self.reply("503 5.5.1 Error: ETRN not allowed inside a mail transaction")
            return None
        try:
            domain = normalize_domain(arg.removeprefix("@").removeprefix("#"))
        except ValueError:
            self.reply("501 5.5.4 Syntax: ETRN domain")
            return None
        if not self.policy.relay_domains.covers(domain):
            self.reply(f"458 4.7.1 Error: unable to queue messages for {domain}")
            return None
        return self._etrn(domain)

    async def _etrn(self, domain: str) -> None:
        assert self.listener.etrn is not None
        due = await self.listener.etrn(domain)
        log.info("etrn", domain=domain, recipients=due)
        self.reply(f"250 2.0.0 Queuing for node {domain} started")

    def cmd_help(self, arg: str) -> None:
        self.reply("214 2.0.0 See RFC 5321")

    def cmd_starttls(self, arg: str) -> Step | None:
        context: ssl.SSLContext | None = self.policy.tls_context
        if context is None:
            self.reply("502 5.5.1 Error: command not implemented")
            return None
        if self.tls is not None:
            self.reply("503 5.5.1 Error: TLS already active")
            return None
        if arg:
            self.reply("501 5.5.4 Syntax: STARTTLS")
            return None
        self.reply("220 2.0.0 Ready to start TLS")
        self._inbox.clear()  # pipelined after STARTTLS in plaintext: never a command
        return self._tls_handshake(self._switch_to_tls(context))

    def _switch_to_tls(self, context: ssl.SSLContext) -> asyncio.Future[None]:
        """aiosmtpd's transport switch-over, done before any more bytes are read; the
        future resolves when the handshake is over."""
        waiter: asyncio.Future[None] = self.loop.create_future()
        self._tls_protocol = sslproto.SSLProtocol(
            self.loop, self, context, waiter, server_side=True
        )
        self._original_transport = self.transport
        assert self._original_transport is not None
        self._original_transport.set_protocol(self._tls_protocol)
        self.transport = self._tls_protocol._app_transport
        self._tls_protocol.connection_made(self._original_transport)
        return waiter

    async def _tls_handshake(self, waiter: asyncio.Future[None]) -> None:
        try:
            await waiter
        except asyncio.CancelledError:
            raise
        except Exception as error:
            raise TLSSetupException() from error
        ssl_object = self.transport.get_extra_info("ssl_object") if self.transport else None
        if ssl_object is not None:
            name, _, bits = ssl_object.cipher()
            self.tls = f"{ssl_object.version()} with cipher {name} ({bits}/{bits} bits)"
        # RFC 3207 §4.2: forget everything learned before the handshake.
        self.helo, self.mail = "", Envelope()
        log.info("tls_started", tls=self.tls)

    # ------------------------------------------------------------------ DATA

    def cmd_data(self, arg: str) -> None:
        if not self.mail.started:
            self.reply("503 5.5.1 Error: need MAIL command")
            return
        if not self.mail.recipients:
            self.reply("554 5.5.1 Error: no valid recipients")
            return
        if arg:
            self.reply("501 5.5.4 Syntax: DATA")
            return
        limits = self.policy.limits
        queue_id = new_queue_id()
        received_at = utcnow()
        recipients = self.mail.recipients
        protocol = protocol_name(self.extended, self.tls is not None, self.mail.mail.smtputf8)
        header = received_header(
            TraceFacts(
                helo=self.helo,
                client_ip=self.client_ip,
                hostname=self.hostname,
                protocol=protocol,
                queue_id=queue_id,
                tls=self.tls,
                single_recipient=str(recipients[0][0]) if len(recipients) == 1 else None,
                date=received_at,
            )
        )
        incoming = Incoming(queue_id, received_at, limits)
        incoming.sink(header)
        self.in_data = True
        self._incoming = incoming
        self.reply("354 End data with <CR><LF>.<CR><LF>")
        self._data_deadline = self.loop.time() + limits.data_timeout
        self._data_armed_at = -1.0
        pipelined = bytes(self._inbox)
        self._inbox.clear()
        self._feed_data(pipelined)

    def _feed_data(self, data: bytes) -> None:
        """Bytes of the message, straight from the socket: no line splitting, no task
        switch per chunk (at 100 KiB per message that was most of the cost)."""
        incoming = self._incoming
        assert incoming is not None
        used = incoming.decoder.feed(data)
        if not incoming.decoder.done:
            self._keep_data_alive(incoming.queue_id)
            return
        self._inbox[:0] = data[used:]  # pipelined commands after the final dot
        self._reset_timeout()
        self._start(self._end_message(incoming))

    def _keep_data_alive(self, queue_id: str) -> None:
        """Data re-arms the idle timer (at most once a second: chunks come by thousands),
        never past the whole DATA phase's deadline."""
        now = self.loop.time()
        if now - self._data_armed_at < 1.0:
            return
        self._data_armed_at = now
        remaining = self._data_deadline - now
        if remaining <= 0:
            log.info("data_timeout", queue_id=queue_id)
            self._timeout_cb()
        else:
            self._reset_timeout(min(self.policy.limits.command_timeout, remaining))

    async def _end_message(self, incoming: Incoming) -> None:
        structlog.contextvars.bind_contextvars(queue_id=incoming.queue_id)
        try:
            data_ended = metrics.clock()
            reply = self._judge(incoming)
            if reply is None:
                spam, body = await self._spam_check(incoming.spool, incoming.queue_id)
                reply = (spam and spam.reply) or await self._enqueue(incoming, body, spam)
            metrics.message_answered(reply, data_ended)
        finally:
            incoming.spool.close()
            self._incoming = None
            self.in_data = False
            self.mail = Envelope()
        self.reply(reply)

    def _judge(self, incoming: Incoming) -> str | None:
        """The reply for a message that must not be queued, or None to queue it."""
        limits = self.policy.limits
        decoder = incoming.decoder
        if decoder.too_big:
            log.info("message_rejected", reason="too big", size=decoder.size)
            return "552 5.3.4 Error: message size exceeds fixed limit"
        if decoder.bare_newline and limits.bare_newline == "reject":
            log.info("message_rejected", reason="bare CR or LF")
            return "550 5.6.0 Error: bare CR or LF in message (see RFC 5321 §2.3.8)"
        if incoming.spool_error:
            log.error("spool_failed", error=str(incoming.spool_error[0]))
            if storage_full(incoming.spool_error[0]):
                return "452 4.3.1 Error: insufficient system storage"
            return "451 4.3.0 Error: local error in processing"
        hops = incoming.spool.received.count - 1  # ours is the first
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
        # A postmaster transaction holds postmaster recipients only: its verdict is
        # stored and tagged, never a refusal (RFC 5321 §4.5.1).
        return await self.listener.spam.check(
            spool, facts, settings, may_refuse=not mail.postmaster
        )

    async def _enqueue(
        self, incoming: Incoming, body: BodySource, spam: Verdict | None = None
    ) -> str:
        mail = self.mail
        message = NewMessage(
            id=incoming.queue_id,
            sender=str(mail.sender) if mail.sender else "",
            recipients=[
                NewRecipient(str(a), a.routing_domain, p.notify, p.orcpt)
                for a, p in mail.recipients
            ],
            body=body,
            client_ip=self.client_ip,
            client_helo=self.helo,
            protocol=protocol_name(self.extended, self.tls is not None, mail.mail.smtputf8),
            session_id=self.session_id,
            tls=self.tls,
            body_type=mail.mail.body,
            smtputf8=mail.mail.smtputf8,
            ret=mail.mail.ret,
            envid=mail.mail.envid,
            received_at=incoming.received_at,
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
        return f"250 2.0.0 Ok: queued as {incoming.queue_id}"  # the intake logs it


def helo_refusal(verb: str, arg: str) -> str | None:
    """The reply refusing a HELO/EHLO argument, or None to accept it.  The argument is
    stored with every message (and names the client in our Received: field): it must
    be what the queue keeps byte for byte (`storable.flaw`); a refused one changes
    nothing in the session."""
    if not arg:
        return f"501 5.5.4 Syntax: {verb} hostname"
    problem = flaw(arg)
    if problem:
        return f"501 5.5.4 Error: {verb} argument contains {problem}"
    return None


Command = Callable[[Session, str], Step | None]
_COMMANDS: dict[str, Command] = {
    "HELO": Session.cmd_helo,
    "EHLO": Session.cmd_ehlo,
    "MAIL": Session.cmd_mail,
    "RCPT": Session.cmd_rcpt,
    "DATA": Session.cmd_data,
    "RSET": Session.cmd_rset,
    "NOOP": Session.cmd_noop,
    "QUIT": Session.cmd_quit,
    "VRFY": Session.cmd_vrfy,
    "EXPN": Session.cmd_expn,
    "ETRN": Session.cmd_etrn,
    "HELP": Session.cmd_help,
    "STARTTLS": Session.cmd_starttls,
}
