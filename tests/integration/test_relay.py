"""The backup MX is not an open relay: a battery of the address forms open-relay testers use.

One real `backupmx serve` backs up example.test.  Each address form gets its own
SMTP session over a raw socket (so the 20-error limit never interferes and
smtplib cannot tidy the address up), and DATA is sent in every session: a form
the server wrongly accepts ends up in the queue, where the last check finds it.

A recipient is accepted only when its final destination is a backed-up domain
and the sender did not pick the route inside the local part (``%``, ``!``, a
quoted ``@``).  A source route (``@a,@b:``) is dropped, as RFC 5321 §4.1.1.3
asks, so only the mailbox after it counts.  Relay refusals are ``550 5.7.1``;
addresses that are not RFC 5321 mailboxes at all get ``501`` (or ``553 5.6.7``
for UTF-8 without SMTPUTF8).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support.server import DOMAIN, ServerProcess
from tests.support.smtp_client import RawClient, Reply, queue_id, serving, swaks

RELAY_DENIED = ("550 5.7.1",)
SYNTAX_ERROR = ("501 5.1.", "501 5.5.4", "553 5.1.", "553 5.6.7")
BODY = b"Subject: relay test\r\n\r\nIf this is stored, the form was accepted.\r\n.\r\n"


@dataclass(frozen=True)
class Form:
    """One RCPT TO argument and what the backup must answer to it."""

    name: str
    rcpt: str  # exactly what follows "RCPT TO:"
    smtputf8: bool = False


@dataclass(frozen=True)
class Accepted(Form):
    stored_as: str = ""  # the recipient address the queue must show


REFUSED_AS_RELAY = [
    Form("other-domain", "<victim@other.test>"),
    Form("percent-hack", "<victim%other.test@example.test>"),
    Form("percent-hack-upper-case", "<victim%OTHER.TEST@EXAMPLE.TEST>"),
    Form("percent-hack-twice", "<victim%other.test%example.test@example.test>"),
    Form("percent-hack-to-our-own-domain", "<bob%example.test@example.test>"),
    Form("bang-path", "<other.test!victim@example.test>"),
    Form("bang-path-and-percent-hack", "<other.test!victim%example.test@example.test>"),
    Form("quoted-at-in-local-part", '<"victim@other.test"@example.test>'),
    Form("quoted-escaped-at-in-local-part", '<"victim\\@other.test"@example.test>'),
    Form("quoted-percent-in-local-part", '<"victim%other.test"@example.test>'),
    Form("quoted-bang-in-local-part", '<"other.test!victim"@example.test>'),
    Form("percent-hack-at-address-literal", "<victim%other.test@[127.0.0.1]>"),
    Form("ipv4-address-literal", "<victim@[127.0.0.1]>"),
    Form("ipv6-address-literal", "<victim@[IPv6:::1]>"),
    Form("source-route-with-our-domain-first", "<@example.test:victim@other.test>"),
    Form(
        "source-route-through-our-domain-and-hostname",
        "<@example.test,@mx2.backup.test:victim@other.test>",
    ),
    Form("other-domain-with-trailing-dot", "<victim@other.test.>"),
    Form("our-domain-as-a-prefix", "<victim@example.test.other.test>"),
    Form("our-domain-as-a-suffix-without-dot", "<victim@otherexample.test>"),
    Form("subdomain-not-configured", "<victim@sub.example.test>"),
    Form("our-own-hostname", "<victim@mx2.backup.test>"),
    Form("localhost", "<victim@localhost>"),
    Form("bare-ip-as-domain", "<victim@127.0.0.1>"),
    Form("idn-lookalike-a-label", "<victim@xn--exmple-cua.test>"),
    Form("idn-lookalike-u-label-with-smtputf8", "<victim@exämple.test>", smtputf8=True),
]

REFUSED_AS_SYNTAX = [
    Form("two-at-signs-in-brackets", "<victim@other.test@example.test>"),
    Form("two-at-signs-without-brackets", "victim@other.test@example.test"),
    Form("our-domain-then-other", "<victim@example.test@other.test>"),
    Form("quoted-address-without-domain", '<"victim@other.test">'),
    Form("percent-hack-without-domain", "<victim%other.test>"),
    Form("local-part-only", "<victim>"),
    Form("domain-name-in-address-literal", "<victim@[example.test]>"),
    Form("text-after-closing-bracket", "<victim@example.test>@other.test"),
    Form("second-address-after-ours", "<bob@example.test> <victim@other.test>"),
    Form("comma-separated-list", "<victim@example.test,victim@other.test>"),
    Form("port-after-domain", "<victim@other.test:25>"),
    Form("nul-byte-injection", "<victim@other.test\x00@example.test>"),
    Form("idn-lookalike-u-label-without-smtputf8", "<victim@exämple.test>"),
]

# IDNA2003 (Python's "idna" codec) maps these onto example.test; IDNA2008 (RFC 5891,
# which RFC 6531 requires) does not: they name no domain we back up.
NOT_IDNA2008 = [
    Form("idn-zero-width-joiner-in-our-domain", "<victim@exam\u200dple.test>", smtputf8=True),
    Form("idn-zero-width-non-joiner-in-our-domain", "<victim@exam\u200cple.test>", smtputf8=True),
]

ACCEPTED = [
    Accepted("plain", "<plain@example.test>", stored_as="plain@example.test"),
    Accepted("upper-case-domain", "<upper@EXAMPLE.TEST>", stored_as="upper@EXAMPLE.TEST"),
    Accepted("mixed-case", "<Mixed.Case@Example.Test>", stored_as="Mixed.Case@Example.Test"),
    Accepted("trailing-dot", "<trailing-dot@example.test.>", stored_as="trailing-dot@example.test"),
    Accepted("plus-tag", "<plus+tag@example.test>", stored_as="plus+tag@example.test"),
    Accepted(
        "quoted-local-part-without-routing",
        '<"quoted local"@example.test>',
        stored_as='"quoted local"@example.test',
    ),
    Accepted(
        "source-route-is-dropped",
        "<@other.test:routed@example.test>",
        stored_as="routed@example.test",
    ),
    Accepted(
        "multi-hop-source-route-is-dropped",
        "<@other.test,@relay.other.test:multihop@example.test>",
        stored_as="multihop@example.test",
    ),
    Accepted(
        "without-angle-brackets", "nobrackets@example.test", stored_as="nobrackets@example.test"
    ),
    Accepted("space-after-colon", " <spaced@example.test>", stored_as="spaced@example.test"),
]


@dataclass
class Session:
    rcpt: Reply
    data: Reply


@dataclass
class Battery:
    sessions: dict[str, Session]
    stored: list[dict[str, Any]]
    null_sender_mail: Reply


def run_form(server: ServerProcess, form: Form) -> Session:
    """One session: MAIL, the form as RCPT, then DATA whatever RCPT got."""
    params = " SMTPUTF8" if form.smtputf8 else ""
    with RawClient(server.host, server.port) as client:
        assert client.command("EHLO relay-tester.test").code == 250
        mail = client.command(f"MAIL FROM:<tester+{form.name}@sender.test>{params}")
        assert mail.code == 250, mail
        rcpt = client.command(("RCPT TO:" + form.rcpt).encode())
        data = client.command("DATA")
        if data.code == 354:
            client.send(BODY)
            data = client.reply()
        client.command("QUIT")
    return Session(rcpt, data)


@pytest.fixture(scope="module")
def relay_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with serving(ServerProcess(tmp_path_factory.mktemp("relay"))) as server:
        yield server


@pytest.fixture(scope="module")
def battery(relay_server: ServerProcess) -> Battery:
    """Every form, each in its own session, then one look at the queue."""
    forms = [*REFUSED_AS_RELAY, *REFUSED_AS_SYNTAX, *NOT_IDNA2008, *ACCEPTED]
    sessions = {form.name: run_form(relay_server, form) for form in forms}
    with RawClient(relay_server.host, relay_server.port) as client:
        client.command("EHLO relay-tester.test")
        null_sender = client.command("MAIL FROM:<>")
        client.command("QUIT")
    return Battery(sessions, relay_server.queue(), null_sender)


@pytest.mark.parametrize("form", REFUSED_AS_RELAY, ids=lambda f: f.name)
def test_backup_never_relays(battery: Battery, form: Form) -> None:
    session = battery.sessions[form.name]
    assert session.rcpt.startswith(RELAY_DENIED), f"RCPT TO:{form.rcpt} -> {session.rcpt}"
    assert session.data.startswith("554 5.5.1"), f"DATA after a refused RCPT -> {session.data}"


@pytest.mark.parametrize("form", REFUSED_AS_SYNTAX, ids=lambda f: f.name)
def test_backup_refuses_malformed_address(battery: Battery, form: Form) -> None:
    session = battery.sessions[form.name]
    assert session.rcpt.startswith(SYNTAX_ERROR), f"RCPT TO:{form.rcpt!r} -> {session.rcpt}"
    assert session.data.startswith("554 5.5.1"), f"DATA after a refused RCPT -> {session.data}"


@pytest.mark.parametrize("form", NOT_IDNA2008, ids=lambda f: f.name)
def test_backup_refuses_name_that_is_not_an_idna2008_domain(battery: Battery, form: Form) -> None:
    session = battery.sessions[form.name]
    refusals = RELAY_DENIED + SYNTAX_ERROR
    assert session.rcpt.startswith(refusals), f"RCPT TO:{form.rcpt!r} -> {session.rcpt}"
    assert session.data.startswith("554 5.5.1"), f"DATA after a refused RCPT -> {session.data}"


@pytest.mark.parametrize("form", ACCEPTED, ids=lambda f: f.name)
def test_backup_accepts_mailbox_in_backed_up_domain(battery: Battery, form: Accepted) -> None:
    session = battery.sessions[form.name]
    assert session.rcpt.startswith("250 2.1.5"), f"RCPT TO:{form.rcpt} -> {session.rcpt}"
    assert session.data.startswith("250 2.0.0"), session.data
    (message,) = [m for m in battery.stored if m["id"] == queue_id(session.data)]
    assert [(r["address"], r["domain"]) for r in message["recipients"]] == [
        (form.stored_as, DOMAIN)
    ]


def test_relay_battery_stores_nothing_outside_the_backed_up_domain(battery: Battery) -> None:
    outside = [
        (m["id"], r["address"])
        for m in battery.stored
        for r in m["recipients"]
        if r["domain"] != DOMAIN
    ]
    assert outside == []
    accepted_ids = {queue_id(battery.sessions[form.name].data) for form in ACCEPTED}
    assert {m["id"] for m in battery.stored} == accepted_ids


def test_null_sender_is_accepted(battery: Battery) -> None:
    assert battery.null_sender_mail.startswith("250 2.1.0"), battery.null_sender_mail


def test_swaks_to_other_domain_is_refused_550_relay_denied(relay_server: ServerProcess) -> None:
    result = swaks(
        relay_server,
        "--from",
        "tester@sender.test",
        "--to",
        "victim@other.test",
        "--quit-after",
        "RCPT",
    )
    assert result.returncode != 0
    assert "<** 550 5.7.1" in result.stdout, result.stdout


def test_swaks_percent_hack_is_refused_550_relay_denied(relay_server: ServerProcess) -> None:
    result = swaks(
        relay_server,
        "--from",
        "tester@sender.test",
        "--to",
        "victim%other.test@example.test",
        "--quit-after",
        "RCPT",
    )
    assert result.returncode != 0
    assert "<** 550 5.7.1" in result.stdout, result.stdout


# --------------------------------------------------------------- domain entries


@pytest.fixture(scope="module")
def coverage_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Backs up every subdomain of example.org (not example.org itself) and two IDN cases."""
    domains = [
        {"name": ".example.org", "primary": ["127.0.0.1:9"]},
        {"name": "bücher.test", "primary": ["127.0.0.1:9"]},
        {"name": "strasse.test", "primary": ["127.0.0.1:9"]},
    ]
    with serving(ServerProcess(tmp_path_factory.mktemp("coverage"), domain=domains)) as server:
        yield server


def rcpt_reply(server: ServerProcess, rcpt: str, *, smtputf8: bool = False) -> Reply:
    params = " SMTPUTF8" if smtputf8 else ""
    with RawClient(server.host, server.port) as client:
        client.command("EHLO relay-tester.test")
        assert client.command(f"MAIL FROM:<tester@sender.test>{params}").code == 250
        reply = client.command(f"RCPT TO:{rcpt}".encode())
        client.command("QUIT")
    return reply


@pytest.mark.parametrize(
    "rcpt", ["<bob@a.example.org>", "<bob@deep.sub.example.org>", "<bob@A.EXAMPLE.ORG>"]
)
def test_dot_domain_covers_its_subdomains(coverage_server: ServerProcess, rcpt: str) -> None:
    assert rcpt_reply(coverage_server, rcpt).startswith("250 2.1.5")


@pytest.mark.parametrize(
    "rcpt",
    [
        "<bob@example.org>",
        "<bob@EXAMPLE.ORG>",
        "<bob@badexample.org>",
        "<bob@a.example.org.other.test>",
        "<bob%other.test@a.example.org>",
    ],
)
def test_dot_domain_does_not_cover_its_parent_or_lookalikes(
    coverage_server: ServerProcess, rcpt: str
) -> None:
    assert rcpt_reply(coverage_server, rcpt).startswith("550 5.7.1")


def test_idn_domain_matches_in_a_label_and_u_label_form(coverage_server: ServerProcess) -> None:
    assert rcpt_reply(coverage_server, "<bob@xn--bcher-kva.test>").startswith("250 2.1.5")
    assert rcpt_reply(coverage_server, "<bob@bücher.test>", smtputf8=True).startswith("250 2.1.5")
    assert rcpt_reply(coverage_server, "<bob@BÜCHER.test>", smtputf8=True).startswith("250 2.1.5")
    assert rcpt_reply(coverage_server, "<bob@bücher.test>").startswith("553 5.6.7")


def test_idna2008_domain_is_not_folded_into_a_backed_up_lookalike(
    coverage_server: ServerProcess,
) -> None:
    # straße.test is xn--strae-oqa.test under IDNA2008, a domain of its own; only
    # IDNA2003 folds it into strasse.test.  Its primary would relay it on for us.
    assert rcpt_reply(coverage_server, "<bob@strasse.test>").startswith("250 2.1.5")
    assert rcpt_reply(coverage_server, "<bob@xn--strae-oqa.test>").startswith("550 5.7.1")
    folded = rcpt_reply(coverage_server, "<bob@straße.test>", smtputf8=True)
    assert folded.startswith(RELAY_DENIED + SYNTAX_ERROR), folded
