"""Recipient lists, pure: what a ``recipients = "list"`` file holds, and its re-reading
when the file changes (a file in a temporary directory, no server).

The verifier against a real store, and "list" and "verify" against a real
`backupmx serve`, are in tests/integration/test_recipients.py.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from backupmx.mail.address import Address
from backupmx.receive import recipients as recipients_module
from backupmx.receive.recipients import RecipientList, parse_list


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
