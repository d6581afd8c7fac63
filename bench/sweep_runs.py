"""Sweep start-up: `fedclinic sweep` (one SuperLink for all its points) against the same points as separate runs.

    python bench/sweep_runs.py [--noise-multipliers 1.0,1.5] [--repeats 1]

The sweep runs the non-private baseline and one point per noise multiplier
on the federation of bench/simulate_runs.py (3 sites of 600 images, 2 rounds,
post-training steps off); the other leg runs each of those points as its own
`fedclinic simulate`, which starts and stops a SuperLink every time. Legs
alternate. Start-up per point is a point's wall time less its ServerApp time
(ServerApp start to its report, from the run directory's files), so what is
left is Flower's and fedclinic's machinery around the run.
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


def sweep_leg(out: Path, name: str, multipliers: list[str]) -> tuple[float, float]:
    """(wall seconds, summed ServerApp seconds) of one `fedclinic sweep`."""
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
    return wall, sum(server_seconds(p) for p in points)


def separate_leg(out: Path, name: str, multipliers: list[str]) -> tuple[float, float]:
    """(wall seconds, summed ServerApp seconds) of the same points, one `fedclinic simulate` each."""
    wall = server = 0.0
    points = [("baseline", ["privacy.mode=off"]), *((f"sigma-{float(m):g}", [f"privacy.noise-multiplier={m}"])
                                                     for m in multipliers)]
    for label, extra in points:
        _, seconds, _ = simulate(out / name, label, *federation(), *sets(extra))
        wall += seconds
        server += server_seconds(out / name / label)
    return wall, server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--noise-multipliers", default="1.0,1.5")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    multipliers = args.noise_multipliers.split(",")
    n = len(multipliers) + 1
    out = Path(tempfile.mkdtemp(prefix="fedclinic-sweep-bench-"))
    walls = {"sweep": [], "separate": []}
    for i in range(args.repeats):
        legs = [("sweep", sweep_leg), ("separate", separate_leg)]
        for label, leg in (legs if i % 2 == 0 else legs[::-1]):
            wall, server = leg(out, f"{label}-{i}", multipliers)
            walls[label].append(wall)
            print(f"{label:8s} run {i}: {n} points in {wall:.1f} s wall, ServerApps {server:.1f} s, start-up "
                  f"{(wall - server) / n:.1f} s per point", flush=True)
    sweep, separate = statistics.median(walls["sweep"]), statistics.median(walls["separate"])
    print(f"median wall: the sweep {sweep:.1f} s, its points as separate runs {separate:.1f} s: {sweep / separate:.2f}x "
          f"({(separate - sweep) / n:.1f} s saved per point)")
    print(f"run directories: {out}")


if __name__ == "__main__":
    main()
