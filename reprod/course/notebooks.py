"""Execute the lesson notebooks: the one canonical way to regenerate their committed outputs.

    python -m reprod.course.notebooks --in-place   # refresh outputs + metadata (make notebooks)
    python -m reprod.course.notebooks --execute-to DIR      # run every lesson headless into DIR
    python -m reprod.course.notebooks --check               # exit 1 if committed outputs are stale
    python -m reprod.course.notebooks --in-place notebooks/00_dgss_problem.ipynb   # just one

Outputs are always made the same way: a fresh kernel per notebook in this environment, on the
CPU, with progress bars off and ``OMP_NUM_THREADS=2`` (the laptop the lessons are timed on). The
notebook's metadata records ``dgss_lessons``: the ToyWorld version and the digest of the
``lessons`` modules the notebook imports (with their own imports), so a test can tell when
outputs were made by older code. CI-only check cells (asserts and the assignments they need,
no output: :func:`is_check_cell`) are collapsed, so they stay out of the reading path: hidden
source in JupyterLab (``jupyter.source_hidden``), a "show code" toggle on the course website
(MyST-NB's ``hide-input`` tag). Files are then cleaned with
``nbstripout --keep-output --keep-count``.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat

__all__ = [
    "CHECK_TAG",
    "LESSON_GLOB",
    "META_KEY",
    "NOTEBOOK_DIR",
    "ROOT",
    "all_notebooks",
    "collapse_check_cells",
    "execute",
    "exercise_lessons",
    "expected_metadata",
    "imported_modules",
    "is_check_cell",
    "kernel_env",
    "lesson_id",
    "main",
    "run_in_kernel",
    "stale_reasons",
    "tool_path",
]

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = ROOT / "notebooks"
META_KEY = "dgss_lessons"
CHECK_TAG = "hide-input"        # MyST-NB: the course website shows the cell behind a toggle
LESSON_GLOB = "[0-9][0-9]*_*.ipynb"     # 00_dgss_problem.ipynb ... 03a_mask2former.ipynb ...


def lesson_id(path: Path | str) -> str:
    """A lesson's id, its file name up to the first underscore: ``02``, ``03a``, ``03b``; the
    same for its solutions and its student copy."""
    return Path(path).name.split("_", 1)[0]


def tool_path(name: str) -> str:
    """A console script of this environment (on PATH, or beside this Python in a venv)."""
    return shutil.which(name) or str(Path(sys.executable).with_name(name))


def all_notebooks() -> list[Path]:
    """Every lesson and solution notebook, in lesson order."""
    return sorted(NOTEBOOK_DIR.glob(LESSON_GLOB)) + sorted(
        (NOTEBOOK_DIR / "solutions").glob(LESSON_GLOB))


def imported_modules(nb: nbformat.NotebookNode) -> list[str]:
    """The ``lessons`` modules a notebook's code cells import (directly)."""
    from lessons.utils import lessons_imports

    found: set[str] = set()
    for cell in nb.cells:
        if cell.cell_type == "code":   # IPython magics and shell lines are not Python
            lines = [ln[: len(ln) - len(ln.lstrip())] + "pass"
                     if ln.lstrip().startswith(("!", "%")) else ln
                     for ln in cell.source.splitlines()]
            found |= lessons_imports("\n".join(lines))
    return sorted(found)


def _only_checks(body: list[ast.stmt]) -> bool:
    """Asserts, the assignments they read, and for-loops of those: nothing a reader must see."""
    for st in body:
        if isinstance(st, ast.For) and not st.orelse and _only_checks(st.body):
            continue
        if not isinstance(st, (ast.Assert, ast.Assign, ast.AnnAssign, ast.AugAssign)):
            return False
    return True


def is_check_cell(cell: nbformat.NotebookNode) -> bool:
    """A CI-only check: a code cell with an ``assert``, made only of asserts and assignments
    (and loops of them), that shows nothing (no output)."""
    if cell.cell_type != "code" or cell.get("outputs"):
        return False
    try:
        tree = ast.parse(cell.source)
    except SyntaxError:             # IPython magics: never a check cell
        return False
    return any(isinstance(n, ast.Assert) for n in ast.walk(tree)) and _only_checks(tree.body)


def collapse_check_cells(nb: nbformat.NotebookNode) -> int:
    """Collapse every check cell (and only those): the number collapsed."""
    count = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        tags = [t for t in cell.metadata.get("tags", []) if t != CHECK_TAG]
        jupyter = {k: v for k, v in cell.metadata.get("jupyter", {}).items()
                   if k != "source_hidden"}
        if is_check_cell(cell):
            tags.append(CHECK_TAG)
            jupyter["source_hidden"] = True
            count += 1
        for key, value in (("tags", tags), ("jupyter", jupyter)):
            if value:
                cell.metadata[key] = value
            else:
                cell.metadata.pop(key, None)
    return count


_CHECK_CALL = re.compile(r"""check_exercise\(\s*["']([0-9]{2}[a-z]?)["']""")


def exercise_lessons(nb: nbformat.NotebookNode) -> list[str]:
    """The lessons whose exercise checks a notebook calls: ``check_exercise("03a", ...)``."""
    return sorted({m for cell in nb.cells if cell.cell_type == "code"
                   for m in _CHECK_CALL.findall(cell.source)})


def _code_files(nb: nbformat.NotebookNode) -> list[tuple[str, Path]]:
    """(name, file) of the ``lessons`` code a notebook's outputs depend on: the modules it
    imports with their own imports, where ``lessons.exercises`` counts as its package and the
    checks of the lessons the notebook calls, not every lesson's (so editing one lesson's checks
    leaves the other solutions fresh)."""
    from lessons.utils import PACKAGE_DIR, lessons_imports, module_closure, module_files

    direct = set(imported_modules(nb))
    files = []
    if "exercises" in direct:
        direct.discard("exercises")
        package = PACKAGE_DIR / "exercises"
        checks = [package / "__init__.py"] + [package / f"lesson{m}.py"
                                               for m in exercise_lessons(nb)]
        for f in checks:
            if not f.exists():
                raise ValueError(f"{f.relative_to(ROOT)} does not exist (a check_exercise call "
                                 f"names a lesson without checks)")
            files.append((f"exercises/{f.name}", f))
            direct |= lessons_imports(f.read_text("utf-8")) - {"exercises"}
    for m in module_closure(direct) if direct else []:
        files += [(m if f.name == f"{m}.py" else f"{m}/{f.name}", f) for f in module_files(m)]
    return sorted(files)


def expected_metadata(nb: nbformat.NotebookNode) -> dict:
    """What ``metadata.dgss_lessons`` must say for outputs made by the code as it is now: the
    ToyWorld version, the ``lessons`` code its outputs depend on (:func:`_code_files`) and the
    sha256 (16 hex digits) of that code."""
    from lessons.toyworld import TOYWORLD_VERSION

    files = _code_files(nb)
    h = hashlib.sha256()
    for name, f in files:
        h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    return {"toyworld_version": TOYWORLD_VERSION,
            "lessons_modules": [name.removesuffix(".py") for name, _ in files],
            "lessons_digest": h.hexdigest()[:16]}


def stale_reasons(path: Path) -> list[str]:
    """Why a committed notebook's outputs are stale or incomplete (empty list: fresh)."""
    nb = nbformat.read(path, as_version=4)
    reasons = []
    have = nb.metadata.get(META_KEY)
    want = expected_metadata(nb)
    if have is None:
        reasons.append(f"no metadata.{META_KEY}: never executed by reprod.course.notebooks")
    else:
        for key, value in want.items():
            if have.get(key) != value:
                reasons.append(f"{key} is {have.get(key)!r}, the code now gives {value!r}")
    counts = [c.execution_count for c in nb.cells if c.cell_type == "code"]
    if counts != list(range(1, len(counts) + 1)):
        reasons.append(f"execution counts {counts} are not 1..{len(counts)} (run top to bottom)")
    return reasons


def kernel_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(TQDM_DISABLE="1", OMP_NUM_THREADS="2", PYTHONHASHSEED="0",
               CUDA_VISIBLE_DEVICES="", PYDEVD_DISABLE_FILE_VALIDATION="1")
    env.pop("MPLBACKEND", None)
    return env


def run_in_kernel(nb: nbformat.NotebookNode, folder: Path, timeout: int = 900,
                  env: dict[str, str] | None = None) -> float:
    """Execute ``nb`` in place in a fresh kernel (cwd ``folder``) with ``env`` (default
    :func:`kernel_env`); seconds taken."""
    from nbclient import NotebookClient

    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env or kernel_env())   # the kernel inherits this process's environment
    start = time.perf_counter()
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                       resources={"metadata": {"path": str(folder)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return time.perf_counter() - start


def execute(path: Path, out: Path, timeout: int = 900) -> float:
    """Execute ``path`` in a fresh kernel (cwd = its folder), write to ``out``; seconds taken."""
    nb = nbformat.read(path, as_version=4)
    seconds = run_in_kernel(nb, path.parent, timeout)
    collapse_check_cells(nb)
    nb.metadata[META_KEY] = expected_metadata(nb)
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out)
    strip = tool_path("nbstripout")
    subprocess.run([strip, "--keep-output", "--keep-count", str(out)], check=True)
    return seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--in-place", action="store_true", help="refresh committed outputs")
    mode.add_argument("--execute-to", type=Path, metavar="DIR", help="write executed copies")
    mode.add_argument("--check", action="store_true", help="report stale notebooks")
    ap.add_argument("notebooks", nargs="*", type=Path, help="default: all of them")
    args = ap.parse_args(argv)
    paths = [p.resolve() for p in args.notebooks] or all_notebooks()
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        ap.error(f"no such notebook: {', '.join(missing)}")
    if args.check:
        bad = {p: r for p in paths if (r := stale_reasons(p))}
        for p, reasons in bad.items():
            print(f"STALE {p.relative_to(ROOT)}: " + "; ".join(reasons))
        print(f"{len(paths) - len(bad)} of {len(paths)} notebooks are fresh")
        return 1 if bad else 0
    for p in paths:
        target = p if args.in_place else args.execute_to.resolve() / p.relative_to(NOTEBOOK_DIR)
        print(f"executing {p.relative_to(ROOT)} ...", flush=True)
        seconds = execute(p, target)
        print(f"  {seconds:.0f} s -> {target}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
