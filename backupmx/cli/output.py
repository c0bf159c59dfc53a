"""What the CLI's verbs print: JSON for scripts, aligned tables and short ages for
people, and every text a client or a remote host chose made `printable` first.

Human output shows what clients and remote hosts sent (HELO, addresses, headers,
replies): a control character reaching the operator's terminal could move the
cursor, retitle the window or forge a line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any


def json_text(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


def age(then: datetime, now: datetime | None = None) -> str:
    """Age as its largest whole unit, like qshape's buckets: 45s, 12m, 3h, 2d."""
    return span(((now or datetime.now(UTC)) - then).total_seconds())


def span(duration: float) -> str:
    """Seconds as their largest whole unit: 45s, 12m, 3h, 2d."""
    seconds = max(int(duration), 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


# C0 but TAB, DEL and C1 (ECMA-48, C1 as U+0080-U+009F once decoded): a terminal
# acts on them, and ESC or CSI starts a sequence.  With them escaped the rest of a
# sequence is inert text.  TAB only moves the cursor on (and folds headers).
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """Client- or remote-supplied text for a terminal: control characters as ``\\xNN``."""
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = column_widths(headers, rows)
    return "\n".join(aligned(row, widths) for row in [headers, *rows])


def column_widths(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[int]:
    return [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]


def aligned(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
