"""Test-session settings shared by the unit tests and nbval (it must sit at the repository root
so it also applies to notebooks/). Kernels started by nbval inherit this environment."""

from __future__ import annotations

import os

import pytest

# Student copies (notebooks/students/, made by `make students`) have no outputs to compare and
# their checks say "not yet": tests/test_student_copies.py runs them whole instead of nbval.
collect_ignore_glob = ["notebooks/students/*"]


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


@pytest.fixture
def in_world_2():
    """Run a test in ToyWorld 2, the world the toy foundation models are pretrained and gated
    in, whatever the course's default (``lessons.toyworld.COURSE_WORLD``)."""
    from lessons import toyworld as tw

    with tw.in_world("2.0"):
        yield


# The whole CI run must stay well under 30 minutes: fail the session when it passes this budget.
SESSION_BUDGET_S = 20 * 60


def pytest_addoption(parser):
    parser.addoption("--session-budget", type=float, default=SESSION_BUDGET_S,
                     help="fail the run when it takes longer than this many seconds (0: off)")


def pytest_sessionstart(session):
    import time

    session.config._dgss_start = time.perf_counter()


def pytest_sessionfinish(session, exitstatus):
    import time

    if hasattr(session.config, "workerinput"):   # xdist workers: the controller decides
        return
    budget = session.config.getoption("--session-budget")
    elapsed = time.perf_counter() - session.config._dgss_start
    if budget and elapsed > budget:
        print(f"\nDURATIONS CHECK FAILED: the test session took {elapsed:.0f} s, over its "
              f"budget of {budget:.0f} s (CI must stay well under 30 minutes)")
        session.exitstatus = 1
