"""Synthetic hospital sites: grey-scale scans with a lesion or none, generated from a seed.

A scan is an organ (a soft ellipse of tissue with smooth low-frequency texture)
on dark air. The classes (CLASS_NAMES) differ by the lesion inside the organ:

- healthy: no lesion;
- benign: a smooth, round or oval, homogeneous blob;
- malignant: a lobulated outline with spicules and a heterogeneous texture.

Lesion size, position, orientation and contrast (brighter or darker than the
tissue) vary, so no single pixel statistic tells the classes apart. Every
lesion has a box (cx, cy, w, h in [0, 1]) that tightly encloses its drawn
outline; healthy scans have a NaN row.

Each site has its own scanner (ScannerProfile; each scan varies a little
around it), label prevalence (Dirichlet(label_alpha)) and size
(log-normal(quantity_skew) around site_size).
Each draws from its own random streams keyed by (seed, purpose, site): site 3
never needs sites 0-2, and sizes, prevalences and scanners cost nothing to
compute. The server's test set has its own stream, balanced classes, and one
scanner per scan drawn from the distribution the sites' scanners come from.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from functools import lru_cache

import numpy as np

from fedclinic.config import DataConfig
from fedclinic.data.imageset import ImageSet
from fedclinic.data.partition import stream, val_count

CLASS_NAMES = ("healthy", "benign", "malignant")

# the fewest training images a synthetic site gets (the default batch size), unless site_size is smaller
MIN_TRAIN_IMAGES = 128
# scanner blur is given in pixels of a scan this size, and scaled with the image size
BASE_SIZE = 32
# scans rendered at once: few enough that the working arrays stay in the CPU cache (128 measured fastest)
_CHUNK = 128
# outline harmonics (k = 2, 3, ...) and spicules a malignant lesion may have
_LOBES, _SPICULES = 4, 5
# polar angles at which a lesion outline is tabulated (a step of 0.025 radians)
_ANGLES = 256
# the malignant texture is constant on the cells of a polar grid: rings a quarter radius wide, sectors
_RINGS, _SECTORS = 8, 16


@dataclass(frozen=True)
class ScannerProfile:
    """How a scanner turns tissue into pixels; each field is one number, or one per scan."""

    contrast: float | np.ndarray  # display gain around mid-grey
    brightness: float | np.ndarray  # display offset, in [0, 1] intensity units
    gamma: float | np.ndarray  # display gamma (1 = linear)
    noise: float | np.ndarray  # std of the sensor noise, in [0, 1] intensity units
    blur: float | np.ndarray  # std of the Gaussian point-spread function, in pixels of a BASE_SIZE scan


def draw_profiles(rng: np.random.Generator, n: int) -> ScannerProfile:
    """n scanners from the distribution that every site and the test set draw from."""
    return ScannerProfile(
        contrast=rng.lognormal(0.0, 0.15, n),
        brightness=rng.normal(0.0, 0.05, n),
        gamma=rng.lognormal(0.0, 0.15, n),
        noise=rng.uniform(0.01, 0.04, n),
        blur=rng.uniform(0.0, 0.8, n),
    )


def scan_profiles(scanner: ScannerProfile, rng: np.random.Generator, n: int) -> ScannerProfile:
    """One profile per scan around `scanner`: acquisitions on one scanner differ a little (exposure, dose)."""
    return ScannerProfile(
        contrast=scanner.contrast * rng.lognormal(0.0, 0.05, n),
        brightness=scanner.brightness + rng.normal(0.0, 0.02, n),
        gamma=scanner.gamma * rng.lognormal(0.0, 0.05, n),
        noise=scanner.noise * rng.lognormal(0.0, 0.25, n),
        blur=np.maximum(scanner.blur + rng.normal(0.0, 0.15, n), 0.0),
    )


def site_profile(cfg: DataConfig, site: int) -> ScannerProfile:
    """The scanner of `site`."""
    drawn = draw_profiles(stream(cfg.seed, "scanner", site), 1)
    return ScannerProfile(**{f.name: float(getattr(drawn, f.name)[0]) for f in fields(drawn)})


def site_prevalence(cfg: DataConfig, site: int) -> np.ndarray:
    """The share of healthy, benign and malignant scans at `site`, drawn from Dirichlet(label_alpha)."""
    return stream(cfg.seed, "prevalence", site).dirichlet(np.full(len(CLASS_NAMES), cfg.label_alpha))


def site_total_size(cfg: DataConfig, site: int) -> int:
    """Scans of `site` before its validation split: site_size times a log-normal factor of mean 1.

    The factor's log has std quantity_skew and mean -skew^2/2, so site_size stays
    the mean size. A site keeps at least MIN_TRAIN_IMAGES training scans (fewer
    only when site_size itself is smaller), so the default batch size always fits.
    """
    sigma = cfg.quantity_skew
    factor = stream(cfg.seed, "size", site).lognormal(-(sigma**2) / 2, sigma)
    n = max(1, round(cfg.site_size * factor))
    min_train = min(MIN_TRAIN_IMAGES, cfg.site_size)
    while n - val_count(n, cfg.val_fraction) < min_train:
        n += 1
    return n


def generate_site(cfg: DataConfig, site: int) -> ImageSet:
    """All scans of `site` (train and validation together), identical on every call."""
    return _site_scans(cfg, site, stream(cfg.seed, "images", site), site_total_size(cfg, site))


def generate_fresh_site_scans(cfg: DataConfig, site: int, n: int) -> ImageSet:
    """n more scans from `site`'s distribution (its scanner and prevalence), none of them its own.

    They come from a stream of their own, so they are never among the site's
    train or validation scans: unseen data from the site, as a membership
    audit needs.
    """
    return _site_scans(cfg, site, stream(cfg.seed, "fresh images", site), n)


def generate_reference_scans(cfg: DataConfig, site: int, n: int) -> ImageSet:
    """n scans from `site`'s distribution for an auditor's reference model (the canary audit's replay).

    A stream of their own: never the site's own scans, nor the fresh scans the
    membership audit takes as non-members, so a model trained on them has seen
    neither the members nor the non-members it calibrates.
    """
    return _site_scans(cfg, site, stream(cfg.seed, "audit reference images", site), n)


def _site_scans(cfg: DataConfig, site: int, rng: np.random.Generator, n: int) -> ImageSet:
    labels = rng.choice(len(CLASS_NAMES), size=n, p=site_prevalence(cfg, site))
    scenes = draw_scenes(rng, labels, cfg.image_size)
    images, boxes = render(scenes, scan_profiles(site_profile(cfg, site), rng, len(labels)), rng)
    return ImageSet(images, labels.astype(np.int64), boxes, CLASS_NAMES)


def generate_test_set(cfg: DataConfig) -> ImageSet:
    """The server's held-out scans: balanced classes, one scanner per scan, a stream of their own."""
    rng = stream(cfg.seed, "server test set")
    labels = rng.permutation(np.arange(cfg.test_size) % len(CLASS_NAMES))
    profiles = scan_profiles(draw_profiles(rng, cfg.test_size), rng, cfg.test_size)
    scenes = draw_scenes(rng, labels, cfg.image_size)
    images, boxes = render(scenes, profiles, rng)
    return ImageSet(images, labels.astype(np.int64), boxes, CLASS_NAMES)


@dataclass(frozen=True)
class Scenes:
    """What is in front of the scanner: one row per scan, all in image-size units."""

    image_size: int
    labels: np.ndarray  # (N,) class index
    organ: np.ndarray  # (N, 5) centre x, centre y, semi-axis x, semi-axis y, angle
    tissue: np.ndarray  # (N, 2) tissue level, texture amplitude
    texture: np.ndarray  # (N, 5, 5) coarse coefficients of the tissue texture
    lesion: np.ndarray  # (N, 6) centre x, centre y, radius, aspect ratio, angle, contrast
    lobes: np.ndarray  # (N, _LOBES, 2) amplitude and phase of outline harmonics 2, 3, ...
    spicules: np.ndarray  # (N, _SPICULES, 2) length (in radii) and direction
    heterogeneity: np.ndarray  # (N, 2) strength of the texture inside the lesion, depth of its darker core
    lesion_texture: np.ndarray  # (N, _RINGS, _SECTORS) that variation, cell by cell of a polar grid

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index) -> "Scenes":
        return replace(self, **{f.name: getattr(self, f.name)[index] for f in fields(self) if f.name != "image_size"})


def draw_scenes(rng: np.random.Generator, labels: np.ndarray, image_size: int) -> Scenes:
    """Random anatomy and lesions for scans of the given labels (0 healthy, 1 benign, 2 malignant).

    Every scan consumes the same draws whatever its label, and unused values are
    zeroed, so a label never shifts the random stream of the scans after it.
    """
    n = len(labels)
    has_lesion, malignant = (labels > 0)[:, None], (labels == 2)[:, None]
    f32 = np.float32
    organ = np.stack(
        [rng.normal(0.5, 0.03, n), rng.normal(0.5, 0.03, n), rng.uniform(0.33, 0.44, n), rng.uniform(0.28, 0.40, n),
         rng.uniform(-0.5, 0.5, n)], axis=1)  # fmt: skip
    tissue = np.stack([rng.uniform(0.3, 0.5, n), rng.uniform(0.04, 0.1, n)], axis=1)
    # a malignant lesion's body is drawn smaller: its lobes and spicules make up the difference,
    # so that size alone does not give its class away
    radius = rng.uniform(0.09, 0.16, n) * np.where(malignant[:, 0], 0.8, 1.0)
    aspect = np.where(malignant[:, 0], rng.uniform(1.0, 1.25, n), rng.uniform(1.0, 1.6, n))
    # mostly brighter than the tissue, sometimes darker; the same for both lesion classes
    contrast = rng.uniform(0.18, 0.38, n) * np.where(rng.random(n) < 0.75, 1.0, -1.0)
    lobes = np.stack([rng.uniform(0.06, 0.14, (n, _LOBES)), rng.uniform(0, 2 * np.pi, (n, _LOBES))], axis=2)
    count = rng.integers(2, _SPICULES + 1, n)
    lengths = rng.uniform(0.5, 1.0, (n, _SPICULES)) * (np.arange(_SPICULES) < count[:, None])
    # spicules radiate all around, at least ~40 degrees apart, so that no two merge into one long arm
    spread = 2 * np.pi * np.arange(_SPICULES) / count[:, None] + rng.uniform(-0.3, 0.3, (n, _SPICULES))
    spicules = np.stack([lengths, rng.uniform(0, 2 * np.pi, (n, 1)) + spread], axis=2)
    lobes[:, :, 0] *= malignant
    spicules[:, :, 0] *= malignant
    # the lesion centre lies in the inner 60% of the organ and far enough from the image edges
    t, s = rng.uniform(0, 2 * np.pi, n), 0.6 * np.sqrt(rng.random(n))
    ox, oy = s * organ[:, 2] * np.cos(t), s * organ[:, 3] * np.sin(t)
    cos, sin = np.cos(organ[:, 4]), np.sin(organ[:, 4])
    extent = radius * np.sqrt(aspect) * (1 + lobes[:, :, 0].sum(1) + spicules[:, :, 0].max(1)) + 1.5 / image_size
    cx = np.clip(organ[:, 0] + ox * cos - oy * sin, extent, 1 - extent)
    cy = np.clip(organ[:, 1] + ox * sin + oy * cos, extent, 1 - extent)
    lesion = np.stack([cx, cy, radius, aspect, rng.uniform(0, np.pi, n), contrast], axis=1) * has_lesion
    return Scenes(
        image_size=image_size,
        labels=np.asarray(labels),
        organ=organ.astype(f32),
        tissue=tissue.astype(f32),
        texture=_unit_noise(rng, (n, 5, 5)),
        lesion=lesion.astype(f32),
        lobes=lobes.astype(f32),
        spicules=spicules.astype(f32),
        heterogeneity=(np.stack([rng.uniform(0.8, 1.2, n), rng.uniform(0.4, 0.9, n)], axis=1) * malignant).astype(f32),
        lesion_texture=_unit_noise(rng, (n, _RINGS, _SECTORS)),
    )


def _unit_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Uniform noise of mean 0 and std 1: four times faster to draw than normal noise, and the
    smooth fields, which sum many values, come out near-Gaussian anyway."""
    return (rng.random(shape, dtype=np.float32) - np.float32(0.5)) * np.float32(np.sqrt(12))


def render(
    scenes: Scenes, profile: ScannerProfile, rng: np.random.Generator, *, with_lesions: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Scans (uint8, N x 1 x H x W) and lesion boxes (float32, N x 4) of `scenes` seen through `profile`.

    `rng` draws the sensor noise only. `with_lesions=False` renders the same scans
    without their lesions (the boxes stay), which shows what a lesion changed.
    """
    n, size = len(scenes), scenes.image_size
    per_scan = {f.name: np.broadcast_to(np.float32(getattr(profile, f.name)), (n,)) for f in fields(profile)}
    images = np.empty((n, 1, size, size), dtype=np.uint8)
    boxes = np.full((n, 4), np.nan, dtype=np.float32)
    for start in range(0, n, _CHUNK):
        part = slice(start, min(start + _CHUNK, n))
        chunk_profile = ScannerProfile(**{name: values[part] for name, values in per_scan.items()})
        images[part, 0], boxes[part] = _render_chunk(scenes.take(part), chunk_profile, rng, with_lesions)
    return images, boxes


def _render_chunk(s: Scenes, profile: ScannerProfile, rng, with_lesions: bool) -> tuple[np.ndarray, np.ndarray]:
    size = s.image_size
    # the organ: a soft-edged ellipse (1.5-pixel ramp) of textured tissue on dark air
    cx, cy, ax, ay, angle = (col[:, None, None] for col in s.organ.T)
    xn, yn = _ellipse_coordinates(size, cx, cy, angle, ax, ay)
    ramp = ax * size / 1.5
    body = np.clip(ramp + 0.5 - ramp * np.sqrt(xn * xn + yn * yn), 0, 1)
    level, amplitude = (col[:, None, None] for col in s.tissue.T)
    x = 0.04 + body * (level + amplitude * _smooth_field(s.texture, size))

    boxes = np.full((len(s), 4), np.nan, dtype=np.float32)
    lesion = np.flatnonzero(s.labels > 0)
    if len(lesion):
        intensity, boxes[lesion] = _lesions(s.take(lesion))
        if with_lesions:
            x[lesion] += intensity

    # the scanner: point-spread blur, sensor noise, then the display curve
    x = _blur(x, profile.blur * size / BASE_SIZE)
    # triangular noise (the difference of two random bytes, std 104.5): it looks like Gaussian
    # sensor noise and costs a quarter as much to draw
    u = rng.integers(0, 256, (2, *x.shape), dtype=np.uint8)
    x += (profile.noise / np.float32(104.5))[:, None, None] * (u[0].astype(np.float32) - u[1])
    x = np.clip(x, 0, 1, out=x) ** profile.gamma[:, None, None]
    # display value = contrast * (x - 0.5) + 0.5 + brightness, in grey levels, rounded
    gain = 255 * profile.contrast[:, None, None]
    offset = 255 * (0.5 - 0.5 * profile.contrast[:, None, None] + profile.brightness[:, None, None]) + 0.5
    x *= gain
    x += offset
    return np.clip(x, 0, 255, out=x).astype(np.uint8), boxes


def _lesions(s: Scenes) -> tuple[np.ndarray, np.ndarray]:
    """The intensity each lesion adds to its scan (N x H x W) and its tight box; every scan given has one."""
    size = s.image_size
    cx, cy, radius, aspect, angle = (col[:, None, None] for col in s.lesion[:, :5].T)
    a, b = radius * np.sqrt(aspect), radius / np.sqrt(aspect)
    xn, yn = _ellipse_coordinates(size, cx, cy, angle, a, b)
    rho = np.sqrt(xn * xn + yn * yn)  # 1 on the outline of the plain ellipse
    # the outline radius depends on the polar angle only: tabulate it, then look it up per pixel
    table = _outline_table(s.lobes, s.spicules)
    step = np.float32(_ANGLES / (2 * np.pi))
    angle_bin = np.minimum(((np.arctan2(yn, xn) + np.float32(np.pi)) * step).astype(np.int32), _ANGLES - 1)
    rows = (np.arange(len(s), dtype=np.int32) * _ANGLES)[:, None, None]  # where each scan's row starts
    outline = np.take(table.ravel(), angle_bin + rows)
    # a 1.2-pixel ramp across the outline, measured along the short axis
    mask = np.clip((outline - rho) * (b * size / 1.2) + 0.5, 0, 1)
    # the pixel under the centre always belongs to the lesion, however small it is drawn
    centre_x = np.minimum((s.lesion[:, 0] * size).astype(int), size - 1)
    centre_y = np.minimum((s.lesion[:, 1] * size).astype(int), size - 1)
    mask[np.arange(len(s)), centre_y, centre_x] = 1.0
    inside = mask >= 0.5
    rows, cols = inside.any(axis=2), inside.any(axis=1)
    y0, y1 = rows.argmax(1), size - rows[:, ::-1].argmax(1)
    x0, x1 = cols.argmax(1), size - cols[:, ::-1].argmax(1)
    boxes = np.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=1) / size

    intensity = s.lesion[:, 5, None, None] * mask
    # malignant: a patchy texture and a darker (necrotic) core vary the intensity, never its sign
    bad = np.flatnonzero(s.labels == 2)
    ring = np.minimum((rho[bad] * (_RINGS / 2)).astype(np.int32), _RINGS - 1)
    cell = ring * _SECTORS + angle_bin[bad] // (_ANGLES // _SECTORS)
    cell += (np.arange(len(bad), dtype=np.int32) * (_RINGS * _SECTORS))[:, None, None]
    texture = np.take(s.lesion_texture[bad].ravel(), cell)
    strength, core = (s.heterogeneity[bad, i, None, None] for i in (0, 1))
    darker_core = np.maximum(core - (core / 0.7) * rho[bad], 0)  # deepest at the centre, gone at rho = 0.7
    intensity[bad] *= np.clip(1 + strength * texture - darker_core, 0.25, 2)
    return intensity, boxes.astype(np.float32)


def _outline_table(lobes: np.ndarray, spicules: np.ndarray) -> np.ndarray:
    """Outline radius (N x _ANGLES, 1 = the plain ellipse) at polar angles -pi, ..., pi - step.

    Harmonics 2, 3, ... make it lobulated; each spicule adds cos^32 of the angle
    to its direction: a spike a few degrees wide.
    """
    theta = np.linspace(-np.pi, np.pi, _ANGLES, endpoint=False, dtype=np.float32)[None, None, :]
    outline = np.ones((len(lobes), _ANGLES), dtype=np.float32)
    irregular = np.flatnonzero((lobes[:, :, 0] > 0).any(1) | (spicules[:, :, 0] > 0).any(1))
    lobes, spicules = lobes[irregular, :, :, None], spicules[irregular, :, :, None]
    harmonic = np.arange(2, 2 + lobes.shape[1], dtype=np.float32)[None, :, None]
    spike = np.maximum(np.cos(theta - spicules[:, :, 1]), 0)
    for _ in range(5):  # ** 32 by squaring: numpy's generic power is ten times slower
        spike *= spike
    outline[irregular] += (lobes[:, :, 0] * np.cos(harmonic * theta - lobes[:, :, 1])).sum(1)
    outline[irregular] += (spicules[:, :, 0] * spike).sum(1)
    return outline


def _ellipse_coordinates(size: int, cx, cy, angle, semi_x, semi_y) -> tuple[np.ndarray, np.ndarray]:
    """Every pixel centre in the frame of an ellipse (centre, angle, semi-axes): N x H x W each, 1 on the outline.

    The rotation and scaling are applied to a row and a column of offsets before
    they are broadcast, so each coordinate costs one full-size addition.
    """
    centres = (np.arange(size, dtype=np.float32) + 0.5) / size
    dx, dy = centres[None, None, :] - cx, centres[None, :, None] - cy
    cos, sin = np.cos(angle), np.sin(angle)
    return dx * (cos / semi_x) + dy * (sin / semi_x), dy * (cos / semi_y) - dx * (sin / semi_y)


@lru_cache(maxsize=16)
def _basis(knots: int, size: int) -> np.ndarray:
    """size x knots Gaussian bumps one knot-spacing wide, rows of unit norm (so fields have unit variance)."""
    centres = (np.arange(size) + 0.5) / size
    spacing = 1 / (knots - 1)
    m = np.exp(-((centres[:, None] - np.linspace(0, 1, knots)[None, :]) ** 2) / (2 * spacing**2))
    return (m / np.linalg.norm(m, axis=1, keepdims=True)).astype(np.float32)


def _smooth_field(coefficients: np.ndarray, size: int) -> np.ndarray:
    """A smooth random field (N x size x size) from N x k x k coefficients: M C M^T for each scan."""
    m = _basis(coefficients.shape[1], size)
    return m @ coefficients @ m.T


def _blur(x: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Gaussian blur with its own std (pixels) per scan: B x B^T with B a row-normalised Gaussian matrix.

    Rows are normalised so the edges keep their brightness. As batched matrix
    products this is several times faster than the same blur through an FFT.
    """
    # stds rounded to 0.02 pixels (an invisible difference) leave a few dozen distinct matrices to build
    levels, which = np.unique(np.maximum(np.round(sigma * 50) / 50, 1e-3).astype(np.float32), return_inverse=True)
    offsets = np.arange(x.shape[1], dtype=np.float32)
    b = np.exp(-((offsets[:, None] - offsets[None, :]) ** 2) / (2 * levels[:, None, None] ** 2))
    b /= b.sum(axis=2, keepdims=True)
    b[b < 1e-6] = 0  # tails that would be denormal numbers slow the products down ten-fold and change nothing
    b = b[0] if len(levels) == 1 else b[which]
    return b @ x @ np.swapaxes(b, -1, -2)
