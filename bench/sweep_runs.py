"""Sweep start-up: `fedclinic sweep` (all its points in one Flower run) against the same points as separate runs.

    python bench/sweep_runs.py [--noise-multipliers 1.0,1.5] [--repeats 1]

The sweep runs the non-private baseline and one point per noise multiplier
on the federation of bench/simulate_runs.py (3 sites of 600 images, 2 rounds,
post-training steps off); the other leg runs each of those points as its own
`fedclinic simulate`, which starts and stops a SuperLink, a ServerApp process
and Ray every time. Legs alternate. A point's compute is its ServerApp time
(ServerApp start to its report, from the run directory's files); a leg's
start-up is its wall time less its points' compute, so what is left is
Flower's and fedclinic's machinery around the runs. The sweep's later points
pay neither Ray's start nor the sites' imports, so their compute is the
training and evaluation alone.
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from simulate_runs import ROOT, federation, server_span, sets, simulate


def server_seconds(run_dir: Path) -> float:
    start, end = server_span(run_dir)
    return end - start


def sweep_leg(out: Path, name: str, multipliers: list[str]) -> tuple[float, list[float]]:
    """(wall seconds, each point's ServerApp seconds) of one `fedclinic sweep`."""
    cmd = [sys.executable, "-m", "fedclinic.cli", "sweep", "--noise-multipliers", ",".join(multipliers),
           "--out", str(out), "--name", name, "--quiet", *federation()]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"fedclinic sweep failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    points = [out / name / "baseline", *(out / name / f"sigma-{float(m):g}" for m in multipliers)]
    missing = [p for p in points if not (p / "report.md").exists()]
    if missing:
        sys.exit(f"the sweep left no report in {missing}: its point directories are named differently")
    return wall, [server_seconds(p) for p in points]


def separate_leg(out: Path, name: str, multipliers: list[str]) -> tuple[float, list[float]]:
    """(wall seconds, each point's ServerApp seconds) of the same points, one `fedclinic simulate` each."""
    wall, servers = 0.0, []
    points = [("baseline", ["privacy.mode=off"]), *((f"sigma-{float(m):g}", [f"privacy.noise-multiplier={m}"])
                                                     for m in multipliers)]
    for label, extra in points:
        _, seconds, _ = simulate(out / name, label, *federation(), *sets(extra))
        wall += seconds
        servers.append(server_seconds(out / name / label))
    return wall, servers


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--noise-multipliers", default="1.0,1.5")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    multipliers = args.noise_multipliers.split(",")
    n = len(multipliers) + 1
    out = Path(tempfile.mkdtemp(prefix="fedclinic-sweep-bench-"))
    walls, startups, later = {"sweep": [], "separate": []}, {"sweep": [], "separate": []}, []
    for i in range(args.repeats):
        legs = [("sweep", sweep_leg), ("separate", separate_leg)]
        for label, leg in (legs if i % 2 == 0 else legs[::-1]):
            wall, servers = leg(out, f"{label}-{i}", multipliers)
            walls[label].append(wall)
            startups[label].append(wall - sum(servers))
            if label == "sweep":
                later += servers[1:]
            print(f"{label:8s} run {i}: {n} points in {wall:.1f} s wall; ServerApp per point "
                  f"{', '.join(f'{s:.1f}' for s in servers)} s; start-up {wall - sum(servers):.1f} s in all", flush=True)
    sweep, separate = statistics.median(walls["sweep"]), statistics.median(walls["separate"])
    print(f"median wall: the sweep {sweep:.1f} s, its points as separate runs {separate:.1f} s: {sweep / separate:.2f}x "
          f"({(separate - sweep) / n:.1f} s saved per point)")
    one_run = separate / n
    print(f"start-up: the sweep's {statistics.median(startups['sweep']):.1f} s in all, separate runs' "
          f"{statistics.median(startups['separate']) / n:.1f} s per point; a later point of the sweep costs "
          f"{statistics.median(later):.1f} s (its ServerApp time), a run of its own {one_run:.1f} s: the sweep of {n} "
          f"points cost {sweep / one_run:.2f} runs of its own")
    print(f"run directories: {out}")


if __name__ == "__main__":
    main()
