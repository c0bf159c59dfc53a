"""RFC 3464 delivery status notifications and the RFC 3461 NOTIFY rules, pure.

Every DSN built here is parsed back with Python's `email` package, as a
recipient's mail reader would, and checked byte for byte where it matters.
"""

from __future__ import annotations

import email
import email.policy
import re
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage, Message
from typing import Any

import pytest

from backupmx.bounce.dsn import (
    RETURN_SIZE_LIMIT,
    Action,
    RecipientReport,
    build_dsn,
    decode_xtext,
    is_8bit,
    should_send_dsn,
)

ARRIVED = datetime(2025, 3, 1, 8, 0, 0, tzinfo=UTC)
NOW = datetime(2025, 3, 2, 9, 30, 0, tzinfo=UTC)
HEADERS = (
    b"Received: from client.sender.test ([127.0.0.5])\r\n"
    b"\tby mx2.backup.test with ESMTP id Q123 for <bob@example.test>\r\n"
    b"From: Alice <alice@sender.test>\r\n"
    b"To: bob@example.test\r\n"
    b"Subject: =?utf-8?q?caf=C3=A9?= \xc3\xa9t\xc3\xa9\r\n"
    b"Message-ID: <m1@sender.test>\r\n"
)
ORIGINAL = HEADERS + b"\r\nHello Bob,\r\n8-bit body: \xe2\x82\xac \xff\r\n.leading dot\r\n"
FAILED = RecipientReport(
    final_recipient="bob@example.test",
    action=Action.FAILED,
    status="5.1.1",
    original_recipient="rfc822;Bob+2Bsales@example.test",
    remote_mta="mx1.example.test",
    diagnostic="550 5.1.1 <bob@example.test>: Recipient address rejected: User unknown",
    last_attempt_date=NOW,
)


def build(**changes: Any) -> bytes:
    arguments: dict[str, Any] = {
        "reporting_mta": "mx2.backup.test",
        "sender": "alice@sender.test",
        "queue_id": "Q123",
        "arrival_date": ARRIVED,
        "original": ORIGINAL,
        "recipients": [FAILED],
        "date": NOW,
        "envid": "QQ+2B314",
        "token": "t0k3n",
    }
    arguments.update(changes)
    return build_dsn(**arguments)


def parse(dsn: bytes) -> EmailMessage:
    message = email.message_from_bytes(dsn, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def parts(dsn: bytes) -> list[EmailMessage]:
    return list(parse(dsn).iter_parts())  # type: ignore[arg-type]


def status_blocks(dsn: bytes) -> list[Message]:
    report = parts(dsn)[1]
    assert report.get_content_type() == "message/delivery-status"
    blocks = report.get_payload()
    assert isinstance(blocks, list)
    return blocks


# --------------------------------------------------------------------------- structure


def test_failure_dsn_is_a_multipart_report_with_three_parts() -> None:
    message = parse(build())
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in message.iter_parts()] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert not message.defects
    assert all(not p.defects for p in message.walk())


def test_failure_dsn_headers() -> None:
    message = parse(build())
    (author,) = message["From"].addresses
    assert author.addr_spec == "MAILER-DAEMON@mx2.backup.test"
    assert author.display_name == "Mail Delivery System"
    assert message["To"] == "alice@sender.test"
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["MIME-Version"] == "1.0"
    assert message["Date"].datetime == NOW
    assert message["Message-ID"] == "<20250302093000.Q123.t0k3n@mx2.backup.test>"


def test_per_message_fields() -> None:
    per_message = status_blocks(build())[0]
    assert per_message["Reporting-MTA"] == "dns; mx2.backup.test"
    assert per_message["Original-Envelope-Id"] == "QQ+314"  # xtext decoded
    assert per_message["Arrival-Date"] == "Sat, 01 Mar 2025 08:00:00 +0000"
    assert per_message["X-Backupmx-Queue-ID"] == "Q123"


def test_per_recipient_fields() -> None:
    blocks = status_blocks(build())
    assert len(blocks) == 2
    recipient = blocks[1]
    assert recipient["Original-Recipient"] == "rfc822;Bob+sales@example.test"
    assert recipient["Final-Recipient"] == "rfc822; bob@example.test"
    assert recipient["Action"] == "failed"
    assert recipient["Status"] == "5.1.1"
    assert recipient["Remote-MTA"] == "dns; mx1.example.test"
    assert recipient["Diagnostic-Code"] == (
        "smtp; 550 5.1.1 <bob@example.test>: Recipient address rejected: User unknown"
    )
    assert recipient["Last-Attempt-Date"] == "Sun, 02 Mar 2025 09:30:00 +0000"
    assert recipient["Will-Retry-Until"] is None


def test_fields_left_out_when_unknown() -> None:
    bare = RecipientReport("bob@example.test", Action.FAILED, "5.0.0")
    blocks = status_blocks(build(recipients=[bare], envid=None))
    assert blocks[0]["Original-Envelope-Id"] is None
    for name in ("Original-Recipient", "Remote-MTA", "Diagnostic-Code", "Last-Attempt-Date"):
        assert blocks[1][name] is None


def test_one_block_per_recipient_and_a_human_line_for_each() -> None:
    other = RecipientReport(
        "carol@example.test",
        Action.FAILED,
        "5.2.2",
        remote_mta="mx1.example.test",
        diagnostic="552 5.2.2 mailbox full",
    )
    dsn = build(recipients=[FAILED, other])
    assert [b["Final-Recipient"] for b in status_blocks(dsn)[1:]] == [
        "rfc822; bob@example.test",
        "rfc822; carol@example.test",
    ]
    text = parts(dsn)[0].get_content()
    assert "<bob@example.test>: host mx1.example.test said: 550 5.1.1" in text
    assert "<carol@example.test>: host mx1.example.test said: 552 5.2.2 mailbox full" in text
    assert "mx2.backup.test" in text


# --------------------------------------------------------------------------- the returned original


def test_without_ret_only_the_headers_come_back_byte_for_byte() -> None:
    dsn = build()
    assert HEADERS in dsn
    assert b"Hello Bob" not in dsn
    returned = parts(dsn)[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert returned["Content-Transfer-Encoding"] == "8bit"  # the Subject carries UTF-8


def test_ret_hdrs_returns_the_headers_only() -> None:
    dsn = build(ret="HDRS")
    assert parts(dsn)[2].get_content_type() == "text/rfc822-headers"
    assert b"Hello Bob" not in dsn


def test_ret_full_returns_the_whole_message_byte_for_byte() -> None:
    dsn = build(ret="FULL")
    returned = parts(dsn)[2]
    assert returned.get_content_type() == "message/rfc822"
    assert returned["Content-Transfer-Encoding"] == "8bit"
    assert parse(dsn)["Content-Transfer-Encoding"] == "8bit"
    assert ORIGINAL in dsn
    inner = returned.get_payload(0)
    assert isinstance(inner, Message)
    assert inner["Message-ID"] == "<m1@sender.test>"
    assert inner["From"] == "Alice <alice@sender.test>"


def test_the_original_headers_round_trip_through_a_mail_reader() -> None:
    original = email.message_from_bytes(ORIGINAL, policy=email.policy.default)
    for dsn in (build(), build(ret="FULL")):
        returned = parts(dsn)[2]
        if returned.get_content_type() == "message/rfc822":
            inner = returned.get_payload(0)
        else:
            inner = email.message_from_bytes(returned.get_payload(decode=True))
        assert isinstance(inner, Message)
        assert inner.keys() == original.keys()
        for name in ("From", "To", "Message-ID"):
            assert str(inner[name]) == str(original[name])


def test_ret_full_over_the_size_limit_returns_headers_and_says_why() -> None:
    big = HEADERS + b"\r\n" + (b"x" * 76 + b"\r\n") * (RETURN_SIZE_LIMIT // 78 + 1)
    dsn = build(ret="FULL", original=big)
    assert parts(dsn)[2].get_content_type() == "text/rfc822-headers"
    assert "too large to return in full" in parts(dsn)[0].get_content()
    small = build(ret="FULL", original=big, return_size_limit=len(big))
    assert parts(small)[2].get_content_type() == "message/rfc822"


def test_the_boundary_never_occurs_in_the_original() -> None:
    trap = HEADERS + b"\r\n--Q123.t0k3n/mx2.backup.test\r\nfake part\r\n"
    dsn = build(ret="FULL", original=trap)
    boundary = parse(dsn).get_boundary()
    assert boundary is not None
    assert b"--" + boundary.encode() not in trap
    assert len(parts(dsn)) == 3
    assert trap in dsn


def test_every_line_ends_in_crlf_even_if_the_original_had_bare_newlines() -> None:
    sloppy = b"From: a@sender.test\nSubject: x\r\rbody\nmore\r\n"
    for ret in (None, "FULL"):
        dsn = build(original=sloppy, ret=ret)
        assert re.search(rb"\r(?!\n)|(?<!\r)\n", dsn) is None
        assert dsn.endswith(b"--\r\n")
        assert max(len(line) for line in dsn.split(b"\r\n")) <= 998


def test_a_seven_bit_dsn_declares_no_8bit_encoding() -> None:
    plain = b"From: a@sender.test\r\nSubject: hi\r\n\r\nbody\r\n"
    dsn = build(original=plain, ret="FULL")
    assert not is_8bit(dsn)
    assert b"Content-Transfer-Encoding" not in dsn
    assert is_8bit(build())


# --------------------------------------------------------------------------- delays and successes


def test_delay_dsn_says_until_when_and_returns_headers_even_with_ret_full() -> None:
    delayed = RecipientReport(
        "bob@example.test", Action.DELAYED, "4.4.1", diagnostic="connect to mx1: refused"
    )
    until = ARRIVED + timedelta(days=5)
    dsn = build(recipients=[delayed], ret="FULL", retry_until=until)
    assert parse(dsn)["Subject"] == "Delayed Mail (still being retried)"
    block = status_blocks(dsn)[1]
    assert block["Action"] == "delayed"
    assert block["Will-Retry-Until"] == "Thu, 06 Mar 2025 08:00:00 +0000"
    assert block["Diagnostic-Code"] == "X-Backupmx; connect to mx1: refused"
    assert parts(dsn)[2].get_content_type() == "text/rfc822-headers"
    assert "you do not need to send it again" in parts(dsn)[0].get_content()


def test_a_reports_own_retry_until_wins() -> None:
    own = ARRIVED + timedelta(days=2)
    delayed = RecipientReport("bob@example.test", Action.DELAYED, "4.4.1", will_retry_until=own)
    dsn = build(recipients=[delayed], retry_until=ARRIVED + timedelta(days=5))
    assert status_blocks(dsn)[1]["Will-Retry-Until"] == "Mon, 03 Mar 2025 08:00:00 +0000"


@pytest.mark.parametrize("action", [Action.DELIVERED, Action.RELAYED, Action.EXPANDED])
def test_success_reports(action: Action) -> None:
    report = RecipientReport(
        "bob@example.test",
        action,
        "2.0.0",
        remote_mta="mx1.example.test",
        diagnostic="250 2.0.0 Ok: queued as 4Xyz",
    )
    dsn = build(recipients=[report], ret="FULL")
    assert parse(dsn)["Subject"] == "Successful Mail Delivery Report"
    assert status_blocks(dsn)[1]["Action"] == str(action)
    assert parts(dsn)[2].get_content_type() == "text/rfc822-headers"


def test_a_failure_among_delays_makes_a_failure_report() -> None:
    delayed = RecipientReport("carol@example.test", Action.DELAYED, "4.4.1")
    dsn = build(recipients=[FAILED, delayed], retry_until=NOW)
    assert parse(dsn)["Subject"] == "Undelivered Mail Returned to Sender"
    assert [b["Action"] for b in status_blocks(dsn)[1:]] == ["failed", "delayed"]


def test_a_huge_diagnostic_is_folded_under_998_octets() -> None:
    report = RecipientReport(
        "bob@example.test", Action.FAILED, "5.0.0", diagnostic="554 " + "x" * 3000
    )
    dsn = build(recipients=[report])
    assert max(len(line) for line in dsn.split(b"\r\n")) <= 998
    assert status_blocks(dsn)[1]["Diagnostic-Code"].replace(" ", "") == "smtp;554" + "x" * 3000


def test_a_multi_line_reply_becomes_one_folded_field() -> None:
    report = RecipientReport(
        "bob@example.test",
        Action.FAILED,
        "5.7.1",
        remote_mta="mx1.example.test",
        diagnostic="550-5.7.1 Message rejected\r\n550-5.7.1 see https://example.test/why\n"
        "550 5.7.1 " + "policy " * 30,
    )
    dsn = build(recipients=[report])
    field = status_blocks(dsn)[1]["Diagnostic-Code"]
    assert field.startswith("smtp; 550-5.7.1 Message rejected 550-5.7.1 see https://")
    assert "\n" not in field


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"recipients": []}, "at least one"),
        ({"sender": ""}, "null sender"),
        ({"sender": "<>"}, "null sender"),
        ({"sender": "alice@sender.test\r\nBcc: x@evil.test"}, "header"),
        ({"recipients": [RecipientReport("b@example.test", Action.FAILED, "550")]}, "status"),
    ],
)
def test_malformed_input_raises(changes: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        build(**changes)


# --------------------------------------------------------------------------- NOTIFY


@pytest.mark.parametrize(
    ("sender", "notify", "action", "expected"),
    [
        ("alice@sender.test", None, "failed", True),
        ("alice@sender.test", None, "delayed", True),
        ("alice@sender.test", None, "delivered", False),
        ("alice@sender.test", None, "relayed", False),
        ("alice@sender.test", "", "failed", True),
        ("alice@sender.test", "NEVER", "failed", False),
        ("alice@sender.test", "NEVER", "delayed", False),
        ("alice@sender.test", "SUCCESS", "failed", False),
        ("alice@sender.test", "SUCCESS", "delivered", True),
        ("alice@sender.test", "SUCCESS", "relayed", True),
        ("alice@sender.test", "SUCCESS", "expanded", True),
        ("alice@sender.test", "FAILURE", "failed", True),
        ("alice@sender.test", "FAILURE", "delayed", False),
        ("alice@sender.test", "DELAY", "delayed", True),
        ("alice@sender.test", "DELAY", "failed", False),
        ("alice@sender.test", "success,failure,delay", "delayed", True),
        ("", None, "failed", False),
        ("<>", None, "failed", False),
        ("", "SUCCESS,FAILURE,DELAY", "failed", False),
    ],
)
def test_should_send_dsn(sender: str, notify: str | None, action: str, expected: bool) -> None:
    assert should_send_dsn(sender, notify, action) is expected


def test_xtext_decoding() -> None:
    assert decode_xtext("a+2Bb+3Dc") == "a+b=c"
    assert decode_xtext("caf+C3+A9") == "café"
    assert decode_xtext("plain") == "plain"
