"""The queue intake process: received mail is committed by one child of `backupmx serve`,
for every receiver worker.

Its life is tied to the server's: it ignores the signals systemd sends to the whole
control group (the server decides when to stop), it leaves when the server is gone,
and the server starts a new one when it dies.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pytest

from backupmx.queue.database import upgrade
from backupmx.queue.intake import Intake, IntakeClient, IntakeError
from backupmx.queue.records import (
    BytesBody,
    NewMessage,
    NewRecipient,
    UnknownMessage,
    new_queue_id,
)
from backupmx.queue.store import Store
from tests.support.processes import alive, intakes
from tests.support.server import DOMAIN, ServerProcess
from tests.support.smtp_client import RawClient, queue_id
from tests.support.waiting import wait_for


def intake_pids(server: ServerProcess) -> list[int]:
    assert server.process is not None
    return intakes(server.process.pid)


def send(server: ServerProcess, tag: str) -> str:
    with RawClient(server.host, server.port) as client:
        assert client.command("EHLO intake.test").code == 250
        reply = client.transaction(
            f"{tag}@sender.test", [f"bob@{DOMAIN}"], f"Subject: {tag}\r\n\r\nbody\r\n.\r\n".encode()
        )
    assert reply.code == 250, reply
    return queue_id(reply)


def test_the_intake_ignores_sigterm_and_a_killed_intake_is_replaced(server: ServerProcess) -> None:
    (first,) = intake_pids(server)
    os.kill(first, signal.SIGTERM)  # systemd signals the whole control group
    time.sleep(0.5)
    assert alive(first)
    held = [send(server, "after-sigterm")]

    os.kill(first, signal.SIGKILL)
    wait_for(lambda: not alive(first), 10, "the killed intake to be gone", interval=0.05)
    time.sleep(1.1)  # a failing intake is restarted at most once a second
    held.append(send(server, "after-kill"))  # the next message starts a new intake
    (second,) = intake_pids(server)
    assert second != first
    assert {m["id"] for m in server.queue()} == set(held)
    assert server.stop() == 0
    assert not alive(second)


def test_the_intake_leaves_when_the_server_is_killed(server: ServerProcess) -> None:
    (intake,) = intake_pids(server)
    server.kill()
    wait_for(lambda: not alive(intake), 10, "the intake to leave after its server", interval=0.05)
    assert not alive(intake), "the intake outlived its server"


def new_message(session: str, sender: str) -> NewMessage:
    return NewMessage(
        id=new_queue_id(),
        sender=sender,
        recipients=[NewRecipient(f"bob@{DOMAIN}", DOMAIN)],
        body=BytesBody(b"Subject: intake\r\n\r\nbody\r\n"),
        client_ip="127.0.0.1",
        client_helo="intake.test",
        protocol="ESMTP",
        session_id=session,
    )


def logged(output: str, event: str) -> list[dict[str, object]]:
    return [e for line in output.splitlines() if event in line for e in [json.loads(line)]]


async def test_a_message_that_cannot_be_written_fails_alone_and_the_rest_of_its_batch_is_committed(
    database_url: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """The real intake process, given one batch of four where one message's sender holds a
    lone surrogate and a NUL (past the session's checks), which neither SQLite nor
    PostgreSQL can store: only that message fails, and the log names its session."""
    store = Store.open(database_url)  # not started: it only reads here
    await upgrade(store.engine)
    intake = Intake(database_url)
    await intake.start()
    client = IntakeClient(intake.address)
    try:
        await client.connect()
        (pid,) = intakes(os.getpid())
        good = [new_message(f"good-{n}", f"good{n}@sender.test") for n in range(3)]
        poison = new_message("poison-session", "b\udcffd\x00@sender.test")
        order = [good[0], poison, *good[1:]]
        os.kill(pid, signal.SIGSTOP)  # every frame waits in the socket: one batch
        try:
            commits = [asyncio.ensure_future(client.commit(m)) for m in order]
            await asyncio.sleep(0)  # each commit writes its frame, then waits
        finally:
            os.kill(pid, signal.SIGCONT)
        results = await asyncio.wait_for(asyncio.gather(*commits, return_exceptions=True), 30)
    finally:
        await client.close()
        await intake.close()

    assert [type(r) for r in results] == [type(None), IntakeError, type(None), type(None)]
    for message in good:
        assert (await store.message(message.id)).sender == message.sender
    with pytest.raises(UnknownMessage):
        await store.message(poison.id)
    await store.engine.dispose()
    output = capfd.readouterr().out
    assert [e["messages"] for e in logged(output, "batch_write_failed")] == [4]
    (failed,) = logged(output, "message_write_failed")
    assert (failed["session"], failed["queue_id"]) == ("poison-session", poison.id)
    accepted = {e["queue_id"] for e in logged(output, "message_accepted")}
    assert accepted == {m.id for m in good}
