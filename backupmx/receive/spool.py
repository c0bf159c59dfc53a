"""The body of a message on its way into the queue.

Small bodies stay in memory; past `memory_limit` the spool moves to an unlinked
temporary file, so fifty sessions each sending 10 MiB cost disk pages, not
resident memory (Postfix's cleanup streams to its queue file the same way).
The intake process reads a spooled file through its /proc link only while
writing its batch.

Keeps the header section, up to `HEAD_SIZE` bytes (for the Received: loop count).  The SHA-256
is computed by the store in its writer thread, off the event loop (100 KiB
costs 0.3 ms).  Disk errors surface as OSError from `write`.
"""

from __future__ import annotations

import os
import tempfile
from typing import IO

from backupmx.queue.store import BytesBody, OpenedFile

HEAD_SIZE = 256 * 1024  # enough header section for 100+ Received: fields


class Spool:
    def __init__(self, memory_limit: int = 1024 * 1024, directory: str | None = None) -> None:
        self._memory_limit = memory_limit
        self._directory = directory
        self._chunks: list[bytes] = []
        self._file: IO[bytes] | None = None
        self.size = 0
        self.head = bytearray()  # the header section, up to HEAD_SIZE
        self._head_done = False

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.size += len(data)
        if not self._head_done:
            self._add_to_head(data)
        if self._file is None and self.size > self._memory_limit:
            # Lives as long as the spool; closed by close().
            self._file = tempfile.TemporaryFile(dir=self._directory)  # noqa: SIM115
            for chunk in self._chunks:
                self._file.write(chunk)
            self._chunks = []
        if self._file is not None:
            self._file.write(data)
        else:
            self._chunks.append(data)

    def _add_to_head(self, data: bytes) -> None:
        start = max(len(self.head) - 3, 0)
        self.head += data[: HEAD_SIZE - len(self.head)]
        end = self.head.find(b"\r\n\r\n", start)
        if end >= 0:
            del self.head[end + 2 :]
        if end >= 0 or len(self.head) >= HEAD_SIZE:
            self._head_done = True

    def read(self) -> bytes:
        if self._file is None:
            return b"".join(self._chunks)
        self._file.flush()
        self._file.seek(0)
        return self._file.read()

    def portable(self) -> BytesBody | OpenedFile:
        """For the intake process: the bytes, or the unlinked file by its /proc link
        (which this process keeps open until the commit is acknowledged)."""
        if self._file is None:
            return BytesBody(b"".join(self._chunks))
        self._file.flush()
        return OpenedFile(f"/proc/{os.getpid()}/fd/{self._file.fileno()}", self.size)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._chunks = []
