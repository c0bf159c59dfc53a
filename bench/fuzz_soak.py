"""Soak the SMTP session fuzzer of tests/integration/test_session_fuzz.py: many more examples.

What runs
    The suite's fuzzer against one real ``backupmx serve`` (the same
    configuration, strategies and properties), while a well-behaved client
    sends mail alongside, in batches of random (not derandomized) examples
    until ``--examples`` have run or ``--seconds`` have passed (checked between
    batches; one batch is about ten seconds at most).  Nothing is shrunk: every
    broken property is counted by kind, and the shortest input that showed
    each kind is kept to reproduce it.

Findings
    Every broken property, and every message of the well-behaved client that
    did not get ``250``, is a finding, and the exit status is 1.  The shortest
    input of each finding is written in full to ``--findings``.

Run from the repository root::

    .venv/bin/python bench/fuzz_soak.py                    # 5 minutes, all three kinds
    .venv/bin/python bench/fuzz_soak.py --seconds 60 --kinds commands

Only loopback addresses are used; the server and its directory are removed on exit.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hypothesis import HealthCheck, Phase, given, settings

from tests.integration.test_session_fuzz import (
    Delivery,
    Grammar,
    ServerLog,
    bystanders,
    deliveries,
    examine,
    fuzz_server,
    random_bytes,
    reached,
)
from tests.support.server import ServerProcess
from tests.support.smtp_client import serving

KINDS = {
    "random": deliveries(random_bytes()),
    "commands": deliveries(Grammar(hostile=False).session()),
    "hostile": deliveries(Grammar(hostile=True).session()),
}
BATCH = 100


def kind_of(problem: str) -> str:
    """A problem's kind: its text up to the first colon, the log event for log lines, the
    reply for a 451."""
    if problem.startswith("log: "):
        return "log: " + problem.split('"event": "', 1)[-1].split('"', 1)[0]
    if problem.startswith("internal or storage error: "):
        return problem.split("'")[1].split(",")[0]
    return problem.split(":", 1)[0][:80]


@dataclass
class Findings:
    examples: Counter[str] = field(default_factory=Counter)  # per input kind
    found: Counter[str] = field(default_factory=Counter)  # examples per finding kind
    shortest: dict[str, tuple[Delivery, list[str]]] = field(default_factory=dict)
    states: Counter[str] = field(default_factory=Counter)

    def record(self, kind: str, delivery: Delivery, problems: list[str]) -> None:
        self.examples[kind] += 1
        if not problems:
            return
        kinds = {kind_of(p) for p in problems if not p.startswith("received: ")}
        for name in kinds:
            self.found[name] += 1
            best = self.shortest.get(name)
            if best is None or len(delivery.data) < len(best[0].data):
                self.shortest[name] = (delivery, problems)


def soak_batch(server: ServerProcess, log: ServerLog, kind: str, findings: Findings) -> None:
    @settings(
        max_examples=BATCH,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(delivery=KINDS[kind])
    def run(delivery: Delivery) -> None:
        replies, problems = examine(server, log, delivery)
        findings.states.update(reached(replies))
        findings.record(kind, delivery, problems)

    run()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=100_000, help="stop after this many")
    parser.add_argument("--seconds", type=float, default=300.0, help="stop after this long")
    parser.add_argument("--kinds", nargs="+", choices=sorted(KINDS), default=sorted(KINDS))
    parser.add_argument(
        "--findings",
        default=str(Path(tempfile.gettempdir()) / "backupmx-fuzz-soak-findings.txt"),
        help="where the shortest input of each finding is written in full",
    )
    args = parser.parse_args()

    findings = Findings()
    with (
        tempfile.TemporaryDirectory(prefix="fuzz-soak-") as directory,
        serving(fuzz_server(Path(directory))) as server,
        bystanders(server) as sender,
    ):
        log = ServerLog(server.log_path)
        started = time.monotonic()
        batch = 0
        while (
            sum(findings.examples.values()) < args.examples
            and time.monotonic() - started < args.seconds
        ):
            kind = args.kinds[batch % len(args.kinds)]
            soak_batch(server, log, kind, findings)
            batch += 1
            ran = sum(findings.examples.values())
            print(
                f"{time.monotonic() - started:7.1f} s  {ran} examples  "
                f"findings {dict(findings.found)}",
                file=sys.stderr,
            )
        elapsed = time.monotonic() - started
        sender.stop()
    return report(findings, elapsed, sender.sent, sender.failures, args.findings)


def report(findings: Findings, elapsed: float, sent: int, failures: list[str], saved: str) -> int:
    total = sum(findings.examples.values())
    print(f"examples: {total} in {elapsed:.0f} s ({total / elapsed:.1f}/s)")
    for kind, count in sorted(findings.examples.items()):
        print(f"  {kind}: {count}")
    print(f"states reached: {len(findings.states)} distinct replies")
    print(f"bystander messages: {sent}, failed: {len(failures)}")
    bystander_kinds = Counter(f[:80] for f in failures)
    for failure, count in bystander_kinds.items():
        print(f"  {count} x {failure}")
    print("findings (examples per kind):" if findings.found else "findings: none")
    for name, count in findings.found.most_common():
        delivery, problems = findings.shortest[name]
        print(f"  {count} x {name}")
        print(f"    shortest input: {delivery.data[:400]!r} cuts={delivery.cuts}")
        print(f"    first problem: {problems[0][:400]}")
    with open(saved, "w") as file:
        for name, (delivery, problems) in findings.shortest.items():
            file.write(f"# {name}\n{delivery!r}\n" + "".join(f"#   {p}\n" for p in problems))
    print(f"shortest inputs in full: {saved}")
    return 1 if findings.found or bystander_kinds else 0


if __name__ == "__main__":
    sys.exit(main())
