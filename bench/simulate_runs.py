"""Whole-run benchmarks of `fedclinic simulate`, each number taken in this one invocation.

    python bench/simulate_runs.py                 # overhead + utility (default run, DP on and off)
    python bench/simulate_runs.py --scale 50      # also 50 sites x 2 rounds: wall time and peak memory

- Federation overhead: wall time of the default `fedclinic simulate` divided by
  the compute it did: local training at the sites (summed over sites and
  rounds, divided by the number of sites that can train at once) plus central
  evaluation. 1.0 would mean Flower, Ray and process start-up cost nothing.
- Utility: the default run's final central accuracy and IoU with privacy off vs on.
- Scale: wall time and peak memory summed over every process of the run
  (sampled every 0.5 s from /proc; RSS counts shared pages once per process,
  so the sum is an upper bound).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rss_of_run(cli_pid: int, flwr_home: Path) -> int:
    """Bytes of resident memory of the CLI and every process carrying the run's FLWR_HOME."""
    marker = f"FLWR_HOME={flwr_home}".encode()
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            mine = int(entry.name) == cli_pid or marker in (entry / "environ").read_bytes().split(b"\0")
            if mine:
                for line in (entry / "status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def simulate(out: Path, name: str, *args: str) -> tuple[dict, float, int]:
    """Run the CLI; returns (results.json, wall seconds, peak bytes over all its processes)."""
    cmd = [sys.executable, "-m", "fedclinic.cli", "simulate", "--out", str(out), "--name", name, "--quiet", *args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_of_run(proc.pid, out / name / ".flwr"))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"simulate {name} failed ({proc.returncode}): {stderr.strip()}")
    return json.loads((out / name / "results.json").read_text()), wall, peak[0]


def overhead(results: dict, wall: float) -> tuple[float, float]:
    cfg = results["config"]
    t = results["timings"]
    parallel = max(1, min(cfg["federation.sites"], (os.cpu_count() or 1) // cfg["federation.client-cpus"]))
    compute = t["site_train_seconds"] / parallel + t["central_eval_seconds"]
    return compute, wall / compute


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=int, default=0, help="also run this many sites for 2 rounds")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="fedclinic-bench-"))
    dp, dp_wall, dp_peak = simulate(out, "default-dp")
    plain, plain_wall, _ = simulate(out, "default-plain", "--set", "privacy.mode=off")
    compute, ratio = overhead(dp, dp_wall)
    print(f"default run (DP on): wall {dp_wall:.1f} s, compute {compute:.1f} s, "
          f"overhead wall/compute = {ratio:.2f} (goal <= 1.25); peak memory {dp_peak / 2**30:.2f} GiB")
    _, ratio_plain = overhead(plain, plain_wall)
    print(f"default run (DP off): wall {plain_wall:.1f} s, overhead wall/compute = {ratio_plain:.2f}")
    f_dp, f_plain = dp["final"], plain["final"]
    print(f"utility: accuracy {f_plain['accuracy']:.3f} (DP off) vs {f_dp['accuracy']:.3f} (DP on, "
          f"max eps {f_dp['max_epsilon']:.2f}); IoU {f_plain['iou']:.3f} vs {f_dp['iou']:.3f}")
    if args.scale:
        big, wall, peak = simulate(out, f"scale-{args.scale}", "--sites", str(args.scale), "--rounds", "2",
                                   "--set", "data.site-size=200")
        print(f"scale: {args.scale} sites x 2 rounds: wall {wall:.1f} s, peak memory {peak / 2**30:.2f} GiB "
              f"over all processes, final accuracy {big['final']['accuracy']:.3f}")
    print(f"run directories: {out}")


if __name__ == "__main__":
    main()
