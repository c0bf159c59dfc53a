"""Whether a new connection is let in: the refusal decision, as a pure function.

`refusal` sees what the listener counts (connections open in total and from
the client's address) and whether the server is draining, and returns the
``421`` to send before closing, or None to greet.  aiosmtpd has no connection
limit; Postfix's equivalents are ``smtpd_client_connection_count_limit`` and
``default_process_limit``.  Order matters only for the reply's text: draining
first (the client should try elsewhere, not later), then the server-wide
limit, then the per-address one.

The counting itself (`Listener.admit`, `Listener.forget`) stays with the
listener, which owns the set of open sessions.
"""

from __future__ import annotations

from backupmx.config import Limits
from backupmx.mail import replies


def refusal(limits: Limits, draining: bool, open_total: int, open_from_client: int) -> str | None:
    """The reply refusing one more connection, or None to admit it.

    `open_total` and `open_from_client` count the connections already admitted,
    without this one.
    """
    if draining:
        return replies.SHUTTING_DOWN
    if open_total >= limits.max_connections:
        return replies.TOO_MANY_CONNECTIONS
    if open_from_client >= limits.max_connections_per_ip:
        return replies.TOO_MANY_FROM_ADDRESS
    return None
