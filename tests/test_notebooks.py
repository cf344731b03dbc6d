"""Static checks of the lesson notebooks (nbval executes them; this checks how they are kept).

- committed outputs are fresh: made by ``python -m reprod.course.notebooks --in-place`` with the
  current ``lessons`` code and ToyWorld version (the notebook metadata records both), run top to
  bottom;
- files are clean under ``nbstripout --keep-output --keep-count``;
- every lesson follows the notebook pattern: Colab badge and guarded install cell, goals, time,
  a summary, exercises with a solutions notebook, references;
- nbval markers follow the policy: checked cells exist, progress bars and timings never in them;
- CI-only check cells (asserts without output) are collapsed, and no other cell is.
"""

from __future__ import annotations

import re
import subprocess

import nbformat
import pytest

from lessons.utils import module_files
from reprod.course.notebooks import (
    CHECK_TAG,
    LESSON_GLOB,
    NOTEBOOK_DIR,
    all_notebooks,
    collapse_check_cells,
    imported_modules,
    is_check_cell,
    stale_reasons,
    tool_path,
)

LESSONS = sorted(NOTEBOOK_DIR.glob(LESSON_GLOB))
ALL = all_notebooks()


def _ids(paths):
    return [str(p.relative_to(NOTEBOOK_DIR)) for p in paths]


def _text(nb, kind: str) -> str:
    return "\n".join(c.source for c in nb.cells if c.cell_type == kind)


def test_there_are_notebooks():
    assert LESSONS, "no lesson notebooks found"
    assert len(set(ALL)) == len(ALL)


@pytest.mark.parametrize("path", ALL, ids=_ids(ALL))
def test_outputs_are_fresh(path):
    reasons = stale_reasons(path)
    assert not reasons, (f"{path.name} is stale: {'; '.join(reasons)}. Regenerate with "
                         "`make notebooks` (python -m reprod.course.notebooks --in-place "
                         f"{path.name})")


@pytest.mark.parametrize("path", ALL, ids=_ids(ALL))
def test_clean_under_nbstripout(path):
    exe = tool_path("nbstripout")
    out = subprocess.run([exe, "--keep-output", "--keep-count", "--verify", str(path)],
                         capture_output=True, text=True)
    assert out.returncode == 0, f"{path.name} changes under nbstripout: {out.stdout}{out.stderr}"


@pytest.mark.parametrize("path", LESSONS, ids=_ids(LESSONS))
def test_lesson_follows_the_notebook_pattern(path):
    nb = nbformat.read(path, as_version=4)
    md = _text(nb, "markdown")
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    assert "colab-badge.svg" in nb.cells[0].source and path.name in nb.cells[0].source
    for heading in ("**Goals.**", "**Prerequisites.**", "**Time.**", "## Summary",
                    "## Exercises", "## References"):
        assert heading in md, f"{path.name} lacks {heading!r}"
    exercises = md.split("## Exercises", 1)[1].split("## References", 1)[0]
    n = len(re.findall(r"^\d+\. ", exercises, flags=re.M))
    assert 2 <= n <= 4, f"{path.name} has {n} exercises (want two to four)"
    solution = NOTEBOOK_DIR / "solutions" / path.name.replace(".ipynb", "_solutions.ipynb")
    assert solution.exists(), f"missing {solution.relative_to(NOTEBOOK_DIR)}"
    assert f"solutions/{solution.name}" in exercises


@pytest.mark.parametrize("path", ALL, ids=_ids(ALL))
def test_nbval_policy(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    colab = [c for c in code if "google.colab" in c.source]
    assert colab and all("# NBVAL_SKIP" in c.source for c in colab), \
        "the Colab install cell must exist, be guarded and be skipped by nbval"
    assert all("'google.colab' in sys.modules" in c.source.replace('"', "'") for c in colab)
    checked = [c for c in code if "# NBVAL_CHECK_OUTPUT" in c.source]
    if path in LESSONS:
        assert checked, f"{path.name} checks no output: mark deterministic cells"
    for c in checked:
        assert "train(" not in c.source, "training results are never output-checked"
        for out in c.get("outputs", []):
            assert out.get("name") != "stderr", "a checked cell must not write to stderr"
    for c in code:
        for out in c.get("outputs", []):
            assert out.output_type != "error", f"{path.name} was committed with an error"
            text = out.get("text", "")
            assert "it/s]" not in text, f"{path.name} has a progress bar in its outputs"


@pytest.mark.parametrize("path", ALL, ids=_ids(ALL))
def test_notebooks_import_only_existing_lessons_modules(path):
    nb = nbformat.read(path, as_version=4)
    for m in imported_modules(nb):
        assert module_files(m), m           # a module file, or a subpackage (lessons.exercises)


@pytest.mark.parametrize("path", ALL, ids=_ids(ALL))
def test_check_cells_are_collapsed_out_of_the_reading_path(path):
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        hidden = cell.metadata.get("jupyter", {}).get("source_hidden", False)
        tagged = CHECK_TAG in cell.metadata.get("tags", [])
        assert hidden == tagged == is_check_cell(cell), (
            f"{path.name}, code cell {i}: collapsed {hidden}, tagged {tagged}, a check cell "
            f"{is_check_cell(cell)} (`make notebooks` collapses exactly the check cells)")


def test_what_counts_as_a_check_cell():
    new = nbformat.v4.new_code_cell
    assert is_check_cell(new("x = 1\nassert x > 0, x"))
    assert is_check_cell(new("for k in range(3):\n    assert k < 3"))
    assert not is_check_cell(new("x = 1"))                          # no assert
    assert not is_check_cell(new("assert True\nprint(1)"))          # shows something
    assert not is_check_cell(new("!ls\nassert True"))               # a magic: not Python
    shown = new("assert True")
    shown.outputs = [nbformat.v4.new_output("stream", text="x")]
    assert not is_check_cell(shown)
    nb = nbformat.v4.new_notebook(cells=[new("assert 1"), new("y = 2")])
    nb.cells[1].metadata["tags"] = [CHECK_TAG]                      # a stale tag is removed
    assert collapse_check_cells(nb) == 1
    assert nb.cells[0].metadata == {"tags": [CHECK_TAG], "jupyter": {"source_hidden": True}}
    assert nb.cells[1].metadata == {}


def test_a_solutions_notebook_depends_on_its_own_lessons_checks_only():
    """Editing one lesson's exercise checks makes that lesson's solutions stale, not the
    others': the digest holds lessons.exercises' package and the checks the notebook calls."""
    from reprod.course.notebooks import exercise_lessons, expected_metadata

    new = nbformat.v4.new_code_cell
    nb = nbformat.v4.new_notebook(cells=[
        new("from lessons.exercises import check_exercise"),
        new('check_exercise("03a", 2, globals())'),
        new("check_exercise('02', 1, globals())")])
    assert exercise_lessons(nb) == ["02", "03a"]
    mods = expected_metadata(nb)["lessons_modules"]
    assert {"exercises/__init__", "exercises/lesson02", "exercises/lesson03a"} <= set(mods)
    assert not any(m.startswith("exercises/lesson0") and m[-2:] not in ("02", "3a")
                   for m in mods), mods
    assert "benchmark" in mods                  # lesson03a's checks import lessons.benchmark
    nb.cells[1].source = 'check_exercise("99", 1, globals())'
    with pytest.raises(ValueError, match="lesson99.py does not exist"):
        expected_metadata(nb)
