"""The student copies in notebooks/students/ (made by ``python -m reprod.course.student_copies``).

- the committed copies are what the generator makes now from the solutions and the lessons;
- each has one TODO cell per item of its lesson's ``## Exercises`` list, and no solution code;
- pasting the solutions' answer cells into the TODO cells gives the solutions' code, whose
  committed check cells all say "right" (nbval runs the solutions and compares them);
- each runs whole with its TODO cells as they are (one fresh process for all; nbval does not
  collect them), and then every check says "not yet";
- a lesson whose exercise list does not match its solutions stops the generator with a clear error.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import nbformat
import pytest

from reprod.course import student_copies as sc
from reprod.course.notebooks import NOTEBOOK_DIR, lesson_id, tool_path

SOLUTIONS = sc.all_solutions()
COPIES = [sc.student_path(p) for p in SOLUTIONS]


def _ids(paths):
    return [p.name for p in paths]


def _todo_numbers(nb) -> list[int]:
    return [int(re.match(r"# TODO \(exercise (\d+)\)", c.source)[1]) for c in nb.cells
            if c.cell_type == "code" and "TODO" in c.source]


def _lesson_item_count(lesson) -> int:
    """Exercises of a lesson counted as tests/test_notebooks.py counts them."""
    md = "\n".join(c.source for c in nbformat.read(lesson, as_version=4).cells
                   if c.cell_type == "markdown")
    section = md.split("## Exercises", 1)[1].split("## References", 1)[0]
    return len(re.findall(r"^\d+\. ", section, flags=re.M))


def test_every_solutions_notebook_has_a_copy():
    assert SOLUTIONS, "no solutions notebooks found"
    have = {p.name for p in sc.STUDENTS_DIR.glob("*.ipynb")}
    want = {p.name for p in COPIES}
    assert have == want, (f"missing {sorted(want - have)}, orphans {sorted(have - want)}: "
                          "regenerate with `make students`")


def _require(copy):
    assert copy.exists(), f"{copy.name} is missing: regenerate with `make students`"


def test_copies_are_fresh():
    bad = sc.stale_copies()
    assert not bad, ("stale student copies (regenerate with `make students`): "
                     + "; ".join(f"{p.name}: {why}" for p, why in bad.items()))


def test_generation_is_deterministic():
    assert all(sc.render(p) == sc.render(p) for p in SOLUTIONS[:2])


@pytest.mark.parametrize("solutions", SOLUTIONS, ids=_ids(COPIES))
def test_one_todo_per_exercise_and_no_solution_code(solutions):
    copy = sc.student_path(solutions)
    _require(copy)
    nb = nbformat.read(copy, as_version=4)
    n = _lesson_item_count(sc.lesson_path(solutions))
    assert _todo_numbers(nb) == list(range(1, n + 1)), f"{copy.name}: want TODOs 1..{n}"
    for k in range(1, n + 1):     # heading, given cells, TODO cell, check cell
        i = next(i for i, c in enumerate(nb.cells)
                 if c.cell_type == "markdown" and c.source.startswith(f"## Exercise {k}: "))
        j = i + 1
        while nb.cells[j].source.startswith(f"{sc.GIVEN_PREFIX}{k})"):
            j += 1
        assert nb.cells[j].source.startswith(f"# TODO (exercise {k})")
        assert nb.cells[j + 1].source.startswith(f"{sc.CHECK_PREFIX}{k})")
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    for source in sc.exercise_code_cells(solutions):
        assert source.strip() not in code, f"{copy.name} contains solution code:\n{source}"
    md = nbformat.read(solutions, as_version=4).cells
    first = next(i for i, c in enumerate(md) if c.source.startswith("## Exercise 1:"))
    prose = [p for c in md[first:] if c.cell_type == "markdown"
             for p in re.split(r"\n\s*\n", c.source) if not p.startswith("## Exercise")]
    text = "\n".join(c.source for c in nb.cells)
    leaked = [p for p in prose if p.strip() and p.strip() in text]
    assert not leaked, f"{copy.name} contains the solutions' explanations: {leaked}"
    assert all(c.execution_count is None and not c.outputs for c in nb.cells
               if c.cell_type == "code")
    assert nb.metadata[sc.META_KEY] == {
        "student_copy_of": f"notebooks/solutions/{solutions.name}"}
    assert copy.name in nb.cells[0].source and "colab-badge.svg" in nb.cells[0].source


def test_clean_under_nbstripout():
    copies = [str(p) for p in COPIES if p.exists()]
    out = subprocess.run([tool_path("nbstripout"), "--keep-output", "--keep-count", "--verify",
                          *copies], capture_output=True, text=True)
    assert out.returncode == 0, f"copies change under nbstripout: {out.stdout}{out.stderr}"


def _code(cells) -> list[str]:
    return [c.source for c in cells if c.cell_type == "code"
            and not c.source.startswith("# NBVAL_SKIP")]


@pytest.mark.parametrize("solutions", SOLUTIONS, ids=_ids(COPIES))
def test_pasting_the_answers_gives_the_solutions_code(solutions):
    copy = sc.student_path(solutions)
    _require(copy)
    nb = nbformat.read(solutions, as_version=4)
    parts = {p.number: p for p in sc.exercise_parts(nb, solutions.name, lesson_id(solutions))}
    pasted = []
    for source in _code(nbformat.read(copy, as_version=4).cells):
        if source.startswith(sc.TODO_PREFIX):
            k = int(re.match(r"# TODO \(exercise (\d+)\)", source)[1])
            pasted += [c.source for c in parts[k].answer]
        else:
            pasted.append(source)
    assert pasted == _code(nb.cells), f"{copy.name} with the answers pasted in is not the solutions"


@pytest.mark.parametrize("solutions", SOLUTIONS, ids=_ids(COPIES))
def test_every_check_says_right_in_the_solutions(solutions):
    nb = nbformat.read(solutions, as_version=4)
    for part in sc.exercise_parts(nb, solutions.name, lesson_id(solutions)):
        assert "# NBVAL_CHECK_OUTPUT" in part.check.source   # nbval compares the verdict
        text = "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "")
                       for o in part.check.outputs)
        lesson = lesson_id(solutions)
        assert text.startswith(f"Exercise {part.number} of lesson {lesson}: right."), (
            f"{solutions.name}, exercise {part.number}: {text!r} (re-run `make notebooks`)")


def test_every_check_says_not_yet_with_the_todos_in_place():
    # One fresh Python process runs every copy whole, TODO cells as they are (comments only),
    # each in its own namespace, at this session's thread count: the imports load once.
    copies = [c for c in COPIES if c.exists()]
    threads = int(os.environ.get("OMP_NUM_THREADS", "2"))
    done = sc.run_copies(copies, threads=threads)
    assert done.returncode == 0, done.stderr[-3000:]
    print(done.stdout)
    for copy, solutions in zip(copies, SOLUTIONS, strict=True):
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith(f"{copy.name}: ")]
        n = _lesson_item_count(sc.lesson_path(solutions))
        verdicts = [ln for ln in lines if ": Exercise " in ln]
        assert len(verdicts) == n, f"{copy.name}: want {n} verdicts, got {verdicts}"
        assert all(": not yet. " in v for v in verdicts), verdicts
        assert lines[-1].startswith(f"{copy.name}: ran in "), lines


def test_mismatched_exercise_lists_fail_loudly(tmp_path, monkeypatch):
    sol = SOLUTIONS[0]
    (tmp_path / "solutions").mkdir()
    shutil.copy(sol, tmp_path / "solutions" / sol.name)
    lesson = nbformat.read(sc.lesson_path(sol), as_version=4)
    for cell in lesson.cells:     # drop the last item of the exercise list
        if "## Exercises" in cell.source:
            items = re.findall(r"^\d+\. ", cell.source, flags=re.M)
            head, _, tail = cell.source.rpartition(f"\n{len(items)}. ")
            cell.source = head + "\n\n" + tail.split("\n\n", 1)[1]
    nbformat.write(lesson, tmp_path / sc.lesson_path(sol).name)
    monkeypatch.setattr(sc, "NOTEBOOK_DIR", tmp_path)
    monkeypatch.setattr(sc, "SOLUTIONS_DIR", tmp_path / "solutions")
    monkeypatch.setattr(sc, "STUDENTS_DIR", tmp_path / "students")
    with pytest.raises(sc.StructureError, match=r"sections but the '## Exercises' list"):
        sc.build(tmp_path / "solutions" / sol.name)
    assert sc.main([]) == 2


def test_exercise_statements_come_from_the_lesson():
    items = sc.lesson_exercises(NOTEBOOK_DIR / "00_dgss_problem.ipynb")
    assert sorted(items) == [1, 2, 3]
    assert items[1].startswith("**Domain randomisation.** Train the same model")
    assert "\n   " not in items[1]                    # continuation lines dedented
    assert not any("Solutions:" in s for s in items.values())
