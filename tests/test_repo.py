"""Repository hygiene: style, file sizes, and the README telling the truth about commands."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from reprod.course.notebooks import tool_path

ROOT = Path(__file__).resolve().parent.parent
MAX_FILE_BYTES = 1 << 20   # 1 MiB: notebooks keep small figures; weights have their own budget


def _tracked() -> list[Path]:
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    return [ROOT / p for p in out.stdout.decode().split("\0") if p]


def test_ruff_is_clean():
    ruff = tool_path("ruff")
    out = subprocess.run([ruff, "check", "--no-cache", str(ROOT)], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr


MAX_WEIGHTS_BYTES = 50 << 20  # all toy weights together (DESIGN section 4)
WEIGHTS = ROOT / "lessons" / "weights"


def _is_weights(p: Path) -> bool:
    """Toy foundation models (weights/) and lesson checkpoints (weights/checkpoints/<lesson>/)."""
    return p.suffix == ".safetensors" and (p.parent == WEIGHTS
                                           or p.parent.parent == WEIGHTS / "checkpoints")


def test_no_large_files():
    big = [(p.relative_to(ROOT), p.stat().st_size) for p in _tracked()
           if p.exists() and p.stat().st_size > MAX_FILE_BYTES and not _is_weights(p)]
    assert not big, f"files over {MAX_FILE_BYTES} bytes: {big}"


def test_toy_weights_stay_within_their_budget():
    weights = [p for p in _tracked() if _is_weights(p)]
    total = sum(p.stat().st_size for p in weights if p.exists())
    assert total <= MAX_WEIGHTS_BYTES, f"toy weights take {total / 2**20:.1f} MiB"
    models = [p for p in weights if p.parent == WEIGHTS]
    assert all(p.with_suffix(".md").exists() for p in models), "every toy model has a card"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"^make test\b", readme, re.M)
    assert command, "the README must give `make test` as the test command"
    assert re.search(r"^make test$", ci, re.M), ".ci/run must call exactly the README's command"


def test_readme_lists_every_notebook():
    readme = (ROOT / "README.md").read_text()
    for nb in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        assert f"notebooks/{nb.name}" in readme, f"README lesson table lacks {nb.name}"
        solution = f"notebooks/solutions/{nb.stem}_solutions.ipynb"
        assert solution in readme, f"README lesson table lacks {solution}"
