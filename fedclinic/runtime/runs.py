"""Submit fedclinic to a SuperLink with `flwr run`, follow it, and say how it ended.

Used by `fedclinic simulate` (a simulation SuperLink) and `fedclinic demo`
(a Deployment Engine SuperLink with SuperNodes) alike. `flwr run --stream`
exits 0 even when the run failed, so unless the ServerApp's last progress
line (`finished_row`) says it completed, the outcome is asked of the
SuperLink (`flwr ls --run-id`) and a failed run raises FlowerError with the
reason.

`flwr run DIR` packs DIR into the app bundle (FAB) after walking every file
under it, the virtual environment and old runs of a clone included (about
3 s per run in a clone with its .venv). So the run submits a copy of the app
alone, pyproject.toml and the fedclinic package, staged under $FLWR_HOME:
the same bundle, with none of the rest.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fedclinic.runtime.processes import FlowerError, flower_bin, flower_env, last_error


def app_dir() -> Path:
    """The Flower app: the folder whose pyproject.toml names fedclinic's ServerApp and ClientApp."""
    root = Path(__file__).resolve().parent.parent.parent
    if not (root / "pyproject.toml").exists():
        raise FlowerError(f"cannot find fedclinic's pyproject.toml next to {root}; run from a clone of the repository")
    return root


def stage_app(dest: Path) -> Path:
    """A fresh copy of the app (pyproject.toml and the fedclinic package's sources) at `dest`, for `flwr run`."""
    root = app_dir()
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(root / "fedclinic", dest / "fedclinic", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(root / "pyproject.toml", dest / "pyproject.toml")
    return dest


@dataclass(frozen=True)
class Connection:
    """A named SuperLink connection in $FLWR_HOME/config.toml, as `flwr` reads it."""

    flwr_home: Path
    address: str
    name: str = "fedclinic"
    root_certificates: Path | None = None  # None: insecure (simulation on loopback only)

    @property
    def env(self) -> dict[str, str]:
        return flower_env(self.flwr_home)

    def write(self) -> None:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        security = ("insecure = true" if self.root_certificates is None
                    else f'root-certificates = "{self.root_certificates.resolve()}"')
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{self.name}"\n\n[superlink.{self.name}]\naddress = "{self.address}"\n{security}\n'
        )

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        try:
            return subprocess.run([flower_bin("flwr"), *args], env=self.env, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            raise FlowerError(f"`flwr {args[0]}` got no answer from the SuperLink at {self.address} within "
                              f"{timeout:.0f} s") from None

    def ask(self, *args: str, expect: str, failing: str) -> dict:
        """`flwr ARGS --format json`'s answer; FlowerError "`failing`: Flower's reason" when it lacks `expect`."""
        out = self.flwr(*args, "--format", "json")
        try:
            answer = json.loads(out.stdout)
        except ValueError:
            answer = {"error-message": (out.stdout + out.stderr).strip()[-600:]}
        if expect not in answer:
            reason = (str(answer.get("error-message", "")).strip().splitlines() or ["no reason given"])[-1]
            raise FlowerError(f"{failing}: {reason}")
        return answer

    def status(self, run_id: int) -> str:
        """'finished:completed', 'finished:failed', 'running', ... or 'unknown'."""
        try:
            return self.ask("ls", self.name, "--run-id", str(run_id), expect="runs", failing="")["runs"][0]["status"]
        except (FlowerError, IndexError, KeyError):
            return "unknown"


# the key of the last line the ServerApp writes to progress.jsonl, once the run directory is complete
FINISHED = "finished_run"


def finished_row(run_id: int) -> dict:
    """The ServerApp's last progress line: Flower run `run_id` wrote its whole run directory."""
    return {FINISHED: run_id}


def submit(connection: Connection, run_config: Path, federation_config: str | None = None) -> int:
    """`flwr run APP CONNECTION --run-config FILE`; returns the run id, or FlowerError with the SuperLink's reason."""
    app = stage_app(connection.flwr_home / "app-source")
    args = ["run", str(app), connection.name, "--run-config", str(run_config)]
    if federation_config:
        args += ["--federation-config", federation_config]
    return int(connection.ask(*args, expect="run-id", failing="flwr run refused the run")["run-id"])


def follow(connection: Connection, run_id: int, run_dir: Path,
           on_progress: Callable[[dict], None] | None = None, *, while_running: Callable[[], None] | None = None,
           start_timeout: float = 180.0, until_written: bool = False) -> None:
    """Stream the run's log to run_dir/flower.log and its progress lines to `on_progress` until it ends.

    With `until_written`, returns as soon as the ServerApp's last progress line (`finished_row`) says the run
    directory is complete, for a caller that stops Flower's processes next: Flower still marks the run
    finished after its own teardown (stopping Ray, about 3 s), and flower.log ends where that begins.
    Raises FlowerError naming the SuperLink's verdict and the last error of the
    log when the run did not complete, or when it is still waiting to start
    after `start_timeout` seconds (a SuperLink that cannot start the ServerApp
    leaves it pending for ever). `while_running` is called every half second
    (the demo uses it to notice a dead daemon).
    """
    progress = run_dir / "progress.jsonl"
    log_path = run_dir / "flower.log"
    with open(log_path, "w") as log:
        streamer = subprocess.Popen([flower_bin("flwr"), "log", str(run_id), connection.name, "--stream"],
                                    env=connection.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    seen, deadline, finished = 0, time.monotonic() + start_timeout, False

    def shown(row: dict) -> None:
        nonlocal finished
        if FINISHED in row:  # kept from on_progress; a resumed run's file may still hold an earlier run's
            finished = finished or row[FINISHED] == run_id
        elif on_progress is not None:
            on_progress(row)

    try:
        while streamer.poll() is None:
            seen = _follow(progress, seen, shown)
            if finished and until_written:
                break
            if deadline and time.monotonic() > deadline:
                status, deadline = connection.status(run_id), 0.0
                if status in ("pending", "starting"):
                    raise FlowerError(f"the run was still {status} after {start_timeout:.0f} s: the SuperLink did not "
                                      f"start the ServerApp; see its log (a certificate without 127.0.0.1 does this)")
            if while_running is not None:
                while_running()
            time.sleep(0.5)
        _follow(progress, seen, shown)
    finally:
        if streamer.poll() is None:
            streamer.terminate()
            try:
                streamer.wait(timeout=10)
            except subprocess.TimeoutExpired:
                streamer.kill()
                streamer.wait()
    if finished:  # the ServerApp wrote its last line, so it completed: no need to ask (`flwr ls`, 1.5 s)
        return
    status = connection.status(run_id)
    if status != "finished:completed":
        raise FlowerError(f"the Flower run ended as {status!r}{last_error(log_path)}; see {log_path}")


def _follow(path: Path, seen: int, on_progress: Callable[[dict], None] | None) -> int:
    """Hand new complete lines of the progress file to `on_progress`; returns lines seen."""
    if not path.exists():
        return seen
    lines = path.read_text().split("\n")[:-1]  # a line still being written has no newline yet
    for line in lines[seen:]:
        if on_progress is not None:
            on_progress(json.loads(line))
    return len(lines)
