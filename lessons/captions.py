"""Captions for ToyWorld: the text half of the toy VLM's image-text pairs.

CLIP learned from web alt-text: short, noisy, partial descriptions of what an image shows. The toy
VLM learns from captions written from ToyWorld's own scene metadata, made noisy the same way:

- **scene captions** describe a whole view: some of the classes it shows (counts for cars, trucks,
  buses, people and cyclists), the weather and time of day, and the look of the rendering, each
  clause dropped at random, words drawn from synonyms, the class list shuffled;
- **crop captions** (about half the pairs) describe a random crop by the one to three classes that
  fill most of it, often in the downstream prompt forms themselves (CAT-Seg's
  ``"A photo of a {} in the scene"``, a bare class name as tqdm and MFuser feed it), so the
  prompts the segmentation methods use are ones the text tower has seen.

``HELD_OUT_CLASS`` ("bus") stays in the captions, so the VLM knows the word, while CAT-Seg's
unseen-class lesson keeps it out of all *segmentation* training: what CLIP knows about a class the
segmenter never saw is what open-vocabulary segmentation relies on.

Dimension glossary: H W image size, K classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lessons import toyworld as tw
from lessons.classes import CLASSES, IGNORE_INDEX, NUM_CLASSES, TRAIN_ID
from lessons.text import CATSEG_TEMPLATE

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

COUNTED: tuple[str, ...] = ("car", "truck", "bus", "person", "rider")
_NUMBERS = ("no", "a", "two", "three", "four")
_PLURAL = {"person": "people", "bus": "buses", "pedestrian": "pedestrians", "coach": "coaches"}
_WEATHER = {"fog": ("in fog", "on a foggy day"), "night": ("at night", "after dark"),
            "rain": ("in the rain", "on a rainy day"), "snow": ("in snow", "on a snowy day"),
            "clear": ("on a clear day", "in daylight")}
_LOOK = {"synthetic": ("a rendered", "a video game"), "urban": ("a muted", "a city"),
         "dashcam": ("a dashcam", "a warm"), "overcast": ("an overcast", "a grey"),
         "validation": ("a greenish", "a photo of a"), "streetview": ("a street-level", "a blue"),
         "painted": ("a painted", "a cubist")}
MIN_PIXELS: int = 16
"""Pixels a class needs in a view (at 64x128) before a caption may name it."""


@dataclass(frozen=True)
class Facts:
    """What a caption may say about one view: classes by area, counts, weather, look."""

    areas: dict[str, float]      # class -> fraction of labelled pixels, largest first
    counts: dict[str, int]       # COUNTED class -> number of instances in the scene
    weather: str                 # clear, fog, night, rain, snow
    family: str                  # palette family of the style (PALETTE_FAMILIES)


def class_areas(label: np.ndarray, min_pixels: int = MIN_PIXELS) -> dict[str, float]:
    """Fraction of the labelled pixels of each class present with ``min_pixels`` or more."""
    valid = label[label != IGNORE_INDEX]
    if valid.size and int(valid.max()) >= NUM_CLASSES:
        raise ValueError(f"label value {int(valid.max())} outside 0..{NUM_CLASSES - 1} and 255")
    counts = np.bincount(valid.ravel(), minlength=NUM_CLASSES)            # (K,)
    total = max(int(counts.sum()), 1)
    order = np.argsort(-counts, kind="stable")
    return {CLASSES[k]: counts[k] / total for k in order if counts[k] >= min_pixels}


def scene_facts(scene: tw.Scene, label: np.ndarray, style: tw.Style) -> Facts:
    """The facts of a whole view: classes from its label (H, W), counts from its scene."""
    areas = class_areas(label)
    kind_to_class = {"car": "car", "truck": "truck", "bus": "bus", "person": "person",
                     "cyclist": "rider"}
    counts = {c: 0 for c in COUNTED}
    for thing in scene.things:
        name = kind_to_class.get(thing.kind)
        if name in areas:                      # only what the view shows
            counts[name] += 1
    return Facts(areas, counts, style.weather, style.family)


def _word(name: str, rng: np.random.Generator) -> str:
    options = SYNONYMS[name]
    return options[0] if rng.random() < 0.6 else options[int(rng.integers(len(options)))]


def _counted(name: str, n: int, rng: np.random.Generator) -> str:
    word = _word(name, rng)
    if n <= 1:
        return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"
    plural = _PLURAL.get(word, word + "s")
    return f"{_NUMBERS[n] if n < len(_NUMBERS) else 'several'} {plural}"


def caption_scene(facts: Facts, rng: np.random.Generator, max_classes: int = 5) -> str:
    """A noisy alt-text for a whole view: look, weather and some of its classes (shuffled)."""
    names = [n for n in facts.areas if rng.random() < 0.7] or [next(iter(facts.areas))]
    rng.shuffle(names)
    parts = [_counted(n, facts.counts[n], rng) if n in facts.counts else _word(n, rng)
             for n in names[:max_classes]]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    look = _LOOK[facts.family][int(rng.integers(2))] if rng.random() < 0.5 else "a"
    weather = f" {_WEATHER[facts.weather][int(rng.integers(2))]}" if rng.random() < 0.7 else ""
    return f"{look} street scene{weather} with {listed}"


def caption_crop(areas: dict[str, float], rng: np.random.Generator) -> str:
    """A crop's caption: its largest one to three classes, often in a downstream prompt form."""
    names = list(areas)[: int(rng.integers(1, 4))]
    if len(names) == 1:
        form = rng.random()
        if form < 0.3:
            return CATSEG_TEMPLATE.format(names[0])
        if form < 0.5:
            return names[0]                                        # tqdm / MFuser: the raw name
        return f"a photo of a {_word(names[0], rng)}"
    words = [_word(n, rng) for n in names]
    return "a close-up of " + (", ".join(words[:-1]) + " and " + words[-1])


def random_crop(label: np.ndarray, rng: np.random.Generator, area: tuple[float, float] = (0.06,
                0.3)) -> tuple[int, int, int, int]:
    """A (top, left, height, width) crop with the image's aspect ratio and ``area`` of it."""
    H, W = label.shape
    side = np.sqrt(rng.uniform(*area))
    h, w = max(round(H * float(side)), 8), max(round(W * float(side)), 8)
    return int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1)), h, w


def captioned_view(seed_words: list[int], crop_fraction: float = 0.5,
                   size: tuple[int, int] = tw.DEFAULT_SIZE, domain: str = "random"
                   ) -> tuple[np.ndarray, str, bool]:
    """One image-text pair: a ``domain``-style render (3, H, W) or a crop of it, and a caption.

    Crops are returned at their own size; the caller resizes them. Crops whose largest class
    covers under 20% are captioned as a scene instead.
    """
    rng = np.random.default_rng(seed_words)
    scene = tw.draw_scene(rng, domain)
    label, shade = tw.rasterize(scene, size)
    style = tw.sample_style(domain, rng)
    image = tw.stylize(label, shade, style, rng, scene.camera.horizon * size[0])
    if rng.random() < crop_fraction:
        top, left, h, w = random_crop(label, rng)
        areas = class_areas(label[top:top + h, left:left + w], min_pixels=1)
        areas = {n: a for n, a in areas.items() if a >= 0.15}
        if areas and next(iter(areas.values())) >= 0.2:
            return image[:, top:top + h, left:left + w], caption_crop(areas, rng), True
    return image, caption_scene(scene_facts(scene, label, style), rng), False


def class_id(name: str) -> int:
    """The trainId of a class name (a clear error for an unknown one)."""
    if name not in TRAIN_ID:
        raise ValueError(f"unknown class {name!r}; the classes are {CLASSES}")
    return TRAIN_ID[name]
