"""Recipient validation: "list" files, "verify" callouts with their cache, harvest protection.

Specification (issue "Protect"): a backup must refuse at RCPT what the primary
would refuse, so that it never has to bounce later (backscatter).

* ``recipients = "list"``: unknown → ``550 5.1.1``; the file is re-read when it
  changes, without a SIGHUP.
* ``recipients = "verify"``: a callout to the primary (never DATA) fills a cache
  in the queue database; while the primary is down a cached positive is
  accepted, a cached negative refused ``550 5.1.1``, an unknown address answered
  ``450 4.2.1`` (or accepted with ``verify_unknown = "accept"``); entries expire
  after their TTL.  Tested against Postfix's ``smtp-sink`` as the primary: one
  that takes every recipient, one that refuses every RCPT (``-f RCPT``).
* Deliveries feed the same cache: delivered → known, 5.1.x bounce → unknown.
* After ``max_unknown_recipients`` unknown recipients the next RCPT waits
  ``harvest_delay`` and gets ``421 4.7.0``; the session is closed.

The verifier runs here against a real store (SQLite and PostgreSQL) with a fake
callout; the list file's parsing and re-reading are in tests/unit/test_recipients.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from backupmx.config import Recipients
from backupmx.mail.address import Address
from backupmx.mail.reply import CalloutAnswer
from backupmx.queue.records import NewMessage, NewRecipient, Result, new_queue_id, utcnow
from backupmx.queue.state import Event
from backupmx.queue.store import Store
from backupmx.receive.recipients import Status, Verifier
from backupmx.receive.spool import Spool
from tests.support.ports import free_port
from tests.support.primary_sink import SmtpSink
from tests.support.server import DOMAIN, ServerProcess
from tests.support.smtp_client import RawClient

# --------------------------------------------------------------------------- the verifier


class FakeCallout:
    """A primary that answers after `delay` seconds with `code` (no SMTP at all)."""

    def __init__(self, code: int, delay: float = 0.0) -> None:
        self.code = code
        self.delay = delay
        self.asked: list[str] = []

    async def __call__(self, domain: str, address: str) -> CalloutAnswer:
        self.asked.append(address)
        await asyncio.sleep(self.delay)
        return CalloutAnswer(self.code, f"{self.code} from the fake primary")


SETTINGS = Recipients(verify_wait=0.5, verify_timeout=5.0, verify_retry=60.0)


async def test_concurrent_sessions_asking_one_address_cost_one_callout(store: Store) -> None:
    callout = FakeCallout(250, delay=0.2)
    verifier = Verifier(store, callout)
    address = Address("alice", "example.test")
    results = await asyncio.gather(*(verifier.check(address, SETTINGS) for _ in range(20)))
    assert {r.status for r in results} == {Status.VALID} and callout.asked == ["alice@example.test"]
    assert (await verifier.check(address, SETTINGS)).status is Status.VALID  # from the cache
    assert callout.asked == ["alice@example.test"]


async def test_slow_callout_answers_450_now_and_fills_the_cache_for_the_retry(
    store: Store,
) -> None:
    callout = FakeCallout(550, delay=1.0)
    verifier = Verifier(store, callout)
    address = Address("ghost", "example.test")
    started = time.monotonic()
    assert (await verifier.check(address, SETTINGS)).status is Status.UNVERIFIED
    assert time.monotonic() - started < 0.8
    await asyncio.sleep(1.0)
    cached = await store.recipient_verdict("ghost@example.test")
    assert cached is not None and not cached.valid and cached.source == "callout"
    assert (await verifier.check(address, SETTINGS)).status is Status.UNKNOWN
    assert len(callout.asked) == 1


async def test_unreachable_primary_gets_no_callouts_for_verify_retry(store: Store) -> None:
    callout = FakeCallout(0)
    verifier = Verifier(store, callout)
    answers = [await verifier.check(Address(n, "example.test"), SETTINGS) for n in "abc"]
    assert [a.status for a in answers] == [Status.UNVERIFIED] * 3
    assert answers[0].reason == "callout: 0 from the fake primary"
    assert answers[1].reason == "the primary did not answer a callout within verify_retry"
    assert callout.asked == ["a@example.test"]
    assert await store.recipient_verdict("a@example.test") is None  # a tempfail is not cached


async def test_deliveries_feed_the_cache_only_with_mailbox_verdicts(store: Store) -> None:
    since = utcnow() - timedelta(seconds=1)
    spool = Spool()
    spool.write(b"Subject: t\r\n\r\nbody\r\n")
    addresses = ["Known@example.test", "gone@example.test", "big@example.test"]
    message = NewMessage(
        id=new_queue_id(),
        sender="s@sender.test",
        recipients=[NewRecipient(a, "example.test") for a in addresses],
        body=spool,
        client_ip="127.0.0.1",
        client_helo="client.test",
        protocol="ESMTP",
        session_id="t",
    )
    await store.enqueue(message)
    claims = {c.address: c for c in await store.claim("me", 10)}
    await store.record(
        "me",
        [
            Result(claims["Known@example.test"].recipient_id, Event.SUCCESS),
            Result(claims["gone@example.test"].recipient_id, Event.PERMFAIL, "550 5.1.1 no user"),
            Result(claims["big@example.test"].recipient_id, Event.PERMFAIL, "552 5.3.4 too big"),
        ],
    )
    learned = await store.learn_recipients(since, timedelta(days=31), timedelta(days=3))
    assert learned == 2
    known = await store.recipient_verdict("Known@example.test")
    gone = await store.recipient_verdict("gone@example.test")
    assert known is not None and known.valid and known.source == "delivery"
    assert gone is not None and not gone.valid and gone.reply == "550 5.1.1 no user"
    assert await store.recipient_verdict("big@example.test") is None
    assert known.expires_at - known.checked_at == timedelta(days=31)


# --------------------------------------------------------------------------- real servers


def rcpt(server: ServerProcess, *addresses: str, source: str = "127.0.0.1") -> list[str]:
    """One session: EHLO, MAIL, a RCPT per address; the RCPT replies (no DATA)."""
    with RawClient(server.host, server.port, timeout=30, source=source) as client:
        client.command("EHLO client.sender.test")
        assert client.command("MAIL FROM:<someone@sender.test>").code == 250
        replies = [str(client.command(f"RCPT TO:<{a}>")) for a in addresses]
        client.command("QUIT")
    return replies


def events(server: ServerProcess) -> list[dict[str, Any]]:
    """The JSON events of the server's log."""
    found = []
    for line in server.log().splitlines():
        if line.startswith("{"):
            found.append(json.loads(line))
    return found


@pytest.fixture
def listed_mx(server_factory: Any, tmp_path: Path) -> Iterator[tuple[ServerProcess, Path]]:
    path = tmp_path / "recipients.txt"
    path.write_text("alice@example.test\n@sales.test\n")
    server = server_factory(
        domain=[
            {
                "name": DOMAIN,
                "primary": ["127.0.0.1:9"],
                "recipients": "list",
                "recipient_list": str(path),
            },
            {
                "name": "sales.test",
                "primary": ["127.0.0.1:9"],
                "recipients": "list",
                "recipient_list": str(path),
            },
        ],
        recipients={"harvest_delay": "1s"},
    ).start()
    yield server, path


def test_list_mode_refuses_unknown_recipients_550_and_follows_file_changes(
    listed_mx: tuple[ServerProcess, Path],
) -> None:
    server, path = listed_mx
    replies = rcpt(server, f"alice@{DOMAIN}", "anyone@sales.test", f"mallory@{DOMAIN}")
    assert replies[0].startswith("250 2.1.5") and replies[1].startswith("250 2.1.5")
    assert replies[2].startswith(f"550 5.1.1 <mallory@{DOMAIN}>"), replies
    path.write_text("alice@example.test\nmallory@example.test\n")
    os.utime(path, (time.time() + 5, time.time() + 5))
    time.sleep(1.1)  # the file is looked at at most once a second
    assert rcpt(server, f"mallory@{DOMAIN}")[0].startswith("250 2.1.5")


def test_harvest_after_five_unknown_recipients_is_delayed_and_closed_421(
    listed_mx: tuple[ServerProcess, Path],
) -> None:
    server, _ = listed_mx
    with RawClient(server.host, server.port, timeout=30) as client:
        client.command("EHLO harvester.test")
        client.command("MAIL FROM:<harvester@sender.test>")
        for n in range(5):
            assert client.command(f"RCPT TO:<guess{n}@{DOMAIN}>").startswith("550 5.1.1")
        started = time.monotonic()
        final = client.command(f"RCPT TO:<alice@{DOMAIN}>")
        assert time.monotonic() - started >= 0.9
        assert final.startswith("421 4.7.0"), final
        assert client.replies_until_closed() == []
    # Another session is not punished for this one.
    assert rcpt(server, f"alice@{DOMAIN}")[0].startswith("250")


def test_a_thousand_pipelined_unknown_recipients_end_in_421_and_others_are_served(
    listed_mx: tuple[ServerProcess, Path],
) -> None:
    """The hostile-client battery's harvester: 1000 guesses in one write."""
    server, _ = listed_mx
    with RawClient(server.host, server.port, timeout=30) as client:
        client.command("EHLO harvester.test")
        guesses = "".join(f"RCPT TO:<guess{n}@{DOMAIN}>\r\n" for n in range(1000))
        client.send(f"MAIL FROM:<harvester@sender.test>\r\n{guesses}".encode())
        started = time.monotonic()
        assert rcpt(server, f"alice@{DOMAIN}")[0].startswith("250")  # served meanwhile
        assert time.monotonic() - started < 1.0
        replies = client.replies_until_closed(limit=20)
    assert replies[0].code == 250
    assert [r.code for r in replies[1:]] == [550] * 5 + [421], replies
    assert '"event": "harvest_suspected"' in server.log()


def test_config_check_warns_that_recipients_any_invites_backscatter(server: ServerProcess) -> None:
    checked = server.cli("config", "check")
    assert 'warning: domain[0] (example.test): recipients = "any"' in checked.stdout
    assert "backscatter" in checked.stdout


@pytest.fixture
def sinks() -> Iterator[tuple[SmtpSink, SmtpSink]]:
    """Two smtp-sink primaries: one takes every recipient, one refuses every RCPT (5xx)."""
    taking = SmtpSink("127.0.0.2", free_port("127.0.0.2")).start()
    refusing = SmtpSink("127.0.0.2", free_port("127.0.0.2"), "-f", "RCPT").start()
    yield taking, refusing
    taking.close()
    refusing.close()


def test_verify_mode_callouts_fill_the_cache_which_answers_while_the_primary_is_down(
    server_factory: Any, sinks: tuple[SmtpSink, SmtpSink]
) -> None:
    taking, refusing = sinks
    strict = {"recipients": "verify", "verify_unknown": "defer"}
    server = server_factory(
        domain=[
            {"name": DOMAIN, "primary": [f"127.0.0.2:{taking.port}"], **strict},
            {"name": "refusing.test", "primary": [f"127.0.0.2:{refusing.port}"], **strict},
            # The default verify_unknown; nothing listens on port 9.
            {"name": "lenient.test", "primary": ["127.0.0.2:9"], "recipients": "verify"},
        ],
        recipients={"verify_positive_ttl": "8s", "verify_negative_ttl": "8s"},
    ).start()
    filled = time.monotonic()
    alice, bob = rcpt(server, f"alice@{DOMAIN}", "bob@refusing.test")
    assert alice.startswith("250 2.1.5"), alice
    assert bob.startswith("550 5.1.1 <bob@refusing.test>"), bob
    assert taking.count() == 0  # a callout never sends DATA

    taking.stop()
    refusing.stop()
    alice, bob, carol, dave = rcpt(
        server, f"alice@{DOMAIN}", "bob@refusing.test", f"carol@{DOMAIN}", "dave@lenient.test"
    )
    assert time.monotonic() - filled < 8, "the cache expired before the check"
    assert alice.startswith("250 2.1.5"), alice  # cached positive
    assert bob.startswith("550 5.1.1"), bob  # cached negative
    assert carol.startswith(f"450 4.2.1 <carol@{DOMAIN}>"), carol  # never seen, primary down
    assert dave.startswith("250 2.1.5"), dave  # verify_unknown = "accept", the default
    unverified = [e for e in events(server) if e["event"] == "recipient_unverified"]
    answers = {e["recipient"]: e["answer"] for e in unverified}
    assert answers == {f"carol@{DOMAIN}": "deferred", "dave@lenient.test": "accepted"}
    assert all(e["reason"] for e in unverified), unverified

    time.sleep(max(0.0, 8.5 - (time.monotonic() - filled)))
    alice, bob = rcpt(server, f"alice@{DOMAIN}", "bob@refusing.test")
    assert alice.startswith("450 4.2.1"), alice  # the positive entry expired
    assert bob.startswith("450 4.2.1"), bob
    assert '"event": "callout"' in server.log()
