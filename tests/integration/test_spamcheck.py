"""The spam-check hook against real SpamAssassin spamd and real rspamd.

The filters are started by tests/support/spam_filters.py.

Specification (issue "Protect", docs/receiving.md#spam-hook): the check runs after DATA and
before the ``250``, on the message as it will be stored; ``reject`` answers
``550 5.7.1`` and queues nothing, ``defer`` ``451 4.7.1``, ``tag`` queues the
message with ``X-Spam-*`` headers, ``accept`` queues it as is; the verdict and
score are stored and shown by ``queue show``; a checker that is down or slow
gives ``on_error`` (default ``defer``).

The protocol parsers are tested on their own, on answers recorded from the
same spamd 4.0 and rspamd 3.4, in tests/unit/test_spamcheck.py.
"""

from __future__ import annotations

import json
import re
import smtplib
import socket
import statistics
import subprocess
import time
from collections.abc import Iterator
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest

from backupmx.config import SpamCheck
from backupmx.queue.records import BytesBody
from backupmx.receive.spamcheck import Facts, SpamChecker, command
from tests.support.server import DOMAIN, ServerProcess
from tests.support.smtp_client import queue_id, split_received
from tests.support.spam_filters import GTUBE, Rspamd, Spamd
from tests.support.waiting import wait_for

SENDER = "someone@sender.test"
HAM = (
    b"From: Someone <someone@sender.test>\r\nTo: <bob@example.test>\r\n"
    b"Subject: lunch on friday\r\nDate: " + formatdate().encode() + b"\r\n"
    # A current Date: a fixed one scores DATE_IN_PAST_* rules as the days go by.
    b"Message-ID: <lunch.1@sender.test>\r\n\r\nShall we meet at noon?\r\n"
)
SPAM = HAM.replace(b"Shall we meet at noon?", GTUBE)
FACTS = Facts("192.0.2.7", "client.test", SENDER, ["bob@example.test"], "ABC123", "mx2.test")


# --------------------------------------------------------------------------- command and timeout


async def test_command_backend_gets_the_message_on_stdin_and_the_envelope_in_its_environment() -> (
    None
):
    script = (
        'body=$(cat); echo "$BACKUPMX_SENDER $BACKUPMX_RECIPIENTS $BACKUPMX_CLIENT_IP ${#body}"'
    )
    scan = await command(b"12345", FACTS, ["sh", "-c", script + "; exit 1"])
    assert scan.verdict == f"{SENDER} bob@example.test 192.0.2.7".lower()
    assert scan.score == 5.0


async def test_checker_that_never_answers_gives_on_error_within_the_time_limit() -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # accepts into the backlog, never reads or answers
    try:
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        checker = SpamChecker()
        for on_error, label in (("defer", "defer"), ("accept", "error")):
            settings = SpamCheck(backend="spamd", address=address, timeout=0.5, on_error=on_error)  # type: ignore[arg-type]
            started = time.monotonic()
            verdict, _ = await checker.check(BytesBody(HAM), FACTS, settings)
            assert time.monotonic() - started < 2
            assert verdict.label == label
        assert checker.counts["error"] == 2
    finally:
        silent.close()


# --------------------------------------------------------------------------- real spamd


def send(server: ServerProcess, content: bytes, tag: str = "") -> tuple[int, str]:
    with smtplib.SMTP(server.host, server.port, timeout=60) as client:
        client.ehlo("client.sender.test")
        client.mail(SENDER)
        client.rcpt(f"bob{tag}@{DOMAIN}")
        code, reply = client.data(content)
    return code, reply.decode()


def show(server: ServerProcess, qid: str) -> dict[str, Any]:
    return dict(json.loads(server.cli("queue", "show", qid, "--json").stdout))


def spam_settings(address: str, **extra: Any) -> dict[str, Any]:
    return {"backend": "spamd", "address": address, **extra}


def test_spamd_gtube_is_rejected_550_at_smtp_time_and_nothing_is_queued(
    server_factory: Any, spamd: Spamd
) -> None:
    server = server_factory(spamcheck=spam_settings(spamd.address, **{"thresholds.reject": 15.0}))
    server.start()
    code, reply = send(server, SPAM)
    assert (code, reply[:5]) == (550, "5.7.1"), reply
    assert "spam" in reply
    assert server.queue() == []
    code, reply = send(server, HAM)
    assert code == 250, reply
    record = show(server, queue_id(reply))["spam"]
    assert record["verdict"] == "accept" and record["score"] < 5
    assert record["detail"].startswith("spamd: ham")
    shown = server.cli("queue", "show", queue_id(reply)).stdout
    assert re.search(r"^spam +accept score=-?\d+\.\d \(spamd: ham ", shown, re.MULTILINE), shown


def test_spamd_tag_mode_adds_x_spam_headers_after_our_received(
    server_factory: Any, spamd: Spamd
) -> None:
    server = server_factory(spamcheck=spam_settings(spamd.address))  # spam -> "tag" by default
    server.start()
    code, reply = send(server, SPAM)
    assert code == 250, reply
    qid = queue_id(reply)
    ours, rest = split_received(server.raw(qid))
    assert ours.startswith(b"Received: from client.sender.test")
    # GTUBE scores 1000; the other rules that fire depend on spamd's rule set.
    tags = re.match(
        rb"X-Spam-Flag: YES\r\nX-Spam-Score: (\d+\.\d)\r\nX-Spam-Level: \*{50}\r\n"
        rb"X-Spam-Status: Yes, score=(\d+\.\d) required=5\.0 tests=[^\r]*GTUBE",
        rest,
    )
    assert tags, rest[:300]
    assert tags[1] == tags[2] and float(tags[1]) > 990
    assert rest.endswith(SPAM)
    record = show(server, qid)["spam"]
    assert record["verdict"] == "tag" and record["score"] == float(tags[1])
    # Ham is not tagged.
    code, reply = send(server, HAM, "-ham")
    _, rest = split_received(server.raw(queue_id(reply)))
    assert not rest.startswith(b"X-Spam")


def test_spamc_as_command_backend_rejects_gtube(server_factory: Any, spamd: Spamd) -> None:
    argv = ["spamc", "-c", "-x", "-d", "127.0.0.1", "-p", str(spamd.port)]
    server = server_factory(
        spamcheck={"backend": "command", "command": argv, "actions.spam": "reject"}
    ).start()
    code, reply = send(server, SPAM)
    assert (code, reply[:5]) == (550, "5.7.1"), reply
    code, reply = send(server, HAM)
    assert code == 250, reply
    assert show(server, queue_id(reply))["spam"]["verdict"] == "accept"


@pytest.mark.parametrize("on_error", ["defer", "accept"])
def test_spamd_stopped_gives_on_error(server_factory: Any, tmp_path: Path, on_error: str) -> None:
    stopped = Spamd(tmp_path).start()
    address = stopped.address
    stopped.stop()  # nothing listens there now
    server = server_factory(spamcheck=spam_settings(address, on_error=on_error)).start()
    code, reply = send(server, HAM)
    if on_error == "defer":
        assert (code, reply[:5]) == (451, "4.7.1"), reply
        assert server.queue() == []
    else:
        assert code == 250, reply
        record = show(server, queue_id(reply))["spam"]
        assert record["verdict"] == "error" and "spamd:" in record["detail"]
    assert '"event": "spam_check_failed"' in server.log()


def test_spam_hook_overhead_and_throughput_with_spamd(server_factory: Any, spamd: Spamd) -> None:
    """Measured, printed and loosely bounded: median ms the hook adds per message, and
    smtp-source's accept throughput with the hook on and off (the figures of the note)."""
    off = server_factory().start()
    on = server_factory(spamcheck=spam_settings(spamd.address)).start()

    def data_latencies(server: ServerProcess, count: int) -> list[float]:
        found = []
        with smtplib.SMTP(server.host, server.port, timeout=60) as client:
            client.ehlo("client.sender.test")
            for n in range(count):
                client.mail(SENDER)
                client.rcpt(f"bob{n}@{DOMAIN}")
                started = time.perf_counter()
                code, _ = client.data(HAM)
                found.append((time.perf_counter() - started) * 1000)
                assert code == 250
        return found

    def smtp_source(server: ServerProcess, messages: int) -> float:
        started = time.monotonic()
        subprocess.run(
            ["/usr/sbin/smtp-source", "-s", "4", "-m", str(messages), "-c", "-l", "2048",
             "-f", SENDER, "-t", f"bob@{DOMAIN}", f"{server.host}:{server.port}"],
            check=True, capture_output=True, timeout=300,
        )  # fmt: skip
        return messages / (time.monotonic() - started)

    data_latencies(on, 3)  # warm spamd's children
    median_off = statistics.median(data_latencies(off, 30))
    median_on = statistics.median(data_latencies(on, 30))
    rate_off, rate_on = smtp_source(off, 200), smtp_source(on, 100)
    print(
        f"\nspam hook (spamd): median DATA-to-250 {median_off:.1f} ms off, {median_on:.1f} ms on"
        f" (+{median_on - median_off:.1f} ms); smtp-source 2 KiB messages, 4 sessions:"
        f" {rate_off:.0f} msg/s off, {rate_on:.0f} msg/s on"
    )
    assert median_on - median_off < 2000
    assert rate_on > 1


# --------------------------------------------------------------------------- real rspamd


@pytest.fixture(scope="module")
def rspamd() -> Iterator[Rspamd]:
    server = Rspamd()
    try:
        yield server.start()
    finally:
        server.close()


def test_rspamd_gtube_rejected_ham_accepted_and_envelope_passed(
    server_factory: Any, rspamd: Rspamd
) -> None:
    server = server_factory(spamcheck={"backend": "rspamd", "address": rspamd.address}).start()
    code, reply = send(server, SPAM)
    assert (code, reply[:5]) == (550, "5.7.1") and "Gtube pattern" in reply, reply
    assert server.queue() == []
    code, reply = send(server, HAM, "-ham")
    assert code == 250, reply
    qid = queue_id(reply)
    record = show(server, qid)["spam"]
    assert record["verdict"] == "accept" and record["detail"].startswith("rspamd: no action")
    # rspamd logs what it was told: our queue id, the client IP, sender and recipient.
    wait_for(
        lambda: f"qid: <{qid}>" in rspamd.log.read_text(errors="replace"),
        10,
        f"rspamd to log queue id {qid}",
    )
    line = next(x for x in rspamd.log.read_text().splitlines() if f"qid: <{qid}>" in x)
    assert "ip: 127.0.0.1" in line and f"from: <{SENDER}>" in line
    assert f"rcpts: <bob-ham@{DOMAIN}>" in line


def test_rspamd_defer_by_score_threshold(server_factory: Any, rspamd: Rspamd) -> None:
    server = server_factory(
        spamcheck={"backend": "rspamd", "address": rspamd.address, "thresholds.defer": -100.0}
    ).start()
    code, reply = send(server, HAM)
    assert (code, reply[:5]) == (451, "4.7.1"), reply
    assert server.queue() == []
