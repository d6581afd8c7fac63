"""Start and stop Flower's simulation runtime for one fedclinic run.

`fedclinic simulate` uses no hand-written loop and no deprecated entry point:
it starts a SuperLink in simulation mode on a free loopback port, submits the
app with `flwr run` (exactly what a user would type), follows the run's
progress file until the ServerApp's last line (or else asks the SuperLink how
the run ended), and stops every process it started, also on error or Ctrl-C.

On an existing Ray cluster: start the run with RAY_ADDRESS set (docs/deployment.md,
"Bigger than one machine"); Flower's Ray backend then joins that cluster
instead of starting its own, and stopping the run leaves the cluster up.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Sequence

from fedclinic.config import Config, differing_keys, replace
from fedclinic.runtime.processes import (Daemon, FlowerError, command_of, free_port, kill_processes, stop_all,
                                         stop_processes, with_env)
from fedclinic.runtime.runs import Connection, follow, submit


class SimulationError(FlowerError):
    """The Flower simulation did not complete; the message says why."""


class LocalSuperLink:
    """A `flower-superlink --simulation` on loopback, stopped (with its children) on exit."""

    def __init__(self, run_dir: Path, *, startup_timeout: float = 60.0) -> None:
        self.run_dir = run_dir
        self.connection = Connection(run_dir / ".flwr", f"127.0.0.1:{free_port()}", name="fedclinic-local")
        self.startup_timeout = startup_timeout
        self.finished = False  # the last run submitted here has written its whole run directory
        port = self.connection.address.rsplit(":", 1)[1]
        self.daemon = Daemon(
            "flower-superlink",
            ["--insecure", "--simulation", "--disable-runtime-dependency-installation",
             "--host", "127.0.0.1", "--port", port],
            env=self.connection.env, log=run_dir / "superlink.log",
        )

    def __enter__(self) -> "LocalSuperLink":
        return self.start().wait()

    def start(self) -> "LocalSuperLink":
        """Start the SuperLink's process and return at once (it takes seconds to answer: do other work, then wait)."""
        self.connection.write()
        self.daemon.start()
        return self

    def wait(self) -> "LocalSuperLink":
        """Return once the SuperLink answers; SimulationError (and every process stopped) if it does not."""
        try:
            self.daemon.wait_healthy(f"http://{self.connection.address}/health", self.startup_timeout)
        except FlowerError as err:
            self.stop()
            raise SimulationError(str(err)) from None
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def up(self) -> "LocalSuperLink":
        """Started and answering: started on the first call unless `start` was called (a sweep whose points are all
        done starts nothing).

        On later calls the ServerApp process of a previous run that did not finish may still be exiting (`run`
        killed a finished one's): it is waited for, so that ServerWatch follows the next run's process alone.
        """
        if not self.daemon.running():
            self.start()
        self.wait()  # one request when it answers already
        previous_servers_gone(self.connection.flwr_home)
        self.finished = False
        return self

    def stop(self) -> None:
        """Stop the SuperLink and everything it started (SuperExec, simulation, Ray). When the last run has written
        its run directory (`run` has killed its ServerApp process and Ray already), nothing of theirs is needed any
        more (the SuperLink keeps its state in memory): the SuperLink is killed, not waited for."""
        if self.finished:
            self.daemon.kill()
        stop_all([self.daemon], self.connection.flwr_home)


def server_processes(flwr_home: Path) -> set[int]:
    """The processes of this FLWR_HOME that run a ServerApp (flwr-simulation)."""
    return {pid for pid in with_env(f"FLWR_HOME={flwr_home}") if "flwr-simulation" in command_of(pid)}


def previous_servers_gone(flwr_home: Path, timeout: float = 30.0) -> None:
    """Return once no ServerApp process of a finished run is left; one still there after `timeout` s is stopped."""
    deadline = time.monotonic() + timeout
    while server_processes(flwr_home) and time.monotonic() < deadline:
        time.sleep(0.2)
    stop_processes(server_processes(flwr_home))


def discard_finished_run(flwr_home: Path) -> None:
    """SIGKILL a completed run's ServerApp process and the Ray it started, as `ray stop --force` does, instead of
    waiting out their teardown (joining threads, ray.shutdown, every process exiting with torch loaded: 3 to 4 s of
    both cores on the development machine). Only once the run directory is written: every site's ledger was
    written before its reply. A Ray cluster the run joined is no child of the ServerApp process and is left alone."""
    kill_processes(server_processes(flwr_home))


class ServerWatch:
    """Fails the run within seconds when the process that runs the ServerApp (flwr-simulation) dies mid-run.

    Flower marks such a run failed only once the process's heartbeats have
    stopped for two intervals (about a minute); this command started every
    process of the run, so it looks. A process gone while the SuperLink still
    calls the run unfinished `grace` seconds later was killed (or ran out of
    memory): FlowerError.
    """

    def __init__(self, connection: Connection, run_id: int, *, grace: float = 5.0) -> None:
        self.connection, self.run_id, self.grace = connection, run_id, grace
        self.seen, self.gone_since = False, None

    def __call__(self) -> None:
        if server_processes(self.connection.flwr_home):
            self.seen, self.gone_since = True, None
        elif self.seen and self.gone_since is None:
            self.gone_since = time.monotonic()
        elif self.seen and time.monotonic() - self.gone_since > self.grace:
            status = self.connection.status(self.run_id)
            if status == "unknown":  # no answer (a loaded machine): ask again after another grace
                self.gone_since = time.monotonic()
            elif not status.startswith("finished"):
                raise FlowerError(f"the process running the ServerApp (flwr-simulation) exited while the run was "
                                  f"{status!r}: killed, or out of memory?")
            else:
                self.seen = False  # it ended the run first: the log stream ends by itself


def run(config: Config, run_dir: Path, on_progress: Callable[[dict], None] | None = None,
        link: LocalSuperLink | None = None, *, later: Sequence[tuple[Config, Path]] = (),
        on_written: Callable[[int], None] | None = None) -> None:
    """Run one federation through Flower's simulation runtime; returns when the run has completed.

    `link`: a SuperLink already up (a sweep's, shared by its points), left running; without one
    the run starts its own and stops it, and every process it started, before it returns.
    `later`: a sweep's further points (configuration, run directory), run one after another in the same Flower run
    (output.next-points), so they share its ServerApp process, its Ray and the sites' imports; `on_written(i)` is
    called as soon as run i (0: this one) has written its run directory, while the next one trains.
    """
    runs = [(config, run_dir), *later]
    # the later points are this call's alone (a key set by hand would run points nobody follows)
    points = json.dumps([differing_keys(config, c) for c, _ in later]) if later else ""
    config = replace(config, output={"next_points": points})
    run_config = run_dir / "run-config.toml"
    run_config.write_text(config.to_toml())
    fed = config.federation
    federation = (f"num-supernodes={fed.sites} client-resources-num-cpus={fed.client_cpus} "
                  f"client-resources-num-gpus={float(fed.client_gpus)}")
    own = link is None
    try:
        link = LocalSuperLink(run_dir).start().wait() if own else link.up()
        run_id = submit(link.connection, run_config, federation)
        watch = ServerWatch(link.connection, run_id)
        for i, (_, directory) in enumerate(runs):
            follow(link.connection, run_id, directory, on_progress, while_running=watch, until_written=True)
            if i < len(runs) - 1 and on_written is not None:
                on_written(i)
        # the run's processes are killed now: not waiting out Ray's teardown
        link.finished = True
        discard_finished_run(link.connection.flwr_home)
    except FlowerError as err:
        raise SimulationError(str(err)) from None
    finally:
        if own and link is not None:
            link.stop()
    if on_written is not None:
        on_written(len(runs) - 1)
