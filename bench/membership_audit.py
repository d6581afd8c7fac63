"""Membership inference with and without DP-SGD: what a loss-threshold attack learns about the training images.

    python bench/membership_audit.py [--seeds 3] [--threads 1]

One synthetic site trains the default model for many epochs on few images,
so that without DP it overfits; then a loss-threshold attack tells its
training images (members) from fresh scans of the same site (non-members).
Prints AUC, TPR at 1% and 0.1% FPR, and the model's accuracy on the unseen
scans, for no DP and DP-SGD at epsilon 8 and 1: medians over --seeds seeds
(each seed draws other data, weights, batches and noise), all in one run.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fedclinic.clients.site import build_model  # noqa: E402
from fedclinic.clients.training import train_locally  # noqa: E402
from fedclinic.config import load_config  # noqa: E402
from fedclinic.data.synthetic import generate_fresh_site_scans  # noqa: E402
from fedclinic.evaluation import evaluate  # noqa: E402
from fedclinic.privacy.accounting import plan_site  # noqa: E402
from fedclinic.analysis.audit import audit_model  # noqa: E402

SETTINGS = [("no DP", None), ("DP eps=8", 8.0), ("DP eps=1", 1.0)]
MEMBERS = 400  # training images: few, so that the plain model overfits
NONMEMBERS = 1000  # fresh scans: FPR in steps of 0.1%
EPOCHS = 60
# the plain model trains with the baseline rate; DP-SGD at sigma ~ 9 diverges at the default 0.3
DP_LEARNING_RATE = 0.05
COLUMNS = ["auc", "tpr_at_1pct_fpr", "tpr_at_01pct_fpr", "accuracy"]


def one_run(target_epsilon: float | None, seed: int) -> dict:
    privacy = "off" if target_epsilon is None else "local"
    # a recipe made to overfit: the trained CNN encoder, no augmentation, a constant learning rate
    config = load_config(None, [f"data.seed={seed}", "model.encoder=cnn", "training.augment=none",
                                "training.schedule=constant", "training.batch-size=32", f"training.local-epochs={EPOCHS}",
                                f"training.learning-rate={DP_LEARNING_RATE}", f"privacy.mode={privacy}"])
    scans = generate_fresh_site_scans(config.data, 0, MEMBERS + NONMEMBERS)
    members, nonmembers = scans.subset(np.arange(MEMBERS)), scans.subset(np.arange(MEMBERS, len(scans)))
    sigma = 0.0
    if target_epsilon is not None:  # one site, one round of EPOCHS epochs
        sigma, _, _ = plan_site(num_examples=MEMBERS, batch_size=config.training.batch_size, local_epochs=EPOCHS,
                                rounds=1, target_epsilon=target_epsilon, delta=config.privacy.delta)
    torch.manual_seed(seed)
    model = build_model(config, members)
    train_locally(model, members, training=config.training, privacy=config.privacy,
                  box_weight=config.model.box_weight, noise_multiplier=sigma, seed=seed)
    device = next(model.parameters()).device
    audit = audit_model(model, members, nonmembers, box_weight=config.model.box_weight, device=device)
    audit["accuracy"] = evaluate(model, nonmembers, box_weight=config.model.box_weight, device=device)["accuracy"]
    audit["sigma"] = sigma
    return audit


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps torch's choice")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{MEMBERS} members vs {NONMEMBERS} fresh non-members, {EPOCHS} epochs, batch 32, "
          f"median of {args.seeds} seeds, torch threads {torch.get_num_threads()}")
    results = {}
    for name, target_epsilon in SETTINGS:
        results[name] = []
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            results[name].append(one_run(target_epsilon, seed))
            print(f"  {name}, seed {seed}: AUC {results[name][-1]['auc']:.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    print(f"{'setting':>9}  {'sigma':>5}  {'AUC':>5}  {'TPR@1%FPR':>9}  {'TPR@0.1%FPR':>11}  {'held-out acc':>12}")
    for name, runs in results.items():
        auc, tpr1, tpr01, accuracy = (statistics.median(r[key] for r in runs) for key in COLUMNS)
        sigma = statistics.median(r["sigma"] for r in runs)
        print(f"{name:>9}  {sigma:>5.2f}  {auc:>5.3f}  {tpr1:>9.3f}  {tpr01:>11.3f}  {accuracy:>12.3f}")


if __name__ == "__main__":
    main()
