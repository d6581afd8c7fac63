"""Dividing one labelled split among hospital sites, and a site's train/validation split.

    partition(labels, 8, method="dirichlet", alpha=0.3, seed=0)  # -> 8 index arrays

Three partitioners, as in the federated-learning literature:

- iid: a random permutation cut into equal parts (sizes differ by at most one);
- dirichlet: label skew; each class is shared among sites in proportions drawn
  from Dirichlet(alpha), as in Hsu et al. (2019) and NIID-Bench (Li et al., 2022);
- quantity: size skew; sizes proportional to log-normal(0, skew) weights, labels iid.

Every partitioner returns disjoint, sorted int64 index arrays that together
cover every index exactly once and leave no site empty. Everything random
comes from `stream`, so results depend on the seed alone.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

METHODS = ("iid", "dirichlet", "quantity")

# a site smaller than this (or than half an even share, on small data) is "tiny"
_MIN_SITE_SIZE = 10
# Dirichlet draws retried before the best draw is repaired by moving images
_DIRICHLET_ATTEMPTS = 100


def stream(seed: int, *keys: int | str) -> np.random.Generator:
    """An independent random stream for (seed, *keys): `stream(0, "images", 3)` is site 3's images.

    Words are turned into integers so that streams read as what they are for;
    any seed (negative too) is accepted by wrapping it into 64 bits.
    """
    entropy = [seed & (2**64 - 1)]
    for key in keys:
        entropy.append(int.from_bytes(key.encode(), "little") if isinstance(key, str) else key & (2**64 - 1))
    return np.random.default_rng(np.random.SeedSequence(entropy))


def partition(
    labels: Sequence[int] | np.ndarray,
    num_sites: int,
    *,
    method: str = "iid",
    alpha: float = 1.0,
    skew: float = 0.5,
    seed: int = 0,
) -> list[np.ndarray]:
    """Divide the indices of `labels` among `num_sites` sites with `method` (iid, dirichlet or quantity).

    `alpha` is the Dirichlet concentration of the dirichlet method (small = each site
    sees few classes); `skew` is the log-normal sigma of the quantity method (0 = equal sizes).
    """
    labels = np.asarray(labels).reshape(-1)
    n = len(labels)
    if method not in METHODS:
        raise ValueError(f"unknown partition method {method!r}; expected one of {', '.join(METHODS)}")
    if num_sites < 1:
        raise ValueError(f"the number of sites must be at least 1, got {num_sites}")
    if num_sites > n:
        raise ValueError(f"cannot divide {n} images among {num_sites} sites; every site needs at least one image")
    if method == "dirichlet" and not alpha > 0:
        raise ValueError(f"the Dirichlet alpha must be > 0, got {alpha}")
    if method == "quantity" and not skew >= 0:
        raise ValueError(f"the quantity skew must be >= 0, got {skew}")

    rng = stream(seed, "partition", method)
    min_size = max(1, min(_MIN_SITE_SIZE, n // (2 * num_sites)))
    if method == "iid":
        parts = np.array_split(rng.permutation(n), num_sites)
    elif method == "dirichlet":
        parts = _dirichlet(labels, num_sites, alpha, min_size, rng)
    else:
        parts = _quantity(n, num_sites, skew, min_size, rng)
    return [np.sort(part).astype(np.int64) for part in parts]


def _dirichlet(labels: np.ndarray, num_sites: int, alpha: float, min_size: int, rng) -> list[np.ndarray]:
    """Label skew: class c goes to the sites in proportions p_c ~ Dirichlet(alpha, ..., alpha).

    As in NIID-Bench, a site that already holds its even share gets no more of
    the next classes (this keeps sizes sane at small alpha), and the draw is
    retried until every site holds at least `min_size` images. If no draw
    succeeds, the best one is repaired by moving random images from the largest
    sites, so the function always terminates.
    """
    n = len(labels)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    best: list[np.ndarray] = []
    for _ in range(_DIRICHLET_ATTEMPTS):
        chunks: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
        sizes = np.zeros(num_sites, dtype=np.int64)
        for members in by_class:
            members = rng.permutation(members)
            p = rng.dirichlet(np.full(num_sites, alpha))
            p = p * (sizes < n / num_sites)
            if p.sum() <= 0 or not np.isfinite(p).all():  # every site full, or a degenerate draw
                p = np.full(num_sites, 1.0 / num_sites)
            cuts = (np.cumsum(p / p.sum())[:-1] * len(members)).astype(np.int64)
            for site, chunk in enumerate(np.split(members, cuts)):
                chunks[site].append(chunk)
                sizes[site] += len(chunk)
        parts = [np.concatenate(c) for c in chunks]
        if not best or sizes.min() > min(len(p) for p in best):
            best = parts
        if sizes.min() >= min_size:
            return parts
    return _top_up(best, min_size, rng)


def _top_up(parts: list[np.ndarray], min_size: int, rng) -> list[np.ndarray]:
    """Move random images from the largest site to each site below `min_size`."""
    parts = [rng.permutation(p) for p in parts]
    for site in range(len(parts)):
        while len(parts[site]) < min_size:
            donor = int(np.argmax([len(p) for p in parts]))
            need = min(min_size - len(parts[site]), len(parts[donor]) - min_size)
            parts[site] = np.concatenate([parts[site], parts[donor][:need]])
            parts[donor] = parts[donor][need:]
    return parts


def _quantity(n: int, num_sites: int, skew: float, min_size: int, rng) -> list[np.ndarray]:
    """Size skew: each site gets `min_size`, the rest is shared by log-normal weights; labels stay iid."""
    weights = rng.lognormal(0.0, skew, num_sites) if skew > 0 else np.ones(num_sites)
    shares = (n - min_size * num_sites) * weights / weights.sum()
    extra = np.floor(shares).astype(np.int64)
    # largest remainder: the images lost to rounding go to the sites that lost most
    leftover = n - min_size * num_sites - extra.sum()
    extra[np.argsort(extra - shares, kind="stable")[:leftover]] += 1
    sizes = min_size + extra
    return np.split(rng.permutation(n), np.cumsum(sizes)[:-1])


def val_count(num_items: int, val_fraction: float) -> int:
    """Images a site of `num_items` keeps for validation: the rounded share, at least 1 when a share is asked."""
    if num_items < 2 or val_fraction <= 0:
        return 0
    return min(num_items - 1, max(1, int(np.floor(num_items * val_fraction + 0.5))))


def split_train_val(num_items: int, val_fraction: float, *, seed: int, site: int) -> tuple[np.ndarray, np.ndarray]:
    """Random (train, val) index arrays of one site's partition; the same seed and site give the same split."""
    order = stream(seed, "validation split", site).permutation(num_items)
    k = val_count(num_items, val_fraction)
    return np.sort(order[k:]), np.sort(order[:k])
