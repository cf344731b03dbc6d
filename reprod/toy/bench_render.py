"""Benchmark: ToyWorld images rendered per second on one core, per domain.

    python -m reprod.toy.bench_render [--n 400] [--size 64 128]

Prints one line per domain and the mean. The target (issue "Foundation") is at least 1,000
images/s at 64x128 on one core, so rendering never bottlenecks CPU training. Rendering is numpy
only; torch threads do not matter, but BLAS/OpenMP threads are pinned to one for honesty.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

from lessons import toyworld as tw
from lessons.utils import hardware

__all__ = [
    "images_per_second", "main",
]


def images_per_second(domain: str, n: int, size: tuple[int, int]) -> float:
    ds = tw.ToyWorld(domain, "train", size, length=n, seed=123)
    ds[0]  # warm the caches (noise tiles, grids)
    start = time.perf_counter()
    for i in range(n):
        ds[i]
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400, help="images per domain")
    ap.add_argument("--size", type=int, nargs=2, default=list(tw.DEFAULT_SIZE), metavar=("H", "W"))
    args = ap.parse_args(argv)
    size = tuple(args.size)
    print(f"ToyWorld {tw.TOYWORLD_VERSION}, {size[0]}x{size[1]}, one core, "
          f"{hardware('cpu')}, python {platform.python_version()}")
    rates = {d: images_per_second(d, args.n, size) for d in tw.DOMAINS}
    for d, r in rates.items():
        print(f"{d:>12s} {r:8.0f} images/s")
    mean = sum(rates.values()) / len(rates)
    print(f"{'mean':>12s} {mean:8.0f} images/s   slowest {min(rates.values()):.0f}  "
          f"(target >= 1000: {'met' if min(rates.values()) >= 1000 else 'NOT met'})")


if __name__ == "__main__":
    main()
