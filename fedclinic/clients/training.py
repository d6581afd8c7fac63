"""A site's local training for one round: plain SGD, or DP-SGD with Opacus.

Flower-free. The Flower handler in clients/app.py hands in the global model,
the site's data and the noise multiplier from the site's ledger, and gets
back what the round did.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedclinic.config import PrivacyConfig, TrainingConfig
from fedclinic.data import ImageSet
from fedclinic.model import multitask_loss


@dataclass(frozen=True)
class LocalResult:
    loss: float  # mean training loss over the round's batches
    steps: int  # optimizer steps taken (each one a DP release when private)
    sample_rate: float  # Poisson sampling rate q (1.0 for plain SGD: no amplification claimed)
    noise_multiplier: float  # sigma; 0 for plain SGD
    seconds: float  # wall time of the training loop
    num_examples: int


def resolve_device(name: str) -> torch.device:
    """auto picks a GPU when one is present."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def as_dataset(data: ImageSet) -> TensorDataset:
    """uint8 images stay uint8 until a batch is drawn; a dataset without boxes gets NaN boxes."""
    boxes = data.boxes
    if boxes is None:
        boxes = torch.full((len(data), 4), float("nan"))
    return TensorDataset(torch.from_numpy(data.images), torch.from_numpy(data.labels), torch.as_tensor(boxes))


def train_locally(
    model: nn.Module,
    data: ImageSet,
    *,
    training: TrainingConfig,
    privacy: PrivacyConfig,
    box_weight: float,
    noise_multiplier: float,
    seed: int,
) -> LocalResult:
    """Train `model` in place on the site's data for `training.local_epochs` epochs."""
    device = resolve_device(training.device)
    torch.manual_seed(seed)
    model.to(device).train()
    loader = DataLoader(as_dataset(data), batch_size=training.batch_size, shuffle=True)
    lr = training.learning_rate if privacy.local else training.baseline_learning_rate
    if training.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=training.momentum)
    q = 1.0
    if privacy.local:
        # imported here: the non-private baseline runs with no Opacus at all
        from opacus import PrivacyEngine

        engine = PrivacyEngine(accountant=privacy.accountant)
        model, optimizer, loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=privacy.max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode=privacy.grad_sample_mode,
        )
        q = loader.sample_rate

    t0 = time.perf_counter()
    total, steps = 0.0, 0
    for _ in range(training.local_epochs):
        for images, labels, boxes in loader:
            x = images.to(device, torch.float32).div_(255)
            # cleared before the forward pass: Opacus's "ew" mode collects per-sample
            # gradients during it
            optimizer.zero_grad(set_to_none=True)
            logits, pred_boxes = model(x)
            loss, _ = multitask_loss(
                logits, pred_boxes, labels.to(device), boxes.to(device), box_weight=box_weight
            )
            loss.backward()
            if not privacy.local:
                # the baseline shares the optimizer settings of DP-SGD, whose per-example
                # clipping bounds the update; unclipped, the same learning rate diverges
                nn.utils.clip_grad_norm_(model.parameters(), privacy.max_grad_norm)
            optimizer.step()  # DP-SGD: clip each example's gradient, add noise, step
            total += loss.item()
            steps += 1
    seconds = time.perf_counter() - t0
    return LocalResult(
        loss=total / max(steps, 1),
        steps=steps,
        sample_rate=q,
        noise_multiplier=noise_multiplier if privacy.local else 0.0,
        seconds=seconds,
        num_examples=len(data),
    )
