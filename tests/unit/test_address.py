"""Address parsing and the relay decision (docs/queue.md#invariants, invariant 5)."""

from __future__ import annotations

import pytest

from backupmx.mail.address import AddressError, RelayDomains, parse_path
from backupmx.receive.parameters import parse_mail_parameters, parse_rcpt_parameters

DOMAINS = RelayDomains(["example.test", ".example.org"])


def recipient(text: str, utf8: bool = False) -> str:
    address, _ = parse_path(text, allow_null=False, utf8=utf8)
    assert address is not None
    DOMAINS.check_recipient(address)
    return str(address)


@pytest.mark.parametrize(
    "text",
    [
        "<user@other.test>",
        "<user%other.test@example.test>",
        "<other.test!user@example.test>",
        '<"user@other.test"@example.test>',
        "<@example.test:user@other.test>",
        "<user@[127.0.0.1]>",
        "<user@example.test.other.test>",
        "<user@example.org>",
        "<user@notexample.test>",
    ],
)
def test_relay_is_refused(text: str) -> None:
    with pytest.raises(AddressError) as error:
        recipient(text)
    assert error.value.reply.startswith(("550 5.7.1", "501", "553"))


@pytest.mark.parametrize(
    ("text", "stored"),
    [
        ("<user@example.test>", "user@example.test"),
        ("<User@EXAMPLE.TEST>", "User@EXAMPLE.TEST"),
        ("<@relay.test,@other.test:user@example.test>", "user@example.test"),
        ("<user@a.example.org>", "user@a.example.org"),
        ('<"john smith"@example.test>', '"john smith"@example.test'),
        ("user@example.test", "user@example.test"),
    ],
)
def test_backed_up_domains_are_accepted(text: str, stored: str) -> None:
    assert recipient(text) == stored


def test_null_sender_and_params() -> None:
    address, rest = parse_path("<> SIZE=100", allow_null=True, utf8=False)
    assert address is None and rest == "SIZE=100"


def test_non_ascii_needs_smtputf8() -> None:
    with pytest.raises(AddressError) as error:
        recipient("<jörg@example.test>")
    assert error.value.reply.startswith("553 5.6.7")
    assert recipient("<jörg@example.test>", utf8=True) == "jörg@example.test"


def test_idn_domain_matches_its_a_label() -> None:
    domains = RelayDomains(["bücher.test"])
    address, _ = parse_path("<a@xn--bcher-kva.test>", allow_null=False, utf8=False)
    assert address is not None
    domains.check_recipient(address)


def test_dsn_values_keep_their_case() -> None:
    mail = parse_mail_parameters("RET=hdrs ENVID=QQ314159 BODY=8bitmime SIZE=10")
    assert (mail.ret, mail.envid, mail.body, mail.size) == ("HDRS", "QQ314159", "8BITMIME", 10)
    rcpt = parse_rcpt_parameters("notify=success,failure ORCPT=rfc822;Bob@Example.test")
    assert rcpt.notify == "SUCCESS,FAILURE" and rcpt.orcpt == "rfc822;Bob@Example.test"


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("RET=PARTIAL", "501 5.5.4"),
        ("ENVID=a+zz", "501 5.5.4"),
        ("FOO=bar", "555 5.5.4"),
        ("SIZE=x", "501 5.5.4"),
        ("RET=FULL RET=HDRS", "501 5.5.4"),
    ],
)
def test_bad_mail_parameters(text: str, code: str) -> None:
    with pytest.raises(AddressError) as error:
        parse_mail_parameters(text)
    assert error.value.reply.startswith(code)


@pytest.mark.parametrize(
    "text", ["NOTIFY=NEVER,SUCCESS", "NOTIFY=", "ORCPT=rfc822", "NOTIFY=SOMETIMES"]
)
def test_bad_rcpt_parameters(text: str) -> None:
    with pytest.raises(AddressError) as error:
        parse_rcpt_parameters(text)
    assert error.value.reply.startswith("501 5.5.4")


# Command lines are decoded with surrogateescape: b"\xff" arrives as "\udcff".
@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("<b\udcffob@example.test>", "invalid UTF-8"),
        ("<bob@ex\udcc3\udca8ample.test>", "invalid UTF-8"),
        ('<"b\x00ob"@example.test>', "a NUL character"),
        ("<bob\x00@example.test>", "a NUL character"),
        ("<b\tob@example.test>", "a control character (U+0009)"),
        ("<b\x85ob@example.test>", "a control character (U+0085)"),  # C1: valid UTF-8
    ],
)
def test_an_address_the_queue_cannot_keep_is_refused_naming_why(text: str, problem: str) -> None:
    for utf8 in (False, True):
        with pytest.raises(AddressError) as error:
            recipient(text, utf8=utf8)
        assert error.value.reply == f"501 5.1.3 Bad address syntax: contains {problem}"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("SIZE=10 ENVID=a\x00b", "a NUL character"),
        ("SIZE=10\x1fBODY=8BITMIME", "a control character (U+001F)"),
        ("ENVID=\udcff", "invalid UTF-8"),
    ],
)
def test_parameters_the_queue_cannot_keep_are_refused_naming_why(text: str, problem: str) -> None:
    for parse in (parse_mail_parameters, parse_rcpt_parameters):
        with pytest.raises(AddressError) as error:
            parse(text)
        assert error.value.reply == f"501 5.5.4 Malformed parameter text: contains {problem}"


def test_valid_utf8_stays_acceptable_under_smtputf8() -> None:
    assert recipient("<jörg.ñ@bücher.example.org>", utf8=True) == "jörg.ñ@bücher.example.org"
    with pytest.raises(AddressError) as error:  # a known keyword's value is still checked
        parse_mail_parameters("ENVID=jörg")
    assert error.value.reply == "501 5.5.4 Malformed ENVID parameter"
