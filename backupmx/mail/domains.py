"""Domain names: their one normal form, and the one rule for configured names.

A configured name is either exact (``example.com``) or a ``.parent`` entry
(``.example.com``), which covers every name below the parent but not the parent
itself — Postfix's ``relay_domains`` with ``parent_domain_matches_subdomains``
off.  When several entries cover a name, the exact one wins, else the longest
parent: ``.sub.example.com`` before ``.example.com``.  `DomainNames.match` is
that rule; the relay check, the recipient rules, the delivery policy and the
status listing all use it.

`normalize_domain` raises ValueError for text that is not a domain name.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from typing import Generic, TypeVar

import idna

T = TypeVar("T")

_DOMAIN_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


@functools.lru_cache(maxsize=4096)  # called per address and per result with few distinct names
def normalize_domain(name: str) -> str:
    """Lower-case, IDNA-encoded, trailing dot removed; raises ValueError if not a domain."""
    text = name.strip().rstrip(".").lower()
    if not text.isascii():
        # IDNA 2008 with UTS #46 mapping, not Python's IDNA 2003 codec, which maps
        # "straße" to "strasse" and drops joiners: two names must not become one.
        try:
            text = idna.encode(text, uts46=True, transitional=False).decode("ascii")
        except idna.IDNAError as error:
            raise ValueError(f"{name!r} is not a domain name") from error
    labels = text.split(".")
    if len(text) > 253 or len(labels) < 1 or not all(_DOMAIN_LABEL.fullmatch(x) for x in labels):
        raise ValueError(f"{name!r} is not a domain name")
    return text


def routing_domain(domain: str) -> str:
    """The form a domain is matched and routed on: lower-case A-labels, or an address
    literal (``[192.0.2.1]``) lower-cased; raises ValueError if it is neither."""
    return domain.lower() if domain.startswith("[") else normalize_domain(domain)


class DomainNames(Generic[T]):
    """Configured names, each with a value (its [[domain]] entry, its recipient rule).

    Names may be given in any form `normalize_domain` takes; `match` and `covers`
    take A-labels, as `routing_domain` gives them."""

    def __init__(self, entries: Iterable[tuple[str, T]]) -> None:
        self._exact: dict[str, T] = {}
        parents: dict[str, T] = {}
        for name, value in entries:
            if name.startswith("."):
                parents.setdefault("." + normalize_domain(name[1:]), value)
            else:
                self._exact.setdefault(normalize_domain(name), value)
        # longest first, so the first parent that matches is the closest one
        self._parents = sorted(parents.items(), key=lambda item: -len(item[0]))

    def match(self, domain: str) -> T | None:
        """The value of the exact entry for `domain`, else of its closest ``.parent``."""
        found = self._exact.get(domain)
        if found is not None:
            return found
        for parent, value in self._parents:
            if domain.endswith(parent):
                return value
        return None

    def covers(self, domain: str) -> bool:
        return self.match(domain) is not None
