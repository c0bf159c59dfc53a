"""The README's quick start, as the tests read it: its ``sh`` blocks, in order."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    quick_start = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)\n```", quick_start, re.S)


def quick_start_session() -> list[str]:
    """The commands of the quick start's ``console`` block (its ``$`` lines), in order."""
    text = (ROOT / "README.md").read_text()
    quick_start = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    (session,) = re.findall(r"```console\n(.*?)\n```", quick_start, re.S)
    return [line[2:] for line in session.splitlines() if line.startswith("$ ")]
