"""One client's input never makes another client's message fail: real `backupmx serve`, on
SQLite and on PostgreSQL.

Poison sessions send what the queue cannot keep byte for byte (invalid UTF-8, NUL,
control characters in HELO, in addresses, in parameters) and each hears its precise
5xx; then it tries to send a message anyway.  Clean sessions sending at the same
time get ``250`` for every message: nothing a poison session sent reaches the
intake's group commit, where it would fail the whole batch with them.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support.server import DOMAIN, ServerProcess
from tests.support.smtp_client import RawClient

CLEAN_SESSIONS = 3
CLEAN_MESSAGES = 15  # per clean session
POISON_ROUNDS = 8  # connections per poison kind, each refused, each trying a message
DEADLINE = 120.0  # seconds for all the sessions together


@dataclass(frozen=True)
class Poison:
    name: str
    setup: tuple[bytes, ...]  # commands answered 250 before the poison
    command: bytes
    reply: str  # the precise refusal


POISONS = [
    Poison(
        "helo-invalid-utf8",
        (),
        b"HELO \xff\xfe\xc3( bad-utf8",
        "501 5.5.4 Error: HELO argument contains invalid UTF-8",
    ),
    Poison(
        "ehlo-nul",
        (),
        b"EHLO evil\x00.test",
        "501 5.5.4 Error: EHLO argument contains a NUL character",
    ),
    Poison(
        "helo-control",
        (),
        b"HELO evil\x1b[2J.test",
        "501 5.5.4 Error: HELO argument contains a control character (U+001B)",
    ),
    Poison(
        "mail-invalid-utf8",
        (b"EHLO poison.test",),
        b"MAIL FROM:<b\xc3(ad@sender.test> SMTPUTF8",
        "501 5.1.3 Bad address syntax: contains invalid UTF-8",
    ),
    Poison(
        "rcpt-invalid-utf8",
        (b"EHLO poison.test", b"MAIL FROM:<ok@sender.test> SMTPUTF8"),
        b"RCPT TO:<b\xff\xfeob@" + DOMAIN.encode() + b">",
        "501 5.1.3 Bad address syntax: contains invalid UTF-8",
    ),
    Poison(
        "mail-nul",
        (b"EHLO poison.test",),
        b"MAIL FROM:<a\x00b@sender.test>",
        "501 5.1.3 Bad address syntax: contains a NUL character",
    ),
    Poison(
        "parameter-nul",
        (b"EHLO poison.test",),
        b"MAIL FROM:<ok@sender.test> ENVID=a\x00b",
        "501 5.5.4 Malformed parameter text: contains a NUL character",
    ),
]

# The transaction a poison session goes on with after its refusal: the commands that
# follow its setup and its poison (HELO is followed by all three, RCPT by DATA alone).
TRANSACTION = (
    b"MAIL FROM:<poison@sender.test>",
    b"RCPT TO:<bob@" + DOMAIN.encode() + b">",
    b"DATA",
)


def poison_session(server: ServerProcess, poison: Poison) -> list[str]:
    """One connection: the setup, the poison, then a message anyway; every reply heard."""
    heard: list[str] = []
    with RawClient(server.host, server.port) as client:
        for line in poison.setup:
            heard.append(str(client.command(line)))
        heard.append(str(client.command(poison.command)))
        rest = TRANSACTION[len(poison.setup) :]
        client.send(b"".join(line + b"\r\n" for line in rest))
        replies = client.replies(len(rest))
        heard += [str(r) for r in replies]
        if replies[-1].code == 354:
            heard.append(str(client.command(b"Subject: poison\r\n\r\nbody\r\n.")))
    return heard


def clean_session(server: ServerProcess, tag: str) -> list[int]:
    """One connection sending `CLEAN_MESSAGES` messages; the code of each final reply."""
    codes: list[int] = []
    with RawClient(server.host, server.port, timeout=30) as client:
        assert client.command("EHLO clean.test").code == 250
        for n in range(CLEAN_MESSAGES):
            content = f"Subject: {tag} {n}\r\n\r\nclean\r\n.\r\n".encode()
            codes.append(client.transaction(f"{tag}@sender.test", [f"bob@{DOMAIN}"], content).code)
    return codes


def run_threads(jobs: dict[str, Any]) -> dict[str, Any]:
    """Run each job in its own thread, all released at once; their results by name."""
    results: dict[str, Any] = {}
    start = threading.Barrier(len(jobs))

    def run(name: str, job: Any) -> None:
        start.wait(timeout=30)
        try:
            results[name] = job()
        except Exception as error:  # reported with the results, not lost in the thread
            results[name] = error

    threads = [threading.Thread(target=run, args=item) for item in jobs.items()]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + DEADLINE
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "sessions still running at the deadline"
    return results


def poison_rounds(server: ServerProcess, poison: Poison) -> list[list[str]]:
    return [poison_session(server, poison) for _ in range(POISON_ROUNDS)]


def test_poison_sessions_get_precise_5xx_and_clean_sessions_get_250_for_every_message(
    server_factory: Any, database_url: str
) -> None:
    server = server_factory(database=database_url).start()
    jobs: dict[str, Any] = {
        f"clean-{n}": lambda n=n: clean_session(server, f"clean{n}") for n in range(CLEAN_SESSIONS)
    }
    jobs |= {p.name: lambda p=p: poison_rounds(server, p) for p in POISONS}
    results = run_threads(jobs)

    clean = [results[f"clean-{n}"] for n in range(CLEAN_SESSIONS)]
    codes = [code for session in clean if isinstance(session, list) for code in session]
    assert codes.count(250) == CLEAN_SESSIONS * CLEAN_MESSAGES, (clean, server.log()[-3000:])
    for poison in POISONS:
        rounds = results[poison.name]
        assert isinstance(rounds, list), rounds
        for heard in rounds:
            setup, refusal = heard[: len(poison.setup)], heard[len(poison.setup)]
            after = heard[len(poison.setup) + 1 :]
            assert all(r.startswith("250") for r in setup), (poison.name, heard)
            assert refusal == poison.reply, (poison.name, heard)
            # What the session tried after its refusal queued nothing.
            assert not any(r.startswith(("250", "354")) for r in after), (poison.name, heard)
    assert "batch_write_failed" not in server.log()
    queued = server.queue()
    assert len(queued) == CLEAN_SESSIONS * CLEAN_MESSAGES
    assert all(m["sender"].startswith("clean") for m in queued)
    assert server.stop() == 0


@pytest.mark.parametrize(
    "line",
    [b"HELO \xff\xfe\xc3( bad-utf8", b"EHLO evil\x00.test", b"HELO evil\x1b[2J.test"],
)
def test_a_refused_helo_leaves_the_session_without_one(server: ServerProcess, line: bytes) -> None:
    with RawClient(server.host, server.port) as client:
        assert client.command(line).code == 501
        assert client.command("MAIL FROM:<a@sender.test>").startswith("503 5.5.1")
        assert client.command("EHLO after.test").code == 250
        assert client.command("MAIL FROM:<a@sender.test>").code == 250
