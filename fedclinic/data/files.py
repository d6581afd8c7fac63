"""MedMNIST-style .npz files: checked completely before anything is used.

    splits = load_file("pneumonia.npz")      # {"train": ImageSet, "val": ImageSet, "test": ImageSet}
    train, val = load_site_file("site3.npz")  # a deployed site's own file
    test = load_test_file("server.npz")       # a deployed server's own held-out file
    save_file("site3.npz", train=train, val=val)

The keys of a file:

- `train_images`, `val_images`, `test_images`: uint8, N x H x W (grey) or
  N x H x W x C with C = 1 or 3; every split has the same image shape;
- `train_labels`, `val_labels`, `test_labels`: integer class indices, N or N x 1;
- optional `train_boxes`, `val_boxes`, `test_boxes`: float, N x 4 lesion boxes
  (cx, cy, w, h in [0, 1] of the image size); a whole-NaN row means no lesion;
- optional `class_names`: a 1-D array of strings. Without it the classes are
  "class 0", "class 1", ... up to the largest label in the file.

A site file (`load_site_file`) needs only the train and val splits; a test
split there is optional and, when present, checked but not returned. A site
file should carry `class_names`: otherwise a site that happens to lack the
highest class would count fewer classes than the others.

Anything wrong raises DataError, one sentence naming the file, the key, what
was expected and what was found. Loaded files are cached by path and
modification time, so simulated sites that share one file read it once.
"""

from __future__ import annotations

import zipfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from fedclinic.data.imageset import ImageSet

SPLITS = ("train", "val", "test")

# errors numpy and zipfile raise on a file that is not a readable .npz archive
_READ_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile)


class DataError(ValueError):
    """A data file fedclinic cannot use; the message names the file, the key and what is wrong."""


def load_file(path: str | Path) -> dict[str, ImageSet]:
    """The train, val and test splits of a MedMNIST-style .npz file, as ImageSets (N x C x H x W uint8)."""
    return dict(_load(path, required=SPLITS))


def load_site_file(path: str | Path) -> tuple[ImageSet, ImageSet]:
    """(train, val) of one site's own .npz file; its test_* keys may be absent."""
    splits = _load(path, required=("train", "val"))
    return splits["train"], splits["val"]


def load_test_file(path: str | Path) -> ImageSet:
    """The test split of a .npz file: the server's own held-out file in deployment (other keys optional)."""
    return _load(path, required=("test",))["test"]


def save_file(path: str | Path, **splits: ImageSet) -> Path:
    """Write ImageSets as a MedMNIST-style .npz file that the loaders above accept, e.g. save_file(p, train=.., val=..)."""
    arrays: dict[str, np.ndarray] = {}
    for split, images in splits.items():
        pixels = images.images.transpose(0, 2, 3, 1)  # N x H x W x C, as MedMNIST stores them
        arrays[f"{split}_images"] = pixels[..., 0] if pixels.shape[-1] == 1 else pixels
        arrays[f"{split}_labels"] = images.labels
        if images.boxes is not None:
            arrays[f"{split}_boxes"] = images.boxes
        arrays["class_names"] = np.array(images.class_names)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def _load(path: str | Path, *, required: tuple[str, ...]) -> dict[str, ImageSet]:
    shown = str(path)
    try:
        stat = Path(path).stat()
    except FileNotFoundError:
        raise DataError(f"{shown}: no such file; expected a MedMNIST-style .npz file") from None
    except OSError as err:
        raise DataError(f"{shown}: cannot be read ({err.strerror})") from None
    if not Path(path).is_file():
        kind = "a directory" if Path(path).is_dir() else "not a regular file"
        raise DataError(f"{shown}: is {kind}, expected a MedMNIST-style .npz file")
    return _load_cached(shown, str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size, required)


# ImageSets are shared between callers: treat their arrays as read-only
@lru_cache(maxsize=4)
def _load_cached(shown: str, resolved: str, mtime_ns: int, size: int, required: tuple[str, ...]) -> dict[str, ImageSet]:
    arrays, keys = _read_arrays(shown, resolved)
    # an optional split counts as present as soon as one of its keys is
    present = [s for s in SPLITS if s in required or f"{s}_images" in arrays or f"{s}_labels" in arrays]
    for split in present:
        for key in (f"{split}_images", f"{split}_labels"):
            if key not in arrays:
                found = ", ".join(sorted(keys)) or "no keys"
                raise DataError(
                    f"{shown}: key {key!r} is missing; expected {_required_keys(required)} (found {found})"
                )
    parts = {split: _check_split(shown, arrays, split) for split in present}

    first = present[0]
    for split in present[1:]:
        if parts[split][0].shape[1:] != parts[first][0].shape[1:]:
            raise DataError(
                f"{shown}: key '{split}_images' holds images of {_shape(parts[split][0])} (C x H x W) "
                f"but '{first}_images' holds {_shape(parts[first][0])}; every split needs the same image shape"
            )
    class_names = _class_names(shown, arrays, parts)
    return {split: ImageSet(images, labels, boxes, class_names) for split, (images, labels, boxes) in parts.items()}


def _read_arrays(shown: str, resolved: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """The arrays of the archive's fedclinic keys (read without unpickling anything), and all its keys."""
    try:
        with open(resolved, "rb") as file:
            start = file.read(6)
    except OSError as err:
        raise DataError(f"{shown}: cannot be read ({err.strerror})") from None
    # look at the magic bytes first: numpy's own errors for other files talk about pickles
    if start.startswith(b"\x93NUMPY"):
        raise DataError(
            f"{shown}: holds a single array (.npy), expected an .npz archive with keys {_required_keys(SPLITS)}"
        )
    if not start.startswith(b"PK"):
        raise DataError(f"{shown}: is not an .npz archive (a zip file of arrays with keys {_required_keys(SPLITS)})")
    try:
        archive = np.load(resolved, allow_pickle=False)
    except _READ_ERRORS as err:
        raise DataError(f"{shown}: is not a readable .npz archive ({err})") from None
    wanted = {f"{split}_{part}" for split in SPLITS for part in ("images", "labels", "boxes")} | {"class_names"}
    arrays = {}
    with archive:
        for key in archive.files:
            if key not in wanted:
                continue
            try:
                arrays[key] = archive[key]
            except _READ_ERRORS as err:
                raise DataError(f"{shown}: key {key!r} cannot be read as a plain array ({err})") from None
        return arrays, list(archive.files)


def _check_split(
    shown: str, arrays: dict[str, np.ndarray], split: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(images N x C x H x W uint8, labels int64, boxes float32 or None) of one split, or DataError."""
    images_key, labels_key, boxes_key = f"{split}_images", f"{split}_labels", f"{split}_boxes"
    images, labels = arrays[images_key], arrays[labels_key]

    def refuse(message: str) -> DataError:
        return DataError(f"{shown}: {message}")

    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3)):
        raise refuse(
            f"key '{images_key}' has shape {images.shape}, expected N x H x W or N x H x W x C with C = 1 or 3"
        )
    if images.dtype != np.uint8:
        raise refuse(f"key '{images_key}' has dtype {images.dtype}, expected uint8 pixels (0-255)")
    if len(images) == 0:
        raise refuse(f"key '{images_key}' holds no images; the {split} split must not be empty")
    if labels.ndim not in (1, 2) or (labels.ndim == 2 and labels.shape[1] != 1):
        raise refuse(f"key '{labels_key}' has shape {labels.shape}, expected N or N x 1 class indices")
    if not np.issubdtype(labels.dtype, np.integer):
        raise refuse(f"key '{labels_key}' has dtype {labels.dtype}, expected integer class indices")
    if len(labels) != len(images):
        raise refuse(f"key '{labels_key}' has {len(labels)} entries but '{images_key}' has {len(images)} images")
    labels = labels.reshape(-1).astype(np.int64)
    if labels.min() < 0:
        raise refuse(f"key '{labels_key}' holds label {labels.min()}, expected class indices >= 0")

    boxes = arrays.get(boxes_key)
    if boxes is not None:
        boxes = _check_boxes(refuse, boxes, boxes_key, images_key, len(images))
    if images.ndim == 3:
        images = images[:, None]
    else:
        images = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    return images, labels, boxes


def _check_boxes(refuse, boxes: np.ndarray, boxes_key: str, images_key: str, n: int) -> np.ndarray:
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise refuse(f"key '{boxes_key}' has shape {boxes.shape}, expected N x 4 boxes (cx, cy, w, h)")
    if not np.issubdtype(boxes.dtype, np.floating):
        raise refuse(
            f"key '{boxes_key}' has dtype {boxes.dtype}, expected floats (NaN rows for scans without a lesion)"
        )
    if len(boxes) != n:
        raise refuse(f"key '{boxes_key}' has {len(boxes)} boxes but '{images_key}' has {n} images")
    nan = np.isnan(boxes)
    partial = np.flatnonzero(nan.any(1) & ~nan.all(1))
    if len(partial):
        raise refuse(
            f"key '{boxes_key}' row {partial[0]} is partly NaN, expected 4 numbers or a whole NaN row (no lesion)"
        )
    if np.isinf(boxes).any():
        row = np.flatnonzero(np.isinf(boxes).any(1))[0]
        raise refuse(f"key '{boxes_key}' row {row} holds an infinite value, expected cx, cy, w, h in [0, 1]")
    outside = np.flatnonzero(((boxes < 0) | (boxes > 1)).any(1))
    if len(outside):
        row = outside[0]
        found = [round(float(v), 4) for v in boxes[row]]
        raise refuse(f"key '{boxes_key}' row {row} is {found}, expected cx, cy, w, h in [0, 1]")
    return boxes.astype(np.float32)


def _class_names(shown: str, arrays: dict[str, np.ndarray], parts: dict) -> tuple[str, ...]:
    """The `class_names` key, or "class 0", ... up to the largest label; every label must name a class."""
    largest = {split: int(labels.max()) for split, (_, labels, _) in parts.items()}
    if "class_names" not in arrays:
        return tuple(f"class {i}" for i in range(max(largest.values()) + 1))
    names = arrays["class_names"]
    if names.ndim != 1 or names.dtype.kind not in "US" or len(names) == 0:
        raise DataError(
            f"{shown}: key 'class_names' has shape {names.shape} and dtype {names.dtype}, "
            "expected a 1-D array of strings"
        )
    names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist())
    for split, label in largest.items():
        if label >= len(names):
            raise DataError(
                f"{shown}: key '{split}_labels' holds label {label}, but 'class_names' names only "
                f"{len(names)} classes (labels 0 to {len(names) - 1})"
            )
    return names


def _required_keys(splits: tuple[str, ...]) -> str:
    return ", ".join(f"{split}_{part}" for split in splits for part in ("images", "labels"))


def _shape(images: np.ndarray) -> str:
    return " x ".join(str(d) for d in images.shape[1:])
