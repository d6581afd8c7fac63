"""Clean-data metrics of the multi-task model: accuracy, macro F1, box IoU, loss.

    from fedclinic.evaluation import evaluate
    metrics = evaluate(model, test_set, box_weight=1.0)
    # {"loss": ..., "accuracy": ..., "f1": ..., "iou": ..., "n": 1000}
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
from torch import Tensor, nn

from fedclinic.data.imageset import ImageSet
from fedclinic.model import multitask_loss
from fedclinic.poisoning.attacks import add_trigger


def _cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(cx, cy, w, h) -> (x1, y1, x2, y2), the same arithmetic as torchvision's box_convert.

    Written out rather than imported: `torchvision.ops` imports torch._dynamo
    (over a second), and a deployed ClientApp pays every import once per message.
    """
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def box_iou(pred: Tensor | np.ndarray, true: Tensor | np.ndarray) -> Tensor:
    """Per-row IoU of two N x 4 sets of (cx, cy, w, h) boxes, as a float Tensor of length N.

    Row i compares pred[i] with true[i] only (torchvision's box_iou compares
    every pair, N x N). A NaN in a row gives NaN for that row; two boxes of
    zero area give 0.
    """
    pred = _cxcywh_to_xyxy(torch.as_tensor(pred, dtype=torch.float64))
    true = _cxcywh_to_xyxy(torch.as_tensor(true, dtype=torch.float64))
    top_left = torch.maximum(pred[:, :2], true[:, :2])
    bottom_right = torch.minimum(pred[:, 2:], true[:, 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(dim=1)
    area_pred = (pred[:, 2:] - pred[:, :2]).clamp(min=0).prod(dim=1)
    area_true = (true[:, 2:] - true[:, :2]).clamp(min=0).prod(dim=1)
    union = area_pred + area_true - intersection
    # where() rather than a plain division: 0 / 0 for two empty boxes.
    iou = torch.where(union > 0, intersection / union.clamp(min=1e-12), torch.zeros_like(union))
    return torch.where(union.isnan(), union, iou).float()


def confusion_matrix(pred_labels, labels, num_classes: int) -> np.ndarray:
    """counts[t, p]: how many examples of true class t were predicted as class p."""
    pred_labels = np.asarray(torch.as_tensor(pred_labels).cpu(), dtype=np.int64).ravel()
    labels = np.asarray(torch.as_tensor(labels).cpu(), dtype=np.int64).ravel()
    if pred_labels.shape != labels.shape:
        raise ValueError(f"{len(pred_labels)} predictions for {len(labels)} labels")
    for name, values in (("predicted labels", pred_labels), ("labels", labels)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} must be in [0, {num_classes}), got values from {values.min()} to {values.max()}")
    counts = np.bincount(labels * num_classes + pred_labels, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def macro_f1(pred_labels, labels, num_classes: int) -> float:
    """Unweighted mean of the per-class F1 scores; NaN when there are no examples.

    A class that appears neither in the labels nor in the predictions is
    skipped (its F1 would be 0 / 0); one that is predicted but never true
    scores 0.
    """
    counts = confusion_matrix(pred_labels, labels, num_classes)
    true_positives = np.diag(counts)
    # 2 TP + FP + FN = (times predicted) + (times true)
    denominator = counts.sum(axis=0) + counts.sum(axis=1)
    seen = denominator > 0
    if not seen.any():
        return math.nan
    return float(np.mean(2 * true_positives[seen] / denominator[seen]))


def balanced_accuracy(pred_labels, labels, num_classes: int) -> float:
    """Mean recall over the classes present in the labels; NaN when there are no examples."""
    counts = confusion_matrix(pred_labels, labels, num_classes)
    per_class = counts.sum(axis=1)
    present = per_class > 0
    if not present.any():
        return math.nan
    return float(np.mean(np.diag(counts)[present] / per_class[present]))


def batches(
    data: ImageSet, *, batch_size: int, device: str | torch.device
) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
    """(images scaled to [0, 1], labels, true boxes or None) on `device`, batch by batch, in order."""
    if data.images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images (pixels 0..255), got {data.images.dtype}")
    # a plain function around the generator: the check runs at the call, not at the first batch
    return _batches(data, batch_size, device)


def _batches(
    data: ImageSet, batch_size: int, device: str | torch.device
) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
    for start in range(0, len(data), batch_size):
        stop = min(start + batch_size, len(data))
        # Batch by batch: the whole set as float32 would take 4x its uint8 memory.
        images = torch.from_numpy(data.images[start:stop]).to(device).float() / 255.0
        labels = torch.from_numpy(data.labels[start:stop]).to(device)
        true_boxes = None if data.boxes is None else torch.from_numpy(data.boxes[start:stop]).to(device)
        yield images, labels, true_boxes


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode inside the block, autograd still on (attacks and attributions need it); the mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no autograd inside the block; the model's train/eval mode is restored after it."""
    with eval_mode(model), torch.inference_mode():
        yield model


def evaluate(
    model: nn.Module,
    data: ImageSet,
    *,
    box_weight: float,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Loss, accuracy, macro F1 and mean box IoU of `model` on `data`.

    `model` must already live on `device`. Returns {"loss", "accuracy", "f1",
    "iou", "n"}. "iou" is the mean IoU over the images that have a true
    lesion box; it is NaN ("not applicable") when the data has no boxes or no
    lesion. With no images at all, every metric is NaN and n is 0. The
    model's train/eval mode is left as it was.
    """
    data_batches = batches(data, batch_size=batch_size, device=device)  # refuses non-uint8 images, even none
    n = len(data)
    if n == 0:
        return {"loss": math.nan, "accuracy": math.nan, "f1": math.nan, "iou": math.nan, "n": 0}

    loss_sum = 0.0
    pred_labels, ious = [], []
    with evaluating(model):
        for images, labels, true_boxes in data_batches:
            logits, pred_boxes = model(images)
            loss, _ = multitask_loss(logits, pred_boxes, labels, true_boxes, box_weight=box_weight)
            # the loss is a batch mean; weight by batch size for the mean over all images
            loss_sum += loss.item() * len(labels)
            pred_labels.append(logits.argmax(dim=1).cpu())
            if true_boxes is not None:
                has_box = torch.isfinite(true_boxes).all(dim=1)
                ious.append(box_iou(pred_boxes[has_box].cpu(), true_boxes[has_box].cpu()))

    pred = torch.cat(pred_labels).numpy()
    lesion_ious = torch.cat(ious) if ious else torch.empty(0)
    return {
        "loss": loss_sum / n,
        "accuracy": float(np.mean(pred == data.labels)),
        "f1": macro_f1(pred, data.labels, data.num_classes),
        "iou": lesion_ious.mean().item() if len(lesion_ious) else math.nan,
        "n": n,
    }


def backdoor_success_rate(model: nn.Module, data: ImageSet, *, target: int, batch_size: int = 256,
                          device: str | torch.device = "cpu") -> float:
    """The share of `data`'s images not of class `target` that `model` classifies as `target` once they carry
    the backdoor trigger (poisoning/attacks.py): the attack success rate. NaN when no image is of another class."""
    others = data.subset(np.flatnonzero(data.labels != target))
    if len(others) == 0:
        return math.nan
    triggered = ImageSet(add_trigger(others.images), others.labels, others.boxes, others.class_names)
    hits = 0
    with evaluating(model):
        for images, _, _ in batches(triggered, batch_size=batch_size, device=device):
            hits += int((model(images)[0].argmax(dim=1) == target).sum())
    return hits / len(others)


# the scores of a model on a site's data that the per-site summaries report
SCORES = ("accuracy", "f1", "iou")


def summarize(scores: list[dict], sites: list[int] | None = None) -> dict:
    """Mean, worst and best over the sites of each metric (each metric its own worst and best site), and which
    sites had the worst and the best accuracy (their numbers in `sites`, by default their places in `scores`).
    Sites where a metric is not applicable (NaN) are left out of it."""
    sites = list(range(len(scores))) if sites is None else sites
    found = {"mean": {}, "worst": {}, "best": {}}
    for metric in SCORES:
        values = [s[metric] for s in scores if math.isfinite(s[metric])]
        found["mean"][metric] = float(np.mean(values)) if values else math.nan
        found["worst"][metric] = min(values, default=math.nan)
        found["best"][metric] = max(values, default=math.nan)
    ranked = sorted((s["accuracy"], k) for k, s in zip(sites, scores) if math.isfinite(s["accuracy"]))
    found["worst_site"] = ranked[0][1] if ranked else None
    found["best_site"] = ranked[-1][1] if ranked else None
    return found
