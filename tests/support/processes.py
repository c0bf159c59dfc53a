"""The processes of a running `backupmx serve`, read from /proc: its receiver workers
and their intake processes."""

from __future__ import annotations

from pathlib import Path


def children(parent_pid: int, module: bytes) -> list[int]:
    """The children of `parent_pid` whose command line names `module`, by pid."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == parent_pid and module in command:
            found.append(int(entry.name))
    return sorted(found)


def receivers(serve_pid: int) -> list[int]:
    return children(serve_pid, b"backupmx.receive.worker")


def intakes(parent_pid: int) -> list[int]:
    return children(parent_pid, b"backupmx.queue.intake")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
