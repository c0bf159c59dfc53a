"""The README's quick start, pure: exactly two commands, and CI runs the second.

Running the first (install and serve) and checking the README's configuration
example are in tests/integration/test_readme.py.
"""

from __future__ import annotations

from tests.support.readme import ROOT, readme_commands


def test_readme_has_exactly_two_quick_start_commands_and_ci_runs_the_second() -> None:
    serve, tests = readme_commands()
    assert "backupmx serve" in serve and "127.0.0.1:2525" in serve
    assert tests == "bash tests/run.sh"
    assert "exec bash tests/run.sh" in (ROOT / ".ci" / "run").read_text()
