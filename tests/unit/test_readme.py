"""The README's quick start, pure: exactly two commands, and CI runs the second; the
test command's note names every package tests/run.sh installs; the install guide
names the Python that pyproject.toml requires.

Running the first (install and serve) and checking the README's configuration
example are in tests/integration/test_readme.py; following the install guide is
tests/integration/test_install_guide.py.
"""

from __future__ import annotations

import re
import tomllib

from tests.support.readme import ROOT, readme_commands


def test_readme_has_exactly_two_quick_start_commands_and_ci_runs_the_second() -> None:
    serve, tests = readme_commands()
    assert "backupmx serve" in serve and "127.0.0.1:2525" in serve
    assert tests == "bash tests/run.sh"
    assert "exec bash tests/run.sh" in (ROOT / ".ci" / "run").read_text()


def test_readme_says_what_the_test_command_installs() -> None:
    script = (ROOT / "tests" / "run.sh").read_text()
    (packages,) = re.findall(r"apt-get install -y [^\n]*?\\\n(.*?)>/dev/null", script, re.S)
    quick_start = (ROOT / "README.md").read_text().split("## Quick start", 1)[1]
    note = quick_start.split("\n## ", 1)[0]
    assert "disposable" in note and "docker run" in note
    missing = [p for p in packages.replace("\\", " ").split() if f"`{p}`" not in note]
    assert not missing, f"the README's note on tests/run.sh does not name {missing}"


def test_install_guide_names_the_python_pyproject_requires() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (minimum,) = re.findall(r">=\s*(\d+\.\d+)", project["requires-python"])
    guide = (ROOT / "README.md").read_text().split("\n## Install as a service\n", 1)[1]
    assert f"Python {minimum} or newer" in guide.split("\n## ", 1)[0]
