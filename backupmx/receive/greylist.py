"""Greylisting by (client network, sender, recipient) triplet, kept in the queue database.

A backup MX without the primary's greylisting is the way around it (see
docs/receiving.md#why-a-backup-checks-so-much),
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
from dataclasses import replace
from datetime import datetime, timedelta
from functools import partial

import structlog

from backupmx.config import Greylist
from backupmx.mail import replies
from backupmx.queue.records import GreylistEntry, Triplet, utcnow
from backupmx.queue.store import Store

log = structlog.get_logger("backupmx.receive")

# A passed triplet's last_seen is rewritten at most this often, so that mail from
# a known sender does not cost a write per recipient.  A constant, not a setting:
# it only has to be small beside pass_ttl (35 days by postgrey's default), where
# ten minutes more or less in a triplet's life change nothing an operator sees.
GREYLIST_REFRESH = timedelta(minutes=10)


def client_network(client_ip: str) -> str:
    """The greylisting key for a client: its /24, or its /64."""
    address = ipaddress.ip_address(client_ip)
    prefix = 24 if address.version == 4 else 64
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


def decide(
    entry: GreylistEntry | None, now: datetime, settings: Greylist
) -> tuple[GreylistEntry, float]:
    """What a triplet's entry becomes when the triplet is seen at `now`, and the
    seconds it must still wait (0.0: it passes).

    A new triplet (or one that came back too late, or was last seen longer than
    `pass_ttl` ago) starts waiting now; one retried after `delay` passes and stays
    passed while it is seen at least every `pass_ttl`."""
    delay = timedelta(seconds=settings.delay)
    stale = entry is not None and (
        now - entry.last_seen > timedelta(seconds=settings.pass_ttl)
        if entry.passed_at is not None
        else now - entry.first_seen > delay + timedelta(seconds=settings.retry_window)
    )
    if entry is None or stale:
        return GreylistEntry(first_seen=now, last_seen=now, passed_at=None), delay.total_seconds()
    if entry.passed_at is not None:
        if now - entry.last_seen > GREYLIST_REFRESH:
            return replace(entry, last_seen=now), 0.0
        return entry, 0.0
    waited = now - entry.first_seen
    if waited < delay:
        return entry, (delay - waited).total_seconds()
    return replace(entry, passed_at=now, last_seen=now), 0.0


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
            Triplet(client_network(client_ip), sender.lower(), recipient.lower()),
            partial(decide, now=utcnow(), settings=settings),
        )
    except Exception as error:
        log.error("greylist_failed", error=str(error))
        return None
    if wait <= 0:
        return None
    log.info("greylisted", sender=sender, recipient=recipient, wait=round(wait))
    return replies.greylisted(recipient, max(1, round(wait)))
