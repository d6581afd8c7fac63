"""ImageSet: images, labels and optional lesion boxes, as plain NumPy arrays."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ImageSet:
    # uint8, N x C x H x W (channels first, as the model takes them)
    images: np.ndarray
    # int64, N, class index in [0, len(class_names))
    labels: np.ndarray
    # float32, N x 4 (cx, cy, w, h in [0, 1]); a NaN row means no lesion; None means the data has no boxes
    boxes: np.ndarray | None
    # name of each class, e.g. ("healthy", "benign", "malignant")
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    def subset(self, index: np.ndarray) -> "ImageSet":
        boxes = None if self.boxes is None else self.boxes[index]
        return ImageSet(self.images[index], self.labels[index], boxes, self.class_names)

    def label_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)


def union(parts: list[ImageSet]) -> ImageSet:
    """The images of every part in one set, in order; boxes only when every part has them."""
    boxes = None if any(p.boxes is None for p in parts) else np.concatenate([p.boxes for p in parts])
    return ImageSet(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]), boxes,
                    parts[0].class_names)
