"""The server's side of one SMTP conversation, sans-IO: bytes in, replies and events out.

`Conversation` owns the protocol: command lines and their limits, the order of
pipelined commands (RFC 2920), the state from HELO to the end of data, the
bulk DATA path (`receive.data.DataDecoder`) and the reset after STARTTLS.  It
touches no socket, no clock and no file, so the unit tests drive it with bytes
(tests/unit/test_conversation.py); `receive.session` is the thin asyncio
protocol around it.

Theory of operation (h11's shape).  `receive` takes whatever the socket
delivered; `next_event` answers the buffered commands in order, writing their
replies to the outbox (`data_to_send`), until it meets something it cannot
decide alone.  That is an event for the session:

* `SenderGiven`, `RecipientGiven` — the client's rate, the DNSBL verdict, the
  recipient rule, greylisting: the session runs the checks and calls `answer`
  with the refusal, or None to accept;
* `MessageStarted`, `MessageData`, `MessageEnded` — the message: the session
  opens its spool and calls `answer(None)`, which sends ``354``; then the body,
  decoded as it comes (dot-unstuffed, bare CR/LF noted or normalised); after
  `MessageEnded` the session judges, stores and commits it and calls `answer`
  with the reply;
* `EtrnAsked` — `answer(None)` once the domain's mail is due;
* `TlsAsked` — after ``220``, the session switches the transport to TLS and
  calls `tls_started`;
* `NEED_DATA` (nothing left to answer), `FLUSH` (the outbox is full: write it,
  and wait if the client does not read its replies), `CLOSED` (the last reply is
  in the outbox: end the connection).

While an event waits for its answer no further command is read, so replies
keep the order of the commands however deep the client pipelines; the session
pauses reading while `buffered` is large.  If the session's step fails,
`fail` answers ``451 4.3.0`` and the conversation goes on.

Promises:

* RCPT is asked about only for a backed-up domain (`RelayDomains`); nothing else
  relays (docs/queue.md, invariant 5).
* Postmaster is always reachable (RFC 5321 §4.5.1) and gets a transaction of its
  own: a RCPT of the other kind answers ``452 4.5.3``, which clients retry in a
  new transaction (RFC 5321 §4.5.3.1.10).
* VRFY and EXPN answer ``252`` whatever the argument (RFC 5321 §7.3).
* A HELO argument, address or parameter the queue cannot keep byte for byte
  (`mail.storable`) is refused with a 5xx naming the flaw.
* A command line longer than `MAX_COMMAND_LINE` is answered ``500 5.5.2`` once
  it ends, and skipped; the end of data is only ``<CRLF>.<CRLF>``: bare LF or CR
  never ends a message (SMTP smuggling, CVE-2023-51764).
* Past ``max_errors`` 4xx/5xx replies the conversation ends with ``421``.
* An exception in a command answers ``451 4.3.0`` and the conversation goes on.

It logs (structlog) and counts refused recipients (`metrics`), nothing else.
"""

from __future__ import annotations

import enum
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from backupmx import metrics
from backupmx.mail import replies
from backupmx.mail.address import Address, AddressError, parse_path
from backupmx.mail.domains import normalize_domain
from backupmx.mail.storable import flaw
from backupmx.receive.data import DataDecoder
from backupmx.receive.parameters import (
    MailParameters,
    RcptParameters,
    parse_mail_parameters,
    parse_rcpt_parameters,
)
from backupmx.receive.policy import ReceivePolicy

log = structlog.get_logger("backupmx.receive")

MAX_COMMAND_LINE = 2048  # Postfix's line_length_limit; RFC 5321 §4.5.3.1.4 asks for 512+
# Replies gathered before `next_event` hands the outbox to the session: a client that
# pipelines thousands of commands and reads no reply is noticed by the transport's
# write buffer, which the session checks between flushes.
OUTBOX_LIMIT = 4096


@dataclass
class Envelope:
    sender: Address | None = None  # None with `started` means the null sender <>
    started: bool = False
    mail: MailParameters = field(default_factory=MailParameters)
    recipients: list[tuple[Address, RcptParameters]] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    postmaster: bool = False  # the recipients are postmaster's (then only postmaster's)


# ---------------------------------------------------------------- events


class Event:
    """Something the conversation needs the session for."""

    __slots__ = ()


class _Signal(Event):
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Signal("NEED_DATA")
FLUSH = _Signal("FLUSH")
CLOSED = _Signal("CLOSED")


@dataclass(slots=True)
class SenderGiven(Event):
    sender: Address | None
    parameters: MailParameters


@dataclass(slots=True)
class RecipientGiven(Event):
    address: Address
    parameters: RcptParameters
    postmaster: bool


@dataclass(slots=True)
class MessageStarted(Event):
    """DATA is accepted: the session opens the spool and writes our Received: field,
    then `answer(None)` sends ``354``."""


@dataclass(slots=True)
class MessageData(Event):
    block: bytes  # decoded: dot-unstuffed, bare CR/LF normalised if so configured


@dataclass(slots=True)
class MessageEnded(Event):
    size: int  # raw bytes received
    too_big: bool
    bare_newline: bool


@dataclass(slots=True)
class EtrnAsked(Event):
    domain: str


@dataclass(slots=True)
class TlsAsked(Event):
    context: ssl.SSLContext


class Phase(enum.Enum):
    COMMAND = "command"
    WAITING = "waiting"  # an event waits for `answer`, `fail` or `tls_started`
    DATA = "data"
    CLOSED = "closed"


# ---------------------------------------------------------------- the machine


class Conversation:
    def __init__(
        self,
        policy: Callable[[], ReceivePolicy],
        client_ip: str = "",
        etrn: bool = False,
    ) -> None:
        self._policy = policy  # read per command, so a reload reaches open sessions
        self.client_ip = client_ip
        self.etrn = etrn  # the server can flush a domain's queue on ETRN
        self.hostname = policy().hostname
        self.phase = Phase.COMMAND
        self.helo = ""
        self.extended = False
        self.tls: str | None = None  # the TLS description once STARTTLS is done
        self.envelope = Envelope()
        self.errors = 0
        self.commands = 0  # recognised commands so far: each re-arms the idle timer
        self._inbox = bytearray()
        self.outbox = bytearray()  # replies not yet written (or use `data_to_send`)
        self._skipping = False  # dropping an over-long line
        self._waiting: Event | None = None
        self._decoder: DataDecoder | None = None
        self._blocks: deque[bytes] = deque()

    @property
    def policy(self) -> ReceivePolicy:
        return self._policy()

    @property
    def buffered(self) -> int:
        """Bytes received and not yet answered."""
        return len(self._inbox)

    @property
    def closed(self) -> bool:
        return self.phase is Phase.CLOSED

    @property
    def in_data(self) -> bool:
        """Between DATA and the message's reply."""
        return self.phase is Phase.DATA or isinstance(self._waiting, MessageEnded)

    # ------------------------------------------------------------ bytes in, bytes out

    def receive(self, data: bytes) -> bool:
        """Take bytes from the client.  False while a message goes on and nothing of
        it is decoded yet: then `next_event` has nothing to say (the bulk path stays
        a few calls per socket read)."""
        decoder = self._decoder
        if decoder is not None and not decoder.done:
            used = decoder.feed(data)
            if not decoder.done:
                return bool(self._blocks)
            self._inbox += data[used:]  # pipelined commands after the final dot
        elif self.phase is not Phase.CLOSED:
            self._inbox += data
        return True

    def data_to_send(self) -> bytes:
        out = bytes(self.outbox)
        self.outbox.clear()
        return out

    def greet(self) -> None:
        self._reply(replies.greeting(self.hostname))

    def close(self, text: str | None = None) -> None:
        """End the conversation, with `text` as its last reply (unless already ended)."""
        if self.phase is Phase.CLOSED:
            return
        if text is not None:
            self.outbox += text.encode("utf-8", "surrogateescape") + b"\r\n"
        self.phase = Phase.CLOSED
        self._inbox.clear()
        self._waiting = self._decoder = None

    # ------------------------------------------------------------ events out

    def next_event(self) -> Event:
        phase = self.phase
        if phase is not Phase.COMMAND:
            return self._outside_commands(phase)
        while len(self.outbox) < OUTBOX_LIMIT:
            line = self._next_line()
            event = self._command(line) if line else None
            if self.phase is Phase.CLOSED:  # QUIT, a 421 refusal, too many errors
                return CLOSED
            if event is not None:
                return event
            if line is None:
                return NEED_DATA
        return FLUSH

    def _outside_commands(self, phase: Phase) -> Event:
        if phase is Phase.DATA:
            if self._blocks:
                return MessageData(self._blocks.popleft())
            decoder = self._decoder
            assert decoder is not None
            if not decoder.done:
                return NEED_DATA
            self._decoder = None
            ended = MessageEnded(decoder.size, decoder.too_big, decoder.bare_newline)
            self._wait(ended)
            return ended
        return CLOSED if phase is Phase.CLOSED else NEED_DATA

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
            self._reply(replies.LINE_TOO_LONG)
            return ""
        line = raw.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
        if not line:
            self._reply(replies.EMPTY_LINE)
        return line

    def _command(self, line: str) -> Event | None:
        verb, _, arg = line.partition(" ")
        command = _COMMANDS.get(verb.upper())
        if command is None:
            self._reply(replies.UNKNOWN_COMMAND)
            return None
        self.commands += 1
        try:
            return command(self, arg.strip(" "))
        except Exception as error:
            log.exception("command_failed", command=verb.upper(), error=str(error))
            self._reply(replies.INTERNAL_ERROR)
            return None

    def _wait(self, event: Event) -> None:
        self.phase = Phase.WAITING
        self._waiting = event

    # ------------------------------------------------------------ the session's answers

    def answer(self, reply: str | None) -> None:
        """The outcome of the waiting event: a refusal (None: accepted) for a sender or
        recipient, the reply for a message, None for ETRN."""
        event = self._waiting
        if self.phase is not Phase.WAITING or event is None:
            return  # closed meanwhile (a drain, a timeout): the reply is not sent
        self.phase, self._waiting = Phase.COMMAND, None
        _ANSWERED[type(event)](self, event, reply)

    def fail(self) -> None:
        """The session could not answer the waiting event: ``451 4.3.0``, and go on."""
        if self.phase is not Phase.WAITING:
            return
        if isinstance(self._waiting, MessageEnded):
            self.envelope = Envelope()
        self.phase, self._waiting = Phase.COMMAND, None
        self._reply(replies.INTERNAL_ERROR)

    def tls_started(self, description: str | None) -> None:
        """The handshake is over: RFC 3207 §4.2, forget everything learned before it."""
        if not isinstance(self._waiting, TlsAsked):
            return
        self.phase, self._waiting = Phase.COMMAND, None
        self.tls = description
        self.helo, self.envelope = "", Envelope()

    # ------------------------------------------------------------ replies

    def _reply(self, text: str) -> None:
        """Queue one reply; 4xx/5xx replies count against the error limit."""
        if self.phase is Phase.CLOSED:
            return
        if text[0] in "45" and not text.startswith("452 4.5.3"):
            self.errors += 1
        self.outbox += text.encode("utf-8", "surrogateescape") + b"\r\n"
        if self.errors >= self._policy().limits.max_errors:
            log.info("session_closed", reason="too many errors")
            self.close(replies.TOO_MANY_ERRORS)

    # ------------------------------------------------------------ commands

    def cmd_helo(self, arg: str) -> None:
        refusal = helo_refusal("HELO", arg)
        if refusal:
            self._reply(refusal)
            return
        self.helo, self.extended, self.envelope = arg, False, Envelope()
        self._reply(replies.helo_accepted(self.hostname))

    def cmd_ehlo(self, arg: str) -> None:
        refusal = helo_refusal("EHLO", arg)
        if refusal:
            self._reply(refusal)
            return
        self.helo, self.extended, self.envelope = arg, True, Envelope()
        policy = self.policy
        extensions = [
            "PIPELINING",
            f"SIZE {policy.limits.max_message_size}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "DSN",
        ]
        if policy.tls_context is not None and self.tls is None:
            extensions.append("STARTTLS")
        if self.etrn and policy.may_etrn(self.client_ip):
            extensions.append("ETRN")
        # One reply for all lines: the session writes it with one send() system call.
        self._reply(replies.ehlo_accepted(self.hostname, extensions))

    def cmd_mail(self, arg: str) -> Event | None:
        if not self.helo:
            self._reply(replies.NEED_HELO)
            return None
        if self.envelope.started:
            self._reply(replies.NESTED_MAIL)
            return None
        if arg[:5].upper() != "FROM:":
            self._reply(replies.MAIL_SYNTAX)
            return None
        try:
            sender, rest = parse_path(arg[5:], allow_null=True, utf8=True)
            if rest and not self.extended:
                raise AddressError(replies.MAIL_PARAMETERS_AFTER_HELO)
            params = parse_mail_parameters(rest)
            if sender is not None and not sender.is_ascii and not params.smtputf8:
                raise AddressError(replies.NEEDS_SMTPUTF8)
        except AddressError as error:
            self._reply(error.reply)
            return None
        if params.size is not None and params.size > self.policy.limits.max_message_size:
            self._reply(replies.SIZE_DECLARED_TOO_BIG)
            return None
        event = SenderGiven(sender, params)
        self._wait(event)
        return event

    def _message_answered(self, event: MessageEnded, reply: str | None) -> None:
        assert reply is not None
        self.envelope = Envelope()
        self._reply(reply)

    def _etrn_answered(self, event: EtrnAsked, reply: str | None) -> None:
        self._reply(replies.etrn_started(event.domain))

    def _sender_answered(self, event: SenderGiven, refusal: str | None) -> None:
        if refusal is not None:
            self._reply(refusal)
            return
        self.envelope = Envelope(sender=event.sender, started=True, mail=event.parameters)
        self._reply(replies.SENDER_OK)

    def cmd_rcpt(self, arg: str) -> Event | None:
        envelope = self.envelope
        if not envelope.started:
            self._reply(replies.NEED_MAIL)
            return None
        if arg[:3].upper() != "TO:":
            self._reply(replies.RCPT_SYNTAX)
            return None
        policy = self.policy
        if len(envelope.recipients) >= policy.limits.max_recipients:
            self._reply(replies.TOO_MANY_RECIPIENTS)
            return None
        try:
            address, rest = parse_path(
                arg[3:],
                allow_null=False,
                utf8=envelope.mail.smtputf8,
                postmaster=policy.postmaster,
            )
            assert address is not None
            if rest and not self.extended:
                raise AddressError(replies.RCPT_PARAMETERS_AFTER_HELO)
            policy.relay_domains.check_recipient(address)
            params = parse_rcpt_parameters(rest)
        except AddressError as error:
            log.info("recipient_rejected", recipient=arg[3:].strip(), reply=error.reply)
            metrics.recipient_rejected(error.reply)
            self._reply(error.reply)
            return None
        postmaster = policy.is_postmaster(address)
        if envelope.recipients and postmaster != envelope.postmaster:
            reply = replies.SEPARATE_POSTMASTER
            log.info("recipient_rejected", recipient=str(address), reply=reply)
            metrics.recipient_rejected(reply)
            self._reply(reply)
            return None
        event = RecipientGiven(address, params, postmaster)
        self._wait(event)
        return event

    def _recipient_answered(self, event: RecipientGiven, refusal: str | None) -> None:
        if refusal is not None:
            metrics.recipient_rejected(refusal)
            if refusal.startswith("421"):
                self.close(refusal)
            else:
                self._reply(refusal)
            return
        address, envelope = event.address, self.envelope
        # Local parts are case-sensitive (RFC 5321 §2.4); only the domain is folded.
        key = f"{address.local}@{address.routing_domain}"
        if key not in envelope.seen:
            envelope.seen.add(key)
            envelope.recipients.append((address, event.parameters))
            envelope.postmaster = event.postmaster
        self._reply(replies.RECIPIENT_OK)

    def cmd_data(self, arg: str) -> Event | None:
        envelope = self.envelope
        if not envelope.started:
            self._reply(replies.NEED_MAIL)
            return None
        if not envelope.recipients:
            self._reply(replies.NO_RECIPIENTS)
            return None
        if arg:
            self._reply(replies.DATA_SYNTAX)
            return None
        event = MessageStarted()
        self._wait(event)
        return event

    def _data_answered(self, event: MessageStarted, reply: str | None) -> None:
        limits = self._policy().limits
        self._decoder = DataDecoder(
            self._blocks.append, limits.max_message_size, limits.bare_newline == "normalize"
        )
        self._reply(replies.START_DATA)
        self.phase = Phase.DATA
        pipelined = bytes(self._inbox)
        self._inbox.clear()
        self.receive(pipelined)

    def cmd_rset(self, arg: str) -> None:
        self.envelope = Envelope()
        self._reply(replies.OK)

    def cmd_noop(self, arg: str) -> None:
        self._reply(replies.OK)

    def cmd_quit(self, arg: str) -> None:
        self.close(replies.BYE)

    def cmd_vrfy(self, arg: str) -> None:
        # Disabled, as Postfix's disable_vrfy_command: a backup MX must not help address
        # harvesting.
        self._reply(replies.VRFY_DISABLED if arg else replies.VRFY_SYNTAX)

    def cmd_expn(self, arg: str) -> None:
        self._reply(replies.EXPN_DISABLED if arg else replies.EXPN_SYNTAX)

    def cmd_etrn(self, arg: str) -> Event | None:
        """RFC 1985: an allowed client (the primary, back up) asks for its mail now."""
        policy = self.policy
        if not self.etrn or not policy.may_etrn(self.client_ip):
            self._reply(replies.ETRN_NOT_ALLOWED)
            return None
        if self.envelope.started:
            self._reply(replies.ETRN_IN_TRANSACTION)
            return None
        try:
            domain = normalize_domain(arg.removeprefix("@").removeprefix("#"))
        except ValueError:
            self._reply(replies.ETRN_SYNTAX)
            return None
        if not policy.relay_domains.covers(domain):
            self._reply(replies.etrn_refused(domain))
            return None
        event = EtrnAsked(domain)
        self._wait(event)
        return event

    def cmd_help(self, arg: str) -> None:
        self._reply(replies.HELP)

    def cmd_starttls(self, arg: str) -> Event | None:
        context = self.policy.tls_context
        if context is None:
            self._reply(replies.NOT_IMPLEMENTED)
            return None
        if self.tls is not None:
            self._reply(replies.TLS_ALREADY_ACTIVE)
            return None
        if arg:
            self._reply(replies.STARTTLS_SYNTAX)
            return None
        self._reply(replies.READY_FOR_TLS)
        self._inbox.clear()  # pipelined after STARTTLS in plaintext: never a command
        event = TlsAsked(context)
        self._wait(event)
        return event


def helo_refusal(verb: str, arg: str) -> str | None:
    """The reply refusing a HELO/EHLO argument, or None to accept it.  The argument is
    stored with every message (and names the client in our Received: field): it must
    be what the queue keeps byte for byte (`storable.flaw`); a refused one changes
    nothing in the conversation."""
    if not arg:
        return replies.helo_syntax(verb)
    problem = flaw(arg)
    if problem:
        return replies.helo_flaw(verb, problem)
    return None


_COMMANDS: dict[str, Callable[[Conversation, str], Event | None]] = {
    "HELO": Conversation.cmd_helo,
    "EHLO": Conversation.cmd_ehlo,
    "MAIL": Conversation.cmd_mail,
    "RCPT": Conversation.cmd_rcpt,
    "DATA": Conversation.cmd_data,
    "RSET": Conversation.cmd_rset,
    "NOOP": Conversation.cmd_noop,
    "QUIT": Conversation.cmd_quit,
    "VRFY": Conversation.cmd_vrfy,
    "EXPN": Conversation.cmd_expn,
    "ETRN": Conversation.cmd_etrn,
    "HELP": Conversation.cmd_help,
    "STARTTLS": Conversation.cmd_starttls,
}

# What `Conversation.answer` does with the session's answer, by the event it answers.
_ANSWERED: dict[type[Event], Callable[[Conversation, Any, str | None], None]] = {
    SenderGiven: Conversation._sender_answered,
    RecipientGiven: Conversation._recipient_answered,
    MessageStarted: Conversation._data_answered,
    MessageEnded: Conversation._message_answered,
    EtrnAsked: Conversation._etrn_answered,
}
