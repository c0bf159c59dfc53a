"""Specification of the SMTP conversation (`backupmx.receive.conversation`), driven
with bytes and no socket: replies keep the order of pipelined commands, every
check that waits is an event the session answers, DATA ends only at
<CRLF>.<CRLF>, over-long lines are skipped and answered once, and STARTTLS
forgets what came before it."""

from __future__ import annotations

import ssl

from backupmx.config import Limits
from backupmx.mail.address import Address, RelayDomains
from backupmx.mail.networks import parse_networks
from backupmx.receive.conversation import (
    CLOSED,
    FLUSH,
    MAX_COMMAND_LINE,
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

HOST = "mx.backup.test"


def policy(**changes: object) -> ReceivePolicy:
    settings: dict[str, object] = {
        "hostname": HOST,
        "relay_domains": RelayDomains(["example.test"]),
        "limits": Limits(),
        "tls_context": None,
        "postmaster": Address("postmaster", "example.test"),
    }
    settings.update(changes)
    return ReceivePolicy(**settings)  # type: ignore[arg-type]


class Client:
    """Plays the session: feeds bytes, collects replies, answers every event the way
    the test says (accept by default)."""

    def __init__(self, conversation: Conversation | None = None, **changes: object) -> None:
        rules = policy(**changes)
        self.conversation = conversation or Conversation(lambda: rules, "192.0.2.1")
        self.events: list[Event] = []
        self.message = bytearray()
        self.refuse: dict[str, str] = {}  # recipient -> refusal
        self.message_reply = "250 2.0.0 Ok: queued as 1"

    def send(self, data: bytes) -> list[str]:
        """Feed `data`; the replies it produced, one string per reply."""
        self.conversation.receive(data)
        out = bytearray()
        while True:
            event = self.conversation.next_event()
            out += self.conversation.data_to_send()
            if event is NEED_DATA or event is CLOSED:
                if event is CLOSED:
                    self.events.append(event)
                break
            if event is FLUSH:
                continue
            self.events.append(event)
            self._answer(event)
            out += self.conversation.data_to_send()
        return replies_in(bytes(out))

    def _answer(self, event: Event) -> None:
        conversation = self.conversation
        if isinstance(event, SenderGiven):
            conversation.answer(None)
        elif isinstance(event, RecipientGiven):
            conversation.answer(self.refuse.get(str(event.address)))
        elif isinstance(event, MessageStarted):
            conversation.answer(None)
        elif isinstance(event, MessageData):
            self.message += event.block
        elif isinstance(event, MessageEnded):
            conversation.answer(self.message_reply)
        elif isinstance(event, EtrnAsked):
            conversation.answer(None)


def replies_in(out: bytes) -> list[str]:
    """Split the outbox into replies (a multi-line reply is one string)."""
    lines = out.decode("utf-8", "surrogateescape").split("\r\n")[:-1]
    result: list[str] = []
    current: list[str] = []
    for line in lines:
        current.append(line)
        if line[3:4] != "-":
            result.append("\r\n".join(current))
            current = []
    return result


def codes(replies: list[str]) -> list[str]:
    return [reply[:3] for reply in replies]


def greeted(**changes: object) -> Client:
    client = Client(**changes)
    client.conversation.greet()
    assert client.send(b"") == [f"220 {HOST} ESMTP backupmx"]
    return client


def in_transaction(**changes: object) -> Client:
    client = greeted(**changes)
    replies = client.send(b"EHLO client.test\r\nMAIL FROM:<a@sender.test>\r\n")
    assert codes(replies) == ["250", "250"]
    return client


# ---------------------------------------------------------------- commands


def test_a_whole_pipelined_transaction_is_answered_in_order() -> None:
    client = greeted()
    replies = client.send(
        b"EHLO client.test\r\n"
        b"MAIL FROM:<a@sender.test>\r\n"
        b"RCPT TO:<b@example.test>\r\n"
        b"RCPT TO:<c@example.test>\r\n"
        b"DATA\r\n"
        b"Subject: hi\r\n\r\nbody\r\n.\r\n"
        b"QUIT\r\n"
    )
    assert codes(replies) == ["250", "250", "250", "250", "354", "250", "221"]
    assert replies[-2] == "250 2.0.0 Ok: queued as 1"
    assert bytes(client.message) == b"Subject: hi\r\n\r\nbody\r\n"
    kinds = [type(e).__name__ for e in client.events]
    assert "MessageData" in kinds
    kinds = [k for i, k in enumerate(kinds) if k != "MessageData" or kinds[i - 1] != k]
    assert kinds == [
        "SenderGiven",
        "RecipientGiven",
        "RecipientGiven",
        "MessageStarted",
        "MessageData",
        "MessageEnded",
        "_Signal",
    ]
    assert client.conversation.phase is Phase.CLOSED


def test_ehlo_lists_the_extensions_in_one_reply() -> None:
    client = greeted()
    [reply] = client.send(b"EHLO client.test\r\n")
    assert reply.split("\r\n") == [
        f"250-{HOST}",
        "250-PIPELINING",
        f"250-SIZE {Limits().max_message_size}",
        "250-8BITMIME",
        "250-SMTPUTF8",
        "250-ENHANCEDSTATUSCODES",
        "250 DSN",
    ]


def test_starttls_and_etrn_are_offered_only_when_they_can_be_used() -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    rules = policy(tls_context=context, etrn_clients=parse_networks(["198.51.100.0/24"]))
    elsewhere = Client(Conversation(lambda: rules, "192.0.2.1", etrn=True))
    [reply] = elsewhere.send(b"EHLO client.test\r\n")
    assert reply.endswith("\r\n250 STARTTLS")  # ETRN is not for this client
    primary = Client(Conversation(lambda: rules, "198.51.100.7", etrn=True))
    [reply] = primary.send(b"EHLO client.test\r\n")
    assert reply.endswith("\r\n250-STARTTLS\r\n250 ETRN")


def test_a_command_that_needs_a_check_stops_the_conversation_until_answered() -> None:
    client = in_transaction()
    conversation = client.conversation
    conversation.receive(b"RCPT TO:<b@example.test>\r\nNOOP\r\n")
    event = conversation.next_event()
    assert isinstance(event, RecipientGiven)
    assert conversation.next_event() is NEED_DATA  # NOOP waits for the answer
    assert conversation.data_to_send() == b""
    conversation.answer(None)
    assert conversation.next_event() is NEED_DATA
    assert replies_in(conversation.data_to_send()) == ["250 2.1.5 Ok", "250 2.0.0 Ok"]


def test_a_refused_recipient_is_answered_with_the_refusal_and_not_kept() -> None:
    client = in_transaction()
    client.refuse["b@example.test"] = "550 5.1.1 <b@example.test>: User unknown"
    replies = client.send(b"RCPT TO:<b@example.test>\r\nDATA\r\n")
    assert replies == [
        "550 5.1.1 <b@example.test>: User unknown",
        "554 5.5.1 Error: no valid recipients",
    ]


def test_a_421_refusal_ends_the_conversation() -> None:
    client = in_transaction()
    client.refuse["b@example.test"] = "421 4.7.0 Error: too many unknown recipients"
    replies = client.send(b"RCPT TO:<b@example.test>\r\nNOOP\r\n")
    assert replies == ["421 4.7.0 Error: too many unknown recipients"]
    assert client.events[-1] is CLOSED


def test_no_relay_for_a_domain_not_backed_up() -> None:
    client = in_transaction()
    assert client.send(b"RCPT TO:<x@elsewhere.test>\r\n") == ["550 5.7.1 Relay access denied"]
    assert not any(isinstance(e, RecipientGiven) for e in client.events)


def test_postmaster_gets_a_transaction_of_its_own() -> None:
    client = in_transaction()
    replies = client.send(b"RCPT TO:<b@example.test>\r\nRCPT TO:<postmaster@example.test>\r\n")
    assert codes(replies) == ["250", "452"]
    assert replies[1].startswith("452 4.5.3")


def test_commands_out_of_sequence_are_refused_with_503() -> None:
    client = greeted()
    assert client.send(b"MAIL FROM:<a@sender.test>\r\n") == [
        "503 5.5.1 Error: send HELO/EHLO first"
    ]
    assert client.send(b"RCPT TO:<b@example.test>\r\nDATA\r\n") == [
        "503 5.5.1 Error: need MAIL command",
        "503 5.5.1 Error: need MAIL command",
    ]
    client.send(b"HELO client.test\r\nMAIL FROM:<>\r\n")
    assert client.send(b"MAIL FROM:<>\r\n") == ["503 5.5.1 Error: nested MAIL command"]


def test_rset_forgets_the_transaction() -> None:
    client = in_transaction()
    assert client.send(b"RSET\r\nRCPT TO:<b@example.test>\r\n") == [
        "250 2.0.0 Ok",
        "503 5.5.1 Error: need MAIL command",
    ]


def test_vrfy_and_expn_answer_252_whatever_the_argument() -> None:
    client = greeted()
    replies = client.send(b"VRFY root\r\nEXPN staff\r\nVRFY\r\n")
    assert codes(replies) == ["252", "252", "501"]


def test_unknown_commands_and_empty_lines_are_refused() -> None:
    client = greeted()
    assert client.send(b"BOGUS\r\n\r\n") == [
        "502 5.5.2 Error: command not recognized",
        "500 5.5.2 Error: bad syntax",
    ]


def test_a_command_line_over_the_limit_is_answered_once_it_ends() -> None:
    client = greeted()
    assert client.send(b"NOOP " + b"x" * (MAX_COMMAND_LINE + 100)) == []
    assert client.conversation.buffered == 0  # the long line is not kept
    assert client.send(b"x" * 5000 + b"\r\nNOOP\r\n") == [
        "500 5.5.2 Error: line too long",
        "250 2.0.0 Ok",
    ]


def test_a_line_of_exactly_the_limit_is_a_command() -> None:
    client = greeted()
    line = b"NOOP " + b"x" * (MAX_COMMAND_LINE - 7) + b"\r\n"
    assert len(line) == MAX_COMMAND_LINE
    assert client.send(line) == ["250 2.0.0 Ok"]


def test_too_many_errors_end_the_conversation_with_421() -> None:
    client = greeted(limits=Limits(max_errors=3))
    replies = client.send(b"BOGUS\r\n" * 5)
    assert codes(replies) == ["502", "502", "502", "421"]
    assert replies[-1] == "421 4.7.0 Error: too many errors"
    assert client.conversation.next_event() is CLOSED


def test_452_4_5_3_does_not_count_as_an_error() -> None:
    client = in_transaction(limits=Limits(max_errors=2, max_recipients=1))
    replies = client.send(b"RCPT TO:<b@example.test>\r\n" + b"RCPT TO:<c@example.test>\r\n" * 3)
    assert codes(replies) == ["250", "452", "452", "452"]
    assert not client.conversation.closed


def test_quit_ends_the_conversation_and_what_follows_is_ignored() -> None:
    client = greeted()
    assert client.send(b"QUIT\r\nNOOP\r\n") == ["221 2.0.0 Bye"]
    assert client.send(b"NOOP\r\n") == []


def test_a_flood_of_pipelined_commands_asks_the_session_to_flush() -> None:
    client = greeted()
    conversation = client.conversation
    conversation.receive(b"NOOP\r\n" * 1000)
    assert conversation.next_event() is FLUSH
    assert len(conversation.data_to_send()) >= 4096


# ---------------------------------------------------------------- DATA


def data(client: Client, body: bytes) -> list[str]:
    replies = client.send(b"RCPT TO:<b@example.test>\r\nDATA\r\n")
    assert codes(replies) == ["250", "354"]
    return client.send(body)


def test_the_body_is_dot_unstuffed() -> None:
    client = in_transaction()
    assert codes(data(client, b"..leading dot\r\n.\r\n")) == ["250"]
    assert bytes(client.message) == b".leading dot\r\n"


def test_the_body_may_come_in_pieces_cut_anywhere() -> None:
    client = in_transaction()
    data(client, b"")
    body = b"line one\r\n..two\r\nthree\r\n.\r\n"
    replies: list[str] = []
    for byte in body:
        replies += client.send(bytes([byte]))
    assert codes(replies) == ["250"]
    assert bytes(client.message) == b"line one\r\n.two\r\nthree\r\n"


def test_a_bare_lf_dot_lf_does_not_end_the_message() -> None:
    client = in_transaction()
    replies = data(client, b"one\n.\nMAIL FROM:<evil@sender.test>\r\n")
    assert replies == []  # still in DATA: the smuggled command is body text
    assert client.conversation.in_data
    assert codes(client.send(b"\r\n.\r\n")) == ["250"]
    ended = [e for e in client.events if isinstance(e, MessageEnded)]
    assert ended[-1].bare_newline


def test_a_bare_cr_dot_cr_does_not_end_the_message() -> None:
    client = in_transaction()
    assert data(client, b"one\r.\rRCPT TO:<x@example.test>\r\n") == []
    assert codes(client.send(b".\r\n")) == ["250"]
    assert not any(isinstance(e, SenderGiven) for e in client.events[1:])


def test_bare_newlines_are_normalised_by_default() -> None:
    client = in_transaction()
    data(client, b"a\nb\rc\r\n.\r\n")
    assert bytes(client.message) == b"a\r\nb\r\nc\r\n"


def test_commands_pipelined_after_the_final_dot_are_answered_after_the_message() -> None:
    client = in_transaction()
    replies = data(client, b"body\r\n.\r\nRSET\r\nNOOP\r\n")
    assert codes(replies) == ["250", "250", "250"]
    assert replies[0] == "250 2.0.0 Ok: queued as 1"


def test_the_message_reply_waits_for_the_session() -> None:
    client = in_transaction()
    conversation = client.conversation
    conversation.receive(b"RCPT TO:<b@example.test>\r\n")
    assert isinstance(conversation.next_event(), RecipientGiven)
    conversation.answer(None)
    conversation.receive(b"DATA\r\nbody\r\n.\r\nNOOP\r\n")
    assert isinstance(conversation.next_event(), MessageStarted)
    conversation.answer(None)
    event = conversation.next_event()
    assert isinstance(event, MessageData)
    while isinstance(event, MessageData):
        event = conversation.next_event()
    ended = event
    assert isinstance(ended, MessageEnded) and conversation.in_data
    assert conversation.next_event() is NEED_DATA  # NOOP waits for the commit
    conversation.answer("451 4.3.0 Error: queue file write error, try again later")
    assert not conversation.in_data
    assert conversation.next_event() is NEED_DATA
    assert codes(replies_in(conversation.data_to_send())) == ["250", "354", "451", "250"]


def test_354_waits_until_the_session_has_opened_the_spool() -> None:
    client = in_transaction()
    conversation = client.conversation
    conversation.receive(b"RCPT TO:<b@example.test>\r\n")
    assert isinstance(conversation.next_event(), RecipientGiven)
    conversation.answer(None)
    conversation.receive(b"DATA\r\nbody\r\n.\r\n")
    assert isinstance(conversation.next_event(), MessageStarted)
    assert replies_in(conversation.data_to_send()) == ["250 2.1.5 Ok"]
    assert not conversation.in_data
    conversation.answer(None)
    assert replies_in(conversation.data_to_send()) == ["354 End data with <CR><LF>.<CR><LF>"]
    assert conversation.in_data


def test_a_spool_that_cannot_be_opened_answers_451_instead_of_354() -> None:
    client = in_transaction()
    conversation = client.conversation
    conversation.receive(b"RCPT TO:<b@example.test>\r\n")
    assert isinstance(conversation.next_event(), RecipientGiven)
    conversation.answer(None)
    conversation.receive(b"DATA\r\n")
    assert isinstance(conversation.next_event(), MessageStarted)
    conversation.fail()
    assert replies_in(conversation.data_to_send())[-1] == (
        "451 4.3.0 Error: internal error, try again later"
    )
    assert not conversation.in_data
    assert conversation.envelope.recipients  # the transaction stands: DATA may be retried


def test_a_failed_step_answers_451_and_the_conversation_goes_on() -> None:
    client = in_transaction()
    conversation = client.conversation
    conversation.receive(b"RCPT TO:<b@example.test>\r\nNOOP\r\n")
    assert isinstance(conversation.next_event(), RecipientGiven)
    conversation.fail()
    assert conversation.next_event() is NEED_DATA
    assert replies_in(conversation.data_to_send()) == [
        "451 4.3.0 Error: internal error, try again later",
        "250 2.0.0 Ok",
    ]


def test_a_message_over_the_size_limit_is_read_to_its_end() -> None:
    client = in_transaction(limits=Limits(max_message_size=10))
    data(client, b"x" * 100 + b"\r\n.\r\n")
    ended = [e for e in client.events if isinstance(e, MessageEnded)]
    assert ended[-1].too_big


def test_declared_size_over_the_limit_is_refused_at_mail() -> None:
    client = greeted(limits=Limits(max_message_size=1000))
    replies = client.send(b"EHLO c.test\r\nMAIL FROM:<a@sender.test> SIZE=5000\r\n")
    assert replies[1] == "552 5.3.4 Message size exceeds fixed limit"


# ---------------------------------------------------------------- STARTTLS, ETRN


def test_starttls_drops_pipelined_plaintext_and_forgets_the_helo() -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    client = greeted(tls_context=context)
    conversation = client.conversation
    conversation.receive(b"EHLO c.test\r\nSTARTTLS\r\nMAIL FROM:<smuggled@sender.test>\r\n")
    event = conversation.next_event()
    assert isinstance(event, TlsAsked) and event.context is context
    assert replies_in(conversation.data_to_send())[-1] == "220 2.0.0 Ready to start TLS"
    assert conversation.buffered == 0  # RFC 3207 §4.2: the plaintext MAIL is gone
    assert conversation.next_event() is NEED_DATA  # waits for the handshake
    conversation.tls_started("TLSv1.3 with cipher X (256/256 bits)")
    assert conversation.helo == "" and conversation.tls is not None
    assert client.send(b"MAIL FROM:<a@sender.test>\r\n") == [
        "503 5.5.1 Error: send HELO/EHLO first"
    ]
    [ehlo] = client.send(b"EHLO c.test\r\n")
    assert "STARTTLS" not in ehlo
    assert client.send(b"STARTTLS\r\n") == ["503 5.5.1 Error: TLS already active"]


def test_starttls_without_a_certificate_is_not_implemented() -> None:
    client = greeted()
    assert client.send(b"STARTTLS\r\n") == ["502 5.5.1 Error: command not implemented"]


def test_etrn_from_an_allowed_client_asks_the_session() -> None:
    rules = policy(etrn_clients=parse_networks(["192.0.2.0/24"]))
    client = Client(Conversation(lambda: rules, "192.0.2.1", etrn=True))
    replies = client.send(b"EHLO c.test\r\nETRN example.test\r\nETRN other.test\r\n")
    assert replies[1] == "250 2.0.0 Queuing for node example.test started"
    assert replies[2] == "458 4.7.1 Error: unable to queue messages for other.test"
    assert [e.domain for e in client.events if isinstance(e, EtrnAsked)] == ["example.test"]


def test_etrn_from_anyone_else_is_refused() -> None:
    client = greeted()
    assert client.send(b"ETRN example.test\r\n") == [
        "459 4.7.1 Error: ETRN not allowed from this client"
    ]


def test_a_close_from_outside_drops_a_late_answer() -> None:
    client = in_transaction()
    conversation = client.conversation
    conversation.receive(b"RCPT TO:<b@example.test>\r\n")
    assert isinstance(conversation.next_event(), RecipientGiven)
    conversation.close("421 4.3.2 Service shutting down, try again later")
    conversation.answer(None)
    assert replies_in(conversation.data_to_send()) == [
        "421 4.3.2 Service shutting down, try again later"
    ]
    assert conversation.next_event() is CLOSED
