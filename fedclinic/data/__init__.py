"""Where a site's images come from: synthetic hospital sites or a user's .npz file.

    from fedclinic.data import site_data, site_sizes, server_test_set
    train, val = site_data(config.data, site=2, num_sites=5)

The rest of fedclinic calls only these three functions (and load_site_file in
deployment, where each site reads its own file). With `data.path = ""` every
site is generated from `data.seed` (fedclinic.data.synthetic); otherwise the
file's train split is divided among the sites by `data.partitioner`
(fedclinic.data.partition) and its test split is the server's test set.
Every site then keeps `data.val-fraction` of its share for validation.

Results are cached per process, since a simulated site trains several rounds;
the returned arrays are shared, so treat them as read-only.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from fedclinic.config import DataConfig
from fedclinic.data import synthetic
from fedclinic.data.files import DataError, load_file, load_site_file, load_test_file, save_file
from fedclinic.data.imageset import ImageSet, union
from fedclinic.data.partition import partition, split_train_val, val_count
from fedclinic.data.synthetic import CLASS_NAMES

__all__ = [
    "CLASS_NAMES",
    "DataError",
    "ImageSet",
    "load_file",
    "load_site_file",
    "load_test_file",
    "save_file",
    "partition",
    "server_test_set",
    "site_data",
    "site_sizes",
    "union",
]


def site_sizes(cfg: DataConfig, num_sites: int) -> list[int]:
    """The number of training images of each site (after its validation split), without generating any."""
    _check_site(0, num_sites)
    if not cfg.path:
        totals = [synthetic.site_total_size(cfg, site) for site in range(num_sites)]
    else:
        totals = [len(part) for part in _file_partition(cfg, num_sites)]
    return [n - val_count(n, cfg.val_fraction) for n in totals]


def site_data(cfg: DataConfig, site: int, num_sites: int) -> tuple[ImageSet, ImageSet]:
    """(train, val) of `site` out of `num_sites`: generated, or its partition of the file's train split."""
    _check_site(site, num_sites)
    if not cfg.path:
        return _synthetic_site(cfg, site)
    share = load_file(cfg.path)["train"].subset(_file_partition(cfg, num_sites)[site])
    return _split(share, cfg, site)


def server_test_set(cfg: DataConfig) -> ImageSet:
    """The server's held-out test set: its own file, the data file's test split, or generated (balanced)."""
    if cfg.test_path:
        return load_test_file(cfg.test_path)
    if not cfg.path:
        return _synthetic_test_set(cfg)
    return load_file(cfg.path)["test"]


def _check_site(site: int, num_sites: int) -> None:
    if num_sites < 1:
        raise ValueError(f"the federation needs at least one site, got num_sites={num_sites}")
    if not 0 <= site < num_sites:
        raise ValueError(f"site {site} does not exist; sites are numbered 0 to {num_sites - 1}")


def _split(share: ImageSet, cfg: DataConfig, site: int) -> tuple[ImageSet, ImageSet]:
    train, val = split_train_val(len(share), cfg.val_fraction, seed=cfg.seed, site=site)
    return share.subset(train), share.subset(val)


# a site's partition does not depend on num_sites, so the key leaves it out
@lru_cache(maxsize=32)
def _synthetic_site(cfg: DataConfig, site: int) -> tuple[ImageSet, ImageSet]:
    return _split(synthetic.generate_site(cfg, site), cfg, site)


@lru_cache(maxsize=4)
def _synthetic_test_set(cfg: DataConfig) -> ImageSet:
    return synthetic.generate_test_set(cfg)


def _file_partition(cfg: DataConfig, num_sites: int) -> list[np.ndarray]:
    """Index arrays into the file's train split, one per site (cheap: labels only)."""
    labels = load_file(cfg.path)["train"].labels
    return partition(
        labels, num_sites, method=cfg.partitioner, alpha=cfg.label_alpha, skew=cfg.quantity_skew, seed=cfg.seed
    )
