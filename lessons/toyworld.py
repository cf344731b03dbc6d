"""ToyWorld 2: procedural street scenes whose domain gap is like GTAV -> real, the embedded dataset.

Real DGSS trains on GTAV (rendered) and tests on Cityscapes, BDD100K, Mapillary and ACDC: tens of
GB and a manual download. ToyWorld teaches the same problem on a laptop: every image is drawn on
the fly from a seed (no files) and labelled with the 19 Cityscapes trainIds (255 = ignore). What
makes GTAV -> real hard is not a recolour, and world 2 models each part of it:

- **material and texture**: every domain family gives each class its own material (flat rendered
  surfaces in the source; asphalt grain, paving tiles, bricks, foliage, clouds, glossy paint in
  the real-looking targets; glass panels and pavers only in ``streetview``), and the things of the
  real-looking domains (cars, buses, clothes, facades) come in any colour, so a class's colour
  stops naming it;
- **lighting that crosses label boundaries**: facades cast shadows over sidewalk, road and
  whatever stands there, objects cast contact shadows, exposure varies, the sun glares;
- **content**: shape variants (sedan, hatchback, van, SUV; box truck and pickup; single- and
  double-decker buses; round, columnar and conical trees; adults and children), class frequencies
  (the source has more vehicles and fewer people and cyclists) and the camera (height, horizon,
  an ego hood) differ between the source and the targets.

A scene is geometry only (:class:`Scene`; world 1's street layout with world 2's things).
Rendering is two steps: :func:`rasterize` turns a scene into a :class:`Raster` (label map, a
*shade* map of per-pixel material brightness in [0, 1] that also names each object's paint, and a
contact-shadow map) and :func:`stylize` turns it into RGB with a :class:`Style` (family:
palette + materials; lighting; weather; optics). Because geometry and style are separate, one
scene renders pixel-aligned in every style (:func:`render_across_domains`).

Domains (``DOMAINS``; the analog each stands for in brackets):

- ``synthetic``  the source (GTAV): flat, saturated, clean rendered surfaces, grey-white cars,
  no cast shadows; more vehicles, fewer people and cyclists, only some of the shape variants
- ``citylike``   (Cityscapes) muted urban materials, cast shadows, exposure, ego hood, mild blur
- ``dashcam``    (BDD100K) warm worn materials (cracked asphalt), low camera, hood, blur, noise
- ``streetview`` (Mapillary) cool vivid family with glass panels and pavers that *no foundation
  model's pretraining data contains*, strong shadows, varied camera
- ``fog``, ``night``, ``rain``, ``snow``  (ACDC) adverse weather over the ``citylike`` look
- ``painted``    a cubist painting style (QueryDiff's Figure 1), outside the VFM's and VLM's data
  (the diffusion teacher's data includes paintings, as Stable Diffusion's does)
- ``validation`` a suburban look used only for model selection, never a target
- ``web``        the pretraining world, not the benchmark: broad content (every shape variant,
  wide class frequencies and cameras) in looks that are either one of the covered families
  (``urban``, ``dashcam``, ``suburban``, with any weather) or a random family (random palette,
  random material per class from the library, random lighting). It never draws the source's
  ``rendered`` family, ``streetview``'s ``mapillary`` family (or its two materials) or the
  painted style.

Toy benchmark protocol (``TOY_BENCHMARK``): train on ``synthetic`` ``train`` (2,000 scenes) at
64x128, select the checkpoint by mIoU on ``validation`` ``val`` (200 scenes), report mIoU at 64x128
on the ``test`` split (200 scenes) of every target domain. Splits never share scenes: a scene's
seed is derived from (seed, domain, split, index, world).

World 1 (``lessons.toyworld1``, version 1.0) stays renderable: ``ToyWorld(..., world="1.0")``.
Its targets are recolours of one scene distribution and its toy models learned the answer; the
lessons keep it as the contrast where the papers' preconditions are absent.

Dimension glossary: H W image height and width, K classes (19), NB shade bins of a colour table.

ToyWorld is versioned: any change to what a seed renders bumps ``TOYWORLD_VERSION`` and means
regenerating the toy weights, lesson checkpoints and notebook outputs (the golden hashes in
``tests/test_toyworld.py`` fail until then).
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch
from matplotlib.colors import rgb_to_hsv
from torch.utils.data import Dataset

from lessons import toyworld1 as w1
from lessons.classes import IGNORE_INDEX, NUM_CLASSES
from lessons.toyworld1 import (
    BICYCLE,
    BUILDING,
    BUS,
    CAR,
    DEFAULT_SIZE,
    FENCE,
    HOOD,
    LAMP,
    MAX_SIZE,
    MIN_SIZE,
    PERSON,
    POLE,
    RENDERED_CLASSES,
    RIDER,
    ROAD,
    SIDEWALK,
    SKY,
    SPLITS,
    TERRAIN,
    THIN_CLASSES,
    TRUCK,
    VEGETATION,
    WALL,
    Camera,
    Side,
    render_digest,
)

__all__ = [
    "COURSE_WORLD",
    "DEFAULT_SIZE",
    "DOMAINS",
    "FAMILIES",
    "MATERIALS",
    "MAX_SIZE",
    "MIN_SIZE",
    "PRETRAINING",
    "RENDERED_CLASSES",
    "SOURCE_DOMAIN",
    "SPLITS",
    "TARGET_DOMAINS",
    "THIN_CLASSES",
    "TOYWORLD_VERSION",
    "TOY_BENCHMARK",
    "VALIDATION_DOMAIN",
    "WORLD_VERSIONS",
    "Content",
    "Raster",
    "Rendered",
    "Scene",
    "Style",
    "Thing",
    "ToyWorld",
    "benchmark_datasets",
    "current_world",
    "domains_of",
    "draw_scene",
    "in_world",
    "rasterize",
    "render",
    "render_across_domains",
    "render_digest",
    "render_sample",
    "sample_style",
    "scene_seed",
    "stylize",
    "toy_benchmark",
    "use_world",
]

TOYWORLD_VERSION = "2.0"
WORLD_VERSIONS: tuple[str, ...] = (w1.TOYWORLD_VERSION, TOYWORLD_VERSION)

SOURCE_DOMAIN = "synthetic"
VALIDATION_DOMAIN = "validation"
TARGET_DOMAINS: tuple[str, ...] = (
    "citylike", "dashcam", "streetview", "fog", "night", "rain", "snow", "painted",
)
PRETRAINING_DOMAIN = "web"
DOMAINS: tuple[str, ...] = (SOURCE_DOMAIN, *TARGET_DOMAINS, VALIDATION_DOMAIN, PRETRAINING_DOMAIN)

TOY_BENCHMARK: dict = {
    "size": DEFAULT_SIZE,           # render and evaluate at 64x128 (H, W)
    "source": SOURCE_DOMAIN,
    "train_split": "train", "train_length": 2000,
    "val_domain": VALIDATION_DOMAIN, "val_split": "val", "val_length": 200,
    "targets": TARGET_DOMAINS, "test_split": "test", "test_length": 200,
    "eval_size": DEFAULT_SIZE,
    "seeds": (0, 1, 2, 3, 4),
}

_DOMAIN_CODE = {name: k for k, name in enumerate(DOMAINS)}
_SPLIT_CODE = {name: k for k, name in enumerate(SPLITS)}
_WORLD_WORD = 2                      # the last seed word: world 2's scenes are not world 1's

GROUND_CLASSES: tuple[int, ...] = (ROAD, SIDEWALK, TERRAIN)
COLOURFUL_CLASSES: tuple[int, ...] = (BUILDING, PERSON, RIDER, CAR, TRUCK, BUS, BICYCLE)
"""Classes whose instances take their own paint in families with ``instance_hue`` > 0."""


# ----------------------------------------------------------------------------------------------
# Content: what a domain's streets hold
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Content:
    """A domain's scene prior: camera, class frequencies and shape variants.

    Count ranges are ``[lo, hi)``; ``truck``, ``bus`` and ``cyclist`` are the probabilities of
    one; ``variants`` gives each kind's shape variants with their weights.
    """

    camera: tuple          # (horizon, vanishing-x, camera-height, hood) ranges
    cars: tuple[int, int] = (1, 5)
    truck: float = 0.15
    bus: float = 0.2
    people: tuple[int, int] = (1, 7)
    cyclist: float = 0.5
    trees: tuple[int, int] = (1, 5)
    poles: tuple[int, int] = (1, 4)
    park: float = 0.2
    variants: dict = field(default_factory=dict)


_ALL_VARIANTS = {"car": (("sedan", 1), ("hatchback", 1), ("van", 1), ("suv", 1)),
                 "truck": (("box", 1), ("pickup", 1)), "bus": (("single", 1), ("double", 1)),
                 "tree": (("round", 1), ("column", 1), ("cone", 1)),
                 "person": (("adult", 3), ("child", 1))}
_REAL_VARIANTS = {"car": (("sedan", 3), ("hatchback", 3), ("van", 2), ("suv", 2)),
                  "truck": (("box", 1), ("pickup", 1)), "bus": (("single", 3), ("double", 2)),
                  "tree": (("round", 4), ("column", 3), ("cone", 3)),
                  "person": (("adult", 4), ("child", 1))}
_CITY_CAMERA = ((0.38, 0.46), (0.44, 0.56), (0.9, 1.1), (0.10, 0.14))
_REAL = Content(_CITY_CAMERA, variants=_REAL_VARIANTS)
CONTENT: dict[str, Content] = {
    "synthetic": Content(((0.40, 0.50), (0.42, 0.58), (0.9, 1.1), (0.0, 0.0)), cars=(2, 7),
                         truck=0.35, bus=0.3, people=(0, 3), cyclist=0.2, trees=(1, 3),
                         park=0.1,
                         variants={"car": (("sedan", 3), ("suv", 2)), "truck": (("box", 1),),
                                   "bus": (("single", 1),), "tree": (("round", 1),),
                                   "person": (("adult", 1),)}),
    "citylike": _REAL,
    "dashcam": replace(_REAL, camera=((0.46, 0.56), (0.40, 0.60), (0.7, 0.9), (0.12, 0.18)),
                       cars=(2, 7), people=(0, 5)),
    "streetview": replace(_REAL, camera=((0.30, 0.56), (0.35, 0.65), (0.8, 1.5), (0.0, 0.0))),
    "painted": replace(_REAL, camera=((0.40, 0.50), (0.42, 0.58), (0.9, 1.1), (0.0, 0.0))),
    "validation": replace(_REAL, camera=((0.38, 0.52), (0.40, 0.60), (0.85, 1.2), (0.0, 0.0))),
    "web": Content(((0.30, 0.58), (0.35, 0.65), (0.7, 1.5), (0.0, 0.0)), cars=(0, 7),
                   truck=0.3, bus=0.3, people=(0, 8), cyclist=0.4, trees=(0, 6), poles=(1, 5),
                   park=0.3, variants=_ALL_VARIANTS),
}
for _adverse in ("fog", "night", "rain", "snow"):  # ACDC is filmed from a car like Cityscapes
    CONTENT[_adverse] = _REAL


@dataclass(frozen=True)
class Thing:
    """An object standing on the ground: kind, shape variant, lateral position, ground row and
    shade (its paint; the same number picks its colour in families with instance colours)."""

    kind: str        # car, truck, bus, person, cyclist, tree, pole
    lateral: float   # world units from the road centre (negative = left)
    ground: float    # ground-contact row below the horizon, fraction of H (depth proxy)
    shade: float
    extra: int = 0   # pole: 0 bare, 1 sign, 2 light; tree: 0 round, 1 column (world 1's meaning)
    variant: str = ""


@dataclass(frozen=True)
class Scene:
    """Geometry of one street scene (world 1's street, world 2's things)."""

    camera: Camera
    road_half: float
    left: Side
    right: Side
    far_height: float        # backdrop height at the street's end, fraction of H
    lane_phase: float
    things: tuple[Thing, ...] = ()


def _pick_variant(r: w1._Draws, options: tuple) -> str:
    total = sum(wt for _, wt in options)
    x, acc = r.u(0.0, total), 0.0
    for name, wt in options:
        acc += wt
        if x < acc:
            return name
    return options[-1][0]


def _draw_side(r: w1._Draws, park: float) -> Side:
    n = r.int(2, 6)
    cuts = sorted(r.u(0.05, 0.95) for _ in range(n - 1))
    barrier = None
    if r.coin(0.6):
        a = r.u(0.0, 0.6)
        barrier = (r.pick((WALL, FENCE)), a, a + r.u(0.2, 0.4), r.u(0.5, 0.9))
    return Side(sidewalk=r.u(0.9, 2.0), terrain=r.u(0.6, 1.6) if r.coin(0.6) else 0.0,
                kind="park" if r.coin(park) else "buildings",
                heights=tuple(r.u(2.5, 9.0) for _ in range(n)), edges=tuple(cuts),
                shades=tuple(r.u(0.0, 0.95) for _ in range(n)), barrier=barrier)


def _draw_things(r: w1._Draws, c: Content, road_half: float, left: Side, right: Side
                 ) -> list[Thing]:
    things: list[Thing] = []
    v = c.variants

    def side_of() -> Side:
        return (-1, left) if r.coin(0.5) else (1, right)

    for _ in range(r.int(*c.cars)):                                  # cars in lanes
        lane = r.pick((-0.5, 0.5)) * road_half + r.u(-0.25, 0.25)
        things.append(Thing("car", lane, r.u(0.04, 0.5), r.u(0.2, 0.97),
                            variant=_pick_variant(r, v["car"])))
    for kind, p in (("truck", c.truck), ("bus", c.bus)):
        if r.coin(p):
            things.append(Thing(kind, r.pick((-0.5, 0.5)) * road_half, r.u(0.05, 0.3),
                                r.u(0.3, 0.97), variant=_pick_variant(r, v[kind])))
    for _ in range(r.int(*c.people)):                                # pedestrians on sidewalks
        sign, side = side_of()
        lat = sign * (road_half + side.sidewalk * r.u(0.2, 0.8))
        things.append(Thing("person", lat, r.u(0.06, 0.45), r.u(0.15, 0.97),
                            variant=_pick_variant(r, v["person"])))
    if r.coin(c.cyclist):                                             # a cyclist at the kerb
        sign, _ = side_of()
        things.append(Thing("cyclist", sign * road_half * 0.85, r.u(0.08, 0.4), r.u(0.15, 0.97)))
    for _ in range(r.int(*c.trees)):                                 # trees on the verges
        sign, side = side_of()
        lat = sign * (road_half + side.sidewalk + 0.5 * side.terrain)
        variant = _pick_variant(r, v["tree"])
        things.append(Thing("tree", lat, r.u(0.04, 0.3), r.u(0.0, 0.97),
                            int(variant == "column"), variant))
    for k in range(r.int(*c.poles)):                                 # the first two carry
        sign, side = side_of()                                       # a sign and a light
        extra = k + 1 if k < 2 else r.int(0, 3)
        things.append(Thing("pole", sign * (road_half + 0.3 * side.sidewalk), r.u(0.1, 0.5),
                            r.u(0.0, 0.97), extra))
    return things


def draw_scene(seed: int | np.random.Generator, domain: str = SOURCE_DOMAIN) -> Scene:
    """Sample one scene's geometry from ``domain``'s content prior (camera, things, variants)."""
    _check_domain(domain)
    c = CONTENT[domain]
    r = w1._Draws(seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed))
    camera = Camera(*(r.u(*lo_hi) for lo_hi in c.camera))
    road_half = r.u(1.6, 3.0)
    left, right = _draw_side(r, c.park), _draw_side(r, c.park)
    things = _draw_things(r, c, road_half, left, right)
    return Scene(camera, road_half, left, right, far_height=r.u(0.03, 0.12),
                 lane_phase=r.u(0.0, 1.0), things=tuple(things))


# ----------------------------------------------------------------------------------------------
# Rasterisation: scene -> label, shade and contact shadows
# ----------------------------------------------------------------------------------------------
class Raster(NamedTuple):
    """A rasterised scene: label (H, W) uint8 trainIds (255 ignore), shade (H, W) float32 in
    [0, 1], contact (H, W) float32 (1 under things), and the scene (lighting needs its geometry)."""

    label: np.ndarray
    shade: np.ndarray
    contact: np.ndarray
    scene: Scene


# (class, width, height in world units, body top, cabin left/right, windows [(top, bottom)],
#  window left/right): a vehicle seen from behind, fractions of its box
_VEHICLES: dict[str, tuple] = {
    "sedan": (CAR, 1.2, 1.0, 0.45, (0.15, 0.85), ((0.08, 0.42),), (0.22, 0.78)),
    "hatchback": (CAR, 1.1, 1.1, 0.5, (0.08, 0.92), ((0.1, 0.45),), (0.18, 0.82)),
    "suv": (CAR, 1.3, 1.3, 0.5, (0.1, 0.9), ((0.1, 0.42),), (0.2, 0.8)),
    "van": (CAR, 1.3, 1.6, 0.0, (0.0, 1.0), ((0.08, 0.35),), (0.15, 0.85)),
    "box": (TRUCK, 1.6, 2.0, 0.0, (0.0, 1.0), ((0.1, 0.4),), (0.08, 0.92)),
    "pickup": (TRUCK, 1.4, 1.3, 0.45, (0.2, 0.8), ((0.1, 0.4),), (0.3, 0.7)),
    "single": (BUS, 1.7, 2.3, 0.0, (0.0, 1.0), ((0.1, 0.4),), (0.08, 0.92)),
    "double": (BUS, 1.7, 3.1, 0.0, (0.0, 1.0), ((0.06, 0.28), (0.4, 0.6)), (0.08, 0.92)),
}


def _vehicle(label, shade, t: Thing, x, yb, s) -> tuple[float, float]:
    """A vehicle from behind: body, cabin, windows, tail lights, wheels; returns (width, height)
    in pixels for its contact shadow."""
    cls, wid, hei, body_top, (cl, cr), windows, (wl, wr) = _VEHICLES[t.variant]
    ww, hh = max(wid * s, 3.0), max(hei * s, 2.0)
    x0, y0 = x - ww / 2, yb - hh
    w1._box(label, shade, y0 + body_top * hh, yb, x0, x0 + ww, cls, t.shade)         # body
    w1._box(label, shade, y0, y0 + body_top * hh, x0 + cl * ww, x0 + cr * ww, cls, t.shade)
    for top, bottom in windows:
        w1._box(label, shade, y0 + top * hh, y0 + bottom * hh, x0 + wl * ww, x0 + wr * ww,
                cls, 0.02)
    lamp = max(0.12 * ww, 1.0)                                                     # tail lights
    w1._box(label, shade, yb - 0.45 * hh, yb - 0.3 * hh, x0, x0 + lamp, cls, LAMP)
    w1._box(label, shade, yb - 0.45 * hh, yb - 0.3 * hh, x0 + ww - lamp, x0 + ww, cls, LAMP)
    w1._box(label, shade, yb - 0.08 * hh, yb, x0 + 0.05 * ww, x0 + 0.25 * ww, cls, 0.0)  # wheels
    w1._box(label, shade, yb - 0.08 * hh, yb, x0 + 0.75 * ww, x0 + 0.95 * ww, cls, 0.0)
    return ww, hh


def _cone_tree(label, shade, t: Thing, x, yb, s) -> None:
    """A conifer: a trunk and a crown of stacked, narrowing tiers."""
    trunk_h, r = 1.0 * s, max(1.0 * s, 3.0)
    w1._box(label, shade, yb - trunk_h, yb, x - max(0.12 * s, 1.0), x + max(0.12 * s, 1.0),
            VEGETATION, 0.05)
    tier = 1.1 * r
    for k in range(4):
        half = r * (1.0 - 0.22 * k)
        top = yb - trunk_h - (k + 1) * tier
        w1._box(label, shade, top, top + 1.3 * tier, x - half, x + half, VEGETATION, t.shade)


def _footprint(contact: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> None:
    """Mark the ground under a thing (a flat box of half-sizes ry, rx around it) as shadowed."""
    h, w = contact.shape
    y0, y1 = max(math.floor(cy - ry + 0.5), 0), min(math.floor(cy + ry + 0.5), h)
    x0, x1 = max(math.floor(cx - rx + 0.5), 0), min(math.floor(cx + rx + 0.5), w)
    contact[y0:y1, x0:x1] = 1.0


def rasterize(scene: Scene, size: tuple[int, int] = DEFAULT_SIZE) -> Raster:
    """Scene -> :class:`Raster` (label, shade, contact shadows) at ``size`` (H, W)."""
    h, w = w1._check_size(size)
    label, shade = w1._street(scene, h, w)
    label, shade = np.ascontiguousarray(label), np.ascontiguousarray(shade)
    contact = np.zeros((h, w), np.float32)
    cam = scene.camera
    hz, vx = cam.horizon * h, cam.vanish_x * w
    poles = []
    for t in sorted(scene.things, key=lambda t: t.ground):          # far to near
        yb = hz + t.ground * h                                       # ground-contact row
        s = t.ground * h / cam.height                                # pixels per world unit
        x = vx + t.lateral * s
        if t.kind in ("car", "truck", "bus"):
            ww, _ = _vehicle(label, shade, t, x, yb, s)
            _footprint(contact, yb, x, max(0.12 * s, 1.0), 0.6 * ww + 0.5)
        elif t.kind == "person":
            scale = s if t.variant != "child" else 0.65 * s
            w1._person(label, shade, t, x, yb, scale)
            _footprint(contact, yb, x, max(0.08 * scale, 0.8), max(0.35 * scale, 1.5))
        elif t.kind == "cyclist":
            w1._cyclist(label, shade, t, x, yb, s)
            _footprint(contact, yb, x, max(0.08 * s, 0.8), max(0.4 * s, 1.5))
        elif t.kind == "tree":
            if t.variant == "cone":
                _cone_tree(label, shade, t, x, yb, s)
            else:
                w1._tree(label, shade, t, x, yb, s)
        elif t.kind == "pole":
            poles.append((t, x, yb, s))
    placed: list[tuple[float, float]] = []                           # thin classes last
    for t, x, yb, s in poles:
        half = w1._pole_half_width(t, s, w)
        x = min(max(x, half), w - half)                              # keep it inside the image
        if all(abs(x - px) >= half + ph + 1 for px, ph in placed):   # never overlap another
            w1._pole(label, shade, t, x, yb, s, h, w, h * (1.0 - cam.hood))
            placed.append((x, half))
    if cam.hood > 0:                                                 # ego-vehicle hood: ignore
        yy, xx = w1._grid(h, w)
        dxn = (xx - 0.5 * w) / (0.5 * w)
        hood = yy >= h * (1.0 - cam.hood * (1.0 - 0.5 * dxn**2))
        label[hood] = IGNORE_INDEX
        shade[hood] = 0.5
    return Raster(label, shade, contact, scene)


# ----------------------------------------------------------------------------------------------
# Families: palette + a material per class
# ----------------------------------------------------------------------------------------------
MATERIALS: tuple[str, ...] = ("flat", "grain", "blotch", "bricks", "leaves", "tiles", "clouds",
                              "streaks", "cracks", "gloss", "panels", "pavers")
"""The material library (texture patterns); ``panels`` and ``pavers`` exist only in the
``mapillary`` family (``streetview``), so no pretraining data shows them."""
_MAT = {name: k for k, name in enumerate(MATERIALS)}
WEB_MATERIALS: tuple[str, ...] = MATERIALS[:10]


@dataclass(frozen=True)
class Family:
    """A look's palette (``recolor`` arguments on the base palette, plus a fixed per-class hue
    offset of std ``class_shift``) and each class's material (name, amplitude)."""

    recolor: dict
    class_shift: float
    materials: dict          # trainId (or HOOD) -> (material, amplitude); others flat
    instance_hue: float      # spread of instance paint (0: the class's colour)
    seed: int                # draws the fixed per-class hue offsets


FAMILIES: dict[str, Family] = {
    "rendered": Family(dict(sat=1.15, val=1.0), 0.0, {}, 0.0, 1),
    "urban": Family(dict(sat=0.55, val=0.88, tint=(1.0, 0.98, 0.95)), 0.03, {
        ROAD: ("grain", 0.22), SIDEWALK: ("tiles", 0.18), BUILDING: ("bricks", 0.22),
        WALL: ("blotch", 0.2), FENCE: ("grain", 0.1), POLE: ("grain", 0.08),
        VEGETATION: ("leaves", 0.35), TERRAIN: ("streaks", 0.3), SKY: ("clouds", 0.1),
        PERSON: ("grain", 0.05), RIDER: ("grain", 0.05), CAR: ("gloss", 0.15),
        TRUCK: ("blotch", 0.12), BUS: ("gloss", 0.1), HOOD: ("grain", 0.05)}, 0.5, 2),
    "dashcam": Family(dict(hue=0.02, sat=0.65, val=0.95, tint=(1.08, 1.0, 0.82)), 0.04, {
        ROAD: ("cracks", 0.3), SIDEWALK: ("blotch", 0.22), BUILDING: ("blotch", 0.28),
        WALL: ("grain", 0.2), FENCE: ("grain", 0.12), POLE: ("grain", 0.1),
        VEGETATION: ("leaves", 0.3), TERRAIN: ("grain", 0.3), SKY: ("clouds", 0.06),
        PERSON: ("grain", 0.08), RIDER: ("grain", 0.08), CAR: ("gloss", 0.12),
        TRUCK: ("grain", 0.15), BUS: ("gloss", 0.1), HOOD: ("grain", 0.05)}, 0.5, 3),
    "mapillary": Family(dict(hue=-0.06, sat=1.25, val=0.92, tint=(0.82, 0.95, 1.15)), 0.05, {
        ROAD: ("blotch", 0.25), SIDEWALK: ("pavers", 0.3), BUILDING: ("panels", 0.3),
        WALL: ("bricks", 0.25), FENCE: ("streaks", 0.15), POLE: ("grain", 0.1),
        VEGETATION: ("blotch", 0.4), TERRAIN: ("grain", 0.3), SKY: ("clouds", 0.2),
        CAR: ("gloss", 0.2), TRUCK: ("blotch", 0.2), BUS: ("panels", 0.15)}, 0.5, 4),
    "suburban": Family(dict(hue=0.03, sat=0.85, val=0.9, tint=(0.96, 1.04, 0.94)), 0.03, {
        ROAD: ("grain", 0.18), SIDEWALK: ("grain", 0.15), BUILDING: ("blotch", 0.2),
        WALL: ("bricks", 0.2), VEGETATION: ("leaves", 0.3), TERRAIN: ("streaks", 0.25),
        SKY: ("clouds", 0.08), CAR: ("gloss", 0.12), BUS: ("gloss", 0.1)}, 0.4, 5),
    "painted": Family(dict(sat=1.4, val=1.0), 0.1, {}, 0.3, 6),
}
COVERED_FAMILIES: tuple[str, ...] = ("urban", "dashcam", "suburban")
"""Families the ``web`` pretraining world draws exactly (with any weather)."""
WEB_RANDOM_FAMILIES = 1024
"""How many random families (palette and per-class materials) the ``web`` world draws from."""
PRETRAINING: dict[str, tuple[str, ...]] = {
    "covered_targets": ("citylike", "dashcam", "fog", "night", "rain", "snow"),
    "outside": ("synthetic", "streetview", "painted"),
}
"""Which benchmark domains' looks the ``web`` world contains (model cards quote this)."""

NB = 32                                       # shade bins of a colour table
_BIN_CENTRES = ((np.arange(NB) + 0.5) / NB).astype(np.float32)
_BODY = (_BIN_CENTRES > 0.12) & (_BIN_CENTRES < 0.97)   # paint, not windows, wheels or lamps
_PAINT_COLUMNS = (np.asarray(COLOURFUL_CLASSES)[:, None] * NB
                  + np.nonzero(_BODY)[0][None, :]).ravel()   # colour-table columns of paint
_ROW = np.full(256, HOOD * NB, np.int32)      # label value -> its first colour-table column
_ROW[: NUM_CLASSES + 1] = np.arange(NUM_CLASSES + 1) * NB                 # (ignore: the hood)
_GROUND = np.isin(np.arange(256), GROUND_CLASSES).astype(np.float32)


class _Tables(NamedTuple):
    """A family's lookup tables: colour per (class, shade bin) (3, (K + 1) * NB), the paint
    columns' colours in HSV (P, 3), material index and amplitude per label value (256,)."""

    lut: np.ndarray
    paint: np.ndarray
    kind: np.ndarray
    amp: np.ndarray


def _tables(palette: np.ndarray, kind: np.ndarray, amp: np.ndarray) -> _Tables:
    """Tables from a palette (K + 1, 2, 3) of shade-0 and shade-1 colours per class."""
    kind[IGNORE_INDEX], amp[IGNORE_INDEX] = kind[HOOD], amp[HOOD]
    lerp = palette[:, 0, None, :] + (palette[:, 1] - palette[:, 0])[:, None, :] \
        * _BIN_CENTRES[None, :, None]                                        # (K + 1, NB, 3)
    lut = np.ascontiguousarray(lerp.reshape(-1, 3).T, dtype=np.float32)   # (3, (K + 1) * NB)
    return _Tables(lut, rgb_to_hsv(lut[:, _PAINT_COLUMNS].T), kind.astype(np.int32), amp)


def _family_tables(fam: Family) -> _Tables:
    """A named family's tables: palette, fixed per-class hue offsets, materials."""
    hue = fam.recolor.get("hue", 0.0)
    if fam.class_shift:
        hue = hue + np.random.default_rng(fam.seed).normal(0, fam.class_shift,
                                                           (NUM_CLASSES + 1, 1))
    args = {k: v for k, v in fam.recolor.items() if k != "hue"}
    kind, amp = np.zeros(256, np.int32), np.zeros(256, np.float32)
    for cls, (name, a) in fam.materials.items():
        kind[cls], amp[cls] = _MAT[name], a
    return _tables(w1.recolor(None, hue=hue, **args), kind, amp)


_FAMILY_TABLES = {name: _family_tables(f) for name, f in FAMILIES.items()}


def _random_family(index: int) -> _Tables:
    """Random family ``index`` of the web world: hue shifts per class, a material per class."""
    g = np.random.default_rng([index, 20261205])
    hue = g.uniform(-0.5, 0.5) + g.normal(0, g.uniform(0.0, 0.12), (NUM_CLASSES + 1, 1))
    palette = w1.recolor(None, hue=hue, sat=g.uniform(0.4, 1.5))
    kind, amp = np.zeros(256, np.int32), np.zeros(256, np.float32)
    kind[: NUM_CLASSES + 1] = g.integers(0, len(WEB_MATERIALS), NUM_CLASSES + 1)
    amp[: NUM_CLASSES + 1] = g.uniform(0.0, 0.3, NUM_CLASSES + 1)
    return _tables(palette, kind, amp)


@lru_cache(maxsize=1)
def _web_families() -> tuple[_Tables, ...]:
    """Every random family of the web world, made once (about 0.1 s)."""
    return tuple(_random_family(k) for k in range(WEB_RANDOM_FAMILIES))


# ----------------------------------------------------------------------------------------------
# Styles
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Style:
    """How a scene looks: family (palette, materials), lighting, weather, optics.

    ``family="random"`` is a web look: random family number ``look`` of the web world.
    """

    family: str = "rendered"
    look: int = 0               # family "random": which of the web world's random families
    sat: float = 1.0            # saturation and value (brightness) scales of the colours
    val: float = 1.0
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
    texture: float = 1.0        # scales the family's material amplitudes
    instance_hue: float | None = None   # None: the family's
    shadows: float = 0.0        # cast-shadow darkness (0: none)
    sun_left: bool = True       # the sun on the left: facades on the right cast shadows
    sun_length: float = 0.4     # shadow width per unit of facade height
    contact: float = 0.3        # darkness of the contact shadows under things
    exposure: float = 1.0
    glare: float = 0.0          # strength of a sun glare over everything near the sun
    contrast: float = 1.0
    weather: str = "clear"      # clear, fog, night, rain, snow
    strength: float = 0.0       # weather strength in [0, 1]
    painted: bool = False       # cubist facets, posterised colours, dark edges
    blur: int = 0               # passes of a [1, 2, 1] / 4 blur
    noise: float = 0.0          # sensor-noise std


def _sunny(rng: np.random.Generator, s: Style, p_sun: float, dark: tuple[float, float],
           exposure: tuple[float, float], p_glare: float) -> Style:
    """A domain's per-image lighting: sun (and its side), shadow darkness, exposure, glare."""
    sun = rng.random() < p_sun
    return replace(s, shadows=float(rng.uniform(*dark)) if sun else 0.0,
                   sun_left=bool(rng.random() < 0.5), sun_length=float(rng.uniform(0.2, 0.6)),
                   exposure=float(rng.uniform(*exposure)),
                   glare=float(rng.uniform(0.3, 0.7)) if sun and rng.random() < p_glare else 0.0)


def _jitter(rng: np.random.Generator, s: Style, sv: float = 0.06, tint: float = 0.03) -> Style:
    """Small per-image colour variation inside a fixed domain (a domain is a distribution)."""
    return replace(s, sat=s.sat * float(rng.uniform(1 - sv, 1 + sv)),
                   val=s.val * float(rng.uniform(1 - sv, 1 + sv)),
                   tint=tuple(float(t) for t in s.tint * rng.uniform(1 - tint, 1 + tint, 3)))


_URBAN = Style("urban", contact=0.45, contrast=0.9, blur=1, noise=0.01)
_DOMAIN_STYLES: dict[str, Style] = {
    "synthetic": Style("rendered"),
    "citylike": _URBAN,
    "dashcam": Style("dashcam", contact=0.45, contrast=0.75, blur=2, noise=0.035),
    "streetview": Style("mapillary", contact=0.5, contrast=1.1, noise=0.015),
    "fog": replace(_URBAN, weather="fog", strength=0.75),
    "night": replace(_URBAN, noise=0.03, weather="night", strength=0.8),
    "rain": replace(_URBAN, contrast=0.85, noise=0.02, weather="rain", strength=0.7),
    "snow": replace(_URBAN, weather="snow", strength=0.7),
    "painted": Style("painted", painted=True, contrast=1.1),
    "validation": Style("suburban", contact=0.4, contrast=0.95, blur=1, noise=0.01),
}
# per domain: (P(sun), shadow darkness, exposure range, P(glare | sun))
_LIGHTING: dict[str, tuple] = {
    "citylike": (0.7, (0.3, 0.55), (0.8, 1.25), 0.2),
    "dashcam": (0.6, (0.3, 0.55), (0.7, 1.4), 0.3),
    "streetview": (0.8, (0.4, 0.65), (0.8, 1.3), 0.2),
    "snow": (0.3, (0.2, 0.35), (0.9, 1.2), 0.1),
    "validation": (0.5, (0.3, 0.5), (0.85, 1.2), 0.1),
}
_WEATHERS = ("clear",) * 6 + ("fog", "night", "rain", "snow")


def _web_style(rng: np.random.Generator) -> Style:
    """A look of the pretraining world: a covered family, or a random one; any weather."""
    weather = _WEATHERS[int(rng.integers(0, len(_WEATHERS)))]
    optics = dict(blur=int(rng.integers(0, 3)), noise=float(rng.uniform(0.0, 0.035)),
                  contrast=float(rng.uniform(0.75, 1.1)), contact=float(rng.uniform(0.2, 0.5)),
                  weather=weather,
                  strength=float(rng.uniform(0.3, 0.9)) if weather != "clear" else 0.0)
    if rng.random() < 0.45:
        name = COVERED_FAMILIES[int(rng.integers(0, len(COVERED_FAMILIES)))]
        style = _jitter(rng, Style(name, **optics), 0.12, 0.06)
    else:
        style = Style("random", look=int(rng.integers(0, WEB_RANDOM_FAMILIES)),
                      val=float(rng.uniform(0.7, 1.15)),
                      tint=tuple(float(t) for t in rng.uniform(0.85, 1.15, 3)),
                      texture=float(rng.uniform(0.3, 1.5)),
                      instance_hue=float(rng.uniform(0.0, 0.5)), **optics)
    if weather in ("clear", "snow"):
        style = _sunny(rng, style, 0.6, (0.2, 0.6), (0.7, 1.4), 0.25)
    return style


def sample_style(domain: str, rng: np.random.Generator) -> Style:
    """Draw an image's style from a domain's distribution (``web``: the pretraining looks)."""
    _check_domain(domain)
    if domain == PRETRAINING_DOMAIN:
        return _web_style(rng)
    style = _jitter(rng, _DOMAIN_STYLES[domain])
    if domain in _LIGHTING:
        style = _sunny(rng, style, *_LIGHTING[domain])
    return style


# ----------------------------------------------------------------------------------------------
# Stylisation: raster -> RGB
# ----------------------------------------------------------------------------------------------
def _colour_table(t: _Tables, style: Style, instance_hue: float, rng: np.random.Generator
                  ) -> np.ndarray:
    """(3, (K + 1) * NB): each class's colour per shade bin after the style's saturation, value,
    tint and exposure; the paint bins of colourful classes get their own hue (any hue at
    ``instance_hue`` = 0.5) and some saturation."""
    lut = t.lut.copy()
    if instance_hue > 0:
        hsv = t.paint.copy()                                                 # (P, 3)
        u = rng.random((2, len(hsv)))
        hsv[:, 0] = np.mod(hsv[:, 0] + instance_hue * (2 * u[0] - 1), 1.0)
        hsv[:, 1] = np.minimum(hsv[:, 1] + instance_hue * u[1], 1.0)
        lut[:, _PAINT_COLUMNS] = w1._hsv_to_rgb(hsv).T
    grey = lut.mean(0, keepdims=True)                                        # saturation
    lut = grey + (lut - grey) * np.float32(style.sat)
    gain = np.asarray(style.tint, np.float32)[:, None] * np.float32(style.val * style.exposure)
    return np.clip(lut * gain, 0.0, 2.0)


@lru_cache(maxsize=8)
def _material_tiles(h: int, w: int) -> np.ndarray:
    """(len(MATERIALS), 2H, 2W) fixed texture tiles; each image crops them at one offset."""
    g = np.random.default_rng(20261205)
    H, W = 2 * h, 2 * w
    yy, xx = np.mgrid[0:H, 0:W]

    def smooth(cell: int) -> np.ndarray:
        coarse = g.standard_normal((H // cell + 2, W // cell + 2))
        t = np.repeat(np.repeat(coarse, cell, 0), cell, 1)[:H, :W]
        for _ in range(2):
            t = (t + np.roll(t, cell // 2, 0) + np.roll(t, cell // 2, 1) + np.roll(t, -1, 0)) / 4
        return t / np.abs(t).max()

    fine = g.standard_normal((H, W)) * 0.5
    cell = max(h // 32, 1)                                   # material scale in pixels
    bricks = np.where((yy % (3 * cell) == 0)
                      | ((xx + 3 * cell * ((yy // (3 * cell)) % 2)) % (6 * cell) == 0), -1.0,
                      0.2 * fine)
    leaves = np.sign(g.standard_normal((H, W))) * 0.6 + 0.5 * smooth(max(h // 16, 2))
    tiles = np.where((yy % (5 * cell) == 0) | (xx % (5 * cell) == 0), -1.0, 0.15 * fine)
    streaks = np.repeat(g.standard_normal((H // 3 + 1, W)), 3, 0)[:H] * 0.6
    cracks = 0.3 * fine
    for _ in range(H * W // 400):                            # dark random polylines
        y, x = int(g.integers(0, H)), int(g.integers(0, W))
        for _ in range(int(g.integers(4, 12))):
            cracks[y % H, x % W] = -1.5
            y, x = y + int(g.integers(-1, 2)), x + int(g.integers(0, 2))
    gloss = 0.5 * np.sin(yy * (1.3 / cell)) + 2.0 * (g.random((H, W)) < 0.01)   # sheen, glints
    panels = np.where((xx % (4 * cell) == 0) | (yy % (6 * cell) == 0), -1.0,
                      0.5 * smooth(max(h // 8, 2)))
    pavers = np.where(((xx + yy) % (6 * cell) == 0) | ((xx - yy) % (6 * cell) == 0), -1.0,
                      0.2 * fine)
    stack = {"flat": np.zeros((H, W)), "grain": fine, "blotch": smooth(max(h // 16, 2)),
             "bricks": bricks, "leaves": leaves, "tiles": tiles,
             "clouds": smooth(max(h // 6, 2)), "streaks": streaks, "cracks": cracks,
             "gloss": gloss, "panels": panels, "pavers": pavers}
    return np.stack([stack[m] for m in MATERIALS]).astype(np.float32)


def _material(kind: np.ndarray, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W): each pixel's material texture, from the tile of its ``kind`` (H, W) at one random
    offset shared by every material of the image."""
    y, x = int(rng.integers(0, h + 1)), int(rng.integers(0, w + 1))
    return np.take(_material_tiles(h, w), kind * np.int32(4 * h * w)
                   + (_window(h, w) + np.int32(y * 2 * w + x)))


@lru_cache(maxsize=8)
def _window(h: int, w: int) -> np.ndarray:
    """(H, W) flat offsets of an H x W window's pixels in a (2H, 2W) tile."""
    return (np.arange(h, dtype=np.int32)[:, None] * (2 * w)
            + np.arange(w, dtype=np.int32)[None, :])


def _cast_shadows(scene: Scene, style: Style, h: int, w: int) -> np.ndarray:
    """(H, W) in [0, 1]: where the sunlit side's facades shade the ground and what stands on it.

    The shadow of a facade of height z on flat ground is a strip of width ``sun_length * z``
    along it; in the image it is bounded by a line through the vanishing point, and it covers
    sidewalk, road, cars and people alike (a label boundary means nothing to light).
    """
    cam = scene.camera
    hz, vx, ch = cam.horizon * h, cam.vanish_x * w, cam.height
    yy, xx = w1._grid(h, w)
    sign = 1.0 if style.sun_left else -1.0                    # the shaded side: +1 right
    side = scene.right if style.sun_left else scene.left
    if side.kind == "park":
        return np.zeros((h, w), np.float32)
    depth = np.maximum(yy - hz, 1e-3)                         # (H, 1)
    facade = scene.road_half + side.sidewalk + side.terrain
    # the facade column at each row, and the skyline height there
    col = vx + sign * facade * depth / ch                     # (H, 1)
    gap = 3.0 * scene.far_height * h
    start, edge = (vx + gap, float(w)) if sign > 0 else (vx - gap, 0.0)
    height, _ = w1._skyline(side, col, start, edge)          # (H, 1)
    width = style.sun_length * height                         # (H, 1) world units
    dist = facade - sign * (xx - vx) * ch / depth             # (H, W) from the facade line
    inside = (dist >= 0) & (yy > hz + 0.5)
    return (inside * np.clip((width - dist) / (0.15 * width + 1e-3), 0.0, 1.0)).astype(
        np.float32)


def _glare(scene: Scene, style: Style, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W) a soft radial glow around the sun, low in the sky on its side."""
    yy, xx = w1._grid(h, w)
    cy = scene.camera.horizon * h * float(rng.uniform(0.2, 0.9))
    cx = w * (float(rng.uniform(0.0, 0.35)) if style.sun_left else float(rng.uniform(0.65, 1)))
    r = w * float(rng.uniform(0.2, 0.45))
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (r * r)).astype(np.float32)


def stylize(raster: Raster, style: Style, rng: np.random.Generator) -> np.ndarray:
    """A :class:`Raster` -> image (3, H, W) float32 in [0, 1]."""
    label, shade, contact, scene = raster
    h, w = label.shape
    if style.family == "random":
        t, instance_hue = _web_families()[style.look], style.instance_hue or 0.0
    else:
        t = _FAMILY_TABLES[style.family]
        instance_hue = (FAMILIES[style.family].instance_hue if style.instance_hue is None
                        else style.instance_hue)
    lut = _colour_table(t, style, instance_hue, rng)                     # (3, (K + 1) * NB)
    idx = np.take(_ROW, label) + (shade * np.float32(NB - 1e-3)).astype(np.int32)  # (H, W)
    img = np.take(lut, idx, 1)                                            # (3, H, W)
    # one (H, W) factor: contact and cast shadows, material texture, contrast's gain
    light = 1 - np.float32(style.contact) * contact * np.take(_GROUND, label)
    if style.shadows > 0:
        light *= 1 - np.float32(style.shadows) * _cast_shadows(scene, style, h, w)
    if t.amp.any():
        tex = _material(np.take(t.kind, label), h, w, rng)
        light *= 1 + np.float32(style.texture) * np.take(t.amp, label) * tex
    late = style.painted or style.glare > 0        # contrast after the painted look or glare
    if not late:
        light *= np.float32(style.contrast)
    img *= light
    if style.glare > 0:
        img += np.float32(style.glare) * _glare(scene, style, h, w, rng) * w1._rgb(1.0, 0.95, 0.8)
    tiles1 = w1._tiles(h, w)
    if style.painted:
        img = w1._paint(img, label, tiles1, rng)
    if late:
        img *= np.float32(style.contrast)
    if style.contrast != 1.0:                      # (x - 0.5) * c + 0.5, the gain applied above
        img += np.float32(0.5 * (1.0 - style.contrast))
    if style.weather != "clear":
        img = w1._weather(img, label, shade, style, scene.camera.horizon * h, rng, tiles1)
    img = w1._blur(img, style.blur)
    if style.noise > 0:
        img = img + w1._crop(tiles1["noise"], h, w, rng) * np.float32(style.noise)
    return np.clip(img, 0.0, 1.0, dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------
def _check_domain(domain: str) -> None:
    if domain not in _DOMAIN_CODE:
        raise ValueError(f"unknown ToyWorld domain {domain!r}; choose one of {', '.join(DOMAINS)}")


def _check_world(world: str) -> str:
    if world not in WORLD_VERSIONS:
        raise ValueError(f"unknown ToyWorld version {world!r}; choose one of "
                         f"{', '.join(WORLD_VERSIONS)}")
    return world


#: The world the course's toy foundation models and lessons run in by default. World 2's toy
#: models must pass their gates (``reprod.toy.gates``, docs/toyworld.md) before the course moves
#: to it; until then the default stays world 1 and world 2 is one ``use_world("2.0")`` away.
COURSE_WORLD = "1.0"
_CURRENT = [COURSE_WORLD]


def use_world(world: str) -> str:
    """Make ``world`` the default of every ToyWorld dataset and toy model built from now on
    (``lessons.backbones.toy_weights`` reads it); returns the previous default. World 1 is the
    contrast where the papers' preconditions are absent."""
    previous, _CURRENT[0] = _CURRENT[0], _check_world(world)
    return previous


@contextlib.contextmanager
def in_world(world: str) -> Iterator[str]:
    """``with in_world("2.0"):`` makes ``world`` the default inside the block and restores the
    previous default after it, whatever happens inside."""
    previous = use_world(world)
    try:
        yield world
    finally:
        use_world(previous)


def current_world() -> str:
    """The ToyWorld version datasets and toy models use by default (``use_world``)."""
    return _CURRENT[0]


def domains_of(world: str | None = None) -> tuple[str, ...]:
    """The domains a ToyWorld version renders (default: the current world)."""
    return DOMAINS if _check_world(world or current_world()) == TOYWORLD_VERSION else w1.DOMAINS


def scene_seed(seed: int, domain: str, split: str, index: int) -> list[int]:
    """The seed words of one world-2 dataset scene: distinct for every (seed, domain, split,
    index), and distinct from world 1's."""
    _check_domain(domain)
    if split not in _SPLIT_CODE:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return [w1._check_seed(seed), _DOMAIN_CODE[domain], _SPLIT_CODE[split],
            w1._check_seed(index, "index"), _WORLD_WORD]


def render(scene: Scene, style: Style, size: tuple[int, int] = DEFAULT_SIZE,
           rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Render a scene in a style: image (3, H, W) float32 in [0, 1], label (H, W) uint8."""
    raster = rasterize(scene, size)
    rng = rng if rng is not None else np.random.default_rng(0)
    return stylize(raster, style, rng), raster.label


def render_sample(seed_words, domain: str, size: tuple[int, int] = DEFAULT_SIZE
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Render the scene of ``seed_words`` in ``domain``: its own content prior and style draw."""
    rng = np.random.default_rng(seed_words)
    scene = draw_scene(rng, domain)
    return render(scene, sample_style(domain, rng), size, rng)


def render_across_domains(seed: int, size: tuple[int, int] = DEFAULT_SIZE,
                          domains: tuple[str, ...] | None = None,
                          world: str | None = None) -> dict[str, tuple]:
    """One scene (the source's content) in every domain's style (default: all of the world's):
    pixel-aligned (image, label) pairs."""
    world = world or current_world()
    domains = domains_of(world) if domains is None else domains
    if world != TOYWORLD_VERSION:
        return w1.render_across_domains(seed, size, domains)
    for d in domains:
        _check_domain(d)
    w1._check_seed(seed)
    raster = rasterize(draw_scene(np.random.default_rng([seed, 99, 0, _WORLD_WORD])), size)
    out = {}
    for d in domains:
        rng = np.random.default_rng([seed, 99, 1, _DOMAIN_CODE[d], _WORLD_WORD])
        out[d] = (stylize(raster, sample_style(d, rng), rng), raster.label.copy())
    return out


_WORLDS = {w1.TOYWORLD_VERSION: (w1.scene_seed, w1.render_sample),
           TOYWORLD_VERSION: (scene_seed, render_sample)}


class ToyWorld(Dataset):
    """A torch Dataset of ``length`` ToyWorld scenes from one domain and split.

    Item ``i`` is ``(image, label)``: image float32 (3, H, W) in [0, 1] (not normalised: each
    backbone bundle normalises its own way), label int64 (H, W) of trainIds with 255 = ignore.
    Items are rendered on the fly and are the same in every process for the same arguments.
    ``world`` picks the ToyWorld version (default: ``current_world()``; ``"1.0"``: world 1, the
    preconditions-absent contrast).
    """

    def __init__(self, domain: str = SOURCE_DOMAIN, split: str = "train",
                 size: tuple[int, int] = DEFAULT_SIZE, length: int = 1000, seed: int = 0,
                 world: str | None = None):
        world = world or current_world()
        self._seed_words, self._render = _WORLDS[_check_world(world)]
        self._seed_words(seed, domain, split, 0)           # validates domain, split and seed
        if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1:
            raise ValueError(f"length must be a positive integer, got {length!r}")
        self.domain, self.split, self.size = domain, split, w1._check_size(size)
        self.length, self.seed, self.world = int(length), int(seed), world

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = operator.index(index)
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for a ToyWorld of length {self.length}")
        index %= self.length
        image, label = self._render(self._seed_words(self.seed, self.domain, self.split, index),
                                    self.domain, self.size)
        return torch.from_numpy(image), torch.from_numpy(label.astype(np.int64))

    def __repr__(self) -> str:
        extra = "" if self.world == TOYWORLD_VERSION else f", world={self.world!r}"
        return (f"ToyWorld(domain={self.domain!r}, split={self.split!r}, size={self.size}, "
                f"length={self.length}, seed={self.seed}{extra})")


class Rendered(Dataset):
    """Every scene of a dataset rendered once and kept in memory: the same items as the dataset
    gives (float32 images, int64 labels), without rendering them again at every epoch.

    A training run of 500 steps x 16 draws the 2,000 source scenes four times over and a
    validation every 100 steps renders its 200 scenes five times; held here they cost 100 KB
    a scene at 64x128 (the labels kept as uint8)."""

    def __init__(self, dataset: Dataset):
        items = [dataset[i] for i in range(len(dataset))]
        if not items:
            raise ValueError("Rendered needs a dataset with at least one item")
        self.images = torch.stack([image for image, _ in items])              # (N, 3, H, W)
        labels = torch.stack([label for _, label in items])                   # (N, H, W)
        if labels.min() < 0 or labels.max() > 255:
            raise ValueError("labels must be class ids in 0..255 (255: ignore)")
        self.labels = labels.to(torch.uint8)
        self.source = repr(dataset)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index].long()

    def __repr__(self) -> str:
        return f"Rendered({self.source})"


def toy_benchmark(world: str | None = None) -> dict:
    """The toy benchmark protocol of a ToyWorld version (default: the current world's): world 2's
    ``TOY_BENCHMARK`` (seeds 0-4) or world 1's (seeds 0-2)."""
    return TOY_BENCHMARK if _check_world(world or current_world()) == TOYWORLD_VERSION \
        else w1.TOY_BENCHMARK


def benchmark_datasets(seed: int = 0, protocol: dict | None = None,
                       world: str | None = None) -> dict[str, ToyWorld]:
    """The toy benchmark's datasets: ``train`` (source), ``val`` (validation style), targets."""
    p = protocol or toy_benchmark(world)

    def ds(domain, split, size, length):
        return ToyWorld(domain, split, size, length, seed, world)

    sets = {"train": ds(p["source"], p["train_split"], p["size"], p["train_length"]),
            "val": ds(p["val_domain"], p["val_split"], p["size"], p["val_length"])}
    for d in p["targets"]:
        sets[d] = ds(d, p["test_split"], p["eval_size"], p["test_length"])
    return sets

