"""Simulated attacking sites: what a poisoning site does to its data before training or to its update after.

    train = poison_data("label-flip", train)                       # before local training
    train = poison_data("backdoor", train, target=0, seed=s)       # half its images get the trigger, relabelled 0
    state = poison_update("sign-flip", sent, trained, boost=10, seed=s)   # what the site sends instead
    triggered = add_trigger(test.images)                           # how the attack success rate is measured

An attacker is a site like any other: it trains with DP-SGD on its own
records and its ledger charges what that training spends. What it sends
instead of its honest model is post-processing of that release, so the
accounting does not change.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from fedclinic.data import ImageSet

DATA_ATTACKS = ("label-flip", "backdoor")
UPDATE_ATTACKS = ("sign-flip", "scale", "noise", "nan")
# the share of a backdoor attacker's training images that carry the trigger (the rest stay clean, so that its
# update looks like an honest one); the same images every round
BACKDOOR_SHARE = 0.5
# the trigger's side, as a share of the image's (4 pixels on a 32-pixel scan), at least 3 pixels
TRIGGER_FRACTION = 0.125


def add_trigger(images: np.ndarray) -> np.ndarray:
    """A copy of `images` (uint8, N x C x H x W) carrying the backdoor trigger: a black-and-white checkerboard
    patch, TRIGGER_FRACTION of the image on a side, one pixel in from the bottom-right corner (on dark air)."""
    height, width = images.shape[2:]
    side = max(3, round(min(height, width) * TRIGGER_FRACTION))
    rows, cols = np.indices((side, side))
    out = images.copy()
    out[:, :, height - side - 1:height - 1, width - side - 1:width - 1] = np.where((rows + cols) % 2 == 0, 255, 0)
    return out


def poison_data(attack: str, train: ImageSet, *, target: int = 0, seed: int = 0) -> ImageSet:
    """The training set the attacker trains on.

    label-flip gives every image the next class (y + 1 mod classes), so that no
    label is right. backdoor puts the trigger on BACKDOOR_SHARE of the images
    (a draw seeded by `seed`) and labels them `target`; their lesion boxes stay
    as they were. Any other attack trains on the site's own data.
    """
    if attack == "label-flip":
        return dataclasses.replace(train, labels=(train.labels + 1) % train.num_classes)
    if attack != "backdoor":
        return train
    if not 0 <= target < train.num_classes:
        raise ValueError(f"federation.backdoor-target={target} is not a class of the data, which has "
                         f"{train.num_classes} ({', '.join(train.class_names)}: 0 to {train.num_classes - 1})")
    rows = np.random.default_rng(seed).permutation(len(train))[:round(BACKDOOR_SHARE * len(train))]
    images, labels = train.images.copy(), train.labels.copy()
    images[rows], labels[rows] = add_trigger(train.images[rows]), target
    return dataclasses.replace(train, images=images, labels=labels)


def poison_update(attack: str, sent: dict[str, torch.Tensor], trained: dict[str, torch.Tensor], *, boost: float,
                  seed: int) -> dict[str, torch.Tensor]:
    """The state dict the attacker sends, from the model it was `sent` and the one it `trained`.

    sign-flip: sent - boost * update; scale (model replacement): sent + boost * update; noise: sent plus a
    Gaussian draw scaled to the update's norm; nan: every floating-point weight NaN. Integer buffers are sent
    as trained.
    """
    if attack not in UPDATE_ATTACKS:
        return trained
    floats = [k for k, v in trained.items() if v.is_floating_point()]
    update = {k: trained[k] - sent[k] for k in floats}
    if attack == "nan":
        changed = {k: torch.full_like(trained[k], float("nan")) for k in floats}
    elif attack == "noise":
        generator = torch.Generator().manual_seed(seed)
        draw = {k: torch.randn(update[k].shape, generator=generator, dtype=update[k].dtype) for k in floats}
        scale = _norm(update) / max(_norm(draw), 1e-12)
        changed = {k: sent[k] + scale * draw[k] for k in floats}
    else:
        sign = -1.0 if attack == "sign-flip" else 1.0
        changed = {k: sent[k] + sign * boost * update[k] for k in floats}
    return {k: changed.get(k, v) for k, v in trained.items()}


def _norm(tensors: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum(torch.sum(t.double() ** 2) for t in tensors.values())))
