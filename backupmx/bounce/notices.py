"""Which DSNs a delivery result calls for, as ordinary queued messages (RFC 3461, RFC 3464).

Promises:

* Never a DSN to the null sender ``<>``: a DSN is itself sent from ``<>``, and one
  that finally fails is dropped, never bounced again (no bounce loops).
* NOTIFY is honoured: NEVER → none; failures and delays unless NOTIFY leaves them
  out; success only when asked, and then as a "relayed" DSN when the primary
  does not support DSN (RFC 3461 §4.2).
* One DSN per message and kind, covering all its recipients of that kind.
* A DSN goes to every sender with a domain we can route to, address literals
  (``user@[192.0.2.1]``) included, and is queued with the BODY and SMTPUTF8 its
  content needs (`is_8bit`, `needs_smtputf8`), never declared 7-bit ASCII.
* ``Remote-MTA`` names the host that answered by its DNS name; a host known only
  by address is named in the human-readable text alone.

The DSNs are returned as `NewMessage`s for the store to queue in the same
transaction as the state change they report.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import timedelta
from typing import Protocol

from backupmx.bounce.dsn import (
    Action,
    RecipientReport,
    build_dsn,
    is_8bit,
    needs_smtputf8,
    should_send_dsn,
)
from backupmx.mail.domains import routing_domain
from backupmx.mail.reply import Outcome, Verdict
from backupmx.queue.records import (
    BytesBody,
    Claim,
    NewMessage,
    NewRecipient,
    Outbound,
    Overdue,
    new_queue_id,
    utcnow,
)


class RemoteHost(Protocol):
    """The server that answered: `dns_name` for ``Remote-MTA`` (None when it is known
    only by its address), and as text, for people, ``name[address]:port``."""

    @property
    def dns_name(self) -> str | None: ...


class Notices:
    def __init__(self, hostname: str, max_queue_lifetime: float = 5 * 86400.0) -> None:
        self.hostname = hostname
        self.max_queue_lifetime = max_queue_lifetime

    def for_results(
        self,
        message: Outbound,
        claims: Sequence[Claim],
        outcomes: Sequence[Outcome],
        remote: RemoteHost | None,
        dsn_supported: bool,
    ) -> list[NewMessage]:
        """The DSNs for one delivery attempt; ``remote`` is the host that answered."""
        remote_mta = remote.dns_name if remote else None
        remote_host = str(remote) if remote else None
        failed: list[RecipientReport] = []
        relayed: list[RecipientReport] = []
        for claim, outcome in zip(claims, outcomes, strict=True):
            if outcome.verdict is Verdict.BOUNCED:
                action, kind = Action.FAILED, failed
            elif outcome.verdict is Verdict.DELIVERED and not dsn_supported:
                action, kind = Action.RELAYED, relayed
            else:
                continue
            if should_send_dsn(message.sender, claim.notify, action):
                kind.append(
                    RecipientReport(
                        final_recipient=claim.address,
                        original_recipient=claim.orcpt,
                        action=action,
                        status=outcome.status,
                        remote_mta=remote_mta,
                        remote_host=remote_host,
                        diagnostic=outcome.diagnostic,
                    )
                )
        return [n for n in (self._notice(message, failed), self._notice(message, relayed)) if n]

    def for_expired(self, overdue: list[Overdue]) -> list[NewMessage]:
        return self._for_overdue(overdue, Action.FAILED, "4.4.7", "delivery time expired")

    def for_delayed(self, overdue: list[Overdue]) -> list[NewMessage]:
        return self._for_overdue(overdue, Action.DELAYED, "4.4.7")

    def for_admin_bounce(self, overdue: list[Overdue]) -> list[NewMessage]:
        return self._for_overdue(
            overdue, Action.FAILED, "5.0.0", "bounced by the mail administrator"
        )

    def _for_overdue(
        self, overdue: list[Overdue], action: Action, status: str, reason: str | None = None
    ) -> list[NewMessage]:
        by_message: dict[str, list[Overdue]] = defaultdict(list)
        for item in overdue:
            if should_send_dsn(item.message.sender, item.notify, action):
                by_message[item.message.id].append(item)
        notices = []
        for items in by_message.values():
            reports = [
                RecipientReport(
                    final_recipient=i.address,
                    original_recipient=i.orcpt,
                    action=action,
                    status=status,
                    diagnostic=(
                        f"{reason}; last error: {i.last_error}"
                        if reason and i.last_error
                        else reason or i.last_error
                    ),
                )
                for i in items
            ]
            notice = self._notice(items[0].message, reports)
            if notice:
                notices.append(notice)
        return notices

    def _notice(self, message: Outbound, reports: Sequence[RecipientReport]) -> NewMessage | None:
        if not reports or not message.sender:
            return None
        try:
            domain = routing_domain(message.sender.rpartition("@")[2])
        except ValueError:
            return None
        now = utcnow()
        body = build_dsn(
            reporting_mta=self.hostname,
            sender=message.sender,
            envid=message.envid,
            ret=message.ret,
            arrival_date=message.received_at,
            queue_id=message.id,
            original=message.loaded_body(),
            smtputf8=message.smtputf8,
            recipients=list(reports),
            date=now,
            retry_until=message.received_at + timedelta(seconds=self.max_queue_lifetime),
        )
        return NewMessage(
            id=new_queue_id(),
            sender="",
            recipients=[NewRecipient(message.sender, domain)],
            body=BytesBody(body),
            client_ip="127.0.0.1",
            client_helo=self.hostname,
            protocol="local",
            session_id="dsn",
            body_type="8BITMIME" if is_8bit(body) else "7BIT",
            smtputf8=needs_smtputf8(body, message.sender),
            received_at=now,
        )
