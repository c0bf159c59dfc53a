"""What an SMTP client sees: extensions, replies, parameters, limits and the stored message.

Every test talks to a real `backupmx serve` with a real client — smtplib, swaks,
or a raw socket where exact bytes or pipelining matter — and checks what was
stored through the real CLI (`queue list --json`, `queue show ID --raw`).

Most tests share one server (limits: 1 MiB messages, 3 recipients); tests that
need another configuration (STARTTLS, connection limits, IPv6) start their own.
Each test uses its own sender address, so it finds its own messages in the
shared queue.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import smtplib
import socket
import ssl
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import trustme

from tests.support.ports import free_port
from tests.support.server import DOMAIN, ServerProcess
from tests.support.smtp_client import RawClient, queue_id, serving, split_received, swaks
from tests.support.waiting import wait_for

MAX_SIZE = 1024 * 1024
MAX_RECIPIENTS = 3
ENHANCED = re.compile(r"^[245]\d\d [245]\.\d{1,3}\.\d{1,3}( |$)")


@pytest.fixture(scope="module")
def mx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    limits = {"max_message_size": "1MiB", "max_recipients": MAX_RECIPIENTS}
    with serving(ServerProcess(tmp_path_factory.mktemp("protocol"), limits=limits)) as server:
        yield server


def session(server: ServerProcess, helo: str = "client.test") -> RawClient:
    client = RawClient(server.host, server.port)
    assert client.greeting.startswith("220 mx2.backup.test"), client.greeting
    assert client.command(f"EHLO {helo}").code == 250
    return client


def stored_from(server: ServerProcess, sender: str) -> list[dict[str, Any]]:
    return [m for m in server.queue() if m["sender"] == sender]


def send_with_smtplib(
    client: smtplib.SMTP,
    sender: str,
    recipients: Sequence[str],
    body: bytes,
    mail_options: Sequence[str] = (),
    rcpt_options: Sequence[str] = (),
) -> str:
    """MAIL, RCPT, DATA through smtplib's own commands; the queue id from the final reply."""
    code, text = client.mail(sender, list(mail_options))
    assert code == 250, text
    for recipient in recipients:
        code, text = client.rcpt(recipient, list(rcpt_options))
        assert code == 250, text
    code, text = client.data(body)
    assert code == 250, text
    return queue_id(text.decode())


# ------------------------------------------------------------------ extensions


def test_ehlo_advertises_size_8bitmime_smtputf8_pipelining_enhancedstatuscodes_dsn(
    mx: ServerProcess,
) -> None:
    with RawClient(mx.host, mx.port) as client:
        ehlo = client.command("EHLO client.test")
    assert ehlo.lines[0] == "250-mx2.backup.test"
    for keyword in (f"SIZE {MAX_SIZE}", "8BITMIME", "SMTPUTF8", "PIPELINING"):
        assert keyword in ehlo.extensions, ehlo
    assert "ENHANCEDSTATUSCODES" in ehlo.extensions and "DSN" in ehlo.extensions, ehlo


def test_ehlo_never_offers_auth_and_offers_starttls_only_with_a_certificate(
    mx: ServerProcess,
) -> None:
    with session(mx) as client:
        ehlo = client.command("EHLO client.test")
        starttls = client.command("STARTTLS")
    assert not [e for e in ehlo.extensions if e.upper().startswith("AUTH")], ehlo
    assert "STARTTLS" not in ehlo.extensions, ehlo
    assert starttls.startswith("502 5.5."), starttls


def test_vrfy_and_expn_answer_252_and_reveal_nothing(mx: ServerProcess) -> None:
    """RFC 5321 §7.3: a site that disables VRFY and EXPN MUST answer 252, a code that
    passes for neither a verified nor an unknown address; the same reply whatever is asked."""
    with session(mx) as client:
        vrfy = [
            client.command("VRFY bob@example.test"),
            client.command("VRFY victim"),
            client.command("VRFY postmaster@example.test"),
            client.command("VRFY <Postmaster>"),
        ]
        expn = [client.command("EXPN staff"), client.command("EXPN postmaster")]
        bare = [client.command("VRFY"), client.command("EXPN")]
        assert client.command("NOOP").startswith("250 2.0.0"), "session goes on"
    assert {str(r) for r in vrfy} == {
        "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery"
    }, vrfy
    assert {str(r) for r in expn} == {
        "252 2.5.0 Cannot EXPN list, but will accept message and attempt delivery"
    }, expn
    assert [str(r)[:9] for r in bare] == ["501 5.5.4"] * 2, bare


def test_unknown_command_gets_502_5_5_2(mx: ServerProcess) -> None:
    with session(mx) as client:
        assert client.command("XYZZY plugh").startswith("502 5.5.2")
        assert client.command("NOOP").startswith("250 2.0.0"), "session goes on"


def test_every_reply_carries_an_enhanced_status_code(mx: ServerProcess) -> None:
    with RawClient(mx.host, mx.port) as client:
        early = client.command("MAIL FROM:<early@sender.test>")
        client.command("EHLO client.test")
        replies = {
            "MAIL before EHLO": early,
            "NOOP": client.command("NOOP"),
            "RCPT before MAIL": client.command("RCPT TO:<bob@example.test>"),
            "DATA before MAIL": client.command("DATA"),
            "MAIL": client.command("MAIL FROM:<codes@sender.test>"),
            "nested MAIL": client.command("MAIL FROM:<codes@sender.test>"),
            "RCPT": client.command("RCPT TO:<bob@example.test>"),
            "HELP": client.command("HELP"),
            "RSET": client.command("RSET"),
            "QUIT": client.command("QUIT"),
        }
    assert {name: str(r) for name, r in replies.items() if not ENHANCED.match(str(r))} == {}
    assert replies["MAIL before EHLO"].startswith("503 5.5.1")
    assert replies["RCPT before MAIL"].startswith("503 5.5.1")
    assert replies["DATA before MAIL"].startswith("503 5.5.1")
    assert replies["nested MAIL"].startswith("503 5.5.1")
    assert replies["NOOP"].startswith("250 2.0.0")
    assert replies["MAIL"].startswith("250 2.1.0")
    assert replies["RCPT"].startswith("250 2.1.5")
    assert replies["RSET"].startswith("250 2.0.0")
    assert replies["QUIT"].startswith("221 2.0.0")


def test_twentieth_error_closes_the_session_with_421_4_7_0(mx: ServerProcess) -> None:
    with session(mx) as client:
        client.send(b"XYZZY\r\n" * 25)
        replies = client.replies_until_closed()
    assert [str(r)[:9] for r in replies] == ["502 5.5.2"] * 20 + ["421 4.7.0"], replies


def test_too_many_recipients_replies_do_not_count_as_errors(mx: ServerProcess) -> None:
    with session(mx) as client:
        assert client.command("MAIL FROM:<patient@sender.test>").code == 250
        for i in range(MAX_RECIPIENTS):
            assert client.command(f"RCPT TO:<r{i}@example.test>").code == 250
        client.send(b"RCPT TO:<over@example.test>\r\n" * 25)
        replies = client.replies(25)
        assert {str(r)[:9] for r in replies} == {"452 4.5.3"}
        assert client.command("NOOP").startswith("250 2.0.0")


# ------------------------------------------------------------------ DSN parameters


def test_dsn_parameters_are_accepted_and_stored_with_their_case(mx: ServerProcess) -> None:
    sender = "dsn@sender.test"
    with smtplib.SMTP(mx.host, mx.port, timeout=10) as client:
        client.ehlo("client.test")
        code, _ = client.mail(sender, ["RET=hdrs", "ENVID=QQ314159.mixedCase"])
        assert code == 250
        code, _ = client.rcpt(
            "bob@example.test", ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;Bob@Example.test"]
        )
        assert code == 250
        code, _ = client.rcpt("carol@example.test")
        assert code == 250
        code, _ = client.data(b"Subject: dsn\r\n\r\nbody\r\n")
        assert code == 250
    (message,) = stored_from(mx, sender)
    assert (message["ret"], message["envid"]) == ("HDRS", "QQ314159.mixedCase")
    recipients = {r["address"]: (r["notify"], r["orcpt"]) for r in message["recipients"]}
    assert recipients == {
        "bob@example.test": ("SUCCESS,FAILURE", "rfc822;Bob@Example.test"),
        "carol@example.test": (None, None),
    }


MALFORMED_MAIL_PARAMETERS = [
    "RET=PARTIAL",
    "RET=",
    "RET",
    "RET=FULL RET=HDRS",
    "ENVID=",
    "ENVID=QQ+zz",
    "ENVID=QQ+2b",
    "ENVID=QQ=314159",
    "ENVID=" + "Q" * 101,
    "SIZE=big",
    "BODY=9BIT",
    "SMTPUTF8=yes",
]
MALFORMED_RCPT_PARAMETERS = [
    "NOTIFY=NEVER,SUCCESS",
    "NOTIFY=SOMETIMES",
    "NOTIFY=",
    "NOTIFY=SUCCESS,SUCCESS",
    "ORCPT=rfc822Bob@Example.test",
    "ORCPT=rfc822;",
    "ORCPT=;Bob@Example.test",
    "ORCPT=rfc822;Bob+zz@Example.test",
]


@pytest.mark.parametrize("parameters", MALFORMED_MAIL_PARAMETERS)
def test_malformed_mail_parameter_gets_501_5_5_4(mx: ServerProcess, parameters: str) -> None:
    with session(mx) as client:
        reply = client.command(f"MAIL FROM:<a@b.test> {parameters}")
    assert reply.startswith("501 5.5.4"), reply


@pytest.mark.parametrize("parameters", MALFORMED_RCPT_PARAMETERS)
def test_malformed_rcpt_parameter_gets_501_5_5_4(mx: ServerProcess, parameters: str) -> None:
    with session(mx) as client:
        assert client.command("MAIL FROM:<a@b.test>").code == 250
        reply = client.command(f"RCPT TO:<bob@example.test> {parameters}")
    assert reply.startswith("501 5.5.4"), reply


def test_envid_with_a_space_is_refused(mx: ServerProcess) -> None:
    # A literal space splits the value into a second, unknown keyword (RFC 5321
    # §4.1.2), so 555 is as right as 501; either way 5.5.4 and no transaction.
    with session(mx) as client:
        reply = client.command("MAIL FROM:<a@b.test> ENVID=QQ 314159")
        assert reply.startswith(("501 5.5.4", "555 5.5.4")), reply
        assert client.command("RCPT TO:<bob@example.test>").startswith("503 5.5.1")


def test_unknown_parameter_gets_555_5_5_4(mx: ServerProcess) -> None:
    with session(mx) as client:
        assert client.command("MAIL FROM:<a@b.test> FOO=bar").startswith("555 5.5.4")
        assert client.command("MAIL FROM:<a@b.test>").code == 250
        assert client.command("RCPT TO:<bob@example.test> FOO=bar").startswith("555 5.5.4")


# ------------------------------------------------------------------ size and count limits


def test_mail_size_over_the_limit_gets_552_5_3_4(mx: ServerProcess) -> None:
    with session(mx) as client:
        assert client.command(f"MAIL FROM:<a@b.test> SIZE={MAX_SIZE + 1}").startswith("552 5.3.4")
        assert client.command(f"MAIL FROM:<a@b.test> SIZE={MAX_SIZE}").startswith("250 2.1.0")


def test_data_over_the_size_limit_gets_552_after_the_final_dot_and_nothing_is_stored(
    mx: ServerProcess,
) -> None:
    sender = "toobig@sender.test"
    line = b"x" * 998 + b"\r\n"
    big = b"Subject: too big\r\n\r\n" + line * (MAX_SIZE // len(line) + 64)
    with session(mx) as client:
        client.send(f"MAIL FROM:<{sender}>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n".encode())
        assert [r.code for r in client.replies(3)] == [250, 250, 354]
        client.send(big)
        assert client.silent_for(0.3), "the 552 must wait for the client's final dot"
        client.send(b".\r\n")
        assert client.reply().startswith("552 5.3.4")
        small = client.transaction(
            sender, ["bob@example.test"], b"Subject: small\r\n\r\nok\r\n.\r\n"
        )
    assert small.startswith("250 2.0.0"), "the session goes on after 552"
    assert [m["id"] for m in stored_from(mx, sender)] == [queue_id(small)]


def test_excess_arriving_together_with_the_final_dot_still_gets_552(mx: ServerProcess) -> None:
    line = b"z" * 1022 + b"\r\n"
    with session(mx) as client:
        client.send(b"MAIL FROM:<excess@sender.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n")
        assert [r.code for r in client.replies(3)] == [250, 250, 354]
        client.send(b"Subject: just under\r\n\r\n" + line * (MAX_SIZE // len(line) - 4))
        assert client.silent_for(0.3)
        client.send(line * 16 + b".\r\n")  # 16 KiB more: over the limit, in one segment
        reply = client.reply()
    assert reply.startswith("552 5.3.4"), reply


def test_recipient_over_the_limit_gets_452_4_5_3_and_the_rest_are_kept(mx: ServerProcess) -> None:
    sender = "many@sender.test"
    recipients = [f"r{i}@example.test" for i in range(MAX_RECIPIENTS + 1)]
    with smtplib.SMTP(mx.host, mx.port, timeout=10) as client:
        refused = client.sendmail(sender, recipients, b"Subject: many\r\n\r\nbody\r\n")
    assert list(refused) == [recipients[-1]]
    code, text = refused[recipients[-1]]
    assert (code, text[:5]) == (452, b"4.5.3")
    (message,) = stored_from(mx, sender)
    assert [r["address"] for r in message["recipients"]] == recipients[:-1]


def test_recipients_differing_only_in_local_part_case_are_both_kept(mx: ServerProcess) -> None:
    # RFC 5321 §2.4: the local part MUST be treated as case-sensitive.
    sender = "case@sender.test"
    recipients = ["Bob@example.test", "bob@example.test", "bob@example.test"]
    with smtplib.SMTP(mx.host, mx.port, timeout=10) as client:
        assert client.sendmail(sender, recipients, b"Subject: case\r\n\r\nbody\r\n") == {}
    (message,) = stored_from(mx, sender)
    assert sorted(r["address"] for r in message["recipients"]) == recipients[:2]


def test_next_transaction_pipelined_after_the_final_dot_is_answered(mx: ServerProcess) -> None:
    envelope = b"MAIL FROM:<pipe@sender.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
    with session(mx) as client:
        client.send(envelope)
        assert [r.code for r in client.replies(3)] == [250, 250, 354]
        client.send(b"Subject: one\r\n\r\none\r\n.\r\n" + envelope)
        first = client.replies(4)
        client.send(b"Subject: two\r\n\r\ntwo\r\n.\r\nQUIT\r\n")
        second = client.replies_until_closed()
    assert [str(r)[:9] for r in first] == ["250 2.0.0", "250 2.1.0", "250 2.1.5", "354 End d"]
    assert [str(r)[:9] for r in second] == ["250 2.0.0", "221 2.0.0"], second
    assert queue_id(first[0]) != queue_id(second[0])


def received_hops(count: int) -> bytes:
    return b"".join(
        b"Received: from hop%d.test by hop%d.test; Tue, 1 Jul 2025 10:00:00 +0000\r\n" % (i, i + 1)
        for i in range(count)
    )


def test_replies_reach_a_client_that_sends_more_after_quit(mx: ServerProcess) -> None:
    """A socket closed with unread input answers it with a reset, which destroys replies
    the client has not read yet: after QUIT the server drops input until the client's
    end of file."""
    with socket.create_connection((mx.host, mx.port), timeout=10) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"220 ")
        # More than one read of the server's takes: input is left unread when it answers QUIT.
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            sock.sendall(b"NOOP\r\nQUIT\r\n" + b"NOOP\r\n" * 200_000)
        time.sleep(0.5)  # long enough for a reset to arrive
        assert reader.read() == b"250 2.0.0 Ok\r\n221 2.0.0 Bye\r\n"


def test_101_received_headers_get_554_5_4_6_and_100_are_accepted(mx: ServerProcess) -> None:
    sender = "loop@sender.test"
    body = b"Subject: loop?\r\n\r\nbody\r\n.\r\n"
    with session(mx) as client:
        looping = client.transaction(sender, ["bob@example.test"], received_hops(101) + body)
        hundred = client.transaction(sender, ["bob@example.test"], received_hops(100) + body)
    assert looping.startswith("554 5.4.6"), looping
    assert hundred.startswith("250 2.0.0"), hundred
    assert [m["id"] for m in stored_from(mx, sender)] == [queue_id(hundred)]


def test_101_received_headers_after_300_kib_of_other_headers_get_554_5_4_6(
    mx: ServerProcess,
) -> None:
    sender = "deep-loop@sender.test"
    filler = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"f" * 1000) for i in range(300))
    body = b"Subject: loop?\r\n\r\nbody\r\n.\r\n"
    with session(mx) as client:
        looping = client.transaction(
            sender, ["bob@example.test"], filler + received_hops(101) + body
        )
        hundred = client.transaction(
            sender, ["bob@example.test"], filler + received_hops(100) + body
        )
    assert looping.startswith("554 5.4.6"), looping
    assert hundred.startswith("250 2.0.0"), hundred
    assert [m["id"] for m in stored_from(mx, sender)] == [queue_id(hundred)]


# ------------------------------------------------------------------ the stored message


def test_stored_message_is_one_received_header_plus_the_body_byte_for_byte(
    mx: ServerProcess,
) -> None:
    sender = "exact@sender.test"
    body = (
        b"Received: from upstream.test by client.test; Tue, 1 Jul 2025 10:00:00 +0000\r\n"
        b"From: <exact@sender.test>\r\nTo: <bob@example.test>\r\nSubject: exact\r\n"
        b"\r\n line with leading space\r\n\ttab\r\ntrailing space \r\n\r\n\r\nlast\r\n"
    )
    with smtplib.SMTP(mx.host, mx.port, timeout=10) as client:
        client.ehlo("client.test")
        qid = send_with_smtplib(client, sender, ["bob@example.test"], body)
    stored = mx.raw(qid)
    header, rest = split_received(stored)
    assert rest == body
    assert header.startswith(b"Received: from client.test ([127.0.0.1])"), header
    assert b"by mx2.backup.test" in header and f"with ESMTP id {qid}".encode() in header, header
    (message,) = stored_from(mx, sender)
    assert message["sha256"] == hashlib.sha256(stored).hexdigest()
    assert message["size"] == len(stored)


def test_long_lines_are_stored_byte_for_byte(mx: ServerProcess) -> None:
    body = (
        b"Subject: long lines\r\n\r\n"
        + bytes(range(0x21, 0x7F)) * 109  # 10 KiB and more, all printable
        + b"\r\n"
        + b"y" * (64 * 1024)
        + b"\r\nshort\r\n"
    )
    with session(mx) as client:
        reply = client.transaction("long@sender.test", ["bob@example.test"], body + b".\r\n")
    assert reply.startswith("250 2.0.0"), reply
    _, stored = split_received(mx.raw(queue_id(reply)))
    assert stored == body


def test_8bitmime_body_is_stored_byte_for_byte(mx: ServerProcess) -> None:
    body = (
        b"Subject: 8bit\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n"
        + "Grüße aus Köln, 日本語, emoji 📬\r\n".encode()
        + bytes(range(0x80, 0x100))
        + b"\r\n"
        + bytes(b for b in range(1, 0x80) if b not in (0x0A, 0x0D))
        + b"\r\n"
    )
    with smtplib.SMTP(mx.host, mx.port, timeout=10) as client:
        client.ehlo("client.test")
        qid = send_with_smtplib(
            client, "8bit@sender.test", ["bob@example.test"], body, ["BODY=8BITMIME"]
        )
    _, stored = split_received(mx.raw(qid))
    assert stored == body


def test_utf8_addresses_need_smtputf8_and_are_received_with_utf8smtp(mx: ServerProcess) -> None:
    with session(mx) as client:
        assert client.command("MAIL FROM:<ålice@sender.test>".encode()).startswith("553 5.6.7")
        assert client.command("MAIL FROM:<alice@sender.test>").code == 250
        assert client.command("RCPT TO:<bøb@example.test>".encode()).startswith("553 5.6.7")
        assert client.command("RSET").code == 250
        reply = client.transaction(
            "ålice@sender.test",
            ["bøb@example.test"],
            "Subject: ütf8\r\n\r\nhej bøb\r\n.\r\n".encode(),
            mail_params=" SMTPUTF8",
        )
    assert reply.startswith("250 2.0.0"), reply
    header, _ = split_received(mx.raw(queue_id(reply)))
    assert f"with UTF8SMTP id {queue_id(reply)}".encode() in header, header


def test_helo_session_works_and_is_received_with_smtp(mx: ServerProcess) -> None:
    with smtplib.SMTP(mx.host, mx.port, timeout=10) as client:
        code, _ = client.helo("oldclient.test")
        assert code == 250
        code, _ = client.docmd("MAIL FROM:<old@sender.test> BODY=8BITMIME")
        assert code == 501, "no ESMTP parameters after HELO"
        qid = send_with_smtplib(
            client, "old@sender.test", ["bob@example.test"], b"Subject: old\r\n\r\nhi\r\n"
        )
    header, _ = split_received(mx.raw(qid))
    assert header.startswith(b"Received: from oldclient.test ([127.0.0.1])"), header
    assert f"with SMTP id {qid}".encode() in header, header


def test_null_sender_is_stored_as_empty_string(mx: ServerProcess) -> None:
    with smtplib.SMTP(mx.host, mx.port, timeout=10) as client:
        client.ehlo("bounce.test")
        qid = send_with_smtplib(client, "", ["bob@example.test"], b"Subject: DSN\r\n\r\nbounce\r\n")
    (message,) = [m for m in mx.queue() if m["id"] == qid]
    assert message["sender"] == ""


def test_swaks_with_pipelining_delivers(mx: ServerProcess) -> None:
    result = swaks(
        mx,
        "--pipeline",
        "--ehlo",
        "swaks.test",
        "--from",
        "swaks@sender.test",
        "--to",
        "bob@example.test,carol@example.test",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PIPELINING" in result.stdout and "queued as" in result.stdout, result.stdout
    (message,) = stored_from(mx, "swaks@sender.test")
    assert sorted(r["address"] for r in message["recipients"]) == [
        "bob@example.test",
        "carol@example.test",
    ]


# ------------------------------------------------------------------ STARTTLS


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_mx(tmp_path_factory: pytest.TempPathFactory, ca: trustme.CA) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("tls")
    cert = ca.issue_cert("mx2.backup.test", "127.0.0.1")
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key_path))
    tls = {"cert": str(cert_path), "key": str(key_path)}
    with serving(ServerProcess(directory, tls=tls)) as server:
        yield server


def test_starttls_then_ehlo_offers_neither_auth_nor_starttls(
    tls_mx: ServerProcess, ca: trustme.CA
) -> None:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with smtplib.SMTP(tls_mx.host, tls_mx.port, timeout=10) as client:
        client.ehlo("tls-client.test")
        assert client.has_extn("starttls")
        code, _ = client.starttls(context=context)
        assert code == 220
        code, text = client.ehlo("tls-client.test")
        assert code == 250
        offered = text.decode().upper().splitlines()
        assert not [e for e in offered if e.startswith(("AUTH", "STARTTLS"))], offered
        assert client.docmd("STARTTLS")[0] == 503
        qid = send_with_smtplib(
            client, "tls@sender.test", ["bob@example.test"], b"Subject: tls\r\n\r\nsecret\r\n"
        )
    header, _ = split_received(tls_mx.raw(qid))
    assert f"with ESMTPS id {qid}".encode() in header, header
    assert re.search(rb"TLSv1\.[23]", header), header


def test_commands_pipelined_after_starttls_in_plaintext_are_discarded(
    tls_mx: ServerProcess, ca: trustme.CA
) -> None:
    # CVE-2011-0411: plaintext sent with STARTTLS must not run inside the TLS session.
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with RawClient(tls_mx.host, tls_mx.port) as client:
        assert client.command("EHLO inject.test").code == 250
        client.send(b"STARTTLS\r\nMAIL FROM:<inject@sender.test>\r\nRCPT TO:<bob@example.test>\r\n")
        assert client.reply().startswith("220 2.0.0")
        client.start_tls(context, tls_mx.host)
        ehlo = client.command("EHLO inject.test")
        assert ehlo.lines[0] == "250-mx2.backup.test", ehlo
        assert client.command("RCPT TO:<bob@example.test>").startswith("503 5.5.1")


def test_swaks_with_tls_delivers(tls_mx: ServerProcess) -> None:
    result = swaks(
        tls_mx,
        "--tls",
        "--ehlo",
        "swaks.test",
        "--from",
        "swaks-tls@sender.test",
        "--to",
        "bob@example.test",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "queued as" in result.stdout, result.stdout
    (message,) = stored_from(tls_mx, "swaks-tls@sender.test")
    assert message["protocol"] == "ESMTPS"
    assert re.match(r"TLSv1\.[23] ", message["tls"] or ""), message["tls"]


# ------------------------------------------------------------------ connections


def admitted(server: ServerProcess, source: str) -> RawClient:
    """A session from `source`, allowing the server 2 s to count closed sessions out."""

    def greeted() -> RawClient | None:
        client = RawClient(server.host, server.port, source=source)
        if client.greeting.code == 220:
            return client
        client.close()
        return None

    return wait_for(greeted, 2, f"a 220 for a connection from {source}")


def assert_refused(server: ServerProcess, source: str) -> None:
    with RawClient(server.host, server.port, source=source) as client:
        assert client.greeting.startswith("421 4.7.0"), client.greeting
        assert client.replies_until_closed() == [], "the refused connection is closed"


# The fixture's readiness probe connects from 127.0.0.1, so these tests use other
# loopback addresses and their per-address counts start at zero.


def test_connection_over_the_per_ip_limit_gets_421_and_is_closed(server_factory: Any) -> None:
    server: ServerProcess = server_factory(limits={"max_connections_per_ip": 2}).start()
    first, second = admitted(server, "127.0.0.2"), admitted(server, "127.0.0.2")
    assert_refused(server, "127.0.0.2")
    other = admitted(server, "127.0.0.3")
    for client in (first, second, other):
        assert client.command("NOOP").startswith("250 2.0.0")
    first.command("QUIT")
    first.close()
    admitted(server, "127.0.0.2").close()
    second.close()
    other.close()


def test_connection_over_the_total_limit_gets_421_and_is_closed(server_factory: Any) -> None:
    server: ServerProcess = server_factory(limits={"max_connections": 2}).start()
    first, second = admitted(server, "127.0.0.2"), admitted(server, "127.0.0.3")
    assert_refused(server, "127.0.0.4")
    first.command("QUIT")
    first.close()
    admitted(server, "127.0.0.4").close()
    second.close()


def test_client_that_disconnects_without_quit_frees_its_connection_slot(
    server_factory: Any,
) -> None:
    server: ServerProcess = server_factory(limits={"max_connections_per_ip": 1}).start()
    with RawClient(server.host, server.port, source="127.0.0.2") as gone:
        assert gone.greeting.code == 220
        assert gone.command("EHLO gone.test").code == 250
    admitted(server, "127.0.0.2").close()


# ------------------------------------------------------------------ IPv6


@pytest.fixture(scope="module")
def dual_stack_mx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path_factory.mktemp("ipv6"))
    server.settings["listen"] = [f"{server.host}:{server.port}", f"[::1]:{free_port('::1')}"]
    with serving(server):
        yield server


def ipv6_port(server: ServerProcess) -> int:
    (listen,) = [a for a in server.settings["listen"] if a.startswith("[::1]")]
    return int(listen.rsplit(":", 1)[1])


def send_over_ipv6(server: ServerProcess, sender: str) -> str:
    with smtplib.SMTP("::1", ipv6_port(server), timeout=10) as client:
        client.ehlo("v6.client.test")
        return send_with_smtplib(client, sender, ["bob@example.test"], b"Subject: v6\r\n\r\nhi\r\n")


def test_mail_is_accepted_over_ipv6(dual_stack_mx: ServerProcess) -> None:
    qid = send_over_ipv6(dual_stack_mx, "v6@sender.test")
    (message,) = [m for m in dual_stack_mx.queue() if m["id"] == qid]
    assert message["client_ip"] == "::1"
    assert [r["domain"] for r in message["recipients"]] == [DOMAIN]


def test_received_header_writes_ipv6_client_as_rfc5321_address_literal(
    dual_stack_mx: ServerProcess,
) -> None:
    qid = send_over_ipv6(dual_stack_mx, "v6-literal@sender.test")
    header, _ = split_received(dual_stack_mx.raw(qid))
    # RFC 5321 §4.4 TCP-info is an address-literal: "[IPv6:::1]", not "[::1]".
    assert header.startswith(b"Received: from v6.client.test ([IPv6:::1])"), header
