"""Simulated attacking sites: what a poisoning site does to its data before training or to its update after.

    train = poison_data("label-flip", train)                       # before local training
    state = poison_update("sign-flip", sent, trained, boost=10, seed=s)   # what the site sends instead

An attacker is a site like any other: it trains with DP-SGD on its own
records and its ledger charges what that training spends. What it sends
instead of its honest model is post-processing of that release, so the
accounting does not change.
"""

from __future__ import annotations

import dataclasses

import torch

from fedclinic.data import ImageSet

DATA_ATTACKS = ("label-flip",)
UPDATE_ATTACKS = ("sign-flip", "scale", "noise", "nan")


def poison_data(attack: str, train: ImageSet) -> ImageSet:
    """The training set the attacker trains on; label-flip gives every image the next class (y + 1 mod classes),
    so that no label is right."""
    if attack != "label-flip":
        return train
    return dataclasses.replace(train, labels=(train.labels + 1) % train.num_classes)


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
