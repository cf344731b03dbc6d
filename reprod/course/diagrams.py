"""The lessons' architecture diagrams, drawn by code as plain SVG (no dependency beyond Python).

    python -m reprod.course.diagrams            # (re)write notebooks/assets/diagrams/*.svg
    python -m reprod.course.diagrams --check    # exit 1 if a committed SVG differs from the code's
    python -m reprod.course.diagrams --list     # the diagrams, their files and their notebooks

One diagram per method, each shown in its lesson notebook (a markdown cell with
``![...](assets/diagrams/<name>.svg)`` where the notebook starts building that piece):

============== ========================================== ====================================
name           what it shows                              notebook
============== ========================================== ====================================
rein           one Rein layer between frozen ViT blocks,  ``02_rein.ipynb``
               and the link from its tokens to the queries
tqdm           Mask2Former with class-text queries        ``03a_mask2former.ipynb``,
                                                          ``03b_text_queries.ipynb``
catseg         CAT-Seg's cost volume and its aggregation  ``04_catseg.ipynb``
querydiff      agent queries, the diffusion teacher at    ``05_querydiff.ipynb``
               two noise levels, the consistency loss
selective_scan Mamba's selective scan, step by step       ``06_mamba_from_scratch.ipynb``
mfuser         two frozen towers bridged by MVFusers,     ``07_mfuser.ipynb``
               and the MTEnhancer on the text side
============== ========================================== ====================================

Names and symbols are the notebooks' and the ``lessons`` modules' (their dimension glossaries);
the tensor shapes on the arrows (teal, monospace) use the glossary letters, and each diagram states
the toy sizes its notebook builds. One colour code throughout, explained by each diagram's legend:
grey = frozen, blue = trained, white = an operation without parameters, orange = a loss, a dashed
border = used in training only.

The output is a pure function of this file (fixed coordinates, no dates, no randomness), so the
committed SVGs can be checked for freshness (``--check``, ``tests/test_diagrams.py``). Every
diagram also carries a layout check, :meth:`Diagram.problems`: estimated text extents must stay
inside the canvas and their boxes, and free labels must not overlap each other, a box or an arrow.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DIAGRAMS", "DIAGRAM_DIR", "NOTEBOOKS", "Diagram", "check", "draw", "main", "render",
           "write"]

ROOT = Path(__file__).resolve().parents[2]
DIAGRAM_DIR = ROOT / "notebooks" / "assets" / "diagrams"

WIDTH = 800
SANS = "DejaVu Sans, Verdana, Helvetica, Arial, sans-serif"
MONO = "DejaVu Sans Mono, Menlo, Consolas, monospace"
INK, MUTED, SHAPE_INK, ARROW_INK = "#1f2937", "#4b5563", "#0f766e", "#475569"


@dataclass(frozen=True)
class Style:
    fill: str
    stroke: str
    ink: str
    legend: str


STYLES = {
    "frozen": Style("#e5e7eb", "#6b7280", "#1f2937", "frozen"),
    "trained": Style("#dbeafe", "#2563eb", "#1e3a8a", "trained"),
    "partial": Style("#e5e7eb", "#2563eb", "#1f2937", "frozen but for the named weights"),
    "op": Style("#ffffff", "#334155", "#1f2937", "operation, no parameters"),
    "io": Style("#f8fafc", "#94a3b8", "#1f2937", "input / output"),
    "loss": Style("#ffedd5", "#ea580c", "#7c2d12", "loss"),
}


# ------------------------------------------------------------------------------------------------
# Rich text: `...` is a shape (monospace, teal), _{...} a subscript, ^{...} a superscript,
# ~{...} an overline
# ------------------------------------------------------------------------------------------------
_MARK = re.compile(r"([_^~])\{([^{}]*)\}")
_NARROW = set(" iljtfr.,:;|!'()[]{}·")
_WIDE = set("mwMW⊙∑")


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _runs(s: str) -> list[tuple[str, bool, str]]:
    """(text, mono, shift) runs of a rich string; shift is '', 'sub', 'sup' or 'over'."""
    out = []
    for i, part in enumerate(s.split("`")):
        mono = i % 2 == 1
        pos = 0
        for m in _MARK.finditer(part):
            if m.start() > pos:
                out.append((part[pos:m.start()], mono, ""))
            out.append((m.group(2), mono, {"_": "sub", "^": "sup", "~": "over"}[m.group(1)]))
            pos = m.end()
        if pos < len(part):
            out.append((part[pos:], mono, ""))
    return [r for r in out if r[0]]


def _char_em(ch: str, mono: bool) -> float:
    if mono:
        return 0.61
    if ch in _NARROW:
        return 0.36
    if ch in _WIDE:
        return 0.95
    if ch.isupper() or ch.isdigit() or ch in "ΔΣ":
        return 0.7
    return 0.6


def text_width(s: str, size: float) -> float:
    """An upper estimate of a rich string's width in px (DejaVu Sans is the widest we ask for)."""
    w = 0.0
    for text, mono, shift in _runs(s):
        k = size * (0.72 if shift in ("sub", "sup") else 1.0)
        w += sum(_char_em(ch, mono) for ch in text) * k
    return w


def _tspans(s: str, size: float) -> str:
    """The SVG of a rich string: plain text and <tspan>s (sub/superscripts shift by ``dy``, which
    every SVG renderer supports, and the baseline is restored at the end)."""
    parts, dy = [], 0.0
    for text, mono, shift in _runs(s):
        target = {"sub": 0.3 * size, "sup": -0.38 * size}.get(shift, 0.0)
        attrs = []
        if target != dy:
            attrs.append(f'dy="{target - dy:g}"')
            dy = target
        if shift in ("sub", "sup"):
            attrs.append(f'font-size="{0.72 * size:g}"')
        elif shift == "over":
            attrs.append('text-decoration="overline"')
        if mono:
            attrs.append(f'font-family="{MONO}" fill="{SHAPE_INK}"')
        parts.append(f"<tspan {' '.join(attrs)}>{_esc(text)}</tspan>" if attrs else _esc(text))
    if dy:
        parts.append(f'<tspan dy="{-dy:g}"></tspan>')
    return "".join(parts)


# ------------------------------------------------------------------------------------------------
# Geometry
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rect:
    x: float
    y: float
    w: float
    h: float

    @property
    def cx(self) -> float:
        return self.x + self.w / 2

    @property
    def cy(self) -> float:
        return self.y + self.h / 2

    @property
    def top(self) -> tuple[float, float]:
        return (self.cx, self.y)

    @property
    def bottom(self) -> tuple[float, float]:
        return (self.cx, self.y + self.h)

    @property
    def left(self) -> tuple[float, float]:
        return (self.x, self.cy)

    @property
    def right(self) -> tuple[float, float]:
        return (self.x + self.w, self.cy)

    def x_at(self, frac: float) -> float:
        return self.x + frac * self.w

    def y_at(self, frac: float) -> float:
        return self.y + frac * self.h

    def overlaps(self, other: Rect, pad: float = 0.0) -> bool:
        return not (self.x + self.w + pad <= other.x or other.x + other.w + pad <= self.x
                    or self.y + self.h + pad <= other.y or other.y + other.h + pad <= self.y)

    def inside(self, other: Rect) -> bool:
        return (self.x >= other.x and self.y >= other.y and self.x + self.w <= other.x + other.w
                and self.y + self.h <= other.y + other.h)

    def hits_segment(self, a: tuple[float, float], b: tuple[float, float]) -> bool:
        """Whether the segment a-b passes through this rectangle (Liang-Barsky clipping)."""
        (x0, y0), (x1, y1) = a, b
        dx, dy = x1 - x0, y1 - y0
        t0, t1 = 0.0, 1.0
        for p, q in ((-dx, x0 - self.x), (dx, self.x + self.w - x0),
                     (-dy, y0 - self.y), (dy, self.y + self.h - y0)):
            if p == 0:
                if q < 0:
                    return False
                continue
            t = q / p
            if p < 0:
                t0 = max(t0, t)
            else:
                t1 = min(t1, t)
            if t0 > t1:
                return False
        return True


def _crosses(a, b, c, d) -> bool:
    """Whether segments a-b and c-d cross at a point inside both (touching ends excluded)."""
    def orient(p, q, r):
        v = (q[0] - p[0]) * (r[1] - p[1]) - (q[1] - p[1]) * (r[0] - p[0])
        return (v > 1e-9) - (v < -1e-9)
    o1, o2, o3, o4 = orient(a, b, c), orient(a, b, d), orient(c, d, a), orient(c, d, b)
    return o1 * o2 < 0 and o3 * o4 < 0


# ------------------------------------------------------------------------------------------------
# The drawing
# ------------------------------------------------------------------------------------------------
@dataclass
class _Label:
    rect: Rect                    # estimated extent
    what: str


@dataclass
class _Arrow:
    points: list[tuple[float, float]]


@dataclass
class Diagram:
    """An SVG canvas with boxes, arrows, labels and a layout check."""

    name: str
    height: float
    title: str
    subtitle: str = ""
    width: float = WIDTH
    body: list[str] = field(default_factory=list)
    boxes: list[tuple[Rect, str]] = field(default_factory=list)
    labels: list[_Label] = field(default_factory=list)
    arrows: list[_Arrow] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    dashed_used: bool = False
    issues: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.text(16, 26, self.title, size=16, weight="bold")
        if self.subtitle:
            for i, line in enumerate(self.subtitle.split("\n")):
                self.text(16, 46 + 16 * i, line, size=12, ink=MUTED)

    # -- primitives ------------------------------------------------------------------------------
    def text(self, x: float, y: float, s: str, size: float = 12, ink: str = INK,
             anchor: str = "start", weight: str = "normal", check: bool = True) -> Rect:
        """A line of rich text at baseline ``y``; ``check``: take part in the layout check."""
        w = text_width(s, size)
        x0 = {"start": x, "middle": x - w / 2, "end": x - w}[anchor]
        rect = Rect(x0, y - 0.8 * size, w, 1.05 * size)
        bold = f' font-weight="{weight}"' if weight != "normal" else ""
        self.body.append(f'<text x="{x:g}" y="{y:g}" font-size="{size:g}" fill="{ink}" '
                         f'text-anchor="{anchor}" xml:space="preserve"{bold}>'
                         f'{_tspans(s, size)}</text>')
        if check:
            self.labels.append(_Label(rect, s))
        return rect

    def box(self, x: float, y: float, w: float, h: float, lines: str | Sequence[str],
            kind: str = "trained", dashed: bool = False, size: float = 13,
            align: str = "middle", sizes: Sequence[float] | None = None) -> Rect:
        """A box; the first line is its name (bold), the others smaller (details, shapes);
        ``align="start"`` left-aligns the lines after the first (equations)."""
        st = STYLES[kind]
        if kind not in self.kinds:
            self.kinds.append(kind)
        self.dashed_used |= dashed
        rect = Rect(x, y, w, h)
        rx = 14 if kind == "op" else 5
        dash = ' stroke-dasharray="6 4"' if dashed else ""
        self.body.append(f'<rect x="{x:g}" y="{y:g}" width="{w:g}" height="{h:g}" rx="{rx}" '
                         f'fill="{st.fill}" stroke="{st.stroke}" stroke-width="1.6"{dash}/>')
        lines = [lines] if isinstance(lines, str) else list(lines)
        sizes = list(sizes or [size] + [size - 1.5] * (len(lines) - 1))
        total = sum(1.25 * s for s in sizes)
        yy = y + (h - total) / 2
        for i, (line, s) in enumerate(zip(lines, sizes, strict=True)):
            yy += 1.25 * s
            left = align == "start" and i > 0
            r = self.text(x + 10 if left else x + w / 2, yy - 0.3 * s, line, size=s, ink=st.ink,
                          anchor="start" if left else "middle",
                          weight="bold" if i == 0 and kind != "op" else "normal", check=False)
            if not r.inside(Rect(x + 3, y + 1, w - 6, h - 2)):
                self.issues.append(f"text {line!r} does not fit its box")
        self.boxes.append((rect, kind))
        return rect

    def op(self, x: float, y: float, w: float, h: float, lines: str | Sequence[str],
           size: float = 12.5, sizes: Sequence[float] | None = None) -> Rect:
        """An operation without parameters (white, rounded)."""
        return self.box(x, y, w, h, lines, "op", size=size, sizes=sizes)

    def circle(self, cx: float, cy: float, symbol: str = "+", r: float = 11) -> Rect:
        self.body.append(f'<circle cx="{cx:g}" cy="{cy:g}" r="{r:g}" fill="#ffffff" '
                         f'stroke="#334155" stroke-width="1.6"/>')
        self.body.append(f'<text x="{cx:g}" y="{cy + 5.5:g}" font-size="17" fill="{INK}" '
                         f'text-anchor="middle">{_esc(symbol)}</text>')
        if "op" not in self.kinds:
            self.kinds.append("op")
        rect = Rect(cx - r, cy - r, 2 * r, 2 * r)
        self.boxes.append((rect, "op"))
        return rect

    def dot(self, x: float, y: float) -> None:
        self.body.append(f'<circle cx="{x:g}" cy="{y:g}" r="3" fill="{ARROW_INK}"/>')

    def frame(self, x: float, y: float, w: float, h: float, label: str = "",
              ink: str = "#64748b") -> Rect:
        """A dashed grouping frame (not a box: arrows and labels may sit inside it)."""
        self.body.append(f'<rect x="{x:g}" y="{y:g}" width="{w:g}" height="{h:g}" rx="10" '
                         f'fill="none" stroke="{ink}" stroke-width="1.2" '
                         f'stroke-dasharray="3 4"/>')
        if label:
            self.text(x + 10, y + 16, label, size=12, ink=ink, weight="bold")
        return Rect(x, y, w, h)

    def arrow(self, points: Sequence[tuple[float, float]], label: str = "",
              seg: int | None = None, t: float = 0.5, side: str = "", dx: float = 0,
              dy: float = 0, head: bool = True, size: float = 11.5) -> None:
        """An orthogonal polyline with an arrowhead and an optional ``label`` beside segment
        ``seg`` (default: the longest) at fraction ``t`` of it: right of (or ``side="left"``)
        a vertical segment, above (``"below"``, or ``"split"``: first line above, the rest
        below) a horizontal one; ``\\n`` separates lines, backticks mark shapes."""
        pts = [(float(x), float(y)) for x, y in points]
        d = " ".join(f"{x:g},{y:g}" for x, y in pts)
        end = f' marker-end="url(#{self.name}-head)"' if head else ""
        self.body.append(f'<polyline points="{d}" fill="none" stroke="{ARROW_INK}" '
                         f'stroke-width="1.5"{end}/>')
        arrow = _Arrow(pts)
        self.arrows.append(arrow)
        if label:
            self.arrow_label(arrow, label, seg, t, side, dx, dy, size)

    def arrow_label(self, arrow: _Arrow, label: str, seg: int | None, t: float, side: str,
                    dx: float, dy: float, size: float) -> None:
        pts = arrow.points
        if seg is None:
            seg = max(range(len(pts) - 1), key=lambda i: abs(pts[i + 1][0] - pts[i][0])
                      + abs(pts[i + 1][1] - pts[i][1]))
        (x0, y0), (x1, y1) = pts[seg], pts[seg + 1]
        mx, my = x0 + t * (x1 - x0), y0 + t * (y1 - y0)
        lines = label.split("\n")
        if x0 == x1:                                        # vertical: beside it
            side = side or "right"
            anchor = "start" if side == "right" else "end"
            x = mx + (7 if side == "right" else -7)
            top = my - (len(lines) - 1) * 0.65 * 1.2 * size + 0.35 * size
        else:                                   # horizontal: above, below, or split by it
            side = side or "above"
            anchor = "middle"
            x = mx
            if side == "split":                 # the first line above, the others below
                self.text(x + dx, my - 6 + dy, lines[0], size=size, anchor=anchor)
                lines, side = lines[1:], "below"
            top = (my - 6 - (len(lines) - 1) * 1.2 * size if side == "above"
                   else my + 6 + 0.8 * size)
        for i, line in enumerate(lines):
            self.text(x + dx, top + dy + i * 1.2 * size, line, size=size, anchor=anchor)

    def note(self, x: float, y: float, s: str, size: float = 11.5, anchor: str = "start",
             ink: str = MUTED) -> None:
        for i, line in enumerate(s.split("\n")):
            self.text(x, y + i * 1.25 * size, line, size=size, ink=ink, anchor=anchor)

    def legend(self, y: float, shape: str = "(B, …)") -> None:
        """A swatch per box kind used, the dashed border if used, the shape font (wraps)."""
        items = [(k, STYLES[k].legend) for k in STYLES if k in self.kinds]
        if self.dashed_used:
            items.append(("dashed", "training only"))
        items.append(("", f"`{shape}` tensor shapes"))
        x = 16.0
        for kind, label in items:
            need = (28 if kind else 0) + text_width(label, 11.5)
            if x + need > self.width - 12:
                x, y = 16.0, y + 20
            if kind:
                st = STYLES.get(kind, Style("#ffffff", "#6b7280", INK, ""))
                rx = 7 if kind == "op" else 3
                dash = ' stroke-dasharray="4 3"' if kind == "dashed" else ""
                self.body.append(f'<rect x="{x:g}" y="{y - 10:g}" width="22" height="13" '
                                 f'rx="{rx}" fill="{st.fill}" stroke="{st.stroke}" '
                                 f'stroke-width="1.4"{dash}/>')
                x += 28
            r = self.text(x, y, label, size=11.5, ink=MUTED)
            x = r.x + r.w + 16

    # -- the layout check --------------------------------------------------------------------------
    def problems(self) -> list[str]:
        """Layout problems found from estimated text extents (empty: none found)."""
        out = list(self.issues)
        canvas = Rect(2, 2, self.width - 4, self.height - 4)
        box_rects = [r for r, _ in self.boxes]
        for lab in self.labels:
            if not lab.rect.inside(canvas):
                out.append(f"label {lab.what!r} leaves the canvas")
            for r in box_rects:
                if lab.rect.overlaps(r):
                    out.append(f"label {lab.what!r} overlaps a box at ({r.x:g}, {r.y:g})")
            for arrow in self.arrows:
                pts = arrow.points
                if any(lab.rect.hits_segment(pts[i], pts[i + 1]) for i in range(len(pts) - 1)):
                    out.append(f"label {lab.what!r} touches an arrow starting at {pts[0]}")
        for i, a in enumerate(self.labels):
            for b in self.labels[i + 1:]:
                if a.rect.overlaps(b.rect, pad=1):
                    out.append(f"labels {a.what!r} and {b.what!r} overlap")
        segs = []
        for k, arrow in enumerate(self.arrows):
            pts = arrow.points
            for i in range(len(pts) - 1):
                a, b = pts[i], pts[i + 1]
                segs.append((k, a, b))
                for r in box_rects:          # arrows start and end on borders, never inside
                    inner = Rect(r.x + 1.5, r.y + 1.5, r.w - 3, r.h - 3)
                    if inner.hits_segment(a, b):
                        out.append(f"arrow from {pts[0]} passes through a box at "
                                   f"({r.x:g}, {r.y:g})")
        for i, (k1, a, b) in enumerate(segs):
            for k2, c, d in segs[i + 1:]:
                if k1 != k2 and _crosses(a, b, c, d):
                    out.append(f"arrows from {self.arrows[k1].points[0]} and "
                               f"{self.arrows[k2].points[0]} cross")
        return out

    def svg(self) -> str:
        head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width:g}" '
                f'height="{self.height:g}" viewBox="0 0 {self.width:g} {self.height:g}" '
                f'font-family="{SANS}" role="img" aria-labelledby="{self.name}-title">\n'
                f'<title id="{self.name}-title">{_esc(self.title)}</title>\n'
                f'<defs><marker id="{self.name}-head" viewBox="0 0 10 10" refX="9" refY="5" '
                f'markerWidth="7" markerHeight="7" orient="auto-start-reverse">'
                f'<path d="M0,0 L10,5 L0,10 z" fill="{ARROW_INK}"/></marker></defs>\n'
                f'<rect width="100%" height="100%" fill="#ffffff"/>\n')
        return head + "\n".join(self.body) + "\n</svg>\n"


# ------------------------------------------------------------------------------------------------
# 1. Rein (notebook 02, lessons/rein.py)
# ------------------------------------------------------------------------------------------------
def rein() -> Diagram:
    g = Diagram("rein", 780, "Rein: learnable tokens refine a frozen ViT between its blocks",
                "One Rein layer i (Eq. 3-7), run after every block; its tokens also become the "
                "decoder's queries (Eq. 8-10).\nToy sizes of sections 2-4: B = 2 images, "
                "n = 128 patches (8 x 16), c = 64, m = 10 tokens, N = 4 layers, q = 32, "
                "rank r = 3.")
    # the frozen backbone, top to bottom on the left
    blk = g.box(20, 96, 150, 40, ["frozen ViT block i"], "frozen")
    blk2 = g.box(20, 672, 150, 40, ["frozen ViT block i+1"], "frozen")
    plus = g.circle(95, 600)
    g.frame(196, 86, 384, 542, "Rein layer i (its MLPs shared by all layers)")
    g.frame(598, 86, 186, 542, "link to the queries")
    g.arrow([blk.bottom, (95, plus.y)], "f_{i}\n`(B, n, c)`", t=0.12, size=12)
    g.dot(95, 268)
    g.dot(95, 476)
    g.arrow([plus.bottom, blk2.top], "f_{i+1} = f_{i} + Δf_{i}   `(B, n, c)`", size=12)
    g.note(20, 738, "Prefix tokens (CLS, registers) pass through unchanged. Token 0 is a null "
                    "sink: in the softmax, then dropped.")
    # the tokens: T_i = A_i B_i (LoRA)
    a = g.box(212, 118, 96, 38, ["A_{i}", "`(m, r)`"])
    b = g.box(322, 118, 96, 38, ["B_{i}", "`(r, c)`"])
    ab = g.op(220, 180, 190, 30, "T_{i} = A_{i} · B_{i}  (LoRA)")
    g.arrow([a.bottom, (a.cx, ab.y)])
    g.arrow([b.bottom, (b.cx, ab.y)])
    # similarity, token 0 dropped, update
    s = g.op(215, 250, 200, 36, "S = softmax(f_{i} T_{i}^{⊤} / √c)")
    g.arrow([ab.bottom, (ab.cx, s.y)], "T_{i} `(m, c)`", t=0.72, side="left")
    g.arrow([(95, 268), s.left])
    drop = g.op(215, 322, 200, 30, "drop token 0: S[:, :, 1:]")
    g.arrow([s.bottom, (s.cx, drop.y)], "S `(B, n, m)`", t=0.45)
    mm = g.op(215, 392, 200, 30, "S[:, :, 1:] · W_{T}(T_{i}[1:])")
    g.arrow([drop.bottom, (drop.cx, mm.y)], "`(B, n, m-1)`", t=0.45)
    wt = g.box(440, 322, 126, 40, ["W_{T}", "shared MLP c → c"], size=12.5)
    g.dot(ab.cx, 228)
    g.arrow([(ab.cx, 228), (wt.cx, 228), wt.top], "T_{i}[1:]  `(m-1, c)`", seg=0, t=0.55,
            side="below")
    g.arrow([wt.bottom, (wt.cx, mm.cy), mm.right], "`(m-1, c)`", seg=0, t=0.5)
    add = g.op(215, 460, 200, 32, "~{Δf}_{i} + f_{i}")
    g.arrow([mm.bottom, (mm.cx, add.y)], "~{Δf}_{i} `(B, n, c)`", t=0.45)
    g.arrow([(95, 476), add.left])
    wf = g.box(240, 516, 150, 36, ["W_{f}", "shared MLP c → c"], size=12.5)
    g.arrow([add.bottom, wf.top], "`(B, n, c)`", t=0.4)
    sc = g.op(215, 580, 200, 40, ["× scale", "learnable, 1e-3 at init"])
    g.arrow([wf.bottom, sc.top])
    g.arrow([sc.left, plus.right], "Δf_{i}\n`(B, n, c)`", side="split", dx=-4)
    # the link: tokens of every layer -> W_Q -> max / mean / last -> W_Q' -> queries
    wq = g.box(612, 226, 158, 40, ["W_{Q}", "shared, c → q"], size=12.5)
    g.arrow([ab.right, (wq.cx, ab.cy), wq.top], "T_{1} … T_{N}  `(N, m, c)`", seg=0, t=0.96)
    red = g.op(612, 312, 158, 62, ["max, mean, last", "over the N layers,",
                                   "interleaved per channel"], size=12)
    g.arrow([wq.bottom, red.top], "Q_{i} `(N, m, q)`", t=0.5)
    wq2 = g.box(612, 420, 158, 40, ["W_{Q'} (merge)", "3q → q"], size=12.5)
    g.arrow([red.bottom, wq2.top], "`(m, 3q)`", t=0.5)
    dec = g.box(612, 530, 158, 70, ["Mask2Former", "decoder (notebook 03a)", "position Q,",
                                    "content querys2feat(Q)"], size=12.5)
    g.arrow([wq2.bottom, dec.top], "Q `(m, q)`", t=0.5)
    g.legend(766)
    return g


# ------------------------------------------------------------------------------------------------
# 2. Mask2Former with class-text queries: tqdm (notebooks 03a-03b, lessons/mask2former.py)
# ------------------------------------------------------------------------------------------------
def tqdm() -> Diagram:
    g = Diagram("tqdm", 930, "tqdm: Mask2Former whose queries are the class names' text embeddings",
                "Query k starts from the text embedding of class k, so it is matched to class k "
                "(identity matching).\nToy sizes (notebook 03b): B images of H x W = 64 x 128, "
                "C = 192, grid h x w = 8 x 16, E = 128, K = Q = 19 classes, D = 64.")
    # inputs and the two towers
    img = g.box(70, 84, 160, 38, ["image", "`(B, 3, H, W)`"], "io")
    names = g.box(548, 84, 112, 40, ["class names", "K = 19"], "io")
    ctx = g.box(672, 84, 112, 40, ["ctx_{1} … ctx_{5}", "learnable"])
    vis = g.box(30, 150, 240, 54, ["visual tower (toy VLM)", "fine-tuned at lr × 0.1",
                                   "6 blocks of width C"])
    txt = g.box(560, 150, 212, 54, ["text tower", "[SOT, ctx, name_{k}, EOT]",
                                    "prompt tuning (CoOp)"], "frozen")
    g.arrow([img.bottom, (img.cx, vis.y)])
    g.arrow([names.bottom, (names.cx, txt.y)])
    g.arrow([ctx.bottom, (ctx.cx, txt.y)])
    # visual side: maps -> neck -> pixel decoder; dense / global -> context decoder, alignment
    neck = g.box(60, 262, 180, 40, ["SimpleFPN neck", "lr × 0.1"])
    g.arrow([(150, vis.y + vis.h), (150, neck.y)],
            "4 maps (blocks 1, 2, 3, 5)\n`(B, C, h, w)` each", t=0.5)
    cdec = g.box(560, 256, 212, 44, ["context decoder", "texts refined per image"])
    align = g.box(350, 330, 196, 58, ["pixel-text alignment", "cos(dense, t_{k}) / τ, τ = 0.07",
                                      "cross-entropy per pixel"], "loss", size=12.5)
    g.arrow([vis.right, (440, vis.cy), (440, align.y)], "dense `(B, E, h, w)`", seg=0, t=0.5)
    g.dot(440, 278)
    g.arrow([(440, 278), cdec.left], "+ global `(B, E)`", t=0.5, dx=2)
    g.arrow([txt.bottom, (txt.cx, cdec.y)], "t_{0} `(K, E)`", t=0.45)
    # text side: t -> alignment, pixel decoder, queries
    tproj = g.box(560, 536, 212, 44, ["text_proj", "Linear-ReLU-Linear, E → D"])
    g.arrow([cdec.bottom, tproj.top], "t `(B, K, E)`", t=0.08)
    g.dot(666, 359)
    g.arrow([(666, 359), align.right])
    pix = g.box(20, 430, 330, 70, ["pixel decoder (3 layers; paper 6)",
                                   "deformable attention over strides 32, 16, 8",
                                   "cross-attention to the class texts, FFN"])
    g.arrow([(150, neck.y + neck.h), (150, pix.y)], "strides 4, 8, 16, 32:\n"
            "`(B, C, 16, 32)`, …,\n`(B, C, 2, 4)`", t=0.45)
    g.dot(666, 466)
    g.arrow([(666, 466), (pix.x + pix.w, 466)], "t `(B, K, E)`", t=0.5)
    # the transformer decoder and its heads
    td = g.box(70, 624, 450, 62, [
        "masked-attention transformer decoder",
        "6 layers (paper 9): masked cross-attention → self-attention → FFN",
        "a prediction before the first layer and after each"])
    g.arrow([(220, pix.y + pix.h), (220, td.y)], "memories, strides 32, 16, 8\n"
            "3 × `(B, D, h_{l}, w_{l})`", t=0.45)
    g.arrow([tproj.bottom, (666, 655), td.right], "queries `(B, Q, D)`\n+ positions `(Q, D)`",
            seg=1, side="split", t=0.5, dx=4)
    mhead = g.box(70, 744, 190, 40, ["mask head", "MLP(q) · mask features"])
    chead = g.box(300, 744, 190, 40, ["class head", "Linear D → K+1"])
    g.arrow([(40, pix.y + pix.h), (40, mhead.cy), mhead.left], "mask features\n`(B, D, H/4, W/4)`",
            seg=0, t=0.2, side="right")
    g.arrow([(mhead.cx, td.y + td.h), mhead.top], "`(B, Q, D)`", t=0.5)
    g.arrow([(chead.cx + 25, td.y + td.h), (chead.cx + 25, chead.y)], "`(B, Q, D)`", t=0.5)
    loss = g.box(70, 846, 420, 44, ["identity matching (query k ↔ class k) + mask loss",
                                    "2 · CE + 5 · BCE + 5 · dice, on all 7 predictions"], "loss")
    g.arrow([mhead.bottom, (mhead.cx, loss.y)], "masks `(B, Q, H/4, W/4)`", t=0.5)
    g.arrow([chead.bottom, (chead.cx, loss.y)], "classes `(B, Q, K+1)`", t=0.5)
    g.note(548, 744, "At inference: semantic map\nΣ_{q} softmax(class_{q})_{k} · σ(mask_{q})\n"
                     "`(B, K, H/4, W/4)`\n\nTraining also regularises t\n(vs frozen texts) and "
                     "the\nglobal embedding (vs the\ninitial encoder's).")
    g.legend(918)
    return g


# ------------------------------------------------------------------------------------------------
# 3. CAT-Seg (notebook 04, lessons/catseg.py)
# ------------------------------------------------------------------------------------------------
def catseg() -> Diagram:
    g = Diagram("catseg", 960, "CAT-Seg: segmenting by aggregating the image-text cost volume",
                "Only the cost C(i, l) = cos(D^{V}(i), D^{L}(l)) carries the classes; any list of "
                "class names works at test time.\nToy sizes (notebook 04): grid h x w = 8 x 16, "
                "D = 192, E = 128, C = 32, P = 1, T = 19 (18 in training: bus is held out).")
    # the two CLIP towers
    img = g.box(50, 84, 160, 38, ["image", "`(B, 3, H, W)`"], "io")
    names = g.box(572, 84, 200, 40, ["T class names", "\"A photo of a {} in the scene\""], "io",
                  size=12.5)
    venc = g.box(16, 150, 240, 54, ["CLIP image encoder", "toy VLM, 6 blocks",
                                    "only q, v fine-tuned (lr × 0.01)"], "partial")
    tenc = g.box(562, 150, 220, 54, ["CLIP text encoder", "only q, v fine-tuned",
                                     "(lr × 0.01)"], "partial")
    g.arrow([img.bottom, (img.cx, venc.y)])
    g.arrow([names.bottom, (names.cx, tenc.y)])
    cost = g.op(340, 252, 200, 44, ["cost volume", "cosine of every (pixel, class)"])
    g.arrow([venc.right, (400, venc.cy), (400, cost.y)], "D^{V}, dense\n`(B, E, h, w)`", seg=1,
            t=0.5, side="left")
    g.arrow([tenc.left, (480, tenc.cy), (480, cost.y)], "D^{L}\n`(B, T, P, E)`", seg=1, t=0.5)
    # cost embedding, then 2 x (spatial, class) aggregation
    emb = g.box(340, 326, 200, 40, ["cost embedding", "7 × 7 conv, P → C, per class"])
    g.arrow([cost.bottom, emb.top], "C `(B, P, T, h, w)`", t=0.45)
    g.frame(324, 396, 228, 200)
    g.text(316, 590, "× 2 aggregation layers", size=12, ink="#64748b", weight="bold",
           anchor="end")
    spa = g.box(340, 420, 200, 60, ["spatial aggregation", "Swin blocks, 4 × 4 windows",
                                    "per class; q, k see [F; G]"])
    g.arrow([emb.bottom, spa.top], "F `(B, C, T, h, w)`", t=0.4)
    cla = g.box(340, 516, 200, 60, ["class aggregation", "linear attention over T",
                                    "per pixel; q, k see [F; text]"])
    g.arrow([spa.bottom, cla.top], "`(B, C, T, h, w)`", t=0.5)
    gproj = g.box(160, 326, 140, 40, ["guidance proj.", "3 × 3 conv, E → C"], size=12.5)
    g.arrow([(230, venc.y + venc.h), gproj.top], "D^{V}", t=0.5)
    g.arrow([gproj.bottom, (230, spa.cy), spa.left], "G `(B, C, h, w)`", seg=0, t=0.55,
            side="left")
    tproj = g.box(630, 526, 154, 40, ["text guidance", "Linear, E → C"], size=12.5)
    g.arrow([(tproj.cx, tenc.y + tenc.h), tproj.top], "D^{L}", t=0.5)
    g.arrow([tproj.left, cla.right], "`(B, T, C)`", t=0.5)
    # the upsampling decoder, guided by intermediate CLIP layers
    up1 = g.box(50, 652, 180, 44, ["upsample1 + proj.", "ConvT × 2, 3 × 3 conv"], size=12.5)
    up2 = g.box(50, 756, 180, 44, ["upsample2 + proj.", "ConvT × 4, 3 × 3 conv"], size=12.5)
    g.arrow([(70, venc.y + venc.h), (70, up1.y)], "block 1\n`(B, D, h, w)`", t=0.1)
    g.arrow([(30, venc.y + venc.h), (30, up2.cy), up2.left], "block 3\n`(B, D, h, w)`",
            seg=0, t=0.9)
    dec1 = g.box(340, 646, 200, 56, ["decoder stage 1", "ConvT × 2, concat guidance,",
                                     "two 3 × 3 convs"], size=12.5)
    dec2 = g.box(340, 750, 200, 56, ["decoder stage 2", "ConvT × 2, concat guidance,",
                                     "two 3 × 3 convs"], size=12.5)
    g.arrow([cla.bottom, dec1.top], "`(B, C, T, h, w)`", t=0.64)
    g.arrow([up1.right, (dec1.x, up1.cy)], "G_{1}\n`(B, 8, 2h, 2w)`", side="split")
    g.arrow([up2.right, (dec2.x, up2.cy)], "G_{2}\n`(B, 4, 4h, 4w)`", side="split")
    g.arrow([dec1.bottom, dec2.top], "`(B·T, 16, 2h, 2w)`", t=0.5)
    head = g.box(360, 850, 160, 40, ["head", "3 × 3 conv → 1 logit"], size=12.5)
    g.arrow([dec2.bottom, head.top], "`(B·T, 8, 4h, 4w)`", t=0.45)
    loss = g.box(640, 844, 144, 52, ["sigmoid BCE", "per pixel and class"], "loss", size=12.5)
    g.arrow([head.right, loss.left], "logits\n`(B, T, 4h, 4w)`", side="split", t=0.5)
    g.note(584, 660, "The aggregator never sees\na class name, only costs:\nat test time any T "
                     "works\n(the held-out bus is\nscored too).")
    g.legend(930)
    return g


# ------------------------------------------------------------------------------------------------
# 4. QueryDiff (notebook 05, lessons/querydiff.py)
# ------------------------------------------------------------------------------------------------
def querydiff() -> Diagram:
    g = Diagram("querydiff", 950, "QueryDiff: agent queries taught by a frozen diffusion model",
                "Rein + Mask2Former with image-dependent agent queries; the teacher and the "
                "consistency loss exist in training only.\nToy sizes (notebook 05): c = 192, "
                "h x w = 8 x 16, L = 4 layers, r = 19 agent queries, D = 64; C_{j} = 64, 64, 32.")
    # the segmentor (left)
    img = g.box(35, 84, 160, 38, ["image", "`(B, 3, H, W)`"], "io")
    enc = g.box(20, 150, 190, 54, ["toy VFM, frozen", "+ Rein tokens (trained)",
                                   "as in notebooks 02-03a"], "partial")
    g.arrow([img.bottom, (img.cx, enc.y)])
    pix = g.box(20, 256, 190, 44, ["neck + pixel decoder", "Mask2Former (notebook 03a)"],
                size=12.5)
    g.arrow([enc.bottom, pix.top], "L = 4 maps `(B, c, h, w)`", t=0.5)
    agen = g.box(230, 256, 190, 74, ["agent queries", "pool each layer's tokens",
                                     "with r learnable queries,", "merge 4 → 2 → 1 groups"],
                 size=12.5)
    g.arrow([enc.right, (agen.cx, enc.cy), agen.top])
    g.dot(agen.cx, 380)
    aproj = g.box(250, 410, 150, 40, ["agent_proj", "Linear c → D"], size=12.5)
    g.arrow([agen.bottom, aproj.top], "q_{agent} `(B, r, c)`", t=0.28)
    ref = g.box(20, 506, 190, 54, ["agent refinement", "cross-attention to agents,",
                                   "dilated depth-wise convs"], size=12.5)
    g.arrow([pix.bottom, ref.top], "mask features\n`(B, D, H/4, W/4)`\n+ 3 memories\n"
            "`(B, D, h_{l}, w_{l})`", t=0.5)
    g.arrow([aproj.bottom, (aproj.cx, ref.cy), ref.right], "agents\n`(B, r, D)`", seg=0, t=0.5)
    dec = g.box(20, 620, 190, 54, ["transformer decoder", "masked attention, queries",
                                   "from Rein's link"], size=12.5)
    g.arrow([ref.bottom, dec.top], "refined maps, same shapes", t=0.5)
    pred = g.box(250, 626, 160, 42, ["prediction", "`(B, K, H/4, W/4)`"], "io")
    g.arrow([dec.right, pred.left])
    lseg = g.box(20, 740, 190, 44, ["L_{seg}", "mask classification"], "loss")
    g.arrow([dec.bottom, lseg.top], "7 predictions", t=0.5)
    # the teacher (right): one noise draw at two timesteps
    noise = g.op(452, 150, 332, 58, ["noise the image once (Eq. 1), z_{0}: 32 × 64 in [-1, 1]",
                                     "z_{t} = √ᾱ_{t} z_{0} + √(1 - ᾱ_{t}) ε, the same ε at",
                                     "t_{w} = 5 and t_{s} = 100 (SD's 0 and 100)"], size=12)
    g.arrow([img.right, (noise.cx, img.cy), noise.top], "`(B, 3, H, W)`", seg=0, t=0.75)
    weak = g.box(452, 266, 160, 44, ["U-Net at t_{w}", "weak noise"], "frozen", dashed=True)
    strong = g.box(624, 266, 160, 44, ["U-Net at t_{s}", "strong noise"], "frozen", dashed=True)
    g.arrow([(weak.cx, noise.y + noise.h), weak.top], "z_{t}  `(B, 3, 32, 64)`", t=0.5,
            side="left")
    g.arrow([(strong.cx, noise.y + noise.h), strong.top], "z_{t}", t=0.5, side="left")
    dcl = g.box(452, 420, 332, 146, ["diffusion consistency loss (Eq. 8-12)",
                                     "per hooked layer j, n = h_{j} w_{j} locations:",
                                     "k_{j} = MLP_{j}(q_{agent})   `(B, r, C_{j})`",
                                     "S_{j} = softmax_{r}(f_{w} k_{j}^{⊤} / √C_{j})   `(B, n, r)`",
                                     "L_{dist} = KL(softmax_{c}(f_{s}) ‖ softmax_{c}(S_{j} k_{j}))",
                                     "q_{opt} = S̃_{j}^{⊤} f_{s}   `(B, r, C_{j})`",
                                     "L_{sup} = Huber(k_{j}, sg(q_{opt}))"], "loss", dashed=True,
                size=13.5, align="start")
    g.arrow([weak.bottom, (weak.cx, dcl.y)], "f_{w}\n`(B, C_{j}, h_{j}, w_{j})`", t=0.32)
    g.arrow([strong.bottom, (strong.cx, dcl.y)], "f_{s}\n`(B, C_{j}, h_{j}, w_{j})`", t=0.68,
            side="left")
    g.arrow([(agen.cx, 380), (436, 380), (436, 470), (dcl.x, 470)], seg=0)
    total = g.box(20, 840, 764, 40, ["L = L_{seg} + α (L_{sup} + L_{dist}),  α = 1 (Eq. 14)"],
                  "loss")
    g.arrow([lseg.bottom, (lseg.cx, total.y)])
    g.arrow([(740, dcl.y + dcl.h), (740, total.y)], "L_{sup}, L_{dist}", t=0.5, side="left")
    g.note(452, 606, "The teacher is not a sub-module: never saved,\nnever moved, never called "
                     "by predict. At test\ntime the segmentor runs alone; only the agent\n"
                     "queries and refinement it trained remain.")
    g.legend(912)
    return g


# ------------------------------------------------------------------------------------------------
# 5. The selective scan (notebook 06, lessons/ssm.py)
# ------------------------------------------------------------------------------------------------
def selective_scan() -> Diagram:
    g = Diagram("selective_scan", 770, "The selective scan: Δ, B and C come from the input",
                "One independent recurrence per channel d and state entry n, in "
                "selective_scan_fn's layout (channels before tokens).\nToy sizes of section 3: "
                "batch = 2, D = d_inner = 32 channels, L = 10 tokens, N = d_state = 8, "
                "R = dt_rank = 1.")
    x = g.box(16, 92, 130, 44, ["x", "`(batch, D, L)`"], "io")
    xp = g.box(200, 92, 260, 44, ["x_proj", "Linear D → R + 2N, per token"])
    g.arrow([x.right, xp.left])
    # the bus of x down the left side: into the discretisation and the skip
    g.arrow([(40, x.y + x.h), (40, 585)], head=False)
    g.dot(40, 340)
    g.dot(40, 585)
    # selection: Δ, B, C per token
    dtp = g.box(190, 190, 120, 40, ["dt_proj", "Linear R → D"], size=12.5)
    g.arrow([(250, xp.y + xp.h), dtp.top], "Δ code `(batch, L, R)`", t=0.5, side="left")
    sp = g.op(180, 254, 140, 30, "softplus(· + bias)", size=12)
    g.arrow([dtp.bottom, sp.top])
    disc = g.op(180, 306, 290, 66, ["discretise, per token t:", "Ā_{t} = exp(Δ_{t} A)",
                                    "B̄_{t} x_{t} = Δ_{t} B_{t} x_{t}"], sizes=(12, 14, 14))
    g.arrow([sp.bottom, (250, disc.y)])
    g.text(243, 300, "Δ `(batch, D, L)`", size=11.5, anchor="end")
    g.arrow([(390, xp.y + xp.h), (390, disc.y)], "B `(batch, N, L)`", t=0.55)
    g.arrow([(440, xp.y + xp.h), (440, 162), (744, 162), (744, 556), (470, 556)],
            "C `(batch, N, L)`", seg=1, t=0.5)
    a = g.box(540, 316, 180, 46, ["A = −exp(A_log)", "per channel, every token"], size=12.5)
    g.arrow([a.left, (disc.x + disc.w, a.cy)], "`(D, N)`", t=0.5)
    g.arrow([(40, 340), (disc.x, 340)], "x_{t}", t=0.5)
    # the recurrence, with its state
    rec = g.op(180, 424, 290, 58, ["h_{t} = Ā_{t} ⊙ h_{t-1} + B̄_{t} x_{t}",
                                   "t = 1 … L, h_{0} = 0: a scan"], size=14)
    g.arrow([(325, disc.y + disc.h), (325, rec.y)], "Ā_{t}, B̄_{t} x_{t}  `(batch, D, N)`", t=0.5)
    st = g.box(540, 426, 150, 54, ["state h", "`(batch, D, N)`", "carried to t + 1"], "io",
               size=12.5)
    g.arrow([(rec.x + rec.w, 440), (st.x, 440)], "h_{t}", t=0.5)
    g.arrow([(st.x, 468), (rec.x + rec.w, 468)], "h_{t-1}", t=0.5, side="below")
    # the readout, the skip, the output
    ro = g.op(180, 540, 290, 62, ["y_{t} = C_{t} · h_{t} + D ⊙ x_{t}", "C_{t} reads the state out"],
              size=14)
    g.arrow([(325, rec.y + rec.h), (325, ro.y)], "h_{t}  `(batch, D, N)`", t=0.5)
    dp = g.box(540, 572, 150, 40, ["D (skip)", "`(D,)`"], size=12.5)
    g.arrow([dp.left, (ro.x + ro.w, 592)])
    g.arrow([(40, 585), (ro.x, 585)], "x_{t}", t=0.5)
    y = g.box(250, 656, 150, 44, ["y", "`(batch, D, L)`"], "io")
    g.arrow([ro.bottom, y.top], "y_{t}, all t", t=0.5)
    g.note(430, 672, "In the Mamba block: × silu(z), then out_proj\n(notebook 06, section 3; "
                     "MFuser's MVFuser too)")
    g.legend(740, shape="(batch, …)")
    return g


# ------------------------------------------------------------------------------------------------
# 6. MFuser (notebook 07, lessons/mfuser.py)
# ------------------------------------------------------------------------------------------------
def mfuser() -> Diagram:
    g = Diagram("mfuser", 956, "MFuser: a Mamba bridge between a frozen VFM and a frozen VLM",
                "After every pair of blocks an MVFuser scans the [VFM; VLM] tokens and adds an "
                "update to each (Fig. 2a, b).\nToy sizes (notebook 07): C = 192, N_{d} = 133 "
                "(CLS, 4 registers, 8 x 16), N_{v} = 129, L = 262, E = 128, K = 19, W = 64.")
    img = g.box(320, 84, 160, 38, ["image", "`(B, 3, H, W)`"], "io")
    vfm = g.box(10, 150, 156, 50, ["VFM block i", "toy VFM (DINOv2-like)"], "frozen")
    vlm = g.box(630, 150, 156, 50, ["VLM block i", "toy VLM (CLIP-like)"], "frozen")
    g.arrow([img.left, (vfm.cx, img.cy), vfm.top])
    g.arrow([img.right, (vlm.cx, img.cy), vlm.top])
    xd, xv = vfm.cx, vlm.cx
    plus_d, plus_v = g.circle(xd, 454), g.circle(xv, 454)
    g.arrow([vfm.bottom, (xd, plus_d.y)], "d `(B, N_{d}, C)`", t=0.12)
    g.arrow([vlm.bottom, (xv, plus_v.y)], "v `(B, N_{v}, C)`", t=0.12, side="left")
    g.dot(xd, 258)
    g.dot(xv, 258)
    # into the fuser: [P1(d); v]
    p1 = g.box(170, 240, 90, 36, ["P1_{i}", "Linear C → C"], size=12.5)
    g.arrow([(xd, 258), p1.left])
    cat = g.op(320, 236, 160, 44, ["concatenate tokens", "[P1(d); v]"])
    g.arrow([p1.right, cat.left])
    g.arrow([(xv, 258), cat.right])
    fu = g.box(250, 320, 300, 84, ["MVFuser i (Mamba)", "in_proj → depthwise convs",
                                   "→ selective scan (notebook 06)",
                                   "→ RMSNorm · silu(z) → out_proj → × scale"])
    g.arrow([cat.bottom, fu.top], "h `(B, L, C)`, L = N_{d} + N_{v}", t=0.45)
    sp = g.op(330, 440, 140, 28, "split at N_{d}")
    g.arrow([fu.bottom, sp.top], "u `(B, L, C)`", t=0.45)
    p2 = g.box(170, 436, 90, 36, ["P2_{i}", "Linear C → C"], size=12.5)
    g.arrow([sp.left, p2.right], "u[:N_{d}]", t=0.5)
    g.arrow([p2.left, plus_d.right])
    g.arrow([sp.right, plus_v.left], "u[N_{d}:]  `(B, N_{v}, C)`", t=0.5)
    # the streams go on; maps at the out_indices
    nxt_d = g.box(10, 600, 156, 50, ["blocks i+1 … 6", "the same, fused"], "frozen")
    nxt_v = g.box(630, 600, 156, 50, ["blocks i+1 … 6", "head on v + P3(d)"], "frozen")
    g.arrow([plus_d.bottom, nxt_d.top], "d + P2(u[:N_{d}])", t=0.25)
    g.arrow([plus_v.bottom, nxt_v.top], "v + u[N_{d}:]", t=0.25, side="left")
    g.dot(xd, 540)
    g.dot(xv, 540)
    maps = g.op(290, 518, 220, 44, ["maps at blocks 1, 2, 3, 5", "[d | v] on channels"])
    g.arrow([(xd, 540), maps.left])
    g.arrow([(xv, 540), maps.right])
    m2f = g.box(210, 712, 290, 58, ["tqdm's Mask2Former (notebook 03b)",
                                    "SimpleFPN, 19 text queries,", "identity matching"])
    g.arrow([maps.bottom, (maps.cx, m2f.y)], "`(B, 2C, h, w)`", t=0.6)
    loss = g.box(210, 818, 290, 44, ["mask-classification loss", "+ pixel-text alignment"], "loss")
    g.arrow([m2f.bottom, loss.top])
    # the text side: the MTEnhancer
    mte = g.box(576, 712, 214, 104, ["MTEnhancer", "self-attention over the K texts;",
                                     "MVFuser over [t; visual; t]",
                                     "`(B, 2K+1+hw, W)`: copy, then",
                                     "drop the visual, add both texts"], size=13)
    g.arrow([nxt_v.bottom, (xv, mte.y)], "dense `(B, E, h, w)`\n+ global `(B, E)`", t=0.5,
            side="left")
    txt = g.box(576, 856, 214, 40, ["text tower + prompt context", "t_{0} `(K, E)`"], "partial",
                size=12.5)
    g.arrow([txt.top, (txt.cx, mte.y + mte.h)])
    g.arrow([(mte.x, 741), (m2f.x + m2f.w, 741)], "t\n`(B, K, E)`", side="split", t=0.5)
    g.note(16, 700, "Repeat for all 6\nblocks (paper: 24).\nThe scan runs one\nway: VLM tokens\n"
                    "see every VFM\ntoken, VFM tokens\nonly earlier ones.")
    g.legend(924)
    return g


# ------------------------------------------------------------------------------------------------
# Registry, files, command line
# ------------------------------------------------------------------------------------------------
DIAGRAMS: dict[str, Callable[[], Diagram]] = {
    "rein": rein,
    "tqdm": tqdm,
    "catseg": catseg,
    "querydiff": querydiff,
    "selective_scan": selective_scan,
    "mfuser": mfuser,
}
NOTEBOOKS = {
    "rein": "02_rein.ipynb",
    "tqdm": "03b_text_queries.ipynb",
    "catseg": "04_catseg.ipynb",
    "querydiff": "05_querydiff.ipynb",
    "selective_scan": "06_mamba_from_scratch.ipynb",
    "mfuser": "07_mfuser.ipynb",
}


def draw(name: str) -> Diagram:
    """The diagram ``name``, drawn (not written)."""
    return DIAGRAMS[name]()


def render(name: str) -> str:
    """The SVG text of diagram ``name``."""
    return draw(name).svg()


def write(out_dir: Path = DIAGRAM_DIR) -> list[Path]:
    """Write every diagram to ``out_dir/<name>.svg`` (only the files whose text changes)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in DIAGRAMS:
        path = out_dir / f"{name}.svg"
        text = render(name)
        if not path.exists() or path.read_text("utf-8") != text:
            path.write_text(text, "utf-8")
            written.append(path)
    return written


def check(out_dir: Path = DIAGRAM_DIR) -> list[str]:
    """Why the committed diagrams are not what the code draws (empty list: they are)."""
    reasons = []
    for name in DIAGRAMS:
        path = out_dir / f"{name}.svg"
        if not path.exists():
            reasons.append(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: "
                           "missing")
        elif path.read_text("utf-8") != render(name):
            reasons.append(f"{path.name}: differs from what reprod.course.diagrams draws")
    return reasons


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true",
                      help="exit 1 if a committed SVG differs from what the code draws")
    mode.add_argument("--list", action="store_true", help="list the diagrams")
    ap.add_argument("--out", type=Path, default=DIAGRAM_DIR, help="folder of the SVG files")
    args = ap.parse_args(argv)
    if args.list:
        for name in DIAGRAMS:
            print(f"{name:>15s}  {args.out / (name + '.svg')}  notebooks/{NOTEBOOKS[name]}")
        return 0
    if args.check:
        reasons = check(args.out)
        for r in reasons:
            print(r, file=sys.stderr)
        if reasons:
            print("run: python -m reprod.course.diagrams", file=sys.stderr)
        return 1 if reasons else 0
    for name in DIAGRAMS:
        for p in draw(name).problems():
            print(f"{name}: layout: {p}", file=sys.stderr)
    written = write(args.out)
    print(f"{len(DIAGRAMS)} diagrams in {args.out}; {len(written)} written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
