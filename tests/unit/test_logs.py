"""One event, one line, one write: the bound on a line and the writer (backupmx.logs)."""

from __future__ import annotations

import json
import os
import threading

from backupmx.logs import MAX_LINE, LineWriter, bounded


def test_a_short_event_is_written_as_it_is() -> None:
    event = {"event": "message_accepted", "queue_id": "A1", "rcpts": 3, "tls": None}
    assert bounded(event) == (json.dumps(event) + "\n").encode()


def test_a_huge_value_keeps_its_start_and_end_within_a_pipe_write() -> None:
    helo = "start" + "h" * 100_000 + "end"
    line = bounded({"event": "callout", "helo": helo, "session": "S1"})
    assert len(line) <= MAX_LINE and line.endswith(b"\n") and line.count(b"\n") == 1
    record = json.loads(line)
    assert record["session"] == "S1"
    assert record["helo"].startswith("start") and record["helo"].endswith("end")
    assert "…" in record["helo"]


def test_a_traceback_keeps_its_last_line() -> None:
    trace = "Traceback (most recent call last):\n" + "  frame\n" * 2000 + "OSError: disk full"
    record = json.loads(bounded({"event": "command_failed", "exception": trace}))
    assert record["exception"].endswith("OSError: disk full")


def test_non_ascii_values_are_bounded_by_their_encoded_size() -> None:
    line = bounded({"event": "recipient_rejected", "recipient": "ü" * 3000})
    assert len(line) <= MAX_LINE
    json.loads(line)


def test_too_many_keys_leave_the_event_marked_truncated() -> None:
    event = {"event": "x", "level": "info", **{f"key{n}": n for n in range(1000)}}
    assert json.loads(bounded(event)) == {"event": "x", "level": "info", "truncated": True}


def test_a_line_larger_than_the_pipe_arrives_whole_through_a_non_blocking_pipe() -> None:
    """Short writes and EAGAIN on a descriptor someone made non-blocking: the writer
    goes on with the rest, so the line is never cut."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    line = b"x" * 300_000 + b"\n"
    received = bytearray()

    def reader() -> None:
        while chunk := os.read(read_end, 1 << 16):
            received.extend(chunk)

    thread = threading.Thread(target=reader)
    thread.start()
    LineWriter(write_end).msg(line)
    os.close(write_end)
    thread.join(10)
    os.close(read_end)
    assert bytes(received) == line


def test_a_closed_output_drops_the_line_without_raising() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    LineWriter(write_end).msg(b"lost\n")  # EPIPE: a log line is not worth a session
    os.close(write_end)
