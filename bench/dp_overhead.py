"""DP overhead: local training throughput with Opacus vs without, same model and data.

    python bench/dp_overhead.py [--repeats 3] [--threads N] [--device cpu|cuda]

Prints images/second for plain SGD and for DP-SGD with each Opacus
grad_sample_mode, and each as a ratio of plain time, all measured in one run
(medians of --repeats epochs each, modes interleaved so machine noise hits
all alike).
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fedclinic.clients.site import build_model  # noqa: E402
from fedclinic.clients.training import train_locally  # noqa: E402
from fedclinic.config import load_config, replace  # noqa: E402
from fedclinic.data import site_data  # noqa: E402
from fedclinic.device import resolve_device  # noqa: E402

MODES = ["plain", "hooks", "functorch", "ew"]


def one_epoch(config, data, mode: str) -> float:
    if mode == "plain":
        config = replace(config, privacy={"mode": "off"})
    else:
        config = replace(config, privacy={"grad_sample_mode": mode})
    torch.manual_seed(0)
    model = build_model(config, data)
    result = train_locally(model, data, training=config.training, privacy=config.privacy,
                           box_weight=config.model.box_weight, noise_multiplier=1.0, seed=0)
    return result.seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default; a simulated site trains on federation.client-cpus)")
    parser.add_argument("--device", default="auto", help="training.device: auto (a GPU when present), cpu or cuda")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(None, ["data.site-size=2000", "data.quantity-skew=0", f"training.device={args.device}"])
    data, _ = site_data(config.data, 0, 1)
    print(f"{len(data)} images of {data.images.shape[2]}x{data.images.shape[3]}, batch {config.training.batch_size}, "
          f"torch threads {torch.get_num_threads()}, device {resolve_device(config.training.device)}")
    for mode in MODES:  # warm-up: first-call costs (imports, allocator) are not throughput
        one_epoch(config, data, mode)
    times = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            times[mode].append(one_epoch(config, data, mode))
    plain = statistics.median(times["plain"])
    print(f"{'mode':>10}  {'images/s':>9}  {'time / plain':>12}")
    for mode in MODES:
        t = statistics.median(times[mode])
        print(f"{mode:>10}  {len(data) / t:>9.0f}  {t / plain:>11.2f}x")
    best = min(MODES[1:], key=lambda m: statistics.median(times[m]))
    print(f"fastest DP mode: {best} ({statistics.median(times[best]) / plain:.2f}x plain; goal <= 1.5x)")


if __name__ == "__main__":
    main()
