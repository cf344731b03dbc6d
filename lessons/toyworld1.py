"""ToyWorld 1: procedural street scenes in many rendering styles (version 1.0, kept as a contrast).

World 1 was the course's first embedded dataset. Its targets are recolours of one scene
distribution (a class's colour survives every domain) and its toy foundation models were shown the
targets' looks, so it lacks the conditions the papers rely on; ``lessons.toyworld`` (world 2)
models them and reuses this module's street geometry and drawing primitives. World 1 stays
renderable, unchanged (``ToyWorld(..., world="1.0")``), as the lessons' "preconditions absent"
contrast.

Real DGSS trains on GTAV (synthetic) and tests on Cityscapes, BDD100K, Mapillary and ACDC: tens of
GB and a manual download. ToyWorld teaches the same phenomenon on a laptop: every image is drawn
on the fly from a seed (no files), labelled with the 19 Cityscapes trainIds (255 = ignore), and a
*domain* is a rendering style (plus a camera prior) over one shared scene distribution. A model
trained on the flat ``synthetic`` source loses mIoU on the textured, tinted, foggy, dark or painted
targets, exactly the gap the papers close.

A scene is geometry only (:class:`Scene`: camera, street layout, buildings, objects). Rendering is
two steps: :func:`rasterize` turns a scene into a label map and a *shade* map (per-pixel material
brightness in [0, 1]: windows dark, lane paint bright, one value per car), and :func:`stylize`
turns label + shade into RGB with a :class:`Style` (palette, texture, lighting, weather, blur,
noise). Because geometry and style are separate, one scene renders pixel-aligned in every style
(:func:`render_across_domains`).

Layout prior (pinhole camera over a flat street, lateral coordinates in camera heights): sky above
a perspective skyline of buildings (or park trees) on both sides, a road converging to the
vanishing point with dashed lane paint, sidewalks and terrain verges beside it, walls and fences
at the facades, trees, poles carrying traffic signs and lights, cars, trucks and buses on the road
and people and cyclists on the sidewalks, all scaled by perspective and drawn far to near.
Thin classes (pole, traffic light, traffic sign) are at least ``ceil(W/16)`` wide and
``ceil(H/4)`` tall, one 8-pixel patch wide and two tall at 64x128, so they are learnable at
stride 8. A scene shows 8 to 16 of the 19 classes (about 12 on average); 17 occur overall
(``RENDERED_CLASSES``: never train or motorcycle).

Domains (``DOMAINS``; the analog each stands for in brackets):

- ``synthetic``  the source (GTAV): flat, saturated, clean
- ``citylike``   (Cityscapes) muted palette, facade texture, ego-car hood (ignored), mild blur
- ``dashcam``    (BDD100K) warm low-contrast palette, low camera, hood, blur and sensor noise
- ``streetview`` (Mapillary) cool palette family *held out of the random sampler*, varied camera
- ``fog``, ``night``, ``rain``, ``snow``  (ACDC) adverse weather over the ``citylike`` look
- ``painted``    a cubist painting style (QueryDiff's Figure 1): facets, posterised colours, edges;
  *held out of the random sampler*
- ``validation`` a style used only for model selection, never a target
- ``random``     the style sampler: wide distributions of palettes, textures, lighting, weather,
  blur and noise, for pretraining and augmentation (never ``streetview``'s palette family or the
  painted style, so those two targets are truly unseen)

Toy benchmark protocol (``TOY_BENCHMARK``): train on ``synthetic`` ``train`` (2,000 scenes) at
64x128, select the checkpoint by mIoU on ``validation`` ``val`` (200 scenes), report mIoU at 64x128
on the ``test`` split (200 scenes) of every target domain, over seeds 0, 1, 2. Splits never share
scenes: a scene's seed is derived from (seed, domain, split, index).

Dimension glossary: H W image height and width, K classes (19).

ToyWorld is versioned: any change to what a seed renders bumps ``TOYWORLD_VERSION`` and means
regenerating the toy weights, lesson checkpoints and notebook outputs (the golden hashes in
``tests/test_toyworld.py`` fail until then).
"""

from __future__ import annotations

import hashlib
import math
import operator
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np
import torch
from matplotlib.colors import rgb_to_hsv
from torch.utils.data import Dataset

from lessons.classes import IGNORE_INDEX, NUM_CLASSES, TRAIN_ID

__all__ = [
    "DEFAULT_SIZE",
    "DOMAINS",
    "HELD_OUT_FAMILIES",
    "HOOD",
    "LAMP",
    "PALETTE_FAMILIES",
    "RENDERED_CLASSES",
    "SOURCE_DOMAIN",
    "SPLITS",
    "TARGET_DOMAINS",
    "THIN_CLASSES",
    "TOYWORLD_VERSION",
    "TOY_BENCHMARK",
    "VALIDATION_DOMAIN",
    "Camera",
    "Scene",
    "Side",
    "Style",
    "Thing",
    "ToyWorld",
    "benchmark_datasets",
    "draw_scene",
    "rasterize",
    "recolor",
    "render",
    "render_across_domains",
    "render_digest",
    "render_sample",
    "sample_style",
    "scene_seed",
    "style_palette",
    "stylize",
]

TOYWORLD_VERSION = "1.0"

DEFAULT_SIZE: tuple[int, int] = (64, 128)
MIN_SIZE, MAX_SIZE = 32, 2048
SPLITS: tuple[str, ...] = ("train", "val", "test")

SOURCE_DOMAIN = "synthetic"
VALIDATION_DOMAIN = "validation"
TARGET_DOMAINS: tuple[str, ...] = (
    "citylike", "dashcam", "streetview", "fog", "night", "rain", "snow", "painted",
)
DOMAINS: tuple[str, ...] = (SOURCE_DOMAIN, *TARGET_DOMAINS, VALIDATION_DOMAIN, "random")

TOY_BENCHMARK: dict = {
    "size": DEFAULT_SIZE,           # render and evaluate at 64x128 (H, W)
    "source": SOURCE_DOMAIN,
    "train_split": "train", "train_length": 2000,
    "val_domain": VALIDATION_DOMAIN, "val_split": "val", "val_length": 200,
    "targets": TARGET_DOMAINS, "test_split": "test", "test_length": 200,
    "eval_size": DEFAULT_SIZE,
    "seeds": (0, 1, 2),
}

# trainIds used by the renderer (Cityscapes trainIds; train and motorcycle never appear)
ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY = (
    TRAIN_ID[n] for n in ("road", "sidewalk", "building", "wall", "fence", "pole",
                          "traffic light", "traffic sign", "vegetation", "terrain", "sky"))
PERSON, RIDER, CAR, TRUCK, BUS, BICYCLE = (
    TRAIN_ID[n] for n in ("person", "rider", "car", "truck", "bus", "bicycle"))
RENDERED_CLASSES: tuple[int, ...] = (
    ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY,
    PERSON, RIDER, CAR, TRUCK, BUS, BICYCLE,
)
THIN_CLASSES: tuple[int, ...] = (POLE, LIGHT, SIGN)
HOOD = NUM_CLASSES  # palette row of the ego-vehicle hood; its label is IGNORE_INDEX
LAMP = 1.0          # shade value of emissive pixels (tail lights, signal lamps); others stay below

_DOMAIN_CODE = {name: k for k, name in enumerate(DOMAINS)}
_SPLIT_CODE = {name: k for k, name in enumerate(SPLITS)}


# ----------------------------------------------------------------------------------------------
# Scene geometry
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Camera:
    """Pinhole camera over a flat street (all fractions of the image size)."""

    horizon: float = 0.45    # horizon row / H
    vanish_x: float = 0.5    # vanishing-point column / W
    height: float = 1.0      # camera height in world units (1 unit ~ 1.5 m)
    hood: float = 0.0        # ego-vehicle hood height / H (labelled ignore), 0 = none


@dataclass(frozen=True)
class Side:
    """One side of the street, lateral distances from the road centre in world units."""

    sidewalk: float          # sidewalk width
    terrain: float           # grass verge width behind the sidewalk (0 = none)
    kind: str                # "buildings" or "park"
    heights: tuple[float, ...]   # skyline: one height (world units) per facade segment
    edges: tuple[float, ...]     # segment boundaries as fractions of the side's width
    shades: tuple[float, ...]    # one shade per facade segment
    barrier: tuple[int, float, float, float] | None  # (WALL|FENCE, start, end, height) or None


@dataclass(frozen=True)
class Thing:
    """An object standing on the ground: class, lateral position, ground row and shade."""

    kind: str        # car, truck, bus, person, cyclist, tree, pole
    lateral: float   # world units from the road centre (negative = left)
    ground: float    # ground-contact row below the horizon, fraction of H (depth proxy)
    shade: float
    extra: int = 0   # pole: 0 bare, 1 sign, 2 light; tree: crown style


@dataclass(frozen=True)
class Scene:
    """Geometry of one street scene; render it with :func:`rasterize` and :func:`stylize`."""

    camera: Camera
    road_half: float
    left: Side
    right: Side
    far_height: float        # backdrop height at the street's end, fraction of H
    lane_phase: float
    things: tuple[Thing, ...] = field(default_factory=tuple)


# camera priors per domain: (horizon range, vanishing-x range, height range, hood range)
_CAMERA_PRIORS: dict[str, tuple] = {
    "synthetic": ((0.40, 0.50), (0.42, 0.58), (0.9, 1.1), (0.0, 0.0)),
    "citylike": ((0.38, 0.46), (0.44, 0.56), (0.9, 1.1), (0.10, 0.14)),
    "dashcam": ((0.46, 0.56), (0.40, 0.60), (0.7, 0.9), (0.12, 0.18)),
    "streetview": ((0.30, 0.56), (0.35, 0.65), (0.8, 1.5), (0.0, 0.0)),
    "painted": ((0.40, 0.50), (0.42, 0.58), (0.9, 1.1), (0.0, 0.0)),
    "validation": ((0.38, 0.52), (0.40, 0.60), (0.85, 1.2), (0.0, 0.0)),
    "random": ((0.34, 0.56), (0.38, 0.62), (0.75, 1.4), (0.0, 0.0)),
}
for _adverse in ("fog", "night", "rain", "snow"):  # ACDC is filmed from a car like Cityscapes
    _CAMERA_PRIORS[_adverse] = _CAMERA_PRIORS["citylike"]


class _Draws:
    """Scalar random draws for scene sampling, served from one pre-drawn block of uniforms.

    Geometry needs ~100 scalars per scene; one ``rng.random(256)`` call instead of a hundred
    Generator calls keeps sampling cheap (ToyWorld must render >= 1,000 images/s on one core).
    """

    def __init__(self, rng: np.random.Generator, block: int = 256):
        self.rng, self.block = rng, block
        self.buf, self.i = rng.random(block).tolist(), 0

    def _next(self) -> float:
        if self.i == len(self.buf):
            self.buf, self.i = self.rng.random(self.block).tolist(), 0
        self.i += 1
        return self.buf[self.i - 1]

    def u(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * self._next()

    def int(self, lo: int, hi: int) -> int:
        """An integer in [lo, hi)."""
        return min(lo + int((hi - lo) * self._next()), hi - 1)

    def coin(self, p: float) -> bool:
        return self._next() < p

    def pick(self, options: tuple):
        return options[self.int(0, len(options))]


def _draw_side(r: _Draws) -> Side:
    n = r.int(2, 6)
    cuts = sorted(r.u(0.05, 0.95) for _ in range(n - 1))
    barrier = None
    if r.coin(0.6):
        a = r.u(0.0, 0.6)
        barrier = (r.pick((WALL, FENCE)), a, a + r.u(0.2, 0.4), r.u(0.5, 0.9))
    return Side(
        sidewalk=r.u(0.9, 2.0),
        terrain=r.u(0.6, 1.6) if r.coin(0.6) else 0.0,
        kind="park" if r.coin(0.15) else "buildings",
        heights=tuple(r.u(2.5, 9.0) for _ in range(n)),
        edges=tuple(cuts),
        shades=tuple(r.u(0.0, 0.95) for _ in range(n)),
        barrier=barrier,
    )


def _draw_things(r: _Draws, road_half: float, left: Side, right: Side) -> list[Thing]:
    things: list[Thing] = []

    def side_of() -> tuple[int, Side]:
        return (-1, left) if r.coin(0.5) else (1, right)

    for _ in range(r.int(1, 6)):                        # cars in lanes
        lane = r.pick((-0.5, 0.5)) * road_half + r.u(-0.25, 0.25)
        things.append(Thing("car", lane, r.u(0.04, 0.5), r.u(0.2, 0.97)))
    for kind in ("truck", "bus"):
        if r.coin(0.25):
            things.append(Thing(kind, r.pick((-0.5, 0.5)) * road_half, r.u(0.05, 0.3),
                                r.u(0.3, 0.97)))
    for _ in range(r.int(1, 5)):                        # pedestrians on sidewalks
        sign, side = side_of()
        lat = sign * (road_half + side.sidewalk * r.u(0.2, 0.8))
        things.append(Thing("person", lat, r.u(0.06, 0.45), r.u(0.0, 0.97)))
    if r.coin(0.35):                                    # a cyclist at the road's edge
        sign, _ = side_of()
        things.append(Thing("cyclist", sign * road_half * 0.85, r.u(0.08, 0.4), r.u(0.0, 0.97)))
    for _ in range(r.int(1, 4)):                        # trees on the verges
        sign, side = side_of()
        lat = sign * (road_half + side.sidewalk + 0.5 * side.terrain)
        things.append(Thing("tree", lat, r.u(0.04, 0.3), r.u(0.0, 0.97), r.int(0, 2)))
    for k in range(r.int(1, 4)):                        # poles; the first two carry sign, light
        sign, side = side_of()
        extra = k + 1 if k < 2 else r.int(0, 3)
        things.append(Thing("pole", sign * (road_half + 0.3 * side.sidewalk), r.u(0.1, 0.5),
                            r.u(0.0, 0.97), extra))
    return things


def draw_scene(seed: int | np.random.Generator, domain: str = SOURCE_DOMAIN) -> Scene:
    """Sample one scene's geometry; ``domain`` picks the camera prior (height, horizon, hood)."""
    _check_domain(domain)
    r = _Draws(seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed))
    camera = Camera(*(r.u(*lo_hi) for lo_hi in _CAMERA_PRIORS[domain]))
    road_half = r.u(1.6, 3.0)
    left, right = _draw_side(r), _draw_side(r)
    things = _draw_things(r, road_half, left, right)
    return Scene(camera, road_half, left, right, far_height=r.u(0.03, 0.12),
                 lane_phase=r.u(0.0, 1.0), things=tuple(things))


# ----------------------------------------------------------------------------------------------
# Rasterisation: scene -> label (H, W) uint8 and shade (H, W) float32
# ----------------------------------------------------------------------------------------------
@lru_cache(maxsize=16)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy = np.arange(h, dtype=np.float32)[:, None] + 0.5   # (H, 1) pixel-centre rows
    xx = np.arange(w, dtype=np.float32)[None, :] + 0.5   # (1, W) pixel-centre columns
    return yy, xx


_U8 = np.arange(256, dtype=np.uint8)  # uint8 constants, so np.where stays uint8


def _frac(x: np.ndarray) -> np.ndarray:
    return x - np.floor(x)


def _side_columns(values_left, values_right, left_cols: np.ndarray) -> np.ndarray:
    return np.where(left_cols, values_left, values_right)


def _skyline(side: Side, cols: np.ndarray, start: float, stop: float
             ) -> tuple[np.ndarray, np.ndarray]:
    """Facade height (world units) and shade per column for the columns of one side."""
    t = np.clip((cols - start) / ((stop - start) or 1e-6), 0.0, 1.0)  # 0 at the street's end
    seg = np.searchsorted(np.asarray(side.edges), t)
    return np.asarray(side.heights)[seg], np.asarray(side.shades)[seg]


def _street(scene: Scene, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Sky, skyline, facades, barriers and the ground (road, sidewalk, terrain, lane paint)."""
    cam = scene.camera
    yy, xx = _grid(h, w)
    hz, vx, ch = cam.horizon * h, cam.vanish_x * w, cam.height
    dx = xx - vx                                               # (1, W)
    left = dx < 0
    sl, sr = scene.left, scene.right
    facade = scene.road_half + _side_columns(sl.sidewalk + sl.terrain, sr.sidewalk + sr.terrain,
                                             left)           # (1, W) lateral of the facades
    base = hz + np.abs(dx) * ch / facade                       # (1, W) facade foot row
    gap = 3.0 * scene.far_height * h                           # half-width of the far end (px)
    hl, shl = _skyline(sl, xx, vx - gap, 0.0)
    hr, shr = _skyline(sr, xx, vx + gap, float(w))
    heights, fshade = _side_columns(hl, hr, left), _side_columns(shl, shr, left)
    top = base - heights * (base - hz) / ch                    # (1, W) skyline row
    far = np.abs(dx) < gap
    top = np.where(far, np.minimum(top, hz - scene.far_height * h), top)
    park = _side_columns(sl.kind == "park", sr.kind == "park", left)
    facade_cls = np.where(park & ~far, _U8[VEGETATION], _U8[BUILDING])

    # Rows above r0 are never ground and rows from r1 on are only ground (one spare row each
    # way), so each part is computed on the rows it can reach.
    r0 = min(max(math.floor(hz) - 1, 0), h)
    r1 = min(max(math.ceil(float(base.max())) + 1, r0), h)
    label = np.empty((h, w), np.uint8)
    shade = np.empty((h, w), np.float32)

    # ground (rows r0..H): lateral coordinate X of each pixel, lane paint
    yg = yy[r0:]
    depth = np.maximum(yg - hz, 1e-3)                           # (Hg, 1)
    lat = np.abs(dx) * ch / depth                               # (Hg, W)
    walk = scene.road_half + _side_columns(sl.sidewalk, sr.sidewalk, left)
    road = lat < scene.road_half
    ground_cls = np.take(_GROUND_CLS, (~road).view(np.uint8) + (lat >= walk).view(np.uint8))
    dash = _frac(ch * h / depth * 0.35 + scene.lane_phase) < 0.5        # (Hg, 1)
    paint = (lat < 0.06 * scene.road_half + 0.9 / depth) & dash & road
    road_shade = np.take(_GROUND_SHADE, road.view(np.uint8) + paint.view(np.uint8))
    label[r1:], shade[r1:] = ground_cls[r1 - r0:], road_shade[r1 - r0:]

    # facades and sky (rows 0..r1): the sky brightens to the horizon; facades per segment with
    # perspective windows
    yt = yy[:r1]
    upper = yt >= top                                           # (Ht, W) below the skyline
    sky_shade = np.clip(yt / max(hz, 1.0), 0.0, 1.0) * np.float32(0.9)   # (Ht, 1)
    z = ch / np.maximum(base - hz, 1e-3) * h                    # (1, W) depth along the facade
    v = (base - yt) / np.maximum(base - hz, 1e-3) * ch          # (Ht, W) height on the facade
    windows = (_frac(v / 1.1) > 0.41) & (_frac(z / 1.6) > 0.375) & (v > 0.9)
    wall_shade = _blend(windows & (facade_cls == BUILDING), np.float32(0.05),
                        fshade.astype(np.float32))
    label[:r1] = _choose(upper, facade_cls, _U8[SKY])
    shade[:r1] = _blend(upper, wall_shade, sky_shade)
    ground = yy[r0:r1] >= base                                  # (rows r0..r1, W)
    label[r0:r1] = _choose(ground, ground_cls[: r1 - r0], label[r0:r1])
    shade[r0:r1] = _blend(ground, road_shade[: r1 - r0], shade[r0:r1])

    for side, is_left in ((sl, True), (sr, False)):
        if side.barrier is None:
            continue
        cls, a, b, bh = side.barrier
        start, edge = (vx - gap, 0.0) if is_left else (vx + gap, float(w))
        t = (xx - start) / ((edge - start) or 1e-6)     # 0 at the street's end, 1 at the edge
        cols = (t >= a) & (t <= b) & (left if is_left else ~left)
        bar = cols & (yt < base) & (yt >= base - bh * (base - hz) / ch)   # above the foot
        label[:r1] = _choose(bar, _U8[cls], label[:r1])
        slats = np.float32(0.5) + np.float32(0.4) * ((np.mod(xx, 4.0) < 2.0) & (cls == FENCE))
        shade[:r1] = _blend(bar, slats, shade[:r1])
    return label, shade


_GROUND_CLS = np.array([ROAD, SIDEWALK, TERRAIN], np.uint8)     # by (X >= road) + (X >= walk)
_GROUND_SHADE = np.array([0.45, 0.15, 0.98], np.float32)        # by road + lane paint


def _choose(cond: np.ndarray, a, b) -> np.ndarray:
    """``np.where(cond, a, b)`` for uint8 labels, exact by modular arithmetic (and faster)."""
    b = np.asarray(b, np.uint8)
    return b + (np.asarray(a, np.uint8) - b) * cond


def _blend(cond: np.ndarray, a, b) -> np.ndarray:
    """``np.where(cond, a, b)`` for finite float32 values, exact (x * 1 = x, y * 0 = 0) and
    faster than ``np.where`` on small arrays."""
    c = cond.astype(np.float32)
    return a * c + b * (np.float32(1) - c)


def _px(v: float) -> int:
    """Pixel edge nearest to ``v`` (halves round up, so integer widths survive any offset)."""
    return math.floor(v + 0.5)


def _box(label, shade, y0, y1, x0, x1, cls, s) -> None:
    h, w = label.shape
    floor = math.floor                                  # _px, inlined: boxes are the hot path
    y0, y1 = max(floor(y0 + 0.5), 0), min(floor(y1 + 0.5), h)
    x0, x1 = max(floor(x0 + 0.5), 0), min(floor(x1 + 0.5), w)
    if y1 > y0 and x1 > x0:
        label[y0:y1, x0:x1] = cls
        shade[y0:y1, x0:x1] = s


def _ellipse(label, shade, cy, cx, ry, rx, cls, s) -> None:
    h, w = label.shape
    y0, y1 = max(int(cy - ry), 0), min(math.ceil(cy + ry), h)
    x0, x1 = max(int(cx - rx), 0), min(math.ceil(cx + rx), w)
    if y1 <= y0 or x1 <= x0:
        return
    yy, xx = _grid(h, w)
    m = ((yy[y0:y1] - cy) / ry) ** 2 + ((xx[:, x0:x1] - cx) / rx) ** 2 <= 1.0
    label[y0:y1, x0:x1][m] = cls
    shade[y0:y1, x0:x1][m] = s


def _vehicle(label, shade, t: Thing, x, yb, s) -> None:
    wid, hei = {"car": (1.2, 1.0), "truck": (1.6, 2.0), "bus": (1.7, 2.3)}[t.kind]
    cls = {"car": CAR, "truck": TRUCK, "bus": BUS}[t.kind]
    ww, hh = max(wid * s, 3.0), max(hei * s, 2.0)
    x0, y0 = x - ww / 2, yb - hh
    if t.kind == "car":
        _box(label, shade, y0 + 0.45 * hh, yb, x0, x0 + ww, cls, t.shade)          # body
        _box(label, shade, y0, y0 + 0.45 * hh, x0 + 0.15 * ww, x0 + 0.85 * ww, cls, t.shade)
        _box(label, shade, y0 + 0.08 * hh, y0 + 0.42 * hh, x0 + 0.22 * ww, x0 + 0.78 * ww,
             cls, 0.02)                                                              # rear window
    else:
        _box(label, shade, y0, yb, x0, x0 + ww, cls, t.shade)
        _box(label, shade, y0 + 0.1 * hh, y0 + 0.4 * hh, x0 + 0.08 * ww, x0 + 0.92 * ww,
             cls, 0.02)
    lamp = max(0.12 * ww, 1.0)                                                       # tail lights
    _box(label, shade, yb - 0.45 * hh, yb - 0.3 * hh, x0, x0 + lamp, cls, LAMP)
    _box(label, shade, yb - 0.45 * hh, yb - 0.3 * hh, x0 + ww - lamp, x0 + ww, cls, LAMP)
    _box(label, shade, yb - 0.08 * hh, yb, x0 + 0.05 * ww, x0 + 0.25 * ww, cls, 0.0)  # wheels
    _box(label, shade, yb - 0.08 * hh, yb, x0 + 0.75 * ww, x0 + 0.95 * ww, cls, 0.0)


def _person(label, shade, t: Thing, x, yb, s, cls=PERSON) -> None:
    hh, ww = max(1.15 * s, 6.0), max(0.35 * s, 2.0)
    _box(label, shade, yb - 0.45 * hh, yb, x - 0.4 * ww, x + 0.4 * ww, cls, 0.1)     # legs
    _box(label, shade, yb - 0.82 * hh, yb - 0.45 * hh, x - ww / 2, x + ww / 2, cls, t.shade)
    _ellipse(label, shade, yb - 0.9 * hh, x, 0.1 * hh, 0.3 * ww + 0.5, cls, 0.6)      # head


def _cyclist(label, shade, t: Thing, x, yb, s) -> None:
    hb, wb = max(0.7 * s, 4.0), max(0.3 * s, 2.0)
    _box(label, shade, yb - hb, yb, x - wb / 2, x + wb / 2, BICYCLE, 0.05)
    _person(label, shade, t, x, yb - 0.55 * hb, 0.8 * s, cls=RIDER)


def _tree(label, shade, t: Thing, x, yb, s) -> None:
    trunk_h, r = 1.6 * s, max(1.1 * s, 3.0)
    _box(label, shade, yb - trunk_h, yb, x - max(0.12 * s, 1.0), x + max(0.12 * s, 1.0),
         VEGETATION, 0.05)
    ry = r * (1.4 if t.extra else 1.0)
    _ellipse(label, shade, yb - trunk_h - 0.7 * ry, x, ry, r, VEGETATION, t.shade)


def _pole_half_width(t: Thing, s: float, w: int) -> float:
    """Half-width of a pole with what it carries (a sign is wider than its pole)."""
    pole = math.ceil(w / 16) / 2
    return max(0.35 * s, pole) if t.extra == 1 else pole


def _pole(label, shade, t: Thing, x, yb, s, h, w, floor) -> None:
    """Pole centred at column ``x`` with an optional sign or light.

    Every part is at least W/16 wide and H/4 tall; ``floor`` is the lowest visible row (above the
    ego hood), so no part hides behind it. ``x`` must keep the sign inside the image.
    """
    pw, min_h = math.ceil(w / 16), math.ceil(h / 4)
    ph = max(3.6 * s, 2 * min_h)
    yb = min(yb, floor)
    top = max(yb - ph, 0.0)
    yb = max(yb, top + 2 * min_h)
    _box(label, shade, top, yb, x - pw / 2, x + pw / 2, POLE, 0.4)
    if t.extra == 1:
        sw = 2 * _pole_half_width(t, s, w)
        _box(label, shade, top, top + min_h, x - sw / 2, x + sw / 2, SIGN, t.shade)
    elif t.extra == 2:
        x0 = x - pw / 2
        _box(label, shade, top, top + min_h, x0, x0 + pw, LIGHT, 0.1)
        lamp_y = top + min_h * (0.15 + 0.3 * int(t.shade * 3))
        _box(label, shade, lamp_y, lamp_y + min_h * 0.25, x0 + pw * 0.25, x0 + pw * 0.75,
             LIGHT, LAMP)


def rasterize(scene: Scene, size: tuple[int, int] = DEFAULT_SIZE
              ) -> tuple[np.ndarray, np.ndarray]:
    """Scene -> (label (H, W) uint8 trainIds with 255 ignore, shade (H, W) float32 in [0, 1])."""
    h, w = _check_size(size)
    label, shade = _street(scene, h, w)
    label, shade = np.ascontiguousarray(label), np.ascontiguousarray(shade)
    cam = scene.camera
    hz, vx = cam.horizon * h, cam.vanish_x * w
    poles = []
    for t in sorted(scene.things, key=lambda t: t.ground):          # far to near
        yb = hz + t.ground * h                                       # ground-contact row
        s = t.ground * h / cam.height                                # pixels per world unit
        x = vx + t.lateral * s
        if t.kind in ("car", "truck", "bus"):
            _vehicle(label, shade, t, x, yb, s)
        elif t.kind == "person":
            _person(label, shade, t, x, yb, s)
        elif t.kind == "cyclist":
            _cyclist(label, shade, t, x, yb, s)
        elif t.kind == "tree":
            _tree(label, shade, t, x, yb, s)
        elif t.kind == "pole":
            poles.append((t, x, yb, s))
    placed: list[tuple[float, float]] = []                           # thin classes last
    for t, x, yb, s in poles:
        half = _pole_half_width(t, s, w)
        x = min(max(x, half), w - half)                              # keep it inside the image
        if all(abs(x - px) >= half + ph + 1 for px, ph in placed):   # never overlap another
            _pole(label, shade, t, x, yb, s, h, w, h * (1.0 - cam.hood))
            placed.append((x, half))
    if cam.hood > 0:                                                 # ego-vehicle hood: ignore
        yy, xx = _grid(h, w)
        dxn = (xx - 0.5 * w) / (0.5 * w)
        hood = yy >= h * (1.0 - cam.hood * (1.0 - 0.5 * dxn**2))
        label[hood] = IGNORE_INDEX
        shade[hood] = 0.5
    return label, shade


# ----------------------------------------------------------------------------------------------
# Styles: label + shade -> RGB
# ----------------------------------------------------------------------------------------------
def _base_palette() -> np.ndarray:
    """The synthetic (GTAV-like) palette: (K + 1, 2, 3), endpoints at shade 0 and 1 per class."""
    p = np.zeros((NUM_CLASSES + 1, 2, 3))
    rows = {
        ROAD: ((0.28, 0.28, 0.30), (0.95, 0.95, 0.88)),
        SIDEWALK: ((0.50, 0.47, 0.46), (0.80, 0.76, 0.72)),
        BUILDING: ((0.18, 0.22, 0.30), (0.90, 0.72, 0.52)),
        WALL: ((0.50, 0.48, 0.42), (0.80, 0.76, 0.62)),
        FENCE: ((0.30, 0.22, 0.14), (0.70, 0.58, 0.40)),
        POLE: ((0.22, 0.22, 0.25), (0.62, 0.62, 0.66)),
        LIGHT: ((0.08, 0.08, 0.06), (1.00, 0.62, 0.05)),
        SIGN: ((0.05, 0.25, 0.80), (0.98, 0.85, 0.05)),
        VEGETATION: ((0.05, 0.28, 0.05), (0.35, 0.70, 0.12)),
        TERRAIN: ((0.42, 0.55, 0.18), (0.70, 0.62, 0.32)),
        SKY: ((0.20, 0.45, 0.95), (0.80, 0.92, 1.00)),
        PERSON: ((0.10, 0.10, 0.20), (0.90, 0.25, 0.20)),
        RIDER: ((0.12, 0.12, 0.12), (0.95, 0.60, 0.05)),
        CAR: ((0.04, 0.04, 0.06), (0.92, 0.92, 0.96)),
        TRUCK: ((0.06, 0.06, 0.06), (0.85, 0.85, 0.78)),
        BUS: ((0.06, 0.06, 0.10), (0.98, 0.72, 0.10)),
        BICYCLE: ((0.04, 0.04, 0.04), (0.55, 0.10, 0.10)),
        HOOD: ((0.10, 0.10, 0.12), (0.30, 0.30, 0.36)),
    }
    for k, (a, b) in rows.items():
        p[k, 0], p[k, 1] = a, b
    return p


_BASE_PALETTE = _base_palette()


_BASE_HSV = rgb_to_hsv(_BASE_PALETTE)


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """HSV -> RGB for small colour arrays (..., 3), all channels in [0, 1]."""
    h, s, v = hsv[..., 0:1], hsv[..., 1:2], hsv[..., 2:3]
    k = np.mod(np.array([5.0, 3.0, 1.0]) + h * 6.0, 6.0)
    return v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def recolor(palette: np.ndarray | None = None, hue: float | np.ndarray = 0.0, sat: float = 1.0,
            val: float = 1.0, tint=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Shift hue (turns; scalar or per class (K + 1, 1)), scale saturation and value, tint RGB.

    ``palette`` defaults to the synthetic base palette (its HSV form is cached).
    """
    hsv = _BASE_HSV.copy() if palette is None else rgb_to_hsv(np.clip(palette, 0.0, 1.0))
    hsv[..., 0] = np.mod(hsv[..., 0] + hue, 1.0)
    hsv[..., 1] = np.clip(hsv[..., 1] * sat, 0.0, 1.0)
    hsv[..., 2] = np.clip(hsv[..., 2] * val, 0.0, 1.0)
    return np.clip(_hsv_to_rgb(hsv) * np.asarray(tint), 0.0, 1.0)


# palette families: recolor() arguments applied to the base palette
PALETTE_FAMILIES: dict[str, dict] = {
    "synthetic": dict(sat=1.15, val=1.0),
    "urban": dict(sat=0.55, val=0.88, tint=(1.0, 0.98, 0.95)),
    "dashcam": dict(hue=0.02, sat=0.65, val=0.95, tint=(1.08, 1.0, 0.82)),
    "overcast": dict(sat=0.75, val=0.8, tint=(0.94, 1.0, 1.04)),
    "streetview": dict(hue=-0.06, sat=1.25, val=0.92, tint=(0.82, 0.95, 1.15)),  # held out
    "validation": dict(hue=0.03, sat=0.85, val=0.9, tint=(0.96, 1.04, 0.94)),
    "painted": dict(sat=1.4, val=1.0),                                            # held out
}
HELD_OUT_FAMILIES: tuple[str, ...] = ("streetview", "painted")


@dataclass(frozen=True)
class Style:
    """How a scene looks: palette, texture, lighting, weather, optics."""

    family: str = "synthetic"
    hue: float = 0.0            # global hue shift (turns)
    class_hue: float = 0.0      # std of a per-class hue shift
    sat: float = 1.0
    val: float = 1.0
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
    texture: float = 0.0        # amplitude of surface texture
    coarse: bool = False        # coarse (blotchy) rather than fine texture
    contrast: float = 1.0
    weather: str = "clear"      # clear, fog, night, rain, snow
    strength: float = 0.0       # weather strength in [0, 1]
    painted: bool = False       # cubist facets, posterised colours, dark edges
    blur: int = 0               # passes of a [1, 2, 1] / 4 blur
    noise: float = 0.0          # sensor-noise std


def _jitter(rng: np.random.Generator, s: Style, hue=0.02, sv=0.06) -> Style:
    """Small per-image variation inside a fixed domain (a domain is a distribution)."""
    return replace(s, hue=s.hue + float(rng.uniform(-hue, hue)),
                   sat=s.sat * float(rng.uniform(1 - sv, 1 + sv)),
                   val=s.val * float(rng.uniform(1 - sv, 1 + sv)))


_DOMAIN_STYLES: dict[str, Style] = {
    "synthetic": Style("synthetic"),
    "citylike": Style("urban", texture=0.08, contrast=0.9, blur=1, noise=0.01),
    "dashcam": Style("dashcam", texture=0.06, contrast=0.75, blur=2, noise=0.035),
    "streetview": Style("streetview", texture=0.1, coarse=True, contrast=1.1, noise=0.015,
                        class_hue=0.03),
    "fog": Style("urban", texture=0.06, contrast=0.9, blur=1, noise=0.01, weather="fog",
                 strength=0.75),
    "night": Style("urban", texture=0.05, blur=1, noise=0.03, weather="night", strength=0.8),
    "rain": Style("urban", texture=0.06, contrast=0.85, blur=1, noise=0.02, weather="rain",
                  strength=0.7),
    "snow": Style("urban", texture=0.06, contrast=0.9, blur=1, noise=0.015, weather="snow",
                  strength=0.7),
    "painted": Style("painted", class_hue=0.12, painted=True, contrast=1.1),
    "validation": Style("validation", texture=0.05, coarse=True, contrast=0.95, blur=1,
                        noise=0.01),
}
_RANDOM_FAMILIES = tuple(f for f in PALETTE_FAMILIES if f not in HELD_OUT_FAMILIES)
_WEATHERS = ("clear", "clear", "fog", "night", "rain", "snow")


def sample_style(domain: str, rng: np.random.Generator) -> Style:
    """Draw an image's style from a domain's distribution (``random``: the wide sampler)."""
    _check_domain(domain)
    if domain != "random":
        return _jitter(rng, _DOMAIN_STYLES[domain])
    weather = _WEATHERS[int(rng.integers(0, len(_WEATHERS)))]
    return Style(
        family=_RANDOM_FAMILIES[int(rng.integers(0, len(_RANDOM_FAMILIES)))],
        hue=float(rng.uniform(-0.08, 0.08)), class_hue=float(rng.uniform(0.0, 0.05)),
        sat=float(rng.uniform(0.5, 1.4)), val=float(rng.uniform(0.75, 1.15)),
        tint=tuple(float(t) for t in rng.uniform(0.85, 1.15, 3)),
        texture=float(rng.uniform(0.0, 0.14)), coarse=bool(rng.random() < 0.5),
        contrast=float(rng.uniform(0.7, 1.15)), weather=weather,
        strength=float(rng.uniform(0.3, 0.9)) if weather != "clear" else 0.0,
        blur=int(rng.integers(0, 3)), noise=float(rng.uniform(0.0, 0.04)),
    )


def style_palette(style: Style, rng: np.random.Generator | None = None) -> np.ndarray:
    """The (K + 1, 2, 3) palette of a style: its family, then the style's own colour shifts."""
    fam = dict(PALETTE_FAMILIES[style.family])
    hue = fam.pop("hue", 0.0) + style.hue
    if style.class_hue > 0:
        g = rng if rng is not None else np.random.default_rng(0)
        hue = hue + g.normal(0.0, style.class_hue, (NUM_CLASSES + 1, 1))
    tint = np.asarray(fam.pop("tint", (1.0, 1.0, 1.0))) * np.asarray(style.tint)
    return recolor(None, hue=hue, sat=fam.pop("sat", 1.0) * style.sat,
                   val=fam.pop("val", 1.0) * style.val, tint=tint)


@lru_cache(maxsize=8)
def _tiles(h: int, w: int) -> dict[str, np.ndarray]:
    """Fixed noise tiles of twice the image size; each image crops them at a random offset."""
    g = np.random.default_rng(20261122)
    H, W = 2 * h, 2 * w

    def smooth(cell: int) -> np.ndarray:
        coarse = g.standard_normal((H // cell + 2, W // cell + 2))
        t = np.repeat(np.repeat(coarse, cell, 0), cell, 1)[:H, :W]
        for _ in range(2):  # box-smooth the blocks into blobs
            t = (t + np.roll(t, cell // 2, 0) + np.roll(t, cell // 2, 1) + np.roll(t, -1, 0)) / 4
        return (t / np.abs(t).max()).astype(np.float32)

    rain = np.zeros((H, W), np.float32)
    for _ in range(H * W // 60):  # slanted streaks
        y, x, n = int(g.integers(0, H)), int(g.integers(0, W)), int(g.integers(3, max(4, h // 6)))
        ys, xs = np.arange(y, y + n) % H, (x + np.arange(n) // 3) % W
        rain[ys, xs] = 1.0
    snow = (g.random((H, W)) < 0.025).astype(np.float32)
    snow = np.maximum(snow, 0.6 * np.roll(snow, 1, 1))
    cells = g.integers(0, 16, (H // 6 + 2, W // 6 + 2))     # cubist facets, skewed blocks
    rows = (np.arange(H)[:, None] // 6 + (np.arange(W)[None, :] // 10)) % cells.shape[0]
    facets = cells[rows, np.arange(W)[None, :] // 6 % cells.shape[1]] / 15.0
    return {
        "fine": (g.standard_normal((H, W)) * 0.5).astype(np.float32),
        "coarse": smooth(max(h // 16, 2)),
        "noise": g.standard_normal((3, H, W)).astype(np.float32),
        "rain": rain, "snow": snow, "facets": facets.astype(np.float32),
        "lit": (g.random((H, W)) < 0.35).astype(np.float32),
    }


def _crop(tile: np.ndarray, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A random (..., h, w) window of a (..., 2h, 2w) tile (a view, no copy)."""
    y = int(rng.integers(0, tile.shape[-2] - h + 1))
    x = int(rng.integers(0, tile.shape[-1] - w + 1))
    return tile[..., y:y + h, x:x + w]


def _blur(img: np.ndarray, passes: int) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur over the last two axes (..., H, W), edges replicated."""
    q = np.float32(0.25)
    for _ in range(passes):
        pair = img[..., :-1, :] + img[..., 1:, :]                      # vertical neighbour sums
        out = np.empty_like(img)
        inner = np.add(pair[..., :-1, :], pair[..., 1:, :], out=out[..., 1:-1, :])
        inner *= q
        out[..., 0, :] = (img[..., 0, :] * 3 + img[..., 1, :]) * q
        out[..., -1, :] = (img[..., -1, :] * 3 + img[..., -2, :]) * q
        pair = out[..., :-1] + out[..., 1:]                             # horizontal
        img = np.empty_like(out)
        inner = np.add(pair[..., :-1], pair[..., 1:], out=img[..., 1:-1])
        inner *= q
        img[..., 0] = (out[..., 0] * 3 + out[..., 1]) * q
        img[..., -1] = (out[..., -1] * 3 + out[..., -2]) * q
    return img


_SNOW_COVER = np.isin(np.arange(256), (ROAD, SIDEWALK, TERRAIN, VEGETATION)).astype(np.float32)


def _rgb(*c: float) -> np.ndarray:
    return np.array(c, np.float32)[:, None, None]                      # (3, 1, 1)


def _weather(img, label, shade, style: Style, hz: float, rng, tiles) -> np.ndarray:
    """Fog, night, rain or snow over an image (3, H, W); ``hz`` is the horizon row."""
    h, w = label.shape
    a = style.strength
    if style.weather == "fog":   # density grows towards the horizon, where things are far
        rows = np.array([math.exp(-abs(y + 0.5 - hz) / (0.25 * h)) for y in range(h)])
        dens = np.clip(a * (0.55 + 0.45 * rows), 0, 0.97).astype(np.float32)[:, None]  # (H, 1)
        dens = np.where(label == SKY, np.float32(min(a + 0.2, 0.97)), dens)            # (H, W)
        img = img * (1 - dens) + np.float32(0.78) * dens
    elif style.weather == "night":
        lamps = (shade >= LAMP).astype(np.float32)                         # (H, W) emissive
        windows = (label == BUILDING) & (shade < 0.1)
        lit = _crop(tiles["lit"], h, w, rng) * windows                     # some windows lit
        dark = np.full(256, 1 - 0.85 * a, np.float32)
        dark[SKY] *= 0.15                                                  # a near-black sky
        light = lit * np.float32(0.6) + lamps * np.float32(1.2) + _blur(lamps, 2)
        img = img * np.take(dark, label) + light * _rgb(1.0, 0.7, 0.35)
    elif style.weather == "rain":
        img = img * np.float32(1 - 0.35 * a) + np.float32(0.12 * a)
        img = img + _crop(tiles["rain"], h, w, rng) * np.float32(0.35 * a)
    elif style.weather == "snow":
        cover = np.take(_SNOW_COVER * np.float32(0.75 * a), label)        # (H, W)
        img = img * (np.float32(0.9) * (1 - cover)) + (np.float32(0.83) * cover + np.float32(0.08))
        img = img + _crop(tiles["snow"], h, w, rng) * np.float32(0.8 * a)
    return img


def _paint(img: np.ndarray, label: np.ndarray, tiles: dict, rng: np.random.Generator
           ) -> np.ndarray:
    """The cubist look: colours posterised in skewed facets, dark outlines at label edges."""
    h, w = label.shape
    facets = _crop(tiles["facets"], h, w, rng)
    img = np.round(img * (0.7 + 0.6 * facets) * 5) / 5              # posterised facets
    edge = np.zeros((h, w), bool)                                  # dark outlines
    edge[1:] |= label[1:] != label[:-1]
    edge[:, 1:] |= label[:, 1:] != label[:, :-1]
    return np.where(edge, np.float32(0.05), img)


def stylize(label: np.ndarray, shade: np.ndarray, style: Style, rng: np.random.Generator,
            horizon: float | None = None) -> np.ndarray:
    """Label (H, W) + shade (H, W) -> image (3, H, W) float32 in [0, 1]."""
    h, w = label.shape
    tiles = _tiles(h, w)
    pal = np.zeros((2, 3, 256), np.float32)                            # lookup by label value
    pal[:, :, : NUM_CLASSES + 1] = style_palette(style, rng).transpose(1, 2, 0)
    pal[:, :, IGNORE_INDEX] = pal[:, :, HOOD]
    idx = label.astype(np.intp)                                        # (H, W)
    img = np.take(pal[0], idx, 1)                                      # (3, H, W) shade-0 colour
    img += np.take(pal[1] - pal[0], idx, 1) * shade                    # lerp to the shade-1 colour
    if style.texture > 0:
        tex = _crop(tiles["coarse" if style.coarse else "fine"], h, w, rng)
        tex = np.where(label == SKY, tex * np.float32(0.3), tex)       # (H, W) smooth sky
        img = img * (1 + np.float32(style.texture) * tex)
    if style.painted:
        img = _paint(img, label, tiles, rng)
    if style.contrast != 1.0:
        img = (img - np.float32(0.5)) * np.float32(style.contrast) + np.float32(0.5)
    if style.weather != "clear":
        hz = horizon if horizon is not None else 0.45 * h
        img = _weather(img, label, shade, style, hz, rng, tiles)
    img = _blur(img, style.blur)
    if style.noise > 0:
        img = img + _crop(tiles["noise"], h, w, rng) * np.float32(style.noise)
    return np.clip(img, 0.0, 1.0, dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------
def _check_domain(domain: str) -> None:
    if domain not in _DOMAIN_CODE:
        raise ValueError(f"unknown ToyWorld domain {domain!r}; choose one of {', '.join(DOMAINS)}")


def _check_size(size) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"size must be (H, W) integers, got {size!r}") from None
    if (h, w) != tuple(size) or not (MIN_SIZE <= h <= MAX_SIZE and MIN_SIZE <= w <= MAX_SIZE):
        raise ValueError(f"size must be (H, W) integers in [{MIN_SIZE}, {MAX_SIZE}], got {size!r}")
    if w < h:
        raise ValueError(f"ToyWorld renders street views at least as wide as tall, got {size!r}")
    return h, w


def _check_seed(seed, what: str = "seed") -> int:
    try:
        value = operator.index(seed)
    except TypeError:
        raise ValueError(f"{what} must be a non-negative integer, got {seed!r}") from None
    if value < 0 or isinstance(seed, bool):
        raise ValueError(f"{what} must be a non-negative integer, got {seed!r}")
    return value


def scene_seed(seed: int, domain: str, split: str, index: int) -> list[int]:
    """The seed words of one dataset scene: distinct for every (seed, domain, split, index)."""
    _check_domain(domain)
    if split not in _SPLIT_CODE:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return [_check_seed(seed), _DOMAIN_CODE[domain], _SPLIT_CODE[split],
            _check_seed(index, "index")]


def render(scene: Scene, style: Style, size: tuple[int, int] = DEFAULT_SIZE,
           rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Render a scene in a style: image (3, H, W) float32 in [0, 1], label (H, W) uint8."""
    label, shade = rasterize(scene, size)
    rng = rng if rng is not None else np.random.default_rng(0)
    return stylize(label, shade, style, rng, scene.camera.horizon * label.shape[0]), label


def render_sample(seed_words, domain: str, size: tuple[int, int] = DEFAULT_SIZE
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Render the scene of ``seed_words`` in ``domain``: its own camera prior and style draw."""
    rng = np.random.default_rng(seed_words)
    scene = draw_scene(rng, domain)
    return render(scene, sample_style(domain, rng), size, rng)


def render_across_domains(seed: int, size: tuple[int, int] = DEFAULT_SIZE,
                          domains: tuple[str, ...] = DOMAINS) -> dict[str, tuple]:
    """One scene (the source camera) in every domain's style: pixel-aligned (image, label) pairs."""
    scene = draw_scene(np.random.default_rng([seed, 99, 0]))
    label, shade = rasterize(scene, size)
    for d in domains:
        _check_domain(d)
    _check_seed(seed)
    out = {}
    for d in domains:
        rng = np.random.default_rng([seed, 99, 1, _DOMAIN_CODE[d]])
        out[d] = (stylize(label, shade, sample_style(d, rng), rng,
                          scene.camera.horizon * label.shape[0]), label.copy())
    return out


class ToyWorld(Dataset):
    """A torch Dataset of ``length`` ToyWorld scenes from one domain and split.

    Item ``i`` is ``(image, label)``: image float32 (3, H, W) in [0, 1] (not normalised: each
    backbone bundle normalises its own way), label int64 (H, W) of trainIds with 255 = ignore.
    Items are rendered on the fly and are the same in every process for the same arguments.
    """

    def __init__(self, domain: str = SOURCE_DOMAIN, split: str = "train",
                 size: tuple[int, int] = DEFAULT_SIZE, length: int = 1000, seed: int = 0):
        scene_seed(seed, domain, split, 0)   # validates domain, split and seed
        if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1:
            raise ValueError(f"length must be a positive integer, got {length!r}")
        self.domain, self.split, self.size = domain, split, _check_size(size)
        self.length, self.seed = int(length), int(seed)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = operator.index(index)
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for a ToyWorld of length {self.length}")
        index %= self.length
        image, label = render_sample(scene_seed(self.seed, self.domain, self.split, index),
                                     self.domain, self.size)
        return torch.from_numpy(image), torch.from_numpy(label.astype(np.int64))

    def __repr__(self) -> str:
        return (f"ToyWorld(domain={self.domain!r}, split={self.split!r}, size={self.size}, "
                f"length={self.length}, seed={self.seed})")


def benchmark_datasets(seed: int = 0, protocol: dict | None = None) -> dict[str, ToyWorld]:
    """The toy benchmark's datasets: ``train`` (source), ``val`` (validation style), targets."""
    p = protocol or TOY_BENCHMARK
    sets = {"train": ToyWorld(p["source"], p["train_split"], p["size"], p["train_length"], seed),
            "val": ToyWorld(p["val_domain"], p["val_split"], p["size"], p["val_length"], seed)}
    for d in p["targets"]:
        sets[d] = ToyWorld(d, p["test_split"], p["eval_size"], p["test_length"], seed)
    return sets


def render_digest(image: np.ndarray, label: np.ndarray) -> str:
    """sha256 of an (image quantised to uint8, label) pair: the golden-hash fingerprint."""
    q = np.round(np.asarray(image) * 255).astype(np.uint8)
    return hashlib.sha256(q.tobytes() + np.asarray(label, np.uint8).tobytes()).hexdigest()[:16]
