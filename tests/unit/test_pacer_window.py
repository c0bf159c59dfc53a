"""The pacer's window after refusals (`backupmx.deliver.pacer.delivered` and `congested`),
pure: driven event by event with the time given, no event loop.

A primary that takes 4 sessions turns away the fifth (``421 4.7.0 Too busy``): the
window learns 5 as its ceiling, grows back to 4 as before, and tries 5 again only now
and then, ever more rarely while 5 keeps failing (TCP's congestion avoidance after a
loss, not slow start).
"""

from __future__ import annotations

from backupmx.deliver.pacer import MAX_PROBE_AFTER, PROBE_AFTER, Window, congested, delivered

MAXIMUM = 20


def successes(window: Window, count: int, now: float) -> Window:
    for _ in range(count):
        window = delivered(window, MAXIMUM, now)
    return window


def test_a_window_without_a_ceiling_grows_by_about_one_connection_per_windows_worth() -> None:
    assert successes(Window(2.0), 3, now=0.0).limit == 3
    assert successes(Window(2.0), 7, now=0.0).limit == 4
    assert successes(Window(2.0), 1000, now=0.0).limit == MAXIMUM


def test_after_a_refusal_at_5_a_hundred_successes_stop_at_4() -> None:
    refused = congested(Window(5.0, answered=True), level=5, now=0.0)
    assert refused.limit == 2  # halved, as before
    assert refused.ceiling == 5
    back = successes(refused, 5, now=0.1)
    assert back.limit == 4  # below the ceiling it grows back as before
    assert successes(back, 100, now=1.0).limit == 4  # and no further, however many


def test_the_ceiling_is_tried_again_after_a_while_and_a_probe_that_holds_lifts_it() -> None:
    window = successes(congested(Window(5.0, answered=True), level=5, now=0.0), 10, now=1.0)
    assert window.limit == 4
    assert delivered(window, MAXIMUM, now=PROBE_AFTER - 0.1).limit == 4
    probing = delivered(window, MAXIMUM, now=PROBE_AFTER)
    assert probing.limit == 5  # one more connection: the primary's limit may be higher now
    assert successes(probing, 50, now=PROBE_AFTER + 1).limit == 5  # the probe must hold
    lifted = delivered(probing, MAXIMUM, now=2 * PROBE_AFTER)
    assert lifted.ceiling is None  # it held: grow on as before
    assert successes(lifted, 6, now=2 * PROBE_AFTER).limit == 6


def test_each_failed_probe_doubles_the_wait_before_the_next() -> None:
    now, waits = 0.0, []
    window = congested(Window(5.0, answered=True), level=5, now=now)
    for _ in range(10):
        window = successes(window, 10, now=now)
        refused_at = now
        while window.limit < 5:
            now += 0.5
            window = delivered(window, MAXIMUM, now)
        waits.append(now - refused_at)
        window = congested(window, level=5, now=now)
    assert waits[:4] == [PROBE_AFTER, 2 * PROBE_AFTER, 4 * PROBE_AFTER, 8 * PROBE_AFTER]
    assert max(waits) == MAX_PROBE_AFTER


def test_a_refusal_below_the_ceiling_lowers_it_and_starts_the_waits_again() -> None:
    window = congested(Window(5.0, answered=True), level=5, now=0.0)
    window = congested(successes(window, 10, now=1.0), level=5, now=10.0)
    assert window.patience == 2 * PROBE_AFTER
    lowered = congested(successes(window, 10, now=11.0), level=3, now=12.0)
    assert (lowered.ceiling, lowered.patience) == (3, PROBE_AFTER)
    assert successes(lowered, 100, now=13.0).limit == 2


def test_failures_without_a_delivery_between_them_teach_no_ceiling() -> None:
    """A primary that is down refuses every connection tried, one or several at once:
    the window shrinks, but learns no ceiling that would hold back the ramp once the
    primary is back."""
    window = congested(congested(Window(4.0), level=4, now=0.0), level=2, now=0.0)
    assert (window.limit, window.ceiling) == (1, None)
    alone = congested(Window(4.0, answered=True), level=1, now=0.0)
    assert (alone.limit, alone.ceiling) == (2, None)  # one connection says nothing of a limit
    learned = congested(Window(5.0, answered=True), level=5, now=0.0)
    outage = congested(congested(learned, level=2, now=1.0), level=2, now=2.0)
    assert (outage.ceiling, outage.patience) == (5, PROBE_AFTER)  # kept, not lowered to 2
    assert successes(outage, 20, now=3.0).limit == 4


def test_the_window_stays_within_the_share_whatever_its_ceiling() -> None:
    share = 3  # max_connections_per_host // live nodes
    window = congested(Window(8.0, answered=True), level=8, now=0.0)
    for now in (1.0, PROBE_AFTER, 10 * PROBE_AFTER, 100 * PROBE_AFTER):
        window = delivered(window, share, now)
    assert window.limit == share
    lower = congested(Window(3.0, answered=True), level=3, now=0.0)
    for now in (1.0, 2.0, PROBE_AFTER, 2 * PROBE_AFTER, 100 * PROBE_AFTER):
        lower = delivered(lower, share, now)
    assert lower.limit == share  # the share's own level probed and lifted, never beyond
