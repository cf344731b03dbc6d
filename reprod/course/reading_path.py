"""How long each lesson's reading path is, against the length of one 90-minute class.

    python -m reprod.course.reading_path            # a table of every lesson notebook
    python -m reprod.course.reading_path --check    # exit 1 if a lesson is over its class

The *reading path* is what a class walks through: the notebook from its title down to its
``## References`` or its first ``## Appendix`` heading, whichever comes first (appendices are
optional reading, references are for later). In it we count

- **words** of prose: markdown cells, with formulas, links' addresses, images and table rules
  removed, one word per whitespace-separated token that contains a letter or a digit;
- **code lines**: non-blank, non-comment lines of the code cells a reader reads, so not the
  collapsed CI-only check cells (:func:`reprod.course.notebooks.is_check_cell`) and not the
  ``# NBVAL_SKIP`` cell that installs the course on Colab.

One class holds about 2,000 words and 250 code lines (a reading speed of about 100 words a
minute with the code run and discussed, the course's teaching plan in ``docs/syllabus.md``);
``--check`` allows the "about" a tenth: :data:`MAX_WORDS` and :data:`MAX_CODE_LINES`.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat

from reprod.course.notebooks import LESSON_GLOB, NOTEBOOK_DIR, ROOT, is_check_cell

__all__ = ["MAX_CODE_LINES", "MAX_WORDS", "ReadingPath", "lessons", "main", "measure",
           "over_budget"]

MAX_WORDS = 2200          # about 2,000 words of prose ...
MAX_CODE_LINES = 275      # ... and about 250 lines of code: one 90-minute class, plus a tenth

_END = re.compile(r"^##\s+(References|Appendix)\b", re.M)
_MATH = re.compile(r"\$\$.*?\$\$|\$[^$\n]+\$", re.S)
_IMAGE = re.compile(r"!\[[^\]]*\]\([^)]*\)")
_LINK_TARGET = re.compile(r"\]\([^)]*\)")
_TABLE_RULE = re.compile(r"^\s*\|?[\s:|-]+\|[\s:|-]*$", re.M)
_WORD = re.compile(r"[A-Za-z0-9]")


def lessons() -> list[Path]:
    """The lesson notebooks, in order (their solutions are homework, not the class)."""
    return sorted(NOTEBOOK_DIR.glob(LESSON_GLOB))


@dataclass(frozen=True)
class ReadingPath:
    """One notebook's reading path: its prose words and its code lines."""

    notebook: str
    words: int
    code_lines: int

    def over(self) -> list[str]:
        """What exceeds one class, in words a reader understands (empty when it fits)."""
        out = []
        if self.words > MAX_WORDS:
            out.append(f"{self.words:,} words (at most {MAX_WORDS:,})")
        if self.code_lines > MAX_CODE_LINES:
            out.append(f"{self.code_lines} code lines (at most {MAX_CODE_LINES})")
        return out


def prose_words(markdown: str) -> int:
    """Words of one markdown cell: formulas, images, link addresses and table rules removed."""
    text = _MATH.sub(" ", markdown)
    text = _IMAGE.sub(" ", text)
    text = _LINK_TARGET.sub("] ", text)
    text = _TABLE_RULE.sub(" ", text)
    return sum(1 for token in text.split() if _WORD.search(token))


def code_lines(source: str) -> int:
    """Non-blank lines of a code cell that are not comments."""
    return sum(1 for line in source.splitlines()
               if line.strip() and not line.lstrip().startswith("#"))


def _read_cells(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    """The cells from the title to ``## References`` or the first ``## Appendix`` heading."""
    cells = []
    for cell in nb.cells:
        if cell.cell_type == "markdown" and (m := _END.search(cell.source)):
            head = cell.source[:m.start()]
            if head.strip():
                cells.append(nbformat.v4.new_markdown_cell(head))
            break
        cells.append(cell)
    return cells


def measure(path: Path) -> ReadingPath:
    """The reading path of one notebook."""
    nb = nbformat.read(path, as_version=4)
    words = lines = 0
    for cell in _read_cells(nb):
        if cell.cell_type == "markdown":
            words += prose_words(cell.source)
        elif cell.cell_type == "code" and not is_check_cell(cell) \
                and not cell.source.lstrip().startswith("# NBVAL_SKIP"):
            lines += code_lines(cell.source)
    return ReadingPath(str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path),
                       words, lines)


def over_budget(paths: list[Path] | None = None) -> dict[str, list[str]]:
    """Every lesson notebook that is longer than one class -> what is over."""
    found = {}
    for path in paths or lessons():
        if over := measure(path).over():
            found[path.name] = over
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a lesson is over its class")
    ap.add_argument("notebooks", nargs="*", type=Path, help=f"default: every lesson in "
                                                            f"{NOTEBOOK_DIR.relative_to(ROOT)}")
    args = ap.parse_args(argv)
    paths = [p.resolve() for p in args.notebooks] or lessons()
    print(f"{'notebook':<42s} {'words':>6s} {'code':>5s}  (one class: {MAX_WORDS:,} / "
          f"{MAX_CODE_LINES})")
    for path in paths:
        r = measure(path)
        print(f"{path.name:<42s} {r.words:>6,} {r.code_lines:>5d}  {'; '.join(r.over())}")
    return 1 if args.check and over_budget(paths) else 0


if __name__ == "__main__":
    sys.exit(main())
