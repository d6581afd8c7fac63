"""A site's local training for one round: plain SGD, or DP-SGD with Opacus, optionally adversarial.

Flower-free. The Flower handler in clients/app.py hands in the global model,
the site's data and the noise multiplier from the site's ledger, and gets
back what the round did.

With `training.augment` "scanner" (the default), every image of a batch is
seen through `training.augment-views` randomly different scanners
(fedclinic.data.augment); under DP the views' gradients are averaged per
record before clipping, so each record still gives one clipped gradient.

With `robustness.train-attack` fgsm or pgd, a share of every batch is
replaced by adversarial versions of its own images, crafted against the
current model, before the (DP-)SGD step. Each adversarial image stands in for
its clean record, so DP-SGD still clips one gradient per record and the
privacy accounting (sigma, q, steps, epsilon) is that of clean training.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from fedclinic.config import PrivacyConfig, RobustnessConfig, TrainingConfig
from fedclinic.data import ImageSet
from fedclinic.data.augment import scanner_views
from fedclinic.device import resolve_device
from fedclinic.analysis.adversarial import perturb
from fedclinic.model import multitask_loss

# robustness.* as configured by default (frozen, so one instance serves every call)
DEFAULT_ROBUSTNESS = RobustnessConfig()
# the augmentation's random stream is the training seed's, shifted: batches, DP noise and the
# adversarial draws stay those of training without augmentation
AUGMENT_SEED_OFFSET = 7919
# cosine schedule: the last round trains at this share of the learning rate
FINAL_LR_SHARE = 0.1


@dataclass(frozen=True)
class LocalResult:
    loss: float  # mean training loss over the round's non-empty batches
    steps: int  # optimizer steps taken (each one a DP release when private)
    sample_rate: float  # Poisson sampling rate q (1.0 for plain SGD: no amplification claimed)
    noise_multiplier: float  # sigma; 0 for plain SGD
    seconds: float  # wall time of the training loop
    num_examples: int


_engines_made = 0


def privacy_engine(accountant: str):
    """Opacus's PrivacyEngine; its warning that the secure RNG is off shows for the process's first one only.

    A site makes an engine every round, and every catch_warnings block (ours, Opacus's) resets
    Python's once-per-line registry, so the warning would otherwise repeat round after round.
    """
    global _engines_made
    # imported here: the non-private baseline runs with no Opacus at all
    from opacus import PrivacyEngine

    with warnings.catch_warnings():
        if _engines_made:
            warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
        engine = PrivacyEngine(accountant=accountant)
    _engines_made += 1
    return engine


def as_dataset(data: ImageSet) -> TensorDataset:
    """uint8 images stay uint8 until a batch is drawn; a dataset without boxes gets NaN boxes."""
    boxes = data.boxes
    if boxes is None:
        boxes = torch.full((len(data), 4), float("nan"))
    return TensorDataset(torch.from_numpy(data.images), torch.from_numpy(data.labels), torch.as_tensor(boxes))


@contextmanager
def per_sample_hooks_off(model: nn.Module) -> Iterator[nn.Module]:
    """The plain module inside `model` (itself when not wrapped), with Opacus's per-sample hooks off meanwhile.

    Opacus's GradSampleModule hooks the layers themselves, so even a forward
    and backward of the unwrapped module would record activations and add to
    p.grad_sample; its disable_hooks() stops that. The "ew" wrapper has no
    hooks: its per-sample gradients come from its own forward, which the plain
    module bypasses.
    """
    plain = getattr(model, "_module", model)
    hooks_were_on = getattr(model, "hooks_enabled", False)
    if hooks_were_on:
        model.disable_hooks()
    try:
        yield plain
    finally:
        if hooks_were_on:
            model.enable_hooks()


def mix_adversarial(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    boxes: Tensor,
    *,
    robustness: RobustnessConfig,
    generator: torch.Generator,
) -> Tensor:
    """`images` (float, in [0, 1]) with robustness.train_fraction of its rows replaced by adversarial versions.

    The rows (the nearest whole number of them) are drawn from `generator`,
    independently of the data, and attacked on the class head with
    `robustness.train_attack` at `robustness.train_eps` against `model` as it
    is now; PGD's random starts come from `generator` too. An adversarial image
    depends on its own clean image alone (GroupNorm mixes no examples), so it
    is that record's one example. `model` may be wrapped by Opacus: p.grad and
    p.grad_sample are left as they were.
    """
    n = images.shape[0]
    k = round(robustness.train_fraction * n)
    if k == 0:
        return images
    rows = torch.randperm(n, generator=generator, device=images.device)[:k]
    with per_sample_hooks_off(model) as plain:
        crafted = perturb(plain, images[rows], labels[rows], boxes[rows], attack=robustness.train_attack,
                          norm=robustness.norm, eps=robustness.train_eps, steps=robustness.steps,
                          target="class", generator=generator)
    mixed = images.clone()
    mixed[rows] = crafted
    return mixed


def add_proximal_gradient(params: list[nn.Parameter], anchor: list[Tensor], mu: float, *, private: bool) -> None:
    """FedProx: add the gradient of mu/2 * ||w - w_global||^2, mu * (w - w_global), to every gradient.

    Under DP it is added to each example's gradient (Opacus's p.grad_sample,
    one row per example) before the optimizer clips them, so the term goes
    through the same per-example clipping as the loss. A loss term would not:
    Opacus builds per-example gradients from layer activations only, and a
    term on the weights alone would never reach them. The term depends on no
    record, so the accounting does not change.
    """
    for p, p0 in zip(params, anchor):
        pull = mu * (p.detach() - p0)
        if private:
            p.grad_sample = p.grad_sample + pull  # broadcast over the example rows
        else:
            p.grad = p.grad + pull


def average_views(params: list[nn.Parameter], *, records: int, views: int) -> None:
    """Per-example gradients of `views` rows per record (rows i * views + k) -> one per record, their mean.

    Opacus computes a gradient per row of the batch; averaging a record's
    rows before the optimizer clips makes them one example's gradient, of
    norm at most the clipping norm, so the views cost no privacy
    (augmentation multiplicity, De et al. 2022).
    """
    for p in params:
        p.grad_sample = p.grad_sample.view(records, views, *p.shape).mean(dim=1)


def noise_only_step(optimizer, params: list[nn.Parameter]) -> None:
    """Opacus's DP-SGD step for an empty batch: no per-example gradient, so the update is the noise alone."""
    optimizer.zero_grad(set_to_none=True)
    for p in params:
        p.grad_sample = p.new_zeros((0, *p.shape))
    optimizer.step()


def round_lr_scale(training: TrainingConfig, server_round: int, rounds: int) -> float:
    """The share of the learning rate a round trains at: 1 throughout, or cosine from 1 down to FINAL_LR_SHARE."""
    if training.schedule == "constant" or rounds <= 1:
        return 1.0
    progress = (server_round - 1) / (rounds - 1)
    return FINAL_LR_SHARE + (1 - FINAL_LR_SHARE) * 0.5 * (1 + math.cos(math.pi * progress))


def train_locally(
    model: nn.Module,
    data: ImageSet,
    *,
    training: TrainingConfig,
    privacy: PrivacyConfig,
    box_weight: float,
    noise_multiplier: float,
    seed: int,
    robustness: RobustnessConfig = DEFAULT_ROBUSTNESS,
    proximal_mu: float = 0.0,
    lr_scale: float = 1.0,
) -> LocalResult:
    """Train `model` in place on the site's data for `training.local_epochs` epochs.

    With `training.augment` "scanner", each record of a batch is seen as
    `training.augment_views` augmented views, whose gradients are averaged
    per record before clipping. With `robustness.train_attack` other than
    "none", every batch is then mixed with adversarial images
    (`mix_adversarial`). With `proximal_mu` > 0 (FedProx), the loss is that of
    a batch plus mu/2 * ||w - w_start||^2, w_start being the global model the
    round starts from. `lr_scale` multiplies the learning rate (the round's
    share of it, `round_lr_scale`).
    """
    device = resolve_device(training.device)
    torch.manual_seed(seed)
    # the attack's own random draws (which rows, PGD's starts): batches and DP noise come from
    # the global generator, and stay the same as in clean training with the same seed
    attack_generator = torch.Generator(device=device).manual_seed(seed)
    augment_generator = torch.Generator(device=device).manual_seed(seed + AUGMENT_SEED_OFFSET)
    adversarial = robustness.train_attack != "none"
    views = training.augment_views if training.augment == "scanner" else 1
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if proximal_mu else []
    loader = DataLoader(as_dataset(data), batch_size=training.batch_size, shuffle=True)
    lr = lr_scale * (training.learning_rate if privacy.local else training.baseline_learning_rate)
    if training.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=training.momentum)
    q = 1.0
    if privacy.local:
        engine = privacy_engine(privacy.accountant)
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
    total, steps, batches = 0.0, 0, 0
    for _ in range(training.local_epochs):
        for images, labels, boxes in loader:
            x = images.to(device, torch.float32).div_(255)
            labels, boxes = labels.to(device), boxes.to(device)
            records = len(labels)
            if records == 0:
                # Poisson sampling drew no record: still a DP-SGD step, noise alone, which the
                # accountant counts; the "ew" and "functorch" engines cannot run zero rows forward
                noise_only_step(optimizer, params)
                steps += 1
                continue
            if training.augment == "scanner":
                x = scanner_views(x, views=views, generator=augment_generator)
                labels, boxes = labels.repeat_interleave(views), boxes.repeat_interleave(views, dim=0)
            if adversarial:
                x = mix_adversarial(model, x, labels, boxes, robustness=robustness, generator=attack_generator)
            # cleared before the forward pass: Opacus's "ew" mode collects per-sample
            # gradients during it
            optimizer.zero_grad(set_to_none=True)
            logits, pred_boxes = model(x)
            loss, _ = multitask_loss(logits, pred_boxes, labels, boxes, box_weight=box_weight)
            with warnings.catch_warnings():
                # the first trainable layer reads the fixed scattering's output, which needs no
                # gradient; torch warns that its hook then sees no input gradient, which Opacus
                # never reads (per-sample gradients come from the layer's output gradient)
                warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
                loss.backward()
            if privacy.local and views > 1:
                average_views(params, records=records, views=views)
            if proximal_mu:
                add_proximal_gradient(params, anchor, proximal_mu, private=privacy.local)
            if not privacy.local:
                # the baseline shares the optimizer settings of DP-SGD, whose per-example
                # clipping bounds the update; unclipped, the same learning rate diverges
                nn.utils.clip_grad_norm_(model.parameters(), privacy.max_grad_norm)
            optimizer.step()  # DP-SGD: clip each example's gradient, add noise, step
            total += loss.item()
            steps += 1
            batches += 1
    seconds = time.perf_counter() - t0
    if privacy.local:
        # Opacus hooks the caller's own layers; left on, a later backward in eval mode (an attack
        # on the trained model) finds no recorded activations and fails
        model.to_standard_module()
    return LocalResult(
        loss=total / max(batches, 1),
        steps=steps,
        sample_rate=q,
        noise_multiplier=noise_multiplier if privacy.local else 0.0,
        seconds=seconds,
        num_examples=len(data),
    )
