"""Federation overhead: `fedclinic simulate` against a minimal Flower + Opacus app, alternated in one invocation.

    python bench/simulate_runs.py [--repeats 3] [--sites 3] [--site-size 600]

Both legs train the same federation: 3 synthetic sites of 600 images, 2 rounds,
1 local epoch, expected batch 64, DP-SGD with Opacus's ew engine, the same
scattering model and loss, central evaluation after each round. fedclinic's
post-training steps (attack, compression, explanations, audit, fine-tuning)
are off. The minimal app (bench/minimal_app, Flower's example style) is
submitted with `flwr run` to a `flower-superlink --simulation` started here
on loopback, and timed from that start until its every process has stopped:
the same work `fedclinic simulate` does around its run. Legs alternate so
machine noise hits both alike; the ratio is of medians.

For fedclinic it also prints where the seconds go: before the ServerApp
starts, the ServerApp itself (round by round), and after it returns.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from fedclinic.runtime.processes import Daemon, flower_bin, free_port, stop_all  # noqa: E402
from fedclinic.runtime.runs import Connection  # noqa: E402

MINIMAL_APP = Path(__file__).resolve().parent / "minimal_app"
POST_TRAINING_OFF = ["robustness.enabled=false", "compression.enabled=false", "explain.enabled=false",
                     "privacy.audit=false", "personalize.epochs=0"]


def rss_of_run(root_pid: int, flwr_home: Path) -> int:
    """Bytes of resident memory of `root_pid` and every process carrying the run's FLWR_HOME.

    RSS counts pages shared between processes once per process, so the sum is an upper bound."""
    marker = f"FLWR_HOME={flwr_home}".encode()
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int(entry.name) == root_pid or marker in (entry / "environ").read_bytes().split(b"\0"):
                for line in (entry / "status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


class PeakMemory:
    """Samples rss_of_run every `every` seconds in a thread; `.peak` is the largest sum seen."""

    def __init__(self, root_pid: int, flwr_home: Path, every: float = 0.5) -> None:
        self.root_pid, self.flwr_home, self.every = root_pid, flwr_home, every
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_of_run(self.root_pid, self.flwr_home))
            self._stop.wait(self.every)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def simulate(out: Path, name: str, *args: str) -> tuple[dict, float, int]:
    """`fedclinic simulate ARGS`; returns (its results.json, wall seconds, peak bytes over all its processes)."""
    cmd = [sys.executable, "-m", "fedclinic.cli", "simulate", "--out", str(out), "--name", name, "--quiet", *args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with PeakMemory(proc.pid, out / name / ".flwr") as memory:
        _, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"fedclinic simulate {name} failed ({proc.returncode}): {stderr.strip()[-2000:]}")
    return json.loads((out / name / "results.json").read_text()), wall, memory.peak


def sets(settings: list[str]) -> list[str]:
    """`--set KEY=VALUE` for each setting, as the CLI takes them."""
    return [word for setting in settings for word in ("--set", setting)]


def federation(sites: int = 3, site_size: int = 600) -> list[str]:
    """The CLI arguments of the federation both legs train (2 rounds, batch 64, the steps after training off)."""
    settings = [f"data.site-size={site_size}", "data.quantity-skew=0", "training.batch-size=64", *POST_TRAINING_OFF]
    return ["--sites", str(sites), "--rounds", "2", *sets(settings)]


def server_span(run_dir: Path) -> tuple[float, float]:
    """When the ServerApp started and ended (epoch seconds): its RunRecorder writes config.toml first and
    report.md last (the audit, which writes report.md again, is off)."""
    return (run_dir / "config.toml").stat().st_mtime, (run_dir / "report.md").stat().st_mtime


def fedclinic_leg(out: Path, name: str, args) -> dict:
    """One `fedclinic simulate` of the federation; wall time and its phases."""
    t0 = time.time()
    results, wall, _ = simulate(out, name, *federation(args.sites, args.site_size))
    run_dir = out / name
    server_start, server_end = (t - t0 for t in server_span(run_dir))
    progress = [json.loads(line) for line in (run_dir / "progress.jsonl").read_text().splitlines()]
    rounds = [row["elapsed"] for row in progress if row.get("round")]
    return {"wall": wall, "before": server_start, "server": server_end - server_start, "after": wall - server_end,
            "rounds": [b - a for a, b in zip([0.0, *rounds], rounds)], "accuracy": results["final"]["accuracy"],
            "train": results["timings"]["site_train_seconds"]}


def minimal_leg(out: Path, name: str, args) -> dict:
    """The minimal app on its own simulation SuperLink: start it, `flwr run --stream`, stop every process."""
    t0 = time.perf_counter()
    connection = Connection(out / name / ".flwr", f"127.0.0.1:{free_port()}", name="bench")
    connection.write()
    port = connection.address.rsplit(":", 1)[1]
    link = Daemon("flower-superlink", ["--insecure", "--simulation", "--host", "127.0.0.1", "--port", port],
                  env=connection.env, log=out / name / "superlink.log")
    link.start()
    marks, lines, rounds = {}, [], {}
    try:
        link.wait_healthy(f"http://{connection.address}/health", 60)
        marks["superlink"] = time.perf_counter() - t0
        federation = f"num-supernodes={args.sites} client-resources-num-cpus=1"
        config = f"site-size={args.site_size} num-server-rounds=2"
        run = subprocess.Popen([flower_bin("flwr"), "run", str(MINIMAL_APP), "bench", "--stream",
                                "--federation-config", federation, "--run-config", config],
                               env=connection.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in run.stdout:
            lines.append(line)
            if "minimal app: round" in line:  # Flower prints each log line twice (coloured, and timestamped)
                rounds.setdefault(int(line.split("round")[1].split()[0]), time.perf_counter() - t0)
        run.wait()
        (out / name / "flower.log").write_text("".join(lines))
        marks["run"] = time.perf_counter() - t0
    finally:
        stop_all([link], connection.flwr_home)
    wall = time.perf_counter() - t0
    if sorted(rounds) != [0, 1, 2]:
        sys.exit("the minimal app did not finish its 2 rounds:\n" + "".join(lines[-40:]))
    accuracy = float([line for line in lines if "minimal app: round" in line][-1].split()[-1])
    return {"wall": wall, "superlink": marks["superlink"], "rounds": [rounds[1], rounds[2]], "stop": wall - marks["run"],
            "accuracy": accuracy}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3, help="runs of each leg, alternated")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--site-size", type=int, default=600)
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="fedclinic-bench-"))
    legs = {"minimal": [], "fedclinic": []}
    for i in range(args.repeats):
        for leg in (("minimal", "fedclinic") if i % 2 == 0 else ("fedclinic", "minimal")):
            run = (minimal_leg if leg == "minimal" else fedclinic_leg)(out, f"{leg}-{i}", args)
            legs[leg].append(run)
            print(f"{leg:9s} run {i}: wall {run['wall']:.1f} s, accuracy {run['accuracy']:.3f}", flush=True)
    for run in legs["minimal"]:
        print(f"minimal:   SuperLink up {run['superlink']:.1f} s, round 1 done {run['rounds'][0]:.1f} s, round 2 "
              f"{run['rounds'][1]:.1f} s, run ended {run['wall'] - run['stop']:.1f} s, stopped {run['wall']:.1f} s")
    for run in legs["fedclinic"]:
        print(f"fedclinic: ServerApp's run directory {run['before']:.1f} s, ServerApp {run['server']:.1f} s (rounds "
              f"{', '.join(f'{r:.1f}' for r in run['rounds'])} s; site training {run['train']:.1f} s CPU), "
              f"after it {run['after']:.1f} s")
    minimal = statistics.median(run["wall"] for run in legs["minimal"])
    ours = statistics.median(run["wall"] for run in legs["fedclinic"])
    print(f"median wall: fedclinic simulate {ours:.1f} s, minimal Flower + Opacus app {minimal:.1f} s: "
          f"{ours / minimal:.2f}x (goal <= 1.0x), {args.repeats} runs each, alternated")
    print(f"run directories: {out}")


if __name__ == "__main__":
    main()
