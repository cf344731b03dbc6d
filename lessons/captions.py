"""Captions for ToyWorld: the text half of the toy VLM's image-text pairs.

CLIP learned from web alt-text, and alt-text is mostly about *content*: what is in the picture,
how many, where, doing what; rarely about the camera or the weather, almost never about the
rendering. The toy VLM learns from captions written from ToyWorld's own scene metadata in that
spirit, made noisy the same way:

- **scene captions** describe a whole view: some of its classes (counts for cars, trucks, buses,
  people and cyclists), *where* things are (on the left, on the right, ahead, in the distance)
  and *relations* (a person on the sidewalk, a car on the road, a sign on a pole), with
  subtypes (a hatchback, a van, a pickup truck, a double-decker bus, a fir tree, a child); the
  weather in about one caption in ten and the look in one in twenty; clauses dropped at random,
  words drawn from synonyms;
- **region captions** describe a box of a view by the classes that fill most of it, often in the
  downstream prompt forms themselves (CAT-Seg's ``"A photo of a {} in the scene"``, a bare class
  name as tqdm and MFuser feed it) or by a subtype. The VLM sees them twice: as a crop of its
  own (about a third of the pairs) and as a region of a whole view, whose pooled dense
  embedding must match its caption (``reprod.toy.vlm``'s region term).

``HELD_OUT_CLASS`` ("bus") stays in the captions, so the VLM knows the word, while CAT-Seg's
unseen-class lesson keeps it out of all *segmentation* training: what CLIP knows about a class the
segmenter never saw is what open-vocabulary segmentation relies on. Some classes are often named
only by a subtype (``SUBTYPES``): a caption may say "a double-decker" and never "bus".

Dimension glossary: H W image size, K classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lessons import toyworld as tw
from lessons.classes import CLASSES, IGNORE_INDEX, NUM_CLASSES, TRAIN_ID
from lessons.text import CATSEG_TEMPLATE

__all__ = [
    "COUNTED", "HELD_OUT_CLASS", "MIN_PIXELS", "SUBTYPES", "SYNONYMS", "Facts", "Region",
    "caption_region", "caption_scene", "captioned_view", "class_areas", "class_id",
    "random_crop", "regions", "scene_facts",
]

HELD_OUT_CLASS: str = "bus"
"""The class CAT-Seg's unseen-class lesson holds out of segmentation training (never captions)."""

SYNONYMS: dict[str, tuple[str, ...]] = {
    "road": ("road", "street", "asphalt"), "sidewalk": ("sidewalk", "pavement"),
    "building": ("building", "house", "facade"), "wall": ("wall",), "fence": ("fence",),
    "pole": ("pole", "post"), "traffic light": ("traffic light", "signal"),
    "traffic sign": ("traffic sign", "road sign"), "vegetation": ("vegetation", "trees"),
    "terrain": ("terrain", "grass"), "sky": ("sky",), "person": ("person", "pedestrian"),
    "rider": ("rider", "cyclist"), "car": ("car", "automobile"), "truck": ("truck", "lorry"),
    "bus": ("bus", "coach"), "train": ("train", "tram"), "motorcycle": ("motorcycle",),
    "bicycle": ("bicycle", "bike"),
}
"""Caption words per class; the first is the class name the prompts use."""

SUBTYPES: dict[tuple[str, str], tuple[str, ...]] = {
    ("car", "sedan"): ("sedan",), ("car", "hatchback"): ("hatchback",),
    ("car", "van"): ("van", "minivan"), ("car", "suv"): ("SUV", "jeep"),
    ("truck", "box"): ("box truck", "delivery truck"), ("truck", "pickup"): ("pickup truck",
                                                                              "pickup"),
    ("bus", "single"): ("city bus",), ("bus", "double"): ("double-decker", "double-decker bus"),
    ("tree", "cone"): ("fir tree", "conifer"), ("tree", "column"): ("poplar",),
    ("person", "child"): ("child", "kid"),
}
"""Words for a thing's shape variant, keyed by (kind, variant) of ``lessons.toyworld.Thing``."""

COUNTED: tuple[str, ...] = ("car", "truck", "bus", "person", "rider")
_NUMBERS = ("no", "a", "two", "three", "four")
_PLURAL = {"person": "people", "bus": "buses", "pedestrian": "pedestrians", "coach": "coaches",
           "child": "children", "bicycle": "bicycles", "double-decker bus": "double-decker buses"}
_KIND_CLASS = {"car": "car", "truck": "truck", "bus": "bus", "person": "person",
               "cyclist": "rider", "tree": "vegetation", "pole": "pole"}
_WEATHER = {"fog": ("in fog", "on a foggy day"), "night": ("at night", "after dark"),
            "rain": ("in the rain", "on a rainy day"), "snow": ("in snow", "on a snowy day"),
            "clear": ("on a clear day", "in daylight")}
_LOOK = {"urban": "a city", "dashcam": "a dashcam", "suburban": "a suburban",
         "random": "a colourful", "rendered": "a rendered", "mapillary": "a street-level",
         "painted": "a painted"}
MIN_PIXELS: int = 16
"""Pixels a class needs in a view (at 64x128) before a caption may name it."""


@dataclass(frozen=True)
class Facts:
    """What a caption may say about one view: classes by area, the things it shows (with where
    they are), the weather and the look."""

    areas: dict[str, float]                 # class -> fraction of labelled pixels, largest first
    things: tuple[tuple[str, str, str, str], ...]   # (class, variant, side, distance) per thing
    weather: str                            # clear, fog, night, rain, snow
    family: str                             # the style's family

    @property
    def counts(self) -> dict[str, int]:
        """Instances per ``COUNTED`` class the view shows."""
        out = dict.fromkeys(COUNTED, 0)
        for cls, *_ in self.things:
            if cls in out:
                out[cls] += 1
        return out


def class_areas(label: np.ndarray, min_pixels: int = MIN_PIXELS) -> dict[str, float]:
    """Fraction of the labelled pixels of each class present with ``min_pixels`` or more."""
    valid = label[label != IGNORE_INDEX]
    if valid.size and int(valid.max()) >= NUM_CLASSES:
        raise ValueError(f"label value {int(valid.max())} outside 0..{NUM_CLASSES - 1} and 255")
    counts = np.bincount(valid.ravel(), minlength=NUM_CLASSES)            # (K,)
    total = max(int(counts.sum()), 1)
    order = np.argsort(-counts, kind="stable")
    return {CLASSES[k]: counts[k] / total for k in order if counts[k] >= min_pixels}


def _where(thing: tw.Thing, scene: tw.Scene) -> tuple[str, str]:
    """(side, distance) words of a thing: left / right / ahead, and near / far."""
    side = "ahead" if abs(thing.lateral) < 1.0 else ("on the left" if thing.lateral < 0
                                                      else "on the right")
    return side, "near" if thing.ground > 0.25 else "far"


def scene_facts(scene: tw.Scene, label: np.ndarray, style: tw.Style) -> Facts:
    """The facts of a whole view: classes from its label (H, W), things from its scene (only the
    classes the view shows)."""
    areas = class_areas(label)
    things = tuple((_KIND_CLASS[t.kind], t.variant, *_where(t, scene)) for t in scene.things
                   if _KIND_CLASS[t.kind] in areas)
    return Facts(areas, things, style.weather, style.family)


def _word(name: str, rng: np.random.Generator) -> str:
    options = SYNONYMS[name]
    return options[0] if rng.random() < 0.6 else options[int(rng.integers(len(options)))]


def _noun(cls: str, variant: str, rng: np.random.Generator) -> str:
    """A class word, or (about half the time, when there is one) its subtype's."""
    sub = SUBTYPES.get(({"rider": "cyclist", "vegetation": "tree"}.get(cls, cls), variant))
    if sub and rng.random() < 0.5:
        return sub[int(rng.integers(len(sub)))]
    return _word(cls, rng)


def _article(word: str) -> str:
    return f"{'an' if word[0] in 'aeiouAEIOU' else 'a'} {word}"


def _counted(word: str, n: int) -> str:
    if n <= 1:
        return _article(word)
    return f"{_NUMBERS[n] if n < len(_NUMBERS) else 'several'} {_PLURAL.get(word, word + 's')}"


def _listed(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


_GROUND_OF = {"car": "road", "truck": "road", "bus": "road", "person": "sidewalk",
              "rider": "road"}


def _phrases(facts: Facts, rng: np.random.Generator) -> list[str]:
    """Noun phrases for the things: counted groups, some placed (left / right / ahead / far) or
    related to the ground they stand on."""
    groups: dict[tuple[str, str], list[tuple]] = {}
    for t in facts.things:
        if t[0] in COUNTED:
            groups.setdefault((t[0], t[1] if rng.random() < 0.5 else ""), []).append(t)
    phrases = []
    for (cls, variant), members in groups.items():
        word = _noun(cls, variant, rng) if variant else _word(cls, rng)
        phrase = _counted(word, len(members))
        where = rng.random()
        sides = {m[2] for m in members}
        if where < 0.35 and len(sides) == 1:
            phrase += f" {sides.pop()}"
        elif where < 0.5 and cls in _GROUND_OF and _GROUND_OF[cls] in facts.areas:
            phrase += f" on the {_word(_GROUND_OF[cls], rng)}"
        elif where < 0.6 and all(m[3] == "far" for m in members):
            phrase += " in the distance"
        phrases.append(phrase)
    return phrases


def caption_scene(facts: Facts, rng: np.random.Generator, max_parts: int = 5) -> str:
    """A noisy alt-text for a whole view: mostly its content, rarely its weather or look."""
    things = _phrases(facts, rng)
    stuff = [n for n in facts.areas if n not in COUNTED and rng.random() < 0.5]
    trees = [t for t in facts.things if t[0] == "vegetation" and t[1] != "round"]
    if trees and rng.random() < 0.5:
        stuff = [s for s in stuff if s != "vegetation"] + [_noun("vegetation", trees[0][1], rng)]
    parts = things + [_word(s, rng) if s in SYNONYMS else s for s in stuff]
    if not parts:
        parts = [_word(next(iter(facts.areas)), rng)]
    rng.shuffle(parts)
    if "traffic sign" in facts.areas and "pole" in facts.areas and rng.random() < 0.2:
        parts.append("a sign on a pole")
    look = _LOOK.get(facts.family, "a") if rng.random() < 0.05 else "a"
    weather = f" {_WEATHER[facts.weather][int(rng.integers(2))]}" if rng.random() < 0.1 else ""
    return f"{look} street scene{weather} with {_listed(parts[:max_parts])}"


@dataclass(frozen=True)
class Region:
    """A box of a view (top, left, height, width in pixels) and its caption."""

    box: tuple[int, int, int, int]
    caption: str


def caption_region(areas: dict[str, float], variants: dict[str, str],
                   rng: np.random.Generator) -> str:
    """A region's caption: its largest one to three classes, often in a downstream prompt form,
    sometimes by a subtype (``variants``: class -> variant of the thing filling the region)."""
    names = list(areas)[: int(rng.integers(1, 4))]
    if len(names) == 1:
        name = names[0]
        if name in variants and rng.random() < 0.4:
            return f"a photo of {_article(_noun(name, variants[name], rng))}"
        form = rng.random()
        if form < 0.3:
            return CATSEG_TEMPLATE.format(name)
        if form < 0.5:
            return name                                            # tqdm / MFuser: the raw name
        return f"a photo of {_article(_word(name, rng))}"
    words = [_word(n, rng) for n in names]
    return "a close-up of " + _listed(words)


def random_crop(label: np.ndarray, rng: np.random.Generator,
                area: tuple[float, float] = (0.06, 0.3)) -> tuple[int, int, int, int]:
    """A (top, left, height, width) crop with the image's aspect ratio and ``area`` of it."""
    H, W = label.shape
    side = np.sqrt(rng.uniform(*area))
    h, w = max(round(H * float(side)), 8), max(round(W * float(side)), 8)
    return int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1)), h, w


def _variants_in(scene: tw.Scene, box: tuple[int, int, int, int], size: tuple[int, int]
                 ) -> dict[str, str]:
    """class -> variant of the nearest thing whose ground point lies in the box."""
    h, w = size
    top, left, bh, bw = box
    cam = scene.camera
    out: dict[str, str] = {}
    for t in sorted(scene.things, key=lambda t: t.ground):          # far to near: near wins
        y = cam.horizon * h + t.ground * h
        x = cam.vanish_x * w + t.lateral * t.ground * h / cam.height
        if t.variant and top <= y <= top + bh + 2 and left <= x <= left + bw:
            out[_KIND_CLASS[t.kind]] = t.variant
    return out


def regions(scene: tw.Scene, label: np.ndarray, rng: np.random.Generator, n: int = 4,
            min_fill: float = 0.3) -> list[Region]:
    """Up to ``n`` captioned boxes of a view whose largest class fills at least ``min_fill``."""
    out = []
    for _ in range(4 * n):
        box = random_crop(label, rng, (0.04, 0.25))
        top, left, h, w = box
        areas = class_areas(label[top:top + h, left:left + w], min_pixels=1)
        areas = {c: a for c, a in areas.items() if a >= 0.15}
        if areas and next(iter(areas.values())) >= min_fill:
            variants = _variants_in(scene, box, label.shape)
            out.append(Region(box, caption_region(areas, variants, rng)))
            if len(out) == n:
                break
    return out


def captioned_view(seed_words: list[int], crop_fraction: float = 0.35,
                   size: tuple[int, int] = tw.DEFAULT_SIZE, domain: str = "web", n_regions: int = 0
                   ) -> tuple[np.ndarray, str, bool] | tuple[np.ndarray, str, bool, list[Region]]:
    """One image-text pair: a ``domain`` render (3, H, W) or a crop of it, and a caption.

    Crops are returned at their own size; the caller resizes them. With ``n_regions`` > 0, the
    captioned regions of a whole view come fourth (a crop has none).
    """
    rng = np.random.default_rng(seed_words)
    scene = tw.draw_scene(rng, domain)
    raster = tw.rasterize(scene, size)
    style = tw.sample_style(domain, rng)
    image = tw.stylize(raster, style, rng)
    label = raster.label
    extra: tuple = () if n_regions == 0 else ([],)
    if rng.random() < crop_fraction:
        for region in regions(scene, label, rng, n=1, min_fill=0.2):
            top, left, h, w = region.box
            return (image[:, top:top + h, left:left + w], region.caption, True, *extra)
    caption = caption_scene(scene_facts(scene, label, style), rng)
    if n_regions:
        extra = (regions(scene, label, rng, n_regions),)
    return (image, caption, False, *extra)


def class_id(name: str) -> int:
    """The trainId of a class name (a clear error for an unknown one)."""
    if name not in TRAIN_ID:
        raise ValueError(f"unknown class {name!r}; the classes are {CLASSES}")
    return TRAIN_ID[name]
