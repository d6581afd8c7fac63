"""After the last round: attack, compress and explain the global model on the server's test set.

    found = post_training(model, test_set, config, run_dir, device=device, say=lambda line, step=None: print(line))
    found["robustness"], found["compression"], found["explanations"]

`say(line, step=None)` gets each line of progress, and with the attacks'
lines step = ("attacks", done, total) for a progress bar.

Flower-free; the ServerApp calls it once, after aggregation. Each step can be
switched off (`robustness.enabled`, `compression.enabled`, `explain.enabled`)
and works on a seeded sample of the test set so a run stays within minutes.
The compressed model is compared on test images its int8 ranges were not
calibrated on, and under the same adversarial images as the float model
(crafted against the float model, rounded to 8-bit pixels as a real scan is:
a transfer attack, since the int8 model has no gradients).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
from torch import nn

from fedclinic.config import Config
from fedclinic.data import ImageSet
from fedclinic.analysis.adversarial import attacked_copy, robust_evaluate


# compare() times batches of 64 images
MIN_COMPARED = 64


def sample(data: ImageSet, n: int, *, seed: int) -> ImageSet:
    """A seeded sample of `n` images (all of them when n is 0 or covers the set), in their original order."""
    if n == 0 or n >= len(data):
        return data
    return data.subset(np.sort(np.random.default_rng(seed).permutation(len(data))[:n]))


def robustness_step(model: nn.Module, test: ImageSet, config: Config, *, device, say) -> dict:
    rob = config.robustness
    attacked = sample(test, rob.max_images, seed=config.data.seed)
    say(f"robustness: {rob.attack.upper()} {rob.norm} on {len(attacked)} test images, eps {rob.eps}")
    # robust_evaluate reports the clean scores, then each budget's attack: one step each
    total = len(rob.eps_list) + 1
    done = iter(range(1, total + 1))
    found = robust_evaluate(model, attacked, eps=list(rob.eps_list), attack=rob.attack, norm=rob.norm,
                            steps=rob.steps, box_weight=config.model.box_weight, device=device, seed=config.data.seed,
                            on_progress=lambda line: say(f"  {line}", step=("attacks", next(done), total)))
    headline = found["attacks"][-1]
    found["robust_accuracy"] = headline["robust_accuracy"]  # at the largest budget, the one sweeps plot
    found["headline_eps"] = headline["eps"]
    return found


def compression_step(model: nn.Module, test: ImageSet, config: Config, run_dir: Path, *, device, say) -> dict:
    from fedclinic.analysis.compression import compare, compress  # onnx/onnxruntime load only when compressing

    comp = config.compression
    order = np.random.default_rng(config.data.seed + 1).permutation(len(test))
    calibration = test.subset(np.sort(order[: comp.calibration_images]))
    held_out = test.subset(np.sort(order[comp.calibration_images:]))
    if len(held_out) < MIN_COMPARED:  # a small test set: compare on all of it, calibration images included
        held_out = test
    say(f"compression: int8 ONNX, calibrated on {len(calibration)} server images, compared on {len(held_out)}")
    files = compress(model.cpu(), calibration, run_dir, prune_amount=comp.prune_amount)
    model.to(device)
    adversarial = None
    if config.robustness.enabled:
        eps = config.robustness.eps_list[-1]
        rob = config.robustness
        adversarial = attacked_copy(model, sample(held_out, rob.max_images, seed=config.data.seed), attack=rob.attack,
                                    norm=rob.norm, eps=eps, steps=rob.steps, device=device, seed=config.data.seed)
    # timed on one thread: Ray's workers may still hold the other cores, and torch's
    # multi-threaded calls then stall far more than onnxruntime's (bench/compression.py)
    found = compare(model.cpu(), files["int8_path"], held_out, box_weight=config.model.box_weight,
                    adversarial=adversarial, threads=1)
    model.to(device)
    found["files"] = {k: Path(files[k]).name for k in ("float_path", "int8_path")}
    found.update({k: files[k] for k in ("prune_amount", "zero_share", "quant_format", "calibration_images")})
    return found


def explanation_step(model: nn.Module, test: ImageSet, config: Config, run_dir: Path, *, device, say) -> dict:
    from fedclinic.analysis.explain import explain  # captum loads only when explaining

    shown = sample(test, config.explain.max_images, seed=config.data.seed)
    say(f"explanations: Integrated Gradients and Grad-CAM on {len(shown)} test images")
    return explain(model, shown, run_dir, per_class=config.explain.per_class, device=device, seed=config.data.seed,
                   on_step=lambda line, done, total: say(f"  {line}", step=("explanations", done, total)))


def post_training(
    model: nn.Module, test: ImageSet, config: Config, run_dir: Path, *, device, say: Callable[..., None]
) -> dict:
    """Every enabled step, in order: {"robustness", "compression", "explanations"} (None = off), and
    "post_training_seconds" (each step that ran)."""
    steps = (
        ("robustness", config.robustness.enabled, lambda: robustness_step(model, test, config, device=device, say=say)),
        ("compression", config.compression.enabled,
         lambda: compression_step(model, test, config, run_dir, device=device, say=say)),
        ("explanations", config.explain.enabled,
         lambda: explanation_step(model, test, config, run_dir, device=device, say=say)),
    )
    found, seconds = {}, {}
    for name, enabled, run in steps:
        started = time.perf_counter()
        found[name] = run() if enabled else None
        if enabled:
            seconds[name] = time.perf_counter() - started
    found["post_training_seconds"] = seconds
    return found
