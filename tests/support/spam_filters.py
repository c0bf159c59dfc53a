"""Real spam filters for the spam-hook tests: SpamAssassin's spamd and rspamd, on loopback.

`Spamd` runs Debian's ``/usr/sbin/spamd`` with network tests off (``--local``:
no DNS blocklists, no Razor/Pyzor), no per-user configuration, and two
children; as root it drops to ``nobody``.  It takes a few seconds to load its
rules, so the tests share one per module.

`Rspamd` runs Debian's ``/usr/bin/rspamd`` in the foreground with the packaged
configuration and a private ``LOCAL_CONFDIR`` that binds its normal worker to a
loopback port, turns the proxy and fuzzy workers off and points its resolver
at a closed port (no network lookups); its database and run directories are
temporary.  Start-up compiles its rules and takes up to half a minute.

Every wait is bounded (`START_SECONDS`); a process that exits or stays silent
raises RuntimeError with its log.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from tests.support.ports import free_port
from tests.support.waiting import ProcessExited, wait_for_process_port

SPAMD = "/usr/sbin/spamd"
RSPAMD = "/usr/bin/rspamd"
START_SECONDS = 60.0
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def _wait_for_port(process: subprocess.Popen[bytes], port: int, log: Path, name: str) -> None:
    try:
        wait_for_process_port(process, "127.0.0.1", port, START_SECONDS, interval=0.1)
    except ProcessExited:
        raise RuntimeError(f"{name} exited: {log.read_text(errors='replace')[-3000:]}") from None
    except TimeoutError:
        process.kill()
        raise RuntimeError(
            f"{name} did not listen on {port}: {log.read_text(errors='replace')[-3000:]}"
        ) from None


def _stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class Spamd:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.log = directory / "spamd.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Spamd:
        user = ["--username=nobody"] if os.geteuid() == 0 else []
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    SPAMD,
                    f"--listen=127.0.0.1:{self.port}",
                    "--allowed-ips=127.0.0.1",
                    "--local",
                    "--nouser-config",
                    *user,
                    f"--pidfile={self.directory / 'spamd.pid'}",
                    "--max-children=2",
                    "--min-children=1",
                    "--syslog=stderr",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its children go with it
            )
        _wait_for_port(self.process, self.port, self.log, "spamd")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None


class Rspamd:
    def __init__(self) -> None:
        # rspamd drops to its own user, which must reach these directories.
        self.directory = Path(tempfile.mkdtemp(prefix="backupmx-rspamd-"))
        self.port = free_port()
        self.log = self.directory / "rspamd.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Rspamd:
        local = self.directory / "local"
        override = local / "override.d"
        override.mkdir(parents=True)
        for name in ("db", "run"):
            (self.directory / name).mkdir()
        (override / "worker-normal.inc").write_text(
            f'bind_socket = "127.0.0.1:{self.port}";\ncount = 1;\n'
        )
        (override / "worker-controller.inc").write_text(
            f'bind_socket = "127.0.0.1:{free_port()}";\ncount = 1;\n'
        )
        (override / "worker-proxy.inc").write_text("enabled = false;\n")
        (override / "worker-fuzzy.inc").write_text("enabled = false;\n")
        nowhere = f"127.0.0.1:{free_port()}"  # no network lookups: a closed port
        (override / "options.inc").write_text(
            f'dns {{ nameserver = ["{nowhere}"]; timeout = 0.2s; retransmits = 1; }}\n'
        )
        (override / "logging.inc").write_text(
            f'type = "file";\nfilename = "{self.log}";\nlevel = "info";\n'
        )
        user = ["-u", "_rspamd", "-g", "_rspamd"] if os.geteuid() == 0 else []
        if user:
            shutil.chown(self.directory, "_rspamd", "_rspamd")
            for path in self.directory.rglob("*"):
                shutil.chown(path, "_rspamd", "_rspamd")
        self.process = subprocess.Popen(
            [
                RSPAMD,
                "-f",
                *user,
                "-c",
                "/etc/rspamd/rspamd.conf",
                f"--var=LOCAL_CONFDIR={local}",
                f"--var=DBDIR={self.directory / 'db'}",
                f"--var=RUNDIR={self.directory / 'run'}",
                f"--var=LOGDIR={self.directory}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.log.touch()
        _wait_for_port(self.process, self.port, self.log, "rspamd")
        return self

    def stop(self) -> None:
        _stop(self.process)
        self.process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
