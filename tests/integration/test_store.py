"""The queue store against both backends: SQLite and a real PostgreSQL at 127.0.0.1:5432.

The group-commit writer alone, without a database, is in tests/unit/test_group_commit.py.
"""

from __future__ import annotations

import asyncio
import base64
import os
from datetime import timedelta
from typing import Any

from sqlalchemy import MetaData, text, update

from backupmx.mail.reply import classify
from backupmx.queue.database import upgrade
from backupmx.queue.models import metadata, nodes
from backupmx.queue.nodes import NodeReport
from backupmx.queue.records import (
    Result,
    utcnow,
)
from backupmx.queue.selection import Selection
from backupmx.queue.state import Event, PrimaryState
from backupmx.queue.store import Store
from tests.support.queued import message


async def test_enqueue_commits_message_and_all_recipients(store: Store) -> None:
    m = message("a@example.test", "b@example.test", body=b"x" * 3_000_000 + b"\r\n")
    await store.enqueue(m)
    view = await store.message(m.id)
    assert [r.address for r in view.recipients] == ["a@example.test", "b@example.test"]
    assert {r.state for r in view.recipients} == {"queued"}
    assert view.recipients[0].orcpt == "rfc822;a@example.test"
    assert await store.body(m.id) == b"x" * 3_000_000 + b"\r\n"


async def test_concurrent_enqueues_all_land(store: Store) -> None:
    batch = [message(f"u{i}@example.test") for i in range(200)]
    await asyncio.gather(*(store.enqueue(m) for m in batch))
    assert (await store.stats()).messages == 200


async def test_claim_leases_each_recipient_once(store: Store, database_url: str) -> None:
    for i in range(30):
        await store.enqueue(message(f"u{i}@example.test"))
    other = Store.open(database_url)
    try:
        first, second = await asyncio.gather(
            store.claim("node-a", 20),
            other.claim("node-b", 20),
        )
    finally:
        await other.close()
    ids_a = {c.recipient_id for c in first}
    ids_b = {c.recipient_id for c in second}
    assert len(first) <= 20 and len(second) <= 20
    assert not ids_a & ids_b
    assert len(ids_a | ids_b) == 30
    assert all(c.attempts == 1 for c in first)
    assert await store.claim("node-c", 10) == []


async def test_results_apply_only_for_the_lease_owner(store: Store) -> None:
    await store.enqueue(message("a@example.test", "b@example.test", "c@example.test"))
    claims = await store.claim("node-a", 10)
    a, b, c = claims
    later = utcnow() + timedelta(minutes=10)
    assert await store.record("node-b", [Result(a.recipient_id, Event.SUCCESS)]) == 0
    changed = await store.record(
        "node-a",
        [
            Result(a.recipient_id, Event.SUCCESS),
            Result(b.recipient_id, Event.TEMPFAIL, "451 4.3.0 try later", later),
            Result(c.recipient_id, Event.PERMFAIL, "550 5.1.1 unknown"),
        ],
    )
    assert changed == 3
    view = await store.message(a.message_id)
    assert [r.state for r in view.recipients] == ["delivered", "queued", "bounced"]
    assert view.recipients[1].last_error == "451 4.3.0 try later"
    assert await store.claim("node-a", 10) == []  # b is not due yet
    assert len(await store.claim("node-a", 10, now=later)) == 1


def node(name: str) -> NodeReport:
    return NodeReport(name, "host", "test", "127.0.0.1:25", 1)


async def _last_seen(store: Store, name: str, ago: timedelta) -> None:
    async with store.engine.begin() as conn:
        await conn.execute(
            update(nodes).where(nodes.c.name == name).values(last_seen=utcnow() - ago)
        )


LEASE = timedelta(seconds=30)


async def test_a_dead_nodes_leases_are_taken_over_by_a_live_node(store: Store) -> None:
    await store.enqueue(message("a@example.test"))
    await store.register(node("node-a"))
    await store.register(node("node-b"))
    assert len(await store.claim("node-a", 10)) == 1
    # A node that is merely slow keeps its work: its heartbeat is fresh.
    await _last_seen(store, "node-a", timedelta(seconds=25))
    live = await store.heartbeat(node("node-b"), LEASE)
    assert live == ("node-a", "node-b")
    assert await store.take_over("node-b", live, LEASE) == {}
    await _last_seen(store, "node-a", timedelta(seconds=31))
    live = await store.heartbeat(node("node-b"), LEASE)
    assert live == ("node-b",)
    assert await store.take_over("node-b", live, LEASE) == {"node-a": 1}
    (claim,) = await store.claim("node-b", 10)
    assert claim.attempts == 2


async def test_a_heartbeat_written_since_the_live_nodes_were_read_keeps_the_work(
    store: Store,
) -> None:
    """The take-over looks again under the dead node's row lock."""
    await store.enqueue(message("a@example.test"))
    await store.register(node("node-a"))
    await store.claim("node-a", 10)
    assert await store.take_over("node-b", ("node-b",), LEASE) == {}


async def test_a_dead_node_stopped_inside_a_transaction_does_not_block_the_take_over(
    postgres_url: str,
) -> None:
    """SIGSTOP in the middle of a heartbeat leaves the node's row locked: the take-over
    waits a second for it, gives up for this round, and the heartbeat goes on."""
    store = Store.open(postgres_url)
    try:
        await upgrade(store.engine)
        await store.register(node("node-a"))
        await _last_seen(store, "node-a", timedelta(seconds=31))
        stopped = await store.engine.connect()
        transaction = await stopped.begin()
        await stopped.execute(text("SELECT 1 FROM nodes WHERE name = 'node-a' FOR UPDATE"))
        async with store.engine.begin() as conn:  # a sending row of node-a's
            await conn.execute(
                text(
                    "INSERT INTO messages (id, sender, size, sha256, received_at, client_ip,"
                    " client_helo, protocol, body_type, smtputf8, session_id)"
                    " VALUES ('m1', '', 1, '', now(), '127.0.0.1', 'h', 'ESMTP', '7BIT',"
                    " false, 's')"
                )
            )
            await conn.execute(
                text(
                    "INSERT INTO recipients (message_id, address, domain, state, attempts,"
                    " next_attempt_at, lease_owner, updated_at)"
                    " VALUES ('m1', 'a@example.test', 'example.test', 'sending', 1, now(),"
                    " 'node-a', now())"
                )
            )
        started = asyncio.get_running_loop().time()
        assert await store.take_over("node-b", ("node-b",), LEASE) == {}
        assert asyncio.get_running_loop().time() - started < 5
        await transaction.rollback()
        await stopped.close()
        assert await store.take_over("node-b", ("node-b",), LEASE) == {"node-a": 1}
    finally:
        await store.close()


async def test_a_stopped_node_counts_no_more_and_a_leaseholder_without_a_row_is_dead(
    store: Store,
) -> None:
    await store.enqueue(message("a@example.test"))
    await store.register(node("node-a"))
    await store.stopped("node-a")
    assert await store.live_nodes(LEASE) == ()
    assert len(await store.claim("unregistered", 10)) == 1
    await store.register(node("node-b"))
    live = await store.heartbeat(node("node-b"), LEASE)
    assert live == ("node-b",)
    assert await store.take_over("node-b", live, LEASE) == {"unregistered": 1}


async def test_own_leases_are_given_back(store: Store) -> None:
    await store.enqueue(message("a@example.test"))
    await store.claim("this-node", 10)
    assert await store.give_back_leases("other-node") == 0
    assert await store.give_back_leases("this-node") == 1


async def test_a_result_for_a_lost_claim_is_not_recorded(store: Store) -> None:
    """Fencing: the owner and the claim (attempts) must both still match."""
    m = message("a@example.test")
    await store.enqueue(m)
    (first,) = await store.claim("node-a", 10)
    await store.give_back_leases("node-a")  # node-a's fence fell
    assert len(await store.claim("node-b", 10)) == 1
    late = Result(first.recipient_id, Event.SUCCESS, claim_attempts=first.attempts)
    assert await store.record("node-a", [late]) == 0
    await store.give_back_leases("node-b")
    (third,) = await store.claim("node-a", 10)  # the same node, a later claim
    assert await store.record("node-a", [late]) == 0
    assert (await store.message(m.id)).recipients[0].state == "sending"
    done = Result(third.recipient_id, Event.SUCCESS, claim_attempts=third.attempts)
    assert await store.record("node-a", [done]) == 1
    assert (await store.message(m.id)).recipients[0].state == "delivered"


async def test_a_node_that_cannot_reach_the_primary_leaves_its_mail_to_one_that_can(
    store: Store,
) -> None:
    """One view of the primary: the shared state stays up while a live node reaches it."""
    await store.enqueue(message("a@example.test"))
    assert await store.set_domain_state("example.test", PrimaryState.UP, node="node-b")
    changed = await store.set_domain_state(
        "example.test", PrimaryState.DOWN, node="node-a", others=["node-b"]
    )
    assert not changed
    assert (await store.domain_states())["example.test"].state is PrimaryState.UP
    assert await store.claim("node-a", 10) == []
    assert len(await store.claim("node-b", 10)) == 1
    views = await store.primary_views(["node-a", "node-b"])
    assert views["example.test"] == {"node-a": PrimaryState.DOWN, "node-b": PrimaryState.UP}
    # The last live node that reaches it fails too: down for everyone.
    assert await store.set_domain_state(
        "example.test", PrimaryState.DOWN, node="node-b", others=["node-a"]
    )


async def test_hold_release_delete(store: Store) -> None:
    m = message("a@example.test")
    await store.enqueue(m)
    recipient_ids = [r.id for r in (await store.message(m.id)).recipients]
    assert (await store.hold(recipient_ids)).changed == 1
    assert await store.claim("n", 10) == []
    assert (await store.stats()).recipients["held"] == 1
    assert await store.release(recipient_ids) == 1
    deleted = await store.delete(recipient_ids)
    assert (deleted.changed, deleted.deleted) == (1, 1)  # its last recipient: the message goes
    assert await store.messages(include_final=True) == []
    assert await store.unknown([m.id, "NOPE"]) == [m.id, "NOPE"]


async def test_listing_filters_and_stats(store: Store) -> None:
    await store.enqueue(message("a@example.test"))
    done = message("b@example.org")
    await store.enqueue(done)
    claims = await store.claim("n", 10)
    org = next(c for c in claims if c.domain == "example.org")
    await store.record("n", [Result(org.recipient_id, Event.SUCCESS)])
    assert len(await store.messages()) == 1
    assert len(await store.messages(include_final=True)) == 2
    assert [m.recipients[0].domain for m in await store.messages(domain="example.test")] == [
        "example.test"
    ]
    stats = await store.stats()
    assert stats.messages == 1 and stats.recipients["delivered"] == 1
    assert [d.domain for d in stats.domains] == ["example.test"]
    assert stats.oldest is not None and stats.oldest.tzinfo is not None


async def test_message_pages_cover_the_listing_a_page_at_a_time(store: Store) -> None:
    sent = []
    for n in range(7):  # one at a time: queue ids (microseconds first) in this order
        sent.append(message(f"r{n}@example.test" if n % 3 else f"r{n}@example.org"))
        await store.enqueue(sent[-1])
    claims = await store.claim("n", 10)
    first = next(c for c in claims if c.message_id == sent[1].id)
    await store.record("n", [Result(first.recipient_id, Event.SUCCESS)])
    await store.give_back_leases("n")

    async def paged(**filters: Any) -> list[list[str]]:
        selection = Selection(**filters)
        return [[m.id for m in page] async for page in store.pages(selection, size=2)]

    ids = [m.id for m in sent]
    pending = [i for i in ids if i != sent[1].id]
    assert await paged() == [pending[0:2], pending[2:4], pending[4:6]]
    assert await paged(include_final=True) == [ids[0:2], ids[2:4], ids[4:6], ids[6:]]
    org = [sent[n].id for n in (0, 3, 6)]
    assert await paged(domain="example.org") == [org[0:2], org[2:]]
    assert [m.id for m in await store.messages()] == pending  # the same, oldest first


async def test_pending_ages_counts_messages_by_age_in_one_query(store: Store) -> None:
    now = utcnow()
    ages = [timedelta(seconds=1), timedelta(minutes=4), timedelta(hours=2), timedelta(days=9)]
    for age in ages:
        m = message("a@example.test", "b@example.test")  # two recipients, one message
        m.received_at = now - age
        await store.enqueue(m)
    delivered = message("c@example.org")
    await store.enqueue(delivered)
    claim = await store.claim("n", 10, now=now + timedelta(seconds=1))
    org = next(c for c in claim if c.domain == "example.org")
    await store.record("n", [Result(org.recipient_id, Event.SUCCESS)])  # no longer pending
    bounds = [timedelta(minutes=5), timedelta(hours=1), timedelta(days=1)]
    assert await store.pending_ages(bounds, now) == [2, 0, 1, 1]
    assert await store.pending_ages([], now) == [4]


async def test_migration_creates_the_models(store: Store) -> None:
    def reflect(connection: object) -> MetaData:
        reflected = MetaData()
        reflected.reflect(bind=connection)  # type: ignore[arg-type]
        return reflected

    async with store.engine.connect() as conn:
        reflected = await conn.run_sync(reflect)
    for table in metadata.sorted_tables:
        columns = {c.name for c in reflected.tables[table.name].columns}
        assert columns == {c.name for c in table.columns}
        assert {i.name for i in reflected.tables[table.name].indexes} == {
            i.name for i in table.indexes
        }


async def test_a_primarys_reply_with_nul_and_undecodable_bytes_is_recorded(store: Store) -> None:
    """aiosmtplib hands a reply over with ``surrogateescape``: the text that reaches the
    queue is one printable line, so the group commit of results never fails on it."""
    await store.enqueue(message("a@example.test", "b@example.test"))
    a, b = await store.claim("node-a", 10)
    refused = classify(550, "5.1.1 no\x00such \udcff\udcfe user\r\n\x1b[31m")
    deferred_too = classify(451, "4.3.0 busy\x00")
    changed = await store.record(
        "node-a",
        [
            Result(a.recipient_id, Event.PERMFAIL, refused.diagnostic),
            Result(b.recipient_id, Event.TEMPFAIL, deferred_too.diagnostic, utcnow()),
        ],
    )
    assert changed == 2
    view = await store.message(a.message_id)
    assert [r.last_error for r in view.recipients] == [
        "550 5.1.1 no such \ufffd\ufffd user [31m",
        "451 4.3.0 busy",
    ]
    assert refused.status == "5.1.1"


async def test_footprint_grows_with_the_queue_and_sees_free_space_only_beside_sqlite(
    store: Store,
) -> None:
    before = await store.footprint()
    body = base64.b64encode(os.urandom(1_500_000)) + b"\r\n"  # 2 MB that hardly compresses
    await store.enqueue(message("a@example.test", body=body))
    after = await store.footprint()
    assert after.database_bytes >= before.database_bytes + 1_000_000
    if store.dialect == "postgresql":
        assert after.free_bytes is None  # the database server's disk, not ours to see
        async with store.engine.connect() as conn:
            measured = await conn.scalar(text("SELECT pg_database_size(current_database())"))
        assert abs(measured - after.database_bytes) < 1024**2
    else:
        assert after.free_bytes is not None and after.free_bytes > 0
