"""Under poisoning: clean accuracy of each defence when sites attack, and a backdoor's success, without privacy and at eps 8.

    python bench/poisoning.py                                  # 1 of 5 and 2 of 10 sites, medians of 3 seeds
    python bench/poisoning.py --scenarios 1of5 --seeds 0       # a quick look
    python bench/poisoning.py --attacks sign-flip,scale --out DIR   # reuses the finished runs in DIR
    python bench/poisoning.py --finished-only                  # the tables of the runs that finished, none run

For each scenario (1 of 5 sites attacking, 2 of 10), privacy setting (off,
record-level eps = 8) and seed, one `fedclinic simulate` (fedclinic.run) per
defence with nobody attacking, and per attack and defence with the attackers
on (federation.attackers, federation.attack; sign-flip and scale at
federation.attack-boost=10). The defences:

- fedavg-unchecked: FedAvg with the norm rule off (federation.reply-norm-ratio=0),
  what FedAvg does alone;
- fedavg: FedAvg behind the server's reply checks at their default
  (federation.reply-norm-ratio=10); fedavg-norm3 with a tighter norm rule (3);
- fedavg-clip: FedAvg with every update clipped to CLIP_NORM[privacy]
  (federation.update-clip-norm) and the norm rule off: norm bounding;
- fedmedian, fedtrimmedavg, krum, multikrum, bulyan: Flower's robust
  aggregators with the norm rule off, so that the aggregator alone is
  measured; federation.num-malicious is the number of attackers, MultiKrum
  averages the sites - attackers best replies, and Bulyan runs only where
  the sites are at least 4 * attackers + 3.

NaN and inf replies are always refused, whatever the defence. Every run uses
the default recipe for `--rounds` rounds (10), the steps after training off.
It prints the medians as a table of final accuracy on the server's test set,
and a table of the backdoor success rate (the share of triggered test images
of other classes classified as federation.backdoor-target, 0 = healthy) of
every defence under the backdoor attack and, for reference, of the same
defence's model when nobody attacked. It writes poisoning.json and
poisoning.md into the output folder; a run whose results.json exists there is
reused. A cell shows how many seeds it is the median of when that is fewer
than asked for (with --finished-only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from utility import OFF, PRIVACY, simulate  # noqa: E402

import fedclinic  # noqa: E402
from fedclinic.config import load_config  # noqa: E402
from fedclinic.data import server_test_set  # noqa: E402
from fedclinic.evaluation import backdoor_success_rate  # noqa: E402

SCENARIOS = {"1of5": (5, (1,)), "2of10": (10, (1, 6))}
DEFENCES = ("fedavg-unchecked", "fedavg", "fedavg-norm3", "fedavg-clip", "fedmedian", "fedtrimmedavg", "krum",
            "multikrum", "bulyan")
# fedavg-clip's federation.update-clip-norm, per privacy setting: about the median of the honest sites' update
# norms over the rounds of the default recipe (metrics.csv's update_norm). Under DP-SGD they are an order of
# magnitude larger (seed 0, eps 8, 5 sites: 11 to 28 in round 1, 1.2 to 2.6 in round 4), and 0.5 there cost 23
# points of clean accuracy
CLIP_NORM = {"off": 0.5, "8": 4.0, "3": 4.0}


def defence_settings(defence: str, sites: int, attackers: int, privacy: str) -> list[str] | None:
    """The federation.* keys of a defence; None where Flower's rule cannot run with this many sites."""
    if defence == "fedavg-unchecked":
        return ["federation.strategy=fedavg", "federation.reply-norm-ratio=0"]
    if defence == "fedavg":
        return ["federation.strategy=fedavg"]
    if defence == "fedavg-norm3":
        return ["federation.strategy=fedavg", "federation.reply-norm-ratio=3"]
    if defence == "fedavg-clip":
        return ["federation.strategy=fedavg", "federation.reply-norm-ratio=0",
                f"federation.update-clip-norm={CLIP_NORM[privacy]}"]
    if defence == "bulyan" and sites < 4 * attackers + 3:
        return None
    return [f"federation.strategy={defence}", "federation.reply-norm-ratio=0", f"federation.num-malicious={attackers}",
            f"federation.krum-select={sites - attackers}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--attacks", default="sign-flip,backdoor",
                        help="among label-flip, sign-flip, scale, noise, nan, backdoor")
    parser.add_argument("--defences", default=",".join(DEFENCES))
    parser.add_argument("--privacy", default="off,8", help="off and/or target epsilons among 8, 3")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "poisoning"))
    parser.add_argument("--finished-only", action="store_true", help="run nothing: the tables of the finished runs")
    args = parser.parse_args()
    out, seeds = Path(args.out), [int(s) for s in args.seeds.split(",")]
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    found: dict[str, list[float]] = {}
    backdoor: dict[str, list[float]] = {}
    for scenario in args.scenarios.split(","):
        sites, attackers = SCENARIOS[scenario]
        for privacy in args.privacy.split(","):
            for attack in ["none", *args.attacks.split(",")]:
                for defence in args.defences.split(","):
                    keys = defence_settings(defence, sites, len(attackers), privacy)
                    if keys is None:
                        continue
                    if attack != "none":
                        keys += [f"federation.attackers={','.join(map(str, attackers))}", f"federation.attack={attack}"]
                    for seed in seeds:
                        name = f"{scenario}-{privacy}-{attack}-{defence}-seed{seed}-r{args.rounds}"
                        if args.finished_only and not (out / name / "results.json").exists():
                            continue
                        results = simulate(out, name, [*PRIVACY[privacy], *OFF, f"federation.sites={sites}",
                                                       f"federation.rounds={args.rounds}", f"data.seed={seed}", *keys])
                        key = f"{scenario}/{privacy}/{attack}/{defence}"
                        found.setdefault(key, []).append(results["final"]["accuracy"])
                        success = results["final"].get("backdoor_success_rate")
                        if "backdoor" in args.attacks.split(",") and attack in ("none", "backdoor"):
                            backdoor.setdefault(key, []).append(success if success is not None else
                                                                clean_backdoor_rate(out / name))
                        print(f"[{time.perf_counter() - started:.0f} s] {name}: {results['final']['accuracy']:.3f}",
                              flush=True)
    median = {key: (statistics.median(values), len(values)) for key, values in found.items()}
    success = {key: (statistics.median(values), len(values)) for key, values in backdoor.items()}
    text = markdown(median, seeds, args.rounds, "final accuracy on the server's test set")
    if success:
        text += "\n" + markdown(success, seeds, args.rounds, "backdoor success rate (none: the same defence's model "
                                 "when nobody attacked, with the trigger put on its test images)")
    print("\n" + text)
    (out / "poisoning.md").write_text(text)
    (out / "poisoning.json").write_text(json.dumps({"seeds": seeds, "rounds": args.rounds,
                                                    "median": {k: m for k, (m, _) in median.items()},
                                                    "per_seed": found, "backdoor_per_seed": backdoor}, indent=1))
    print(f"written: {out / 'poisoning.md'}, {out / 'poisoning.json'}")


def clean_backdoor_rate(run_dir: Path) -> float:
    """The backdoor success rate of a run's final model that nobody attacked: the trigger's base rate."""
    config = load_config(run_dir / "config.toml")
    return backdoor_success_rate(fedclinic.load_model(run_dir / "global_model.pt"), server_test_set(config.data),
                                 target=config.federation.backdoor_target)


def markdown(median: dict[str, tuple[float, int]], seeds: list[int], rounds: int, what: str) -> str:
    """One row per scenario, privacy and attack; one column per defence (the median over the seeds, and how many
    seeds when fewer than asked for)."""
    defences = list(dict.fromkeys(key.split("/")[3] for key in median))
    rows = list(dict.fromkeys(tuple(key.split("/")[:3]) for key in median))
    lines = [f"median of seeds {', '.join(map(str, seeds))}, {rounds} rounds, {what}",
             "", "| sites attacking | privacy | attack | " + " | ".join(defences) + " |",
             "| --- | --- | --- | " + " | ".join("---:" for _ in defences) + " |"]
    for scenario, privacy, attack in rows:
        cells = [cell(*median[key], len(seeds)) if (key := f"{scenario}/{privacy}/{attack}/{d}") in median else "—"
                 for d in defences]
        label = "off" if privacy == "off" else f"ε = {privacy}"
        lines.append(f"| {scenario.replace('of', ' of ')} | {label} | {attack} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def cell(value: float, count: int, asked: int) -> str:
    return f"{value:.3f}" + (f" ({count} seed{'s' if count > 1 else ''})" if count < asked else "")


if __name__ == "__main__":
    main()
