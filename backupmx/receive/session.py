"""One SMTP session: the asyncio protocol around a `Conversation`.

`receive.conversation` decides everything a client sees; this module does the
I/O it asks for: it feeds the socket's bytes in, writes the replies out, and
runs the steps that wait — the greeting (PROXY header, banner delay), the
recipient checks (callouts, DNSBL, greylisting), the spam hook and the commit
of a message, ETRN, and the switch to TLS with the public `loop.start_tls`.
Why this is not aiosmtpd's `SMTP` class: docs/receiving.md#what-aiosmtpd-does-and-why.

Theory of operation.  Commands are answered straight from `data_received`:
the conversation answers every line that needs nothing but its own state
(HELO, DATA's ``354``, QUIT, …) without a task switch.  An event that must
wait runs as one *step*, a coroutine run at once up to its first real wait
(`_start`) and only then a task; while it runs, further input waits in the
conversation (reading pauses past `INBOX_LIMIT`), and when it ends the
conversation is asked for its next event.  So replies keep the order of the
commands, and a pipelined session costs no task switch per command.  During
DATA the decoder takes the socket's bytes in bulk.

Promises (the protocol's own are in `receive.conversation`):

* ``250`` after DATA only once the queue store has committed the message
  (docs/queue.md, invariant 1); any failure on the way answers 4xx —
  ``452 4.3.1`` when storage is full, ``451 4.3.0`` otherwise — never 5xx.
* The spam hook tags a postmaster transaction's mail but never refuses it
  (RFC 5321 §4.5.1).
* An exception in a step answers ``451 4.3.0`` and the session goes on.
* A session's last reply (``221`` to QUIT, a ``421``) reaches the client: the
  connection is half-closed and what the client still sends is dropped until
  its end of file (at most `LINGER`), since closing with unread input would
  reset the connection and could destroy the reply unread.
* A client that leaves (end of file) is gone: the connection closes at once.
"""

from __future__ import annotations

import asyncio
import contextvars
import random
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Generator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, cast

import structlog

from backupmx import metrics
from backupmx.config import Limits
from backupmx.mail import replies
from backupmx.queue.database import storage_full
from backupmx.queue.records import BodySource, NewMessage, NewRecipient, new_queue_id, utcnow
from backupmx.receive.clients import ClientChecks, Screen
from backupmx.receive.conversation import (
    CLOSED,
    FLUSH,
    NEED_DATA,
    Conversation,
    EtrnAsked,
    Event,
    MessageData,
    MessageEnded,
    MessageStarted,
    Phase,
    RecipientGiven,
    SenderGiven,
    TlsAsked,
)
from backupmx.receive.policy import ReceivePolicy
from backupmx.receive.received import TraceFacts, protocol_name, received_header
from backupmx.receive.spamcheck import Facts, SpamChecker, Verdict
from backupmx.receive.spool import Spool

log = structlog.get_logger("backupmx.receive")

# Before the greeting only a PROXY header is read: past this much unread input the
# socket pauses (what asyncio's StreamReader did here, at twice its 64 KiB limit).
EARLY_INPUT_LIMIT = 128 * 1024
INBOX_LIMIT = 64 * 1024  # pipelined input held while a step runs, before reading pauses
WRITE_BUFFER_LIMIT = 64 * 1024  # replies are small: wait for the client only past this
# After a session's last reply the connection stays half-open this long, reading and
# dropping what the client still sends: closing a socket with unread input makes the
# kernel answer with a reset, which can destroy the reply before the client has read
# it (the fuzzer saw it with input pipelined past QUIT).  Closed at the client's EOF.
LINGER = 2.0


class Seats(Protocol):
    """The listener's count of open connections (`receive.admission` decides)."""

    async def admit(self, session: Session) -> str | None: ...

    async def readmit(self, session: Session, client_ip: str) -> str | None: ...

    def forget(self, session: Session) -> None: ...


@dataclass(frozen=True)
class Services:
    """What the listener hands every session: its policy and the capabilities it wires."""

    policy: Callable[[], ReceivePolicy]  # read per command: a reload reaches open sessions
    draining: Callable[[], bool]
    seats: Seats
    checks: ClientChecks
    spam: SpamChecker
    enqueue: Callable[[NewMessage], Awaitable[None]]  # returns once the message is committed
    etrn: Callable[[str], Awaitable[int]] | None  # make a domain's mail due; how many recipients


class Incoming:
    """A message between DATA and its reply: spooled as the conversation decodes it."""

    def __init__(self, queue_id: str, received_at: datetime) -> None:
        self.queue_id = queue_id
        self.received_at = received_at
        self.spool = Spool()
        self.spool_error: list[OSError] = []

    def sink(self, block: bytes) -> None:
        if self.spool_error:
            return
        try:
            self.spool.write(block)
        except OSError as error:
            self.spool_error.append(error)


class EarlyInput:
    """What the client sends before the greeting, for the PROXY header reader."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self._waiter: asyncio.Future[None] | None = None

    def feed(self, data: bytes) -> None:
        self.buffer += data
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def readexactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunk = bytes(self.buffer[:n])
        del self.buffer[:n]
        return chunk


Step = Coroutine[Any, Any, None]


class TlsFailed(Exception):
    """The STARTTLS handshake did not complete."""


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


class Session(asyncio.Protocol):
    def __init__(self, services: Services) -> None:
        self.loop = asyncio.get_running_loop()
        self.services = services
        self.seats = services.seats
        policy = services.policy()
        self.hostname = policy.hostname
        self._command_timeout = policy.limits.command_timeout
        self.conversation = Conversation(services.policy, etrn=services.etrn is not None)
        self.screen = Screen(services.checks, services.policy, "")
        self.session_id = f"{random.getrandbits(48):012x}"
        self.client_ip = ""
        self.refusal: str | None = None
        self.transport: asyncio.Transport | None = None
        self._context: contextvars.Context | None = None  # set once greeted
        self._early = EarlyInput()
        self._greeter: asyncio.Task[None] | None = None
        self._step: asyncio.Task[None] | None = None
        self._commands = 0  # the conversation's command count when the timer was last moved
        self._reading_paused = False
        self._writing_paused: asyncio.Future[None] | None = None
        self._incoming: Incoming | None = None
        self._timeout_handle: asyncio.TimerHandle | None = None
        self._idle_deadline = 0.0
        self._data_deadline = 0.0
        self._data_armed_at = 0.0
        self._handshaking = False  # STARTTLS: the transport is not ours until it is done
        self._lingering = False  # the last reply is sent: input is dropped until the close

    @property
    def policy(self) -> ReceivePolicy:
        return self.services.policy()

    @property
    def in_data(self) -> bool:
        return self.conversation.in_data

    @property
    def open(self) -> bool:
        return (
            self.transport is not None
            and not self.transport.is_closing()
            and not self._lingering
            and not self._handshaking
        )

    # ------------------------------------------------------------------ connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.client_ip = self.screen.client_ip = str(peer[0]) if peer else "unknown"
        self._reset_timeout()
        self._greeter = self.loop.create_task(self._greet())

    def eof_received(self) -> bool:
        # A client that left is gone: returning False closes the connection (keeping it
        # half-open would hold its slot until the idle timeout).  Before the greeting
        # the greeting is given up.
        if self._greeter is not None:
            self._greeter.cancel()
        return False

    def connection_lost(self, error: Exception | None) -> None:
        self._release()
        if self._greeter is not None:
            self._greeter.cancel()
        if self._step is not None:
            self._step.cancel()
        self.transport = None

    def _release(self) -> None:
        """Give back the connection's slot and whatever its checks hold."""
        self.seats.forget(self)
        self.screen.close()
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()

    def pause_writing(self) -> None:
        self._writing_paused = self.loop.create_future()

    def resume_writing(self) -> None:
        if self._writing_paused is not None and not self._writing_paused.done():
            self._writing_paused.set_result(None)
        self._writing_paused = None

    async def _drain(self) -> None:
        """Wait until the client reads its replies (the transport's buffer drains)."""
        if self._writing_paused is not None:
            await self._writing_paused

    # ------------------------------------------------------------------ timers

    def _reset_timeout(self, duration: float | None = None) -> None:
        """Move the idle deadline; the timer itself is re-armed only when it would fire
        too late (a timer per command cost about a twelfth of the event loop's time
        per message)."""
        self._idle_deadline = self.loop.time() + (duration or self._command_timeout)
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or handle.when() > self._idle_deadline:
            if handle is not None:
                handle.cancel()
            self._timeout_handle = self.loop.call_at(self._idle_deadline, self._timeout_cb)

    def _timeout_cb(self) -> None:
        if self.loop.time() < self._idle_deadline:
            self._timeout_handle = self.loop.call_at(self._idle_deadline, self._timeout_cb)
            return
        self._timeout_handle = None
        self.conversation.close(replies.timeout(self.hostname))
        self._flush()
        log.info("session_timeout")
        if self.transport is not None:
            self.transport.close()

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

    # ------------------------------------------------------------------ output

    def _flush(self) -> None:
        outbox = self.conversation.outbox
        if outbox:
            if self.open:
                self.transport.write(bytes(outbox))  # type: ignore[union-attr]
            outbox.clear()

    def close_with(self, text: str | None) -> None:
        """Send a last reply without waiting for the client, and end the session: by a
        half-close and `LINGER` (see the module docstring) once greeted; at once for a
        refusal before the greeting (the client has sent nothing), over TLS (no
        half-close) and when already lingering (the drain's cut)."""
        self.conversation.close(text)
        self._flush()
        self._end()

    def _end(self) -> None:
        transport = self.transport
        if transport is None:
            return
        if self._context is None or self._lingering or not transport.can_write_eof():
            transport.close()
            return
        self._lingering = True
        transport.write_eof()
        self.loop.call_later(LINGER, transport.close)

    # ------------------------------------------------------------------ greeting

    async def _greet(self) -> None:
        """Admission, the PROXY header and the banner delay, then the greeting; from
        there on `data_received` answers the commands."""
        structlog.contextvars.bind_contextvars(session=self.session_id, client=self.client_ip)
        self.refusal = await self.seats.admit(self)
        metrics.connection_opened(self.refusal)
        if self.refusal:
            log.info("connection_refused", reason=self.refusal)
            self.close_with(self.refusal)
            return
        log.debug("connection_opened")  # the accept line carries client and session
        refusal = await self.screen.greet(
            self._early,
            lambda: len(self._early.buffer),
            lambda client_ip: self.seats.readmit(self, client_ip),
        )
        if refusal is not None:
            log.info("connection_refused", reason=refusal)
            self.close_with(refusal)
            return
        structlog.contextvars.bind_contextvars(client=self.client_ip)
        # Everything the session does from here on runs in this context: its log
        # lines carry the session and the client.
        self._context = contextvars.copy_context()
        conversation = self.conversation
        conversation.client_ip = self.client_ip
        conversation.greet()
        conversation.receive(bytes(self._early.buffer))
        self._early.buffer.clear()
        self._context.run(self._answer)

    # ------------------------------------------------------------------ input

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        if self._context is None:
            self._early.feed(data)  # before the greeting: for the PROXY header reader
            if len(self._early.buffer) > EARLY_INPUT_LIMIT and not self._reading_paused:
                self._pause_reading()
        else:
            self._context.run(self._received, data)

    def _received(self, data: bytes) -> None:
        if not self.conversation.receive(data):  # the message goes on, nothing to answer
            assert self._incoming is not None
            self._keep_data_alive(self._incoming.queue_id)
            return
        if self._step is None:
            self._answer()
        elif self.conversation.buffered > INBOX_LIMIT and not self._reading_paused:
            self._pause_reading()

    def _pause_reading(self) -> None:
        # Not while STARTTLS hands the socket over: the transport is about to change.
        if self.transport is not None and not self._handshaking:
            self.transport.pause_reading()
            self._reading_paused = True

    def _answer(self) -> None:
        """Ask the conversation for events, in order, until one starts a step."""
        conversation = self.conversation
        while self._step is None and self.open:
            if conversation.phase is Phase.COMMAND:
                if self.services.draining():
                    self.close_with(replies.SHUTTING_DOWN)
                    return
                if self.transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT:  # type: ignore[union-attr]
                    self._start(self._drain())  # the client does not read its replies
                    return
            event = conversation.next_event()
            if conversation.outbox:
                self._flush()
            if conversation.commands != self._commands:
                self._commands = conversation.commands
                self._reset_timeout()
            if event is NEED_DATA:
                if self._incoming is not None and conversation.phase is Phase.DATA:
                    self._keep_data_alive(self._incoming.queue_id)
                break
            if event is CLOSED:
                self._end()
                return
            if event is not FLUSH:
                _HANDLERS[type(event)](self, event)
        if self._reading_paused and self._step is None and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    def _message_data(self, event: MessageData) -> None:
        assert self._incoming is not None
        self._incoming.sink(event.block)

    def _message_ended(self, event: MessageEnded) -> None:
        assert self._incoming is not None
        self._reset_timeout()
        self._start(self._end_message(self._incoming, event))

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
        """The rest of a step; then the conversation is answered on (in the session's
        context)."""
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
        if isinstance(error, TlsFailed):
            log.info("tls_failed")
            self._tls_failed()
        elif isinstance(error, ConnectionError):
            log.info("connection_failed", error=str(error))
            if self.transport is not None:
                self.transport.close()
        else:
            log.exception("command_failed", error=str(error))
            self.conversation.fail()

    # ------------------------------------------------------------------ MAIL, RCPT

    def _sender(self, event: SenderGiven) -> None:
        self._start(self._screen_sender())

    async def _screen_sender(self) -> None:
        self.conversation.answer(await self.screen.message())

    def _recipient(self, event: RecipientGiven) -> None:
        self._start(self._screen_recipient(event))

    async def _screen_recipient(self, event: RecipientGiven) -> None:
        sender = self.conversation.envelope.sender
        refusal = await self.screen.recipient(event.address, str(sender or ""), event.postmaster)
        self.conversation.answer(refusal)

    # ------------------------------------------------------------------ ETRN

    def _etrn(self, event: EtrnAsked) -> None:
        self._start(self._flush_domain(event.domain))

    async def _flush_domain(self, domain: str) -> None:
        assert self.services.etrn is not None
        due = await self.services.etrn(domain)
        log.info("etrn", domain=domain, recipients=due)
        self.conversation.answer(None)

    # ------------------------------------------------------------------ STARTTLS

    def _tls(self, event: TlsAsked) -> None:
        self._start(self._start_tls(event.context))

    async def _start_tls(self, context: ssl.SSLContext) -> None:
        """The switch with asyncio's public `loop.start_tls`, which stops reading the
        plaintext before it returns to the event loop (RFC 3207 §4.2: nothing sent
        before the handshake counts)."""
        transport = self.transport
        assert transport is not None
        self._handshaking = True
        try:
            tls = await self.loop.start_tls(transport, self, context, server_side=True)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            raise TlsFailed() from error
        finally:
            self._handshaking = False
        if tls is None:
            raise TlsFailed()
        self.transport = tls
        description = None
        ssl_object = tls.get_extra_info("ssl_object")
        if ssl_object is not None:
            name, _, bits = ssl_object.cipher()
            description = f"{ssl_object.version()} with cipher {name} ({bits}/{bits} bits)"
        self.conversation.tls_started(description)
        self._reset_timeout()
        log.info("tls_started", tls=description)

    def _tls_failed(self) -> None:
        """A failed handshake ends the session here: asyncio tells the protocol of a lost
        connection only once the handshake has completed."""
        self.conversation.close()
        if self.transport is not None:
            self.transport.close()
        self._release()

    # ------------------------------------------------------------------ DATA

    def _start_message(self, event: MessageStarted) -> None:
        try:
            self._open_spool()
        except Exception as error:
            log.exception("command_failed", command="DATA", error=str(error))
            self.conversation.fail()
            return
        self.conversation.answer(None)

    def _open_spool(self) -> None:
        """The message's spool, opened with our Received: field."""
        conversation, limits = self.conversation, self.policy.limits
        queue_id, received_at = new_queue_id(), utcnow()
        recipients = conversation.envelope.recipients
        header = received_header(
            TraceFacts(
                helo=conversation.helo,
                client_ip=self.client_ip,
                hostname=self.hostname,
                protocol=self._protocol(),
                queue_id=queue_id,
                tls=conversation.tls,
                single_recipient=str(recipients[0][0]) if len(recipients) == 1 else None,
                date=received_at,
            )
        )
        self._incoming = Incoming(queue_id, received_at)
        self._incoming.sink(header)
        self._data_deadline = self.loop.time() + limits.data_timeout
        self._data_armed_at = -1.0

    def _protocol(self) -> str:
        conversation = self.conversation
        return protocol_name(
            conversation.extended,
            conversation.tls is not None,
            conversation.envelope.mail.smtputf8,
        )

    async def _end_message(self, incoming: Incoming, ended: MessageEnded) -> None:
        structlog.contextvars.bind_contextvars(queue_id=incoming.queue_id)
        try:
            data_ended = metrics.clock()
            reply = self._judge(incoming, ended, self.policy.limits)
            if reply is None:
                spam, body = await self._spam_check(incoming.spool, incoming.queue_id)
                reply = (spam and spam.reply) or await self._enqueue(incoming, body, spam)
            metrics.message_answered(reply, data_ended)
        finally:
            incoming.spool.close()
            self._incoming = None
        self.conversation.answer(reply)

    def _judge(self, incoming: Incoming, ended: MessageEnded, limits: Limits) -> str | None:
        """The reply for a message that must not be queued, or None to queue it."""
        if ended.too_big:
            log.info("message_rejected", reason="too big", size=ended.size)
            return replies.MESSAGE_TOO_BIG
        if ended.bare_newline and limits.bare_newline == "reject":
            log.info("message_rejected", reason="bare CR or LF")
            return replies.BARE_NEWLINE
        if incoming.spool_error:
            log.error("spool_failed", error=str(incoming.spool_error[0]))
            if storage_full(incoming.spool_error[0]):
                return replies.STORAGE_FULL
            return replies.SPOOL_ERROR
        hops = incoming.spool.received.count - 1  # ours is the first
        if hops > limits.max_received_headers:
            log.info("message_rejected", reason="mail loop", received_headers=hops)
            return replies.MAIL_LOOP
        return None

    async def _spam_check(self, spool: Spool, queue_id: str) -> tuple[Verdict | None, BodySource]:
        """The spam hook on the stored form (our Received: first); the body to queue."""
        settings = self.policy.spamcheck
        if settings.backend == "none":
            return None, spool
        conversation = self.conversation
        mail = conversation.envelope
        facts = Facts(
            self.client_ip,
            conversation.helo,
            str(mail.sender) if mail.sender else "",
            [str(a) for a, _ in mail.recipients],
            queue_id,
            self.hostname,
        )
        # A postmaster transaction holds postmaster recipients only: its verdict is
        # stored and tagged, never a refusal (RFC 5321 §4.5.1).
        return await self.services.spam.check(
            spool, facts, settings, may_refuse=not mail.postmaster
        )

    async def _enqueue(
        self, incoming: Incoming, body: BodySource, spam: Verdict | None = None
    ) -> str:
        conversation = self.conversation
        mail = conversation.envelope
        message = NewMessage(
            id=incoming.queue_id,
            sender=str(mail.sender) if mail.sender else "",
            recipients=[
                NewRecipient(str(a), a.routing_domain, p.notify, p.orcpt)
                for a, p in mail.recipients
            ],
            body=body,
            client_ip=self.client_ip,
            client_helo=conversation.helo,
            protocol=self._protocol(),
            session_id=self.session_id,
            tls=conversation.tls,
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
            await self.services.enqueue(message)
        except Exception as error:
            full = storage_full(error)
            log.error("enqueue_failed", error=str(error), storage_full=full)
            if full:
                return replies.STORAGE_FULL
            return replies.QUEUE_ERROR
        return replies.queued(incoming.queue_id)  # the intake logs it


# What the session does for each event of the conversation (NEED_DATA, FLUSH and
# CLOSED are handled in `Session._answer`).
_HANDLERS: dict[type[Event], Callable[[Session, Any], None]] = {
    MessageData: Session._message_data,
    SenderGiven: Session._sender,
    RecipientGiven: Session._recipient,
    MessageStarted: Session._start_message,
    MessageEnded: Session._message_ended,
    EtrnAsked: Session._etrn,
    TlsAsked: Session._tls,
}
