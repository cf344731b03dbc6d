"""The course website: every lesson readable in a browser, built offline from committed outputs.

    python -m reprod.course.site              # build build/site/ (make site)
    python -m reprod.course.site --clean      # the same from scratch
    python -m reprod.course.site --serve      # build, then serve it on http://127.0.0.1:8000/
    python -m reprod.course.site --check      # build, then load every page in headless Chromium

The site is Sphinx with MyST-NB (configuration in ``site/``). The sources are staged into
``build/site-src/`` from what the repository holds when it runs, nothing hard-coded:

- ``notebooks/NN_*.ipynb`` are the lessons, in file-name order, each with a links bar under its
  title (its solutions page, the notebook and its student copy as downloads, Colab);
- ``notebooks/solutions/NN_*_solutions.ipynb`` are the solutions pages, each linking back to its
  lesson; ``notebooks/students/`` are offered as downloads only (their exercises are TODO cells
  with self-checks);
- ``docs/*.md`` are pages (the syllabus first, then by name), and the README is a page too;
- ``site/index.md`` is the front page; the lessons table and the navigation are written into it;
- local images that these pages show (``notebooks/assets/diagrams/*.svg``, the lessons'
  architecture diagrams) are staged at the same relative paths, so Sphinx copies them.

Notebooks are rendered with their committed outputs (``nb_execution_mode = "off"``), never run.
Links between staged pages stay relative; links to repository files that are not pages (code,
configs, folders) become links to the file on GitHub; remote images become a local copy (the Colab
badge) or a plain link, so that no page loads anything from the network. MathJax is served from
the site itself (``sphinx-mathjax-offline``), the theme (Furo) uses the system fonts and the
search is Sphinx's own, so the built site works from ``file://`` or any static file server.

``--check`` (and ``tests/test_site.py``) serves the built site on 127.0.0.1 and loads every page
in headless Chromium driven by Playwright (the system browser, ``playwright install`` is never
needed): no console or page errors, no request leaving 127.0.0.1, no broken internal link,
anchor or image, all math typeset by MathJax (no raw ``$...$`` or ``\\(...\\)`` left), the search
answering, and one screenshot per lesson under ``build/site-shots/``.

Needs the ``site`` extra (``pip install -e ".[site]"``, also part of ``dev``) and, for
``--check``, a Chromium binary (Debian: ``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import json
import os
import posixpath
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from reprod.course.notebooks import LESSON_GLOB

__all__ = [
    "BROWSER_ARGS", "CONF_DIR", "OUT_DIR", "SHOTS_DIR", "STAGE_DIR", "CheckReport", "Lesson",
    "build_site", "check_site", "doc_pages", "find_chromium", "lessons", "local_images",
    "missing_packages", "repo_url", "rewrite_links", "serve", "stage",
]

ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = ROOT / "site"
STAGE_DIR = ROOT / "build" / "site-src"
OUT_DIR = ROOT / "build" / "site"
DOCTREE_DIR = ROOT / "build" / "site-doctrees"
SHOTS_DIR = ROOT / "build" / "site-shots"
BRANCH = "main"
SITE_PACKAGES = {"sphinx": "sphinx", "myst_nb": "myst-nb", "furo": "furo",
                 "sphinx-mathjax-offline": "sphinx-mathjax-offline"}
CHECK_PACKAGES = {"playwright": "playwright"}
# This machine's network is closed: Chromium must not try its background services.
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync"]


# ------------------------------------------------------------------------------------------------
# What the repository holds
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Lesson:
    """One lesson notebook and its companions (paths relative to the repository root)."""

    path: str                 # notebooks/NN_name.ipynb
    title: str                # the notebook's first ``# `` heading
    solution: str | None      # notebooks/solutions/NN_name_solutions.ipynb, when it exists
    student: str | None       # notebooks/students/NN_name_student.ipynb, when it exists

    @property
    def stem(self) -> str:
        return Path(self.path).stem

    @property
    def number(self) -> str:
        return self.stem.split("_", 1)[0]


def _cells(nb: dict) -> list[dict]:
    return nb.get("cells", [])


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _title(path: Path) -> str:
    """The first level-1 heading of a notebook or Markdown file (else the file name)."""
    if path.suffix == ".ipynb":
        nb = json.loads(path.read_text("utf-8"))
        text = "\n".join(_source(c) for c in _cells(nb) if c.get("cell_type") == "markdown")
    else:
        text = path.read_text("utf-8")
    match = re.search(r"^# +(.+?)\s*$", text, re.M)
    return match.group(1).strip() if match else path.stem


def lessons(root: Path = ROOT) -> list[Lesson]:
    """Every lesson notebook, in file-name order (the lesson order), with its companions."""
    out = []
    for nb in sorted((root / "notebooks").glob(LESSON_GLOB)):
        sol = root / "notebooks" / "solutions" / f"{nb.stem}_solutions.ipynb"
        stu = root / "notebooks" / "students" / f"{nb.stem}_student.ipynb"
        out.append(Lesson(path=nb.relative_to(root).as_posix(), title=_title(nb),
                          solution=sol.relative_to(root).as_posix() if sol.exists() else None,
                          student=stu.relative_to(root).as_posix() if stu.exists() else None))
    return out


def doc_pages(root: Path = ROOT) -> list[str]:
    """``docs/*.md``, relative to the root: the syllabus first, then by name."""
    pages = sorted(p.relative_to(root).as_posix() for p in (root / "docs").glob("*.md"))
    return sorted(pages, key=lambda p: (Path(p).stem != "syllabus", p))


@functools.cache
def repo_url(root: Path = ROOT) -> str:
    """The repository's address on GitHub (``[project.urls] Repository`` of pyproject.toml)."""
    text = (root / "pyproject.toml").read_text("utf-8")   # (no tomllib on Python 3.10)
    match = re.search(r"^Repository\s*=\s*\"([^\"]+)\"", text, re.M)
    if not match:
        raise ValueError("pyproject.toml has no [project.urls] Repository = \"...\"")
    return match.group(1).rstrip("/")


# ------------------------------------------------------------------------------------------------
# Links and images
# ------------------------------------------------------------------------------------------------
_INLINE = re.compile(r"(?P<bang>!?)\[(?P<text>(?:[^\[\]]|\[[^\[\]]*\])*)\]"
                     r"\((?P<target><[^>]*>|[^()\s]+)(?P<title>\s+\"[^\"]*\")?\)")
_REFDEF = re.compile(r"^(?P<lead> {0,3}\[[^\]]+\]:\s*)(?P<target>\S+)", re.M)
_HTML_ATTR = re.compile(r"(?P<attr>\b(?:href|src))=\"(?P<target>[^\"]+)\"")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")
COLAB_BADGE = "colab.research.google.com/assets/colab-badge.svg"
LOCAL_BADGE = "_assets/colab-badge.svg"
# An HTML <img> with a remote src other than the Colab badge gets this blank image: better than a
# network request (there is none in the notebooks or docs today).
BLANK_IMAGE = "data:image/gif;base64,R0lGODlhAQABAAAAACH5BAEKAAEALAAAAAABAAEAAAICTAEAOw=="


def _is_remote(target: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target)) or target.startswith("//")


def _resolve(target: str, src: str, pages: set[str], root: Path) -> str:
    """A local link target of ``src``, rewritten for the site (unchanged when it stays)."""
    if not target or target.startswith("#") or _is_remote(target):
        return target
    path, _, frag = target.partition("#")
    if not path:
        return target
    rel = posixpath.normpath(posixpath.join(posixpath.dirname(src), unquote(path)))
    if rel in pages or rel.startswith("../"):
        return target
    if rel.startswith("_assets/"):
        return target
    on_disk = root / rel
    if on_disk.exists():
        kind = "tree" if on_disk.is_dir() else "blob"
        return f"{repo_url(root)}/{kind}/{BRANCH}/{rel}" + (f"#{frag}" if frag else "")
    return target   # missing: left for Sphinx to warn about and the browser check to catch


def rewrite_links(text: str, src: str, pages: set[str], root: Path = ROOT) -> str:
    """Markdown of repository file ``src`` with its links and images made fit for the site.

    Links to staged pages (``pages``: repository-relative paths) stay relative; links to other
    repository files become GitHub links; remote images become the local Colab badge or a plain
    link (so a page never loads from the network). Fenced code blocks are left alone.
    """
    badge = posixpath.relpath(LOCAL_BADGE, posixpath.dirname(src) or ".")

    def inline(m: re.Match) -> str:
        target = m.group("target")
        bare = target[1:-1] if target.startswith("<") else target
        title = m.group("title") or ""
        if m.group("bang"):
            if _is_remote(bare):
                if COLAB_BADGE in bare:
                    return f"![{m.group('text')}]({badge}{title})"
                return f"[{m.group('text') or bare}]({bare})"
            return m.group(0)
        text = _INLINE.sub(inline, m.group("text"))    # a badge image inside a link
        new = _resolve(bare, src, pages, root)
        return f"[{text}]({new}{title})" if (new, text) != (bare, m.group("text")) else m.group(0)

    def refdef(m: re.Match) -> str:
        return m.group("lead") + _resolve(m.group("target"), src, pages, root)

    def html(m: re.Match) -> str:
        target = m.group("target")
        if m.group("attr") == "src" and _is_remote(target):
            target = badge if COLAB_BADGE in target else BLANK_IMAGE
        elif m.group("attr") == "href":
            target = _resolve(target, src, pages, root)
        return f'{m.group("attr")}="{target}"'

    out, chunk, fenced = [], [], False

    def flush():
        if chunk:
            block = "".join(chunk)
            block = _REFDEF.sub(refdef, _INLINE.sub(inline, block))
            out.append(_HTML_ATTR.sub(html, block))
            chunk.clear()

    for line in text.splitlines(keepends=True):
        if _FENCE.match(line):
            if not fenced:
                flush()
            fenced = not fenced
            out.append(line)
        elif fenced:
            out.append(line)
        else:
            chunk.append(line)
    flush()
    return "".join(out)


def local_images(text: str, src: str, root: Path = ROOT) -> list[str]:
    """The repository files that the Markdown of ``src`` shows as images (``![..](path)`` or
    ``<img src="path">``, outside fenced code), as root-relative paths, in order of appearance."""
    found: list[str] = []

    def add(target: str) -> None:
        target = target[1:-1] if target.startswith("<") else target
        path = target.partition("#")[0].partition("?")[0]
        if not path or _is_remote(path):
            return
        rel = posixpath.normpath(posixpath.join(posixpath.dirname(src), unquote(path)))
        if not rel.startswith("../") and (root / rel).is_file() and rel not in found:
            found.append(rel)

    fenced = False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            continue
        for m in _INLINE.finditer(line):
            if m.group("bang"):
                add(m.group("target"))
            for inner in _INLINE.finditer(m.group("text")):   # an image inside a link's text
                if inner.group("bang"):
                    add(inner.group("target"))
        for m in _HTML_ATTR.finditer(line):
            if m.group("attr") == "src":
                add(m.group("target"))
    return found


def _markdown_of(path: str, root: Path) -> str:
    """The Markdown of a page source: a notebook's markdown cells, or a Markdown file."""
    if path.endswith(".ipynb"):
        nb = json.loads((root / path).read_text("utf-8"))
        return "\n\n".join(_source(c) for c in _cells(nb) if c.get("cell_type") == "markdown")
    return (root / path).read_text("utf-8")


# ------------------------------------------------------------------------------------------------
# Staging
# ------------------------------------------------------------------------------------------------
def _download(label: str, target: str) -> str:
    """A MyST download role (``target`` relative to the staged source root)."""
    return f"{{download}}`{label} </{target}>`"


def _links_bar(lines: list[str]) -> dict:
    text = "```{container} dgss-links\n" + " ·\n".join(lines) + "\n```\n"
    return {"cell_type": "markdown", "id": "dgss-site-links", "metadata": {}, "source": text}


def _colab(path: str, root: Path) -> str:
    gh = repo_url(root).split("github.com/", 1)[-1]
    return f"[Open in Colab](https://colab.research.google.com/github/{gh}/blob/{BRANCH}/{path})"


def _stage_notebook(path: str, bar: list[str], pages: set[str], root: Path) -> str:
    """A notebook as the site shows it: the links bar after its title cell, links rewritten."""
    nb = json.loads((root / path).read_text("utf-8"))
    for cell in _cells(nb):
        if cell.get("cell_type") == "markdown":
            cell["source"] = rewrite_links(_source(cell), path, pages, root)
    cells = _cells(nb)
    has_colab = bool(cells) and "colab.research.google.com" in _source(cells[0])
    if not has_colab:
        bar = [*bar, _colab(path, root)]
    at = 1 if cells and cells[0].get("cell_type") == "markdown" else 0
    cells.insert(at, _links_bar(bar))
    nb["cells"] = cells
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def _rel(target: str, src: str) -> str:
    return posixpath.relpath(target, posixpath.dirname(src))


def _lessons_table(items: list[Lesson], root: Path) -> str:
    rows = ["| # | lesson | solutions | student copy | run it |", "|---|---|---|---|---|"]
    for ls in items:
        title = re.sub(r"^\d+\s*[·:.-]\s*", "", ls.title).replace("|", "\\|")
        sol = f"[solutions]({ls.solution})" if ls.solution else "-"
        stu = _download("download", f"_raw/{ls.student}") if ls.student else "-"
        rows.append(f"| {ls.number} | [{title}]({ls.path}) | {sol} | {stu} | "
                    f"{_colab(ls.path, root).replace('Open in Colab', 'Colab')} |")
    return "\n".join(rows) + "\n"


def _toctree(caption: str, entries: list[str]) -> str:
    if not entries:
        return ""
    body = "\n".join(entries)
    return f"```{{toctree}}\n:caption: {caption}\n:hidden:\n\n{body}\n```\n"


def _index(items: list[Lesson], docs: list[str], conf_dir: Path, has_readme: bool,
           root: Path) -> str:
    text = (conf_dir / "index.md").read_text("utf-8")
    more = []
    if has_readme:
        more.append("- [The README](README.md): quickstart, the lessons' map, ToyWorld, measured "
                    "figures, what runs where")
    more += [f"- [{_title(root / d)}]({d})" for d in docs]
    start = (["The README: overview and map <README>"] if has_readme else []) + [
        d.removesuffix(".md") for d in docs if Path(d).stem == "syllabus"]
    toc = [_toctree("Start here", start),
           _toctree("Lessons", [ls.path.removesuffix(".ipynb") for ls in items]),
           _toctree("Solutions", [ls.solution.removesuffix(".ipynb")
                                  for ls in items if ls.solution]),
           _toctree("Reference", [d.removesuffix(".md") for d in docs
                                  if Path(d).stem != "syllabus"])]
    fills = {"lessons": _lessons_table(items, root), "pages": "\n".join(more) + "\n",
             "toctrees": "\n".join(t for t in toc if t)}
    for marker, value in fills.items():
        text, n = re.subn(rf"<!-- {marker}:[^>]*-->\n?", lambda _m, v=value: v, text)
        if n != 1:
            raise ValueError(f"{conf_dir / 'index.md'} needs one '<!-- {marker}: ... -->' line")
    return text


def _write(path: Path, content: str | bytes) -> None:
    """Write only when the content changes, so that Sphinx rebuilds only what changed."""
    data = content.encode("utf-8") if isinstance(content, str) else content
    if path.exists() and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def stage(stage_dir: Path = STAGE_DIR, root: Path = ROOT, conf_dir: Path = CONF_DIR) -> list[str]:
    """Write the site's sources into ``stage_dir``; returns its page names (without suffix)."""
    items = lessons(root)
    docs = doc_pages(root)
    has_readme = (root / "README.md").exists()
    pages = {ls.path for ls in items} | {ls.solution for ls in items if ls.solution} | set(docs)
    pages |= {"README.md"} if has_readme else set()
    files: dict[str, str | bytes] = {}
    for ls in items:
        bar = []
        if ls.solution:
            bar.append(f"[Solutions to the exercises]({_rel(ls.solution, ls.path)})")
        bar.append(_download("Download this notebook (.ipynb)", f"_raw/{ls.path}"))
        if ls.student:
            bar.append(_download("Student copy (.ipynb, exercises as TODOs)",
                                 f"_raw/{ls.student}"))
        files[ls.path] = _stage_notebook(ls.path, bar, pages, root)
        files[f"_raw/{ls.path}"] = (root / ls.path).read_bytes()
        if ls.student:
            files[f"_raw/{ls.student}"] = (root / ls.student).read_bytes()
        if ls.solution:
            back = [f"Back to the lesson: [{ls.title}]({_rel(ls.path, ls.solution)})",
                    _download("Download these solutions (.ipynb)", f"_raw/{ls.solution}")]
            files[ls.solution] = _stage_notebook(ls.solution, back, pages, root)
            files[f"_raw/{ls.solution}"] = (root / ls.solution).read_bytes()
    for doc in docs + (["README.md"] if has_readme else []):
        files[doc] = rewrite_links((root / doc).read_text("utf-8"), doc, pages, root)
    files["index.md"] = _index(items, docs, conf_dir, has_readme, root)
    for page in sorted(pages):                  # images the pages show, at the same paths
        for image in local_images(_markdown_of(page, root), page, root):
            files.setdefault(image, (root / image).read_bytes())
    for asset in (conf_dir / "_assets").glob("*"):
        files[f"_assets/{asset.name}"] = asset.read_bytes()

    stage_dir.mkdir(parents=True, exist_ok=True)
    for rel, content in files.items():
        _write(stage_dir / rel, content)
    for old in [p for p in stage_dir.rglob("*") if p.is_file()]:   # renamed or removed sources
        if old.relative_to(stage_dir).as_posix() not in files:
            old.unlink()
    return sorted(posixpath.splitext(p)[0] for p in pages | {"index.md"})


# ------------------------------------------------------------------------------------------------
# Building
# ------------------------------------------------------------------------------------------------
def missing_packages(names: dict[str, str] | None = None) -> list[str]:
    """The PyPI names of the packages the site needs that do not import here."""
    import importlib.util

    names = SITE_PACKAGES if names is None else names
    return [pip for mod, pip in names.items() if importlib.util.find_spec(mod) is None]


def build_site(out_dir: Path = OUT_DIR, *, clean: bool = False, strict: bool = False,
               quiet: bool = True, stage_dir: Path = STAGE_DIR,
               doctree_dir: Path = DOCTREE_DIR) -> dict:
    """Stage the sources and run Sphinx; returns pages, warnings and seconds taken.

    A rebuild is incremental (only changed sources are read again) unless ``clean`` or the set
    of pages changed, in which case the output and the doctrees are made from scratch (so no
    page of a removed notebook is left behind). ``strict`` turns Sphinx warnings into errors.
    """
    missing = missing_packages()
    if missing:
        raise RuntimeError(f"the site needs {', '.join(missing)}: pip install -e '.[site]'")
    t0 = time.perf_counter()
    pages = stage(stage_dir)
    manifest = doctree_dir / "pages.json"
    if clean or not manifest.exists() or json.loads(manifest.read_text()) != pages:
        shutil.rmtree(out_dir, ignore_errors=True)
        shutil.rmtree(doctree_dir, ignore_errors=True)
    doctree_dir.mkdir(parents=True, exist_ok=True)
    warnings_file = doctree_dir / "warnings.txt"
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-c", str(CONF_DIR), "-d",
           str(doctree_dir), "-w", str(warnings_file), "--keep-going"]
    cmd += ["-W"] if strict else []
    cmd += ["-q"] if quiet else []
    proc = subprocess.run([*cmd, str(stage_dir), str(out_dir)], cwd=ROOT)
    warnings = [w for w in warnings_file.read_text("utf-8").splitlines() if w.strip()] \
        if warnings_file.exists() else []
    if proc.returncode != 0:
        raise RuntimeError(f"sphinx-build failed (exit {proc.returncode}):\n" + "\n".join(warnings))
    (out_dir / ".nojekyll").touch()    # GitHub Pages: serve _static/ and _images/ as they are
    manifest.write_text(json.dumps(pages))
    return {"pages": pages, "warnings": warnings, "seconds": time.perf_counter() - t0,
            "out": out_dir}


# ------------------------------------------------------------------------------------------------
# Serving and checking in a browser
# ------------------------------------------------------------------------------------------------
class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):   # no line per request
        pass


@contextlib.contextmanager
def serve(site_dir: Path = OUT_DIR, port: int = 0):
    """Serve ``site_dir`` on 127.0.0.1 in a thread; yields the base URL (``port=0``: any free)."""
    handler = functools.partial(_Quiet, directory=str(site_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def find_chromium() -> str | None:
    """A Chromium or Chrome binary: ``$CHROMIUM`` or the usual names on PATH."""
    env = os.environ.get("CHROMIUM")
    if env:
        return env if Path(env).exists() else shutil.which(env)
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable",
                 "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class CheckReport:
    """What the browser check found: ``problems`` is empty when every page is fine."""

    pages: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    screenshots: list[Path] = field(default_factory=list)
    math: int = 0                      # typeset formulas over all pages
    search_hits: int = 0
    seconds: float = 0.0


# Runs in the page once it has loaded: waits for MathJax, makes every image load, then reports.
_INSPECT = r"""
async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    await MathJax.startup.promise;
  }
  const imgs = Array.from(document.images);
  for (const img of imgs) { img.loading = "eager"; }
  await Promise.all(imgs.map(img => img.decode().catch(() => null)));
  const skip = "pre, code, script, style, textarea, mjx-container, .highlight, .math";
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  const raw = [];
  const pattern = /\$\$[\s\S]+?\$\$|\$(?=\S)[^$\n]+?(?<=\S)\$|\\\(|\\\)|\\\[|\\\]|\\begin\{/;
  while (walker.nextNode()) {
    const node = walker.currentNode;
    if (node.parentElement && node.parentElement.closest(skip)) continue;
    const m = node.textContent.match(pattern);
    if (m) raw.push(node.textContent.trim().slice(0, 120));
  }
  const pending = Array.from(document.querySelectorAll(".math"))
    .filter(el => !el.querySelector("mjx-container")).map(el => el.textContent.slice(0, 120));
  return {
    title: document.title,
    typeset: document.querySelectorAll("mjx-container").length,
    merror: Array.from(document.querySelectorAll("mjx-merror")).map(e => e.textContent),
    raw: raw, pending: pending,
    images: imgs.map(i => [i.currentSrc || i.src, i.complete, i.naturalWidth]),
    links: Array.from(document.querySelectorAll("a[href]")).map(a => a.href),
    height: document.documentElement.scrollHeight,
    // where the first figure of an output and the first formula end (for the screenshot)
    ends: ["article .cell_output img", "article mjx-container"].map(sel => {
      const el = document.querySelector(sel);
      return el ? el.getBoundingClientRect().bottom + window.scrollY : 0;
    }),
  };
}
"""


def _html_pages(site_dir: Path) -> list[str]:
    skip = {"_static", "_images", "_downloads", "_sources", "_sphinx_design_static"}
    return sorted(p.relative_to(site_dir).as_posix() for p in site_dir.rglob("*.html")
                  if not skip & set(p.relative_to(site_dir).parts))


def _ids(path: Path, cache: dict) -> set[str]:
    if path not in cache:
        text = path.read_text("utf-8", errors="replace")
        cache[path] = set(re.findall(r"\b(?:id|name)=\"([^\"]+)\"", text))
    return cache[path]


def _check_url(url: str, base: str, site_dir: Path, ids: dict) -> str | None:
    """Why an internal URL is broken (None: fine, or not internal)."""
    if not url.startswith(base):
        return None
    parts = urlsplit(url)
    path = unquote(parts.path)[len(urlsplit(base).path):]
    target = site_dir / path
    if not path or path.endswith("/"):
        target = target / "index.html"
    if not target.is_file():
        return f"no file {target.relative_to(site_dir).as_posix()}"
    if parts.fragment and target.suffix == ".html" and unquote(parts.fragment) not in _ids(
            target, ids):
        return f"no anchor #{parts.fragment} in {target.relative_to(site_dir).as_posix()}"
    return None


def check_site(site_dir: Path = OUT_DIR, shots_dir: Path = SHOTS_DIR, *,
               chromium: str | None = None, search_term: str | None = "Rein",
               shot_height: int = 1600, shot_max_height: int = 7000) -> CheckReport:
    """Load every page of a built site in headless Chromium (see the module docstring)."""
    from playwright.sync_api import sync_playwright

    chromium = chromium or find_chromium()
    if chromium is None:
        raise RuntimeError("no Chromium found (set $CHROMIUM or apt-get install chromium)")
    t0 = time.perf_counter()
    report = CheckReport(pages=_html_pages(site_dir))
    shots_dir.mkdir(parents=True, exist_ok=True)
    for old in shots_dir.glob("*.png"):
        old.unlink()
    lesson_pages = {f"{Path(ls.path).with_suffix('.html').as_posix()}": ls
                    for ls in lessons()}
    ids: dict = {}
    events: list[str] = []

    def on_route(route):
        url = route.request.url
        if urlsplit(url).hostname == "127.0.0.1" or url.startswith(("data:", "blob:", "about:",
                                                                   "file:")):
            route.continue_()
        else:
            events.append(f"request to the network: {url}")
            route.abort()

    with serve(site_dir) as base, tempfile.TemporaryDirectory(prefix="dgss-chromium-") as prof, \
            sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            prof, executable_path=chromium, headless=True, args=BROWSER_ARGS,
            viewport={"width": 1280, "height": 900}, offline=False)
        context.route("**/*", on_route)
        page = context.new_page()
        page.on("console", lambda m: events.append(f"console error: {m.text}")
                if m.type == "error" else None)
        page.on("pageerror", lambda e: events.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: events.append(
            f"request failed: {r.url} ({r.failure})"))
        page.on("response", lambda r: events.append(f"HTTP {r.status}: {r.url}")
                if r.status >= 400 else None)
        for rel in report.pages:
            events.clear()
            try:
                page.goto(base + rel, wait_until="load", timeout=30_000)
                info = page.evaluate(_INSPECT)
            except Exception as e:   # a page that does not load is a problem, not a crash
                report.problems.append(f"{rel}: did not load: {e}")
                continue
            problems = list(events)
            problems += [f"raw math left: {t!r}" for t in info["raw"]]
            problems += [f"math not typeset: {t!r}" for t in info["pending"]]
            problems += [f"MathJax error: {t!r}" for t in info["merror"]]
            for src, complete, width in info["images"]:
                if not complete or width == 0:
                    problems.append(f"broken image: {src}")
                else:
                    why = _check_url(src, base, site_dir, ids)
                    problems += [f"image {src}: {why}"] if why else []
            for href in sorted(set(info["links"])):
                why = _check_url(href, base, site_dir, ids)
                problems += [f"broken link {href}: {why}"] if why else []
            report.math += info["typeset"]
            if rel in lesson_pages:
                problems += _lesson_links(lesson_pages[rel], info["links"])
                shot = shots_dir / f"{Path(rel).stem}.png"
                # the top of the page down to its first figure and first formula (capped)
                bottom = max(shot_height, *(y + 80 for y in info["ends"]))
                page.screenshot(path=str(shot), full_page=True, clip={
                    "x": 0, "y": 0, "width": 1280,
                    "height": min(info["height"], bottom, shot_max_height)})
                report.screenshots.append(shot)
            report.problems += [f"{rel}: {p}" for p in problems]
        if "index.html" in report.pages:
            page.goto(base + "index.html", wait_until="load")
            page.screenshot(path=str(shots_dir / "index.png"), full_page=True, clip={
                "x": 0, "y": 0, "width": 1280, "height": min(shot_height, page.evaluate(
                    "document.documentElement.scrollHeight"))})
            report.screenshots.append(shots_dir / "index.png")
        # The same pages from file:// (no server): the front page and the first lesson.
        for rel in [p for p in ["index.html", *lesson_pages] if p in report.pages][:2]:
            events.clear()
            page.goto((site_dir / rel).resolve().as_uri(), wait_until="load")
            info = page.evaluate(_INSPECT)
            bad = [i[0] for i in info["images"] if not i[1] or i[2] == 0]
            report.problems += [f"file://{rel}: {p}" for p in
                                [*events, *(f"broken image: {b}" for b in bad),
                                 *(f"math not typeset: {t!r}" for t in info["pending"])]]
        # The search box: Sphinx's search page answers from searchindex.js.
        if search_term:
            events.clear()
            page.goto(f"{base}search.html?q={search_term}", wait_until="load")
            try:   # results come in as pages are scored; the summary line ends the search
                page.wait_for_function(
                    "(document.querySelector('#search-results .search-summary') || {})"
                    ".textContent?.includes('found')", timeout=20_000)
                report.search_hits = page.locator("#search-results ul.search li").count()
            except Exception:
                report.problems.append(f"search.html?q={search_term}: no results")
            page.screenshot(path=str(shots_dir / "search.png"))
            report.screenshots.append(shots_dir / "search.png")
            report.problems += [f"search.html: {e}" for e in events]
        context.close()
    report.seconds = time.perf_counter() - t0
    return report


def _lesson_links(ls: Lesson, links: list[str]) -> list[str]:
    """A lesson page must link its solutions page, its downloads and Colab."""
    names = {unquote(urlsplit(h).path).rsplit("/", 1)[-1] for h in links}
    want = [Path(ls.path).name]
    want += [Path(ls.solution).with_suffix(".html").name] if ls.solution else []
    want += [Path(ls.student).name] if ls.student else []
    out = [f"no link to {w}" for w in want if w not in names]
    if not any("colab.research.google.com" in h for h in links):
        out.append("no Colab link")
    return out


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT_DIR, help="output folder (build/site)")
    ap.add_argument("--clean", action="store_true", help="rebuild from scratch")
    ap.add_argument("--strict", action="store_true", help="Sphinx warnings are errors")
    ap.add_argument("--verbose", action="store_true", help="Sphinx's progress output")
    ap.add_argument("--serve", action="store_true", help="then serve it on 127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="port for --serve (8000)")
    ap.add_argument("--check", action="store_true",
                    help="then load every page in headless Chromium, screenshots to --shots")
    ap.add_argument("--shots", type=Path, default=SHOTS_DIR, help="screenshots (build/site-shots)")
    ap.add_argument("--no-build", action="store_true", help="check or serve what is built")
    args = ap.parse_args(argv)

    if not args.no_build:
        try:
            res = build_site(args.out, clean=args.clean, strict=args.strict,
                             quiet=not args.verbose)
        except RuntimeError as e:
            print(e, file=sys.stderr)
            return 1
        for w in res["warnings"]:
            print("warning:", w)
        print(f"built {len(res['pages'])} pages into {args.out} in {res['seconds']:.1f} s "
              f"({len(res['warnings'])} warnings); open {args.out / 'index.html'}")
    if args.check:
        missing = missing_packages(CHECK_PACKAGES)
        if missing or find_chromium() is None:
            print("the check needs " + (", ".join(missing) if missing else "a Chromium binary"),
                  file=sys.stderr)
            return 1
        rep = check_site(args.out, args.shots)
        for p in rep.problems:
            print("PROBLEM", p)
        print(f"checked {len(rep.pages)} pages in {rep.seconds:.1f} s: {len(rep.problems)} "
              f"problems, {rep.math} formulas typeset, {rep.search_hits} search hits; "
              f"screenshots in {args.shots}")
        if rep.problems:
            return 1
    if args.serve:
        with serve(args.out, args.port) as url:
            print(f"serving {args.out} on {url} (Ctrl-C stops)")
            with contextlib.suppress(KeyboardInterrupt):
                threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
