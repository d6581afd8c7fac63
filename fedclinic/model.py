"""The multi-task model: a scattering front end and a small GroupNorm CNN, a disease head and a lesion-box head.

    from fedclinic.model import MultiTaskNet, multitask_loss, save_model, load_model
    model = MultiTaskNet(in_channels=1, num_classes=3, width=16)
    logits, boxes = model(images)          # images: float N x C x H x W in [0, 1]
    save_model(model, "global.pt", class_names=("healthy", "benign", "malignant"))
    model = load_model("global.pt")        # eval mode, .class_names, no training code needed

Built for Opacus DP-SGD: GroupNorm instead of BatchNorm (BatchNorm mixes
examples, so per-example gradients would not exist), and a loss that is a
mean of per-example losses, so per-example clipping bounds each image's
influence.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedclinic.config import Config
from fedclinic.config.sections import ENCODERS
from fedclinic.data.imageset import ImageSet
from fedclinic.scattering import Scattering

# Fixed normalisation inside the model, so callers (and adversarial attacks,
# whose budgets are in pixel units) feed raw [0, 1] pixels.
PIXEL_MEAN = 0.5
PIXEL_STD = 0.25

# GroupNorm groups per layer (fewer when the channel count is not a multiple).
GROUPS = 8

# The class head sees a POOLED_SIZE x POOLED_SIZE grid of the encoder's map: coarse
# "where", and any image size maps to the same feature length.
POOLED_SIZE = 4

# Smooth L1 switches from quadratic to linear at this error: box coordinates
# live in [0, 1], so the default beta = 1 would be quadratic everywhere and give
# tiny gradients near the target.
BOX_LOSS_BETA = 0.05

FILE_FORMAT = "fedclinic-model"
FILE_VERSION = 2


def _conv_block(in_channels: int, out_channels: int, *, stride: int = 1, kernel_size: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=kernel_size, stride=stride, padding=kernel_size // 2),
        nn.GroupNorm(math.gcd(GROUPS, out_channels), out_channels),
        nn.ReLU(),
    )


class SoftArgmaxBox(nn.Module):
    """The lesion box from the encoder's map: where = a softmax over its pixels, size = from what is there.

    cx, cy are the expected pixel centre under that softmax; w, h come from
    the map's features averaged with the same weights. A few dozen weights
    instead of a dense layer over the whole map: under DP it localised better
    (test IoU 0.48 against 0.40 on the synthetic sites, bench/utility.py's notes).
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.where = nn.Conv2d(width, 1, kernel_size=1)
        self.size = nn.Linear(width, 2)

    def forward(self, h: Tensor) -> Tensor:
        n, _, height, width = h.shape
        weights = torch.softmax(self.where(h).flatten(1), dim=1).view(n, height, width)
        ys = (torch.arange(height, dtype=h.dtype, device=h.device) + 0.5) / height
        xs = (torch.arange(width, dtype=h.dtype, device=h.device) + 0.5) / width
        cx = (weights.sum(dim=1) * xs).sum(dim=1)
        cy = (weights.sum(dim=2) * ys).sum(dim=1)
        there = (h * weights[:, None]).sum(dim=(2, 3))
        w, hh = torch.sigmoid(self.size(there)).unbind(dim=1)
        return torch.stack([cx, cy, w, hh], dim=1)


class MultiTaskNet(nn.Module):
    """An encoder to a width x H/4 x W/4 map, feeding a class head and a box head.

    encoder "scattering" (the default): a fixed wavelet scattering transform
    (fedclinic.scattering), each of its maps normalised over its own pixels,
    image by image, then two trained 3x3 conv blocks. "cnn": four trained conv
    blocks, two of stride 2. Any image size of at least 16 pixels.
    forward(x) takes a float batch N x C x H x W in [0, 1] and returns (logits
    N x num_classes, boxes N x 4), the boxes as (cx, cy, w, h) in [0, 1] of the
    image size.
    """

    def __init__(self, *, in_channels: int, num_classes: int, width: int = 16, encoder: str = "scattering") -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 2 or width < 1 or encoder not in ENCODERS:
            raise ValueError(
                f"MultiTaskNet needs in_channels >= 1, num_classes >= 2, width >= 1 and an encoder in {ENCODERS}, "
                f"got in_channels={in_channels}, num_classes={num_classes}, width={width}, encoder={encoder!r}"
            )
        # Everything needed to rebuild the architecture; saved next to the weights.
        self.arch = {"in_channels": in_channels, "num_classes": num_classes, "width": width, "encoder": encoder}
        if encoder == "scattering":
            # Tramer & Boneh 2021 ("Differentially private learning needs better features"): fixed
            # scattering features beat end-to-end CNNs under DP (bench/utility.py measures both encoders)
            scattering = Scattering(in_channels=in_channels)
            maps = scattering.out_channels
            blocks = [scattering, nn.GroupNorm(maps, maps, affine=False), _conv_block(maps, width),
                      _conv_block(width, width)]
        else:
            blocks = [
                _conv_block(in_channels, width),
                _conv_block(width, 2 * width, stride=2),
                _conv_block(2 * width, 4 * width, stride=2),
                # a 1x1 reduction: 4x fewer features and head weights, and DP-SGD's
                # noise norm grows with the square root of the parameter count
                _conv_block(4 * width, width, kernel_size=1),
            ]
        self.encoder = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(POOLED_SIZE), nn.Flatten())
        self.class_head = nn.Linear(width * POOLED_SIZE * POOLED_SIZE, num_classes)
        self.box_head = SoftArgmaxBox(width)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.from_fixed(self.fixed_features(x))

    def fixed_features(self, x: Tensor) -> Tensor:
        """`x` through the leading encoder blocks that learn nothing (the scattering and its normalisation; none
        for the CNN): they are the same for every weight the model will have, so an analysis that needs the
        model's gradients at many weights (the canary audit) computes them once."""
        h = (x - PIXEL_MEAN) / PIXEL_STD
        for block in self.encoder[: self._first_trained()]:
            h = block(h)
        return h

    def from_fixed(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """(logits, boxes) from `fixed_features`: the trained blocks and both heads."""
        for block in self.encoder[self._first_trained():]:
            h = block(h)
        return self.class_head(self.pool(h)), self.box_head(h)

    def _first_trained(self) -> int:
        return next((i for i, block in enumerate(self.encoder) if any(True for _ in block.parameters())),
                    len(self.encoder))


def build_model(config: Config, data: ImageSet, state_dict: dict[str, Tensor] | None = None) -> MultiTaskNet:
    """The run's model for images like `data`'s (channels, classes, size), with `state_dict` loaded if given."""
    model = MultiTaskNet(in_channels=data.channels, num_classes=data.num_classes, width=config.model.width,
                         encoder=config.model.encoder)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model


def initial_model(config: Config, data: ImageSet) -> MultiTaskNet:
    """The global model of round 0, for images and classes like `data`: torch seeded with data.seed, so every
    run of a configuration (and its baselines, fedclinic.baselines) starts from the same weights."""
    torch.manual_seed(config.data.seed)
    return build_model(config, data)


def per_example_losses(
    logits: Tensor, pred_boxes: Tensor, labels: Tensor, true_boxes: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Each example's cross-entropy and box loss, two length-N tensors.

    The box loss is smooth L1 on cx, cy, w, h, averaged over the 4
    coordinates; it is 0 for a row whose true box is not finite (a NaN row
    means "no lesion") and for every row when `true_boxes` is None (data
    without boxes). Both stay attached to the model's outputs.
    """
    cls_loss = F.cross_entropy(logits, labels, reduction="none")
    if true_boxes is None:
        # Zero times the boxes keeps the box head in the graph, so Opacus still
        # gets a (zero) per-example gradient for every parameter.
        return cls_loss, pred_boxes.sum(dim=1) * 0.0
    has_box = torch.isfinite(true_boxes).all(dim=1)
    # NaN targets are replaced before the arithmetic: NaN * 0 is NaN, and it
    # would reach the gradients otherwise.
    safe_true = torch.where(has_box[:, None], true_boxes, pred_boxes.detach())
    per_row = F.smooth_l1_loss(pred_boxes, safe_true, reduction="none", beta=BOX_LOSS_BETA).mean(dim=1)
    return cls_loss, torch.where(has_box, per_row, torch.zeros_like(per_row))


def multitask_loss(
    logits: Tensor,
    pred_boxes: Tensor,
    labels: Tensor,
    true_boxes: Tensor | None,
    *,
    box_weight: float,
) -> tuple[Tensor, dict[str, float]]:
    """Mean cross-entropy + box_weight * box loss, and the two parts as floats.

    Both parts are sums of `per_example_losses` divided by the whole batch
    size N, so the box loss counts only rows with a finite true box but is
    still divided by N. The total is therefore the mean over examples of a
    per-example loss (an image without a lesion contributes 0 box loss),
    which is what DP-SGD's per-example clipping assumes. `true_boxes=None`
    (data without boxes) gives the classification loss only. An empty batch
    gives 0, still attached to the model's outputs.
    """
    cls_rows, box_rows = per_example_losses(logits, pred_boxes, labels, true_boxes)
    # sum / max(n, 1) rather than mean: an empty batch (Poisson sampling can
    # draw one) gives 0 instead of 0/0.
    per_batch = max(labels.shape[0], 1)
    cls_loss = cls_rows.sum() / per_batch
    box_loss = box_rows.sum() / per_batch
    loss = cls_loss + box_weight * box_loss
    return loss, {"cls": cls_loss.item(), "box": box_loss.item()}


def _unwrap(model: nn.Module) -> nn.Module:
    # Opacus' GradSampleModule (and DPDDP) keep the real model in `_module`;
    # saving the wrapper would prefix every key with "_module.".
    while not isinstance(model, MultiTaskNet) and isinstance(getattr(model, "_module", None), nn.Module):
        model = model._module
    return model


def _check_plain(value: object, where: str) -> None:
    """Refuse what torch.load(weights_only=True) could not read back."""
    # exact types: NumPy scalars subclass float but torch.load(weights_only=True) refuses them
    if value is None or type(value) in (bool, int, float, str) or isinstance(value, Tensor):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where} keys must be strings, got {key!r}")
            _check_plain(item, f"{where}[{key!r}]")
        return
    raise ValueError(
        f"{where} is a {type(value).__name__}; a saved model holds only "
        "str, int, float, bool, None, tensors, lists, tuples and dicts (convert with float(), int(), ...)"
    )


def save_model(
    model: nn.Module,
    path: str | Path,
    *,
    class_names: tuple[str, ...] | list[str],
    extra: dict | None = None,
) -> None:
    """Write the model to one file that `load_model` rebuilds without training code.

    An Opacus-wrapped model is unwrapped first, so the saved keys are plain.
    `extra` (run name, epsilon, ...) may hold only plain values and tensors.
    """
    net = _unwrap(model)
    if not isinstance(net, MultiTaskNet):
        raise TypeError(f"save_model saves a MultiTaskNet, got {type(model).__name__}")
    class_names = tuple(class_names)
    if len(class_names) != net.arch["num_classes"]:
        raise ValueError(
            f"the model has {net.arch['num_classes']} classes but {len(class_names)} class names "
            f"were given: {class_names}"
        )
    extra = {} if extra is None else dict(extra)
    _check_plain(extra, "extra")
    checkpoint = {
        "format": FILE_FORMAT,
        "version": FILE_VERSION,
        "arch": dict(net.arch),
        "class_names": list(class_names),
        # On the CPU, so a model trained on a GPU loads on any machine.
        "state_dict": {key: t.detach().cpu() for key, t in net.state_dict().items()},
        "extra": extra,
    }
    torch.save(checkpoint, Path(path))


def load_model(path: str | Path) -> MultiTaskNet:
    """The model saved at `path`, in eval mode, with `.class_names` and `.extra` attributes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file '{path}' does not exist")
    try:
        # weights_only: a model file from elsewhere cannot run code when loaded.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types (and pages of advice) for a foreign file
        raise ValueError(f"'{path}' is not a fedclinic model file (torch cannot read it as plain weights)") from err
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FILE_FORMAT:
        raise ValueError(f"'{path}' is not a fedclinic model file (no '{FILE_FORMAT}' marker)")
    if checkpoint.get("version") != FILE_VERSION:
        raise ValueError(
            f"'{path}' is a fedclinic model file of version {checkpoint.get('version')!r}; "
            f"this fedclinic reads version {FILE_VERSION}"
        )
    try:
        model = MultiTaskNet(**checkpoint["arch"])
        model.load_state_dict(checkpoint["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"'{path}' is a damaged fedclinic model file: {err}") from None
    model.class_names = tuple(checkpoint["class_names"])
    model.extra = checkpoint["extra"]
    return model.eval()
