"""Envelope addresses and the relay decision, parsed strictly (RFC 5321 §4.1.2).

Promises (docs/queue.md, invariant 5): an address is relayed only when its domain is
one we back up, and no address form changes where mail goes.  Source routes
(``<@a,@b:user@domain>``) are dropped as RFC 5321 §4.1.1.3 asks, so only the final
mailbox counts.  Sender-specified routing inside the local part (``user%host@``,
``host!user@``, a quoted ``"user@host"@``) is refused for recipients, as Postfix's
``reject_unauth_destination`` does, so the primary is never asked to relay on.

An address holds only what the queue keeps byte for byte (`storable.flaw`):
invalid UTF-8, NUL or a control character is refused with ``501 5.1.3`` naming
it, never queued.

Failures raise `AddressError` carrying the SMTP reply to send.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from backupmx.mail.domains import DomainNames, routing_domain
from backupmx.mail.storable import UTF8_NON_ASCII, flaw


class AddressError(ValueError):
    """The address cannot be accepted; `reply` is the complete SMTP reply."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_UTF8 = UTF8_NON_ASCII
_QTEXT = r"[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e]"
_SUB_DOMAIN = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_U_SUB_DOMAIN = rf"(?:[A-Za-z0-9]|{_UTF8})(?:(?:[A-Za-z0-9-]|{_UTF8})*(?:[A-Za-z0-9]|{_UTF8}))?"


def _mailbox_pattern(utf8: bool) -> re.Pattern[str]:
    atext = f"(?:{_ATEXT}|{_UTF8})" if utf8 else _ATEXT
    qtext = f"(?:{_QTEXT}|{_UTF8})" if utf8 else f"(?:{_QTEXT})"
    sub = _U_SUB_DOMAIN if utf8 else _SUB_DOMAIN
    local = rf'(?P<local>{atext}+(?:\.{atext}+)*|"{qtext}*")'
    domain = rf"(?P<domain>{sub}(?:\.{sub})*\.?|\[[^\[\]\\\s]+\])"
    return re.compile(rf"{local}@{domain}")


_MAILBOX = {utf8: _mailbox_pattern(utf8) for utf8 in (False, True)}
_ROUTE = re.compile(
    rf"@{_U_SUB_DOMAIN}(?:\.{_U_SUB_DOMAIN})*(?:,@{_U_SUB_DOMAIN}(?:\.{_U_SUB_DOMAIN})*)*:"
)
_MAX_LOCAL, _MAX_DOMAIN, _MAX_PATH = 64, 255, 256  # RFC 5321 §4.5.3.1


@dataclass(frozen=True)  # cached_property needs the instance __dict__: no slots
class Address:
    local: str  # as sent, quotes included
    domain: str  # as sent (may be a U-label name or an address literal)

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"

    @functools.cached_property
    def routing_domain(self) -> str:
        """The domain in the form we match and route on: lower-case A-labels."""
        return routing_domain(self.domain)

    @property
    def unquoted_local(self) -> str:
        if self.local.startswith('"'):
            return re.sub(r"\\(.)", r"\1", self.local[1:-1])
        return self.local

    @property
    def has_sender_routing(self) -> bool:
        """user%host@, host!user@ or "user@host"@: the sender picks the next hop."""
        return any(c in self.unquoted_local for c in "%!@")

    @property
    def is_postmaster(self) -> bool:
        """RFC 5321 §4.5.1: postmaster@ every domain served; the local part in any case."""
        return self.unquoted_local.lower() == "postmaster"

    @property
    def is_ascii(self) -> bool:
        return str(self).isascii()


def parse_path(
    argument: str, *, allow_null: bool, utf8: bool, postmaster: Address | None = None
) -> tuple[Address | None, str]:
    """Split ``<mailbox> params`` into the address (None for ``<>``) and the parameter text.

    Accepts what RFC 5321 allows plus what Postfix tolerates by default (a space
    after the colon, a missing pair of angle brackets).  A bare ``<Postmaster>``, in
    any case, is `postmaster` when one is given (RCPT only, RFC 5321 §4.1.1.3).
    """
    text = argument.lstrip(" ")
    if text.startswith("<"):
        end = text.find(">")
        if end < 0:
            raise AddressError("501 5.1.3 Bad address syntax: missing '>'")
        path, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(" "):
            raise AddressError("501 5.1.3 Bad address syntax: text after '>'")
    else:
        path, _, rest = text.partition(" ")
    problem = flaw(path)
    if problem:  # before the grammar, so that the reply names it
        raise AddressError(f"501 5.1.3 Bad address syntax: contains {problem}")
    if path == "":
        if not allow_null:
            raise AddressError("501 5.1.3 Bad address syntax: empty address")
        return None, rest.strip(" ")
    if postmaster is not None and path.lower() == "postmaster":
        return postmaster, rest.strip(" ")
    if len(path) > _MAX_PATH:
        raise AddressError("501 5.1.3 Bad address syntax: path too long")
    route = _ROUTE.match(path)
    mailbox_text = path[route.end() :] if route else path
    match = _MAILBOX[True].fullmatch(mailbox_text)
    if not match:
        raise AddressError("501 5.1.3 Bad address syntax")
    if not utf8 and not _MAILBOX[False].fullmatch(mailbox_text):
        raise AddressError("553 5.6.7 Non-ASCII address requires SMTPUTF8")
    address = Address(match.group("local"), match.group("domain").rstrip("."))
    if len(address.local.encode()) > _MAX_LOCAL or len(address.domain.encode()) > _MAX_DOMAIN:
        raise AddressError("501 5.1.3 Bad address syntax: address too long")
    if address.domain.startswith("["):
        _check_address_literal(address.domain)
    else:
        try:
            address.routing_domain  # noqa: B018 - raises on a malformed IDN
        except ValueError as error:
            raise AddressError("501 5.1.2 Bad domain syntax") from error
    return address, rest.strip(" ")


def _check_address_literal(literal: str) -> None:
    inner = literal[1:-1]
    try:
        if inner.lower().startswith("ipv6:"):
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError as error:
        raise AddressError("501 5.1.2 Bad address literal") from error


class RelayDomains(DomainNames[str]):
    """The domains we back up: exact names, and ``.parent`` entries for subdomains."""

    def __init__(self, names: Iterable[str]) -> None:
        super().__init__((name, name) for name in names)

    def check_recipient(self, address: Address) -> None:
        """Raise the 550 5.7.1 relay refusal unless the recipient may be relayed."""
        if address.domain.startswith("[") or not self.covers(address.routing_domain):
            raise AddressError("550 5.7.1 Relay access denied")
        if address.has_sender_routing:
            raise AddressError("550 5.7.1 Relay access denied: sender-specified routing")
