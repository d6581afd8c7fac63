"""Adversarial robustness: clean and robust accuracy under FGSM and PGD, and what each attack costs.

    python bench/adversarial_eval.py [--model runs/NAME/global_model.pt] [--steps 10] [--threads 1]

Without --model it first trains a small non-private model on one synthetic
site. Then, on the synthetic server test set (1000 scans), it prints the
clean accuracy and box IoU, and for FGSM and PGD (L-inf, eps 1/255 to 8/255)
the accuracy with the class head attacked and the box IoU with the box head
attacked, and the seconds each eps took (both attacks) as a multiple of one
clean evaluation pass, all measured in one run.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fedclinic.clients.site import build_model  # noqa: E402
from fedclinic.clients.training import train_locally  # noqa: E402
from fedclinic.config import DataConfig, load_config  # noqa: E402
from fedclinic.data import server_test_set, site_data  # noqa: E402
from fedclinic.evaluation import evaluate  # noqa: E402
from fedclinic.analysis.adversarial import robust_evaluate  # noqa: E402
from fedclinic.model import load_model  # noqa: E402

EPS = [1 / 255, 2 / 255, 4 / 255, 8 / 255]
# one synthetic site of near-iid labels, no DP; Adam, since plain SGD at the baseline rate stays
# near chance for some seeds (and thread counts) in so few epochs
TRAINING = ["data.site-size=2000", "data.quantity-skew=0", "data.label-alpha=100", "privacy.mode=off",
            "training.optimizer=adam", "training.baseline-learning-rate=0.003", "training.local-epochs=8"]


def trained_model():
    config = load_config(None, TRAINING)
    data, _ = site_data(config.data, 0, 1)
    torch.manual_seed(0)
    model = build_model(config, data)
    t0 = time.perf_counter()
    train_locally(model, data, training=config.training, privacy=config.privacy,
                  box_weight=config.model.box_weight, noise_multiplier=0.0, seed=0)
    print(f"model: trained here, non-private, {len(data)} images, {config.training.local_epochs} epochs "
          f"({time.perf_counter() - t0:.0f} s)")
    return model.cpu().eval()


def clean_pass(model, data) -> tuple[dict, float]:
    """The clean metrics and the median time of one clean evaluation pass over `data`."""
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        metrics = evaluate(model, data, box_weight=1.0)
        times.append(time.perf_counter() - t0)
    return metrics, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", help="a saved model, e.g. runs/NAME/global_model.pt (default: train one here)")
    parser.add_argument("--steps", type=int, default=10, help="PGD steps")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps torch's choice")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model) if args.model else trained_model()
    data = server_test_set(DataConfig())
    print(f"test: {len(data)} synthetic scans of {data.images.shape[2]}x{data.images.shape[3]}, "
          f"torch threads {torch.get_num_threads()}")
    metrics, clean = clean_pass(model, data)
    print(f"{'attack':>7}  {'eps':>5}  {'accuracy':>8}  {'box IoU':>7}")
    print(f"{'none':>7}  {0:>5}  {metrics['accuracy']:>8.3f}  {metrics['iou']:>7.3f}")
    costs = []
    for attack, name in (("fgsm", "FGSM"), ("pgd", f"PGD-{args.steps}")):
        t0 = time.perf_counter()
        found = robust_evaluate(model, data, eps=EPS, attack=attack, steps=args.steps)
        # robust_evaluate makes one clean pass of its own before the attacks
        per_eps = (time.perf_counter() - t0 - clean) / len(EPS)
        costs.append(f"{name}: {per_eps:.2f} s per eps (class and box attack), {per_eps / clean:.1f}x a clean pass")
        for row in found["attacks"]:
            eps = f"{round(row['eps'] * 255)}/255"
            print(f"{name:>7}  {eps:>5}  {row['robust_accuracy']:>8.3f}  {row['iou_under_attack']:>7.3f}")
    print("accuracy: class head attacked; box IoU: box head attacked (scans with a lesion)")
    print(f"clean pass: {clean:.2f} s; " + "; ".join(costs))

if __name__ == "__main__":
    main()
