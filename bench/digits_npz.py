"""A small real dataset in MedMNIST's .npz format, from data shipped with scikit-learn (nothing downloaded).

    pip install scikit-learn
    python bench/digits_npz.py bench/out/digits.npz
    python bench/utility.py --data bench/out/digits.npz --sites 4

scikit-learn's handwritten digits (UCI ML digits: 1,797 scans of 8 x 8 pixels,
grey levels 0-16, written by 43 people): no MedMNIST file can be fetched on a
machine without internet, and these are real scans bundled in a package. Each
is scaled to 32 x 32 (bilinear) and 0-255, then split train / val / test
70 / 10 / 20, stratified by class, with a fixed seed. There are no lesion boxes,
so the model learns the class head only and IoU is n/a.
"""

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedclinic.data import ImageSet, save_file  # noqa: E402

SIZE = 32
SHARES = {"train": 0.7, "val": 0.1, "test": 0.2}


def main() -> None:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("this bench needs scikit-learn's bundled digits: pip install scikit-learn")
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "bench" / "out" / "digits.npz")
    digits = load_digits()
    scans = torch.from_numpy(digits.images / 16.0).float()[:, None]
    scans = F.interpolate(scans, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    images = (scans.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(0)
    parts: dict[str, list[np.ndarray]] = {split: [] for split in SHARES}
    for label in np.unique(labels):  # stratified: every split has every class in proportion
        index = rng.permutation(np.flatnonzero(labels == label))
        cuts = np.cumsum([round(share * len(index)) for share in SHARES.values()])[:-1]
        for split, chunk in zip(SHARES, np.split(index, cuts)):
            parts[split].append(chunk)
    names = tuple(str(d) for d in range(10))
    splits = {split: ImageSet(images[np.sort(np.concatenate(i))], labels[np.sort(np.concatenate(i))], None, names)
              for split, i in parts.items()}
    save_file(out, **splits)
    print(f"{out}: " + ", ".join(f"{split} {len(s)}" for split, s in splits.items()) + f" scans of {SIZE} x {SIZE}")


if __name__ == "__main__":
    main()
