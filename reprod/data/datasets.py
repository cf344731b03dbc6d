"""Readers of the real DGSS datasets in their official layouts, the label tables, a ToyWorld export.

Nothing is downloaded: every reader works on a local tree laid out as the dataset ships (or as the
DAFormer-style converters of ``reprod.prepare_data`` leave it), and a missing root, folder or file
is an error that says where the dataset comes from and how to lay it out.

Datasets (``DATASETS``; build one with :func:`build_dataset`):

- ``gtav``        GTAV, 24,966 images at 1914x1052. Split ``all`` reads every image under
  ``images/`` recursively, as Rein and MFuser do (w1oves/Rein@7da85bc
  ``configs/_base_/datasets/gta_512x512.py``); ``train``/``valid``/``test`` read RobustNet's split
  folders ``images/{split}``, as tqdm does (ByeongHyunPak/tqdm@75168af
  ``configs/_base_/datasets/gta2city-512.py``, laid out as the TLDR README says). Labels
  are Cityscapes *label ids* (``labels/<n>.png``) or converted ``labels/<n>_labelTrainIds.png``.
- ``cityscapes``  ``leftImg8bit/{split}/<city>/<city>_<seq>_<frame>_leftImg8bit.png`` with
  ``gtFine/{split}/<city>/..._gtFine_labelIds.png`` (or ``_gtFine_labelTrainIds.png``).
- ``bdd100k``     the 10k semantic subset: ``images/10k/{split}/<id>.jpg`` with the 19-class trainId
  masks ``labels/sem_seg/masks/{split}/<id>.png`` (Rein, MFuser) or tqdm's copies
  ``labels/sem_seg/colormaps/{split}/<id>_labelTrainIds.png`` (tqdm's ``mmseg/datasets/bdd100k.py``;
  MFuser's configs read them too, although its README shows ``masks``).
- ``mapillary``   Vistas v1.2: ``{training,validation}/images/<key>.jpg`` with the 66-class labels
  ``{training,validation}/v1.2/labels/<key>.png`` (or ``labels/<key>.png`` in the v1.x release)
  mapped to the 19 classes *by name* through ``config_v1.2.json``; or converted trainId labels
  ``{training,validation}/labels/<key>_labelTrainIds.png``, the path tqdm and MFuser read.
- ``acdc``        ``rgb_anon/{cond}/{split}/<seq>/<seq>_frame_<n>_rgb_anon.png`` with
  ``gt/{cond}/{split}/<seq>/..._gt_labelIds.png`` or ``_gt_labelTrainIds.png`` (both ship), for
  the conditions fog, night, rain, snow.

Items: ``(image, label, name)``; ``image`` uint8 (3, H, W) RGB in 0..255 (divide by 255 for the
float [0, 1] images of ``lessons``; each method normalises its own way), ``label`` int64 (H, W) of
Cityscapes trainIds 0..18 with 255 = ignore, ``name`` the image path relative to the dataset root
(relative, so a root containing "citys", "map" or "bdd" cannot mis-bucket it, as it can in
Rein's ``rein/dg_metrics.py``, which buckets samples by those substrings of the label path).
``return_name=False`` gives ``(image, label)`` pairs as ``lessons.train`` expects.

Images and labels pair strictly by the key their official names share; an image without a label,
or a label without an image, is an error naming the file (``allow_unpaired=True`` records them in
``.pairing`` instead, for ``prepare_data verify``). Label values outside a table are an error too
(``strict_labels=False``: mapped to 255, as the DAFormer converters do).

:func:`export_toyworld` writes ToyWorld scenes into these layouts (``synthetic`` -> GTAV,
``citylike`` -> Cityscapes, ``dashcam`` -> BDD100K, ``streetview`` -> Mapillary, ``fog`` ``night``
``rain`` ``snow`` -> ACDC), so the readers and the trainer run end to end without the real data.

Glossary: H W image height and width; K = 19 classes; *labelId* a Cityscapes label id 0..33 (the
34-id table of cityscapesScripts, used by GTAV, Cityscapes ``labelIds`` and ACDC ``labelIds``);
*trainId* a class index 0..18 or 255 (ignore); *Mapillary index* the position of a label in
``config_v1.2.json`` (0..65); *key* the part of an image's and its label's file names that pairs
them (e.g. ``frankfurt/frankfurt_000000_000294``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import ClassVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from lessons import toyworld as tw
from lessons.classes import IGNORE_INDEX, NUM_CLASSES, TRAIN_ID

__all__ = [
    "ACDC",
    "ACDC_CONDITIONS",
    "ACDC_COUNTS",
    "BDD100K",
    "CITYSCAPES_LABELS",
    "DATASETS",
    "EXPORT_DIRS",
    "GTAV",
    "LABEL_ID_PALETTE",
    "LABEL_ID_TO_TRAIN_ID",
    "MANIFEST",
    "MAPILLARY_CANONICAL",
    "MAPILLARY_TO_TRAIN_ID",
    "MAPILLARY_V12_LABELS",
    "RGB",
    "TOY_DOMAINS",
    "TOY_SPLITS",
    "TRAIN_ID_CHECK",
    "TRAIN_ID_TO_LABEL_ID",
    "Cityscapes",
    "LabelDecoder",
    "Mapillary",
    "Pairing",
    "Sample",
    "SegmentationFiles",
    "apply_lookup",
    "build_dataset",
    "check_sample",
    "check_train_ids",
    "dataset_class",
    "export_toyworld",
    "image_size",
    "label_ids_to_train_ids",
    "mapillary_config",
    "mapillary_config_json",
    "mapillary_lookup",
    "mapillary_name_key",
    "read_image",
    "read_label_values",
    "train_ids_to_label_ids",
    "write_label",
]

RGB = tuple[int, int, int]

# ----------------------------------------------------------------------------------------------
# Cityscapes label ids
# ----------------------------------------------------------------------------------------------
CITYSCAPES_LABELS: tuple[tuple[int, str, int, RGB], ...] = (
    (0, "unlabeled", 255, (0, 0, 0)),
    (1, "ego vehicle", 255, (0, 0, 0)),
    (2, "rectification border", 255, (0, 0, 0)),
    (3, "out of roi", 255, (0, 0, 0)),
    (4, "static", 255, (0, 0, 0)),
    (5, "dynamic", 255, (111, 74, 0)),
    (6, "ground", 255, (81, 0, 81)),
    (7, "road", 0, (128, 64, 128)),
    (8, "sidewalk", 1, (244, 35, 232)),
    (9, "parking", 255, (250, 170, 160)),
    (10, "rail track", 255, (230, 150, 140)),
    (11, "building", 2, (70, 70, 70)),
    (12, "wall", 3, (102, 102, 156)),
    (13, "fence", 4, (190, 153, 153)),
    (14, "guard rail", 255, (180, 165, 180)),
    (15, "bridge", 255, (150, 100, 100)),
    (16, "tunnel", 255, (150, 120, 90)),
    (17, "pole", 5, (153, 153, 153)),
    (18, "polegroup", 255, (153, 153, 153)),
    (19, "traffic light", 6, (250, 170, 30)),
    (20, "traffic sign", 7, (220, 220, 0)),
    (21, "vegetation", 8, (107, 142, 35)),
    (22, "terrain", 9, (152, 251, 152)),
    (23, "sky", 10, (70, 130, 180)),
    (24, "person", 11, (220, 20, 60)),
    (25, "rider", 12, (255, 0, 0)),
    (26, "car", 13, (0, 0, 142)),
    (27, "truck", 14, (0, 0, 70)),
    (28, "bus", 15, (0, 60, 100)),
    (29, "caravan", 255, (0, 0, 90)),
    (30, "trailer", 255, (0, 0, 110)),
    (31, "train", 16, (0, 80, 100)),
    (32, "motorcycle", 17, (0, 0, 230)),
    (33, "bicycle", 18, (119, 11, 32)),
)
"""The standard 34 Cityscapes label ids: (labelId, name, trainId, colour), cityscapesScripts'
``labels.py``. The 19 evaluated classes keep a trainId, every other id maps to 255. This is the
map the DAFormer GTAV converter applies (7->0, 8->1, 11->2, ..., 33->18; Rein's and tqdm's
``tools/convert_datasets/gta.py``). License plate (id -1) is not drawn into the label PNGs, so it
is not in the table."""


def _lookup(pairs: Iterable[tuple[int, int]]) -> np.ndarray:
    table = np.full(256, -1, np.int16)
    for src, dst in pairs:
        table[src] = dst
    return table


LABEL_ID_TO_TRAIN_ID: np.ndarray = _lookup((lid, tid) for lid, _, tid, _ in CITYSCAPES_LABELS)
"""(256,) int16 lookup table: labelId -> trainId (255 = ignore); -1 marks values 34..255, which
are not Cityscapes label ids (an error when reading, or 255 with ``strict_labels=False``)."""

TRAIN_ID_TO_LABEL_ID: np.ndarray = _lookup(
    [(tid, lid) for lid, _, tid, _ in CITYSCAPES_LABELS if tid != IGNORE_INDEX]
    + [(IGNORE_INDEX, 0)])
"""(256,) int16 inverse table, for writing label-id PNGs: trainId k -> the one labelId that has
it (0 -> 7 road, ..., 18 -> 33 bicycle), 255 -> 0 "unlabeled" (every ignored id reads back as
255, so 0 is as good as any); -1 for values that are not trainIds."""

TRAIN_ID_CHECK: np.ndarray = _lookup([(k, k) for k in range(NUM_CLASSES)]
                                     + [(IGNORE_INDEX, IGNORE_INDEX)])
"""(256,) int16 identity on the valid trainIds (0..18, 255), -1 elsewhere: reading a label that
is already in trainIds checks its values through this table."""

LABEL_ID_PALETTE: list[int] = [c for *_, rgb in CITYSCAPES_LABELS for c in rgb]
"""Flat RGB palette of the 34 label ids, as GTAV's palettised label PNGs carry (cosmetic: the
readers use the pixel indices, never the colours)."""


# ----------------------------------------------------------------------------------------------
# Mapillary Vistas v1.2
# ----------------------------------------------------------------------------------------------
MAPILLARY_V12_LABELS: tuple[tuple[str, str, RGB], ...] = (
    ("animal--bird", "Bird", (165, 42, 42)),
    ("animal--ground-animal", "Ground Animal", (0, 192, 0)),
    ("construction--barrier--curb", "Curb", (196, 196, 196)),
    ("construction--barrier--fence", "Fence", (190, 153, 153)),
    ("construction--barrier--guard-rail", "Guard Rail", (180, 165, 180)),
    ("construction--barrier--other-barrier", "Barrier", (90, 120, 150)),
    ("construction--barrier--wall", "Wall", (102, 102, 156)),
    ("construction--flat--bike-lane", "Bike Lane", (128, 64, 255)),
    ("construction--flat--crosswalk-plain", "Crosswalk - Plain", (140, 140, 200)),
    ("construction--flat--curb-cut", "Curb Cut", (170, 170, 170)),
    ("construction--flat--parking", "Parking", (250, 170, 160)),
    ("construction--flat--pedestrian-area", "Pedestrian Area", (96, 96, 96)),
    ("construction--flat--rail-track", "Rail Track", (230, 150, 140)),
    ("construction--flat--road", "Road", (128, 64, 128)),
    ("construction--flat--service-lane", "Service Lane", (110, 110, 110)),
    ("construction--flat--sidewalk", "Sidewalk", (244, 35, 232)),
    ("construction--structure--bridge", "Bridge", (150, 100, 100)),
    ("construction--structure--building", "Building", (70, 70, 70)),
    ("construction--structure--tunnel", "Tunnel", (150, 120, 90)),
    ("human--person", "Person", (220, 20, 60)),
    ("human--rider--bicyclist", "Bicyclist", (255, 0, 0)),
    ("human--rider--motorcyclist", "Motorcyclist", (255, 0, 100)),
    ("human--rider--other-rider", "Other Rider", (255, 0, 200)),
    ("marking--crosswalk-zebra", "Lane Marking - Crosswalk", (200, 128, 128)),
    ("marking--general", "Lane Marking - General", (255, 255, 255)),
    ("nature--mountain", "Mountain", (64, 170, 64)),
    ("nature--sand", "Sand", (230, 160, 50)),
    ("nature--sky", "Sky", (70, 130, 180)),
    ("nature--snow", "Snow", (190, 255, 255)),
    ("nature--terrain", "Terrain", (152, 251, 152)),
    ("nature--vegetation", "Vegetation", (107, 142, 35)),
    ("nature--water", "Water", (0, 170, 30)),
    ("object--banner", "Banner", (255, 255, 128)),
    ("object--bench", "Bench", (250, 0, 30)),
    ("object--bike-rack", "Bike Rack", (100, 140, 180)),
    ("object--billboard", "Billboard", (220, 220, 220)),
    ("object--catch-basin", "Catch Basin", (220, 128, 128)),
    ("object--cctv-camera", "CCTV Camera", (222, 40, 40)),
    ("object--fire-hydrant", "Fire Hydrant", (100, 170, 30)),
    ("object--junction-box", "Junction Box", (40, 40, 40)),
    ("object--mailbox", "Mailbox", (33, 33, 33)),
    ("object--manhole", "Manhole", (100, 128, 160)),
    ("object--phone-booth", "Phone Booth", (142, 0, 0)),
    ("object--pothole", "Pothole", (70, 100, 150)),
    ("object--street-light", "Street Light", (210, 170, 100)),
    ("object--support--pole", "Pole", (153, 153, 153)),
    ("object--support--traffic-sign-frame", "Traffic Sign Frame", (128, 128, 128)),
    ("object--support--utility-pole", "Utility Pole", (0, 0, 80)),
    ("object--traffic-light", "Traffic Light", (250, 170, 30)),
    ("object--traffic-sign--back", "Traffic Sign (Back)", (192, 192, 192)),
    ("object--traffic-sign--front", "Traffic Sign (Front)", (220, 220, 0)),
    ("object--trash-can", "Trash Can", (140, 140, 20)),
    ("object--vehicle--bicycle", "Bicycle", (119, 11, 32)),
    ("object--vehicle--boat", "Boat", (150, 0, 255)),
    ("object--vehicle--bus", "Bus", (0, 60, 100)),
    ("object--vehicle--car", "Car", (0, 0, 142)),
    ("object--vehicle--caravan", "Caravan", (0, 0, 90)),
    ("object--vehicle--motorcycle", "Motorcycle", (0, 0, 230)),
    ("object--vehicle--on-rails", "On Rails", (0, 80, 100)),
    ("object--vehicle--other-vehicle", "Other Vehicle", (128, 64, 64)),
    ("object--vehicle--trailer", "Trailer", (0, 0, 110)),
    ("object--vehicle--truck", "Truck", (0, 0, 70)),
    ("object--vehicle--wheeled-slow", "Wheeled Slow", (0, 0, 192)),
    ("void--car-mount", "Car Mount", (32, 32, 32)),
    ("void--ego-vehicle", "Ego Vehicle", (120, 10, 10)),
    ("void--unlabeled", "Unlabeled", (0, 0, 0)),
)
"""The 66 labels of Mapillary Vistas v1.2 in the order of the official ``config_v1.2.json``
(name, readable, colour): a label PNG pixel holds the label's index in this list (0..65; 65 is
"Unlabeled"). Used when a tree has no ``config_v1.2.json`` and to write one for the ToyWorld
export; a config found in the tree always takes precedence."""

_MAPILLARY_19: dict[str, tuple[str, ...]] = {
    "road": ("Road", "Bike Lane", "Crosswalk - Plain", "Parking", "Service Lane",
             "Lane Marking - Crosswalk", "Lane Marking - General"),
    "sidewalk": ("Sidewalk", "Curb", "Curb Cut", "Pedestrian Area"),
    "building": ("Building",),
    "wall": ("Wall",),
    "fence": ("Fence",),
    "pole": ("Pole", "Utility Pole", "Street Light"),
    "traffic light": ("Traffic Light",),
    "traffic sign": ("Traffic Sign (Front)", "Traffic Sign (Back)", "Traffic Sign Frame"),
    "vegetation": ("Vegetation",),
    "terrain": ("Terrain",),
    "sky": ("Sky",),
    "person": ("Person",),
    "rider": ("Bicyclist", "Motorcyclist", "Other Rider"),
    "car": ("Car",),
    "truck": ("Truck",),
    "bus": ("Bus",),
    "train": ("On Rails",),
    "motorcycle": ("Motorcycle",),
    "bicycle": ("Bicycle",),
}


def mapillary_name_key(readable: str) -> str:
    """The converter's name normalisation: lowercase, spaces and hyphens removed
    (``"Crosswalk - Plain"`` -> ``"crosswalkplain"``; w1oves/Rein@7da85bc
    ``tools/convert_datasets/mapillary2cityscape.py``)."""
    return readable.lower().replace(" ", "").replace("-", "")


MAPILLARY_TO_TRAIN_ID: dict[str, int] = {
    mapillary_name_key(r): TRAIN_ID[c] for c, readables in _MAPILLARY_19.items() for r in readables}
"""Mapillary v1.2 -> Cityscapes trainIds by normalised *readable* name (34 of the 66 labels;
openseg's ``mapillary2cityscape.py --train_id`` as Rein ships it in ``tools/convert_datasets/``):
lane markings, bike lane, crosswalk, parking and service lane count as road; curb, curb cut and
pedestrian area as sidewalk; utility pole and street light as pole; the sign frame and sign backs as
traffic sign; bicyclist, motorcyclist and other rider as rider; "On Rails" as train. Every other
label (guard rail, barrier, bridge, tunnel, rail track, caravan, trailer, other vehicle, animals,
objects, ...) maps to 255."""

MAPILLARY_CANONICAL: dict[int, str] = {
    **{TRAIN_ID[c]: readables[0] for c, readables in _MAPILLARY_19.items()},
    IGNORE_INDEX: "Unlabeled"}
"""trainId -> the Mapillary readable name the ToyWorld export writes for it (the first of each
class above; 255 -> "Unlabeled")."""


def mapillary_lookup(readables: Sequence[str]) -> np.ndarray:
    """(256,) int16 table Mapillary index -> trainId for a config's labels (in index order).

    Raises ValueError when one of the 34 mapped names is missing from the config (a renamed
    class would otherwise vanish silently into 255).
    """
    keys = [mapillary_name_key(r) for r in readables]
    missing = sorted(set(MAPILLARY_TO_TRAIN_ID) - set(keys))
    if missing:
        raise ValueError(f"the Mapillary config lacks the labels {missing} that map to the 19 "
                         "Cityscapes classes: is it the v1.2 config (66 labels)?")
    return _lookup((i, MAPILLARY_TO_TRAIN_ID.get(k, IGNORE_INDEX)) for i, k in enumerate(keys))


def mapillary_config(root: Path) -> tuple[list[dict], Path | None]:
    """The label list of ``config_v1.2.json`` (or a v1.x release's ``config.json``) under ``root``,
    and the file it came from; the embedded official list (``MAPILLARY_V12_LABELS``, None) when
    the tree has neither. A config without exactly 66 labels is a ValueError (v2.0 has 124)."""
    for name in ("config_v1.2.json", "config.json"):
        path = Path(root) / name
        if path.is_file():
            try:
                labels = json.loads(path.read_text())["labels"]
                readables = [lab["readable"] for lab in labels]
                colors = [tuple(lab["color"]) for lab in labels]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}: not a Mapillary config with a 'labels' list of "
                                 f"{{'readable', 'color'}} entries ({e})") from e
            if len(labels) != len(MAPILLARY_V12_LABELS):
                raise ValueError(f"{path} has {len(labels)} labels, Mapillary Vistas v1.2 has "
                                 f"{len(MAPILLARY_V12_LABELS)}: use the v1.2 config and labels")
            pairs = zip(readables, colors, strict=True)
            return [{"readable": r, "color": c} for r, c in pairs], path
    return _embedded_mapillary_labels(), None


def _embedded_mapillary_labels() -> list[dict]:
    return [{"readable": r, "color": c} for _, r, c in MAPILLARY_V12_LABELS]


def mapillary_config_json() -> dict:
    """A ``config_v1.2.json`` body for the embedded 66 labels (name, readable, color, evaluate)."""
    return {"labels": [{"name": n, "readable": r, "color": list(c), "evaluate": r != "Unlabeled"}
                       for n, r, c in MAPILLARY_V12_LABELS],
            "version": "1.2"}


# ----------------------------------------------------------------------------------------------
# Vectorised conversion and label/image I/O
# ----------------------------------------------------------------------------------------------
def apply_lookup(values: np.ndarray, table: np.ndarray, what: str = "label",
                 table_name: str = "label", strict: bool = True) -> np.ndarray:
    """Map every pixel value through ``table`` ((N,) int, -1 = not in the table); uint8 out.

    Values outside the table (>= N, negative, or -1 entries) raise a ValueError naming ``what``
    and the offending values, or become 255 with ``strict=False``.
    """
    values = np.asarray(values)
    if values.dtype.kind not in "ui":
        raise ValueError(f"{what}: label pixels must be integers, got {values.dtype}")
    if values.dtype == np.uint8 and len(table) >= 256:
        out = table[values]
        invalid = out < 0
    else:
        inside = (values >= 0) & (values < len(table))
        out = table[np.where(inside, values, 0)]
        invalid = ~inside | (out < 0)
    if invalid.any():
        if strict:
            bad = np.unique(values[invalid])
            shown = ", ".join(str(int(v)) for v in bad[:12]) + (", ..." if len(bad) > 12 else "")
            raise ValueError(f"{what}: {int(invalid.sum())} pixels have values ({shown}) outside "
                             f"the {table_name} table")
        out = np.where(invalid, IGNORE_INDEX, out)
    return out.astype(np.uint8)


def label_ids_to_train_ids(label: np.ndarray, what: str = "label",
                           strict: bool = True) -> np.ndarray:
    """Cityscapes labelIds (0..33) -> trainIds (0..18, 255), uint8 (H, W)."""
    return apply_lookup(label, LABEL_ID_TO_TRAIN_ID, what, "Cityscapes labelId (0..33)", strict)


def train_ids_to_label_ids(label: np.ndarray, what: str = "label") -> np.ndarray:
    """trainIds (0..18, 255) -> one Cityscapes labelId each (``TRAIN_ID_TO_LABEL_ID``)."""
    return apply_lookup(label, TRAIN_ID_TO_LABEL_ID, what, "trainId (0..18, 255)")


def check_train_ids(label: np.ndarray, what: str = "label", strict: bool = True) -> np.ndarray:
    """A trainId label as uint8, checked: values other than 0..18 and 255 are an error."""
    return apply_lookup(label, TRAIN_ID_CHECK, what, "trainId (0..18, 255)", strict)


def _rgb_codes(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.uint32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


# PIL raises DecompressionBombError (not an OSError) for images over twice MAX_IMAGE_PIXELS
_PIL_ERRORS = (OSError, Image.DecompressionBombError)


def read_image(path: Path) -> np.ndarray:
    """An image file as uint8 (H, W, 3) RGB; a ValueError naming the file if PIL cannot read it."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except _PIL_ERRORS as e:
        raise ValueError(f"{path}: cannot read the image ({e})") from e


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            return im.size
    except _PIL_ERRORS as e:
        raise ValueError(f"{path}: cannot read the image ({e})") from e


def read_label_values(path: Path, allow_rgb: bool = False) -> np.ndarray:
    """A label PNG's pixel values (H, W): the indices of a palettised (P) image, the grey values of
    an L image, 16-bit values of an I;16 image; (H, W, 3) for RGB only with ``allow_rgb``."""
    try:
        with Image.open(path) as im:
            if im.mode in ("P", "L", "I;16", "I;16B", "I"):
                return np.asarray(im)
            if im.mode in ("RGB", "RGBA") and allow_rgb:
                return np.asarray(im.convert("RGB"))
            mode = im.mode
    except _PIL_ERRORS as e:
        raise ValueError(f"{path}: cannot read the label ({e})") from e
    raise ValueError(f"{path}: label image has mode {mode}; expected one value per pixel "
                     "(P, L or I;16)" + (" or RGB colours" if allow_rgb else ""))


def write_label(path: Path, label: np.ndarray, palette: list[int] | None = None) -> None:
    """Write a uint8 (H, W) label PNG: mode L, or mode P with ``palette`` (flat RGB list)."""
    im = Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8))
    if palette is not None:
        im.putpalette(palette)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


@dataclass(eq=False)
class LabelDecoder:
    """How one dataset's label files become trainIds; small and picklable (worker processes).

    ``table`` maps the file's pixel values (labelIds, Mapillary indices, or trainIds checked
    against themselves); ``colors`` (sorted RGB codes) and ``color_index`` decode colour-coded
    Mapillary labels to indices first.
    """

    table: np.ndarray
    table_name: str
    strict: bool = True
    colors: np.ndarray | None = None
    color_index: np.ndarray | None = None

    def __call__(self, path: Path) -> np.ndarray:
        """The trainIds (uint8 (H, W)) of one label file."""
        values = read_label_values(path, allow_rgb=self.colors is not None)
        if values.ndim == 3:
            values = self._color_to_index(values, path)
        return apply_lookup(values, self.table, str(path), self.table_name, self.strict)

    def _color_to_index(self, rgb: np.ndarray, path: Path) -> np.ndarray:
        codes = _rgb_codes(rgb)
        pos = np.clip(np.searchsorted(self.colors, codes), 0, len(self.colors) - 1)
        known = self.colors[pos] == codes
        if not known.all():
            bad = np.unique(codes[~known])[:8]
            shown = ", ".join(f"({c >> 16}, {(c >> 8) & 255}, {c & 255})" for c in bad)
            if self.strict:
                raise ValueError(f"{path}: {int((~known).sum())} pixels have colours ({shown}) "
                                 f"that are not in the {self.table_name} config")
        return np.where(known, self.color_index[pos], 255).astype(np.uint8)


def _decoder(kind: str, strict: bool, mapillary_labels: list[dict] | None = None) -> LabelDecoder:
    if kind == "labelIds":
        return LabelDecoder(LABEL_ID_TO_TRAIN_ID, "Cityscapes labelId (0..33)", strict)
    if kind == "trainIds":
        return LabelDecoder(TRAIN_ID_CHECK, "trainId (0..18, 255)", strict)
    labels = mapillary_labels or _embedded_mapillary_labels()
    codes = _rgb_codes(np.array([lab["color"] for lab in labels], np.uint8))
    order = np.argsort(codes, kind="stable")
    if len(np.unique(codes)) != len(codes):
        raise ValueError("the Mapillary config gives two labels the same colour")
    table = mapillary_lookup([lab["readable"] for lab in labels])   # -1 beyond index 65
    return LabelDecoder(table, "Mapillary v1.2 (66 labels)", strict, codes[order],
                        order.astype(np.uint8))


# ----------------------------------------------------------------------------------------------
# Scanning and pairing
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    """One image and its label file, paired by ``key``."""

    image: Path
    label: Path
    key: str


@dataclass
class Pairing:
    """The result of scanning a split: pairs, files whose partner is missing, and files that are
    not read (a link that loops or leads nowhere, a suffix in another case), as messages."""

    samples: list[Sample] = field(default_factory=list)
    unpaired_images: list[Path] = field(default_factory=list)
    unpaired_labels: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Folders:
    """One image folder and its label folder; files pair by path relative to them minus suffix."""

    images: Path
    image_suffix: str
    labels: Path
    label_suffix: str
    depth: int | None          # 0: files in the folder; 1: one sub-folder level; None: any depth
    prefix: str = ""           # key prefix (ACDC: the condition)
    exclude: str | None = None  # label files ending so are not labels (converted outputs)


def _index(folder: Path, suffix: str, depth: int | None, exclude: str | None,
           skipped: list[str] | None = None) -> dict[str, Path]:
    """Files ending in ``suffix`` by key; what looks like one but cannot be read (a link that
    loops or leads nowhere, the suffix in another case) goes to ``skipped`` as a message."""
    pattern = {0: "*", 1: "*/*"}.get(depth, "**/*")
    out = {}
    for path in sorted(folder.glob(pattern)):
        name = path.name
        if exclude and name.lower().endswith(exclude.lower()):
            continue
        if not name.endswith(suffix):
            if name.lower().endswith(suffix.lower()) and skipped is not None and \
                    (path.is_file() or path.is_symlink()):
                skipped.append(f"{path}: not read, the loaders match {suffix!r} exactly "
                               "(rename it)")
            continue
        if not path.is_file():
            if path.is_symlink() and skipped is not None:
                skipped.append(f"{path}: a link that cannot be followed ({_link_error(path)})")
            continue
        out[path.relative_to(folder).as_posix()[: -len(suffix)]] = path
    return out


def _link_error(path: Path) -> str:
    try:
        path.stat()
    except OSError as e:
        return e.strerror or type(e).__name__
    return "not a file"


def _pair(groups: Sequence[_Folders]) -> Pairing:
    out = Pairing()
    for g in groups:
        images = _index(g.images, g.image_suffix, g.depth, None, out.skipped)
        labels = _index(g.labels, g.label_suffix, g.depth, g.exclude, out.skipped)
        for key, path in images.items():
            if key in labels:
                out.samples.append(Sample(path, labels[key], g.prefix + key))
            else:
                out.unpaired_images.append(path)
        out.unpaired_labels += [p for k, p in labels.items() if k not in images]
    return out


def _listing(paths: Sequence[Path], limit: int = 20) -> str:
    shown = "\n  ".join(str(p) for p in paths[:limit])
    more = f"\n  ... and {len(paths) - limit} more" if len(paths) > limit else ""
    return f"\n  {shown}{more}"


def check_sample(decoder: LabelDecoder, sample: Sample, values: bool = True,
                 decode: bool = False) -> list[str]:
    """The problems of one pair (unreadable files, size mismatch, label values), as messages.
    ``decode`` reads every image's pixels (a truncated file passes the header check)."""
    problems = []
    try:
        if decode:
            h, w = read_image(sample.image).shape[:2]
        else:
            w, h = image_size(sample.image)
    except ValueError as e:
        return [str(e)]
    try:
        if values:
            lh, lw = decoder(sample.label).shape[:2]
        else:
            lw, lh = image_size(sample.label)
    except ValueError as e:
        return [str(e)]
    if (lw, lh) != (w, h):
        problems.append(f"{sample.label}: label is {lw}x{lh} but its image {sample.image} is "
                        f"{w}x{h}")
    return problems


# ----------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------
class SegmentationFiles(Dataset):
    """Base of the readers: a split of a dataset tree as (image, label, name) items.

    Subclasses give the official layout (``_folders``), the label decoding (``_decoder``), where
    ``prepare_data convert`` writes trainIds (``train_id_path``), and how the ToyWorld export
    names files (``_toy_write``).
    """

    name: ClassVar[str]
    title: ClassVar[str]
    SPLITS: ClassVar[tuple[str, ...]]
    DEFAULT_SPLITS: ClassVar[tuple[str, ...]] = ("train", "val")
    LABEL_FORMATS: ClassVar[tuple[str, ...]]   # the first is the default (the official format)
    TRAIN_ID_FORMATS: ClassVar[tuple[str, ...]] = ("trainids",)   # formats already in trainIds
    EXPECTED_COUNTS: ClassVar[dict[str, int | None]]
    SOURCE: ClassVar[str]                      # where to get it and how to lay it out

    def __init__(self, root: str | Path, split: str, labels: str | None = None, *,
                 strict_labels: bool = True, return_name: bool = True,
                 allow_unpaired: bool = False):
        if split not in self.SPLITS:
            raise ValueError(f"unknown {self.title} split {split!r}; choose from {self.SPLITS}"
                             + self._split_hint(split))
        labels = labels or self.LABEL_FORMATS[0]
        if labels not in self.LABEL_FORMATS:
            raise ValueError(f"unknown {self.title} label format {labels!r}; choose from "
                             f"{self.LABEL_FORMATS}")
        self.root, self.split, self.labels = Path(root), split, labels
        self.strict_labels, self.return_name = strict_labels, return_name
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.title} root {self.root} does not exist.\n"
                                    f"{self.SOURCE}")
        folders = self._folders()
        for g in folders:
            for folder in (g.images, g.labels):
                if not folder.is_dir():
                    raise FileNotFoundError(self._missing_folder(folder))
        self.decoder = self._decoder()
        self.pairing = _pair(folders)
        self.samples = self.pairing.samples
        if not allow_unpaired:
            self._require_pairs()

    # --- what subclasses define ---------------------------------------------------------------
    def _folders(self) -> list[_Folders]:
        raise NotImplementedError

    def _decoder(self) -> LabelDecoder:
        raise NotImplementedError

    def train_id_path(self, label: Path) -> Path:
        """Where ``prepare_data convert`` writes the trainIds of ``label`` (an official label)."""
        raise NotImplementedError

    @classmethod
    def _toy_write(cls, root: Path, split: str, index: int, image: np.ndarray,
                   label: np.ndarray, condition: str | None) -> list[Path]:
        raise NotImplementedError

    def _split_hint(self, split: str) -> str:
        return ""

    # --- shared ------------------------------------------------------------------------------
    def convert_hint(self) -> str:
        """A pointer to ``prepare_data convert`` when a non-official label format is read."""
        if self.labels == self.LABEL_FORMATS[0]:
            return ""
        return (f"Converted labels ({self.labels}) are written by `python -m "
                f"reprod.prepare_data convert {self.name} {self.root}`.")

    def _missing_folder(self, folder: Path) -> str:
        hint = self.convert_hint()
        return (f"{self.title}: folder {folder} does not exist.\n" + (hint + "\n" if hint else "")
                + self.SOURCE)

    def _require_pairs(self) -> None:
        p = self.pairing
        if p.unpaired_images or p.unpaired_labels:
            msg = f"{self.title} {self.split}: files without their partner under {self.root}"
            if p.unpaired_images:
                msg += f"\n{len(p.unpaired_images)} images without a label:"
                msg += _listing(p.unpaired_images)
            if p.unpaired_labels:
                msg += f"\n{len(p.unpaired_labels)} labels without an image:"
                msg += _listing(p.unpaired_labels)
            if not self.samples and not p.unpaired_labels and self.convert_hint():
                msg += "\nNo labels at all: " + self.convert_hint()
            raise ValueError(msg + "\n(`python -m reprod.prepare_data verify` lists them all)")
        if not self.samples:
            raise ValueError(f"{self.title} {self.split}: no images found under {self.root}.\n"
                             f"{self.SOURCE}")

    def rcs_label(self, sample: Sample) -> Path:
        """The trainId label file of ``sample`` that an RCS loader reads: the label itself when
        the format is already trainIds, else where ``convert`` writes it."""
        return sample.label if self.labels in self.TRAIN_ID_FORMATS else \
            self.train_id_path(sample.label)

    def expected_count(self) -> int | None:
        """The official number of images of this split (None where not known)."""
        return self.EXPECTED_COUNTS.get(self.split)

    def sample_name(self, sample: Sample) -> str:
        """The image path relative to the root (the ``name`` of an item)."""
        return sample.image.relative_to(self.root).as_posix()

    def check(self, index: int, values: bool = True) -> list[str]:
        """Problems of item ``index`` (unreadable, sizes differ, label values), [] when fine."""
        return check_sample(self.decoder, self.samples[index], values)

    def read_label(self, index: int) -> np.ndarray:
        """The trainIds of item ``index``, uint8 (H, W)."""
        return self.decoder(self.samples[index].label)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        image = read_image(sample.image)
        label = self.decoder(sample.label)
        if image.shape[:2] != label.shape:
            raise ValueError(f"{sample.label}: label is {label.shape[1]}x{label.shape[0]} but "
                             f"its image {sample.image} is {image.shape[1]}x{image.shape[0]}")
        img = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        lab = torch.from_numpy(label.astype(np.int64))
        return (img, lab, self.sample_name(sample)) if self.return_name else (img, lab)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, "
                f"labels={self.labels!r}, n={len(self)})")


def _replace_suffix(path: Path, old: str, new: str) -> Path:
    if not path.name.endswith(old):
        raise ValueError(f"{path}: expected a file name ending in {old!r}")
    return path.with_name(path.name[: -len(old)] + new)


def _save_image(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(image)
    if path.suffix == ".jpg":
        im.save(path, quality=95, subsampling=0)   # 4:4:4, about 3/255 mean error on toys
    else:
        im.save(path)
    return path


class GTAV(SegmentationFiles):
    """GTAV (Playing for Data): ``images/<n>.png`` + ``labels/<n>.png`` Cityscapes labelIds.

    Split ``all`` (24,966 images; Rein, MFuser) reads both folders recursively; ``train``,
    ``valid``, ``test`` read RobustNet's ``images/{split}`` + ``labels/{split}`` (tqdm).
    ``labels="trainids"`` reads the converter's ``<n>_labelTrainIds.png`` instead.
    """

    name, title = "gtav", "GTAV"
    SPLITS = ("all", "train", "valid", "test")
    DEFAULT_SPLITS = ("all",)
    LABEL_FORMATS = ("ids", "trainids")
    # RobustNet's per-split counts: no source at hand to check them against (None).
    EXPECTED_COUNTS: ClassVar[dict[str, int | None]] = {
        "all": 24966, "train": None, "valid": None, "test": None}
    SOURCE = ("GTAV comes from https://download.visinf.tu-darmstadt.de/data/from_games/ "
              "(Richter et al., 'Playing for Data'): unzip the image and label parts into one "
              "root holding images/00001.png ... and labels/00001.png ... (24,966 each; labels "
              "are palettised PNGs of Cityscapes label ids). tqdm's RobustNet split puts them "
              "in images/{train,valid,test}/ and labels/{train,valid,test}/.")

    def __init__(self, root: str | Path, split: str = "all", labels: str | None = None,
                 **kwargs):
        super().__init__(root, split, labels, **kwargs)

    def _split_hint(self, split: str) -> str:
        return " (RobustNet's validation folder is 'valid')" if split == "val" else ""

    def _folders(self) -> list[_Folders]:
        sub = "" if self.split == "all" else self.split
        depth = None if self.split == "all" else 0
        if self.labels == "ids":
            return [_Folders(self.root / "images" / sub, ".png", self.root / "labels" / sub,
                             ".png", depth, exclude="_labelTrainIds.png")]
        return [_Folders(self.root / "images" / sub, ".png", self.root / "labels" / sub,
                         "_labelTrainIds.png", depth)]

    def _decoder(self) -> LabelDecoder:
        return _decoder("labelIds" if self.labels == "ids" else "trainIds", self.strict_labels)

    def train_id_path(self, label: Path) -> Path:
        return _replace_suffix(label, ".png", "_labelTrainIds.png")

    @classmethod
    def _toy_write(cls, root, split, index, image, label, condition) -> list[Path]:
        offset = {"all": 0, "train": 0, "valid": 50000, "test": 70000}[split]
        sub = "" if split == "all" else split
        name = f"{offset + index + 1:05d}.png"
        lab = root / "labels" / sub / name
        write_label(lab, train_ids_to_label_ids(label), LABEL_ID_PALETTE)
        return [_save_image(root / "images" / sub / name, image), lab]


class Cityscapes(SegmentationFiles):
    """Cityscapes fine annotations: ``leftImg8bit/{split}/<city>/*_leftImg8bit.png`` with
    ``gtFine/{split}/<city>/*_gtFine_labelIds.png`` (or converted ``_gtFine_labelTrainIds.png``).
    The test split's labels are withheld, so only train and val are read."""

    name, title = "cityscapes", "Cityscapes"
    SPLITS = ("train", "val")
    LABEL_FORMATS = ("ids", "trainids")
    EXPECTED_COUNTS: ClassVar[dict[str, int | None]] = {"train": 2975, "val": 500}
    SOURCE = ("Cityscapes comes from https://www.cityscapes-dataset.com/downloads/ "
              "(leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip, after registering): "
              "unzip both into one root holding leftImg8bit/{train,val}/<city>/"
              "<city>_<seq>_<frame>_leftImg8bit.png and gtFine/{train,val}/<city>/"
              "<city>_<seq>_<frame>_gtFine_labelIds.png (2,975 train, 500 val).")

    def _split_hint(self, split: str) -> str:
        return " (Cityscapes' test labels are withheld)" if split == "test" else ""

    def _suffix(self) -> str:
        return "_gtFine_labelIds.png" if self.labels == "ids" else "_gtFine_labelTrainIds.png"

    def _folders(self) -> list[_Folders]:
        return [_Folders(self.root / "leftImg8bit" / self.split, "_leftImg8bit.png",
                         self.root / "gtFine" / self.split, self._suffix(), 1)]

    def _decoder(self) -> LabelDecoder:
        return _decoder("labelIds" if self.labels == "ids" else "trainIds", self.strict_labels)

    def train_id_path(self, label: Path) -> Path:
        return _replace_suffix(label, "_gtFine_labelIds.png", "_gtFine_labelTrainIds.png")

    @classmethod
    def _toy_write(cls, root, split, index, image, label, condition) -> list[Path]:
        stem = f"toyworld/toyworld_{index:06d}_000019"
        lab = root / "gtFine" / split / f"{stem}_gtFine_labelIds.png"
        write_label(lab, train_ids_to_label_ids(label))
        return [_save_image(root / "leftImg8bit" / split / f"{stem}_leftImg8bit.png", image), lab]


class BDD100K(SegmentationFiles):
    """BDD100K's 10k semantic subset: ``images/10k/{split}/<id>.jpg`` with the 19-class trainId
    masks ``labels/sem_seg/masks/{split}/<id>.png`` (``labels="masks"``, Rein and MFuser: no
    conversion needed) or tqdm's ``labels/sem_seg/colormaps/{split}/<id>_labelTrainIds.png``
    (``labels="colormaps"``; ``prepare_data convert bdd100k`` copies the masks there)."""

    name, title = "bdd100k", "BDD100K"
    SPLITS = ("train", "val")
    LABEL_FORMATS = ("masks", "colormaps")
    TRAIN_ID_FORMATS = ("masks", "colormaps")
    EXPECTED_COUNTS: ClassVar[dict[str, int | None]] = {"train": 7000, "val": 1000}
    SOURCE = ("BDD100K comes from https://bdd-data.berkeley.edu/ ('10K Images' and the "
              "semantic segmentation labels): unzip both into one root holding "
              "images/10k/{train,val}/<id>.jpg and labels/sem_seg/masks/{train,val}/<id>.png "
              "(19-class trainIds, 255 ignore; 7,000 train, 1,000 val). Do not use the RGB "
              "colormaps as labels.")

    def _split_hint(self, split: str) -> str:
        return " (BDD100K's test labels are withheld)" if split == "test" else ""

    def _folders(self) -> list[_Folders]:
        images = self.root / "images" / "10k" / self.split
        if self.labels == "masks":
            return [_Folders(images, ".jpg", self.root / "labels" / "sem_seg" / "masks" /
                             self.split, ".png", 0)]
        return [_Folders(images, ".jpg", self.root / "labels" / "sem_seg" / "colormaps" /
                         self.split, "_labelTrainIds.png", 0)]

    def _decoder(self) -> LabelDecoder:
        return _decoder("trainIds", self.strict_labels)

    def train_id_path(self, label: Path) -> Path:
        split = label.parent.name
        return (self.root / "labels" / "sem_seg" / "colormaps" / split /
                f"{label.stem}_labelTrainIds.png")

    @classmethod
    def _toy_write(cls, root, split, index, image, label, condition) -> list[Path]:
        name = f"{zlib.crc32(f'toyworld/{split}'.encode()):08x}-{index:08x}"
        lab = root / "labels" / "sem_seg" / "masks" / split / f"{name}.png"
        write_label(lab, label)
        return [_save_image(root / "images" / "10k" / split / f"{name}.jpg", image), lab]


class Mapillary(SegmentationFiles):
    """Mapillary Vistas v1.2: ``{training,validation}/images/<key>.jpg`` with the 66-class labels
    in ``{dir}/v1.2/labels/<key>.png`` (v2.0 bundle) or ``{dir}/labels/<key>.png`` (v1.x release),
    pixel = index into ``config_v1.2.json`` (palettised PNGs; RGB colour-coded labels are decoded
    by colour), mapped to trainIds by name (``MAPILLARY_TO_TRAIN_ID``); or ``labels="trainids"``:
    ``{dir}/labels/<key>_labelTrainIds.png``, what ``prepare_data convert mapillary`` writes and
    tqdm/MFuser read (devinxzhang/MFuser@cd8ef85 ``configs/_base_/datasets/gta2map-512.py``; its
    README shows another layout). Rein's half-resolution copies are not read."""

    name, title = "mapillary", "Mapillary Vistas"
    SPLITS = ("train", "val")
    LABEL_FORMATS = ("v1.2", "trainids")
    EXPECTED_COUNTS: ClassVar[dict[str, int | None]] = {"train": 18000, "val": 2000}
    FOLDERS: ClassVar[dict[str, str]] = {"train": "training", "val": "validation"}
    config_file: Path | None = None   # the config the v1.2 labels were mapped with (None: embedded)
    SOURCE = ("Mapillary Vistas comes from https://www.mapillary.com/dataset/vistas (after "
              "registering): unzip it into a root holding config_v1.2.json, "
              "training/images/<key>.jpg, training/v1.2/labels/<key>.png and the same under "
              "validation/ (18,000 train, 2,000 val; the v1.x release has labels/ instead of "
              "v1.2/labels/ and config.json).")

    def _label_folder(self) -> Path:
        base = self.root / self.FOLDERS[self.split]
        if self.labels == "trainids" or not (base / "v1.2" / "labels").is_dir():
            return base / "labels"
        return base / "v1.2" / "labels"

    def _folders(self) -> list[_Folders]:
        images = self.root / self.FOLDERS[self.split] / "images"
        if self.labels == "trainids":
            return [_Folders(images, ".jpg", self._label_folder(), "_labelTrainIds.png", 0)]
        return [_Folders(images, ".jpg", self._label_folder(), ".png", 0,
                         exclude="_labelTrainIds.png")]

    def _decoder(self) -> LabelDecoder:
        if self.labels == "trainids":
            return _decoder("trainIds", self.strict_labels)
        labels, self.config_file = mapillary_config(self.root)
        return _decoder("mapillary", self.strict_labels, labels)

    def train_id_path(self, label: Path) -> Path:
        split_dir = self.root / self.FOLDERS[self.split]
        return split_dir / "labels" / f"{label.stem}_labelTrainIds.png"

    @classmethod
    def _toy_write(cls, root, split, index, image, label, condition) -> list[Path]:
        digest = hashlib.sha256(f"toyworld/{split}/{index}".encode()).digest()
        key = base64.urlsafe_b64encode(digest).decode()[:22]
        base = root / cls.FOLDERS[split]
        config = root / "config_v1.2.json"
        if not config.exists():
            config.write_text(json.dumps(mapillary_config_json(), indent=2))
        lab = base / "v1.2" / "labels" / f"{key}.png"
        write_label(lab, _MAPILLARY_EXPORT[label], _MAPILLARY_PALETTE)
        return [_save_image(base / "images" / f"{key}.jpg", image), lab]


def _mapillary_export_table() -> np.ndarray:
    index = {r: i for i, (_, r, _) in enumerate(MAPILLARY_V12_LABELS)}
    table = np.zeros(256, np.uint8)
    for tid, readable in MAPILLARY_CANONICAL.items():
        table[tid] = index[readable]
    return table


_MAPILLARY_EXPORT = _mapillary_export_table()   # trainId -> Mapillary index (export only)
_MAPILLARY_PALETTE = [c for *_, rgb in MAPILLARY_V12_LABELS for c in rgb]

ACDC_CONDITIONS: tuple[str, ...] = ("fog", "night", "rain", "snow")
ACDC_COUNTS: dict[str, dict[str, int]] = {
    "fog": {"train": 400, "val": 100}, "night": {"train": 400, "val": 106},
    "rain": {"train": 400, "val": 100}, "snow": {"train": 400, "val": 100},
}
"""ACDC images per condition and split, from the ACDC paper's official split (the QueryDiff
paper's §5.1 gives only the total, 406 validation images; 500 test images per condition have no
public labels)."""


class ACDC(SegmentationFiles):
    """ACDC (adverse conditions): ``rgb_anon/{cond}/{split}/<seq>/<seq>_frame_<n>_rgb_anon.png``
    with ``gt/{cond}/{split}/<seq>/..._gt_labelIds.png`` (``labels="ids"``) or the shipped
    ``_gt_labelTrainIds.png`` (``labels="trainids"``, Rein's choice:
    ``configs/_base_/datasets/fog-acdc_1024x1024.py`` and the other conditions'), over
    ``conditions`` (default all four). Test labels are on the server only."""

    name, title = "acdc", "ACDC"
    SPLITS = ("train", "val")
    LABEL_FORMATS = ("ids", "trainids")
    EXPECTED_COUNTS: ClassVar[dict[str, int | None]] = {}
    SOURCE = ("ACDC comes from https://acdc.vision.ee.ethz.ch/ (rgb_anon_trainvaltest.zip and "
              "gt_trainval.zip, after registering): unzip both into one root holding "
              "rgb_anon/{fog,night,rain,snow}/{train,val}/<seq>/<seq>_frame_<n>_rgb_anon.png and "
              "gt/{fog,night,rain,snow}/{train,val}/<seq>/<seq>_frame_<n>_gt_labelIds.png "
              "(and _gt_labelTrainIds.png).")

    def __init__(self, root: str | Path, split: str, labels: str | None = None, *,
                 conditions: str | Sequence[str] = ACDC_CONDITIONS, **kwargs):
        conditions = (conditions,) if isinstance(conditions, str) else tuple(conditions)
        unknown = [c for c in conditions if c not in ACDC_CONDITIONS]
        if unknown or not conditions:
            raise ValueError(f"unknown ACDC conditions {unknown or conditions!r}; choose from "
                             f"{ACDC_CONDITIONS}")
        self.conditions = conditions
        super().__init__(root, split, labels, **kwargs)

    def _split_hint(self, split: str) -> str:
        return " (ACDC's test labels are on the evaluation server only)" if split == "test" else ""

    def _suffix(self) -> str:
        return "_gt_labelIds.png" if self.labels == "ids" else "_gt_labelTrainIds.png"

    def _folders(self) -> list[_Folders]:
        return [_Folders(self.root / "rgb_anon" / c / self.split, "_rgb_anon.png",
                         self.root / "gt" / c / self.split, self._suffix(), 1, prefix=f"{c}/")
                for c in self.conditions]

    def _decoder(self) -> LabelDecoder:
        return _decoder("labelIds" if self.labels == "ids" else "trainIds", self.strict_labels)

    def expected_count(self) -> int | None:
        return sum(ACDC_COUNTS[c][self.split] for c in self.conditions)

    def train_id_path(self, label: Path) -> Path:
        return _replace_suffix(label, "_gt_labelIds.png", "_gt_labelTrainIds.png")

    @classmethod
    def _toy_write(cls, root, split, index, image, label, condition) -> list[Path]:
        seq = f"GOPR{10 * ACDC_CONDITIONS.index(condition) + cls.SPLITS.index(split):04d}"
        stem = f"{seq}/{seq}_frame_{index:06d}"
        gt = root / "gt" / condition / split
        ids, train_ids = gt / f"{stem}_gt_labelIds.png", gt / f"{stem}_gt_labelTrainIds.png"
        write_label(ids, train_ids_to_label_ids(label))
        write_label(train_ids, label)
        img = _save_image(root / "rgb_anon" / condition / split / f"{stem}_rgb_anon.png", image)
        return [img, ids, train_ids]


DATASETS: dict[str, type[SegmentationFiles]] = {
    cls.name: cls for cls in (GTAV, Cityscapes, BDD100K, Mapillary, ACDC)}
"""The readers by name: gtav, cityscapes, bdd100k, mapillary, acdc."""


def dataset_class(name: str) -> type[SegmentationFiles]:
    """The reader class called ``name``; a ValueError listing the known names otherwise."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {tuple(DATASETS)}")
    return DATASETS[name]


def build_dataset(name: str, root: str | Path, split: str, **kwargs) -> SegmentationFiles:
    """A reader: ``build_dataset("cityscapes", "data/cityscapes", "val", labels="trainids")``.

    Keyword arguments go to the reader (``labels``, ``strict_labels``, ``return_name``,
    ``allow_unpaired``; ACDC also ``conditions``).
    """
    return dataset_class(name)(root, split, **kwargs)


# ----------------------------------------------------------------------------------------------
# ToyWorld export
# ----------------------------------------------------------------------------------------------
TOY_DOMAINS: dict[str, str] = {
    "gtav": tw.SOURCE_DOMAIN, "cityscapes": "citylike", "bdd100k": "dashcam",
    "mapillary": "streetview"}
"""The ToyWorld domain each dataset's export renders (ACDC: the condition's own domain)."""

TOY_SPLITS: dict[str, str] = {"all": "train", "train": "train", "valid": "val", "val": "val",
                              "test": "test"}
"""Default ToyWorld split exported into each dataset split (override with ``split_map``)."""

EXPORT_DIRS: dict[str, str] = {"gtav": "gta", "cityscapes": "cityscapes", "bdd100k": "bdd100k",
                               "mapillary": "mapillary", "acdc": "acdc"}
"""Folder of each dataset under an export root (Rein's ``data/`` names)."""

MANIFEST = "toyworld_export.json"


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest_member(root: Path, manifest: Path, rel: object) -> str:
    """A path the manifest lists, checked to be a plain relative path inside ``root``."""
    pure = PurePosixPath(rel) if isinstance(rel, str) else None
    if (pure is None or not rel or pure.is_absolute() or pure.as_posix() != rel
            or any(part in ("..", ".") for part in pure.parts) or "\\" in rel):
        raise ValueError(f"{manifest} lists {rel!r}, which is not a plain path inside {root}: "
                         "refusing to delete or overwrite anything there")
    return rel


def _read_manifest(root: Path, dataset: str) -> dict:
    """The manifest of an earlier export into ``root``, its structure and paths checked."""
    path = root / MANIFEST
    if path.is_symlink() or not path.is_file():
        raise ValueError(f"{path} is not a regular file: refusing to export into {root}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a ToyWorld export manifest ({e}): refusing to export "
                         f"into {root}") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("parts"), dict) or not all(
            isinstance(v, dict) and isinstance(v.get("files", []), list)
            for v in manifest["parts"].values()):
        raise ValueError(f"{path} is not a ToyWorld export manifest: refusing to export into "
                         f"{root}")
    if manifest.get("dataset") != dataset:
        raise ValueError(f"{path} records a ToyWorld export of {manifest.get('dataset')!r}, "
                         f"not {dataset!r}: export into another folder")
    if not isinstance(manifest.get("sha256"), dict):
        raise ValueError(f"{path} predates the export's checksums, so the files there cannot be "
                         f"told from others: delete {root} and export again")
    for part in manifest["parts"].values():
        for rel in part.get("files", []):
            _manifest_member(root, path, rel)
    for rel in manifest["sha256"]:
        _manifest_member(root, path, rel)
    return manifest


def _foreign_files(root: Path, manifest: dict) -> list[str]:
    """Everything under ``root`` the export did not write, or that changed since (checksums),
    symbolic links included; the manifest itself excepted."""
    sums = manifest["sha256"]
    foreign = []
    for folder, dirs, files in os.walk(root):
        base = Path(folder)
        for name in sorted(dirs):
            if (base / name).is_symlink():
                foreign.append((base / name).relative_to(root).as_posix() + " (a link)")
        for name in sorted(files):
            rel = (base / name).relative_to(root).as_posix()
            if rel in (MANIFEST, f".{MANIFEST}.tmp"):       # (the latter: a killed export)
                continue
            if (base / name).is_symlink() or not (base / name).is_file():
                foreign.append(rel + " (not a regular file)")
            elif rel not in sums:
                foreign.append(rel)
            elif _file_sha256(base / name) != sums[rel]:
                foreign.append(rel + " (changed since the export)")
    return foreign


def _load_manifest(root: Path, dataset: str) -> dict:
    """The earlier export's manifest when ``root`` holds nothing else (a fresh one for an empty
    or new folder); a FileExistsError when ``root`` holds files the export did not write."""
    if (root / MANIFEST).exists() or (root / MANIFEST).is_symlink():
        manifest = _read_manifest(root, dataset)
        foreign = _foreign_files(root, manifest)
        if foreign:
            raise FileExistsError(
                f"{root} holds files the ToyWorld export did not write (or that changed since): "
                f"{_listing(foreign, 10)}\nRefusing to delete or overwrite anything there: "
                "export into a new folder, or remove those files")
        return manifest
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty and holds no {MANIFEST}: refusing to write "
                              "ToyWorld scenes into what may be a real dataset tree")
    return {"dataset": dataset, "toyworld_version": tw.current_world(), "parts": {},
            "sha256": {}}


def export_toyworld(root: str | Path, dataset: str, splits: Sequence[str] | None = None, *,
                    length: int = 16, size: tuple[int, int] = tw.DEFAULT_SIZE, seed: int = 0,
                    split_map: dict[str, str] | None = None,
                    conditions: Sequence[str] = ACDC_CONDITIONS, progress: bool = False) -> dict:
    """Write ``length`` ToyWorld scenes per split into ``root`` in ``dataset``'s official layout.

    Images are exported as uint8 (``round(255 * x)``; PNG where the dataset ships PNG, JPEG
    quality 95 without chroma subsampling for BDD100K and Mapillary, which ship .jpg: those
    read back about 3/255 off on average, and slightly smoothed), labels in the dataset's official
    encoding: GTAV palettised labelIds, Cityscapes labelIds, BDD trainId masks, Mapillary v1.2
    indices (palettised with the official colours, plus a ``config_v1.2.json``), ACDC labelIds
    and trainIds. ToyWorld's ignore pixels (255, e.g. the ego hood) become labelId 0 / Mapillary
    "Unlabeled", which read back as 255. ``split_map`` picks the ToyWorld split of a dataset split
    (default ``TOY_SPLITS``; e.g. ``{"val": "test"}`` exports the toy benchmark's target scenes).

    A manifest (``toyworld_export.json``) records what was written, with each file's SHA-256.
    Re-exporting into a folder first checks that it holds nothing but those files, unchanged (no
    other file, no link; the manifest's paths must lie inside the folder), then deletes the
    re-exported split's files; anything else is refused before a file is touched, as is a
    non-empty folder without a manifest. Returns the manifest.
    """
    cls = dataset_class(dataset)
    root = Path(root)
    splits = tuple(splits or cls.DEFAULT_SPLITS)
    bad = [s for s in splits if s not in cls.SPLITS]
    if bad:
        raise ValueError(f"unknown {cls.title} splits {bad}; choose from {cls.SPLITS}")
    if dataset == "gtav" and "all" in splits and len(splits) > 1:
        raise ValueError("GTAV split 'all' reads every split folder: export either 'all' or "
                         "RobustNet's train/valid/test")
    split_map = {**TOY_SPLITS, **(split_map or {})}
    conds = tuple(conditions) if dataset == "acdc" else (None,)
    unknown = [c for c in conds if c is not None and c not in ACDC_CONDITIONS]
    if unknown:
        raise ValueError(f"unknown ACDC conditions {unknown}; choose from {ACDC_CONDITIONS}")
    manifest = _load_manifest(root, dataset)
    root.mkdir(parents=True, exist_ok=True)
    for cond in conds:
        domain = cond or TOY_DOMAINS[dataset]
        for split in splits:
            part = f"{cond}/{split}" if cond else split
            for old in manifest["parts"].get(part, {}).get("files", []):
                (root / old).unlink(missing_ok=True)           # checked: ours, inside root
                manifest["sha256"].pop(old, None)
            world = tw.ToyWorld(domain, split_map[split], size, length, seed)
            files = []
            bar = {} if progress else {"disable": True}   # TQDM_DISABLE still applies
            for i in tqdm(range(length), desc=f"export {dataset} {part}", leave=False, **bar):
                image, label = world[i]
                img = np.round(image.numpy().transpose(1, 2, 0) * 255).astype(np.uint8)
                paths = cls._toy_write(root, split, i, img, label.numpy().astype(np.uint8), cond)
                files += [p.relative_to(root).as_posix() for p in paths]
            manifest["parts"][part] = {"domain": domain, "toy_split": split_map[split],
                                       "length": length, "size": list(size), "seed": seed,
                                       "files": files}
    written = {rel for part in manifest["parts"].values() for rel in part["files"]}
    if (root / "config_v1.2.json").is_file():               # Mapillary's, written once
        written.add("config_v1.2.json")
    manifest["sha256"] = {rel: _file_sha256(root / rel) for rel in sorted(written)
                          if (root / rel).is_file()}
    tmp = root / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(root / MANIFEST)
    return manifest

