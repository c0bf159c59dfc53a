"""The body of a message on its way into the queue.

Small bodies stay in memory; past `memory_limit` the spool moves to an unlinked
temporary file, so fifty sessions each sending 10 MiB cost disk pages, not
resident memory (Postfix's cleanup streams to its queue file the same way).
The intake process reads a spooled file through its /proc link only while
writing its batch.

Counts the Received: fields of the whole header section as it streams past
(`received`, for the loop check), keeping none of it.  The SHA-256
is computed by the store in its writer thread, off the event loop (100 KiB
costs 0.3 ms).  Disk errors surface as OSError from `write`.
"""

from __future__ import annotations

import os
import tempfile
from typing import IO

from backupmx.queue.records import BytesBody, OpenedFile
from backupmx.receive.data import ReceivedCounter


class Spool:
    def __init__(self, memory_limit: int = 1024 * 1024, directory: str | None = None) -> None:
        self._memory_limit = memory_limit
        self._directory = directory
        self._chunks: list[bytes] = []
        self._file: IO[bytes] | None = None
        self.size = 0
        self.received = ReceivedCounter()

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.size += len(data)
        self.received.feed(data)
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
