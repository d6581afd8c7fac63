"""Deployment overhead: the same federation in Flower's simulation and on the Deployment Engine, in one run.

    python bench/deployment_overhead.py [--sites 3] [--rounds 3] [--site-size 200] [--superexec-poll 0.1]

Runs one small federation (post-training steps off) twice: with
`fedclinic.runtime.simulation.run` (Ray workers stay alive, so each site imports
torch and Opacus once) and on a local Deployment Engine (`LocalDeployment`:
SuperLink + one SuperNode per site, where every message starts a fresh
`flwr-clientapp` process that imports fedclinic.clients.app again). A round's
time is the difference of consecutive 'elapsed' in the progress rows; round 1
carries the warm-up, so the comparison uses the median of rounds >= 2. Each
site gets one message per round (federation.fraction-evaluate is 0), so
deployment minus simulation round time is the overhead per message.

Also times `python -c "import fedclinic.clients.app"` alone (median of 3
fresh processes) and gives its share of a deployment round. With
--superexec-poll it runs the deployment a second time with Flower's
FLWR_SUPEREXEC_TASK_POLL_INTERVAL (default 1 s) set to that many seconds.
Torch runs one thread everywhere (OMP_NUM_THREADS=1 is inherited by every
Flower process); timings on a shared machine are noisy, so the load average
is printed before and after.
"""

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported here or in any Flower process started from here
os.environ["MKL_NUM_THREADS"] = "1"

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from fedclinic.runtime import simulation  # noqa: E402
from fedclinic.config import load_config  # noqa: E402
from fedclinic.runtime.local import LocalDeployment  # noqa: E402


def import_seconds(repeats: int = 3) -> tuple[float, float]:
    """(wall, CPU) seconds, medians, of a fresh interpreter importing the ClientApp: what every deployed message pays.

    CPU time (user + system of the child) is printed beside wall time because
    it hardly moves with the load of a shared machine; wall time does.
    """
    walls, cpus = [], []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import fedclinic.clients.app"], cwd=ROOT, check=True)
        walls.append(time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return statistics.median(walls), statistics.median(cpus)


def round_times(rows: list[dict]) -> dict[int, float]:
    """{round: seconds} from the progress rows (round 0 is the initial model's central evaluation)."""
    elapsed = {row["round"]: row["elapsed"] for row in rows if "round" in row}
    return {r: elapsed[r] - elapsed[r - 1] for r in sorted(elapsed) if r - 1 in elapsed}


def run_variant(name: str, overrides: list[str], out: Path) -> tuple[dict[int, float], float]:
    """One federation; returns ({round: seconds}, wall seconds including start-up and shutdown)."""
    run_dir = out / name
    run_dir.mkdir(parents=True)
    config = load_config(None, [*overrides, f"output.dir={out}", f"output.name={name}"])
    rows = []
    t0 = time.perf_counter()
    if name == "simulation":
        simulation.run(config, run_dir, on_progress=rows.append)
    else:
        with LocalDeployment(run_dir, config) as deployment:
            deployment.run(on_progress=rows.append)
    return round_times(rows), time.perf_counter() - t0


def typical(rounds: dict[int, float]) -> tuple[float, str]:
    """Median round time over rounds >= 2 (round 1 carries the warm-up) when there are any, else round 1."""
    later = [t for r, t in rounds.items() if r >= 2]
    if later:
        return statistics.median(later), f"rounds 2-{max(rounds)}" if len(later) > 1 else "round 2"
    return rounds[1], "round 1 only"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--site-size", type=int, default=200)
    parser.add_argument("--superexec-poll", type=float, default=None,
                        help="also run the deployment with FLWR_SUPEREXEC_TASK_POLL_INTERVAL set to this (seconds)")
    args = parser.parse_args()
    overrides = [f"federation.sites={args.sites}", f"federation.rounds={args.rounds}",
                 f"data.site-size={args.site_size}", "robustness.enabled=false", "compression.enabled=false",
                 "explain.enabled=false", "privacy.audit=false"]
    out = Path(tempfile.mkdtemp(prefix="fedclinic-deployment-bench-"))
    load_before = os.getloadavg()[0]
    print(f"{args.sites} sites x {args.rounds} rounds, {args.site_size} images per site, post-training steps off, "
          f"torch threads 1; {os.cpu_count()} cores, load average {load_before:.1f} before")

    imports, imports_cpu = import_seconds()
    print(f"ClientApp import (fresh `python -c 'import fedclinic.clients.app'`, median of 3): "
          f"{imports:.2f} s wall, {imports_cpu:.2f} s CPU")

    variants = ["simulation", "deployment"]
    results = {name: run_variant(name, overrides, out) for name in variants}
    if args.superexec_poll is not None:
        name = f"deployment, SuperExec poll {args.superexec_poll:g} s"
        os.environ["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(args.superexec_poll)
        try:
            results[name] = run_variant("deployment-poll", overrides, out)
        finally:
            del os.environ["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"]
        variants.append(name)

    print(f"{'':<34} {'round 1':>8} {'typical round':>14}  {'rounds':<12} {'wall':>6}  each round (s)")
    for name in variants:
        rounds, wall = results[name]
        t, which = typical(rounds)
        each = " ".join(f"{s:.1f}" for s in rounds.values())
        print(f"{name:<34} {rounds[1]:>7.1f}s {t:>13.1f}s  {which:<12} {wall:>5.0f}s  {each}")

    sim, _ = typical(results["simulation"][0])
    # every site's ClientApp imports at the same time: on fewer cores than sites they queue for CPU
    parallel = min(args.sites, os.cpu_count() or 1)
    import_floor = imports_cpu * args.sites / parallel
    for name in variants[1:]:
        dep, which = typical(results[name][0])
        print(f"{name}: {dep / sim:.2f}x the simulation round ({which}); per-message overhead "
              f"(deployment - simulation round) {dep - sim:.1f} s")
        print(f"  one ClientApp import is {imports / dep:.0%} of that round ({imports:.1f} of {dep:.1f} s wall); "
              f"{args.sites} imports at once on {parallel} cores need at least {import_floor:.1f} s "
              f"({import_floor / dep:.0%} of the round)")
    print(f"load average {os.getloadavg()[0]:.1f} after (was {load_before:.1f}); run directories: {out}")


if __name__ == "__main__":
    main()
