"""New messages for tests that talk to the queue store directly."""

from __future__ import annotations

from backupmx.queue.records import NewMessage, NewRecipient, new_queue_id
from backupmx.receive.spool import Spool


def message(*addresses: str, body: bytes = b"Subject: t\r\n\r\nbody\r\n") -> NewMessage:
    """A message from s@sender.test to `addresses`, DSNs asked for on success and failure."""
    spool = Spool()
    spool.write(body)
    return NewMessage(
        id=new_queue_id(),
        sender="s@sender.test",
        recipients=[
            NewRecipient(a, a.rpartition("@")[2], "SUCCESS,FAILURE", f"rfc822;{a}")
            for a in addresses
        ],
        body=spool,
        client_ip="127.0.0.1",
        client_helo="client.test",
        protocol="ESMTP",
        session_id="t",
    )
