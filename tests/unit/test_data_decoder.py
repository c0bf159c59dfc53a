"""DataDecoder: end of data only at <CRLF>.<CRLF>, dot-unstuffing, bare CR/LF policy;
ReceivedCounter: Received: fields over the whole header section, however it is cut."""

from __future__ import annotations

import itertools
import random

import pytest

from backupmx.receive.data import DataDecoder, ReceivedCounter


def decode(
    stream: bytes, *, normalize: bool = True, max_size: int = 10**9, chunk: int = 0, block: int = 1
):
    out: list[bytes] = []
    decoder = DataDecoder(out.append, max_size, normalize, block)
    used = 0
    pieces = (
        [stream] if not chunk else [stream[i : i + chunk] for i in range(0, len(stream), chunk)]
    )
    for piece in pieces:
        used += decoder.feed(piece)
        if decoder.done:
            break
    return b"".join(out), decoder, used


def test_ends_only_at_crlf_dot_crlf_and_returns_what_follows() -> None:
    body, decoder, used = decode(b"Subject: a\r\n\r\nhello\r\n.\r\nQUIT\r\n")
    assert decoder.done
    assert body == b"Subject: a\r\n\r\nhello\r\n"
    assert used == len(b"Subject: a\r\n\r\nhello\r\n.\r\n")


def test_empty_message() -> None:
    body, decoder, used = decode(b".\r\nQUIT\r\n")
    assert decoder.done and body == b"" and used == 3


@pytest.mark.parametrize(
    "variant",
    [b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\r\n.\n", b"\r.\n", b"\r\n\x00.\r\n"],
)
def test_smuggling_variants_do_not_end_data(variant: bytes) -> None:
    stream = b"a" + variant + b"MAIL FROM:<evil@x>\r\n" + b"\r\n.\r\n"
    body, decoder, _ = decode(stream)
    assert decoder.done
    assert b"MAIL FROM:<evil@x>" in body
    stripped = body.replace(b"\r\n", b"")
    assert b"\r" not in stripped and b"\n" not in stripped


def test_bare_newlines_are_noted_when_rejecting() -> None:
    _, decoder, _ = decode(b"a\nb\r\n.\r\n", normalize=False)
    assert decoder.bare_newline


def test_clean_crlf_message_has_no_bare_newline() -> None:
    _, decoder, _ = decode(b"a\r\nb\r\n.\r\n")
    assert not decoder.bare_newline


def test_dot_unstuffing() -> None:
    body, _, _ = decode(b"..\r\n..foo\r\n.bar\r\nx.\r\n.\r\n")
    assert body == b".\r\n.foo\r\nbar\r\nx.\r\n"


def test_long_lines_are_kept() -> None:
    line = b"x" * 70000
    body, decoder, _ = decode(line + b"\r\n.\r\n", chunk=4096)
    assert decoder.done and body == line + b"\r\n"


def test_too_big_is_reported_after_the_end() -> None:
    _, decoder, _ = decode(b"x" * 5000 + b"\r\n.\r\nNOOP\r\n", max_size=1000, chunk=100)
    assert decoder.done and decoder.too_big


def test_any_chunking_gives_the_same_result() -> None:
    rng = random.Random(5321)
    alphabet = [b"a", b"\r\n", b".", b"\r", b"\n", b"\r\n.", b"..", b"\r\r", b"\n\n"]
    for _ in range(500):
        stream = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) + b"\r\n.\r\n"
        for normalize in (True, False):
            body, whole, _ = decode(stream, block=10**9, normalize=normalize)
            for chunk in (1, 2, 3, 7):
                for block in (1, 2, 4, 9, 16):
                    again, decoder, _ = decode(
                        stream, chunk=chunk, block=block, normalize=normalize
                    )
                    assert again == body, stream
                    assert decoder.bare_newline == whole.bare_newline, stream


def count_received(stream: bytes, cuts: list[int] | None = None) -> ReceivedCounter:
    """Feed `stream` cut at the offsets `cuts` (sorted)."""
    counter = ReceivedCounter()
    edges = [0, *(cuts or []), len(stream)]
    for start, end in itertools.pairwise(edges):
        counter.feed(stream[start:end])
    return counter


def test_received_headers_counted_in_header_section_only() -> None:
    head = b"Received: a\r\nreceived : b\r\nSubject: x\r\n\r\nReceived: in body\r\n"
    counter = count_received(head)
    assert counter.count == 2 and counter.done


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        (b"\r\nReceived: in the body\r\n", 0),  # an empty header section
        (b"X-Received: no\r\nSubject: Received: no\r\n\r\n", 0),
        (b"RECEIVED:\t\t:\r\nReceived \t  \t: y\r\nReceivedX: no\r\n\r\n", 2),
        (b"Subject: x\r\n Received: folded, not a field\r\n\r\n", 0),
        (b"Received: a\r\nReceived: b", 2),  # no body, no empty line
    ],
)
def test_received_fields_are_field_names_at_a_line_start(stream: bytes, expected: int) -> None:
    assert count_received(stream).count == expected


def test_every_cut_of_the_stream_gives_the_same_count() -> None:
    stream = (
        b"Received: from a\r\n\tby b\r\nreceived \t : c\r\nX-Received: no\r\n"
        b"Subject: x\r\nRECEIVED:d\r\n\r\nReceived: in the body\r\n\r\n"
    )
    assert count_received(stream).count == 3
    for first in range(len(stream) + 1):
        for second in range(first, len(stream) + 1):
            assert count_received(stream, [first, second]).count == 3, (first, second)
    assert count_received(stream, list(range(len(stream)))).count == 3  # a byte at a time


def test_received_fields_past_300_kib_of_other_headers_are_counted() -> None:
    filler = b"X-Filler: " + b"f" * 1000 + b"\r\n"
    stream = filler * 300 + b"Received: hop\r\n" * 101 + b"\r\nbody\r\n"
    rng = random.Random(6)
    for _ in range(50):
        cuts = sorted(rng.sample(range(len(stream)), rng.randint(1, 40)))
        assert count_received(stream, cuts).count == 101


def test_the_carry_between_chunks_stays_small() -> None:
    counter = ReceivedCounter()
    counter.feed(b"Received:" + b" " * 100_000)  # a match already counted; blanks after
    counter.feed(b"\r\nReceived" + b"\t" * 100_000)
    counter.feed(b"x" * 100_000)
    assert counter.count == 1 and len(counter._carry) <= 16
    counter.feed(b":\r\n\r\n")
    assert counter.count == 1 and counter.done
