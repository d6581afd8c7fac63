"""Measured privacy beside accounted privacy: the canary audit's epsilon-hat and the membership attacks, per budget.

    python bench/privacy_audit.py                        # off, eps 8, 3, 1; 1,000 canaries; data seed 0
    python bench/privacy_audit.py --privacy off,1 --canaries 500 --seeds 0,1

For each privacy setting and seed, one `fedclinic simulate` of the default
federation (fedclinic.run: 5 synthetic sites, the default recipe and rounds,
the fine-tuning on; the attack, compression and explanations off) with
privacy.audit-canaries = --canaries, so that its audit step replays the
federation with the canaries (fedclinic.canary_audit) and runs the
membership attacks on the run's global model. It prints, per run:

- the accountant's epsilon (the largest audited site's, after the rounds);
- epsilon-hat at 95% from the sites' updates (white-box) and from the final
  model alone (black-box); "bug" when epsilon-hat exceeds epsilon;
- TPR at 0.1% FPR (and AUC) of offline LiRA and of the loss threshold;
- the audit's cost against the run's: the canary audit's seconds over the
  run's rounds (results.json rounds[-1].elapsed: from the ServerApp's start
  to the last round's end, the workers' start-up in round 1 included), over
  the run's whole time before the audit (timings.wall_seconds: Flower's
  start-up, the rounds, the fine-tuning) and over its sites' training loops
  (timings.site_train_seconds, summed over sites).

A run whose results.json exists in the output folder is reused.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from utility import simulate  # noqa: E402

PRIVACY = {"off": ["privacy.mode=off"], **{e: [f"privacy.target-epsilon={e}"] for e in ("8", "3", "1")}}
STEPS_OFF = ["robustness.enabled=false", "compression.enabled=false", "explain.enabled=false", "privacy.audit=true"]


def row(privacy: str, seed: int, results: dict) -> dict:
    audit, timings = results["audit"], results["timings"]
    calibrated = audit["calibrated"]
    return {"privacy": privacy, "seed": seed, "accuracy": results["final"]["accuracy"], "epsilon": audit["epsilon"],
            "epsilon_hat": audit["epsilon_lower_bound"], "epsilon_hat_black_box": audit["black_box"]["epsilon_lower_bound"],
            "guesses": audit["guesses"], "correct": audit["correct"], "bug": audit["likely_privacy_bug"],
            "lira_tpr_01": calibrated["tpr_at_01pct_fpr"], "lira_auc": calibrated["auc"],
            "loss_tpr_01": audit["tpr_at_01pct_fpr"], "loss_auc": audit["auc"],
            "audit_seconds": audit["seconds"], "audit_training_seconds": audit["training_seconds"],
            "run_seconds": results["rounds"][-1]["elapsed"], "run_wall_seconds": timings["wall_seconds"],
            "run_training_seconds": timings["site_train_seconds"]}


def table(rows: list[dict]) -> str:
    lines = ["| privacy | seed | accuracy | ε (accountant) | ε̂ white-box | right guesses | ε̂ black-box | LiRA TPR @0.1% "
             "(AUC) | loss threshold TPR @0.1% (AUC) | audit s | ÷ run's rounds s | ÷ run's wall s | ÷ run's site training s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        eps = "—" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        bug = " **bug**" if r["bug"] else ""
        lines.append(
            f"| {'off' if r['privacy'] == 'off' else 'ε = ' + r['privacy']} | {r['seed']} | {r['accuracy']:.3f} | {eps} | "
            f"{r['epsilon_hat']:.2f}{bug} | {r['correct']}/{r['guesses']} | {r['epsilon_hat_black_box']:.2f} | "
            f"{r['lira_tpr_01']:.3f} ({r['lira_auc']:.3f}) | {r['loss_tpr_01']:.3f} ({r['loss_auc']:.3f}) | "
            f"{r['audit_seconds']:.0f} | {r['audit_seconds'] / r['run_seconds']:.2f} | "
            f"{r['audit_seconds'] / r['run_wall_seconds']:.2f} | {r['audit_seconds'] / r['run_training_seconds']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--privacy", default="off,8,3,1", help="off and/or target epsilons among 8, 3, 1")
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "privacy_audit"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started, rows = time.perf_counter(), []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for privacy in args.privacy.split(","):
            name = f"{privacy}-seed{seed}-canaries{args.canaries}"
            results = simulate(out, name, [*PRIVACY[privacy], *STEPS_OFF, f"data.seed={seed}",
                                           f"privacy.audit-canaries={args.canaries}"])
            rows.append(row(privacy, seed, results))
            print(f"[{time.perf_counter() - started:.0f} s] {name}: epsilon-hat {rows[-1]['epsilon_hat']:.2f}",
                  flush=True)
    text = table(rows)
    print("\n" + text)
    (out / "privacy_audit.md").write_text(text)
    (out / "privacy_audit.json").write_text(json.dumps(rows, indent=1))
    print(f"written: {out / 'privacy_audit.md'}, {out / 'privacy_audit.json'}")


if __name__ == "__main__":
    main()
