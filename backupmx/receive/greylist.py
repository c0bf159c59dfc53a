"""Greylisting by (client network, sender, recipient) triplet, kept in the queue database.

A backup MX without the primary's greylisting is the way around it (anchors.md),
so the backup can greylist too: the first delivery attempt of a triplet is
answered ``450 4.7.1``; a retry after ``greylist.delay`` (and within
``retry_window``) passes, and the triplet then stays passed for ``pass_ttl``
after it was last seen (postgrey's defaults).  The client is taken by its /24
(IPv4) or /64 (IPv6), because big senders retry from another address of the
same pool.

Clients in ``pass_clients`` (the primary, relays it trusts) are never
greylisted (`backupmx.receive.clients` skips them).  A database error lets the
recipient through (fail open: greylisting is a filter, not a reason to refuse
mail) and is logged.
"""

from __future__ import annotations

import ipaddress
from datetime import timedelta

import structlog

from backupmx.config import Greylist
from backupmx.mail import replies
from backupmx.queue.store import Store

log = structlog.get_logger("backupmx.receive")


def client_network(client_ip: str) -> str:
    """The greylisting key for a client: its /24, or its /64."""
    address = ipaddress.ip_address(client_ip)
    prefix = 24 if address.version == 4 else 64
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


async def check(
    store: Store,
    client_ip: str,
    sender: str,
    recipient: str,
    settings: Greylist,
) -> str | None:
    """The 450 refusal for a triplet still greylisted, or None to go on."""
    try:
        wait = await store.greylist(
            client_network(client_ip),
            sender.lower(),
            recipient.lower(),
            delay=timedelta(seconds=settings.delay),
            retry_window=timedelta(seconds=settings.retry_window),
            pass_ttl=timedelta(seconds=settings.pass_ttl),
        )
    except Exception as error:
        log.error("greylist_failed", error=str(error))
        return None
    if wait <= 0:
        return None
    log.info("greylisted", sender=sender, recipient=recipient, wait=round(wait))
    return replies.greylisted(recipient, max(1, round(wait)))
