"""Log setup, once, at start-up: structlog with contextvars.

JSON lines when stdout is not a terminal (journald, files, tests), readable
console lines otherwise.  Every event of an SMTP session carries ``session`` and
``client``; once DATA starts, ``queue_id`` too (bound in `receive.session`).
"""

from __future__ import annotations

import logging
import sys

import structlog


def configure(level: str = "info") -> None:
    renderer: structlog.types.Processor
    if sys.stdout.isatty():
        renderer = structlog.dev.ConsoleRenderer()
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        # One write per record, newline included: print() writes the newline apart, and
        # unbuffered (PYTHONUNBUFFERED) the intake process's records, on the same stdout,
        # landed between a record and its newline: two records on one line.
        logger_factory=structlog.WriteLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=True,
    )


def level() -> str:
    """The level `configure` set, by name: a child process logs at the same one."""
    logger = structlog.get_logger().bind()
    return str(logging.getLevelName(logger.get_effective_level())).lower()
