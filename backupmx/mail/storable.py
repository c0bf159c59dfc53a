"""Client text the queue keeps: the one rule for every field a client fills in.

The HELO/EHLO argument, the envelope addresses and the ESMTP parameters are
stored as text and relayed to the primary; what we accept must survive both byte
for byte.  Command lines are decoded with ``surrogateescape``, so invalid UTF-8
arrives as lone surrogates, which neither SQLite's nor PostgreSQL's driver can
encode; PostgreSQL's text cannot hold NUL; and RFC 5321 §4.1.2 and RFC 6531 §3.3
allow printable ASCII, plus valid UTF-8 where SMTPUTF8 applies, never control
characters.  Text that passes `flaw` is valid UTF-8 without NUL: both backends
keep it as it came.

Promise: a flaw is refused at the edge with the field's own 5xx (the session,
`address`, `parameters`), so it never reaches the intake's group commit, where
it would fail the other clients' messages of the same batch.
"""

from __future__ import annotations

import re

# A non-ASCII character a field may hold under SMTPUTF8 (RFC 6531 §3.3 UTF8-non-ascii):
# not a C1 control (U+0080-U+009F), not a lone surrogate (an undecodable byte).
UTF8_NON_ASCII = r"[^\x00-\x9f\ud800-\udfff]"

# C0 controls (NUL included), DEL, C1 controls, and the surrogates of undecodable bytes.
_FLAWED = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def flaw(text: str) -> str | None:
    """What keeps `text` from being stored and relayed faithfully, or None if nothing does.

    Said so that it completes "… contains ": "invalid UTF-8", "a NUL character",
    "a control character (U+001B)".
    """
    found = _FLAWED.search(text)
    if found is None:
        return None
    char = found.group()
    if "\ud800" <= char <= "\udfff":
        return "invalid UTF-8"
    if char == "\x00":
        return "a NUL character"
    return f"a control character (U+{ord(char):04X})"
