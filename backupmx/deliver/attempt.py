"""One message's delivery attempt, decided: what happened means this for each recipient.

Pure: no sockets, no store, no clock (the time comes in as an argument).  The
deliverer and the SMTP client do the I/O and ask here what it means:

* before sending — a domain without a route (`without_route`: bounced for a
  null MX or the NXDOMAIN of a domain not backed up, deferred otherwise), a
  primary that failed while the message waited for its turn
  (`dead_destination`), a message the primary
  cannot take (`refusal`: SMTPUTF8, SIZE);
* while sending — which replies accept a sender or recipient (`accepted`), what
  the reply ending DATA means (`after_data`), which replies are signs of
  congestion for the host's pacer (`congestion`), and what is left of the results
  when the connection breaks (`broken_off`);
* after sending — no host could be reached (`unreachable`), what the report
  tells the pacer (`pacer_feedback`) and whether the connection is kept
  (`keeps_connection`), the log lines (`log_events`: per message, per recipient
  only where its outcome differs), and the rows for the store (`retry_time`, `result`).

Invariants kept here: every recipient of an attempt gets exactly one outcome, in
its place; a recipient is delivered only by a 2xx to the body sent after 354; the
deferred recipients of one message share one retry time, so they go out together
again (one transaction with the primary, not one per recipient).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from backupmx.deliver.route import Bounce, Defer
from backupmx.deliver.schedule import next_attempt
from backupmx.mail.reply import Outcome, Verdict, bounced, classify, deferred
from backupmx.queue.records import Claim, Outbound, Result
from backupmx.queue.state import VERDICT_EVENTS, Event


@dataclass
class SendReport:
    """What one message's transaction with one host came to."""

    outcomes: list[Outcome]  # one per recipient, in the order they were given
    congestion: bool = False  # 421, 4xx to MAIL/DATA, a timeout: the pacer backs off
    usable: bool = True  # the connection can carry the next message
    dsn_supported: bool = True
    # The body was held back (the node's fence fell while DATA waited for its 354) and
    # the connection closed before the end of data: nothing was delivered, and the
    # recipients are no longer this node's to record.
    abandoned: bool = False


# --------------------------------------------------------------------------- before sending


def without_route(route: Defer | Bounce) -> Outcome:
    """Every recipient's outcome when its domain has no host to try."""
    if isinstance(route, Bounce):
        return bounced(route.reason, route.status)
    return deferred(route.reason)


def dead_destination(down: tuple[float, str] | None, claimed_at: float) -> Outcome | None:
    """The primary failed (at the monotonic time ``down[0]``, for ``down[1]``) while this
    message waited for its turn: defer without knocking, the probes take over (Postfix's
    dead destination).  A failure seen before the claim does not count: the store hands
    out no recipient of a domain marked down, so something has reset it since."""
    if down is not None and down[0] >= claimed_at:
        return deferred(down[1])
    return None


def refusal(message: Outbound, host: str, smtputf8: bool, size_limit: int) -> Outcome | None:
    """A message this host cannot take, decided before any command (``size_limit`` 0: none
    advertised)."""
    if message.smtputf8 and not smtputf8:
        return bounced(f"{host} does not support SMTPUTF8", "5.6.7")
    if size_limit and message.size > size_limit:
        return bounced(f"message size exceeds the limit of {host}", "5.3.4")
    return None


# --------------------------------------------------------------------------- while sending


def accepted(code: int) -> bool:
    """A reply to MAIL or RCPT that takes the sender or the recipient: any 2xx (RFC 5321
    §4.2.1: the first digit decides; Postfix checks ``code / 100 == 2``).  A 252 taken
    for a refusal would be classified delivered without the body ever being sent."""
    return code // 100 == 2


def after_data(code: int, text: str, hold_5xx: bool, body_sent: bool) -> Outcome:
    """The accepted recipients' outcome from the reply that ended DATA: the reply to the
    body, or the refusal of DATA itself (not 354), after which nothing was sent.  Then
    no reply delivers: a 2xx there is a protocol error, a temporary failure (4.5.0), as
    Postfix's smtp_mesg_fail makes it."""
    outcome = classify(code, text, hold_5xx=hold_5xx)
    if outcome.verdict is Verdict.DELIVERED and not body_sent:
        return Outcome(Verdict.DEFERRED, code, "4.5.0", outcome.text)
    return outcome


def congestion(code: int) -> bool:
    """A reply to MAIL or DATA that asks us to slow down: 421 or any 4xx."""
    return code // 100 == 4


def broken_off(outcomes: Sequence[Outcome], total: int, reason: str) -> list[Outcome]:
    """The outcomes when the connection broke mid-transaction: the refusals already
    answered are kept in their places; every other recipient, one taken for delivered
    included, is deferred for `reason`."""
    kept = [deferred(reason) if o.verdict is Verdict.DELIVERED else o for o in outcomes]
    return kept + [deferred(reason)] * (total - len(kept))


# --------------------------------------------------------------------------- after sending


def unreachable(failures: Sequence[str]) -> str:
    """Why no host of the route could be reached (every recipient is deferred for it,
    and the domain marked down): each host's reason."""
    return "; ".join(failures) or "no host to try"


def pacer_feedback(report: SendReport) -> Literal["congestion", "success"] | None:
    """Congestion halves the host's window; a delivery widens it; anything else leaves it."""
    if report.congestion:
        return "congestion"
    if any(o.verdict is Verdict.DELIVERED for o in report.outcomes):
        return "success"
    return None


def keeps_connection(report: SendReport, sent: int, messages_per_connection: int) -> bool:
    """The connection goes back to the idle pool for the next message, or is closed."""
    return report.usable and sent < messages_per_connection


def log_events(
    claims: Sequence[Claim], outcomes: Sequence[Outcome]
) -> list[tuple[str, dict[str, str | int]]]:
    """How one message's attempt is logged: per message, with per-recipient detail only
    where it differs.  The most common outcome (verdict and reply; the first of equals)
    is one ``message_<verdict>`` event with its count of ``recipients`` (and the
    ``recipient`` when there is one); every recipient whose outcome differs gets a
    ``recipient_<verdict>`` event of its own.  So each retry of a 1,000-recipient
    message is one line, not 1,000, and a 550 among acceptances still names its
    recipient."""
    groups: dict[tuple[Verdict, str], list[str]] = {}
    for claim, outcome in zip(claims, outcomes, strict=True):
        groups.setdefault((outcome.verdict, outcome.diagnostic), []).append(claim.address)
    common = max(groups, key=lambda key: len(groups[key]))
    verdict, reply = common
    addresses = groups.pop(common)
    summary: dict[str, str | int] = {"recipients": len(addresses), "reply": reply}
    if len(addresses) == 1:
        summary["recipient"] = addresses[0]
    events = [(f"message_{verdict.value}", summary)]
    for (verdict, reply), addresses in groups.items():
        events += [
            (f"recipient_{verdict.value}", {"recipient": address, "reply": reply})
            for address in addresses
        ]
    return events


def retry_time(
    now: datetime,
    claims: Sequence[Claim],
    retry_min: float,
    retry_max: float,
    rng: random.Random,
) -> datetime:
    """One retry time for the whole message, paced by its most-tried recipient."""
    return next_attempt(now, max(c.attempts for c in claims), retry_min, retry_max, rng)


def result(claim: Claim, outcome: Outcome, retry_at: datetime, host: str | None) -> Result:
    """The row for the store: the verdict's event; the reply as the last error unless
    delivered; the retry time only for a deferral; and for the attempt history the host
    that answered (None: no connection was made) and the reply, a delivery's too."""
    event = VERDICT_EVENTS[outcome.verdict]
    error = None if event is Event.SUCCESS else outcome.diagnostic
    return Result(
        claim.recipient_id,
        event,
        error,
        retry_at if event is Event.TEMPFAIL else None,
        claim.attempts,
        host,
        outcome.diagnostic,
    )
