"""The local cluster launcher: start saldo processes from a topology, and break them on purpose.

Owns the processes of a lab run or a test. `Cluster` writes the topology file, starts each node as
`python <script> --topology FILE --name NODE` with its output in its own log file, waits until each
answers a STATUS request, and stops, kills (SIGKILL), restarts, pauses (SIGSTOP) and resumes
(SIGCONT) any of them by name.

It leaves no process behind: `close()` (also run by the context manager and at interpreter exit)
resumes paused nodes and stops every node it started, by PID; and each child is started with
PR_SET_PDEATHSIG, so the kernel kills it if the launcher itself dies without cleaning up.
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import fcntl
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import topology as topology_file
from common.log import get_logger
from common.transport.blocking import BlockingConnection

log = get_logger("cluster")

REPO_ROOT = Path(__file__).resolve().parents[2]
STOP_TIMEOUT_S = 5.0
READY_TIMEOUT_S = 15.0

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free on `host` a moment ago (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    """Whether some process listens on host:port now: a bind the way saldo's servers bind fails."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # Like the servers (asyncio's reuse_address): connections left in TIME_WAIT do not count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            return error.errno == errno.EADDRINUSE
        return False


_TCP_LISTEN = "0A"  # a socket's state in /proc/net/tcp
MAX_COMMAND_LINE_CHARS = 160


def _listening_inodes(host: str, port: int) -> set[str]:
    """The inodes of the sockets that listen on `port` at `host` or at every address (Linux /proc,
    where an address is printed as 32-bit words in the machine's byte order)."""
    ipv4 = socket.inet_aton(host)
    word = (ipv4[::-1] if sys.byteorder == "little" else ipv4).hex().upper()
    mapped_prefix = ("0000FFFF" if sys.byteorder == "little" else "FFFF0000")  # the word of ::ffff:
    wanted = {word, "00000000",  # /proc/net/tcp: host, or 0.0.0.0
              "0" * 32, "0" * 16 + mapped_prefix + word}  # /proc/net/tcp6: ::, or ::ffff:host
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, _sep, port_hex = fields[1].partition(":")
            if fields[3] == _TCP_LISTEN and int(port_hex, 16) == port and address in wanted:
                inodes.add(fields[9])
    return inodes


def _command_line(pid: int) -> str:
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    except OSError:
        return "?"
    text = " ".join(word.decode(errors="replace") for word in words)
    return text if len(text) <= MAX_COMMAND_LINE_CHARS else text[:MAX_COMMAND_LINE_CHARS - 3] + "..."


def port_holder(host: str, port: int) -> tuple[int, str] | None:
    """(pid, command line) of the process listening on host:port, as far as this user may see
    (/proc on Linux; `lsof` elsewhere); None when it cannot be told."""
    inodes = _listening_inodes(host, port)
    if inodes:
        targets = {f"socket:[{inode}]" for inode in inodes}
        for process in Path("/proc").iterdir():
            if not process.name.isdigit():
                continue
            try:
                descriptors = list((process / "fd").iterdir())
            except OSError:  # gone, or another user's
                continue
            for descriptor in descriptors:
                try:
                    if os.readlink(descriptor) in targets:
                        return int(process.name), _command_line(int(process.name))
                except OSError:
                    continue
        return None
    if Path("/proc/net/tcp").exists():
        return None
    try:  # macOS and the BSDs: no /proc
        found = subprocess.run(["lsof", "-nP", f"-iTCP@{host}:{port}", "-sTCP:LISTEN", "-Fp"], capture_output=True,
                               text=True, timeout=5.0).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    pids = [int(line[1:]) for line in found.splitlines() if line.startswith("p") and line[1:].isdigit()]
    if not pids:
        return None
    command = subprocess.run(["ps", "-o", "command=", "-p", str(pids[0])], capture_output=True, text=True).stdout.strip()
    return pids[0], command[:MAX_COMMAND_LINE_CHARS] or "?"


class StartFailed(RuntimeError):
    """A node exited while the launcher waited for it to answer STATUS."""


class RunDirInUse(StartFailed):
    """Another launcher's cluster runs from the same directory (its stores, logs and topology file)."""

    def __init__(self, run_dir: Path, holder: str) -> None:
        self.run_dir = run_dir
        super().__init__(f"{run_dir} is in use by another cluster ({holder}): its stores, logs and topology "
                         f"file are there; stop that cluster first, or give this one a directory of its own")


class PortInUse(StartFailed):
    """Addresses a node must listen on are held by another process: a cluster left running, or one
    of its processes started again by hand. `holders`: address -> (pid, command line) or None."""

    def __init__(self, holders: dict[str, tuple[int, str] | None]) -> None:
        self.holders = holders
        self.addresses = list(holders)
        self.pids = sorted({holder[0] for holder in holders.values() if holder is not None})
        super().__init__("; ".join(
            f"{address} is already in use by " + (f"pid {holder[0]} ({holder[1]})" if holder else "another process")
            for address, holder in holders.items()))


@dataclass
class Node:
    """One process of the cluster. `settings` are its flags (its topology entry)."""

    name: str
    script: str  # e.g. "replica.py", or "-m common.lab.proxy"
    host: str
    port: int  # where it answers STATUS
    settings: dict = field(default_factory=dict)
    role: str = "replica"
    store: str | None = None

    def listen_addresses(self) -> list[tuple[str, int]]:
        """Where it listens on its host: its STATUS port and any `*_port` setting (e.g. the
        sequencer's port for replicas)."""
        ports = [self.port] + [value for key, value in self.settings.items() if key.endswith("_port") and type(value) is int]
        return [(self.host, port) for port in dict.fromkeys(ports)]

    def entry(self) -> dict:
        entry = {"script": self.script, "host": self.host, "port": self.port, **self.settings}
        if self.store is not None:
            entry["store"] = self.store
        return entry


RUN_DIR_LOCK_FILE = ".cluster.lock"


def _lock_run_dir(run_dir: Path) -> int:
    """Hold run_dir for this process: two clusters in one directory would share SQLite stores
    (one's replicas then fail on the other's rows) and overwrite each other's topology file. The
    lock is the kernel's (flock), so a launcher that died without cleaning up holds nothing. The
    file says who holds it. The descriptor is not inherited by the nodes (Popen closes it)."""
    path = run_dir / RUN_DIR_LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "a process"
        os.close(fd)
        raise RunDirInUse(run_dir, holder) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()}: {shlex.join(sys.argv)[:150]}\n".encode())
    return fd


def run_dir_in_use(run_dir: Path) -> bool:
    """Whether a launcher holds `run_dir` now (its lock, see _lock_run_dir)."""
    try:
        fd = os.open(run_dir / RUN_DIR_LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # (and the lock with it)
    return False


class Cluster:
    def __init__(self, run_dir: str | Path, nodes: list[Node], *, name: str = "lab", architecture: str | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock_run_dir(self.run_dir)  # raises RunDirInUse; released by close() or at exit
        try:
            self.nodes = {node.name: node for node in nodes}
            assert len(self.nodes) == len(nodes), "node names must be unique"
            self.topology_path = self.run_dir / "topology.json"
            document = {"name": name, "nodes": {n.name: n.entry() for n in nodes}}
            if architecture is not None:
                document["architecture"] = architecture
            topology_file.write(self.topology_path, document)
        except BaseException:
            os.close(self._lock_fd)  # no cluster: the directory is free again
            raise
        self._processes: dict[str, subprocess.Popen] = {}
        self._paused: set[str] = set()
        self._log_files: dict[str, object] = {}
        atexit.register(self.close)

    # --- Starting and stopping ------------------------------------------------------------------
    def log_path(self, name: str) -> Path:
        return self.run_dir / f"{name}.log"

    def _command(self, node: Node) -> list[str]:
        script = node.script.split() if node.script.startswith("-m ") else [str(REPO_ROOT / node.script)]
        return [sys.executable, *script, "--topology", str(self.topology_path), "--name", node.name]

    def command_line(self, name: str) -> str:
        """The shell command that starts `name` by hand the way spawn() does: same directory, same
        flags, output appended to the same log."""
        return (f"cd {shlex.quote(str(REPO_ROOT))} && {shlex.join(self._command(self.nodes[name]))} "
                f">> {shlex.quote(str(self.log_path(name)))} 2>&1")

    def describe_exit(self, name: str) -> str:
        """How the process this cluster started for `name` ended: "(pid 12) was killed by SIGKILL",
        "(pid 12) exited with code 1"; "is running" while it runs."""
        process = self._processes.get(name)
        if process is None:
            return "was never started"
        code = process.poll()
        if code is None:
            return f"(pid {process.pid}) is running"
        if code < 0:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:  # a real-time signal has no name
                how = f"was killed by signal {-code}"
        else:
            how = f"exited with code {code}"
        return f"(pid {process.pid}) {how}"

    def _taken(self, names: list[str]) -> dict[str, tuple[int, str] | None]:
        """The addresses the nodes `names` listen on that another process holds, as "host:port
        (node)", with that process when it can be told (see port_holder)."""
        return {f"{host}:{port} ({name})": port_holder(host, port) for name in names
                for host, port in self.nodes[name].listen_addresses() if port_in_use(host, port)}

    def spawn(self, name: str) -> int:
        """Start one node (not waiting for it); its PID."""
        assert name not in self._processes or self._processes[name].poll() is not None, f"{name} is running"
        node = self.nodes[name]
        previous_log = self._log_files.pop(name, None)
        if previous_log is not None:
            previous_log.close()
        log_file = open(self.log_path(name), "ab")
        self._log_files[name] = log_file
        process = subprocess.Popen(
            self._command(node),
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        self._processes[name] = process
        self._paused.discard(name)
        log.info("node_started", node=name, pid=process.pid, script=node.script)
        return process.pid

    def start(self, names: list[str] | None = None, *, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Start nodes (default: all, in the given order) and wait until each answers. Raises
        PortInUse, before starting any, when another process holds an address one must listen on."""
        names = list(self.nodes) if names is None else names
        taken = self._taken(names)
        if taken:
            raise PortInUse(taken)
        for name in names:
            self.spawn(name)
        for name in names:
            self.wait_ready(name, timeout_s=timeout_s)

    def wait_ready(self, name: str, *, timeout_s: float = READY_TIMEOUT_S) -> dict:
        """Wait until `name` answers STATUS with OK; its status. Raises if it exits or times out.
        The answer must carry the PID this cluster started: another process already listening on
        the node's port (a cluster left running) is not taken for it."""
        node = self.nodes[name]
        deadline = time.monotonic() + timeout_s
        last_error = "no answer"
        while time.monotonic() < deadline:
            process = self._processes.get(name)
            if process is None or process.poll() is not None:
                # Most often it could not listen: say which address is taken rather than "see the log".
                taken = self._taken([name])
                if taken:
                    raise PortInUse(taken)
                raise StartFailed(f"{name} exited (code {process and process.returncode}); see {self.log_path(name)}")
            try:
                status = self.status(name, timeout_s=1.0)
                if status.get("STATUS") == "OK" and status.get("PID") == process.pid:
                    return status
                last_error = (f"{node.host}:{node.port} is answered by pid {status.get('PID')}, not {process.pid}"
                              if status.get("STATUS") == "OK" else str(status))
            except OSError as error:
                last_error = repr(error)
            time.sleep(0.05)
        raise TimeoutError(f"{name} did not answer STATUS at {node.host}:{node.port} within {timeout_s} s: {last_error}")

    def status(self, name: str, *, timeout_s: float = 5.0) -> dict:
        """Ask `name` for its STATUS (raises OSError if it cannot connect)."""
        node = self.nodes[name]
        with BlockingConnection(node.host, node.port, connect_timeout_s=timeout_s) as connection:
            return connection.request({"TASK": "STATUS"}, timeout_s)

    def request(self, name: str, message: dict, *, timeout_s: float = 2.0) -> dict:
        node = self.nodes[name]
        with BlockingConnection(node.host, node.port, connect_timeout_s=timeout_s) as connection:
            return connection.request(message, timeout_s)

    def pid(self, name: str) -> int | None:
        process = self._processes.get(name)
        return None if process is None or process.poll() is not None else process.pid

    def is_running(self, name: str) -> bool:
        return self.pid(name) is not None

    def stop(self, name: str, *, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM (a clean stop), then SIGKILL if it does not exit in time; the exit code."""
        process = self._processes.get(name)
        if process is None or process.poll() is not None:
            return None if process is None else process.returncode
        if name in self._paused:
            self.resume(name)
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("node_stop_timeout_killing", node=name, pid=process.pid)
            process.kill()
            return process.wait()

    def kill(self, name: str) -> None:
        """SIGKILL: the process gets no chance to clean up (a crash)."""
        process = self._processes.get(name)
        if process is None or process.poll() is not None:
            return
        process.kill()
        process.wait()
        self._paused.discard(name)
        log.info("node_killed", node=name, pid=process.pid)

    def restart(self, name: str, *, wait: bool = True, timeout_s: float = READY_TIMEOUT_S) -> None:
        if self.is_running(name):
            self.stop(name)
        self.spawn(name)
        if wait:
            self.wait_ready(name, timeout_s=timeout_s)

    def pause(self, name: str) -> None:
        """SIGSTOP: the process freezes with its sockets open (a stall, a long GC, a VM pause)."""
        pid = self.pid(name)
        assert pid is not None, f"{name} is not running"
        os.kill(pid, signal.SIGSTOP)
        self._paused.add(name)
        log.info("node_paused", node=name, pid=pid)

    def resume(self, name: str) -> None:
        pid = self.pid(name)
        if pid is None:
            self._paused.discard(name)
            return
        os.kill(pid, signal.SIGCONT)
        self._paused.discard(name)
        log.info("node_resumed", node=name, pid=pid)

    def close(self) -> None:
        """Stop every node this cluster started. Safe to call more than once."""
        for name in list(self._paused):
            self.resume(name)
        for name in reversed(list(self._processes)):
            try:
                self.stop(name)
            except Exception as error:  # keep going: leaving no process behind comes first
                log.error("node_stop_failed", node=name, error=repr(error))
                process = self._processes[name]
                if process.poll() is None:
                    process.kill()
        for log_file in self._log_files.values():
            log_file.close()
        self._log_files.clear()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # (closing the descriptor releases the lock)
            self._lock_fd = None
        atexit.unregister(self.close)

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
