"""The course website (``reprod.course.site``): staging, links, and the built site in Chromium.

The staging tests need nothing beyond the package. The build-and-browse test needs the ``site``
extra (part of ``dev``) and a Chromium binary (Debian's ``chromium``; ``.ci/run`` installs it
when it can); without them it is skipped with the reason.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from reprod.course import site
from reprod.course.notebook_imports import notebook_imports, resolve
from reprod.course.notebooks import LESSON_GLOB

ROOT = Path(__file__).resolve().parent.parent


def _needs_browser():
    missing = site.missing_packages({**site.SITE_PACKAGES, **site.CHECK_PACKAGES})
    if missing:
        pytest.skip(f"the site extra is not installed (missing {', '.join(missing)}): "
                    "pip install -e '.[site]'")
    if site.find_chromium() is None:
        pytest.skip("no Chromium binary: apt-get install chromium (Debian), or set $CHROMIUM")


# ------------------------------------------------------------------------------------------------
# What the site is made of
# ------------------------------------------------------------------------------------------------
def test_lessons_are_the_notebooks_in_file_name_order():
    found = site.lessons()
    names = sorted(p.name for p in (ROOT / "notebooks").glob(LESSON_GLOB))
    assert [Path(ls.path).name for ls in found] == names
    for ls in found:
        assert ls.title and not ls.title.startswith("#")
        if ls.solution:
            assert (ROOT / ls.solution).exists() and ls.stem in ls.solution
        if ls.student:
            assert (ROOT / ls.student).exists() and ls.stem in ls.student


def test_docs_pages_are_globbed_with_the_syllabus_first():
    pages = site.doc_pages()
    assert sorted(pages) == sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))
    if "docs/syllabus.md" in pages:
        assert pages[0] == "docs/syllabus.md"


def test_links_stay_between_pages_and_go_to_github_otherwise(tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[project.urls]\nRepository = "https://github.com/o/r"\n')
    (tmp_path / "lessons").mkdir()
    (tmp_path / "lessons" / "rein.py").write_text("")
    pages = {"README.md", "docs/a.md", "notebooks/00_x.ipynb"}
    site.repo_url.cache_clear()
    try:
        text = ("[readme](../README.md) [a](a.md#part) [code](../lessons/rein.py#L3) "
                "[pkg](../lessons/) [web](https://x.org/y.png) [missing](nothere.md)\n"
                "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
                "(https://colab.research.google.com/github/o/r/blob/main/x.ipynb)\n"
                "![plot](https://example.org/plot.png)\n"
                "```python\n[code](../lessons/rein.py)\n```\n")
        out = site.rewrite_links(text, "docs/a.md", pages, tmp_path)
    finally:
        site.repo_url.cache_clear()
    assert "[readme](../README.md)" in out and "[a](a.md#part)" in out
    assert "[code](https://github.com/o/r/blob/main/lessons/rein.py#L3)" in out
    assert "[pkg](https://github.com/o/r/tree/main/lessons)" in out
    assert "[web](https://x.org/y.png)" in out and "[missing](nothere.md)" in out
    assert "[![Open In Colab](../_assets/colab-badge.svg)](https://colab.research.google.com/" \
           "github/o/r/blob/main/x.ipynb)" in out
    assert "[plot](https://example.org/plot.png)" in out and "![plot]" not in out
    assert "```python\n[code](../lessons/rein.py)\n```" in out   # code is left alone


def test_staged_lessons_link_their_solutions_downloads_and_colab(tmp_path):
    pages = site.stage(tmp_path)
    items = site.lessons()
    assert "index" in pages and all(ls.path.removesuffix(".ipynb") in pages for ls in items)
    index = (tmp_path / "index.md").read_text()
    assert "<!--" not in index.split("## Lessons", 1)[1]    # every marker was filled
    for ls in items:
        assert f"]({ls.path})" in index and ":caption: Lessons" in index
        nb = json.loads((tmp_path / ls.path).read_text())
        bar = next(c for c in nb["cells"] if c.get("id") == "dgss-site-links")
        text = "".join(bar["source"])
        if ls.solution:
            assert f"(solutions/{Path(ls.solution).name})" in text
            assert (tmp_path / ls.solution).exists()
        assert f"</_raw/{ls.path}>" in text and (tmp_path / "_raw" / ls.path).exists()
        if ls.student:
            assert f"</_raw/{ls.student}>" in text and (tmp_path / "_raw" / ls.student).exists()
        # the downloads are the committed notebooks, byte for byte
        assert (tmp_path / "_raw" / ls.path).read_bytes() == (ROOT / ls.path).read_bytes()
        full = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
        assert "colab.research.google.com/github/" in full
        assert not re.search(r"!\[[^\]]*\]\(https?:", full), "a remote image is left"
    for doc in site.doc_pages():
        assert (tmp_path / doc).exists() and f"]({doc})" in index


def test_notebook_imports_are_read_from_the_notebooks():
    mods = notebook_imports()
    assert "lessons.toyworld" in mods and "torch" in mods
    assert not [m for m in mods if m.split(".")[0] in ("sys", "json", "__future__")]
    for m in (m for m in mods if m.startswith("lessons.")):
        name = m.split(".")[1]
        assert ((ROOT / "lessons" / f"{name}.py").exists()
                or (ROOT / "lessons" / name / "__init__.py").exists()), m
    assert resolve("lessons", ("viz", "not_a_module")) == ["lessons", "lessons.viz"]
    assert resolve("numpy", ("pi",)) == ["numpy"]


# ------------------------------------------------------------------------------------------------
# In a real browser
# ------------------------------------------------------------------------------------------------
def test_the_browser_check_reports_what_is_broken(tmp_path):
    _needs_browser()
    (tmp_path / "ok.png").write_bytes(
        bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                      "1f15c4890000000d49444154789c6360000002000185d114090000000049454e44ae426082"))
    (tmp_path / "index.html").write_text(
        "<html><head><title>t</title></head><body><p>cost $x^2$ here</p>"
        '<a href="gone.html">gone</a> <a href="index.html#nowhere">anchor</a> '
        '<a href="ok.png">fine</a> <img src="ok.png"> <img src="missing.png"> '
        '<img src="http://example.invalid/remote.png">'
        "<script>undefined_function()</script></body></html>")
    rep = site.check_site(tmp_path, tmp_path / "shots", search_term=None)
    text = "\n".join(rep.problems)
    assert "raw math left: 'cost $x^2$ here'" in text
    assert "gone.html: no file gone.html" in text
    assert "no anchor #nowhere in index.html" in text
    assert "missing.png" in text
    assert "request to the network: http://example.invalid/remote.png" in text
    assert "undefined_function" in text
    assert "ok.png: " not in text.replace("missing.png", "")


@pytest.mark.slow
def test_the_site_builds_and_every_page_works_in_chromium():
    _needs_browser()
    t0 = time.perf_counter()
    built = site.build_site(site.OUT_DIR)
    broken = [w for w in built["warnings"]
              if re.search(r"xref_missing|not found|not readable|unknown document", w)]
    assert not broken, "\n".join(broken)
    t1 = time.perf_counter()
    rep = site.check_site(site.OUT_DIR, site.SHOTS_DIR)
    t2 = time.perf_counter()
    print(f"site: built in {t1 - t0:.1f} s, {len(rep.pages)} pages checked in Chromium in "
          f"{t2 - t1:.1f} s, {rep.math} formulas, {rep.search_hits} search hits; "
          f"screenshots in {site.SHOTS_DIR}")
    assert not rep.problems, "\n".join(rep.problems[:50])
    lessons = site.lessons()
    assert {p.stem for p in rep.screenshots} >= {Path(ls.path).stem for ls in lessons}
    assert all(p.stat().st_size > 10_000 for p in rep.screenshots)
    assert len(rep.pages) >= len(lessons) + 2      # lessons, the index and the search page
    assert rep.search_hits > 0
    if any("$" in (ROOT / ls.path).read_text() for ls in lessons):
        assert rep.math > 0, "the lessons have math but none was typeset"
