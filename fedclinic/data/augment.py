"""Scanner augmentation: each training image seen through a randomly different scanner.

    views = scanner_views(images, views=2, generator=g)   # N x C x H x W in [0, 1] -> 2N rows, record by record

A site's images all come from its own scanner, so a model trained there also
learns that scanner: on the synthetic sites, healthy scans from noisier,
higher-gamma scanners were taken for malignant ones. Each view redraws the
display curve and the sensor noise, the intensity augmentations nnU-Net uses
by default (Isensee et al. 2021): gamma, contrast and brightness around the
image's own values, and Gaussian noise of a random strength. The lesion box
does not move.

A view is a function of its own record and of random draws alone, so under
DP-SGD the views of one record are one record: clients/training.py averages
their gradients before the per-example clipping, and the accounting is that
of plain training (augmentation multiplicity, De et al. 2022).
"""

from __future__ import annotations

import torch
from torch import Tensor

# log-normal spreads of gamma and contrast, std of the brightness shift, largest noise std
# (image intensities in [0, 1])
GAMMA_SPREAD = 0.2
CONTRAST_SPREAD = 0.2
BRIGHTNESS_SPREAD = 0.05
MAX_NOISE = 0.03


def scanner_views(images: Tensor, *, views: int, generator: torch.Generator) -> Tensor:
    """`views` augmented copies of every image, as rows i * views + k; float images in [0, 1] in and out."""
    x = images.repeat_interleave(views, dim=0)
    n = x.shape[0]

    def per_image(spread: float) -> Tensor:
        draw = torch.randn(n, generator=generator, device=x.device, dtype=x.dtype)
        return (spread * draw).view(n, 1, 1, 1)

    gamma, contrast, brightness = per_image(GAMMA_SPREAD).exp(), per_image(CONTRAST_SPREAD).exp(), per_image(BRIGHTNESS_SPREAD)
    noise_std = MAX_NOISE * torch.rand(n, 1, 1, 1, generator=generator, device=x.device, dtype=x.dtype)
    noise = noise_std * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (contrast * (x**gamma - 0.5) + 0.5 + brightness + noise).clamp(0, 1)
