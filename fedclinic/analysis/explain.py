"""Explanations of the global model: Integrated Gradients and Grad-CAM maps (Captum), scored against lesion boxes.

    from fedclinic.analysis.explain import explain
    scores = explain(model, test_set, run_dir, per_class=3, device="cpu", seed=0)
    # writes run_dir/explanations.png; scores = {"integrated_gradients": {"mass_in_box": ..,
    #   "pointing_hit_rate": .., "chance_mass": .., "images": n}, "grad_cam": {...}}

Each map explains one class logit of the disease head:

- the score (pointing game, attribution mass in the box) explains the *true*
  class of each image, as the pointing game does: does the evidence for
  "malignant" lie on the lesion?
- the figure explains the *predicted* class: why did the model say what it said?

A map is H x W, summed over colour channels; only its positive part counts
as evidence. Integrated Gradients starts from a black image (all pixels 0);
Grad-CAM weighs the channels of the last convolutional block and is upsampled
bilinearly to the image size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from torch import Tensor, nn

from fedclinic.data.imageset import ImageSet
from fedclinic.evaluation.metrics import batches, eval_mode, evaluating

# Integrated Gradients' path integral: Gauss-Legendre with 32 points is exact for
# polynomials up to degree 63 along the path and keeps the CPU cost moderate.
IG_STEPS = 32
# images (times IG_STEPS) in one forward pass of Integrated Gradients: bounds the memory
IG_INTERNAL_BATCH = 256
BATCH_SIZE = 64

TRUE_BOX_COLOUR = "lime"
PREDICTED_BOX_COLOUR = "magenta"
# overlay pixels below this share of the map's maximum are not coloured
OVERLAY_FLOOR = 0.1


def _class_logits(model: nn.Module) -> Callable[[Tensor], Tensor]:
    # Captum picks a target column from the output; the box head is not explained.
    return lambda x: model(x)[0]


def _last_conv_block(model: nn.Module) -> nn.Module:
    """The encoder's last child that holds a convolution: Grad-CAM's layer (finest semantics, some space left)."""
    blocks = [m for m in model.encoder if any(isinstance(c, nn.Conv2d) for c in m.modules())]
    if not blocks:
        raise ValueError(f"{type(model).__name__}.encoder has no convolution for Grad-CAM to weigh")
    return blocks[-1]


def integrated_gradients(model: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
    """N x H x W Integrated Gradients of each target logit, from a black baseline, summed over channels."""
    ig = IntegratedGradients(_class_logits(model))
    attributions = ig.attribute(
        images, baselines=0.0, target=targets, n_steps=IG_STEPS, internal_batch_size=IG_INTERNAL_BATCH
    )
    return attributions.sum(dim=1)


def grad_cam(model: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
    """N x H x W Grad-CAM (ReLU of the gradient-weighted channels) of the last conv block, upsampled."""
    cam = LayerGradCam(_class_logits(model), _last_conv_block(model))
    coarse = cam.attribute(images, target=targets, relu_attributions=True)
    return LayerAttribution.interpolate(coarse, tuple(images.shape[2:]), interpolate_mode="bilinear")[:, 0]


# name -> attribution method; each takes (model, images, targets) and returns N x H x W maps
METHODS: dict[str, Callable[[nn.Module, Tensor, Tensor], Tensor]] = {
    "integrated_gradients": integrated_gradients,
    "grad_cam": grad_cam,
}
METHOD_TITLES = {"integrated_gradients": "Integrated Gradients", "grad_cam": "Grad-CAM"}


def attribution_maps(model: nn.Module, images: Tensor, targets: Tensor, *, method: str) -> Tensor:
    """N x H x W maps of `method` explaining logit targets[i] of images[i], detached.

    The maps explain the model as it predicts: it is in eval mode for the
    call, and its train/eval mode is restored after.
    """
    if method not in METHODS:
        raise ValueError(f"unknown attribution method '{method}'; expected one of {sorted(METHODS)}")
    with eval_mode(model):
        return METHODS[method](model, images, targets).detach()


def box_masks(boxes: Tensor, height: int, width: int) -> Tensor:
    """N x H x W booleans: the pixels whose centre lies inside each (cx, cy, w, h) box, in [0, 1] units.

    Pixel (row i, column j) covers [j, j + 1) x [i, i + 1) in pixel units, so
    a box from x0 = (cx - w / 2) * W to x1 holds columns j with
    x0 <= j + 0.5 <= x1; parts of a box past the image border hold no pixel.
    """
    boxes = boxes.to(torch.float64)
    centres_x = torch.arange(width, dtype=torch.float64, device=boxes.device) + 0.5
    centres_y = torch.arange(height, dtype=torch.float64, device=boxes.device) + 0.5
    cx, cy, w, h = (boxes[:, k, None] for k in range(4))
    in_x = ((cx - w / 2) * width <= centres_x) & (centres_x <= (cx + w / 2) * width)
    in_y = ((cy - h / 2) * height <= centres_y) & (centres_y <= (cy + h / 2) * height)
    return in_y[:, :, None] & in_x[:, None, :]


def box_hits(maps: Tensor, boxes: Tensor) -> dict[str, Tensor]:
    """Per image: share of positive attribution mass inside the box, pointing-game hit, box share of the image.

    A map with no positive attribution points nowhere: it scores 0 mass in
    the box and a miss. The pointing game has no tolerance margin: the
    (first) largest pixel must lie inside the box.
    """
    masks = box_masks(boxes, *maps.shape[1:])
    positive = maps.to(torch.float64).clamp(min=0)
    total = positive.sum(dim=(1, 2))
    inside = (positive * masks).sum(dim=(1, 2))
    mass = torch.where(total > 0, inside / total.clamp(min=1e-300), torch.zeros_like(total))
    peak = maps.flatten(1).argmax(dim=1)
    hit = masks.flatten(1).gather(1, peak[:, None])[:, 0] & (total > 0)
    chance = masks.to(torch.float64).mean(dim=(1, 2))
    return {"mass_in_box": mass, "pointing_hit": hit.to(torch.float64), "chance_mass": chance}


def pointing_scores(model: nn.Module, data: ImageSet, *, method: str, device: str | torch.device = "cpu") -> dict:
    """Mean mass in the true box, pointing-game hit rate and the chance level over `data`'s images with a box.

    Each map explains the image's true class. Images without a box (healthy
    scans, or data without boxes) are left out; with none left every score is
    NaN and "images" is 0. `model` must already live on `device`.

    Integrated Gradients costs IG_STEPS forward and backward passes an image
    (about a minute for the 667 lesion images of a 1,000-image test set on a
    2-core CPU); Grad-CAM one.
    """
    per_image: dict[str, list[Tensor]] = {"mass_in_box": [], "pointing_hit": [], "chance_mass": []}
    for images, labels, true_boxes in batches(data, batch_size=BATCH_SIZE, device=device):
        if true_boxes is None:
            break
        has_box = torch.isfinite(true_boxes).all(dim=1)
        if not has_box.any():
            continue
        maps = attribution_maps(model, images[has_box], labels[has_box], method=method)
        for key, values in box_hits(maps, true_boxes[has_box]).items():
            per_image[key].append(values.cpu())
    n = sum(len(v) for v in per_image["mass_in_box"])
    mean = {key: torch.cat(values).mean().item() if n else math.nan for key, values in per_image.items()}
    return {"mass_in_box": mean["mass_in_box"], "pointing_hit_rate": mean["pointing_hit"],
            "chance_mass": mean["chance_mass"], "images": n}


def sample_indices(data: ImageSet, per_class: int, seed: int) -> list[np.ndarray]:
    """Up to `per_class` random image indices of each class (sorted), one array per class."""
    rng = np.random.default_rng(seed)
    return [np.sort(rng.permutation(np.flatnonzero(data.labels == k))[:per_class]) for k in range(data.num_classes)]


def _draw_box(ax, box: np.ndarray, size: tuple[int, int], colour: str) -> None:
    cx, cy, w, h = box
    height, width = size
    # imshow puts pixel centres on integers, so the image's left edge sits at -0.5
    corner = ((cx - w / 2) * width - 0.5, (cy - h / 2) * height - 0.5)
    ax.add_patch(Rectangle(corner, w * width, h * height, fill=False, edgecolor=colour, linewidth=1.0))


def _show(ax, image: np.ndarray, heat: np.ndarray | None, title: str) -> None:
    ax.imshow(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0), cmap="gray", vmin=0, vmax=255)
    if heat is not None:
        positive = np.clip(heat, 0, None)
        share = positive / positive.max() if positive.max() > 0 else positive
        # the weakest evidence is left transparent, so the scan shows through
        ax.imshow(np.ma.masked_less(share, OVERLAY_FLOOR), cmap="inferno", alpha=0.6, vmin=0, vmax=1)
    ax.set_title(title, fontsize=6)
    ax.axis("off")


def _lesion_classes(data: ImageSet) -> set[int]:
    if data.boxes is None:
        return set()
    return {int(k) for k in np.unique(data.labels[np.isfinite(data.boxes).all(axis=1)])}


def _plot_row(axes, model: nn.Module, data: ImageSet, index: np.ndarray, *, device: str | torch.device) -> None:
    images = torch.from_numpy(data.images[index]).to(device).float() / 255.0
    with evaluating(model):
        logits, pred_boxes = model(images)
    predicted = logits.argmax(dim=1)
    maps = {method: attribution_maps(model, images, predicted, method=method).cpu().numpy() for method in METHODS}
    lesion_classes = _lesion_classes(data)
    size = data.images.shape[2:]
    for s, i in enumerate(index):
        p = int(predicted[s])
        caption = f"true {data.class_names[data.labels[i]]}\npred {data.class_names[p]}"
        panels = [(None, caption), *((maps[method][s], METHOD_TITLES[method]) for method in METHODS)]
        for ax, (heat, title) in zip(axes[s * len(panels):], panels):
            _show(ax, data.images[i], heat, title)
            if data.boxes is not None and np.isfinite(data.boxes[i]).all():
                _draw_box(ax, data.boxes[i], size, TRUE_BOX_COLOUR)
            if p in lesion_classes:
                _draw_box(ax, pred_boxes[s].cpu().numpy(), size, PREDICTED_BOX_COLOUR)


def plot_explanations(model: nn.Module, data: ImageSet, path: Path, *, per_class: int, seed: int,
                      device: str | torch.device) -> None:
    """One row per class: for each sample the image, its IG overlay and its Grad-CAM overlay, with both boxes.

    Maps explain the predicted class. The predicted box is drawn only when the
    predicted class is one that has lesion boxes in `data`.
    """
    rows = sample_indices(data, per_class, seed)
    columns = per_class * (1 + len(METHODS))
    # a Figure of its own, not pyplot's: no display backend and no global figure list
    fig = Figure(figsize=(1.3 * columns, 1.85 * len(rows)))  # room for two-line titles between rows
    axes = fig.subplots(len(rows), columns, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for k, index in enumerate(rows):
        if len(index):
            _plot_row(axes[k], model, data, index, device=device)
    legend = [Line2D([], [], color=TRUE_BOX_COLOUR, label="true box"),
              Line2D([], [], color=PREDICTED_BOX_COLOUR, label="predicted box")]
    fig.legend(handles=legend, loc="upper left", fontsize=7, ncols=2, frameon=False)
    fig.suptitle("What the global model looks at (maps explain the predicted class)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=110)


def explain(model: nn.Module, data: ImageSet, out_dir: str | Path, *, per_class: int = 3,
            device: str | torch.device = "cpu", seed: int = 0,
            on_step: Callable[[str, int, int], None] | None = None) -> dict[str, dict]:
    """Write `out_dir`/explanations.png and return the pointing scores of every method (see `pointing_scores`).

    `model` must already live on `device`; its train/eval mode is left as it was. `on_step(line, done, total)`
    is told of each part as it is done: the figure, then each method's scores.
    """
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1 sample per class, got {per_class}")
    step = on_step or (lambda line, done, total: None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_explanations(model, data, out_dir / "explanations.png", per_class=per_class, seed=seed, device=device)
    total = 1 + len(METHODS)
    step(f"explanations.png: {per_class} image(s) per class", 1, total)
    found = {}
    for done, method in enumerate(METHODS, start=2):
        found[method] = pointing_scores(model, data, method=method, device=device)
        step(f"{METHOD_TITLES[method]}: {found[method]['mass_in_box']:.2f} of the mass in the lesion box "
             f"(chance {found[method]['chance_mass']:.2f})", done, total)
    return found
