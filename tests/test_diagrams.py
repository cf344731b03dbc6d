"""The lessons' architecture diagrams (``reprod.course.diagrams``): fresh, well-formed, laid out
without overlaps, labelled with tensor shapes, shown in their notebooks and staged for the site."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import nbformat
import pytest

from reprod.course import diagrams, site

ROOT = Path(__file__).resolve().parent.parent
NAMES = list(diagrams.DIAGRAMS)
SVG = "{http://www.w3.org/2000/svg}"

# Shapes each diagram must carry (glossary letters of its lessons module and notebook).
SHAPES = {
    "rein": ["(B, n, c)", "(m, c)", "(B, n, m)", "(B, n, m-1)", "(m-1, c)", "(N, m, q)",
             "(m, 3q)", "(m, q)", "(m, r)", "(r, c)"],
    "tqdm": ["(B, 3, H, W)", "(K, E)", "(B, K, E)", "(B, E, h, w)", "(B, Q, D)",
             "(B, Q, K+1)", "(B, Q, H/4, W/4)", "(B, D, H/4, W/4)"],
    "catseg": ["(B, E, h, w)", "(B, T, P, E)", "(B, P, T, h, w)", "(B, C, T, h, w)",
               "(B, C, h, w)", "(B, T, C)", "(B, T, 4h, 4w)"],
    "querydiff": ["(B, c, h, w)", "(B, r, c)", "(B, r, D)", "(B, n, r)", "(B, r, Cj)",
                  "(B, Cj, hj, wj)", "(B, 3, 32, 64)"],
    "selective_scan": ["(batch, D, L)", "(batch, L, R)", "(batch, N, L)", "(batch, D, N)",
                       "(D,)"],
    "mfuser": ["(B, Nd, C)", "(B, Nv, C)", "(B, L, C)", "(B, 2C, h, w)", "(B, K, E)",
               "(K, E)", "(B, E, h, w)"],
}


def _svg_path(name: str) -> Path:
    return diagrams.DIAGRAM_DIR / f"{name}.svg"


def _texts(root: ET.Element) -> list[str]:
    """The text of every <text> element (its tspans joined: subscripts inline)."""
    return ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]


def _mono_texts(root: ET.Element) -> list[str]:
    """The monospace runs of every <text> element, joined per element (the shape labels)."""
    out = []
    for t in root.iter(f"{SVG}text"):
        runs = ["".join(s.itertext()) for s in t.iter(f"{SVG}tspan")
                if "monospace" in s.get("font-family", "")]
        if runs:
            out.append("".join(runs))
    return out


def test_every_method_has_a_diagram_and_a_notebook():
    assert set(NAMES) == {"rein", "tqdm", "catseg", "querydiff", "selective_scan", "mfuser"}
    assert set(diagrams.NOTEBOOKS) == set(NAMES)
    for name in NAMES:
        assert (ROOT / "notebooks" / diagrams.NOTEBOOKS[name]).exists(), name


def test_committed_svgs_are_what_the_code_draws():
    assert diagrams.check() == [], "run: python -m reprod.course.diagrams"
    assert diagrams.main(["--check"]) == 0


@pytest.mark.parametrize("name", NAMES)
def test_drawing_is_deterministic(name):
    assert diagrams.render(name) == diagrams.render(name)


@pytest.mark.parametrize("name", NAMES)
def test_svg_is_well_formed_with_a_viewbox(name):
    root = ET.parse(_svg_path(name)).getroot()
    assert root.tag == f"{SVG}svg"
    x0, y0, w, h = (float(v) for v in root.get("viewBox").split())
    assert (x0, y0) == (0, 0) and w == float(root.get("width")) == diagrams.WIDTH
    assert 400 <= h == float(root.get("height")) <= 1100
    assert root.find(f"{SVG}title") is not None and root.find(f"{SVG}title").text
    # self-contained: no images, no links, nothing fetched
    text = _svg_path(name).read_text("utf-8")
    assert "<image" not in text and "href" not in text and "http://www.w3.org/2000/svg" in text
    assert not re.search(r"url\((?!#)", text)


@pytest.mark.parametrize("name", NAMES)
def test_layout_has_no_overlaps(name):
    problems = diagrams.draw(name).problems()
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", NAMES)
def test_arrows_carry_tensor_shapes(name):
    root = ET.parse(_svg_path(name)).getroot()
    shapes = {re.sub(r"\s+", " ", s) for s in _mono_texts(root)}
    joined = " | ".join(sorted(shapes))
    for want in SHAPES[name]:
        assert any(want in s for s in shapes), f"{name}: no shape {want!r} in {joined}"
    assert len(shapes) >= 5
    # a legend explains the colours and the shape font
    texts = _texts(root)
    assert "trained" in texts and any("tensor shapes" in t for t in texts)


@pytest.mark.parametrize("name", NAMES)
def test_the_notebook_shows_it_before_the_first_code_of_its_section(name):
    path = ROOT / "notebooks" / diagrams.NOTEBOOKS[name]
    nb = nbformat.read(path, as_version=4)
    link = re.compile(rf"!\[([^\]]+)\]\(assets/diagrams/{name}\.svg\)")
    where = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "markdown" and link.search(c.source)]
    assert len(where) == 1, f"{path.name} shows {name}.svg {len(where)} times"
    i = where[0]
    cell = nb.cells[i]
    assert len(link.search(cell.source).group(1)) > 20, "the alt text should say what it shows"
    assert len(cell.source) > len(link.search(cell.source).group(0)) + 40, \
        "a sentence or two should say what to follow on the diagram"
    assert (path.parent / "assets" / "diagrams" / f"{name}.svg").exists()
    # its section: the nearest '## ' heading above it, with no code cell in between ...
    heads = [j for j in range(i) if nb.cells[j].cell_type == "markdown"
             and re.search(r"^## ", nb.cells[j].source, re.M)]
    assert heads, f"{path.name}: the diagram is not inside a section"
    between = nb.cells[heads[-1] + 1:i]
    assert all(c.cell_type == "markdown" for c in between), \
        f"{path.name}: the diagram comes after code of its section"
    # ... and the section's first code cell comes right after the diagram's markdown
    after = nb.cells[i + 1:]
    nxt = next(k for k, c in enumerate(after) if c.cell_type == "code"
               or re.search(r"^## ", c.source, re.M))
    assert after[nxt].cell_type == "code", f"{path.name}: no code follows the diagram"


def test_local_images_are_found_outside_code():
    text = ("![a](assets/diagrams/rein.svg) ![remote](https://x.org/y.png)\n"
            '<img src="assets/diagrams/tqdm.svg"> ![missing](assets/nothere.svg)\n'
            "```\n![in code](assets/diagrams/catseg.svg)\n```\n"
            "[![badge](assets/diagrams/mfuser.svg)](https://example.org)\n")
    found = site.local_images(text, "notebooks/02_rein.ipynb")
    assert found == ["notebooks/assets/diagrams/rein.svg", "notebooks/assets/diagrams/tqdm.svg",
                     "notebooks/assets/diagrams/mfuser.svg"]


def test_the_site_stages_the_diagrams(tmp_path):
    site.stage(tmp_path)
    for name in NAMES:
        staged = tmp_path / "notebooks" / "assets" / "diagrams" / f"{name}.svg"
        assert staged.exists(), f"{name}.svg is not staged for the site"
        assert staged.read_bytes() == _svg_path(name).read_bytes()


def test_the_command_line_writes_and_checks(tmp_path, capsys):
    assert diagrams.main(["--check", "--out", str(tmp_path)]) == 1
    assert diagrams.main(["--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.svg" for n in NAMES)
    assert diagrams.main(["--check", "--out", str(tmp_path)]) == 0
    (tmp_path / "rein.svg").write_text("<svg/>")
    assert diagrams.main(["--check", "--out", str(tmp_path)]) == 1
    assert "rein.svg" in capsys.readouterr().err
