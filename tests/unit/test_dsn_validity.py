"""Every DSN backupmx builds passes the strict check, without a server: `build_dsn`,
`Notices` and the routing of address literals.

The strict check (tests/support/dsn_check.py, `check_dsn`) is applied to DSNs built
directly for every kind, RET=FULL and RET=HDRS, 8-bit and UTF-8 originals, UTF-8
senders and recipients, and the hostile cases (a 2 MB header line, a 5,000-octet
body line).  `Notices` must queue each DSN with the BODY= and SMTPUTF8 it needs,
and route a DSN to an address-literal sender without DNS.  The same check of the
DSNs a real ``backupmx serve`` sends is in tests/integration/test_dsn_validity.py.
"""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from backupmx.bounce.dsn import (
    MAX_LINE,
    RETURN_HEADERS_LIMIT,
    Action,
    RecipientReport,
    build_dsn,
    is_8bit,
    needs_smtputf8,
)
from backupmx.bounce.notices import Notices
from backupmx.deliver.client import Target
from backupmx.deliver.route import Bounce, Defer, Identity, RoutePlan, plan, route_literal
from backupmx.mail.reply import bounced, classify, deferred
from backupmx.queue.records import Claim, Outbound
from tests.support.dsn_check import (
    ASCII_HEADERS,
    EIGHT_BIT,
    HOSTNAME,
    LONG_BODY_LINE,
    LONG_HEADERS,
    UTF8,
    Expected,
    check_dsn,
)

ARRIVED = datetime(2025, 3, 1, 8, 0, 0, tzinfo=UTC)
NOW = datetime(2025, 3, 2, 9, 30, 0, tzinfo=UTC)
REMOTE = Target("mx1.example.test", "127.0.0.2", 25)


def built(original: bytes, reports: list[RecipientReport], **changes: Any) -> bytes:
    arguments: dict[str, Any] = {
        "reporting_mta": HOSTNAME,
        "sender": "alice@sender.test",
        "queue_id": "Q123",
        "arrival_date": ARRIVED,
        "original": original,
        "recipients": reports,
        "date": NOW,
        "envid": "E1",
    }
    arguments.update(changes)
    return build_dsn(**arguments)


def options_for(dsn: bytes, to: str) -> tuple[str, ...]:
    """The MAIL parameters `Notices` gives a DSN, as the deliverer sends them."""
    return ("BODY=8BITMIME",) * is_8bit(dsn) + ("SMTPUTF8",) * needs_smtputf8(dsn, to)


def report(address: str, action: Action, orcpt: str | None = None) -> RecipientReport:
    status = {Action.FAILED: "5.1.1", Action.DELAYED: "4.4.1"}.get(action, "2.0.0")
    return RecipientReport(
        address,
        action,
        status,
        original_recipient=orcpt,
        remote_mta=None if action is Action.DELAYED else REMOTE.host,
        remote_host=str(REMOTE),
        diagnostic=f"{status[0]}50 {status} said so",
    )


# --------------------------------------------------------------------------- built directly

KINDS = [Action.FAILED, Action.DELAYED, Action.RELAYED]
ORIGINALS = {"8-bit": (EIGHT_BIT, False), "utf-8": (UTF8, True)}


@pytest.mark.parametrize("action", KINDS)
@pytest.mark.parametrize("ret", ["FULL", "HDRS"])
@pytest.mark.parametrize("original", list(ORIGINALS))
@pytest.mark.parametrize("sender", ["alice@sender.test", "jürgen@sender.test"])
@pytest.mark.parametrize("recipient", ["bob@example.test", "bäd@example.test"])
def test_every_kind_of_dsn_passes_the_strict_check(
    action: Action, ret: str, original: str, sender: str, recipient: str
) -> None:
    content, smtputf8 = ORIGINALS[original]
    dsn = built(content, [report(recipient, action)], sender=sender, ret=ret, smtputf8=smtputf8)
    expected = Expected(
        sender,
        {recipient: str(action)},
        smtputf8_original=smtputf8,
        full=action is Action.FAILED and ret == "FULL",
    )
    checked = check_dsn(dsn, options_for(dsn, sender), expected)
    if checked.returned_type in ("message/rfc822", "message/global"):
        inner = checked.message.get_payload()[2].get_payload(0)  # type: ignore[index]
        assert inner["Message-ID"] in ("<m1@sender.test>", "<m2@sender.test>")


def test_a_utf8_recipient_is_a_utf8_address_in_a_global_delivery_status() -> None:
    orcpt = "utf-8;b\\x{E4}d+2Bx@example.test"  # RFC 6533 utf-8-addr-xtext, as ORCPT
    dsn = built(UTF8, [report("bäd@example.test", Action.FAILED, orcpt)], smtputf8=True)
    assert b"Final-Recipient: utf-8; b\xc3\xa4d@example.test\r\n" in dsn
    assert b"Original-Recipient: utf-8;b\\x{E4}d+x@example.test\r\n" in dsn
    assert b"Content-Type: message/global-delivery-status\r\n" in dsn
    # An rfc822 ORCPT that decodes to UTF-8 becomes utf-8-addr-unitext (RFC 6533 §3).
    odd = built(UTF8, [report("bäd@example.test", Action.FAILED, "rfc822;b+C3+A4d+2B1@x.test")])
    assert b"Original-Recipient: utf-8;b\xc3\xa4d\\x{2B}1@x.test\r\n" in odd


def test_an_ascii_dsn_keeps_the_plain_types_and_needs_nothing() -> None:
    plain = ASCII_HEADERS + b"\r\nhello\r\n"
    dsn = built(plain, [report("bob@example.test", Action.FAILED)], ret="FULL")
    assert not is_8bit(dsn) and not needs_smtputf8(dsn, "alice@sender.test")
    check_dsn(dsn, (), Expected("alice@sender.test", {"bob@example.test": "failed"}, full=True))


def test_remote_mta_is_the_dns_name_and_the_address_stays_in_the_text() -> None:
    dsn = built(EIGHT_BIT, [report("bob@example.test", Action.FAILED)])
    checked = check_dsn(
        dsn,
        options_for(dsn, "alice@sender.test"),
        Expected("alice@sender.test", {"bob@example.test": "failed"}),
    )
    assert checked.status[1]["Remote-MTA"] == "dns; mx1.example.test"
    assert "host mx1.example.test[127.0.0.2]:25 said:" in checked.notification


@pytest.mark.parametrize("ret", ["FULL", "HDRS"])
def test_a_2mb_header_line_gives_a_bounded_dsn_and_says_what_was_cut(ret: str) -> None:
    started = time.monotonic()
    dsn = built(LONG_HEADERS, [report("bob@example.test", Action.FAILED)], ret=ret)
    assert time.monotonic() - started < 1.0
    checked = check_dsn(
        dsn,
        options_for(dsn, "alice@sender.test"),
        Expected("alice@sender.test", {"bob@example.test": "failed"}),
    )
    assert len(dsn) <= RETURN_HEADERS_LIMIT + 4096
    text = " ".join(checked.notification.split())
    assert "longer than 64 KiB; only their first 64 KiB are attached" in text
    assert "1 line(s) of your message are longer than 998 octets" in text
    returned = dsn.split(b"Content-Type: text/rfc822-headers\r\n\r\n", 1)[1]
    assert returned.startswith(ASCII_HEADERS)  # the fields before the long ones, intact
    assert b"X-Long: \r\n " not in returned and b"X-Long:" in returned
    # X-Words is folded at its spaces (RFC 5322 §2.2.3), never cut inside a word.
    folded = returned.split(b"X-Words:", 1)[1].split(b"\r\n--", 1)[0]
    assert set(folded.replace(b"\r\n", b"").split()) == {b"word"}


def test_a_long_body_line_of_a_returned_original_is_cut_and_said() -> None:
    dsn = built(LONG_BODY_LINE, [report("bob@example.test", Action.FAILED)], ret="FULL")
    checked = check_dsn(
        dsn, (), Expected("alice@sender.test", {"bob@example.test": "failed"}, full=True)
    )
    assert b"\r\n" + b"y" * MAX_LINE + b"\r\nend\r\n" in dsn
    assert "1 line(s) of your message are longer than 998 octets" in " ".join(
        checked.notification.split()
    )


def test_a_cut_never_splits_a_utf8_character() -> None:
    original = b"Subject: " + "ä".encode() * 1000 + b"\r\n\r\nx\r\n"
    dsn = built(original, [report("bob@example.test", Action.FAILED)], smtputf8=True)
    returned = dsn.split(b"Content-Type: message/global-headers\r\n", 1)[1]
    text = returned.split(b"\r\n--", 1)[0].decode("utf-8")  # raises on a split sequence
    # What is left of the Subject: after the cut and the folding is whole characters only.
    kept = text.partition("\r\n\r\n")[2].removeprefix("Subject:").split()
    assert kept and all(set(word) == {"ä"} for word in kept), kept


# --------------------------------------------------------------------------- Notices


def outbound(
    sender: str, body: bytes, *, smtputf8: bool = False, ret: str | None = None
) -> Outbound:
    return Outbound("Q1", sender, body, len(body), "8BITMIME", smtputf8, ret, None, ARRIVED)


def claim(address: str, notify: str | None = None) -> Claim:
    domain = address.rpartition("@")[2]
    return Claim(1, "Q1", address, domain, 1, notify, None)


@pytest.mark.parametrize(
    ("sender", "body", "smtputf8", "body_type", "dsn_smtputf8"),
    [
        ("alice@sender.test", ASCII_HEADERS + b"\r\nhi\r\n", False, "7BIT", False),
        ("alice@sender.test", EIGHT_BIT, False, "8BITMIME", False),
        ("alice@sender.test", UTF8, True, "8BITMIME", False),
        ("jürgen@sender.test", UTF8, True, "8BITMIME", True),
    ],
)
def test_notices_queue_the_dsn_with_the_body_and_smtputf8_it_needs(
    sender: str, body: bytes, smtputf8: bool, body_type: str, dsn_smtputf8: bool
) -> None:
    (notice,) = Notices(HOSTNAME).for_results(
        outbound(sender, body, smtputf8=smtputf8, ret="FULL"),
        [claim("bob@example.test")],
        [bounced("550 5.1.1 unknown user", "5.1.1")],
        REMOTE,
        True,
    )
    assert notice.sender == ""
    assert (notice.body_type, notice.smtputf8) == (body_type, dsn_smtputf8)
    assert [(r.address, r.domain) for r in notice.recipients] == [(sender, "sender.test")]


def test_notices_name_the_remote_mta_by_name_never_by_address() -> None:
    message = outbound("alice@sender.test", EIGHT_BIT)
    failure = [bounced("550 5.1.1 unknown user", "5.1.1")]
    by_name = Notices(HOSTNAME).for_results(message, [claim("b@x.test")], failure, REMOTE, True)
    assert b"Remote-MTA: dns; mx1.example.test\r\n" in by_name[0].body.read()
    literal = Target("127.0.0.2", "127.0.0.2", 27027)
    by_address = Notices(HOSTNAME).for_results(message, [claim("b@x.test")], failure, literal, True)
    body = by_address[0].body.read()
    assert b"Remote-MTA" not in body
    assert b"host 127.0.0.2[127.0.0.2]:27027 said: 550" in body


def test_an_address_literal_sender_gets_its_dsn_routed_to_the_literal() -> None:
    message = outbound("user@[127.0.0.1]", EIGHT_BIT)
    (notice,) = Notices(HOSTNAME).for_results(
        message, [claim("b@x.test")], [bounced("550 5.1.1 no", "5.1.1")], REMOTE, True
    )
    assert [(r.address, r.domain) for r in notice.recipients] == [
        ("user@[127.0.0.1]", "[127.0.0.1]")
    ]


@pytest.mark.parametrize(
    ("sender", "notify"), [("", None), ("", "SUCCESS,FAILURE"), ("alice@sender.test", "NEVER")]
)
def test_no_dsn_to_the_null_sender_hence_no_double_bounce_nor_with_notify_never(
    sender: str, notify: str | None
) -> None:
    notices = Notices(HOSTNAME).for_results(
        outbound(sender, EIGHT_BIT),
        [claim("b@x.test", notify), claim("c@x.test", notify)],
        [bounced("550 5.1.1 no", "5.1.1"), classify(250, "2.0.0 Ok")],
        REMOTE,
        False,
    )
    assert notices == []


def test_a_deferral_is_no_dsn_of_its_own() -> None:
    notices = Notices(HOSTNAME).for_results(
        outbound("alice@sender.test", EIGHT_BIT),
        [claim("b@x.test")],
        [deferred("451 later")],
        REMOTE,
        True,
    )
    assert notices == []


# --------------------------------------------------------------------------- route


IDENTITY = Identity.of(HOSTNAME, [], [], [])


@pytest.mark.parametrize(
    ("literal", "address"), [("[127.0.0.1]", "127.0.0.1"), ("[ipv6:2001:db8::1]", "2001:db8::1")]
)
def test_an_address_literal_routes_to_its_address_on_the_delivery_port(
    literal: str, address: str
) -> None:
    route = route_literal(literal, IDENTITY, 2525)
    assert isinstance(route, RoutePlan)
    assert [(h.address, h.port) for h in route.hops] == [(address, 2525)]


def test_an_address_literal_of_this_host_defers_and_a_bad_one_bounces() -> None:
    ours = Identity.of(HOSTNAME, [], [], ["192.0.2.1"])
    assert isinstance(route_literal("[192.0.2.1]", ours, 25), Defer)
    assert isinstance(route_literal("[300.1.2.3]", ours, 25), Bounce)


async def test_plan_routes_an_address_literal_without_dns() -> None:
    class NoDns:
        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"DNS asked ({name}) for an address literal")

    route = await plan("[127.0.0.1]", NoDns(), IDENTITY, (), 2525, random.Random(1))  # type: ignore[arg-type]
    assert isinstance(route, RoutePlan) and route.hops[0].address == "127.0.0.1"
