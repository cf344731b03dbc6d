"""Test-session settings shared by the unit tests and nbval (it must sit at the repository root
so it also applies to notebooks/). Kernels started by nbval inherit this environment."""

from __future__ import annotations

import os


def pytest_configure(config):
    # Before any kernel starts: quiet progress bars, fixed hashing and threads.
    os.environ["TQDM_DISABLE"] = "1"
    os.environ["PYTHONHASHSEED"] = "0"
    os.environ["OMP_NUM_THREADS"] = "1"     # xdist runs 2 workers on 2 cores
    os.environ["MKL_NUM_THREADS"] = "1"
    os.environ["MPLBACKEND"] = "Agg"
    os.environ["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"


def pytest_collectstart(collector):
    # nbval compares text/plain of NBVAL_CHECK_OUTPUT cells only; never stderr (warnings move
    # with library versions) nor HTML/JS renderings.
    if getattr(collector, "fspath", None) and collector.fspath.ext == ".ipynb":
        collector.skip_compare += ("text/html", "application/javascript", "stderr")
