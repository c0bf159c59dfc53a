"""SMTP's wire form of a message: CRLF line endings, the end-of-data line and
dot-stuffing (RFC 5321 §4.1.1.4, §4.5.2).

Pure byte functions, shared by the receiving decoder (which undoes the stuffing)
and the outbound client (which applies it).  Each is a few C-speed `bytes`
operations, so they stay cheap on 10 MiB bodies.  A stored body has no bare CR
or LF (docs/queue.md, invariant 6); `to_crlf` is how that is made true.
"""

from __future__ import annotations

import re

END_OF_DATA = b"\r\n.\r\n"
_BARE = re.compile(rb"\r\n|\r|\n")


def to_crlf(block: bytes) -> bytes:
    """Every bare CR or LF made CRLF."""
    return _BARE.sub(b"\r\n", block)


def has_bare_newline(block: bytes) -> bool:
    """A CR not followed by LF, or an LF not preceded by CR (three C-speed counts)."""
    lfs = block.count(b"\n")  # the one-byte counts first: they are the cheaper
    return block.count(b"\r") != lfs or block.count(b"\r\n") != lfs


def unstuffed(block: bytes) -> bytes:
    """The leading dot of every line after a CRLF removed (a block cut at line ends)."""
    return block.replace(b"\r\n.", b"\r\n")


def on_the_wire(body: bytes) -> bytes:
    """A stored body as DATA sends it: CRLF line endings, a dot doubled at the start
    of a line (RFC 5321 §4.5.2), and the final ``.`` line."""
    if has_bare_newline(body):
        body = to_crlf(body)
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    stuffed = body.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n"
