#!/usr/bin/env python3
"""What stands in for systemctl on the local test's hosts, where no systemd runs.

    unitctl.py --root ROOT start  saldo-replica@sequencer-replica1.service
    unitctl.py --root ROOT kill   UNIT      SIGKILL, as `systemctl kill --signal=KILL` then `stop`
    unitctl.py --root ROOT stop   UNIT      SIGTERM, then SIGKILL after 10 s
    unitctl.py --root ROOT pause  UNIT      SIGSTOP          resume: SIGCONT
    unitctl.py --root ROOT pids             every PID it ever started under ROOT, one a line

`start` reads the unit the deployment rendered under ROOT (ROOT/etc/systemd/system/, its template
for an instance), expands %i, creates its StateDirectory under ROOT/var/lib and runs its ExecStart
in its WorkingDirectory, in a session of its own, output to ROOT/var/log/saldo/INSTANCE.log. The
PID goes to ROOT/run/saldo/UNIT.pid (the unit's current process) and is appended to
ROOT/run/saldo/started.pids (every process it started, for the test to end them all). User= and
the hardening directives are not applied: the test runs as whoever runs it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

UNIT_DIR = "etc/systemd/system"
STOP_TIMEOUT_S = 10.0
GONE_TIMEOUT_S = 10.0


def _unit_file(root: Path, unit: str) -> tuple[Path, str]:
    """The unit's file (its template's for an instance) and its instance name."""
    direct = root / UNIT_DIR / unit
    name, _, suffix = unit.rpartition(".")
    prefix, at, instance = name.partition("@")
    if direct.exists() or not at:
        return direct, instance
    return root / UNIT_DIR / f"{prefix}@.{suffix}", instance


def _service_settings(path: Path, instance: str) -> dict[str, str]:
    settings = {}
    section = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip().replace("%i", instance)
    return settings


def _alive(pid: int) -> bool:
    """Running (a zombie no one reaped yet counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _pid_file(root: Path, unit: str) -> Path:
    return root / "run" / "saldo" / f"{unit}.pid"


def _current_pid(root: Path, unit: str) -> int | None:
    try:
        pid = int(_pid_file(root, unit).read_text())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) else None


def start(root: Path, unit: str) -> int:
    if _current_pid(root, unit) is not None:
        return 0  # like systemctl start of a running unit
    path, instance = _unit_file(root, unit)
    settings = _service_settings(path, instance)
    argv = shlex.split(settings["ExecStart"])
    state = settings.get("StateDirectory")
    if state:
        (root / "var/lib" / state).mkdir(parents=True, exist_ok=True)
    workdir = settings.get("WorkingDirectory", "/")
    workdir_path = root / workdir.lstrip("/")
    environment = dict(os.environ)
    for assignment in shlex.split(settings.get("Environment", "")):
        key, _, value = assignment.partition("=")
        environment[key] = value
    log_dir = root / "var/log/saldo"
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"{instance or unit}.log", "ab") as log:
        process = subprocess.Popen(argv, cwd=workdir_path, env=environment, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    pid_file = _pid_file(root, unit)
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.write_text(f"{process.pid}\n")
    with open(pid_file.parent / "started.pids", "a") as started:
        started.write(f"{process.pid}\n")
    return 0


def _signal_and_wait(pid: int, signum: int, timeout_s: float) -> bool:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.02)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="the host's install root")
    parser.add_argument("action", choices=["start", "kill", "stop", "pause", "resume", "pids"])
    parser.add_argument("unit", nargs="?")
    args = parser.parse_args(argv)
    if args.action == "pids":
        started = args.root / "run" / "saldo" / "started.pids"
        print(started.read_text() if started.exists() else "", end="")
        return 0
    if not args.unit:
        parser.error(f"{args.action} needs a UNIT")
    if args.action == "start":
        return start(args.root, args.unit)
    pid = _current_pid(args.root, args.unit)
    if pid is None:
        return 0 if args.action in ("kill", "stop") else 1
    if args.action == "kill":
        return 0 if _signal_and_wait(pid, signal.SIGKILL, GONE_TIMEOUT_S) else 1
    if args.action == "stop":
        if not _signal_and_wait(pid, signal.SIGTERM, STOP_TIMEOUT_S):
            _signal_and_wait(pid, signal.SIGKILL, GONE_TIMEOUT_S)
        return 0
    os.kill(pid, signal.SIGSTOP if args.action == "pause" else signal.SIGCONT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
