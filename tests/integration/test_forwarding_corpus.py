"""Forwarding is byte-exact: CPython's email test corpus through backupmx to smtp-sink.

Every ``msg_*.txt`` of the running interpreter's ``test.test_email`` data is sent
through `backupmx serve` with smtplib (line endings made CRLF first, as SMTP
requires; smtplib dot-stuffs) to a static primary, Postfix's smtp-sink, which
is up from the start.  For each file (docs/queue.md#invariants, invariant 6):

* the stored body (``queue show --raw``) is our ``Received:`` field followed by
  the file exactly as sent (plus the CRLF that ends DATA's last line, if the file
  had none);
* what the primary got is the stored body byte for byte: dot-stuffing is
  transparent both ways.  smtp-sink dumps with LF line ends (`primary_sink`),
  so the stored CRLFs are compared as LF.

One server and one sink serve the whole module; each file is its own test case.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
import smtplib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.ports import free_port
from tests.support.primary_sink import SmtpSink
from tests.support.server import ServerProcess
from tests.support.smtp_client import queue_id, split_received, stored_in_parallel
from tests.support.waiting import wait_for

_EMAIL_TESTS = importlib.util.find_spec("test.test_email")  # not imported: only its data
assert _EMAIL_TESTS is not None and _EMAIL_TESTS.submodule_search_locations
CORPUS = Path(_EMAIL_TESTS.submodule_search_locations[0]) / "data"
FILES = sorted(p.name for p in CORPUS.glob("msg_*.txt"))
PRIMARY = "127.0.0.2"
SENDER = "corpus@sender.test"
DELIVERY_SECONDS = 60.0
_LINE_END = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True)
class Forwarded:
    sent: bytes  # what DATA carried, CRLF line ends, before dot-stuffing
    stored: bytes  # queue show --raw
    arrived: list[bytes]  # every copy smtp-sink dumped for this file's recipient


def as_sent(raw: bytes) -> bytes:
    """The file with CRLF line ends, ending in CRLF as every DATA line does."""
    data = _LINE_END.sub(b"\r\n", raw)
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def recipient_for(name: str) -> str:
    return f"{name.removesuffix('.txt').replace('_', '-')}@example.test"


@pytest.fixture(scope="module")
def forwarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Forwarded]]:
    port = free_port(PRIMARY)
    sink = SmtpSink(PRIMARY, port)  # started once everything is stored and held
    directory = tmp_path_factory.mktemp("corpus")
    server = ServerProcess(
        directory,
        domain=[{"name": "example.test", "primary": [f"{PRIMARY}:{port}"]}],
        delivery={"probe_interval": "1s", "retry_min": "1s", "retry_max": "5s"},
    )
    try:
        server.start()
        sent: dict[str, tuple[str, bytes]] = {}
        with smtplib.SMTP(server.host, server.port, timeout=20) as client:
            client.ehlo("corpus.sender.test")
            for name in FILES:
                data = as_sent((CORPUS / name).read_bytes())
                options = ["BODY=8BITMIME"] if any(b > 0x7F for b in data) else []
                assert client.mail(SENDER, options)[0] == 250
                assert client.rcpt(recipient_for(name))[0] == 250
                code, reply = client.data(data)
                assert code == 250, (name, reply)
                sent[name] = (queue_id(reply.decode()), data)
        # Read while held: a delivered message's body leaves the queue.
        stored = stored_in_parallel(server, [queue for queue, _ in sent.values()])
        sink.start()
        # A file that never arrives fails its own test case below, not the whole module.
        with contextlib.suppress(AssertionError):
            wait_for(lambda: sink.count() >= len(FILES), DELIVERY_SECONDS, "every file")
        arrived: dict[str, list[bytes]] = {}
        for dumped in sink.messages():
            for address in dumped.recipients:
                arrived.setdefault(address, []).append(dumped.content)
        yield {
            name: Forwarded(data, stored[queue], arrived.get(recipient_for(name), []))
            for name, (queue, data) in sent.items()
        }
    finally:
        server.stop(timeout=15)
        sink.close()


def test_the_corpus_is_there() -> None:
    assert len(FILES) >= 40, CORPUS


@pytest.mark.parametrize("name", FILES)
def test_message_is_stored_and_forwarded_byte_for_byte(
    forwarded: dict[str, Forwarded], name: str
) -> None:
    message = forwarded[name]
    received, body = split_received(message.stored)
    assert received.startswith(b"Received: from corpus.sender.test")
    assert body == message.sent
    assert len(message.arrived) == 1, f"{name} arrived {len(message.arrived)} times"
    assert message.arrived[0] == message.stored.replace(b"\r\n", b"\n")
