"""Student copies of the lesson notebooks: the solutions notebooks with the solutions taken out.

    python -m reprod.course.student_copies          # (re)write notebooks/students/ (make students)
    python -m reprod.course.student_copies --check  # exit 1 if a copy is stale or missing
    python -m reprod.course.student_copies --execute    # run each copy up to its first TODO, timed

For every ``notebooks/solutions/NN_<name>_solutions.ipynb`` this writes
``notebooks/students/NN_<name>_student.ipynb``, made of

- a header (title, Colab badge for the student path, links to the lesson and its solutions) and
  the solutions' guarded Colab install cell;
- the solutions' setup cells (everything between the install cell and the first
  ``## Exercise N: title`` heading), unchanged;
- per exercise: its ``## Exercise N: title`` heading with the statement of item N of the lesson's
  ``## Exercises`` list, then one code cell ``# TODO (exercise N): your code here`` that raises
  ``NotImplementedError``. The solution cells and their explanations are dropped.

Copies carry no outputs or execution counts, keep the solutions' kernelspec and record their
source in ``metadata.dgss_lessons.student_copy_of``. They are a pure function of the solutions
and the lesson notebooks, so running twice gives byte-identical files and ``--check`` can tell
when a copy is stale. A notebook that does not fit this structure stops the run with an error
naming the file and what is missing. Copies are not executed by nbval (the root ``conftest.py``
ignores ``notebooks/students/``); ``--execute`` and ``tests/test_student_copies.py`` run their
setup in a fresh kernel instead.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import nbformat

from reprod.course.notebooks import META_KEY, NOTEBOOK_DIR, ROOT, kernel_env, run_in_kernel

__all__ = [
    "BADGE_RE",
    "EXERCISES_RE",
    "EXERCISE_RE",
    "ITEM_RE",
    "RELATIVE_LINK_RE",
    "SOLUTIONS_DIR",
    "SOLUTIONS_SUFFIX",
    "STUDENTS_DIR",
    "STUDENT_SUFFIX",
    "TITLE_RE",
    "TODO_PREFIX",
    "Exercise",
    "StructureError",
    "all_solutions",
    "build",
    "execute_until_todo",
    "exercise_code_cells",
    "lesson_exercises",
    "lesson_path",
    "main",
    "render",
    "run_setups",
    "setup_source",
    "split_solutions",
    "stale_copies",
    "student_path",
    "todo_cell_index",
    "write_all",
]

SOLUTIONS_DIR = NOTEBOOK_DIR / "solutions"
STUDENTS_DIR = NOTEBOOK_DIR / "students"
SOLUTIONS_SUFFIX = "_solutions.ipynb"
STUDENT_SUFFIX = "_student.ipynb"

TITLE_RE = re.compile(r"^# (?P<num>\d\d) · Solutions: (?P<title>.+)$", re.M)
BADGE_RE = re.compile(r"\[!\[Open In Colab\]\([^)]*\)\]\((?P<url>[^)]*)\)")
EXERCISE_RE = re.compile(r"^## Exercise (?P<num>\d+): (?P<title>.+)$", re.M)
EXERCISES_RE = re.compile(r"^## Exercises[ \t]*$", re.M)
ITEM_RE = re.compile(r"^(?P<num>\d+)\. (?P<text>.*)$")
RELATIVE_LINK_RE = re.compile(r"\]\((?!https?:|mailto:|#|/)(?P<target>[^)\s]+)\)")
TODO_PREFIX = "# TODO (exercise "


class StructureError(ValueError):
    """A solutions or lesson notebook does not have the structure student copies are made from."""


@dataclass(frozen=True)
class Exercise:
    number: int
    title: str          # from the solutions' ``## Exercise N: title`` heading
    statement: str      # item N of the lesson's ``## Exercises`` list, without "N. "


def student_path(solutions: Path) -> Path:
    """``notebooks/solutions/NN_x_solutions.ipynb`` -> ``notebooks/students/NN_x_student.ipynb``."""
    return STUDENTS_DIR / solutions.name.replace(SOLUTIONS_SUFFIX, STUDENT_SUFFIX)


def lesson_path(solutions: Path) -> Path:
    """``notebooks/solutions/NN_x_solutions.ipynb`` -> ``notebooks/NN_x.ipynb``."""
    return NOTEBOOK_DIR / solutions.name.replace(SOLUTIONS_SUFFIX, ".ipynb")


def all_solutions() -> list[Path]:
    """Every solutions notebook, in lesson order."""
    return sorted(SOLUTIONS_DIR.glob(f"[0-9][0-9]_*{SOLUTIONS_SUFFIX}"))


def _rel(path: Path) -> str:
    """The path relative to the repository root (as-is when outside it)."""
    path = path.resolve()
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


def lesson_exercises(lesson: Path) -> dict[int, str]:
    """The numbered items of a lesson's ``## Exercises`` section: number -> statement.

    An item starts with ``N. `` at the start of a line and runs over the indented (or blank)
    lines after it; the list ends at the first unindented line that starts no item (the
    "Solutions: ..." line) or at the next heading. Relative links are rewritten for
    ``notebooks/students/``.
    """
    nb = nbformat.read(lesson, as_version=4)
    sections = [EXERCISES_RE.split(c.source, maxsplit=1)[1] for c in nb.cells
                if c.cell_type == "markdown" and EXERCISES_RE.search(c.source)]
    if len(sections) != 1:
        raise StructureError(f"{_rel(lesson)}: want one '## Exercises' heading, "
                             f"found {len(sections)}")
    items: list[tuple[int, list[str]]] = []
    for line in sections[0].splitlines():
        if line.startswith("#"):
            break
        if m := ITEM_RE.match(line):
            items.append((int(m["num"]), [m["text"]]))
        elif items and (not line.strip() or line[0] in " \t"):
            items[-1][1].append(line)
        elif items:
            break
    numbers = [n for n, _ in items]
    if numbers != list(range(1, len(items) + 1)):
        raise StructureError(f"{_rel(lesson)}: the '## Exercises' list is numbered {numbers}, "
                             f"want 1..{len(items)}")
    out = {}
    for n, (first, *rest) in items:
        text = (first + "\n" + textwrap.dedent("\n".join(rest))).strip()
        out[n] = RELATIVE_LINK_RE.sub(lambda m: f"](../{m['target']})", text)
    return out


def split_solutions(
    nb: nbformat.NotebookNode, name: str,
) -> tuple[nbformat.NotebookNode, nbformat.NotebookNode, list[nbformat.NotebookNode],
           list[tuple[int, str]]]:
    """(header cell, install cell, setup cells, [(number, title)] of the exercise headings)."""
    cells = nb.cells
    if len(cells) < 2 or cells[0].cell_type != "markdown" or not TITLE_RE.search(cells[0].source):
        raise StructureError(f"{name}: cell 0 must be the '# NN · Solutions: title' header")
    install = cells[1]
    if install.cell_type != "code" or "google.colab" not in install.source \
            or "# NBVAL_SKIP" not in install.source:
        raise StructureError(f"{name}: cell 1 must be the Colab install cell (# NBVAL_SKIP)")
    first = next((i for i, c in enumerate(cells)
                  if c.cell_type == "markdown" and EXERCISE_RE.search(c.source)), None)
    if first is None:
        raise StructureError(f"{name}: no '## Exercise N: title' heading")
    setup = list(cells[2:first])
    before = cells[first].source[:EXERCISE_RE.search(cells[first].source).start()].strip()
    if before:   # prose that precedes the first heading in its cell belongs to the setup
        setup.append(nbformat.v4.new_markdown_cell(before))
    headings = [(int(m["num"]), m["title"].strip()) for c in cells[first:]
                if c.cell_type == "markdown" for m in EXERCISE_RE.finditer(c.source)]
    numbers = [n for n, _ in headings]
    if numbers != list(range(1, len(headings) + 1)):
        raise StructureError(f"{name}: exercise headings are numbered {numbers}, "
                             f"want 1..{len(headings)}")
    return cells[0], install, setup, headings


def exercise_code_cells(solutions: Path) -> list[str]:
    """The sources of the solutions' code cells from the first exercise heading on."""
    nb = nbformat.read(solutions, as_version=4)
    first = next(i for i, c in enumerate(nb.cells)
                 if c.cell_type == "markdown" and EXERCISE_RE.search(c.source))
    return [c.source for c in nb.cells[first:] if c.cell_type == "code"]


def build(solutions: Path) -> nbformat.NotebookNode:
    """The student copy of one solutions notebook (raises StructureError if it does not fit)."""
    name = _rel(solutions)
    lesson = lesson_path(solutions)
    if not lesson.exists():
        raise StructureError(f"{name}: no lesson notebook {_rel(lesson)}")
    nb = nbformat.read(solutions, as_version=4)
    header, install, setup, headings = split_solutions(nb, name)
    statements = lesson_exercises(lesson)
    if len(statements) != len(headings):
        raise StructureError(
            f"{name} has {len(headings)} '## Exercise N' sections but the '## Exercises' list "
            f"of {_rel(lesson)} has {len(statements)} items: make them match")
    exercises = [Exercise(n, title, statements[n]) for n, title in headings]

    title = TITLE_RE.search(header.source)
    badge = BADGE_RE.search(header.source)
    if badge is None or not badge["url"].endswith(f"notebooks/solutions/{solutions.name}"):
        raise StructureError(f"{name}: the header's Colab badge must point at {name}")
    target = student_path(solutions)
    url = badge["url"].removesuffix(f"solutions/{solutions.name}") + f"students/{target.name}"
    stem = lesson.stem
    intro = (f"# {title['num']} · Student copy: {title['title']}\n\n"
             f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
             f"({url})\n\n"
             f"Exercises of [{stem}](../{lesson.name}) with the solutions removed; fill in each "
             f"TODO cell.\nThe solutions are in "
             f"[../solutions/{solutions.name}](../solutions/{solutions.name}).")

    cells = [nbformat.v4.new_markdown_cell(intro), _copy(install), *map(_copy, setup)]
    for ex in exercises:
        cells.append(nbformat.v4.new_markdown_cell(
            f"## Exercise {ex.number}: {ex.title}\n\n{ex.statement}"))
        cells.append(nbformat.v4.new_code_cell(
            f"{TODO_PREFIX}{ex.number}): your code here\n"
            f'raise NotImplementedError("exercise {ex.number}")'))
    for i, cell in enumerate(cells):
        cell.id = str(i)                          # deterministic ids, like the lessons'
    metadata = {META_KEY: {"student_copy_of": name}}
    if "kernelspec" in nb.metadata:
        metadata["kernelspec"] = nb.metadata.kernelspec
    out = nbformat.v4.new_notebook(cells=cells, metadata=metadata)
    nbformat.validate(out)
    return out


def _copy(cell: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A setup cell as it is in the solutions, minus outputs and execution count."""
    metadata = dict(cell.metadata)
    if cell.cell_type == "code":
        return nbformat.v4.new_code_cell(cell.source, metadata=metadata)
    if cell.cell_type == "markdown":
        return nbformat.v4.new_markdown_cell(cell.source, metadata=metadata)
    return nbformat.v4.new_raw_cell(cell.source, metadata=metadata)


def render(solutions: Path) -> str:
    """The exact file text of a student copy (what nbformat.write produces, newline-terminated)."""
    text = nbformat.writes(build(solutions))
    return text if text.endswith("\n") else text + "\n"


def write_all(solutions: list[Path] | None = None) -> list[Path]:
    """Write the student copies (default: of every solutions notebook); the paths written."""
    written = []
    for sol in solutions or all_solutions():
        target = student_path(sol)
        target.parent.mkdir(parents=True, exist_ok=True)
        text = render(sol)
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            with open(target, "w", encoding="utf-8", newline="\n") as f:
                f.write(text)
        written.append(target)
    return written


def stale_copies() -> dict[Path, str]:
    """Committed copies that differ from what would be generated, missing ones and orphans."""
    bad: dict[Path, str] = {}
    expected = set()
    for sol in all_solutions():
        target = student_path(sol)
        expected.add(target)
        if not target.exists():
            bad[target] = "missing"
        elif target.read_text(encoding="utf-8") != render(sol):
            bad[target] = f"differs from what {_rel(sol)} gives"
    for orphan in sorted(set(STUDENTS_DIR.glob("*.ipynb")) - expected):
        bad[orphan] = "has no solutions notebook"
    return bad


def todo_cell_index(nb: nbformat.NotebookNode) -> int:
    """Index of the first TODO cell (the end of the part a student copy runs unchanged)."""
    for i, c in enumerate(nb.cells):
        if c.cell_type == "code" and c.source.startswith(TODO_PREFIX):
            return i
    raise StructureError("no TODO cell")


def setup_source(path: Path) -> str:
    """The Python of a student copy's cells before its first TODO, ``# NBVAL_SKIP`` cells (the
    Colab install) left out: what :func:`run_setups` executes."""
    nb = nbformat.read(path, as_version=4)
    return "\n\n".join(c.source for c in nb.cells[:todo_cell_index(nb)]
                        if c.cell_type == "code" and not c.source.startswith("# NBVAL_SKIP"))


_RUN_SETUPS = """
import os, sys, time
from pathlib import Path
from reprod.course.student_copies import setup_source
for arg in sys.argv[1:]:
    path = Path(arg)
    os.chdir(path.parent)
    start = time.perf_counter()
    exec(compile(setup_source(path), str(path), "exec"), {"__name__": "__main__"})
    print(f"{path.name}: {time.perf_counter() - start:.1f} s", flush=True)
"""


def run_setups(paths: list[Path], threads: int | None = None, timeout: int = 600
               ) -> subprocess.CompletedProcess:
    """Run the setup code of several copies one after another in ONE fresh Python process (each
    in its own namespace, from its folder): cheaper than a kernel per copy, since the imports the
    copies share load once. ``returncode`` 0 when every one ran."""
    env = kernel_env()
    env["MPLBACKEND"] = "Agg"
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return subprocess.run([sys.executable, "-c", _RUN_SETUPS, *map(str, paths)], env=env,
                          capture_output=True, text=True, timeout=timeout)


def execute_until_todo(path: Path, threads: int | None = None, timeout: int = 600) -> float:
    """Run a student copy's cells before its first TODO cell in a fresh kernel; seconds taken.

    The kernel gets ``reprod.notebooks.kernel_env()`` (CPU only, progress bars off, fixed hash
    seed, 2 threads as ``make notebooks`` uses); ``threads`` overrides the thread count (the
    tests pass the test session's). Raises ``nbclient`` 's ``CellExecutionError`` on an error.
    """
    nb = nbformat.read(path, as_version=4)
    nb.cells = nb.cells[:todo_cell_index(nb)]
    env = kernel_env()
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return run_in_kernel(nb, path.parent, timeout, env)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true",
                      help="exit 1 if a committed copy differs from what would be generated")
    mode.add_argument("--execute", action="store_true",
                      help="run each copy up to its first TODO cell in a fresh kernel, timed")
    args = ap.parse_args(argv)
    try:
        if args.check:
            bad = stale_copies()
            for p, why in bad.items():
                print(f"STALE {_rel(p)}: {why}")
            if bad:
                print("regenerate with `make students` (python -m reprod.course.student_copies)")
            else:
                print(f"{len(all_solutions())} student copies are fresh")
            return 1 if bad else 0
        if args.execute:
            total, missing = 0.0, 0
            for sol in all_solutions():
                path = student_path(sol)
                if not path.exists():
                    print(f"MISSING {_rel(path)}: run `make students` first")
                    missing += 1
                    continue
                print(f"executing {_rel(path)} up to its first TODO ...", flush=True)
                seconds = execute_until_todo(path)
                total += seconds
                print(f"  {seconds:.1f} s", flush=True)
            print(f"total {total:.1f} s")
            return 1 if missing else 0
        for p in write_all():
            print(f"wrote {_rel(p)}")
        return 0
    except StructureError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
