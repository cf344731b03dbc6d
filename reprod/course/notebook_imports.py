"""The modules the notebooks import, read from their import lines, and a check that each imports.

    python -m reprod.course.notebook_imports          # import each one: OK / FAIL, exit 1 on a FAIL
    python -m reprod.course.notebook_imports --list   # only print their names, one a line
    python -m reprod.course.notebook_imports --only lessons reprod    # just these packages
    python -m reprod.course.notebook_imports --root CHECKOUT   # notebooks of a checkout, run
                                                     # elsewhere to import the installed package

The notebooks are executed on Linux only; the CI's Windows and macOS jobs install the package
(no ``dev`` extra) and run this to check that everything a lesson imports imports there: the
``lessons`` and ``reprod`` modules and the third-party ones (the standard library is left out).
The list is computed from every notebook under ``notebooks/`` (lessons, solutions and student
copies) each time, so a new import in a notebook is checked without editing anything. Shell
(``!pip``) and magic (``%time``) lines are not Python and are skipped; ``from lessons import
viz`` counts as ``lessons.viz`` when ``viz`` is a module.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import json
import os
import sys
import traceback
from pathlib import Path

__all__ = ["check_imports", "imports_of", "notebook_imports", "resolve"]

ROOT = Path(__file__).resolve().parents[2]


def _code(notebook: Path) -> list[str]:
    """The code cells' sources, with shell and magic lines made into ``pass``."""
    nb = json.loads(notebook.read_text("utf-8"))
    out = []
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "code":
            continue
        src = cell.get("source", "")
        src = "".join(src) if isinstance(src, list) else src
        lines = [ln[: len(ln) - len(ln.lstrip())] + "pass"
                 if ln.lstrip().startswith(("!", "%")) else ln for ln in src.splitlines()]
        out.append("\n".join(lines))
    return out


def imports_of(source: str) -> set[tuple[str, tuple[str, ...]]]:
    """``(module, names)`` for every absolute import in a piece of Python source."""
    found: set[tuple[str, tuple[str, ...]]] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {(a.name, ()) for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add((node.module, tuple(a.name for a in node.names if a.name != "*")))
    return found


def resolve(module: str, names: tuple[str, ...], root: Path = ROOT) -> list[str]:
    """The modules an import statement loads: ``module``, and ``module.name`` for submodules."""
    out = [module]
    top = module.split(".")[0]
    if top in ("lessons", "reprod"):    # our packages: a name may be a submodule (no import)
        base = root.joinpath(*module.split("."))
        out += [f"{module}.{n}" for n in names
                if base.joinpath(f"{n}.py").exists() or base.joinpath(n, "__init__.py").exists()]
    return out


def notebook_imports(root: Path = ROOT, only: list[str] | None = None) -> list[str]:
    """Every non-standard-library module any notebook under ``root/notebooks`` imports."""
    modules: set[str] = set()
    for nb in sorted((root / "notebooks").rglob("*.ipynb")):
        if ".ipynb_checkpoints" in nb.parts:
            continue
        for source in _code(nb):
            try:
                stmts = imports_of(source)
            except SyntaxError as e:
                raise SyntaxError(f"{nb.relative_to(root)}: {e}") from e
            for module, names in stmts:
                modules.update(resolve(module, names, root))
    top = {m for m in modules if m.split(".")[0] not in sys.stdlib_module_names
           and m != "__future__"}
    if only:
        top = {m for m in top if m.split(".")[0] in only}
    return sorted(top)


def check_imports(modules: list[str]) -> dict[str, str]:
    """Import each module; returns the failures (module -> the error's last line)."""
    failed = {}
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:   # report every failure, not only the first
            failed[name] = f"{type(e).__name__}: {e}"
            if os.environ.get("DGSS_IMPORT_TRACEBACK"):
                traceback.print_exc()
    return failed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="print the module names and stop")
    ap.add_argument("--only", nargs="+", metavar="PACKAGE",
                    help="only modules of these top-level packages (e.g. lessons reprod)")
    ap.add_argument("--root", type=Path, default=ROOT,
                    help="the checkout whose notebooks/ to read (default: this one)")
    args = ap.parse_args(argv)
    os.environ.setdefault("MPLBACKEND", "Agg")   # matplotlib.pyplot without a display
    modules = notebook_imports(args.root.resolve(), only=args.only)
    if args.list:
        print("\n".join(modules))
        return 0
    failed = check_imports(modules)
    for name in modules:
        print(f"{'FAIL' if name in failed else 'OK  '} {name}"
              + (f"  ({failed[name]})" if name in failed else ""))
    print(f"{len(modules) - len(failed)}/{len(modules)} modules the notebooks import import here")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
