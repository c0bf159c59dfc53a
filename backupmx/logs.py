"""Log setup, once per process, at start-up: structlog with contextvars.

JSON lines when stdout is not a terminal (journald, files, tests), readable
console lines otherwise.  Every event of an SMTP session carries ``session`` and
``client``; once DATA starts, ``queue_id`` too (bound in `receive.session`).

One event, one line, one write(2).  ``serve`` and its intake process share stdout
(a file, a pipe, journald's stream): an event that reaches it in two writes lets
the other process's event land inside it, and the JSON no longer parses.  print()
writes the newline apart, and a TextIOWrapper or BufferedWriter may split a long
line, depending on PYTHONUNBUFFERED.  So every event is rendered to bytes with its
newline and handed to os.write once (`LineWriter`).  A pipe keeps a write whole
only up to PIPE_BUF, so a JSON event is kept within `MAX_LINE` bytes: its longest
values are shortened in the middle until it fits (`bounded`), keeping the start
and the end of a client's huge HELO, a primary's long reply, a traceback.

Records of other libraries through the standard `logging` module (asyncio,
aiosmtpd, Python's warnings) take the same path, as ``library_log`` events at
warning level and above, so nothing else writes to stdout or stderr unasked.
"""

from __future__ import annotations

import json
import logging
import os
import select
import sys
import threading
from collections.abc import Mapping
from typing import Any

import structlog

# PIPE_BUF on Linux: the largest write a pipe never interleaves with another
# writer's (POSIX guarantees 512; Linux and the BSDs 4096 or more).  An O_APPEND
# file and journald's stream socket take such a line whole as well.
MAX_LINE = 4096
# The first width values are shortened to, then a quarter of it each round: a line
# over MAX_LINE usually has one long value (a HELO, a reply, a traceback), which the
# first round cuts; the rounds stop at the shortest width.
_WIDTHS = (1024, 256, 64, 16)
_KEPT = ("timestamp", "level", "event")  # what is left when no width fits (many keys)


class LineWriter:
    """A structlog logger that writes each rendered line (bytes, newline included) to
    a file descriptor in one os.write, continuing only after a short write.  A line
    that cannot be written (stdout closed) is dropped: a log line is not worth a
    failed delivery or SMTP session."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._lock = threading.Lock()  # a short write's rest before another thread's line

    def msg(self, line: bytes) -> None:
        rest = memoryview(line)
        with self._lock:
            while rest:
                try:
                    rest = rest[os.write(self.fd, rest) :]
                except BlockingIOError:  # a shared descriptor set O_NONBLOCK by another
                    select.select((), (self.fd,), ())
                except OSError:
                    return

    debug = info = warning = warn = error = err = critical = exception = fatal = log = msg


def bounded(event: Mapping[str, Any], limit: int = MAX_LINE) -> bytes:
    """The event as one JSON line within `limit` bytes, newline included: values
    shortened in the middle, ever shorter, until it fits."""
    line = _json_line(event)
    for width in _WIDTHS:
        if len(line) <= limit:
            return line
        line = _json_line({key: _shortened(value, width) for key, value in event.items()})
    if len(line) <= limit:
        return line
    return _json_line({key: event[key] for key in _KEPT if key in event} | {"truncated": True})


def _json_line(event: Mapping[str, Any]) -> bytes:
    # ensure_ascii (the default): one character, one byte, so the length is the size.
    return (json.dumps(event, default=repr) + "\n").encode()


def _shortened(value: Any, width: int) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    text = value if isinstance(value, str) else json.dumps(value, default=repr)
    if len(text) <= width:
        return value
    half = width // 2
    return f"{text[:half]}…{text[-half:]}"


def _json_renderer(_: Any, __: str, event: structlog.types.EventDict) -> bytes:
    return bounded(event)


def _console_renderer() -> structlog.types.Processor:
    console = structlog.dev.ConsoleRenderer()

    def render(logger: Any, name: str, event: structlog.types.EventDict) -> bytes:
        return (str(console(logger, name, event)) + "\n").encode()

    return render


class _Forward(logging.Handler):
    """A record of the standard `logging` module, as a ``library_log`` event."""

    def emit(self, record: logging.LogRecord) -> None:
        structlog.get_logger().log(
            record.levelno,
            "library_log",
            logger=record.name,
            message=record.getMessage(),
            exc_info=record.exc_info,
        )


def configure(level: str = "info") -> None:
    renderer = _console_renderer() if sys.stdout.isatty() else _json_renderer
    writer = LineWriter(sys.stdout.fileno())
    sys.stdout.flush()  # anything print()ed before goes out before the first event
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=lambda *_: writer,
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(handlers=[_Forward()], level=logging.WARNING, force=True)
    logging.captureWarnings(True)


def level() -> str:
    """The level `configure` set, by name: a child process logs at the same one."""
    logger = structlog.get_logger().bind()
    return str(logging.getLevelName(logger.get_effective_level())).lower()
