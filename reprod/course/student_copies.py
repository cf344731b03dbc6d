"""Student copies of the lesson notebooks: the solutions notebooks with the solutions taken out.

    python -m reprod.course.student_copies          # (re)write notebooks/students/ (make students)
    python -m reprod.course.student_copies --check  # exit 1 if a copy is stale or missing
    python -m reprod.course.student_copies --execute    # run each copy as given: every check

For every ``notebooks/solutions/NN_<name>_solutions.ipynb`` this writes
``notebooks/students/NN_<name>_student.ipynb``, made of

- a header (title, Colab badge for the student path, links to the lesson and its solutions) and
  the solutions' guarded Colab install cell;
- the solutions' setup cells (everything between the install cell and the first
  ``## Exercise N: title`` heading), unchanged;
- per exercise: its ``## Exercise N: title`` heading with the statement of item N of the lesson's
  ``## Exercises`` list; the solutions' *given* cells of that exercise (code cells whose first line
  is ``# Given (exercise N): ...``: the helpers the exercise builds on); one TODO cell
  ``# TODO (exercise N): your code here``, which lists the names the check reads
  (``lessons.exercises.needed_names``) and does nothing until filled in; and the solutions' *check*
  cell (first line ``# Check (exercise N)``), which calls ``check_exercise("NN", N, globals())``
  and says right or not yet. The answer cells and the explanations are dropped.

In the solutions an exercise's given cells come before its answer cells and its one check cell
after them, so pasting the answer cells into a copy's TODO cell gives the solutions' code cells
in order (a test checks it), and the solutions, which nbval runs, show every check passing.

Copies carry no outputs or execution counts, keep the solutions' kernelspec and record their
source in ``metadata.dgss_lessons.student_copy_of``. They are a pure function of the solutions
and the lesson notebooks, so running twice gives byte-identical files and ``--check`` can tell
when a copy is stale. A notebook that does not fit this structure stops the run with an error
naming the file and what is missing. Copies are not executed by nbval (the root ``conftest.py``
ignores ``notebooks/students/``); ``--execute`` and ``tests/test_student_copies.py`` run them
whole with the TODO cells as they are, where every check must say "not yet".
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

from lessons.exercises import needed_names
from reprod.course.notebooks import META_KEY, NOTEBOOK_DIR, ROOT, kernel_env, lesson_id

__all__ = [
    "BADGE_RE",
    "CHECK_PREFIX",
    "EXERCISES_RE",
    "EXERCISE_RE",
    "GIVEN_PREFIX",
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
    "exercise_code_cells",
    "exercise_parts",
    "lesson_exercises",
    "lesson_path",
    "main",
    "render",
    "run_copies",
    "split_solutions",
    "stale_copies",
    "student_path",
    "todo_source",
    "write_all",
]

SOLUTIONS_DIR = NOTEBOOK_DIR / "solutions"
STUDENTS_DIR = NOTEBOOK_DIR / "students"
SOLUTIONS_SUFFIX = "_solutions.ipynb"
STUDENT_SUFFIX = "_student.ipynb"

TITLE_RE = re.compile(r"^# (?P<num>\d\d[a-z]?) · Solutions: (?P<title>.+)$", re.M)
BADGE_RE = re.compile(r"\[!\[Open In Colab\]\([^)]*\)\]\((?P<url>[^)]*)\)")
EXERCISE_RE = re.compile(r"^## Exercise (?P<num>\d+): (?P<title>.+)$", re.M)
EXERCISES_RE = re.compile(r"^## Exercises[ \t]*$", re.M)
ITEM_RE = re.compile(r"^(?P<num>\d+)\. (?P<text>.*)$")
RELATIVE_LINK_RE = re.compile(r"\]\((?!https?:|mailto:|#|/)(?P<target>[^)\s]+)\)")
TODO_PREFIX = "# TODO (exercise "
GIVEN_PREFIX = "# Given (exercise "
CHECK_PREFIX = "# Check (exercise "


class StructureError(ValueError):
    """A solutions or lesson notebook does not have the structure student copies are made from."""


@dataclass(frozen=True)
class Exercise:
    number: int
    title: str          # from the solutions' ``## Exercise N: title`` heading
    statement: str      # item N of the lesson's ``## Exercises`` list, without "N. "


@dataclass(frozen=True)
class ExerciseParts:
    """The code cells of one exercise section of a solutions notebook, by role."""

    number: int
    given: list[nbformat.NotebookNode]      # ``# Given (exercise N)`` cells, before the answer
    answer: list[nbformat.NotebookNode]     # the solution: what the TODO cell stands for
    check: nbformat.NotebookNode            # the ``# Check (exercise N)`` cell, after the answer


def student_path(solutions: Path) -> Path:
    """``notebooks/solutions/NN_x_solutions.ipynb`` -> ``notebooks/students/NN_x_student.ipynb``."""
    return STUDENTS_DIR / solutions.name.replace(SOLUTIONS_SUFFIX, STUDENT_SUFFIX)


def lesson_path(solutions: Path) -> Path:
    """``notebooks/solutions/NN_x_solutions.ipynb`` -> ``notebooks/NN_x.ipynb``."""
    return NOTEBOOK_DIR / solutions.name.replace(SOLUTIONS_SUFFIX, ".ipynb")


def all_solutions() -> list[Path]:
    """Every solutions notebook, in lesson order."""
    return sorted(SOLUTIONS_DIR.glob(f"[0-9][0-9]*_*{SOLUTIONS_SUFFIX}"))


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


def exercise_parts(nb: nbformat.NotebookNode, name: str, lesson: str) -> list[ExerciseParts]:
    """Each exercise section's given, answer and check cells (a section runs from its
    ``## Exercise N`` heading to the next one); a StructureError names what does not fit."""
    sections: list[tuple[int, list[nbformat.NotebookNode]]] = []
    for cell in nb.cells:
        if cell.cell_type == "markdown" and (m := EXERCISE_RE.search(cell.source)):
            sections.append((int(m["num"]), []))
        elif sections and cell.cell_type == "code":
            sections[-1][1].append(cell)
    parts = []
    for n, cells in sections:
        where = f"{name}, exercise {n}"
        given = [c for c in cells if c.source.startswith(f"{GIVEN_PREFIX}{n})")]
        checks = [c for c in cells if c.source.startswith(f"{CHECK_PREFIX}{n})")]
        answer = [c for c in cells if c not in given and c not in checks]
        if cells[:len(given)] != given:
            raise StructureError(f"{where}: the '{GIVEN_PREFIX}{n})' cells must come first")
        if len(checks) != 1:
            raise StructureError(f"{where}: want one '{CHECK_PREFIX}{n})' cell, "
                                 f"found {len(checks)}")
        call = f'check_exercise("{lesson}", {n}, globals())'
        if call not in checks[0].source:
            raise StructureError(f"{where}: the check cell must call {call}")
        if not answer or cells.index(checks[0]) < cells.index(answer[-1]):
            raise StructureError(f"{where}: the check cell must come after the answer cells")
        parts.append(ExerciseParts(n, given, answer, checks[0]))
    return parts


def exercise_code_cells(solutions: Path) -> list[str]:
    """The sources of the solutions' answer cells (given and check cells left out)."""
    nb = nbformat.read(solutions, as_version=4)
    lesson = lesson_id(solutions)
    return [c.source for p in exercise_parts(nb, _rel(solutions), lesson) for c in p.answer]


def todo_source(lesson: str, number: int) -> str:
    """The TODO cell of an exercise: what to write, and the names its check reads."""
    needs = needed_names(lesson, number)
    lines = [f"{TODO_PREFIX}{number}): your code here. The check below reads"]
    lines += [f"#   {name}: {what}" for name, what in needs.items()]
    return "\n".join(lines)


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

    parts = exercise_parts(nb, name, title["num"])
    cells = [nbformat.v4.new_markdown_cell(intro), _copy(install), *map(_copy, setup)]
    for ex, part in zip(exercises, parts, strict=True):
        cells.append(nbformat.v4.new_markdown_cell(
            f"## Exercise {ex.number}: {ex.title}\n\n{ex.statement}"))
        cells += map(_copy, part.given)
        cells.append(nbformat.v4.new_code_cell(todo_source(title["num"], ex.number)))
        cells.append(_copy(part.check))
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


_RUN_COPIES = """
import os, sys, time
import nbformat
from pathlib import Path
for arg in sys.argv[1:]:
    path = Path(arg).resolve()
    os.chdir(path.parent)
    namespace = {"__name__": "__main__"}
    start = time.perf_counter()
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type != "code" or cell.source.startswith("# NBVAL_SKIP"):
            continue
        check = cell.source.startswith("# Check (exercise ")
        code = compile(cell.source, f"{path.name}", "single" if check else "exec")
        if check:
            sys.displayhook = lambda value: print(f"{path.name}: {value!r}", flush=True)
        exec(code, namespace)
    print(f"{path.name}: ran in {time.perf_counter() - start:.1f} s", flush=True)
"""


def run_copies(paths: list[Path], threads: int | None = None, timeout: int = 900
               ) -> subprocess.CompletedProcess:
    """Run student copies whole, TODO cells as they are (comments), one after another in ONE
    fresh Python process (each in its own namespace, from its folder; the imports the copies
    share load once), printing ``<copy>: <verdict>`` for every check cell and
    ``<copy>: ran in S s`` at each copy's end. ``returncode`` 0 when every cell ran.

    The environment is ``kernel_env()`` (CPU only, progress bars off, fixed hash seed, 2
    threads as ``make notebooks`` uses); ``threads`` overrides the thread count.
    """
    env = kernel_env()
    env["MPLBACKEND"] = "Agg"
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return subprocess.run([sys.executable, "-c", _RUN_COPIES, *map(str, paths)], env=env,
                          capture_output=True, text=True, timeout=timeout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true",
                      help="exit 1 if a committed copy differs from what would be generated")
    mode.add_argument("--execute", action="store_true",
                      help="run each copy whole with its TODOs as they are: every check's verdict")
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
            paths = [student_path(sol) for sol in all_solutions()]
            missing = [p for p in paths if not p.exists()]
            for p in missing:
                print(f"MISSING {_rel(p)}: run `make students` first")
            done = run_copies([p for p in paths if p.exists()])
            print(done.stdout, end="")
            if done.returncode:
                print(done.stderr[-3000:], file=sys.stderr)
            return 1 if missing or done.returncode else 0
        for p in write_all():
            print(f"wrote {_rel(p)}")
        return 0
    except StructureError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
