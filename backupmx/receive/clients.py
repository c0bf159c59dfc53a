"""What a client must pass before and while it sends: rates, greeting, blocklists, recipients.

`ClientChecks` is shared by all sessions and lives as long as the listener
(its counters and callout state survive a SIGHUP); `Screen` is one session's
view of it.  The session calls three hooks, in this order of the conversation:

* `Screen.greet` — before the ``220``: the PROXY header from a configured load
  balancer (``421 4.7.0`` if it is missing or malformed), the banner delay, and
  early talkers (anything sent before the greeting: ``554 5.5.0``, dropped); then
  the DNSBL lookups start in the background.
* `Screen.message` — at MAIL: messages per minute from this client IP
  (``450 4.7.1`` past ``max_messages_per_minute_per_ip``).
* `Screen.recipient` — at RCPT, after the relay check: recipients per minute
  (``450 4.7.1``), the DNSBL verdict (``550 5.7.1``), the domain's recipient rule
  (``550 5.1.1`` unknown, ``450 4.2.1`` unverified), directory-harvest protection
  (past ``max_unknown_recipients`` the next RCPT waits ``harvest_delay`` and gets
  ``421 4.7.0``, and the session is closed), and greylisting (``450 4.7.1``).
  A postmaster recipient (RFC 5321 §4.5.1 wants it reachable at every domain) meets
  only the recipient rate: it is never unknown, unverified, blocklisted, greylisted
  or counted as a harvest guess.

No check here answers 5xx because of a failure of its own: the DNSBL and
greylisting fail open, recipient verification fails to 450.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

import structlog

from backupmx.config import Limits
from backupmx.mail import replies
from backupmx.mail.address import Address
from backupmx.mail.networks import in_networks
from backupmx.queue.store import Store
from backupmx.receive import greylist
from backupmx.receive.dnsbl import Lookup, Lookups
from backupmx.receive.policy import ReceivePolicy
from backupmx.receive.proxy import Input, ProxyError, read_header
from backupmx.receive.recipients import Status, Verifying, check_recipient, reply_for

log = structlog.get_logger("backupmx.receive")


class Rates(Protocol):
    """The per-client rate buckets (`backupmx.receive.anvil`), wherever they are kept."""

    async def take(self, kind: str, client_ip: str, limit: int) -> bool: ...


class ClientChecks:
    """The long-lived parts: rate buckets, the verifier, the DNSBL lookup, the store."""

    def __init__(
        self,
        store: Store,
        rates: Rates,
        verifier: Verifying | None = None,
        dnsbl_lookup: Lookup | None = None,
    ) -> None:
        self.store = store
        self.rates = rates
        self.verifier = verifier
        self.dnsbl_lookup = dnsbl_lookup


class Screen:
    """One session's checks (see the module docstring)."""

    def __init__(
        self,
        checks: ClientChecks,
        policy: Callable[[], ReceivePolicy],
        client_ip: str,
    ) -> None:
        self.checks = checks
        self._policy = policy
        self.client_ip = client_ip
        self.unknown_recipients = 0
        self._dnsbl: Lookups | None = None

    # ------------------------------------------------------------------ connect

    async def greet(
        self,
        reader: Input,
        buffered: Callable[[], int],
        readmit: Callable[[str], Awaitable[str | None]],
    ) -> str | None:
        """Before the banner: the refusal to send (and close), or None to greet.

        `buffered` says how many bytes the client has sent unread; `readmit` moves
        the connection's accounting to the real client named by a PROXY header.
        """
        policy = self._policy()
        limits: Limits = policy.limits
        if in_networks(self.client_ip, policy.proxy_from):
            try:
                real = await asyncio.wait_for(read_header(reader), limits.proxy_timeout)
            except (ProxyError, TimeoutError, asyncio.IncompleteReadError) as error:
                log.info("proxy_header_refused", error=str(error) or type(error).__name__)
                return replies.BAD_PROXY_HEADER
            if real is not None:
                refusal = await readmit(real)
                log.info("proxied", balancer=self.client_ip, client=real)
                self.client_ip = real
                if refusal is not None:
                    return refusal
        if policy.dnsbl.zone and self.checks.dnsbl_lookup is not None:
            # Asked now, answered while the client waits for the banner and sends
            # EHLO and MAIL: a well-behaved client waits for none of it.
            self._dnsbl = Lookups(self.client_ip, policy.dnsbl, self.checks.dnsbl_lookup)
        if limits.banner_delay > 0:
            # Like postscreen's pregreet test, only within a wait: without one, bytes
            # that beat the banner say how the event loop ordered two events, not
            # that the client talks out of turn.
            await asyncio.sleep(limits.banner_delay)
            if buffered():
                log.info("early_talker", delay=limits.banner_delay)
                return replies.EARLY_TALKER
        return None

    def close(self) -> None:
        if self._dnsbl is not None:
            self._dnsbl.cancel()

    # ------------------------------------------------------------------ MAIL

    async def message(self) -> str | None:
        limit = self._policy().limits.max_messages_per_minute_per_ip
        if limit <= 0 or await self.checks.rates.take("message", self.client_ip, limit):
            return None
        log.info("rate_limited", kind="messages", limit=limit)
        return replies.too_much_mail(self.client_ip)

    # ------------------------------------------------------------------ RCPT

    async def recipient(self, address: Address, sender: str, postmaster: bool) -> str | None:
        """The refusal for this RCPT, or None to accept it; 421 means: close the session."""
        policy = self._policy()
        settings = policy.recipients.settings
        if self.unknown_recipients >= settings.max_unknown_recipients and not postmaster:
            log.info("harvest_suspected", unknown=self.unknown_recipients)
            await asyncio.sleep(settings.harvest_delay)
            return replies.HARVEST
        limit = policy.limits.max_recipients_per_minute_per_ip
        if limit > 0 and not await self.checks.rates.take("recipient", self.client_ip, limit):
            log.info("rate_limited", kind="recipients", limit=limit)
            return replies.too_many_recipients_from(self.client_ip)
        if postmaster:
            return None
        if self._dnsbl is not None:
            listing = await self._dnsbl.listing()
            refusal = listing.refusal(self.client_ip, policy.dnsbl.threshold)
            if refusal is not None:
                return refusal
        status = await check_recipient(address, policy.recipients, self.checks.verifier)
        if status is Status.UNKNOWN:
            self.unknown_recipients += 1
        if status is not Status.VALID:
            log.info("recipient_refused", recipient=str(address), status=status.value)
            return reply_for(status, address)
        if not policy.greylist.enabled or in_networks(self.client_ip, policy.greylist_pass):
            return None
        return await greylist.check(
            self.checks.store,
            self.client_ip,
            sender,
            f"{address.local}@{address.routing_domain}",
            policy.greylist,
        )
