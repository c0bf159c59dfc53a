"""`backupmx status` and `queue …` output helpers, pure: the queue-age bar chart, the
disk line, and the progress bar of long bulk actions.

The commands themselves, run as an operator runs them against a populated queue,
are in tests/integration/test_status.py.
"""

from __future__ import annotations

import io

from backupmx.cli.queue import Progress
from backupmx.cli.status import bar_chart, space_line


def test_bar_chart_scales_to_the_largest_bucket() -> None:
    histogram = [("< 5m", 2), ("5m-1h", 0), ("1h-4h", 1), ("> 5d", 1)]
    lines = bar_chart(histogram).splitlines()
    assert [line.count("#") for line in lines] == [40, 0, 20, 20]
    assert [line.split()[-1] for line in lines] == ["2", "0", "1", "1"]


def test_disk_line_says_what_the_queue_takes_and_what_is_free_beside_it() -> None:
    assert space_line(1536 * 1024, 20 * 1024**3) == (
        "1.5 MiB used by the queue, 20.0 GiB free beside it"
    )
    assert space_line(512, 3 * 1024**4) == "512 B used by the queue, 3.0 TiB free beside it"
    # PostgreSQL: the free space is the database server's, not ours to see.
    assert space_line(8 * 1024**3, None) == "8.0 GiB used by the queue"


def test_progress_bar_is_drawn_only_on_a_terminal_for_long_actions() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    progress = Progress("delete", 2000, screen)
    progress.advance(500)
    progress.advance(1500)
    progress.done()
    assert screen.getvalue() == (
        "\rdelete [#######.......................] 500/2000"
        "\rdelete [##############################] 2000/2000\n"
    )
    quiet = Terminal()
    Progress("delete", 10, quiet).advance(10)  # one batch: nothing to watch
    piped = io.StringIO()
    Progress("delete", 2000, piped).advance(2000)
    assert quiet.getvalue() == piped.getvalue() == ""
