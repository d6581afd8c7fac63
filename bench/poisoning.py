"""Under poisoning: clean accuracy of each defence when sites attack, without privacy and at eps 8.

    python bench/poisoning.py                                  # 1 of 5 and 2 of 10 sites, medians of 3 seeds
    python bench/poisoning.py --scenarios 1of5 --seeds 0       # a quick look
    python bench/poisoning.py --attacks sign-flip,scale --out DIR   # reuses the finished runs in DIR

For each scenario (1 of 5 sites attacking, 2 of 10), privacy setting (off,
record-level eps = 8) and seed, one `fedclinic simulate` (fedclinic.run) per
defence with nobody attacking, and per attack and defence with the attackers
on (federation.attackers, federation.attack; sign-flip and scale at
federation.attack-boost=10). The defences:

- fedavg-unchecked: FedAvg with the norm rule off (federation.reply-norm-ratio=0),
  what FedAvg does alone;
- fedavg: FedAvg behind the server's reply checks at their default
  (federation.reply-norm-ratio=10); fedavg-norm3 with a tighter norm rule (3);
- fedmedian, fedtrimmedavg, krum, multikrum, bulyan: Flower's robust
  aggregators with the norm rule off, so that the aggregator alone is
  measured; federation.num-malicious is the number of attackers, MultiKrum
  averages the sites - attackers best replies, and Bulyan runs only where
  the sites are at least 4 * attackers + 3.

NaN and inf replies are always refused, whatever the defence. Every run uses
the default recipe for `--rounds` rounds (10), the steps after training off.
It prints the medians as a table of final accuracy on the server's test set,
and writes poisoning.json and poisoning.md into the output folder; a run whose
results.json exists there is reused.
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

SCENARIOS = {"1of5": (5, (1,)), "2of10": (10, (1, 6))}
DEFENCES = ("fedavg-unchecked", "fedavg", "fedavg-norm3", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")


def defence_settings(defence: str, sites: int, attackers: int) -> list[str] | None:
    """The federation.* keys of a defence; None where Flower's rule cannot run with this many sites."""
    if defence == "fedavg-unchecked":
        return ["federation.strategy=fedavg", "federation.reply-norm-ratio=0"]
    if defence == "fedavg":
        return ["federation.strategy=fedavg"]
    if defence == "fedavg-norm3":
        return ["federation.strategy=fedavg", "federation.reply-norm-ratio=3"]
    if defence == "bulyan" and sites < 4 * attackers + 3:
        return None
    return [f"federation.strategy={defence}", "federation.reply-norm-ratio=0", f"federation.num-malicious={attackers}",
            f"federation.krum-select={sites - attackers}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--attacks", default="sign-flip", help="among label-flip, sign-flip, scale, noise, nan")
    parser.add_argument("--defences", default=",".join(DEFENCES))
    parser.add_argument("--privacy", default="off,8", help="off and/or target epsilons among 8, 3")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "poisoning"))
    args = parser.parse_args()
    out, seeds = Path(args.out), [int(s) for s in args.seeds.split(",")]
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    found: dict[str, list[float]] = {}
    for scenario in args.scenarios.split(","):
        sites, attackers = SCENARIOS[scenario]
        for privacy in args.privacy.split(","):
            for attack in ["none", *args.attacks.split(",")]:
                for defence in args.defences.split(","):
                    keys = defence_settings(defence, sites, len(attackers))
                    if keys is None:
                        continue
                    if attack != "none":
                        keys += [f"federation.attackers={','.join(map(str, attackers))}", f"federation.attack={attack}"]
                    for seed in seeds:
                        name = f"{scenario}-{privacy}-{attack}-{defence}-seed{seed}-r{args.rounds}"
                        results = simulate(out, name, [*PRIVACY[privacy], *OFF, f"federation.sites={sites}",
                                                       f"federation.rounds={args.rounds}", f"data.seed={seed}", *keys])
                        found.setdefault(f"{scenario}/{privacy}/{attack}/{defence}", []).append(
                            results["final"]["accuracy"])
                        print(f"[{time.perf_counter() - started:.0f} s] {name}: {results['final']['accuracy']:.3f}",
                              flush=True)
    median = {key: statistics.median(values) for key, values in found.items()}
    text = markdown(median, seeds, args.rounds)
    print("\n" + text)
    (out / "poisoning.md").write_text(text)
    (out / "poisoning.json").write_text(json.dumps({"seeds": seeds, "rounds": args.rounds, "median": median,
                                                    "per_seed": found}, indent=1))
    print(f"written: {out / 'poisoning.md'}, {out / 'poisoning.json'}")


def markdown(median: dict[str, float], seeds: list[int], rounds: int) -> str:
    """One row per scenario, privacy and attack; one column per defence (final accuracy, median over the seeds)."""
    defences = list(dict.fromkeys(key.split("/")[3] for key in median))
    rows = list(dict.fromkeys(tuple(key.split("/")[:3]) for key in median))
    lines = [f"median of seeds {', '.join(map(str, seeds))}, {rounds} rounds, final accuracy on the server's test set",
             "", "| sites attacking | privacy | attack | " + " | ".join(defences) + " |",
             "| --- | --- | --- | " + " | ".join("---:" for _ in defences) + " |"]
    for scenario, privacy, attack in rows:
        cells = [f"{median[key]:.3f}" if (key := f"{scenario}/{privacy}/{attack}/{d}") in median else "—"
                 for d in defences]
        label = "off" if privacy == "off" else f"ε = {privacy}"
        lines.append(f"| {scenario.replace('of', ' of ')} | {label} | {attack} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
