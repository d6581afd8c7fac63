"""How fast the synthetic hospital sites are generated: images per second, one run.

    .venv/bin/python bench/data_generation.py

Generates 50,000 scans of 32 x 32 twice: as one site (one scanner, the site's
own label mix) and as a server test set (balanced classes, one scanner per
scan), and prints images per second for each and the time of a default site.
"""

from __future__ import annotations

import time

from fedclinic.config import DataConfig
from fedclinic.data.synthetic import generate_site, generate_test_set

IMAGES = 50_000


def timed(make) -> tuple[float, int]:
    start = time.perf_counter()
    scans = make()
    return time.perf_counter() - start, len(scans)


def main() -> None:
    cfg = DataConfig(image_size=32, site_size=IMAGES, quantity_skew=0.0, test_size=IMAGES)
    generate_site(DataConfig(site_size=200), 0)  # warm-up: imports, caches
    for name, make in (("one site", lambda: generate_site(cfg, 0)), ("test set", lambda: generate_test_set(cfg))):
        seconds, n = timed(make)
        print(f"{name}: {n:,} images of 32 x 32 in {seconds:.2f} s = {n / seconds:,.0f} images/s")
    seconds, n = timed(lambda: generate_site(DataConfig(), 0))
    print(f"a default site ({n} images): {seconds * 1000:.0f} ms")


if __name__ == "__main__":
    main()
