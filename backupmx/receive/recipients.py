"""Which recipients exist: per domain "any", a "list" file, or "verify" by callout.

A backup that accepts mail for users the primary does not have must later bounce
it to senders that are usually forged (backscatter,
docs/receiving.md#why-a-backup-checks-so-much).  So RCPT is
checked here, per domain (``recipients = …``):

* ``"any"`` — every local part is accepted (``config check`` warns).
* ``"list"`` — `RecipientList`: a file of addresses and ``@domain`` catch-alls,
  re-read when its mtime changes and on SIGHUP (a new policy loads it anew).
* ``"verify"`` — `Verifier`: the primary is asked through the `Callout` that the
  application hands in (deliver.callout: ``MAIL FROM:<>``, ``RCPT TO:<address>``,
  ``QUIT``; never DATA) and its answer cached in
  the queue database, positive for ``verify_positive_ttl``, negative for
  ``verify_negative_ttl``.  Deliveries feed the same cache (`Store.learn_recipients`).

Promises:

* An unknown recipient is answered ``550 5.1.1``.  One that cannot be verified
  now (nothing cached, and the primary refuses the connection, times out, answers
  4xx, has no route, or did not answer a callout within ``verify_retry``) is
  accepted under ``verify_unknown = "accept"``, the default (Exim's ``defer_ok``:
  a backup exists for the primary's outages, and the primary decides at delivery,
  where ``on_primary_5xx`` handles a refusal), or answered ``450 4.2.1`` under
  ``"defer"``.  Either way the event ``recipient_unverified`` says why, and the
  counter ``backupmx_recipients_unverified`` counts it.
* A callout never delays other sessions: at most ``max_callouts`` run at once,
  one per address however many sessions ask, each bounded by ``verify_timeout``;
  a session waits for its answer at most ``verify_wait``, then takes the
  address as unverified while the callout goes on to fill the cache.  A domain
  whose primary did not answer gets no callout for ``verify_retry``.  Memory
  stays bounded whatever the senders try: at most `MAX_PENDING_CALLOUTS`
  callouts are started and unfinished (past that a new address is unverified at
  once), and at most `MAX_QUIET_DOMAINS` silent domains are remembered.
* Cache or callout failures never answer 5xx: they are "unverified".
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Protocol

import structlog

from backupmx import metrics
from backupmx.config import Config, Domain, Recipients
from backupmx.mail import replies
from backupmx.mail.address import Address
from backupmx.mail.domains import DomainNames, normalize_domain
from backupmx.mail.reply import CalloutAnswer
from backupmx.queue.records import RecipientVerdict, utcnow
from backupmx.queue.store import Store

log = structlog.get_logger("backupmx.receive")

LIST_STAT_INTERVAL = 1.0  # a list file's mtime is looked at no more than once a second
# Callouts started and not finished, at most (one per address; max_callouts of them
# talk, the rest wait for a slot).  Past this a new address is "unverified" (450)
# without a callout: at the defaults (10 at a time, up to 30s each) the last of a
# thousand waits 50 minutes for its turn, long after the session that asked.
MAX_PENDING_CALLOUTS = 1000
# Domains remembered as silent (no callout for verify_retry), at most.  Under a
# ``.parent`` entry the subdomains are many; an entry past verify_retry is dropped
# at the next failure, and past this bound the oldest goes (its domain merely gets
# a callout a little earlier).
MAX_QUIET_DOMAINS = 10_000


class Status(StrEnum):
    VALID = "valid"
    UNKNOWN = "unknown"  # 550 5.1.1
    UNVERIFIED = "unverified"  # 450 4.2.1, or accepted (verify_unknown)


@dataclass(frozen=True)
class Verification:
    """The verifier's answer: the status, and why an address is unverified."""

    status: Status
    reason: str = ""


def reply_for(status: Status, address: Address) -> str | None:
    """The RCPT refusal for `status`, or None to accept."""
    if status is Status.UNKNOWN:
        return replies.user_unknown(str(address))
    if status is Status.UNVERIFIED:
        return replies.unverified(str(address))
    return None


def cache_key(address: Address) -> str:
    """Local part as sent (RFC 5321 §2.4: it is the primary's to interpret), A-label domain."""
    return f"{address.local}@{address.routing_domain}"


# --------------------------------------------------------------------------- list


class RecipientList:
    """A file of valid addresses: ``user@domain`` and ``@domain`` lines, ``#`` comments."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._addresses: frozenset[str] = frozenset()
        self._domains: frozenset[str] = frozenset()
        self._mtime: float | None = None
        self._checked = 0.0
        self._load()

    def knows(self, address: Address) -> bool:
        self._refresh()
        domain = address.routing_domain
        if domain in self._domains:
            return True
        return f"{address.unquoted_local.lower()}@{domain}" in self._addresses

    def __len__(self) -> int:
        return len(self._addresses) + len(self._domains)

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < LIST_STAT_INTERVAL:
            return
        self._checked = now
        try:
            mtime = os.stat(self.path).st_mtime
        except OSError as error:
            log.error("recipient_list_unreadable", path=str(self.path), error=str(error))
            return
        if mtime != self._mtime:
            self._load()

    def _load(self) -> None:
        """Read the file; on failure keep what was loaded before (an empty list at first)."""
        try:
            mtime = os.stat(self.path).st_mtime
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except OSError as error:
            log.error("recipient_list_unreadable", path=str(self.path), error=str(error))
            return
        self._addresses, self._domains = parse_list(text.splitlines())
        self._mtime = mtime
        log.info("recipient_list_loaded", path=str(self.path), entries=len(self))


def parse_list(lines: Iterable[str]) -> tuple[frozenset[str], frozenset[str]]:
    """Addresses (lower-case local part, A-label domain) and catch-all domains."""
    addresses: set[str] = set()
    domains: set[str] = set()
    for raw in lines:
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        local, at, domain = line.rpartition("@")
        try:
            name = normalize_domain(domain)
        except ValueError:
            log.warning("recipient_list_bad_line", line=line)
            continue
        if not at:
            log.warning("recipient_list_bad_line", line=line)
        elif local:
            addresses.add(local.strip('"').lower() + "@" + name)
        else:
            domains.add(name)
    return frozenset(addresses), frozenset(domains)


# --------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class DomainRecipients:
    mode: str = "any"  # "any" | "list" | "verify"
    listed: RecipientList | None = None
    verify_unknown: str = "accept"


class RecipientPolicy:
    """Each backed-up domain's recipient rule (exact names, and ``.parent`` entries)."""

    def __init__(self, domains: Iterable[Domain] = (), settings: Recipients | None = None) -> None:
        self.settings = settings or Recipients()
        self._rules = DomainNames(
            (
                domain.name,
                DomainRecipients(
                    domain.recipients,
                    RecipientList(domain.recipient_list) if domain.recipients == "list" else None,
                    domain.verify_unknown,
                ),
            )
            for domain in domains
        )

    def rule(self, domain: str) -> DomainRecipients:
        return self._rules.match(domain) or DomainRecipients()


# --------------------------------------------------------------------------- verify


Callout = Callable[[str, str], Awaitable[CalloutAnswer]]  # (domain, address) -> answer


class Verifying(Protocol):
    """What checks a recipient by callout: `Verifier`, or a receiver worker's way to it."""

    async def check(self, address: Address, settings: Recipients) -> Verification: ...


class Verifier:
    """The "verify" mode: cache first, then one bounded callout per address."""

    def __init__(self, store: Store, callout: Callout) -> None:
        self.store = store
        self.callout = callout
        self._inflight: dict[str, asyncio.Task[Verification]] = {}  # MAX_PENDING_CALLOUTS
        # domain -> monotonic time, in the order written (at most MAX_QUIET_DOMAINS)
        self._quiet_until: dict[str, float] = {}
        self._slots: asyncio.Semaphore | None = None
        self._slot_count = 0

    async def check(self, address: Address, settings: Recipients) -> Verification:
        key = cache_key(address)
        try:
            cached = await self.store.recipient_verdict(key)
        except Exception as error:
            log.error("verify_cache_failed", error=str(error))
            return Verification(Status.UNVERIFIED, f"verification cache unreadable: {error}")
        if cached is not None:
            return Verification(Status.VALID if cached.valid else Status.UNKNOWN)
        domain = address.routing_domain
        if time.monotonic() < self._quiet_until.get(domain, 0.0):
            return Verification(
                Status.UNVERIFIED, "the primary did not answer a callout within verify_retry"
            )
        task = self._inflight.get(key)
        if task is None:
            if len(self._inflight) >= MAX_PENDING_CALLOUTS:
                log.info("callout_slow", recipient=key, pending=len(self._inflight))
                return Verification(Status.UNVERIFIED, "too many callouts pending")
            task = asyncio.get_running_loop().create_task(
                self._verify(domain, key, settings), name=f"callout {key}"
            )
            self._inflight[key] = task
            task.add_done_callback(lambda _: self._inflight.pop(key, None))
        try:
            # shield: a session that stops waiting leaves the callout to fill the cache.
            return await asyncio.wait_for(asyncio.shield(task), settings.verify_wait)
        except TimeoutError:
            log.info("callout_slow", recipient=key)
            return Verification(Status.UNVERIFIED, "no callout answer within verify_wait")

    async def _verify(self, domain: str, key: str, settings: Recipients) -> Verification:
        slots = self._semaphore(settings.max_callouts)
        async with slots:
            started = time.monotonic()
            try:
                answer = await asyncio.wait_for(self.callout(domain, key), settings.verify_timeout)
            except TimeoutError:
                answer = CalloutAnswer(0, f"callout timed out after {settings.verify_timeout}s")
            except Exception as error:
                log.exception("callout_failed", recipient=key)
                answer = CalloutAnswer(0, f"callout failed: {error}")
        log.info(
            "callout",
            recipient=key,
            code=answer.code,
            reply=answer.text,
            ms=round((time.monotonic() - started) * 1000, 1),
        )
        if answer.code // 100 not in (2, 5):
            if answer.code == 0:
                self._quiet(domain, time.monotonic() + settings.verify_retry)
            return Verification(Status.UNVERIFIED, f"callout: {answer.text}")
        self._quiet_until.pop(domain, None)
        valid = answer.code // 100 == 2
        now = utcnow()
        ttl = settings.verify_positive_ttl if valid else settings.verify_negative_ttl
        verdict = RecipientVerdict(
            key, valid, answer.text, "callout", now, now + timedelta(seconds=ttl)
        )
        try:
            await self.store.remember_recipients([verdict])
        except Exception as error:  # the answer stands; only the cache missed it
            log.error("verify_cache_write_failed", recipient=key, error=str(error))
        return Verification(Status.VALID if valid else Status.UNKNOWN)

    def _quiet(self, domain: str, until: float) -> None:
        """No callouts to `domain` before `until`; the entries that have run out, and
        past MAX_QUIET_DOMAINS the oldest, are forgotten (the dict keeps write order)."""
        self._quiet_until.pop(domain, None)
        self._quiet_until[domain] = until
        now = time.monotonic()
        while self._quiet_until:
            oldest, ends = next(iter(self._quiet_until.items()))
            if ends > now and len(self._quiet_until) <= MAX_QUIET_DOMAINS:
                return
            del self._quiet_until[oldest]

    def _semaphore(self, count: int) -> asyncio.Semaphore:
        """One semaphore, re-made when a reload changes max_callouts."""
        if self._slots is None or count != self._slot_count:
            self._slots, self._slot_count = asyncio.Semaphore(count), count
        return self._slots


async def check_recipient(
    address: Address, policy: RecipientPolicy, verifier: Verifying | None
) -> Status:
    """The status of a recipient of a backed-up domain under its domain's rule."""
    rule = policy.rule(address.routing_domain)
    if rule.mode == "list":
        assert rule.listed is not None
        return Status.VALID if rule.listed.knows(address) else Status.UNKNOWN
    if rule.mode == "verify":
        found = (
            await verifier.check(address, policy.settings)
            if verifier is not None
            else Verification(Status.UNVERIFIED, "no verifier")
        )
        if found.status is not Status.UNVERIFIED:
            return found.status
        accepted = rule.verify_unknown == "accept"
        log.info(
            "recipient_unverified",
            recipient=str(address),
            reason=found.reason,
            answer="accepted" if accepted else "deferred",
        )
        metrics.recipient_unverified(address.routing_domain, accepted)
        return Status.VALID if accepted else Status.UNVERIFIED
    return Status.VALID


class CacheKeeper:
    """The scheduled job: deliveries feed the verification cache; expired verdicts and
    greylist triplets nobody has used for longer than they could matter are dropped."""

    def __init__(self, store: Store, config: Callable[[], Config]) -> None:
        self.store = store
        self.config = config
        self.since = utcnow() - timedelta(hours=1)  # deliveries just before a restart

    async def run(self) -> None:
        config = self.config()
        settings, greylist = config.recipients, config.greylist
        now = utcnow()
        learned = await self.store.learn_recipients(
            self.since,
            timedelta(seconds=settings.verify_positive_ttl),
            timedelta(seconds=settings.verify_negative_ttl),
            now,
        )
        self.since = now
        keep = max(greylist.pass_ttl, greylist.delay + greylist.retry_window)
        pruned = await self.store.prune_protection(now - timedelta(seconds=keep), now)
        if learned or pruned:
            log.info("recipient_cache_kept", learned=learned, pruned=pruned)
