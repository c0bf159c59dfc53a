"""Recipient lists, pure: what a ``recipients = "list"`` file holds, and its re-reading
when the file changes (a file in a temporary directory, no server); the bounds
on what the verifier remembers, with a stand-in cache and callout; and what an
address the primary cannot confirm gets (``verify_unknown``).

The verifier against a real store, and "list" and "verify" against a real
`backupmx serve`, are in tests/integration/test_recipients.py.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import structlog

from backupmx import metrics
from backupmx.config import Domain, Recipients
from backupmx.mail.address import Address
from backupmx.mail.reply import CalloutAnswer
from backupmx.queue.records import RecipientVerdict
from backupmx.receive import recipients as recipients_module
from backupmx.receive.recipients import (
    RecipientList,
    RecipientPolicy,
    Status,
    Verifier,
    check_recipient,
    parse_list,
)


def test_list_file_holds_addresses_and_catch_all_domains() -> None:
    addresses, domains = parse_list(
        [
            "# the sales team",
            "Alice@Example.TEST",
            '"john.smith"@example.test   # quoted',
            "@sub.example.test",
            "",
            "not an address",
            "bob@bad..domain",
        ]
    )
    assert addresses == {"alice@example.test", "john.smith@example.test"}
    assert domains == {"sub.example.test"}


def test_list_is_reread_when_its_mtime_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recipients_module, "LIST_STAT_INTERVAL", 0.0)
    path = tmp_path / "list.txt"
    path.write_text("alice@example.test\n")
    listed = RecipientList(str(path))
    assert listed.knows(Address("ALICE", "example.test"))
    assert not listed.knows(Address("bob", "example.test"))
    path.write_text("bob@example.test\n")
    os.utime(path, (time.time() + 5, time.time() + 5))
    assert listed.knows(Address("bob", "example.test"))
    path.unlink()  # a vanished file keeps the last good contents
    assert listed.knows(Address("bob", "example.test"))


# --------------------------------------------------------------------------- verifier bounds


class Cache:
    """The verification cache as the store keeps it, in a dict."""

    def __init__(self) -> None:
        self.verdicts: dict[str, RecipientVerdict] = {}

    async def recipient_verdict(self, address: str) -> RecipientVerdict | None:
        return self.verdicts.get(address)

    async def remember_recipients(self, verdicts: Sequence[RecipientVerdict]) -> None:
        self.verdicts.update((v.address, v) for v in verdicts)


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the callouts never finished")


async def test_callouts_waiting_for_a_slot_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recipients_module, "MAX_PENDING_CALLOUTS", 3)
    primary_answers = asyncio.Event()
    asked: list[str] = []

    async def callout(domain: str, address: str) -> CalloutAnswer:
        asked.append(address)
        await primary_answers.wait()
        return CalloutAnswer(250, "2.1.5 Ok")

    cache = Cache()
    verifier = Verifier(cache, callout)  # type: ignore[arg-type]
    settings = Recipients(verify_wait=0.01, max_callouts=1)
    for i in range(5):
        assert (
            await verifier.check(Address(f"u{i}", "example.com"), settings)
        ).status is Status.UNVERIFIED
    primary_answers.set()
    await until(lambda: len(cache.verdicts) == 3)
    # Three were started (one talking, two waiting for its slot); the others got none.
    assert asked == ["u0@example.com", "u1@example.com", "u2@example.com"]
    assert (await verifier.check(Address("u1", "example.com"), settings)).status is Status.VALID
    # With the callouts done there is room again.
    assert (await verifier.check(Address("u4", "example.com"), settings)).status is Status.VALID
    assert asked[-1] == "u4@example.com"


async def test_silent_domains_remembered_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a ``.parent`` entry every subdomain may be a domain whose primary is silent."""
    monkeypatch.setattr(recipients_module, "MAX_QUIET_DOMAINS", 2)
    asked: list[str] = []

    async def callout(domain: str, address: str) -> CalloutAnswer:
        asked.append(domain)
        return CalloutAnswer(0, "connection refused")

    verifier = Verifier(Cache(), callout)  # type: ignore[arg-type]
    settings = Recipients(verify_retry=3600.0)
    for name in ("a.example.org", "b.example.org", "c.example.org"):
        assert (await verifier.check(Address("u", name), settings)).status is Status.UNVERIFIED
    assert asked == ["a.example.org", "b.example.org", "c.example.org"]
    # c is still quiet; a, the oldest, was forgotten: it gets a callout again.
    await verifier.check(Address("v", "c.example.org"), settings)
    await verifier.check(Address("v", "a.example.org"), settings)
    assert asked[3:] == ["a.example.org"]


@pytest.mark.parametrize(
    ("verify_unknown", "status", "answer"),
    [
        ("accept", Status.VALID, "accepted"),  # the default: Exim's defer_ok
        ("defer", Status.UNVERIFIED, "deferred"),
    ],
)
async def test_an_address_the_primary_cannot_confirm_gets_verify_unknown(
    verify_unknown: str, status: Status, answer: str
) -> None:
    async def refused(domain: str, address: str) -> CalloutAnswer:
        return CalloutAnswer(0, "127.0.0.2:25: connection refused")

    domain = Domain("example.com", recipients="verify", verify_unknown=verify_unknown)  # type: ignore[arg-type]
    policy = RecipientPolicy([domain])
    verifier = Verifier(Cache(), refused)  # type: ignore[arg-type]
    before = unverified_count(answer)
    with structlog.testing.capture_logs() as events:
        found = await check_recipient(Address("new", "example.com"), policy, verifier)
    assert found is status
    (event,) = [e for e in events if e["event"] == "recipient_unverified"]
    assert event["reason"] == "callout: 127.0.0.2:25: connection refused"
    assert event["answer"] == answer
    assert unverified_count(answer) == before + 1


def test_verify_unknown_defaults_to_accept() -> None:
    assert Domain("example.com").verify_unknown == "accept"
    assert RecipientPolicy().rule("example.com").verify_unknown == "accept"


def unverified_count(answer: str) -> float:
    """The counter's value (``other``: no domain labels are configured here)."""
    value = metrics.REGISTRY.get_sample_value(
        "backupmx_recipients_unverified_total", {"domain": metrics.OTHER, "answer": answer}
    )
    return value or 0.0
