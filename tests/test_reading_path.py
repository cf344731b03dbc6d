"""One lesson, one class: the reading path of every lesson notebook fits a 90-minute class."""

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from reprod.course import reading_path as rp
from reprod.course.notebooks import lesson_id

# Lessons still longer than one class, each with the reason it waits. The test below fails when
# one of them fits, so this list cannot go stale.
WAITING: dict[str, str] = {}


def test_prose_words_leave_out_formulas_links_images_and_table_rules():
    text = ("## 1. Two words\n\n$$h_t = A h_{t-1}$$ and $x$ ![alt text](a.svg) "
            "[a link](https://example.org/a/b)\n\n| a | b |\n|---|:-:|\n| c | d |\n- — *")
    # a token counts when it holds a letter or a digit ("##", "-", "—", "*" do not); formulas and
    # images go whole, a link keeps its text; a table keeps its cells, not its rule
    assert rp.prose_words(text) == len(["1.", "Two", "words", "and", "[a", "link]",
                                        "a", "b", "c", "d"])


def test_code_lines_count_neither_blank_lines_nor_comments():
    assert rp.code_lines("# a comment\n\nx = 1\n    # indented comment\ny = x  # trailing\n") == 2


def _notebook(tmp_path, cells):
    path = tmp_path / "99_x.ipynb"
    nbformat.write(new_notebook(cells=cells), path)
    return path


def test_the_path_ends_at_references_or_the_first_appendix_and_skips_check_cells(tmp_path):
    path = _notebook(tmp_path, [
        new_markdown_cell("# Title words"),                     # 2 words
        new_code_cell("# NBVAL_SKIP\n!pip install x"),          # Colab install: not read
        new_code_cell("a = 1\nb = 2"),                          # 2 lines
        new_code_cell("assert a < b, (a, b)"),                  # a check cell: collapsed
        new_markdown_cell("## Summary\n\nthree more words\n\n## References\n\n- many words here"),
        new_markdown_cell("## Appendix: more\n\nnot read"),
        new_code_cell("c = 3"),
    ])
    r = rp.measure(path)
    assert (r.words, r.code_lines) == (2 + 4, 2)
    assert r.over() == []


def test_a_notebook_over_its_class_says_what_is_over(tmp_path):
    long = " ".join(["word"] * (rp.MAX_WORDS + 1))
    path = _notebook(tmp_path, [new_markdown_cell(long),
                                new_code_cell("\n".join(f"x{i} = {i}"
                                                        for i in range(rp.MAX_CODE_LINES + 1)))])
    over = rp.measure(path).over()
    assert over == [f"{rp.MAX_WORDS + 1:,} words (at most {rp.MAX_WORDS:,})",
                    f"{rp.MAX_CODE_LINES + 1} code lines (at most {rp.MAX_CODE_LINES})"]
    assert rp.main(["--check", str(path)]) == 1


@pytest.mark.parametrize("path", rp.lessons(), ids=lesson_id)
def test_every_lesson_fits_one_class(path):
    over = rp.measure(path).over()
    if path.name in WAITING:
        assert over, (f"{path.name} now fits one class: take it off WAITING "
                      f"({WAITING[path.name]})")
    else:
        assert not over, (f"{path.name} is longer than one 90-minute class: "
                          f"{'; '.join(over)} (python -m reprod.course.reading_path)")


def test_waiting_names_only_lessons():
    assert set(WAITING) <= {p.name for p in rp.lessons()}
