"""The spam-check hook's pure parts, on answers recorded from spamd 4.0 and rspamd 3.4.

No filter and no server: the spamd and rspamd answer parsers, the rspamd request
(the envelope as headers, without line breaks), the command backend's output and
exit status, the table that turns a verdict and a score into an action (the
stricter wins), and the ``X-Spam-*`` headers of tag mode.  The hook against real
spamd and rspamd is in tests/integration/test_spamcheck.py.
"""

from __future__ import annotations

import pytest

from backupmx.config import SpamCheck
from backupmx.queue.records import BytesBody
from backupmx.receive.spamcheck import (
    CheckFailed,
    Facts,
    Scan,
    TaggedBody,
    decide,
    parse_command_output,
    parse_rspamd,
    parse_spamd,
    rspamd_request,
    spam_headers,
)

# Recorded from spamd 4.0.1 (SYMBOLS SPAMC/1.5) and rspamd 3.4 (POST /checkv2).
SPAMD_GTUBE = (
    b"SPAMD/1.1 0 EX_OK\r\nContent-length: 36\r\nSpam: True ; 1002.7 / 5.0\r\n\r\n"
    b"GTUBE,MISSING_DATE,NO_RECEIVED,NO_RELAYS"
)
RSPAMD_GTUBE_JSON = (
    b'{"is_skipped":true,"score":15.0,"required_score":15.0,"action":"reject",'
    b'"symbols":{"GTUBE":{"name":"GTUBE","score":0.0,"metric_score":0.0}},'
    b'"messages":{"smtp_message":"Gtube pattern"},"message-id":"undef","time_real":0.1}'
)
RSPAMD_GTUBE = (
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nServer: rspamd/3.4\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    % len(RSPAMD_GTUBE_JSON)
    + RSPAMD_GTUBE_JSON
)


def test_spamd_answer_gives_verdict_score_and_rules() -> None:
    scan = parse_spamd(SPAMD_GTUBE)
    assert scan == Scan("spam", 1002.7, 5.0, ("GTUBE", "MISSING_DATE", "NO_RECEIVED", "NO_RELAYS"))


def test_spamd_error_answer_is_a_failure_not_a_verdict() -> None:
    with pytest.raises(CheckFailed, match="76"):
        parse_spamd(b"SPAMD/1.0 76 Bad header line: (Content-Length mismatch)\r\n\r\n")
    with pytest.raises(CheckFailed):
        parse_spamd(b"HTTP/1.0 400 nonsense\r\n\r\n")


def test_rspamd_recorded_exchange_gives_action_score_and_reason() -> None:
    scan = parse_rspamd(RSPAMD_GTUBE)
    assert (scan.verdict, scan.score, scan.required) == ("reject", 15.0, 15.0)
    assert scan.rules == ("GTUBE",) and scan.message == "Gtube pattern"
    with pytest.raises(CheckFailed, match="500"):
        parse_rspamd(b"HTTP/1.1 500 Internal\r\nContent-Length: 0\r\n\r\n")


def test_rspamd_request_passes_the_envelope_as_headers_without_line_breaks() -> None:
    facts = Facts("192.0.2.7", "evil\r\nX: y", "", ["a@example.test", "b@example.test"], "Q1", "mx")
    request = rspamd_request(b"body", facts, "127.0.0.1:11333")
    head = request.split(b"\r\n\r\n")[0].decode()
    assert head.startswith("POST /checkv2 HTTP/1.1\r\n")
    assert "\r\nIP: 192.0.2.7\r\n" in head and "\r\nHelo: evil??X: y\r\n" in head
    assert "\r\nFrom: <>\r\n" in head and "\r\nQueue-Id: Q1\r\n" in head
    assert head.count("\r\nRcpt: ") == 2 and "\r\nContent-Length: 4" in head


@pytest.mark.parametrize(
    ("status", "output", "expected"),
    [
        (1, b"1002.7/5.0\n", Scan("spam", 1002.7, 5.0)),  # spamc -c
        (0, b"2.7/5.0\n", Scan("ham", 2.7, 5.0)),
        (0, b"soft reject 9\n", Scan("soft reject", 9.0, None)),
        (1, b"", Scan("spam")),
    ],
)
def test_command_output_and_exit_status_map_to_a_verdict(
    status: int, output: bytes, expected: Scan
) -> None:
    assert parse_command_output(status, output) == expected


def test_command_exit_status_other_than_0_or_1_is_an_error() -> None:
    with pytest.raises(CheckFailed):
        parse_command_output(69, b"0/0\n")  # spamc -x with spamd down


@pytest.mark.parametrize(
    ("verdict", "score", "thresholds", "expected"),
    [
        ("spam", 7.0, {}, "tag"),  # spamd's verdict, default table
        ("ham", 2.0, {}, "accept"),
        ("reject", 15.0, {}, "reject"),  # rspamd's own action
        ("soft reject", 9.0, {}, "defer"),
        ("ham", 16.0, {"reject": 15.0}, "reject"),  # a threshold makes it stricter
        ("reject", 1.0, {"tag": 0.0}, "reject"),  # … never more lenient
        ("spam", 7.0, {"defer": 6.0, "reject": 10.0}, "defer"),
    ],
)
def test_the_stricter_of_backend_verdict_and_score_threshold_wins(
    verdict: str, score: float, thresholds: dict[str, float], expected: str
) -> None:
    settings = SpamCheck(backend="spamd", address="127.0.0.1:783", thresholds=thresholds)  # type: ignore[arg-type]
    assert decide(Scan(verdict, score), settings) == expected


def test_tag_headers_follow_our_received_field_and_are_folded() -> None:
    rules = tuple(f"RULE_NUMBER_{n}" for n in range(30))
    headers = spam_headers(Scan("spam", 7.25, 5.0, rules), "spamd")
    assert headers.startswith(b"X-Spam-Flag: YES\r\nX-Spam-Score: 7.2\r\nX-Spam-Level: *******\r\n")
    assert all(len(line) <= 78 for line in headers.split(b"\r\n"))
    stored = b"Received: from x\r\n\tby y; date\r\nSubject: s\r\n\r\nbody\r\n"
    tagged = TaggedBody(BytesBody(stored), len(b"Received: from x\r\n\tby y; date\r\n"), headers)
    assert tagged.read() == stored.replace(b"Subject:", headers + b"Subject:")
    assert tagged.size == len(tagged.read())
