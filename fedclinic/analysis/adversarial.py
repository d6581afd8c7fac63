"""Adversarial robustness of the multi-task model: FGSM and PGD against its class head and its box head.

    from fedclinic.analysis.adversarial import fgsm_check, perturb, robust_evaluate
    found = robust_evaluate(model, test_set, eps=[2 / 255, 8 / 255], attack="pgd", norm="linf")
    # {"clean_accuracy": 0.81, "clean_iou": 0.42, ...,
    #  "attacks": [{"eps": 0.0078, "robust_accuracy": 0.55, "iou_under_attack": 0.30, ...}, ...]}
    x_adv = perturb(model, images, labels, boxes, attack="pgd", norm="linf", eps=8 / 255)

Budgets are in pixel units: images are in [0, 1] (the model normalises
inside), so an L-inf eps of 8/255 moves each pixel by at most 8 grey levels,
and an L2 eps bounds the Euclidean norm of an image's whole change. Every
adversarial image lies in its eps-ball around the clean image and in [0, 1].

Two targets: "class" raises the cross-entropy of the class head; "box" raises
the box loss of training (smooth L1 on cx, cy, w, h) on the images that have a
lesion box, and leaves the images without one untouched. Flower-free.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from fedclinic.config.sections import ATTACKS
from fedclinic.data.imageset import ImageSet
from fedclinic.evaluation.metrics import batches, box_iou, eval_mode, evaluate
from fedclinic.model import per_example_losses

TARGETS = ("class", "box")

# PGD's default step size is STEP_FRACTION * eps / steps: large enough to cross
# the ball and come back (Madry et al. use 2.5).
STEP_FRACTION = 2.5

# guards the divisions by a norm that can be 0 (a zero gradient, eps = 0)
TINY = 1e-12


def _row_norms(t: Tensor) -> Tensor:
    """The L2 norm of each image of a batch, shaped N x 1 x 1 x 1 to scale the batch."""
    return t.flatten(1).norm(dim=1).view(-1, *[1] * (t.dim() - 1))


@dataclass(frozen=True)
class _Ball:
    # the step direction of unit size that raises the loss fastest, from its gradient
    ascent: Callable[[Tensor], Tensor]
    # the nearest change inside the ball of radius eps
    project: Callable[[Tensor, float], Tensor]
    # a random change inside the ball of radius eps (PGD's random start)
    random: Callable[[Tensor, float, torch.Generator | None], Tensor]


def _uniform_in_cube(x: Tensor, eps: float, generator: torch.Generator | None) -> Tensor:
    return (2 * torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) - 1) * eps


def _random_in_l2_ball(x: Tensor, eps: float, generator: torch.Generator | None) -> Tensor:
    # a uniformly random direction, at a radius drawn uniformly from [0, eps]
    direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    radius = torch.rand(_row_norms(x).shape, generator=generator, device=x.device, dtype=x.dtype) * eps
    return direction / _row_norms(direction).clamp(min=TINY) * radius


NORMS = {
    "linf": _Ball(
        ascent=torch.sign,
        project=lambda delta, eps: delta.clamp(-eps, eps),
        random=_uniform_in_cube,
    ),
    "l2": _Ball(
        ascent=lambda grad: grad / _row_norms(grad).clamp(min=TINY),
        project=lambda delta, eps: delta * (eps / _row_norms(delta).clamp(min=TINY)).clamp(max=1.0),
        random=_random_in_l2_ball,
    ),
}


def check_attack(*, attack: str, norm: str, eps: float, steps: int = 1, step_size: float | None = None) -> None:
    """Raise ValueError, naming the bad value, for settings no attack can run with."""
    if attack not in ATTACKS:
        raise ValueError(f"attack must be one of {', '.join(ATTACKS)}, got {attack!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if not eps >= 0:  # also refuses NaN
        raise ValueError(f"eps must be >= 0 (a budget in pixel units of images in [0, 1]), got {eps}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if step_size is not None and not step_size > 0:
        raise ValueError(f"step_size must be > 0, got {step_size}")


def resolved_step_size(*, attack: str, eps: float, steps: int, step_size: float | None) -> float:
    """The step an attack takes: eps for FGSM, else `step_size` or STEP_FRACTION * eps / steps."""
    if attack == "fgsm":
        return eps
    return step_size if step_size is not None else STEP_FRACTION * eps / steps


def _attacked_rows(labels: Tensor, boxes: Tensor | None, target: str) -> Tensor:
    """Which images the attack may change: all for "class", those with a finite lesion box for "box"."""
    if target == "class":
        return torch.ones_like(labels, dtype=torch.bool)
    if boxes is None:
        return torch.zeros_like(labels, dtype=torch.bool)
    return torch.isfinite(boxes).all(dim=1)


def _attack_loss(model: nn.Module, x: Tensor, labels: Tensor, boxes: Tensor | None, target: str) -> Tensor:
    logits, pred_boxes = model(x)
    cls_rows, box_rows = per_example_losses(logits, pred_boxes, labels, boxes)
    # summed, not averaged: each image's gradient is that of its own loss, whatever the batch size
    return (cls_rows if target == "class" else box_rows).sum()


def perturb(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    boxes: Tensor | None,
    *,
    attack: str = "pgd",
    norm: str = "linf",
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    target: str = "class",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Adversarial versions of `images` (float N x C x H x W in [0, 1]): detached, in [0, 1], within eps.

    "fgsm" takes one step of size eps from the clean images (steps, step_size
    and random_start do not apply). "pgd" starts from a random point of the
    ball (`random_start`, drawn from `generator`) or from the clean images,
    and takes `steps` steps of `step_size` (default 2.5 eps / steps), each
    projected back into the ball and into [0, 1]. Steps follow the gradient's
    sign under "linf" and its normalised direction under "l2".

    target "class" attacks every image; "box" only those with a finite row in
    `boxes` (the others come back unchanged; all do when `boxes` is None).
    The model is used as it is, in train or eval mode, and left so; only the
    images get gradients, never the parameters, so this works inside a
    training step. Pass the plain model, not an Opacus wrapper, whose hooks
    would record per-example gradients of the attack.
    """
    check_attack(attack=attack, norm=norm, eps=eps, steps=steps, step_size=step_size)
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    x = images.detach()
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError(f"images must be in [0, 1], got values from {x.min().item():g} to {x.max().item():g}")
    attacked = _attacked_rows(labels, boxes, target)
    if not attacked.any():
        return x.clone()
    alpha = resolved_step_size(attack=attack, eps=eps, steps=steps, step_size=step_size)
    if attack == "fgsm":
        steps, random_start = 1, False
    ball = NORMS[norm]
    # 1 for the images the attack may change, 0 for the others: the others' loss is 0, but a
    # model that mixes the images of a batch (BatchNorm in train mode) would still send them a gradient
    mask = attacked.to(x.dtype).view(-1, *[1] * (x.dim() - 1))

    start = ball.random(x, eps, generator) * mask if random_start else torch.zeros_like(x)
    x_adv = (x + start).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():  # also when the caller is under no_grad
            loss = _attack_loss(model, x_adv, labels, boxes, target)
            (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + alpha * ball.ascent(grad) * mask
        # clamping to [0, 1] after the projection only shrinks each pixel's change: it stays in the ball
        x_adv = (x + ball.project(x_adv - x, eps)).clamp(0, 1)
    return x_adv.detach()


def _share(count: int, n: int) -> float:
    return count / n if n else math.nan


@torch.no_grad()
def _predict(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    logits, pred_boxes = model(x)
    return logits.argmax(dim=1), pred_boxes


def robust_evaluate(
    model: nn.Module,
    data: ImageSet,
    *,
    eps: list[float],
    attack: str = "pgd",
    norm: str = "linf",
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    box_weight: float = 1.0,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    seed: int = 0,
    on_progress: Callable[[str], None] | None = None,
) -> dict:
    """Clean metrics of `model` on `data` and, for each budget in `eps`, the metrics under attack.

    `model` must already live on `device`; its train/eval mode is left as it
    was. Returns {"attack", "norm", "steps", "random_start", "n",
    "clean_accuracy", "clean_iou", "clean_loss" (with `box_weight`),
    "attacks": [one dict per eps, in order]}. Each attack dict holds "eps",
    "step_size", "robust_accuracy" (every image attacked with target
    "class"), "iou_under_attack" (mean IoU over the images with a lesion box,
    attacked with target "box") and "accuracy_under_box_attack" (the class
    head's accuracy after that box attack, over all images; those without a
    lesion are unchanged). IoUs are NaN where the data has no lesion box, as
    in `evaluate`. `on_progress` gets a line of text as each attack is done.
    Random starts are drawn from `seed`.
    """
    for e in eps:
        check_attack(attack=attack, norm=norm, eps=e, steps=steps, step_size=step_size)
    say = on_progress or (lambda line: None)
    clean = evaluate(model, data, box_weight=box_weight, batch_size=batch_size, device=device)
    say(f"clean: accuracy {clean['accuracy']:.3f}, box IoU {clean['iou']:.3f} on {clean['n']} images")
    generator = torch.Generator(device=device).manual_seed(seed)
    settings = {"attack": attack, "norm": norm, "steps": steps, "step_size": step_size,
                "random_start": random_start, "generator": generator}
    attacks = []
    with eval_mode(model):
        for e in eps:
            attacks.append(_attacked_metrics(model, data, e, settings, batch_size=batch_size, device=device))
            found = attacks[-1]
            say(f"{attack} {norm} eps {e:.4g}: robust accuracy {found['robust_accuracy']:.3f}, "
                f"box IoU under attack {found['iou_under_attack']:.3f}")
    return {
        "attack": attack,
        "norm": norm,
        "steps": 1 if attack == "fgsm" else steps,
        "random_start": random_start and attack == "pgd",
        "n": clean["n"],
        "clean_accuracy": clean["accuracy"],
        "clean_iou": clean["iou"],
        "clean_loss": clean["loss"],
        "attacks": attacks,
    }


def _attacked_metrics(
    model: nn.Module, data: ImageSet, eps: float, settings: dict, *, batch_size: int, device: str | torch.device
) -> dict:
    """Accuracy under the class attack, IoU and accuracy under the box attack, at one eps."""
    robust_hits = box_attack_hits = 0
    ious = []
    for images, labels, true_boxes in batches(data, batch_size=batch_size, device=device):
        x_adv = perturb(model, images, labels, true_boxes, eps=eps, target="class", **settings)
        robust_hits += (_predict(model, x_adv)[0] == labels).sum().item()
        if true_boxes is None:  # nothing for the box attack to change
            box_attack_hits += (_predict(model, images)[0] == labels).sum().item()
            continue
        has_box = torch.isfinite(true_boxes).all(dim=1)
        # only the images with a lesion go through the attack: it leaves the others as they are
        x_adv = images.clone()
        x_adv[has_box] = perturb(model, images[has_box], labels[has_box], true_boxes[has_box], eps=eps,
                                 target="box", **settings)
        pred_labels, pred_boxes = _predict(model, x_adv)
        box_attack_hits += (pred_labels == labels).sum().item()
        ious.append(box_iou(pred_boxes[has_box].cpu(), true_boxes[has_box].cpu()))
    lesion_ious = torch.cat(ious) if ious else torch.empty(0)
    step = resolved_step_size(attack=settings["attack"], eps=eps, steps=settings["steps"],
                              step_size=settings["step_size"])
    return {
        "eps": float(eps),
        "step_size": float(step),
        "robust_accuracy": _share(robust_hits, len(data)),
        "iou_under_attack": lesion_ious.mean().item() if len(lesion_ious) else math.nan,
        "accuracy_under_box_attack": _share(box_attack_hits, len(data)),
    }


def fgsm_check(
    model: nn.Module,
    data: ImageSet,
    eps: float,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """A cheap robustness check for every round: accuracy clean and under L-inf FGSM on the class head.

    Returns {"eps", "clean_accuracy", "robust_accuracy"}, plain floats (NaN
    without images). `model` must already live on `device`; its mode is left
    as it was.
    """
    check_attack(attack="fgsm", norm="linf", eps=eps)
    clean_hits = robust_hits = 0
    with eval_mode(model):
        for images, labels, true_boxes in batches(data, batch_size=batch_size, device=device):
            x_adv = perturb(model, images, labels, true_boxes, attack="fgsm", norm="linf", eps=eps)
            clean_hits += (_predict(model, images)[0] == labels).sum().item()
            robust_hits += (_predict(model, x_adv)[0] == labels).sum().item()
    return {
        "eps": float(eps),
        "clean_accuracy": _share(clean_hits, len(data)),
        "robust_accuracy": _share(robust_hits, len(data)),
    }


def attacked_copy(
    model: nn.Module,
    data: ImageSet,
    *,
    attack: str,
    norm: str,
    eps: float,
    steps: int = 10,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> ImageSet:
    """`data` with every image attacked on the class head, rounded back to 8-bit pixels as a real scan is.

    For models without gradients (an int8 ONNX file): craft the images against
    the float model here, then score the other one on them (a transfer attack).
    """
    check_attack(attack=attack, norm=norm, eps=eps, steps=steps)
    generator = torch.Generator(device=device).manual_seed(seed)
    attacked = []
    with eval_mode(model):
        for images, labels, boxes in batches(data, batch_size=256, device=device):
            x = perturb(model, images, labels, boxes, attack=attack, norm=norm, eps=eps, steps=steps,
                        generator=generator)
            attacked.append(torch.round(x * 255).clamp(0, 255).to(torch.uint8).cpu().numpy())
    return ImageSet(np.concatenate(attacked), data.labels, data.boxes, data.class_names)
