"""Canaries of the one-run privacy audit, and the evidence an auditor reads off them.

    from fedclinic.analysis.canaries import make_canaries, draw_coins, prepare, round_evidence, canary_losses
    canaries = make_canaries(rng, 200, like=site_records)      # noise scans, random labels, no lesion
    coins = draw_coins(rng, 200)                                # True: the site trains on it
    evidence = round_evidence(model, sent, reply, prepare(model, canaries), prepare(model, site_records),
                              box_weight=1.0, clip=1.0)         # {"decoding": ..., "alignment": ...}

A canary is an out-of-distribution record: a scan of uniform noise with a
random label and no lesion. Steinke, Nasr & Jagielski (2023) audit with such
inserted records; here, on the default sites, noise canaries gave far more
evidence than mislabelled scans of the site's own scanner (a non-private
10-round federation: a bound of 0.93 against 0.0 with the same score).

The white-box evidence of one site's round reads the update the server sees
(the model sent minus the site's reply), as record-level DP at a site
assumes the server does:

- decoding: the update regressed on the per-example gradients, at the model
  sent, of the site's canaries and of the site's other records, each clipped
  to the DP-SGD clipping norm. A canary the site trained on enters the update
  with weight about lr / B each time it is sampled, an absent one with 0; the
  other records' columns take up their own share of the update (the auditor
  built the site's data, so it knows them).
- alignment: the cosine of the canary's gradient with the update.

Summed over the rounds, higher means "trained on". The black-box evidence is
the canary's loss under the final model (lower: trained on). The gradients
are taken of the trained weights only, from the model's fixed features
(MultiTaskNet.fixed_features), computed once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from fedclinic.data import ImageSet
from fedclinic.model import MultiTaskNet, per_example_losses

# the decoding keeps its regressors at most this share of the trained weights: with more columns than rows the
# regression cannot tell them apart, so a site with very many records gives its records' leading directions instead
MAX_COLUMN_SHARE = 0.9
CHUNK = 512  # examples per vmap call


@dataclass(frozen=True)
class Examples:
    """Images through the model's fixed part, with labels and boxes (NaN rows: no lesion): for gradients at many
    weights without running the fixed part again."""

    features: Tensor
    labels: Tensor
    boxes: Tensor

    def __len__(self) -> int:
        return len(self.labels)


def make_canaries(rng: np.random.Generator, count: int, *, like: ImageSet) -> ImageSet:
    """`count` canaries shaped like `like`'s images: uniform noise, a random class each, no lesion box."""
    images = rng.integers(0, 256, (count, *like.images.shape[1:]), dtype=np.uint8)
    labels = rng.integers(0, like.num_classes, count).astype(np.int64)
    boxes = None if like.boxes is None else np.full((count, 4), np.nan, dtype=np.float32)
    return ImageSet(images, labels, boxes, like.class_names)


def draw_coins(rng: np.random.Generator, count: int) -> np.ndarray:
    """A fair coin per canary: True puts it into its site's training data."""
    return rng.random(count) < 0.5


def prepare(model: MultiTaskNet, data: ImageSet) -> Examples:
    """`data` through `model`'s fixed features (the same for every weight the model takes)."""
    boxes = np.full((len(data), 4), np.nan, np.float32) if data.boxes is None else data.boxes
    with torch.no_grad():
        features = [model.fixed_features(torch.from_numpy(data.images[i:i + CHUNK]).float().div(255))
                    for i in range(0, len(data), CHUNK)]
    return Examples(torch.cat(features) if features else torch.empty(0), torch.from_numpy(data.labels),
                    torch.from_numpy(boxes))


def trained_names(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def flat(state: dict[str, Tensor], names: list[str]) -> Tensor:
    return torch.cat([state[name].detach().reshape(-1).float() for name in names])


class _Trained(nn.Module):
    """The model from its fixed features on: what torch.func differentiates."""

    def __init__(self, model: MultiTaskNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        return self.model.from_fixed(h)


def clipped_gradients(model: MultiTaskNet, examples: Examples, *, box_weight: float, clip: float) -> Tensor:
    """Each example's gradient of its training loss with respect to the trained weights (a row each, in
    trained_names order), scaled down to L2 norm `clip` where it is longer, as DP-SGD clips it."""
    names = trained_names(model)
    if not len(examples):
        return torch.zeros(0, sum(p.numel() for name, p in model.named_parameters() if name in names))
    trained = _Trained(model).eval()
    params = {f"model.{name}": p.detach() for name, p in model.named_parameters() if name in names}

    def loss(weights, h, label, box):
        logits, boxes = functional_call(trained, weights, (h[None],))
        cls_loss, box_loss = per_example_losses(logits, boxes, label[None], box[None])
        return (cls_loss + box_weight * box_loss).sum()

    per_example = vmap(grad(loss), in_dims=(None, 0, 0, 0))
    rows = []
    for i in range(0, len(examples), CHUNK):
        g = per_example(params, examples.features[i:i + CHUNK], examples.labels[i:i + CHUNK],
                        examples.boxes[i:i + CHUNK])
        rows.append(torch.cat([g[f"model.{name}"].reshape(len(g[f"model.{name}"]), -1) for name in names], dim=1))
    found = torch.cat(rows)
    return found / (found.norm(dim=1, keepdim=True) / clip).clamp_min(1.0)


def _leading_directions(rows: Tensor, room: int) -> Tensor:
    """`rows` itself when it fits in `room` rows, else its `room` leading right singular vectors."""
    if len(rows) <= room:
        return rows
    return torch.linalg.svd(rows, full_matrices=False).Vh[:max(room, 0)]


def round_evidence(model: MultiTaskNet, sent: dict[str, Tensor], reply: dict[str, Tensor], canaries: Examples,
                   others: Examples, *, box_weight: float, clip: float) -> dict[str, np.ndarray]:
    """One site's round, read from the update it sent: {"decoding", "alignment"}, one number per canary.

    `model` is loaded with `sent` (the global model of the round); `others` are
    the site's records that are not canaries.
    """
    model.load_state_dict(sent)
    names = trained_names(model)
    update = flat(sent, names) - flat(reply, names)  # the site's step, as a descent direction
    canary_rows = clipped_gradients(model, canaries, box_weight=box_weight, clip=clip)
    room = int(MAX_COLUMN_SHARE * len(update)) - len(canary_rows)
    other_rows = _leading_directions(clipped_gradients(model, others, box_weight=box_weight, clip=clip), room)
    columns = torch.cat([canary_rows, other_rows])
    # the normal equations: the Gram matrix in float32 (the costly product), solved in float64
    gram = (columns @ columns.T).double()
    ridge = 1e-6 * gram.diagonal().mean().clamp_min(1e-30)
    coefficients = torch.linalg.solve(gram + ridge * torch.eye(len(gram), dtype=gram.dtype),
                                      (columns @ update).double())
    cosine = (canary_rows @ update) / (canary_rows.norm(dim=1) * update.norm()).clamp_min(1e-30)
    return {"decoding": coefficients[:len(canary_rows)].numpy(), "alignment": cosine.double().numpy()}


def canary_losses(model: MultiTaskNet, canaries: Examples, *, box_weight: float) -> np.ndarray:
    """Each canary's training loss under `model`: the black-box evidence (lower: more likely trained on)."""
    trained = _Trained(model).eval()
    with torch.no_grad():
        logits, boxes = trained(canaries.features)
        cls_loss, box_loss = per_example_losses(logits, boxes, canaries.labels, canaries.boxes)
    return (cls_loss + box_weight * box_loss).double().numpy()
