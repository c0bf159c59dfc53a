"""The pure parts of the metrics: reply reasons, domain labels, the queue summary line.

No server and no HTTP: `metrics.reason` names a refusal by its enhanced status
code, `metrics.domain_label` keeps label values to the backed-up domains (and
``other``), and `QueueView.summary` is the one line STATUS= and the log carry.
The endpoint itself, scraped from a real ``backupmx serve``, is in
tests/integration/test_metrics.py.
"""

from __future__ import annotations

from datetime import timedelta

from backupmx import metrics
from backupmx.mail.address import RelayDomains
from backupmx.queue.records import DomainState, DomainStats, Stats, utcnow


def test_reply_reasons_are_named_by_enhanced_status_code() -> None:
    assert metrics.reason("552 5.3.4 Error: message size exceeds fixed limit") == "too_big"
    assert metrics.reason("451 4.3.0 Error: queue file write error") == "storage_error"
    assert metrics.reason("550 5.7.1 Relay access denied") == "denied"
    assert metrics.reason("550 5.9.9 something new") == "5.9.9"


def test_domain_labels_are_the_backed_up_domains_and_other() -> None:
    metrics.follow(RelayDomains(["example.com", ".example.org"]))
    try:
        assert metrics.domain_label("EXAMPLE.com") == "example.com"
        assert metrics.domain_label("mx.example.org") == "mx.example.org"
        assert metrics.domain_label("sender.test") == metrics.OTHER
        assert metrics.domain_label("not a domain") == metrics.OTHER
    finally:
        metrics.follow(RelayDomains(()))


def test_queue_summary_names_the_primaries_that_are_down() -> None:
    metrics.follow(RelayDomains(["example.com", "example.net"]))
    try:
        now = utcnow()
        stats = Stats(
            3,
            {"queued": 4, "sending": 1, "held": 2, "delivered": 9, "bounced": 0, "expired": 0},
            now,
            [DomainStats("example.com", {"queued": 4, "sending": 1, "held": 2}, now)],
        )
        states = {
            name: DomainState(name, state, now - timedelta(hours=1), None, None, None, None)
            for name, state in [("example.com", "down"), ("example.net", "up"), ("x.test", "down")]
        }
        summary = metrics.QueueView(stats, states).summary()
    finally:
        metrics.follow(RelayDomains(()))
    assert summary == (
        "queue: 3 message(s), 5 recipient(s) waiting, 2 held; primary down: example.com"
    )
