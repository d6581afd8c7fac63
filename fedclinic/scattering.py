"""The wavelet scattering transform in front of the model: fixed Morlet filters, applied as convolutions.

    from fedclinic.scattering import Scattering
    s = Scattering(in_channels=1)          # N x 1 x 32 x 32 -> N x 25 x 8 x 8
    features = s(images)

Two scales (J = 2) and four orientations (L = 4), up to second order, as
kymatio's Scattering2D(J=2, L=4) computes them (Bruna & Mallat 2013), and with
kymatio's own filter design (morlet_2d, gabor_2d, the parameters of its
filter_bank): per image channel, the low-pass image S0, the low-passed moduli
of the 2 x 4 first-order wavelet responses S1 = |x * psi_j1| * phi, and the
4 x 4 second-order ones S2 = ||x * psi_0| * psi_1| * phi, each sampled every
4 pixels. kymatio multiplies in Fourier space and its ONNX export needs DFT
operators, which ONNX Runtime ran 25 times slower than torch here; these are
small convolutions instead (cropped to where the filters live), exported as
plain Conv operators, with reflected borders. Away from the border they agree
with kymatio's to 1% (tests/test_model.py), and they run in about half its time.

Nothing here is trained, so under DP-SGD it costs no noise; the filters are
buffers left out of the state dict (rebuilt from the code, never sent).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

SCALES = 2  # J: the coarsest wavelet is 2 pixels per cycle coarser than the finest, the output 2**J times smaller
ORIENTATIONS = 4  # L
# kernel sizes, in pixels of the grid each filter runs on: the finest wavelet's Gaussian has sigma 0.8 and
# the others sigma 1.6 (kymatio's 0.8 * 2**j); 7 and 11 pixels hold all but ~1e-4 of their mass
FINE_SIZE, COARSE_SIZE = 7, 11
MAPS_PER_CHANNEL = 1 + SCALES * ORIENTATIONS + ORIENTATIONS**2  # S0, S1, S2 for J = 2


def _spatial(make, size: int, *args) -> np.ndarray:
    """A kymatio filter on a size x size grid centred on the middle pixel."""
    return np.ascontiguousarray(make(size, size, *args, offset=-(size // 2)))


# kymatio builds each filter on a grid in NumPy, about 20 ms for the model's four: once per process, since
# every site's round and every evaluation builds a model (Scattering clones them into its own buffers)
@functools.lru_cache(maxsize=8)
def _wavelets(j: int, size: int) -> Tensor:
    """The ORIENTATIONS Morlet wavelets of scale j as conv weights: 2L x 1 x size x size, (real, imaginary) pairs."""
    from kymatio.scattering2d.filter_bank import morlet_2d

    L = ORIENTATIONS
    waves = np.stack([
        # kymatio's filter_bank parameters: sigma, angle, central frequency, slant
        _spatial(morlet_2d, size, 0.8 * 2**j, (int(L - L / 2 - 1) - theta) * math.pi / L, 3 / 4 * math.pi / 2**j, 4 / L)
        for theta in range(L)
    ])
    return torch.from_numpy(np.stack([waves.real, waves.imag], axis=1)).float().reshape(2 * L, 1, size, size)


@functools.lru_cache(maxsize=8)
def _low_pass(sigma: float, size: int) -> Tensor:
    from kymatio.scattering2d.filter_bank import gabor_2d

    return torch.from_numpy(_spatial(gabor_2d, size, sigma, 0, 0).real).float()[None, None]


def _filter(x: Tensor, weight: Tensor, *, stride: int = 1, groups: int = 1) -> Tensor:
    r = weight.shape[-1] // 2
    return F.conv2d(F.pad(x, (r, r, r, r), mode="reflect"), weight, stride=stride, groups=groups)


def _low_pass_each(maps: Tensor, phi: Tensor, *, stride: int) -> Tensor:
    """N x K x H x W maps, each filtered with the one-map low-pass `phi` and sampled every `stride` pixels."""
    # one group per map: twice as fast to differentiate (attacks, explanations) as a batch of one-map images
    k = maps.shape[1]
    return _filter(maps, phi.expand(k, 1, *phi.shape[2:]), stride=stride, groups=k)


def _modulus(z: Tensor) -> Tensor:
    """|real + i imaginary| of (real, imaginary) channel pairs: N x 2K x H x W -> N x K x H x W."""
    n, c, h, w = z.shape
    power = z.view(n, c // 2, 2, h, w).square().sum(dim=2)
    # sqrt's gradient is infinite at 0 (a flat background): there the modulus gets gradient 0,
    # as in kymatio's Modulus, and attacks and explanations get no NaN; the values are sqrt's own
    zero = power == 0
    return torch.where(zero, 0.0, torch.where(zero, 1.0, power).sqrt())


class Scattering(nn.Module):
    """N x C x H x W images (H, W >= 16) -> N x 25C x ceil(H/4) x ceil(W/4) scattering maps, channel by channel."""

    def __init__(self, *, in_channels: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = in_channels * MAPS_PER_CHANNEL
        # buffers: they move with .to(device) and into an ONNX export, but stay out of state_dict
        self.register_buffer("fine", _wavelets(0, FINE_SIZE).clone(), persistent=False)
        self.register_buffer("coarse", _wavelets(1, COARSE_SIZE).clone(), persistent=False)
        # the low-pass phi (sigma 1.6) on the full grid, and the same filter on the half grid
        self.register_buffer("phi_full", _low_pass(0.8 * 2 ** (SCALES - 1), COARSE_SIZE).clone(), persistent=False)
        self.register_buffer("phi_half", _low_pass(0.8 * 2 ** (SCALES - 2), FINE_SIZE).clone(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        L = ORIENTATIONS
        x = x.reshape(n * c, 1, h, w)  # every image channel on its own
        u_fine = _modulus(_filter(x, self.fine))  # |x * psi_0|: full grid
        u_coarse = _modulus(_filter(x, self.coarse, stride=2))  # |x * psi_1|: half grid
        # ||x * psi_0| * psi_1| for every pair of orientations (theta1 major), on the half grid
        u_second = _modulus(_filter(u_fine, self.coarse.repeat(L, 1, 1, 1), stride=2, groups=L))
        full = _low_pass_each(torch.cat([x, u_fine], dim=1), self.phi_full, stride=4)
        half = _low_pass_each(torch.cat([u_coarse, u_second], dim=1), self.phi_half, stride=2)
        return torch.cat([full, half], dim=1).reshape(n, c * MAPS_PER_CHANNEL, *full.shape[2:])
