"""Adversarial training at a site: what FGSM examples in the local batches cost in time and buy in robustness.

    python bench/adversarial_training.py [--epochs 8] [--test-images 400] [--threads 0]

One synthetic site (2000 scans, near-iid labels) trains four models from the
same start with Adam: non-private and DP at epsilon 8, each clean and with
half of every batch replaced by FGSM examples (L-inf, eps 4/255). Epochs run
interleaved (one epoch of each model in turn, a round of one epoch each), so
machine noise hits all alike. Prints, as one table measured in one run, the
median seconds per epoch, the median over epochs of its ratio to clean
training of the same privacy setting in the same epoch, the epsilon each DP
model spent, and clean and robust accuracy (PGD-10, L-inf, eps 2/255 and
4/255, fedclinic's robust_evaluate) on a seeded sample of the server's
synthetic test set.
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
from fedclinic.data import server_test_set, site_data  # noqa: E402
from fedclinic.analysis.adversarial import robust_evaluate  # noqa: E402
from fedclinic.privacy.accounting import epsilon, plan_site  # noqa: E402

TRAIN_EPS = 4 / 255
TEST_EPS = [2 / 255, 4 / 255]
# Adam for all four: plain SGD at the baseline rate stays near chance for some seeds in so few epochs
SITE = ["data.site-size=2000", "data.quantity-skew=0", "data.label-alpha=100", "training.optimizer=adam",
        "training.learning-rate=0.003", "training.baseline-learning-rate=0.003", "training.local-epochs=1"]
# (name, privacy.mode, robustness.train-attack)
RUNS = [("no DP", "off", "none"), ("no DP + FGSM", "off", "fgsm"),
        ("DP eps=8", "local", "none"), ("DP eps=8 + FGSM", "local", "fgsm")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--test-images", type=int, default=400, help="seeded sample of the server test set")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps torch's choice")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = {name: load_config(None, SITE + [f"privacy.mode={mode}", f"robustness.train-attack={attack}",
                                               f"robustness.train-eps={TRAIN_EPS}"])
               for name, mode, attack in RUNS}
    config = configs["DP eps=8"]
    data, _ = site_data(config.data, 0, 1)
    test = server_test_set(config.data)
    test = test.subset(np.random.default_rng(0).choice(len(test), min(args.test_images, len(test)), replace=False))
    # the DP models train `epochs` rounds of one epoch each, epsilon 8 over all of them
    sigma, _, _ = plan_site(num_examples=len(data), batch_size=config.training.batch_size, local_epochs=1,
                            rounds=args.epochs, target_epsilon=8.0, delta=config.privacy.delta)
    print(f"site: {len(data)} scans of {data.images.shape[2]}x{data.images.shape[3]}, batch "
          f"{config.training.batch_size}, {args.epochs} epochs, sigma {sigma:.3f} for DP; FGSM on "
          f"{config.robustness.train_fraction:.0%} of each batch at eps {round(TRAIN_EPS * 255)}/255; "
          f"test: {len(test)} scans; torch threads {torch.get_num_threads()}")

    models, seconds, history = {}, {name: [] for name in configs}, {name: [] for name in configs}
    for name, cfg in configs.items():
        torch.manual_seed(0)
        models[name] = build_model(cfg, data)
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        for name, cfg in configs.items():
            result = train_locally(models[name], data, training=cfg.training, privacy=cfg.privacy,
                                   robustness=cfg.robustness, box_weight=cfg.model.box_weight,
                                   noise_multiplier=sigma, seed=epoch)
            seconds[name].append(result.seconds)
            history[name].append((result.noise_multiplier, result.sample_rate, result.steps))
        print(f"  epoch {epoch + 1}/{args.epochs} of each model ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)

    rows = []
    for name, mode, _ in RUNS:
        t0 = time.perf_counter()
        found = robust_evaluate(models[name].eval(), test, eps=TEST_EPS, attack="pgd", norm="linf", steps=10,
                                box_weight=configs[name].model.box_weight)
        print(f"  {name}: robust evaluation ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        clean_name = "no DP" if mode == "off" else "DP eps=8"
        ratio = statistics.median(t / clean for t, clean in zip(seconds[name], seconds[clean_name]))
        spent = epsilon(history[name], delta=configs[name].privacy.delta) if mode == "local" else float("nan")
        rows.append((name, statistics.median(seconds[name]), ratio, spent,
                     found["clean_accuracy"], *(a["robust_accuracy"] for a in found["attacks"])))

    print(f"{'training':>16}  {'s/epoch':>7}  {'vs clean':>8}  {'epsilon':>7}  {'clean acc':>9}  "
          f"{'PGD 2/255':>9}  {'PGD 4/255':>9}")
    for name, per_epoch, ratio, spent, clean, *robust in rows:
        print(f"{name:>16}  {per_epoch:>7.2f}  {ratio:>7.2f}x  {spent:>7.3f}  {clean:>9.3f}  "
              + "  ".join(f"{r:>9.3f}" for r in robust))
    print("s/epoch: median over epochs; vs clean: median over epochs of the time per epoch over that of clean "
          "training with the same privacy; robust accuracy: PGD-10 L-inf on the class head")


if __name__ == "__main__":
    main()
