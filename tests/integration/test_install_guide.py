"""The README's "Install as a service" guide, followed step by step under a temporary root.

Every command of the guide's ``sh`` blocks is run, in order, from the repository,
with its absolute paths (/etc, /opt, /var) moved under a temporary directory and
systemd's tools given ``--root``, so the test needs no systemd running and
changes nothing on the machine.  A few steps cannot run as written in a test;
each has a stand-in here that checks the same promise (`STAND_INS`).  A command
the test does not know fails it: the guide cannot grow a step nobody checked.

Afterwards the temporary root must hold what the guide promises: a system user
``backupmx`` without a login shell, ``/etc/backupmx`` readable by root and that
group only, the queue directory owned by the user, the configuration readable
by the group, the unit installed and enabled, and its ``ExecStart`` able to run.
"""

from __future__ import annotations

import re
import shlex
import shutil
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = "/etc/systemd/system/backupmx.service"

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None,
    reason="systemd-sysusers and systemd-tmpfiles (Debian: systemd) are needed",
)


def guide_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    guide = text.split("\n## Install as a service\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^( *)```sh\n(.*?)\n\1```", guide, re.S | re.M)
    return [
        line for _, block in blocks for line in textwrap.dedent(block).splitlines() if line.strip()
    ]


def moved(text: str, root: Path) -> str:
    """Absolute /etc, /opt and /var paths moved under `root`."""
    return re.sub(r"(?<![\w/.])/(opt|etc|var)/", lambda m: f"{root}/{m.group(1)}/", text)


def run(command: str) -> None:
    result = subprocess.run(
        ["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"{command}\n{result.stdout}{result.stderr}"


def id_of(root: Path, database: str, name: str) -> int:
    for line in (root / "etc" / database).read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2])
    raise AssertionError(f"{name} not in {database}")


# --------------------------------------------------------------------------- stand-ins


def install_package(command: str, root: Path) -> None:
    """pip installing backupmx is what the quick-start test does for real (test_readme);
    here the venv's program is a wrapper around the backupmx under test."""
    match = re.fullmatch(r"python3 -m venv (/opt/backupmx) && \1/bin/pip install \.", command)
    assert match, command
    program = Path(moved(match.group(1), root)) / "bin" / "backupmx"
    program.parent.mkdir(parents=True)
    program.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m backupmx "$@"\n')
    program.chmod(0o755)


def install(command: str, root: Path) -> None:
    """`install` under the temporary root; the configuration's SQLite queue moved there
    too, since `config check` checks that its directory (made by tmpfiles) is writable."""
    run(moved(command, root))
    target = Path(moved(command.split()[-1], root))
    if target.suffix == ".toml":
        text = target.read_text().replace("sqlite:////var/", f"sqlite:///{root}/var/")
        target.write_text(text)


def with_root(command: str, root: Path) -> None:
    tool, rest = command.split(" ", 1)
    run(f"{tool} --root={root} {rest}")


def chgrp(command: str, root: Path) -> None:
    """Names resolve in the temporary root's /etc/group, not the machine's."""
    _, group, path = command.split()
    run(f"chgrp {id_of(root, 'group', group)} {moved(path, root)}")


def edit(command: str, root: Path) -> None:
    """The administrator's edit: the example is used as it is (it must be valid as shipped)."""
    assert command == "editor /etc/backupmx/backupmx.toml"


def as_service_user(command: str, root: Path) -> None:
    """runuser needs the user in the machine's passwd: run the command as ourselves."""
    assert command.startswith("runuser -u backupmx -- ")
    run(moved(command.removeprefix("runuser -u backupmx -- "), root))


def verify_unit(command: str, root: Path) -> None:
    """systemd-analyze verify checks that ExecStart= exists: verify the unit with its
    paths moved under the temporary root, where the program was installed."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze (Debian: systemd) missing")
    unit = Path(moved(command.split()[-1], root))
    copy = root / "verify" / unit.name
    copy.parent.mkdir()
    copy.write_text(moved(unit.read_text(), root))
    run(f"systemd-analyze verify {copy}")


def systemctl(command: str, root: Path) -> None:
    """No service manager runs in a test: `enable` is done offline (--root); `--now`,
    daemon-reload and status are checked by running the unit's ExecStart instead."""
    argv = command.split()
    if argv[1] == "enable":
        run(f"systemctl --root={root} enable {argv[-1]}")
    else:
        assert argv[1] in ("daemon-reload", "status"), command


STAND_INS: list[tuple[str, Callable[[str, Path], None]]] = [
    (r"python3 -m venv .*", install_package),
    (r"install .*", install),
    (r"systemd-(sysusers|tmpfiles) .*", with_root),
    (r"chgrp .*", chgrp),
    (r"editor .*", edit),
    (r"runuser .*", as_service_user),
    (r"systemd-analyze verify .*", verify_unit),
    (r"systemctl .*", systemctl),
]


def follow(command: str, root: Path) -> None:
    for pattern, step in STAND_INS:
        if re.fullmatch(pattern, command):
            step(command, root)
            return
    raise AssertionError(f"the install guide has a step this test does not know: {command}")


# --------------------------------------------------------------------------- the guide


def test_install_guide_sets_up_user_directories_config_and_unit(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    commands = guide_commands()
    assert any(c.startswith("systemd-sysusers") for c in commands)
    for command in commands:
        follow(command, root)

    passwd = {
        line.split(":")[0]: line.split(":")
        for line in (root / "etc" / "passwd").read_text().splitlines()
    }
    user = passwd["backupmx"]
    assert 0 < int(user[2]) < 1000, "a system user"
    assert user[5] == "/var/lib/backupmx" and user[6].endswith("nologin")
    uid, gid = id_of(root, "passwd", "backupmx"), id_of(root, "group", "backupmx")

    def owner_and_mode(path: str) -> tuple[int, int, int]:
        info = Path(moved(path, root)).stat()
        return info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)

    assert owner_and_mode("/etc/backupmx/") == (0, gid, 0o750)
    assert owner_and_mode("/var/lib/backupmx/") == (uid, gid, 0o750)
    assert owner_and_mode("/etc/backupmx/backupmx.toml") == (0, gid, 0o640)
    installed = Path(moved(UNIT, root))
    assert installed.read_text() == (ROOT / "deploy" / "backupmx.service").read_text()
    wants = root / "etc/systemd/system/multi-user.target.wants/backupmx.service"
    assert wants.is_symlink() and str(wants.readlink()) == UNIT

    # What `systemctl enable --now` would start: the unit's ExecStart, with the
    # configuration it names (checked rather than served: no port 25 in a test).
    (exec_start,) = re.findall(r"^ExecStart=(.*)$", installed.read_text(), re.M)
    assert exec_start.endswith(" serve")
    run(moved(exec_start.removesuffix(" serve") + " config check", root))
