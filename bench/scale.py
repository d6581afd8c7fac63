"""Scale: `fedclinic simulate` at 10, 100 and 1,000 sites, wall time per sample and peak memory of all its processes.

    python bench/scale.py [--sites 10,100,1000] [--site-size 100] [--rounds 2]

Every site holds --site-size synthetic images (data.quantity-skew=0, so the
sizes do not change with the number of sites) and trains every round with
DP-SGD at expected batch --batch-size; the post-training steps (attack, compression, explanations, audit,
fine-tuning) are off, so the run is the federation alone. Peak memory is the
largest sum of resident memory over the CLI and every process carrying the
run's FLWR_HOME (SuperLink, SuperExec, the ServerApp, Ray and its actors),
sampled every 0.5 s: an upper bound, since pages shared between processes count
once per process. "per sample" divides wall time by the images trained (sites
x site-size x rounds); start-up is a fixed cost in it, so the script also prints
the time per *added* sample between sizes, which linear time keeps flat.
"""

import argparse
import tempfile
from pathlib import Path

from simulate_runs import POST_TRAINING_OFF, sets, simulate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sites", default="10,100,1000", help="federation sizes, comma-separated")
    parser.add_argument("--site-size", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32, help="expected batch (a site of 100 keeps 90 to train)")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="fedclinic-scale-"))
    rows = []
    for sites in [int(n) for n in args.sites.split(",")]:
        settings = [f"data.site-size={args.site_size}", "data.quantity-skew=0", f"training.batch-size={args.batch_size}",
                    *POST_TRAINING_OFF]
        results, wall, peak = simulate(out, f"sites-{sites}", "--sites", str(sites), "--rounds", str(args.rounds),
                                       *sets(settings))
        samples = sum(int(s["n"]) * s["rounds_trained"] for s in results["sites"])  # images x rounds trained
        rows.append((sites, wall, samples, peak, results["final"]["accuracy"],
                     results["timings"]["site_train_seconds"]))
        print(f"{sites:5d} sites: wall {wall:7.1f} s, {samples} samples trained, {1000 * wall / samples:6.2f} ms per "
              f"sample, peak memory {peak / 2**30:5.2f} GiB over all processes, site training "
              f"{rows[-1][5]:.0f} s CPU, accuracy {rows[-1][4]:.3f}", flush=True)
    # start-up is a fixed cost; linear time means each added sample costs the same: the marginal time per sample
    for (small, wall0, samples0, peak0, _, _), (sites, wall, samples, peak, _, _) in zip(rows, rows[1:]):
        print(f"{small} -> {sites} sites: {samples / samples0:.0f}x the samples, {wall / wall0:.2f}x the wall time, "
              f"{1000 * (wall - wall0) / (samples - samples0):.2f} ms per added sample, peak memory {peak / peak0:.2f}x")
    print(f"run directories: {out}")


if __name__ == "__main__":
    main()
