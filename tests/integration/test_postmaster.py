"""Postmaster is always reachable (RFC 5321 §4.5.1, §4.1.1.3), against a real `backupmx serve`.

Specification (`backupmx.receive.session`, `backupmx.receive.clients`):

* ``postmaster@`` every backed-up domain (``.parent`` subdomains included), the
  local part in any case, is accepted whatever the domain's recipient rule: never
  unknown to a list, never waiting for a callout, never refused by a DNSBL,
  greylisted or counted as a harvest guess.  The per-IP recipient rate still
  applies, and the relay check too: postmaster at a domain we do not back up is
  ``550 5.7.1``.
* The bare ``RCPT TO:<Postmaster>`` (any case) is stored for the configured
  ``postmaster`` address, routed by that address's domain; ``MAIL FROM:<Postmaster>``
  stays a syntax error.
* Postmaster recipients get a transaction of their own: a RCPT of the other kind
  answers ``452 4.5.3``.  The spam hook (real spamd) tags a postmaster message but
  never refuses it, and cannot be bypassed by adding postmaster to a transaction.
"""

from __future__ import annotations

from collections.abc import Iterator
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest

from tests.support.dns_server import dns_zone
from tests.support.guarded import ZONE, GuardedServer
from tests.support.server import DOMAIN, ServerProcess
from tests.support.smtp_client import RawClient, queue_id, serving, split_received
from tests.support.spam_filters import GTUBE, Spamd

CONFIGURED = "hostmaster@list.test"  # not in the list file: <Postmaster> needs no entry
GREYLISTED = "127.0.0.1"  # every other client here is in greylist.pass_clients
CLEAN = "127.0.0.3"
DOWN = ["127.0.0.1:9"]  # nothing listens: no callout can answer
MESSAGE = b"Subject: to postmaster\r\n\r\nThe backup refused my mail.\r\n.\r\n"


@pytest.fixture(scope="module")
def mx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """example.test "any", list.test and .sub.test "list", verify.test "verify" (strict:
    `verify_unknown = "defer"`) with its primary down; greylisting on for 127.0.0.1 only;
    <Postmaster> is hostmaster@list.test."""
    directory = tmp_path_factory.mktemp("postmaster")
    listed = directory / "recipients.txt"
    listed.write_text("alice@list.test\n")
    by_list = {"recipients": "list", "recipient_list": str(listed)}
    server = ServerProcess(
        directory,
        domain=[
            {"name": DOMAIN, "primary": DOWN},
            {"name": "list.test", "primary": DOWN, **by_list},
            {"name": ".sub.test", "primary": DOWN, **by_list},
            # Strict: the test wants a stranger refused while the primary cannot be asked.
            {
                "name": "verify.test",
                "primary": DOWN,
                "recipients": "verify",
                "verify_unknown": "defer",
            },
        ],
        postmaster=CONFIGURED,
        greylist={"enabled": True, "delay": "1h", "pass_clients": ["127.0.0.2/31"]},
    )
    with serving(server):
        yield server


def rcpts(server: ServerProcess, *addresses: str, source: str = CLEAN) -> list[str]:
    """One transaction: EHLO, MAIL, a RCPT per address (given with its brackets); the replies."""
    with RawClient(server.host, server.port, source=source) as client:
        client.command("EHLO client.test")
        assert client.command("MAIL FROM:<someone@sender.test>").code == 250
        replies = [str(client.command(f"RCPT TO:{a}")) for a in addresses]
        client.command("QUIT")
    return replies


def recipients_of(server: ServerProcess, qid: str) -> list[tuple[str, str]]:
    (message,) = [m for m in server.queue() if m["id"] == qid]
    return [(r["address"], r["domain"]) for r in message["recipients"]]


@pytest.mark.parametrize(
    ("postmaster", "other", "refusal"),
    [
        (f"postmaster@{DOMAIN}", f"bob@{DOMAIN}", None),  # "any"
        ("PostMaster@list.test", "stranger@list.test", "550 5.1.1"),
        ('"postmaster"@list.test', "stranger@list.test", "550 5.1.1"),
        ("POSTMASTER@a.sub.test", "stranger@a.sub.test", "550 5.1.1"),
        ("postmaster@verify.test", "stranger@verify.test", "450 4.2.1"),  # primary down
    ],
)
def test_postmaster_is_accepted_at_every_backed_up_domain_whatever_its_recipient_rule(
    mx: ServerProcess, postmaster: str, other: str, refusal: str | None
) -> None:
    with RawClient(mx.host, mx.port, source=CLEAN) as client:
        client.command("EHLO client.test")
        final = client.transaction("someone@sender.test", [postmaster], MESSAGE)
    assert final.startswith("250 2.0.0"), final
    domain = postmaster.rpartition("@")[2].lower()
    assert recipients_of(mx, queue_id(final)) == [(postmaster, domain)]
    callouts = [x for x in mx.log().splitlines() if '"callout' in x]
    assert not [x for x in callouts if "postmaster@" in x.lower()], callouts
    if refusal is not None:  # the domain's rule holds for everyone else
        assert rcpts(mx, f"<{other}>")[0].startswith(refusal)


@pytest.mark.parametrize("bare", ["<Postmaster>", "<POSTMASTER>", "<postmaster> NOTIFY=NEVER"])
def test_bare_postmaster_in_any_case_is_stored_for_the_configured_address(
    mx: ServerProcess, bare: str
) -> None:
    with RawClient(mx.host, mx.port, source=CLEAN) as client:
        client.command("EHLO client.test")
        client.send(f"MAIL FROM:<someone@sender.test>\r\nRCPT TO:{bare}\r\nDATA\r\n".encode())
        replies = client.replies(3)
        assert [r.code for r in replies] == [250, 250, 354], replies
        client.send(MESSAGE)
        final = client.reply()
    assert final.startswith("250 2.0.0"), final
    assert recipients_of(mx, queue_id(final)) == [(CONFIGURED, "list.test")]


def test_postmaster_as_sender_without_a_domain_stays_a_syntax_error(mx: ServerProcess) -> None:
    with RawClient(mx.host, mx.port, source=CLEAN) as client:
        client.command("EHLO client.test")
        assert client.command("MAIL FROM:<Postmaster>").startswith("501 5.1.3")


def test_postmaster_at_a_domain_not_backed_up_is_relay_denied(mx: ServerProcess) -> None:
    replies = rcpts(
        mx, "<postmaster@other.test>", "<postmaster@sub.test>", "<postmaster@[127.0.0.1]>"
    )
    assert all(r.startswith("550 5.7.1 Relay access denied") for r in replies), replies


def test_postmaster_is_never_greylisted(mx: ServerProcess) -> None:
    first, second, third = rcpts(
        mx, f"<carol@{DOMAIN}>", f"<postmaster@{DOMAIN}>", "<Postmaster>", source=GREYLISTED
    )
    assert first.startswith("450 4.7.1") and "Greylisted" in first, first
    assert second.startswith("250 2.1.5") and third.startswith("250 2.1.5"), (second, third)


def test_postmaster_and_other_recipients_get_transactions_of_their_own(mx: ServerProcess) -> None:
    """So that no recipient can ride past the spam hook with postmaster (see the spamd test)."""
    assert rcpts(mx, f"<postmaster@{DOMAIN}>", f"<bob@{DOMAIN}>", "<Postmaster>") == [
        "250 2.1.5 Ok",
        "452 4.5.3 Error: too many recipients (postmaster gets a transaction of its own)",
        "250 2.1.5 Ok",
    ]
    with RawClient(mx.host, mx.port, source=CLEAN) as client:
        client.command("EHLO client.test")
        final = client.transaction(
            "someone@sender.test", [f"bob@{DOMAIN}", "Postmaster", "alice@list.test"], MESSAGE
        )
    assert final.startswith("250 2.0.0"), final
    assert recipients_of(mx, queue_id(final)) == [
        (f"bob@{DOMAIN}", DOMAIN),
        ("alice@list.test", "list.test"),
    ]
    replies = rcpts(mx, f"<bob@{DOMAIN}>", f"<Postmaster@{DOMAIN}>", f"<{CONFIGURED}>")
    assert [r[:9] for r in replies] == ["250 2.1.5", "452 4.5.3", "452 4.5.3"], replies


def test_a_harvester_cut_off_at_the_unknown_limit_can_still_reach_postmaster(
    mx: ServerProcess,
) -> None:
    guesses = [f"<guess{n}@list.test>" for n in range(5)]  # max_unknown_recipients
    replies = rcpts(mx, *guesses, "<postmaster@list.test>")
    assert [r[:9] for r in replies] == ["550 5.1.1"] * 5 + ["250 2.1.5"], replies


# --------------------------------------------------------------------------- DNSBL and rates


class ListedServer(GuardedServer):
    zones = (("dnsbl.test", 1.0),)


@pytest.fixture
def listed(tmp_path: Path) -> Iterator[ServerProcess]:
    """127.0.0.2 is on dnsbl.test; 3 recipients per minute per client."""
    with dns_zone(tmp_path, ZONE) as dns:
        server = ListedServer(
            tmp_path,
            dns={"nameservers": [dns.nameserver]},
            limits={"max_recipients_per_minute_per_ip": 3},
        )
        with serving(server):
            yield server


def test_postmaster_passes_a_dnsbl_listing_but_not_the_recipient_rate(
    listed: ServerProcess,
) -> None:
    replies = rcpts(
        listed, f"<bob@{DOMAIN}>", f"<postmaster@{DOMAIN}>", "<Postmaster>", "<Postmaster>",
        source="127.0.0.2",
    )  # fmt: skip
    assert replies[0].startswith("550 5.7.1 Service unavailable; client [127.0.0.2]"), replies
    assert [r[:9] for r in replies[1:]] == ["250 2.1.5", "250 2.1.5", "450 4.7.1"], replies


# --------------------------------------------------------------------------- spam hook


SPAM = (
    b"From: <someone@sender.test>\r\nTo: <postmaster@example.test>\r\nSubject: a report\r\n"
    b"Date: "
    + formatdate().encode()
    + b"\r\nMessage-ID: <report.1@sender.test>\r\n\r\n"
    + GTUBE
    + b"\r\n.\r\n"
)


def test_spamd_reject_is_waived_for_postmaster_who_gets_the_message_tagged(
    server_factory: Any, spamd: Spamd
) -> None:
    server = server_factory(
        spamcheck={"backend": "spamd", "address": spamd.address, "thresholds.reject": 15.0}
    ).start()

    def send(recipients: list[str]) -> str:
        with RawClient(server.host, server.port, timeout=60) as client:
            client.command("EHLO client.test")
            return str(client.transaction("someone@sender.test", recipients, SPAM))

    assert send([f"bob@{DOMAIN}"]).startswith("550 5.7.1 Message rejected as spam")
    with RawClient(server.host, server.port, timeout=60) as client:
        client.command("EHLO client.test")
        client.command("MAIL FROM:<someone@sender.test>")
        assert client.command(f"RCPT TO:<postmaster@{DOMAIN}>").code == 250
        assert client.command(f"RCPT TO:<bob@{DOMAIN}>").startswith("452 4.5.3")
    final = send([f"postmaster@{DOMAIN}"])
    assert final.startswith("250 2.0.0"), final
    qid = queue_id(final)
    assert recipients_of(server, qid) == [(f"postmaster@{DOMAIN}", DOMAIN)]
    _, rest = split_received(server.raw(qid))
    assert rest.startswith(b"X-Spam-Flag: YES\r\n"), rest[:200]
    shown = server.cli("queue", "show", qid, "--json").stdout
    assert '"verdict": "tag"' in shown and "reject waived: postmaster" in shown, shown
