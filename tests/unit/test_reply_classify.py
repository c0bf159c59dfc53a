"""What a primary's reply means for a recipient (mail/reply.py's `classify`), as data.

Replies are written as aiosmtplib hands them over: the code, and the text with
the lines of a multiline reply joined by "\\n" and undecodable bytes as lone
surrogates (``surrogateescape``).
"""

from __future__ import annotations

import pytest

from backupmx.mail.reply import Outcome, Verdict, bounced, classify, deferred


@pytest.mark.parametrize("code", [250, 251, 252, 200, 299])
def test_2xx_is_delivered(code: int) -> None:
    assert classify(code, "ok").verdict is Verdict.DELIVERED


@pytest.mark.parametrize("code", [421, 450, 451, 452, 499])
def test_4xx_is_deferred(code: int) -> None:
    assert classify(code, "try later").verdict is Verdict.DEFERRED


@pytest.mark.parametrize("code", [500, 550, 552, 554, 556, 599])
def test_5xx_bounces(code: int) -> None:
    assert classify(code, "no").verdict is Verdict.BOUNCED


def test_5xx_is_held_when_the_domain_holds_a_primary_just_back() -> None:
    assert classify(550, "5.1.1 unknown", hold_5xx=True).verdict is Verdict.HELD


@pytest.mark.parametrize(("code", "verdict"), [(250, Verdict.DELIVERED), (451, Verdict.DEFERRED)])
def test_holding_5xx_leaves_other_classes_alone(code: int, verdict: Verdict) -> None:
    assert classify(code, "text", hold_5xx=True).verdict is verdict


@pytest.mark.parametrize("code", [0, 1, 99, 199, 300, 354, 600, 999, -550])
def test_a_code_outside_2xx_and_5xx_is_deferred_never_lost_nor_bounced(code: int) -> None:
    outcome = classify(code, "odd")
    assert outcome.verdict is Verdict.DEFERRED
    assert outcome.status == "4.0.0"


def test_the_enhanced_code_of_the_reply_is_kept_for_the_dsn() -> None:
    assert classify(550, "5.1.1 <bob@example.test>: user unknown").status == "5.1.1"
    assert classify(452, "4.2.2 mailbox full").status == "4.2.2"
    assert classify(250, "2.1.5 ok").status == "2.1.5"
    assert classify(556, "5.1.10 null MX").status == "5.1.10"
    assert classify(550, "5.7.100 policy").status == "5.7.100"


@pytest.mark.parametrize(
    ("code", "status"), [(250, "2.0.0"), (451, "4.0.0"), (421, "4.0.0"), (554, "5.0.0")]
)
def test_without_an_enhanced_code_the_class_gives_the_status(code: int, status: str) -> None:
    assert classify(code, "no enhanced code here").status == status


def test_an_enhanced_code_of_another_class_than_the_reply_is_ignored() -> None:
    assert classify(550, "4.2.2 mailbox full").status == "5.0.0"
    assert classify(451, "2.0.0 fine").status == "4.0.0"


@pytest.mark.parametrize(
    "text",
    [
        "user 5.1.1 unknown",  # not at the start
        "5.1.1000 too many digits",
        "5.1.1user",  # no word boundary
        "5.1 short",
        "6.1.1 no such class",
    ],
)
def test_only_a_well_formed_leading_enhanced_code_counts(text: str) -> None:
    assert classify(550, text).status == "5.0.0"


def test_a_multiline_reply_becomes_one_line_with_the_first_lines_enhanced_code() -> None:
    outcome = classify(550, "5.7.1 rejected\nsee https://example.test/why\n  for details")
    assert outcome == Outcome(
        Verdict.BOUNCED, 550, "5.7.1", "5.7.1 rejected see https://example.test/why for details"
    )
    assert outcome.diagnostic == "550 5.7.1 rejected see https://example.test/why for details"


def test_leading_blanks_do_not_hide_the_enhanced_code() -> None:
    assert classify(550, "  \t5.1.1 unknown").status == "5.1.1"


def test_controls_nul_and_undecodable_bytes_do_not_reach_the_queue() -> None:
    outcome = classify(550, "5.1.1 bad\x00user\x1b[31m\x7f\x85 \udcff end\r\n")
    assert outcome.text == "5.1.1 bad user [31m \ufffd end"
    assert outcome.status == "5.1.1"


def test_an_empty_reply_text_still_classifies() -> None:
    outcome = classify(451, "")
    assert (outcome.verdict, outcome.status, outcome.text) == (Verdict.DEFERRED, "4.0.0", "")


def test_failures_without_a_reply_carry_no_code() -> None:
    assert deferred("connection refused") == Outcome(
        Verdict.DEFERRED, 0, "4.4.1", "connection refused"
    )
    assert deferred("timeout").diagnostic == "timeout"
    assert bounced("null MX", "5.1.10").diagnostic == "null MX"
    assert bounced("null MX", "5.1.10").verdict is Verdict.BOUNCED
