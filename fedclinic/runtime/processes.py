"""Start and stop Flower's own daemons (SuperLink, SuperNode) and find every process they start.

Flower-free: this module only runs Flower's commands. Flower detaches the
SuperExec into its own session and Ray (in simulation) starts more processes
under it, so a process group is not enough to stop a run. Every process of one
run carries that run's unique FLWR_HOME in its environment; `stop_processes`
takes the process tree before anything dies, adds every process with that
marker, sends SIGTERM, and SIGKILL to what is left after a grace period.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


class FlowerError(RuntimeError):
    """A Flower daemon or run failed; the message says why and names the log to read."""


def flower_bin(name: str) -> str:
    """Flower's command next to this Python, so the project's venv is used."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment of every Flower process of one run."""
    env = dict(os.environ)
    # the SuperLink starts flower-superexec, flwr-simulation, ... by name
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # unique per run: every process of this run inherits it, which is how stop_processes() finds them
    env["FLWR_HOME"] = str(flwr_home)
    # the app's dependencies are already installed: never `uv sync` 6 GB of torch per run
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    # the behaviour Ray will adopt (and asks for, with a warning per run): leave
    # CUDA_VISIBLE_DEVICES alone for actors that reserve no GPU
    env["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] = "0"
    return env


def _processes() -> dict[int, int]:
    """pid -> parent pid of every live process (Linux /proc)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def descendants(*roots: int) -> set[int]:
    """Every live process under `roots` (children, theirs, ...), the roots themselves not included."""
    parents = _processes()
    found, frontier = set(), set(roots)
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def with_env(marker: str, *, mentioning: str | None = None) -> set[int]:
    """Processes whose environment holds `marker` (NAME=value), e.g. this run's FLWR_HOME, or (with `mentioning`)
    any variable whose value contains that text."""
    wanted, named = marker.encode(), None if mentioning is None else mentioning.encode()
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if wanted in environ.split(b"\0") or (named is not None and named in environ):
                pids.add(int(entry.name))
    return pids


def of_flwr_home(flwr_home: Path) -> set[int]:
    """The processes of the Flower runtime with this FLWR_HOME. Ray's processes write their title over the start of
    their environment, FLWR_HOME with it (a Ray agent orphaned by a killed ServerApp process was found by nothing
    else), but their PYTHONPATH still names the app Flower installed under FLWR_HOME/apps."""
    return with_env(f"FLWR_HOME={flwr_home}", mentioning=f"{flwr_home}/apps/")


def command_of(pid: int) -> str:
    """The command line of a live process, words joined by spaces ("" once it is gone)."""
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _signal_all(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _wait_gone(pids: set[int], timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        alive = {pid for pid in alive if Path(f"/proc/{pid}").exists() and not _is_zombie(pid)}
        if alive:
            time.sleep(0.1)
    return alive


def stop_processes(pids: set[int], *, grace: float = 10.0) -> None:
    """SIGTERM `pids`, then SIGKILL whatever is still alive after `grace` seconds."""
    _signal_all(pids, signal.SIGTERM)
    _signal_all(_wait_gone(pids, grace), signal.SIGKILL)
    _wait_gone(pids, 5.0)


def kill_processes(pids: set[int]) -> None:
    """SIGKILL `pids` and every process under them (the tree is taken before any of it dies, as `ray stop --force`
    does), and wait until they are gone."""
    tree = set(pids) | descendants(*pids)
    _signal_all(tree, signal.SIGKILL)
    _wait_gone(tree, 5.0)


class Daemon:
    """One long-running Flower command (flower-superlink, flower-supernode) with its log file.

    `stop()` ends it and every process it started (by process tree), also when
    called twice or after the process died by itself.
    """

    def __init__(self, name: str, args: list[str], *, env: dict[str, str], log: Path,
                 prefix: list[str] = ()) -> None:
        """`prefix`: a command that runs it, e.g. ["nsenter", "--net=/proc/PID/ns/net"] for another network."""
        self.name, self.args, self.env, self.log, self.prefix = name, args, env, log, list(prefix)
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def start(self) -> "Daemon":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(
                [*self.prefix, flower_bin(self.name), *self.args], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_healthy(self, url: str, timeout: float, *, context=None) -> None:
        """Return once `url` answers; FlowerError if the daemon exits or stays silent for `timeout` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                raise FlowerError(f"{self.name} exited at start; see {self.log}{last_error(self.log)}")
            try:
                with urllib.request.urlopen(url, timeout=1, context=context):
                    return
            except OSError:
                time.sleep(0.2)
        raise FlowerError(f"{self.name} did not answer on {url} within {timeout:.0f} s; see {self.log}")

    def kill(self) -> None:
        """SIGKILL at once, without its children's cleanup: what a crash or a pulled plug looks like."""
        if self.process is not None:
            kill_processes({self.process.pid})
            self.process.wait(timeout=10)
            self.process = None

    def stop(self) -> None:
        if self.process is None:
            return
        tree = descendants(self.process.pid)
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        self.process = None
        stop_processes(tree)


def stop_all(daemons: list[Daemon], flwr_home: Path) -> None:
    """Stop `daemons` in order, each with its process tree, then every process left that carries this FLWR_HOME
    (a detached SuperExec, Ray, whatever was started while they shut down)."""
    for daemon in daemons:
        daemon.stop()
    stop_processes(of_flwr_home(flwr_home))


def last_error(log: Path) -> str:
    """The last exception line of a Flower log, as ': Type: message' (empty when there is none)."""
    if not log.exists():
        return ""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
    errors = [line for line in lines if line.split(":", 1)[0].endswith(("Error", "Exception"))]
    return f": {errors[-1]}" if errors else ""
