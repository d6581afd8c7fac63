"""Compression: the global model before (torch, float) and after (onnxruntime), measured in one run.

    python bench/compression.py [--model runs/NAME/global_model.pt] [--prune 0,0.5] [--repeats 30] [--threads N]

Without --model it trains a quick non-private model on one synthetic site. The
server's test set is split: the first --calibration images calibrate the int8
ranges, the rest are the test images. For each pruning amount it prints the
float ONNX export and the int8 files in both ONNX Runtime formats: size, CPU
latency per image at batch 1 and 64, accuracy and lesion IoU, each beside its
ratio to (or change from) the torch model, which is timed again in each row.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fedclinic.clients.site import build_model  # noqa: E402
from fedclinic.clients.training import train_locally  # noqa: E402
from fedclinic.analysis.compression import QUANT_FORMATS, compare, compress  # noqa: E402
from fedclinic.config import load_config  # noqa: E402
from fedclinic.data import server_test_set, site_data  # noqa: E402
from fedclinic.model import load_model  # noqa: E402

GOAL_RATIO, GOAL_POINTS = 3.5, 1.0


def quick_model(config):
    data, _ = site_data(config.data, 0, 1)
    torch.manual_seed(0)
    model = build_model(config, data)
    train_locally(model, data, training=config.training, privacy=config.privacy,
                  box_weight=config.model.box_weight, noise_multiplier=0.0, seed=0)
    return model.eval()


def row(label: str, r: dict) -> str:
    a = r["after"]
    return (f"{label:<24} {a['bytes'] / 1000:>7.1f} {r['size_ratio']:>6.2f}x  "
            f"{a['ms_per_image_b1']:>7.3f} {r['speedup_b1']:>6.2f}x  {a['ms_per_image_b64']:>7.3f} {r['speedup_b64']:>6.2f}x  "
            f"{a['accuracy']:>6.3f} {100 * r['accuracy_change']:>+6.1f}  {a['iou']:>6.3f} {100 * r['iou_change']:>+6.1f}  "
            f"{r['agreement']:>6.3f}")


def torch_row(b: dict) -> str:
    return (f"{'torch float (.pt)':<24} {b['bytes'] / 1000:>7.1f} {1:>6.2f}x  {b['ms_per_image_b1']:>7.3f} {1:>6.2f}x  "
            f"{b['ms_per_image_b64']:>7.3f} {1:>6.2f}x  {b['accuracy']:>6.3f} {0:>+6.1f}  {b['iou']:>6.3f} {0:>+6.1f}  "
            f"{1:>6.3f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", help="a saved global model (default: train a quick non-private one)")
    parser.add_argument("--config", help="the run's config.toml (default: the one beside --model, if any)")
    parser.add_argument("--prune", default="0,0.5", help="comma-separated pruning amounts")
    parser.add_argument("--calibration", type=int, default=256, help="server test images used for calibration")
    parser.add_argument("--repeats", type=int, default=30)
    # one thread by default: a 42k-parameter model gains little from more, and torch's
    # multi-threaded calls took 100x longer whenever other work shared a 2-core machine
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of both runtimes")
    args = parser.parse_args()

    config_path = args.config
    if config_path is None and args.model and (Path(args.model).parent / "config.toml").is_file():
        config_path = Path(args.model).parent / "config.toml"
    if args.model:
        config = load_config(config_path)
        model, origin = load_model(args.model), args.model
    else:
        config = load_config(config_path, ["data.site-size=1500", "data.quantity-skew=0", "privacy.mode=off",
                                           "training.local-epochs=4", "training.optimizer=adam",
                                           "training.baseline-learning-rate=0.003", "training.device=cpu"])
        start = time.perf_counter()
        model = quick_model(config)
        origin = f"quick non-private model ({time.perf_counter() - start:.0f} s of training)"
    server = server_test_set(config.data)
    calibration = server.subset(np.arange(args.calibration))
    test = server.subset(np.arange(args.calibration, len(server)))
    threads = args.threads
    print(f"{origin}; {len(calibration)} calibration and {len(test)} test images of "
          f"{server.images.shape[2]}x{server.images.shape[3]}; torch {torch.__version__} and onnxruntime "
          f"both on {threads} threads; latency: median of {args.repeats} calls")
    print(f"{'':<24} {'KB':>7} {'smaller':>7}  {'b1 ms':>7} {'faster':>7}  {'b64 ms':>7} {'faster':>7}  "
          f"{'acc':>6} {'points':>6}  {'IoU':>6} {'points':>6}  {'agree':>6}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for amount in (float(a) for a in args.prune.split(",")):
            files = {fmt: compress(model, calibration, Path(tmp) / f"{amount}-{fmt}", prune_amount=amount,
                                   quant_format=fmt) for fmt in QUANT_FORMATS}
            paths = [("onnx float", files["qdq"]["float_path"])]
            paths += [(f"int8 {fmt}", f["int8_path"]) for fmt, f in files.items()]
            for name, path in paths:
                r = compare(model, path, test, threads=threads, repeats=args.repeats)
                if not rows:  # the torch model's own row, from the first comparison
                    print(torch_row(r["before"]))
                rows.append((f"prune {amount:.0%} {name}", r))
                print(row(*rows[-1]))
    # the smallest int8 file; of equal sizes (pruning changes none), the most accurate
    label, r = max((item for item in rows if "int8" in item[0]),
                   key=lambda item: (round(item[1]["size_ratio"], 2), item[1]["accuracy_change"]))
    met = r["size_ratio"] >= GOAL_RATIO and -100 * r["accuracy_change"] <= GOAL_POINTS
    print(f"goal >= {GOAL_RATIO}x smaller and <= {GOAL_POINTS:g} point of accuracy lost: best is {label}, "
          f"{r['size_ratio']:.2f}x and {100 * r['accuracy_change']:+.1f} points -> {'met' if met else 'not met'}")


if __name__ == "__main__":
    main()
