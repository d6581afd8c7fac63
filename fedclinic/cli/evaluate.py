"""`fedclinic evaluate`: clean and adversarial accuracy and box IoU of a saved model on a test set.

    fedclinic evaluate --model runs/NAME/global_model.pt                  # the synthetic server test set
    fedclinic evaluate --model global_model.pt --data scans.npz --eps 2/255 8/255 --json
    fedclinic evaluate --model global_model.pt --attack pgd --norm l2 --eps 0.25 0.5 --steps 20

With --json it prints one object: "model", "data", "attack", "norm",
"steps", "random_start", "n" (test images), "clean_accuracy", "clean_iou",
"clean_loss" and "attacks", a list with one entry per eps: {"eps",
"step_size", "robust_accuracy" (class head attacked), "iou_under_attack"
(box head attacked, images with a lesion), "accuracy_under_box_attack"}.
An IoU is null where the test set has no lesion box.
"""

from __future__ import annotations

import argparse
import json
import sys
from fractions import Fraction

from fedclinic.config import ConfigError, DataConfig
from fedclinic.data import DataError
from fedclinic.report import json_safe
from fedclinic.report.text import format_metric

# budgets in pixel units of images in [0, 1]: 1 to 8 grey levels for L-inf;
# an L2 ball of radius 0.5 holds, e.g., a change of 0.5 / 32 on every pixel of a 32 x 32 scan
DEFAULT_EPS = {"linf": [1 / 255, 2 / 255, 4 / 255, 8 / 255], "l2": [0.125, 0.25, 0.5, 1.0]}


def pixel_budget(text: str) -> float:
    """An eps from the command line: a number (0.03) or a fraction (8/255)."""
    try:
        return float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number or a fraction like 8/255, got {text!r}") from None


def evaluate_parser(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="clean and adversarial (FGSM / PGD) accuracy and box IoU of a saved model",
        description="Evaluate a saved model (e.g. a run's global_model.pt) on the test split of a .npz file, or on "
        "the synthetic server test set: clean, then under attack at each eps. The class attack raises the "
        "classification loss of every image; the box attack raises the box loss of the images with a lesion.",
    )
    p.add_argument("--model", required=True, metavar="FILE",
                   help="a saved fedclinic model (.pt) or an exported one (.onnx, e.g. global_model.int8.onnx)")
    p.add_argument("--data", metavar="FILE.npz",
                   help="MedMNIST-style .npz file whose test split is used (default: the synthetic server test set)")
    p.add_argument("--attack", choices=["fgsm", "pgd"], default="pgd", help="default pgd")
    p.add_argument("--norm", choices=["linf", "l2"], default="linf", help="default linf")
    p.add_argument("--eps", nargs="+", type=pixel_budget, metavar="E",
                   help="budgets in pixel units of images in [0, 1], e.g. 8/255 "
                   "(default 1/255 2/255 4/255 8/255 for linf, 0.125 0.25 0.5 1 for l2)")
    p.add_argument("--steps", type=int, default=10, metavar="K", help="PGD steps (default 10)")
    p.add_argument("--step-size", type=float, metavar="A", help="PGD step size (default 2.5 * eps / steps)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto takes a GPU when one is present")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    p.add_argument("--quiet", action="store_true", help="no progress lines (they go to stderr)")
    p.add_argument("--transfer-from", metavar="FILE.pt",
                   help="for an .onnx model (no gradients): craft the attacks against this float model")


def evaluate(args: argparse.Namespace) -> int:
    from fedclinic.device import resolve_device
    from fedclinic.analysis.adversarial import check_attack, robust_evaluate

    eps = args.eps if args.eps is not None else DEFAULT_EPS[args.norm]
    settings = {"attack": args.attack, "norm": args.norm, "steps": args.steps, "step_size": args.step_size}
    try:
        for e in eps:
            check_attack(eps=e, **settings)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    data, data_name = _test_set(args.data)
    device = resolve_device(args.device)
    # progress on stderr: stdout holds only the result, text or JSON
    say = None if args.quiet else (lambda line: print(f"  {line}", file=sys.stderr, flush=True))
    if args.model.endswith(".onnx"):
        found = _evaluate_onnx(args, data, data_name, eps=eps, device=device, settings=settings)
        print(json.dumps(json_safe(found)) if args.json else format_transfer(found))
        return 0
    model = _load_model(args.model)
    _check_fits(model, args.model, data, data_name)
    found = robust_evaluate(model.to(device), data, eps=eps, device=device, on_progress=say, **settings)
    found = {"model": args.model, "data": data_name, **found}
    print(json.dumps(json_safe(found)) if args.json else format_robustness(found))
    return 0


def _evaluate_onnx(args, data, data_name: str, *, eps, device, settings: dict) -> dict:
    """An exported .onnx model (no gradients): clean, then on images attacked through --transfer-from."""
    from fedclinic.analysis.compression import OnnxModel
    from fedclinic.evaluation import evaluate
    from fedclinic.analysis.adversarial import attacked_copy

    try:
        onnx = OnnxModel(args.model)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"--model {args.model}: {err}") from None
    if data.num_classes > len(onnx.class_names):
        raise DataError(f"{data_name}: holds {data.num_classes} classes but the model {args.model} knows "
                        f"{len(onnx.class_names)} ({', '.join(onnx.class_names)})")
    clean = evaluate(onnx, data, box_weight=1.0)
    found = {"model": args.model, "data": data_name, "n": clean["n"], "clean_accuracy": clean["accuracy"],
             "clean_iou": clean["iou"], "transfer_from": args.transfer_from, "attacks": []}
    if args.transfer_from is None:
        return found  # nothing to attack with: an int8 model has no gradients
    source = _load_model(args.transfer_from).to(device)
    _check_fits(source, args.transfer_from, data, data_name)
    for e in eps:
        attacked = attacked_copy(source, data, attack=settings["attack"], norm=settings["norm"], eps=e,
                                 steps=settings["steps"], device=device)
        found["attacks"].append({"eps": e, "robust_accuracy": evaluate(onnx, attacked, box_weight=1.0)["accuracy"]})
    return found


def format_transfer(found: dict) -> str:
    lines = [f"{found['model']} on {found['n']} test images of {found['data']}: accuracy {found['clean_accuracy']:.3f}, "
             f"box IoU {format_metric(found['clean_iou'])}"]
    if found["transfer_from"] is None:
        lines.append("(an .onnx model has no gradients: add --transfer-from global_model.pt to attack it through the "
                     "float model)")
    for row in found["attacks"]:
        lines.append(f"  eps {row['eps']:.4g}: accuracy {row['robust_accuracy']:.3f} on images attacked through "
                     f"{found['transfer_from']}")
    return "\n".join(lines)


def format_robustness(found: dict) -> str:
    """The text table of `robust_evaluate`'s result, with the model and data named."""
    norm = {"linf": "L-inf", "l2": "L2"}[found["norm"]]
    how = f"FGSM {norm}" if found["attack"] == "fgsm" else (
        f"PGD {norm}, {found['steps']} steps" + (" from a random start" if found["random_start"] else ""))
    lines = [
        f"{found['model']} on {found['n']} test images of {found['data']}, {how}:",
        f"{'eps':>16}  {'accuracy':>8}  {'box IoU':>7}  {'accuracy, box attacked':>22}",
        f"{'clean':>16}  {found['clean_accuracy']:>8.3f}  {format_metric(found['clean_iou']):>7}",
    ]
    for row in found["attacks"]:
        eps = f"{row['eps']:.4g}" + (f" ({row['eps'] * 255:.3g}/255)" if found["norm"] == "linf" else "")
        lines.append(f"{eps:>16}  {row['robust_accuracy']:>8.3f}  {format_metric(row['iou_under_attack']):>7}  "
                     f"{row['accuracy_under_box_attack']:>22.3f}")
    lines.append("accuracy: the class head attacked; box IoU and 'accuracy, box attacked': the box head attacked")
    return "\n".join(lines)


def _load_model(path: str):
    from fedclinic.model import load_model

    try:
        return load_model(path)
    except FileNotFoundError:
        raise ConfigError(f"--model {path}: no such file; expected a saved fedclinic model (.pt)") from None
    except ValueError as err:  # load_model's sentence already names the file
        raise ConfigError(str(err)) from None


def _test_set(path: str | None):
    """(the test ImageSet, how to name it): the file's test split, or the synthetic server test set."""
    from fedclinic.data import load_file, server_test_set

    if path is None:
        return server_test_set(DataConfig()), "the synthetic server test set"
    return load_file(path)["test"], path


def _check_fits(model, model_path: str, data, data_name: str) -> None:
    arch = model.arch
    if data.channels != arch["in_channels"]:
        raise DataError(f"{data_name}: its images have {data.channels} channel(s) but the model {model_path} "
                        f"takes {arch['in_channels']}; evaluate a model on data like the data it was trained on")
    if len(data) and data.labels.max() >= arch["num_classes"]:
        raise DataError(f"{data_name}: holds label {data.labels.max()} but the model {model_path} knows "
                        f"{arch['num_classes']} classes (labels 0 to {arch['num_classes'] - 1})")
