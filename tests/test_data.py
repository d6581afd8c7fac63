"""Tests of fedclinic.data: synthetic hospital sites, partitioners, .npz files, and the public calls.

    .venv/bin/pytest tests/test_data.py -q
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

from fedclinic.config import DataConfig
from fedclinic.data import (
    CLASS_NAMES,
    DataError,
    load_file,
    load_site_file,
    partition,
    server_test_set,
    site_data,
    site_sizes,
)
from fedclinic.data.synthetic import (
    ScannerProfile,
    draw_scenes,
    generate_site,
    generate_test_set,
    render,
    site_profile,
)

SMALL = DataConfig(site_size=200, test_size=300)


# --- synthetic sites -------------------------------------------------------------------------


def test_same_seed_gives_identical_sites_and_another_seed_does_not():
    # Prepare
    cfg, other = SMALL, dataclasses.replace(SMALL, seed=1)
    # Execute
    first, again, different = generate_site(cfg, 1), generate_site(cfg, 1), generate_site(other, 1)
    # Assert
    assert np.array_equal(first.images, again.images)
    assert np.array_equal(first.labels, again.labels)
    assert np.array_equal(first.boxes, again.boxes, equal_nan=True)
    assert len(first) != len(different) or not np.array_equal(first.images, different.images)


def test_a_site_is_the_same_whether_or_not_other_sites_were_generated_first():
    # Prepare
    alone = generate_site(SMALL, 2)
    # Execute
    for site in (0, 1, 3):
        generate_site(SMALL, site)
    after_others = generate_site(SMALL, 2)
    # Assert
    assert np.array_equal(alone.images, after_others.images)
    assert np.array_equal(alone.labels, after_others.labels)


def test_sites_hold_grey_uint8_scans_of_the_configured_size():
    # Prepare
    cfg = dataclasses.replace(SMALL, image_size=48)
    # Execute
    scans = generate_site(cfg, 0)
    # Assert
    assert scans.images.dtype == np.uint8
    assert scans.images.shape == (len(scans), 1, 48, 48)
    assert scans.labels.dtype == np.int64 and set(np.unique(scans.labels)) <= {0, 1, 2}
    assert scans.class_names == CLASS_NAMES == ("healthy", "benign", "malignant")
    assert scans.images.std() > 10  # an actual picture, not a flat grey


def test_sites_have_different_scanners():
    # Execute
    profiles = [site_profile(SMALL, site) for site in range(4)]
    # Assert
    assert len({p.noise for p in profiles}) == 4 and len({p.blur for p in profiles}) == 4


def _class_shares(cfg: DataConfig, sites: int) -> np.ndarray:
    return np.array([scans.label_counts() / len(scans) for scans in (generate_site(cfg, s) for s in range(sites))])


def test_small_label_alpha_gives_sites_dominated_by_one_class():
    # Prepare
    cfg = dataclasses.replace(SMALL, site_size=300, quantity_skew=0.0, label_alpha=0.1)
    # Execute
    shares = _class_shares(cfg, 12)
    # Assert: with alpha = 0.1 a typical site is mostly one class (the expected dominant share is ~0.9)
    assert shares.max(axis=1).mean() > 0.75


def test_large_label_alpha_gives_every_site_near_even_classes():
    # Prepare
    cfg = dataclasses.replace(SMALL, site_size=300, quantity_skew=0.0, label_alpha=100.0)
    # Execute
    shares = _class_shares(cfg, 12)
    # Assert
    assert np.abs(shares - 1 / 3).max() < 0.15


def test_quantity_skew_spreads_site_sizes_and_zero_skew_gives_equal_sizes():
    # Execute
    equal = site_sizes(dataclasses.replace(SMALL, quantity_skew=0.0), 8)
    skewed = site_sizes(dataclasses.replace(SMALL, quantity_skew=1.0), 8)
    # Assert
    assert len(set(equal)) == 1
    assert max(skewed) > 2 * min(skewed)


def test_no_synthetic_site_falls_below_the_default_batch_size():
    # Prepare: a skew this large would give some sites a handful of scans
    cfg = dataclasses.replace(SMALL, quantity_skew=3.0)
    # Execute
    sizes = site_sizes(cfg, 20)
    # Assert
    assert min(sizes) >= 64


def test_healthy_scans_have_nan_boxes_and_lesions_have_boxes_inside_the_image():
    # Execute
    scans = generate_test_set(SMALL)
    # Assert
    healthy = scans.labels == 0
    assert np.isnan(scans.boxes[healthy]).all()
    boxes = scans.boxes[~healthy]
    assert np.isfinite(boxes).all()
    cx, cy, w, h = boxes.T
    assert (w > 0).all() and (h > 0).all()
    assert (cx - w / 2 >= 0).all() and (cx + w / 2 <= 1).all()
    assert (cy - h / 2 >= 0).all() and (cy + h / 2 <= 1).all()


def test_boxes_tightly_enclose_what_the_lesion_changed():
    # Prepare: a perfect scanner (no noise, no blur, linear display), so pixels change only where a lesion is
    rng = np.random.default_rng(0)
    labels = np.repeat([1, 2], 100)
    scenes = draw_scenes(rng, labels, 32)
    perfect = ScannerProfile(contrast=1.0, brightness=0.0, gamma=1.0, noise=0.0, blur=0.0)
    # Execute
    with_lesions, boxes = render(scenes, perfect, np.random.default_rng(1))
    without, _ = render(scenes, perfect, np.random.default_rng(1), with_lesions=False)
    # Assert
    change = np.abs(with_lesions.astype(int) - without.astype(int))[:, 0]
    cx, cy, w, h = boxes.T * 32  # in pixels
    x0, x1 = np.round(cx - w / 2).astype(int), np.round(cx + w / 2).astype(int)
    y0, y1 = np.round(cy - h / 2).astype(int), np.round(cy + h / 2).astype(int)
    for i in range(len(labels)):
        inside = change[i, y0[i] : y1[i], x0[i] : x1[i]]
        # nearly all the change lies in the box (the soft outline spills a little beyond it) ...
        assert inside.sum() >= 0.8 * change[i].sum()
        # ... and every side of the box touches changed pixels: no slack around the lesion
        visible = inside > 2
        assert visible[0].any() and visible[-1].any() and visible[:, 0].any() and visible[:, -1].any()


def test_server_test_set_is_balanced_and_not_a_site():
    # Execute
    test = server_test_set(SMALL)
    # Assert
    assert len(test) == SMALL.test_size
    assert list(test.label_counts()) == [100, 100, 100]
    assert not np.array_equal(test.images[:10], generate_site(SMALL, 0).images[:10])


def test_mean_brightness_alone_does_not_tell_the_classes_apart():
    # Prepare
    scans = generate_test_set(dataclasses.replace(SMALL, test_size=1500))
    brightness = scans.images.reshape(len(scans), -1).mean(axis=1)
    # Execute: the best a nearest-class-mean rule on brightness can do
    means = np.array([brightness[scans.labels == c].mean() for c in range(3)])
    guess = np.abs(brightness[:, None] - means[None, :]).argmin(axis=1)
    # Assert: close to chance (1/3)
    assert (guess == scans.labels).mean() < 0.45


# --- public calls on synthetic data ---------------------------------------------------------


def test_site_sizes_match_the_training_sets_site_data_returns():
    # Execute
    sizes = site_sizes(SMALL, 4)
    data = [site_data(SMALL, site, 4) for site in range(4)]
    # Assert
    assert sizes == [len(train) for train, _ in data]
    for train, val in data:
        assert abs(len(val) - SMALL.val_fraction * (len(train) + len(val))) <= 0.5


def test_site_data_refuses_a_site_that_does_not_exist():
    # Execute / Assert
    with pytest.raises(ValueError, match="site 5 does not exist; sites are numbered 0 to 4"):
        site_data(SMALL, 5, 5)


# --- partitioners ----------------------------------------------------------------------------

BALANCED = np.repeat(np.arange(3), 1000)


@pytest.mark.parametrize("method", ["iid", "dirichlet", "quantity"])
def test_partitions_are_disjoint_complete_and_leave_no_site_empty(method):
    # Execute
    parts = partition(BALANCED, 10, method=method, alpha=0.1, skew=2.0, seed=0)
    # Assert
    assert len(parts) == 10
    assert all(len(p) > 0 for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(BALANCED)))


@pytest.mark.parametrize("method", ["iid", "dirichlet", "quantity"])
def test_partitions_depend_on_the_seed_only(method):
    # Execute
    first = partition(BALANCED, 5, method=method, seed=3)
    again = partition(BALANCED, 5, method=method, seed=3)
    other = partition(BALANCED, 5, method=method, seed=4)
    # Assert
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def _shares(parts: list[np.ndarray]) -> np.ndarray:
    return np.array([np.bincount(BALANCED[p], minlength=3) / len(p) for p in parts])


def test_dirichlet_with_small_alpha_gives_each_site_few_classes():
    # Execute
    skewed = _shares(partition(BALANCED, 10, method="dirichlet", alpha=0.1, seed=0))
    even = _shares(partition(BALANCED, 10, method="dirichlet", alpha=1000.0, seed=0))
    # Assert
    assert skewed.max(axis=1).mean() > 0.75
    assert np.abs(even - 1 / 3).max() < 0.05


def test_iid_gives_equal_sizes_and_near_even_classes():
    # Execute
    parts = partition(BALANCED, 10, method="iid", seed=0)
    # Assert
    assert {len(p) for p in parts} == {300}
    assert np.abs(_shares(parts) - 1 / 3).max() < 0.1


def test_quantity_skew_spreads_sizes_and_zero_skew_does_not():
    # Execute
    equal = partition(BALANCED, 7, method="quantity", skew=0.0, seed=0)
    skewed = partition(BALANCED, 7, method="quantity", skew=1.5, seed=0)
    # Assert
    assert max(len(p) for p in equal) - min(len(p) for p in equal) <= 1
    assert max(len(p) for p in skewed) > 4 * min(len(p) for p in skewed)


def test_dirichlet_never_leaves_a_site_tiny_even_with_extreme_skew():
    # Execute: 50 sites, alpha 0.01: most draws would leave many sites empty
    parts = partition(BALANCED, 50, method="dirichlet", alpha=0.01, seed=0)
    # Assert: at least 10 images each (3000 images are enough for that)
    assert min(len(p) for p in parts) >= 10
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(BALANCED)))


def test_partition_refuses_more_sites_than_images_and_unknown_methods():
    # Execute / Assert
    with pytest.raises(ValueError, match="cannot divide 5 images among 6 sites"):
        partition(np.zeros(5, dtype=int), 6, method="iid")
    with pytest.raises(ValueError, match="unknown partition method 'random'"):
        partition(BALANCED, 2, method="random")


# --- .npz files ------------------------------------------------------------------------------


def _good_arrays(n=(40, 12, 15), shape=(16, 16), channels=None, boxes=False) -> dict[str, np.ndarray]:
    """A valid MedMNIST-style file; each image's first two pixels encode its index in its split."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n):
        images = rng.integers(0, 256, (count, *shape) + ((channels,) if channels else ()), dtype=np.uint8)
        flat = images.reshape(count, -1)
        flat[:, 0], flat[:, 1] = np.arange(count) // 256, np.arange(count) % 256
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = (np.arange(count) % 3).astype(np.uint8)[:, None]
        if boxes:
            b = np.tile(np.float32([0.5, 0.5, 0.2, 0.3]), (count, 1))
            b[arrays[f"{split}_labels"][:, 0] == 0] = np.nan
            arrays[f"{split}_boxes"] = b
    return arrays


def _write(tmp_path, arrays, name="data.npz"):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def test_a_grey_file_loads_as_channels_first_imagesets(tmp_path):
    # Prepare
    arrays = _good_arrays()
    path = _write(tmp_path, arrays)
    # Execute
    splits = load_file(path)
    # Assert
    assert set(splits) == {"train", "val", "test"}
    train = splits["train"]
    assert train.images.shape == (40, 1, 16, 16) and train.images.dtype == np.uint8
    assert train.labels.shape == (40,) and train.labels.dtype == np.int64
    assert np.array_equal(train.images[:, 0], arrays["train_images"])
    assert train.class_names == ("class 0", "class 1", "class 2")
    assert train.boxes is None


def test_an_rgb_file_keeps_its_pixels_when_moved_to_channels_first(tmp_path):
    # Prepare
    arrays = _good_arrays(channels=3)
    path = _write(tmp_path, arrays)
    # Execute
    val = load_file(path)["val"]
    # Assert
    assert val.images.shape == (12, 3, 16, 16)
    assert np.array_equal(val.images, arrays["val_images"].transpose(0, 3, 1, 2))


def test_class_names_and_boxes_are_read_when_present(tmp_path):
    # Prepare
    arrays = _good_arrays(boxes=True) | {"class_names": np.array(["normal", "pneumonia", "covid", "other"])}
    path = _write(tmp_path, arrays)
    # Execute
    test = load_file(path)["test"]
    # Assert
    assert test.class_names == ("normal", "pneumonia", "covid", "other")
    assert test.boxes.dtype == np.float32
    assert np.isnan(test.boxes[test.labels == 0]).all() and np.isfinite(test.boxes[test.labels > 0]).all()


def _drop(key):
    return lambda a: {k: v for k, v in a.items() if k != key}


def _set(key, value_of):
    return lambda a: a | {key: value_of(a)}


def _boxes_with(row, value):
    def edit(a):
        boxes = _good_arrays(boxes=True)["train_boxes"].copy()
        boxes[row] = value
        return a | {"train_boxes": boxes}

    return edit


BAD_FILES = {
    "missing key": (_drop("val_labels"), "key 'val_labels' is missing"),
    "images of wrong ndim": (
        _set("train_images", lambda a: a["train_images"][:, 0]),
        "key 'train_images' has shape (40, 16)",
    ),
    "images with 5 channels": (
        _set("train_images", lambda a: np.zeros((40, 16, 16, 5), np.uint8)),
        "key 'train_images' has shape (40, 16, 16, 5)",
    ),
    "float images": (
        _set("train_images", lambda a: a["train_images"] / 255),
        "key 'train_images' has dtype float64, expected uint8",
    ),
    "float labels": (
        _set("train_labels", lambda a: a["train_labels"] * 1.0),
        "key 'train_labels' has dtype float64, expected integer",
    ),
    "labels N x 2": (_set("val_labels", lambda a: np.zeros((12, 2), int)), "key 'val_labels' has shape (12, 2)"),
    "negative label": (_set("val_labels", lambda a: np.full(12, -1)), "key 'val_labels' holds label -1"),
    "label beyond class_names": (
        _set("class_names", lambda a: np.array(["a", "b"])),
        "key 'train_labels' holds label 2, but 'class_names' names only 2 classes",
    ),
    "class_names not strings": (_set("class_names", lambda a: np.arange(3)), "key 'class_names' has shape (3,)"),
    "class_names pickled": (
        _set("class_names", lambda a: np.array(["a", 1], dtype=object)),
        "key 'class_names' cannot be read",
    ),
    "box partly NaN": (_boxes_with(3, [0.5, np.nan, 0.1, 0.1]), "key 'train_boxes' row 3 is partly NaN"),
    "box infinite": (_boxes_with(4, [0.5, np.inf, 0.1, 0.1]), "key 'train_boxes' row 4 holds an infinite value"),
    "box outside the image": (_boxes_with(5, [0.5, 1.2, 0.1, 0.1]), "key 'train_boxes' row 5 is [0.5, 1.2"),
    "box count mismatch": (
        _set("train_boxes", lambda a: np.full((39, 4), 0.5, np.float32)),
        "key 'train_boxes' has 39 boxes but 'train_images' has 40 images",
    ),
    "boxes N x 3": (_set("train_boxes", lambda a: np.full((40, 3), 0.5)), "key 'train_boxes' has shape (40, 3)"),
    "empty split": (
        lambda a: a | {"val_images": np.zeros((0, 16, 16), np.uint8), "val_labels": np.zeros(0, np.uint8)},
        "key 'val_images' holds no images",
    ),
    "label count mismatch": (
        _set("train_labels", lambda a: np.zeros(41, np.uint8)),
        "key 'train_labels' has 41 entries but 'train_images' has 40 images",
    ),
    "image shapes differ between splits": (
        _set("test_images", lambda a: np.zeros((15, 20, 20), np.uint8)),
        "key 'test_images' holds images of 1 x 20 x 20 (C x H x W) but 'train_images' holds 1 x 16 x 16",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_bad_file_is_refused_with_a_message_naming_the_file_and_the_key(tmp_path, case):
    # Prepare
    edit, expected = BAD_FILES[case]
    path = _write(tmp_path, edit(_good_arrays()), name=f"{case.replace(' ', '_')}.npz")
    # Execute
    with pytest.raises(DataError) as refused:
        load_file(path)
    # Assert
    message = str(refused.value)
    assert message.startswith(f"{path}: ")
    assert expected in message


def test_files_that_are_not_npz_archives_are_refused(tmp_path):
    # Prepare
    text = tmp_path / "notes.npz"
    text.write_text("patient,label\n1,0\n")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(_write(tmp_path, _good_arrays()).read_bytes()[:500])
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    # Execute / Assert
    with pytest.raises(DataError, match="missing.npz: no such file"):
        load_file(tmp_path / "missing.npz")
    with pytest.raises(DataError, match="notes.npz: is not an .npz archive"):
        load_file(text)
    with pytest.raises(DataError, match="truncated.npz: is not a readable .npz archive"):
        load_file(truncated)
    with pytest.raises(DataError, match="single.npy: holds a single array"):
        load_file(single)
    with pytest.raises(DataError, match="is a directory"):
        load_file(tmp_path)


def test_a_loaded_file_is_cached_until_it_changes(tmp_path):
    # Prepare
    path = _write(tmp_path, _good_arrays())
    first = load_file(path)
    # Execute
    again = load_file(path)
    np.savez(path, **_good_arrays(n=(30, 12, 15)))
    os.utime(path, ns=(os.stat(path).st_mtime_ns + 10**9,) * 2)  # a clearly newer modification time
    changed = load_file(path)
    # Assert
    assert again["train"] is first["train"]
    assert len(changed["train"]) == 30


def test_a_site_file_needs_no_test_split_but_a_half_test_split_is_refused(tmp_path):
    # Prepare
    arrays = _good_arrays()
    without_test = _write(tmp_path, {k: v for k, v in arrays.items() if not k.startswith("test")}, "site.npz")
    half_test = _write(tmp_path, {k: v for k, v in arrays.items() if k != "test_labels"}, "half.npz")
    # Execute
    train, val = load_site_file(without_test)
    # Assert
    assert (len(train), len(val)) == (40, 12)
    with pytest.raises(DataError, match="key 'test_labels' is missing"):
        load_site_file(half_test)
    with pytest.raises(DataError, match="key 'test_images' is missing"):
        load_file(without_test)


# --- public calls on a file ------------------------------------------------------------------


def _index_of(images: np.ndarray) -> np.ndarray:
    """The index each test image carries in its first two pixels."""
    flat = images.reshape(len(images), -1).astype(int)
    return flat[:, 0] * 256 + flat[:, 1]


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "quantity"])
def test_site_data_from_a_file_divides_its_train_split_among_the_sites(tmp_path, partitioner):
    # Prepare
    arrays = _good_arrays(n=(600, 12, 15))
    cfg = DataConfig(path=str(_write(tmp_path, arrays)), partitioner=partitioner, label_alpha=0.5)
    # Execute
    data = [site_data(cfg, site, 4) for site in range(4)]
    # Assert: every train image lands at exactly one site, in its train or its val split
    seen = np.concatenate([_index_of(part.images) for train, val in data for part in (train, val)])
    assert np.array_equal(np.sort(seen), np.arange(600))
    assert site_sizes(cfg, 4) == [len(train) for train, _ in data]
    for train, val in data:
        assert len(val) > 0
        assert np.array_equal(train.labels, arrays["train_labels"][_index_of(train.images), 0])


def test_server_test_set_from_a_file_is_its_test_split(tmp_path):
    # Prepare
    arrays = _good_arrays()
    cfg = DataConfig(path=str(_write(tmp_path, arrays)))
    # Execute
    test = server_test_set(cfg)
    # Assert
    assert np.array_equal(test.images[:, 0], arrays["test_images"])
    assert np.array_equal(test.labels, arrays["test_labels"][:, 0])


def test_site_data_from_a_bad_file_names_the_file(tmp_path):
    # Prepare
    cfg = DataConfig(path=str(tmp_path / "absent.npz"))
    # Execute / Assert
    with pytest.raises(DataError, match="absent.npz: no such file"):
        site_data(cfg, 0, 2)
