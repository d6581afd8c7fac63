"""Start and stop Flower's simulation runtime for one fedclinic run.

`fedclinic simulate` uses no hand-written loop and no deprecated entry point:
it starts a SuperLink in simulation mode on a free loopback port, submits the
app with `flwr run` (exactly what a user would type), follows the run's
progress file, asks the SuperLink how the run ended, and stops every process
it started, also on error or Ctrl-C.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable

from fedclinic.config import Config

CONNECTION = "fedclinic-local"


class SimulationError(RuntimeError):
    """The Flower run did not complete; the message says why."""


def _bin(name: str) -> str:
    """Flower's command next to this Python, so the project's venv is used."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_dir() -> Path:
    """The Flower app: the folder whose pyproject.toml names fedclinic's ServerApp and ClientApp."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").exists():
        raise SimulationError(f"cannot find fedclinic's pyproject.toml next to {root}; run from a clone of the repository")
    return root


def _flower_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    # the SuperLink starts flower-superexec, flwr-simulation, ... by name
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # unique per run: every process of this run inherits it, which is how stop() finds them
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


def _descendants(root: int) -> set[int]:
    parents = _processes()
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def _with_env(marker: str) -> set[int]:
    """Processes whose environment holds `marker` (NAME=value), e.g. this run's FLWR_HOME."""
    wanted = marker.encode()
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if wanted in (entry / "environ").read_bytes().split(b"\0"):
                    pids.add(int(entry.name))
            except OSError:
                continue
    return pids


def _signal_all(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _wait_gone(pids: set[int], timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        alive = {pid for pid in alive if Path(f"/proc/{pid}").exists() and not _is_zombie(pid)}
        if alive:
            time.sleep(0.1)
    return alive


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


class LocalSuperLink:
    """A `flower-superlink --simulation` on loopback, stopped (with its children) on exit."""

    def __init__(self, run_dir: Path, *, startup_timeout: float = 60.0) -> None:
        self.run_dir = run_dir
        self.port = _free_port()
        self.flwr_home = run_dir / ".flwr"
        self.env = _flower_env(self.flwr_home)
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def write_connection(self) -> None:
        """$FLWR_HOME/config.toml naming this SuperLink."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "{self.address}"\ninsecure = true\n'
        )

    def __enter__(self) -> "LocalSuperLink":
        log = open(self.run_dir / "superlink.log", "w")
        self.process = subprocess.Popen(
            [_bin("flower-superlink"), "--insecure", "--simulation", "--disable-runtime-dependency-installation",
             "--host", "127.0.0.1", "--port", str(self.port)],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SimulationError(f"flower-superlink exited at start; see {self.run_dir / 'superlink.log'}")
            try:
                with urllib.request.urlopen(f"http://{self.address}/health", timeout=1):
                    return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise SimulationError(f"flower-superlink did not answer on {self.address} within {self.startup_timeout:.0f} s")

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop the SuperLink and everything it started (SuperExec, simulation, Ray).

        Flower detaches the SuperExec into its own session and Ray starts more
        processes under it, so a process group is not enough: take the process
        tree before anything dies, add every process carrying this run's
        FLWR_HOME, then SIGTERM, and SIGKILL what is left after a grace period.
        """
        if self.process is None:
            return
        marker = f"FLWR_HOME={self.flwr_home}"
        everyone = _descendants(self.process.pid) | _with_env(marker)
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        everyone |= _with_env(marker)
        _signal_all(everyone, signal.SIGTERM)
        _signal_all(_wait_gone(everyone, 10.0), signal.SIGKILL)
        _wait_gone(everyone, 5.0)
        self.process = None

    def flwr(self, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([_bin("flwr"), *args], env=self.env, capture_output=True, text=True, timeout=timeout)


def _run_status(link: LocalSuperLink, run_id: int) -> str:
    out = link.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json", timeout=60)
    try:
        runs = json.loads(out.stdout)["runs"]
        return runs[0]["status"]
    except (ValueError, KeyError, IndexError):
        return "unknown"


def run(config: Config, run_dir: Path, on_progress: Callable[[dict], None] | None = None) -> None:
    """Run one federation through Flower's simulation runtime; returns when the run has completed."""
    run_config = run_dir / "run-config.toml"
    run_config.write_text(config.to_toml())
    progress = run_dir / "progress.jsonl"
    with LocalSuperLink(run_dir) as link:
        link.write_connection()
        fed = config.federation
        federation = (f"num-supernodes={fed.sites} client-resources-num-cpus={fed.client_cpus} "
                      f"client-resources-num-gpus={float(fed.client_gpus)}")
        submitted = link.flwr("run", str(app_dir()), CONNECTION, "--run-config", str(run_config),
                              "--federation-config", federation, "--format", "json", timeout=120)
        try:
            answer = json.loads(submitted.stdout)
        except ValueError:
            answer = {"error-message": (submitted.stdout + submitted.stderr).strip()[-600:]}
        if "run-id" not in answer:
            reason = str(answer.get("error-message", "no reason given")).strip().splitlines()[-1]
            raise SimulationError(f"flwr run refused the run: {reason}")
        run_id = int(answer["run-id"])
        with open(run_dir / "flower.log", "w") as log:
            streamer = subprocess.Popen([_bin("flwr"), "log", str(run_id), CONNECTION, "--stream"], env=link.env,
                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        seen = 0
        try:
            while True:
                seen = _follow(progress, seen, on_progress)
                if streamer.poll() is not None:
                    break
                time.sleep(0.5)
            _follow(progress, seen, on_progress)
        finally:
            if streamer.poll() is None:
                streamer.terminate()
                streamer.wait(timeout=10)
        status = _run_status(link, run_id)
    if status != "finished:completed":
        reason = _last_error(run_dir / "flower.log")
        raise SimulationError(f"the Flower run ended as {status!r}{reason}; see {run_dir / 'flower.log'}")


def _last_error(log: Path) -> str:
    """The last exception line in Flower's log of the run, as ': Type: message'."""
    if not log.exists():
        return ""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
    errors = [line for line in lines if line.split(":", 1)[0].endswith(("Error", "Exception"))]
    return f": {errors[-1]}" if errors else ""


def _follow(path: Path, seen: int, on_progress: Callable[[dict], None] | None) -> int:
    """Hand new complete lines of the progress file to `on_progress`; returns lines seen."""
    if not path.exists():
        return seen
    lines = path.read_text().split("\n")[:-1]  # a line still being written has no newline yet
    for line in lines[seen:]:
        if on_progress is not None:
            on_progress(json.loads(line))
    return len(lines)
