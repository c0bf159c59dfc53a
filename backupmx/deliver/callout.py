"""Recipient callouts: ask a domain's primary whether an address exists.

The receiving side's "verify" mode is handed `PrimaryCallout` by the application
as its `Callout`; it speaks with the delivery client: ``MAIL FROM:<>``, ``RCPT
TO:<address>``, ``QUIT``, never DATA.  Any failure to get an answer is an
answer with code 0 naming what failed; nothing here raises to the caller.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aiosmtplib

from backupmx.deliver.client import ConnectFailed, Target, Timeouts, connect
from backupmx.deliver.route import Route, RoutePlan
from backupmx.mail.reply import CalloutAnswer


class PrimaryCallout:
    """Ask the domain's primary about an address with the delivery client.

    Tries the route's hops in order until one answers; no STARTTLS (only the
    address travels, and a callout must be quick).
    """

    def __init__(
        self,
        route: Callable[[str], Awaitable[Route]],
        helo: str,
        timeouts: Timeouts,
    ) -> None:
        self.route = route
        self.helo = helo
        self.timeouts = timeouts

    async def __call__(self, domain: str, address: str) -> CalloutAnswer:
        route = await self.route(domain)
        if not isinstance(route, RoutePlan):
            return CalloutAnswer(0, route.reason)
        failures = []
        for hop in route.hops:
            where = Target(hop.host, hop.address, hop.port)
            try:
                connection = await connect(where, self.helo, "may", "", self.timeouts, False)
            except ConnectFailed as error:
                failures.append(str(error))
                continue
            try:
                smtp = connection.smtp
                mail = await smtp.execute_command(b"MAIL", b"FROM:<>")
                if mail.code != 250:
                    # A primary refusing the null sender cannot verify anything.
                    return CalloutAnswer(0, f"{where} refused MAIL FROM:<>: {mail.code}")
                rcpt = await smtp.execute_command(b"RCPT", b"TO:<" + address.encode() + b">")
                return CalloutAnswer(rcpt.code, " ".join(f"{rcpt.code} {rcpt.message}".split()))
            except (aiosmtplib.SMTPException, OSError) as error:
                failures.append(f"{where}: {error}")
            finally:
                await connection.close()
        return CalloutAnswer(0, "; ".join(failures) or "no primary")
