"""The DATA phase as a byte-stream decoder: end of data, dot-unstuffing, bare CR/LF.

Theory of operation.  aiosmtpd reads DATA one line at a time, which caps a
100 KiB message at about a third of the speed of a bulk scan, holds the whole
message about four times in memory and answers lines over 1001 bytes with a
permanent 500.  `DataDecoder` is fed whatever the socket delivers and:

* ends the message only at ``<CRLF>.<CRLF>`` (RFC 5321 §4.1.1.4).  Bare LF or CR
  never ends it, which closes the SMTP-smuggling class of CVE-2023-51764;
* cuts the stream at the last line ending seen, turns bare CR or LF into CRLF
  ("normalize", Postfix 3.9's default) or only notes them ("reject"), and
  removes the leading dot of every line (RFC 5321 §4.5.2) with one
  ``bytes.replace`` per block, so the work is done at C speed;
* passes the decoded blocks to a sink (the spool) and keeps only the tail after
  the last line ending (or at most a block of one long line), so memory per
  session stays bounded whatever the client sends;
* counts raw bytes against the size limit and, once past it, only scans for the
  end so that the 552 reply comes after the client's final dot (RFC 5321 §4.2.5).

No line length limit applies: the backup must not refuse what the primary takes.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from backupmx.mail.wire import END_OF_DATA, has_bare_newline, to_crlf, unstuffed

DECODE_BLOCK = 64 * 1024  # bytes gathered before a decode pass (bounds memory per session)


class DataDecoder:
    def __init__(
        self,
        sink: Callable[[bytes], None],
        max_size: int,
        normalize: bool,
        block: int = DECODE_BLOCK,
    ) -> None:
        self._block = block
        self._sink = sink
        self._max_size = max_size
        self._normalize = normalize
        # The CRLF that ended the DATA command opens the body: ".\r\n" first is the end.
        self._pending = bytearray(b"\r\n")
        self._started = False
        self.size = 0  # raw bytes received
        self.too_big = False
        self.bare_newline = False  # a bare CR or LF was seen
        self.done = False
        self._scanned = 0  # pending[:_scanned] holds no line ending but its first

    def feed(self, chunk: bytes) -> int:
        """Take raw bytes; return how many were part of the message (all, until the end)."""
        start = max(len(self._pending) - 4, 0)
        self._pending += chunk
        end = self._pending.find(END_OF_DATA, start)
        if end >= 0:
            used = len(chunk) - (len(self._pending) - end - len(END_OF_DATA))
            self.size += used
            if self.size > self._max_size:
                self.too_big = True
            self._decode(end)
            self._emit_last_line()
            self.done = True
            return used
        self.size += len(chunk)
        if self.size > self._max_size:
            self.too_big = True
            del self._pending[:-4]  # from here on, only the end marker matters
            return len(chunk)
        if len(self._pending) < self._block:
            return len(chunk)  # sockets deliver a few KiB at a time: decode in bulk
        # Cut before the last line ending (CRLF, or a bare LF) of the new bytes only:
        # rescanning the whole tail would make a body without CRLF quadratic.
        newline = self._pending.rfind(b"\n", max(self._scanned, 1))
        if newline > 0:
            self._decode(newline - 1 if self._pending[newline - 1] == 13 else newline)
        elif len(self._pending) > max(self._block, 8):
            # One long line: pass it on too, so a body that is a single 50 MiB line
            # costs no more memory.  The last 4 bytes stay: they hold no LF, so no
            # CRLF is split, and an end marker starting there is still seen.  A bare
            # CR (a line ending once normalised) stays with the line it ends, so the
            # next line's leading dot is unstuffed in the same block.
            cut = len(self._pending) - 4
            self._decode(cut - (self._pending[cut - 1] == 13))
        self._scanned = len(self._pending) - 1
        return len(chunk)

    def _decode(self, cut: int) -> None:
        """Decode pending[:cut], which starts with the line ending before its first line."""
        if cut == 0:
            return
        with memoryview(self._pending) as view:
            block = bytes(view[:cut])
        del self._pending[:cut]
        if self.too_big:
            return
        if has_bare_newline(block):
            self.bare_newline = True
            if self._normalize:
                block = to_crlf(block)
        block = unstuffed(block)
        # Each block starts with the CRLF that ended the previous line; the very
        # first is our virtual one and is not part of the body.
        self._sink(block if self._started else block[2:])
        self._started = True

    def _emit_last_line(self) -> None:
        if not self.too_big and self._started:
            self._sink(b"\r\n")


class ReceivedCounter:
    """Counts ``Received:`` fields (RFC 5321 §6.3 loop detection) over the whole header
    section, fed the stored message in chunks cut anywhere; memory stays a few bytes.

    Every line start is a LF (the stream is read as if preceded by CRLF), so a field is
    ``LF received [ \t]* :`` and the section ends at the first CRLF CRLF.  Between
    chunks only what a match or that end could still need is carried: the line start
    and the part of "received" already seen (a run of blanks kept as one), else the
    last three bytes.
    """

    def __init__(self) -> None:
        self.count = 0
        self.done = False  # the empty line that ends the header section was seen
        self._carry = b"\r\n"

    def feed(self, chunk: bytes) -> None:
        if self.done or not chunk:
            return
        data = self._carry + chunk
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            self.done = True
            data = data[: end + 2]
        self.count += len(_RECEIVED.findall(data))
        self._carry = b"" if self.done else _carry(data)


def _carry(data: bytes) -> bytes:
    line = data.rfind(b"\n")
    if line < 0:
        return data[-3:]
    partial = data[line + 1 :]
    if _RECEIVED_BLANKS.fullmatch(partial):
        partial = b"received "
    elif len(partial) > len(b"received") or not b"received".startswith(partial.lower()):
        return data[-3:]
    return data[max(line - 1, 0) : line + 1] + partial


_RECEIVED = re.compile(rb"(?i)\nreceived[ \t]*:")
_RECEIVED_BLANKS = re.compile(rb"(?i)received[ \t]+")
