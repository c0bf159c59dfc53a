"""Lifecycle and operator contracts of a real `backupmx serve` and the `backupmx` CLI.

Signals (docs/contracts.md#signals-and-systemd): SIGTERM stops accepting, answers idle sessions
``421 4.3.2``, lets a session in DATA finish and store its message, and exits 0
within ``limits.drain_timeout``; SIGHUP reloads the configuration without
dropping open sessions, and refuses a broken file while keeping the old one.

CLI: ``config check`` exits 2 naming the bad key; ``queue`` verbs exit 1 naming
an unknown id; hold/release/delete move recipients between states; ``list
--domain`` and ``stats --json`` keep their fields; a database without a schema
says to run ``db upgrade``.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
from typing import Any

import pytest

from backupmx.queue.database import upgrade
from backupmx.queue.records import BytesBody, NewMessage, NewRecipient, new_queue_id
from backupmx.queue.store import Store
from tests.support.server import DOMAIN, ServerProcess
from tests.support.smtp_client import RawSession
from tests.support.waiting import logged, wait_for, wait_for_log

QUEUED = re.compile(r"2\.0\.0 Ok: queued as ([0-9A-F]+)")
OTHER = "example.org"


def open_session(server: ServerProcess) -> RawSession:
    session = RawSession(server)
    assert session.reply().startswith("220 ")
    assert session.command("EHLO client.test").startswith("250")
    return session


def send(server: ServerProcess, recipients: list[str], tag: str = "msg") -> str:
    """smtplib sends one message; returns its queue id."""
    with smtplib.SMTP(server.host, server.port, timeout=20) as client:
        client.ehlo("client.test")
        assert client.mail(f"{tag}@sender.test")[0] == 250
        for address in recipients:
            code, reply = client.rcpt(address)
            assert code == 250, f"RCPT {address}: {code} {reply!r}"
        code, reply = client.data(f"Subject: {tag}\r\n\r\nbody\r\n".encode())
    match = QUEUED.search(reply.decode())
    assert code == 250 and match, f"{code} {reply!r}"
    return match.group(1)


def settled_queue(server: ServerProcess, timeout: float = 10) -> list[dict[str, Any]]:
    """`queue list`, once no recipient is in the middle of a delivery attempt.

    The primary (127.0.0.1:9) refuses connections, so any attempt ends at once
    with the recipient queued again; admin verbs act on queued recipients.
    """

    def settled() -> tuple[list[dict[str, Any]]] | None:
        listed = server.queue()
        if all(r["state"] != "sending" for m in listed for r in m["recipients"]):
            return (listed,)
        return None

    (listed,) = wait_for(settled, timeout, "no recipient in state sending")
    return listed


# --------------------------------------------------------------------------- SIGTERM


def test_sigterm_answers_idle_421_lets_data_finish_and_exits_0(server_factory: Any) -> None:
    drain_timeout = 15.0
    server = server_factory(limits={"drain_timeout": f"{drain_timeout:g}s"}).start()
    idle = open_session(server)
    busy = open_session(server)
    try:
        assert busy.command("MAIL FROM:<drain@sender.test>").startswith("250")
        assert busy.command(f"RCPT TO:<drain@{DOMAIN}>").startswith("250")
        assert busy.command("DATA").startswith("354")
        busy.sock.sendall(b"Subject: drain\r\n\r\nfirst half of the body\r\n")
        time.sleep(0.3)

        server.signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert idle.reply().startswith("421 4.3.2")
        assert idle.closed_by_server()

        try:
            with socket.create_connection((server.host, server.port), timeout=5) as late:
                greeting = late.recv(512)
            assert greeting == b"" or greeting.startswith(b"421 4.3.2"), greeting
        except (ConnectionRefusedError, ConnectionResetError):
            # Reset: it reached the accept queue as the last receiver closed the socket.
            pass

        busy.sock.sendall(b"second half of the body\r\n.\r\n")
        final = busy.reply()
        match = QUEUED.search(final)
        assert match, f"the session in DATA got {final!r}"
        status = server.wait_for_exit(drain_timeout)
        assert status == 0
        assert time.monotonic() - signalled < drain_timeout
    finally:
        idle.close()
        busy.close()
    (message,) = server.queue()
    assert message["id"] == match.group(1)
    assert [r["address"] for r in message["recipients"]] == [f"drain@{DOMAIN}"]
    assert server.raw(message["id"]).endswith(
        b"Subject: drain\r\n\r\nfirst half of the body\r\nsecond half of the body\r\n"
    )


def test_sigterm_cuts_a_stuck_data_session_after_drain_timeout(server_factory: Any) -> None:
    server = server_factory(limits={"drain_timeout": "2s"}).start()
    stuck = open_session(server)
    try:
        assert stuck.command("MAIL FROM:<stuck@sender.test>").startswith("250")
        assert stuck.command(f"RCPT TO:<stuck@{DOMAIN}>").startswith("250")
        assert stuck.command("DATA").startswith("354")
        stuck.sock.sendall(b"Subject: stuck\r\n\r\nand then nothing more")
        time.sleep(0.3)
        server.signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert stuck.reply().startswith("421 4.3.2")
        assert stuck.closed_by_server()
        cut_after = time.monotonic() - signalled
        assert 1.5 < cut_after < 6, f"cut after {cut_after:.1f}s with drain_timeout 2s"
        assert server.wait_for_exit(10) == 0
    finally:
        stuck.close()
    assert server.queue() == []


@pytest.mark.parametrize("late", [signal.SIGHUP, signal.SIGTERM], ids=["SIGHUP", "SIGTERM"])
def test_a_signal_while_draining_does_not_kill_the_server(
    server_factory: Any, late: signal.Signals
) -> None:
    """logrotate's SIGHUP, or systemd repeating SIGTERM, must not cut the drain short."""
    server = server_factory(limits={"drain_timeout": "15s"}).start()
    busy = open_session(server)
    try:
        assert busy.command("MAIL FROM:<late@sender.test>").startswith("250")
        assert busy.command(f"RCPT TO:<late@{DOMAIN}>").startswith("250")
        assert busy.command("DATA").startswith("354")
        busy.sock.sendall(b"Subject: late signal\r\n\r\nfirst half\r\n")
        time.sleep(0.3)
        server.signal(signal.SIGTERM)
        wait_for_log(server, "stopping", 1)
        server.signal(late)
        time.sleep(0.5)
        assert server.process is not None
        assert server.process.poll() is None, f"{late.name} while draining killed the server"
        busy.sock.sendall(b"second half\r\n.\r\n")
        assert QUEUED.search(busy.reply())
        assert server.wait_for_exit(15) == 0
    finally:
        busy.close()
    assert len(server.queue()) == 1


# --------------------------------------------------------------------------- SIGHUP


def test_sighup_adds_a_domain_and_keeps_open_sessions(server: ServerProcess) -> None:
    session = open_session(server)
    try:
        assert session.command("MAIL FROM:<reload@sender.test>").startswith("250")
        assert session.command(f"RCPT TO:<before@{OTHER}>").startswith("550 5.7.1")

        server.settings["domain"].append({"name": OTHER, "primary": ["127.0.0.1:9"]})
        server.write_config()
        reloads = len(logged(server, "reloaded"))
        server.signal(signal.SIGHUP)
        wait_for_log(server, "reloaded", reloads + 1)

        assert session.command(f"RCPT TO:<after@{OTHER}>").startswith("250 2.1.5")
        assert session.command(f"RCPT TO:<after@{DOMAIN}>").startswith("250 2.1.5")
        assert session.command("DATA").startswith("354")
        session.sock.sendall(b"Subject: across a reload\r\n\r\nbody\r\n.\r\n")
        assert QUEUED.search(session.reply())
        assert session.command("QUIT").startswith("221")
    finally:
        session.close()
    assert server.process is not None and server.process.poll() is None
    send(server, [f"new@{OTHER}"], "new-session")
    by_sender = {m["sender"]: sorted(r["address"] for r in m["recipients"]) for m in server.queue()}
    assert by_sender == {
        "reload@sender.test": sorted([f"after@{OTHER}", f"after@{DOMAIN}"]),
        "new-session@sender.test": [f"new@{OTHER}"],
    }


def test_sighup_with_a_broken_config_keeps_the_old_one(server: ServerProcess) -> None:
    session = open_session(server)
    try:
        server.settings["domain"].append({"name": OTHER})
        server.settings["unknown_setting"] = 1
        server.write_config()
        refusals = len(logged(server, "reload_refused"))
        server.signal(signal.SIGHUP)
        refused = wait_for_log(server, "reload_refused", refusals + 1)
        assert "unknown_setting" in refused
        assert server.process is not None and server.process.poll() is None

        # The open session goes on, under the old configuration.
        assert session.command("MAIL FROM:<kept@sender.test>").startswith("250")
        assert session.command(f"RCPT TO:<x@{OTHER}>").startswith("550 5.7.1")
        assert session.command(f"RCPT TO:<x@{DOMAIN}>").startswith("250 2.1.5")
        assert session.command("QUIT").startswith("221")
    finally:
        session.close()
    send(server, [f"still@{DOMAIN}"], "after-refusal")
    with smtplib.SMTP(server.host, server.port, timeout=20) as client:
        client.ehlo("client.test")
        client.mail("probe@sender.test")
        assert client.rcpt(f"x@{OTHER}")[0] == 550
    assert len(logged(server, "reloaded")) == 0


# --------------------------------------------------------------------------- config check


BAD_CONFIGS: dict[str, tuple[dict[str, Any], str]] = {
    "unknown-top-level-key": ({"colour": "blue"}, "colour"),
    "unknown-limits-key": ({"limits": {"max_recipient": 5}}, "limits.max_recipient"),
    "unknown-domain-key": (
        {"domain": [{"name": DOMAIN, "primry": ["127.0.0.1:9"]}]},
        "domain[0].primry",
    ),
    "bad-size": ({"limits": {"max_message_size": "10XB"}}, "limits.max_message_size"),
    "bad-duration": ({"limits": {"command_timeout": "5 fortnights"}}, "limits.command_timeout"),
    "negative-duration": ({"limits": {"drain_timeout": "-3s"}}, "limits.drain_timeout"),
    "listen-without-port": ({"listen": ["127.0.0.1"]}, "listen[0]"),
    "listen-port-out-of-range": ({"listen": ["127.0.0.1:99999"]}, "listen[0]"),
    "listen-broken-ipv6": ({"listen": ["127.0.0.1:2525", "[::1:25"]}, "listen[1]"),
    "listen-bad-ipv6-address": ({"listen": ["[::g]:25"]}, "listen[0]"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_config_check_exits_2_naming_the_key(server_factory: Any, case: str) -> None:
    settings, key = BAD_CONFIGS[case]
    server = server_factory(**settings)
    server.write_config()
    result = server.cli("config", "check", check=False)
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert key in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_config_check_exits_0_for_a_good_file(server_factory: Any) -> None:
    server = server_factory(
        limits={"max_message_size": "20MiB", "command_timeout": "5m", "drain_timeout": "30s"},
        listen=["127.0.0.1:2525", "[::1]:2525"],
    )
    server.write_config()
    result = server.cli("config", "check", check=False)
    assert result.returncode == 0, result.stderr


def test_serve_refuses_to_start_with_a_broken_config(server_factory: Any) -> None:
    server = server_factory(limits={"max_message_size": "10XB"})
    server.write_config()
    result = subprocess.run(
        [sys.executable, "-m", "backupmx", "--config", str(server.config_path), "serve"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=server.directory,
    )
    assert result.returncode == 2
    assert "limits.max_message_size" in result.stderr


@pytest.mark.parametrize("where", ["after-serve", "before-serve"])
def test_serve_database_flag_before_or_after_the_verb_overrides_the_file(
    server_factory: Any, where: str
) -> None:
    server = server_factory()
    url = f"sqlite:///{server.directory / 'flag.db'}"
    serve = ["serve", "--database", url] if where == "after-serve" else ["--database", url, "serve"]
    server.start(*serve)
    queue_id = send(server, [f"flag@{DOMAIN}"])
    assert server.stop() == 0
    listed = json.loads(server.cli("--database", url, "queue", "list", "--json").stdout)
    assert [m["id"] for m in listed] == [queue_id]
    assert not (server.directory / "queue.db").exists(), "the file's database was used"


# --------------------------------------------------------------------------- queue verbs


@pytest.mark.parametrize(
    "args",
    [
        ("show", "NOPE"),
        ("show", "NOPE", "--raw"),
        ("hold", "NOPE"),
        ("release", "NOPE"),
        ("delete", "NOPE"),
    ],
    ids=lambda args: "-".join(args),
)
def test_queue_verbs_on_an_unknown_id_exit_1_naming_it(
    server: ServerProcess, args: tuple[str, ...]
) -> None:
    result = server.cli("queue", *args, check=False)
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "NOPE" in result.stderr
    assert "Traceback" not in result.stderr


def test_queue_hold_with_one_unknown_id_holds_the_known_one_and_names_the_other(
    server: ServerProcess,
) -> None:
    known = send(server, [f"a@{DOMAIN}"])
    settled_queue(server)
    result = server.cli("queue", "hold", known, "NOPE", check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == "backupmx: NOPE: no such message in the queue"
    (message,) = settled_queue(server)
    assert [r["state"] for r in message["recipients"]] == ["held"]


def test_queue_hold_release_delete(server: ServerProcess) -> None:
    first = send(server, [f"a@{DOMAIN}", f"b@{DOMAIN}"], "first")
    second = send(server, [f"c@{DOMAIN}"], "second")

    def states() -> dict[str, list[str]]:
        return {m["id"]: [r["state"] for r in m["recipients"]] for m in settled_queue(server)}

    assert states() == {first: ["queued", "queued"], second: ["queued"]}
    server.cli("queue", "hold", first)
    assert states() == {first: ["held", "held"], second: ["queued"]}
    shown = json.loads(server.cli("queue", "show", first, "--json").stdout)
    assert [r["state"] for r in shown["recipients"]] == ["held", "held"]

    server.cli("queue", "release", first)
    assert states() == {first: ["queued", "queued"], second: ["queued"]}

    server.cli("queue", "delete", first)
    assert states() == {second: ["queued"]}
    assert server.cli("queue", "show", first, check=False).returncode == 1


HOSTILE_HELO = "evil\x1b]0;owned\x07\r\nid         FORGED\x9b2J\x7f"
HOSTILE_SENDER = "a\x1b[2Jb@sender.test"
TERMINAL_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # all but TAB and LF


async def enqueue_hostile(url: str) -> str:
    """A message whose client-supplied fields carry terminal controls, stored directly."""
    store = Store.open(url)
    try:
        await upgrade(store.engine)
        await store.start()
        body = b"Subject: \x1b[31mred\x1b[0m\rforged\r\nReceived: x\r\n\tby y\r\n\r\nbody\r\n"
        message = NewMessage(
            id=new_queue_id(),
            sender=HOSTILE_SENDER,
            recipients=[NewRecipient(f"b@{DOMAIN}", DOMAIN)],
            body=BytesBody(body),
            client_ip="192.0.2.1",
            client_helo=HOSTILE_HELO,
            protocol="ESMTP",
            session_id="test",
        )
        await store.enqueue(message)
        return message.id
    finally:
        await store.close()


def test_queue_show_and_list_escape_terminal_controls_and_json_keeps_them(
    server_factory: Any,
) -> None:
    server = server_factory()
    server.write_config()
    queue_id = asyncio.run(enqueue_hostile(str(server.settings["database"])))

    shown = server.cli("queue", "show", queue_id).stdout
    listed = server.cli("queue", "list").stdout
    for output in (shown, listed):
        assert not TERMINAL_CONTROLS.search(output), repr(output)
        assert "a\\x1b[2Jb@sender.test" in output
    assert "evil\\x1b]0;owned\\x07\\x0d\\x0aid         FORGED\\x9b2J\\x7f" in shown
    assert "Subject: \\x1b[31mred\\x1b[0m\\x0dforged\n" in shown
    assert "\n\tby y\n" in shown  # a folded header keeps its TAB
    assert not [line for line in shown.splitlines() if line.startswith("id         FORGED")]

    faithful = json.loads(server.cli("queue", "show", queue_id, "--json").stdout)
    assert (faithful["sender"], faithful["client_helo"]) == (HOSTILE_SENDER, HOSTILE_HELO)


def test_queue_list_by_domain_and_stats(server_factory: Any) -> None:
    server = server_factory(
        domain=[
            {"name": DOMAIN, "primary": ["127.0.0.1:9"]},
            {"name": OTHER, "primary": ["127.0.0.1:9"]},
        ]
    ).start()
    ours = send(server, [f"a@{DOMAIN}", f"b@{DOMAIN}"], "ours")
    theirs = send(server, [f"c@{OTHER}"], "theirs")
    both = send(server, [f"d@{DOMAIN}", f"e@{OTHER}"], "both")

    def ids(*extra: str) -> set[str]:
        return {m["id"] for m in server.queue("--domain", *extra)}

    assert ids(DOMAIN) == {ours, both}
    assert ids(OTHER) == {theirs, both}
    assert ids(DOMAIN.upper()) == {ours, both}
    assert ids("nowhere.test") == set()
    listed = json.loads(server.cli("queue", "list", "--json", "--domain", OTHER).stdout)
    assert {m["id"] for m in listed} == {theirs, both}
    for message in listed:
        assert {"id", "sender", "size", "received_at", "recipients"} <= set(message)
        assert message["received_at"].endswith("Z")
        for recipient in message["recipients"]:
            assert {
                "address", "domain", "state", "attempts", "next_attempt_at", "last_error"
            } <= set(recipient)  # fmt: skip

    settled_queue(server)
    server.cli("queue", "hold", theirs)
    stats = json.loads(server.cli("queue", "stats", "--json").stdout)
    assert stats["messages"] == 3
    assert stats["recipients"]["queued"] == 4
    assert stats["recipients"]["held"] == 1
    assert set(stats["recipients"]) >= {"queued", "sending", "held", "delivered", "bounced"}
    per_domain = {d["domain"]: d["recipients"] for d in stats["domains"]}
    assert per_domain[DOMAIN]["queued"] == 3
    assert per_domain[OTHER] == {**per_domain[OTHER], "queued": 1, "held": 1}

    server.cli("queue", "delete", ours, theirs, both)
    stats = json.loads(server.cli("queue", "stats", "--json").stdout)
    assert stats["messages"] == 0
    assert sum(stats["recipients"].values()) == 0


@pytest.mark.parametrize("verb", ["list", "stats"])
def test_queue_on_a_database_never_migrated_says_run_db_upgrade(
    server_factory: Any, database_url: str, verb: str
) -> None:
    server = server_factory(database=database_url)
    server.write_config()
    result = server.cli("queue", verb, check=False)
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "db upgrade" in result.stderr
    assert "Traceback" not in result.stderr
    server.cli("db", "upgrade")
    assert server.cli("queue", verb).returncode == 0
