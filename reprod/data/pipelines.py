"""The training data pipelines of the official recipes, rare-class sampling, a resumable stream.

One function per transform of the official configs, in their order (resize -> crop -> flip ->
photometric -> pad), then the samplers that feed a trainer:

==========================  ======================================================================
here                        official name (source)
==========================  ======================================================================
``random_choice_resize``    Rein (mmseg 1.x): ``RandomChoiceResize`` over ``ResizeShortestEdge``
                            with short sides ``int(512 * x * 0.1)``, x = 5..20, long side capped
                            at 2048 (1024 crops: ``int(1024 * x * 0.1)``, cap 4096; w1oves/Rein
                            @7da85bc ``configs/_base_/datasets/gta_512x512.py``)
``ratio_resize``            tqdm and MFuser (mmseg 0.x): ``Resize(img_scale=None,
                            ratio_range=(0.5, 2.0))``, a ratio of the *native* size (GTAV
                            1914x1052 -> 957x526 .. 3828x2104; tqdm's and MFuser's
                            ``configs/_base_/datasets/gta2city-512.py``)
``random_crop_cat_max``     ``RandomCrop(crop_size=(512, 512), cat_max_ratio=0.75)``
``TrainPipeline`` flip      ``RandomFlip(prob=0.5)`` (horizontal)
``photometric_distortion``  ``PhotoMetricDistortion`` (``lessons.augment``, reused)
``pad_to_crop``             ``Normalize`` + ``Pad(size=crop, pad_val=0, seg_pad_val=255)`` (0.x)
                            or ``SegDataPreProcessor(size=crop, pad_val=0, seg_pad_val=255)``
                            (1.x): see "Padding" below
``RareClassSampler``        tqdm/MFuser ``UGDataset`` rare-class sampling (RCS), DAFormer's
                            ``get_rare_class_sample``: min_pixels 3000, class_temp 100,
                            min_crop_ratio 0.5 (``mmseg/datasets/ug_dataset.py`` of tqdm and MFuser)
``TrainingStream``          the dataset + sampler pair of the trainer, indexed by stream position
==========================  ======================================================================

Layout: images enter as uint8 **(3, H, W)** RGB, the layout ``reprod.data.datasets`` readers return
(torch tensors or numpy arrays), labels as integer (H, W) trainIds with 255 = ignore. Sizes are
(H, W) everywhere here (mmcv writes (w, h)). The output is a float32 image in [0, 1]
(3, crop, crop) and an int64 label (crop, crop): the models of ``lessons`` normalise inside each
encoder (``Encoder.normalize``), so nothing here normalises.

Resizing follows mmcv exactly in its sizes (``ResizeShortestEdge``'s shape rule, then mmcv's
``rescale_size``; ``random_sample_ratio`` then ``rescale_size``) and samples like
``torch.nn.functional.interpolate``: images bilinear with half-pixel centres, no antialiasing
(``align_corners=False, antialias=False``, as OpenCV's ``INTER_LINEAR`` that mmcv calls), rounded
back to integer values as mmcv's uint8 resize leaves them; labels nearest (``mode="nearest"``, the
same index rule as OpenCV's ``INTER_NEAREST``), so no new label values appear. The pipeline never
builds the whole resized image: it draws the crop on the resized *label* and resamples only the
crop window of the image, which gives the same pixels as resizing everything and cropping (tested)
at a fraction of the cost (a 2x GTAV image would be 3828x2104).

Crop (mmseg's ``RandomCrop``): the window is min(crop, size) per axis at uniform integer offsets.
With ``cat_max_ratio < 1`` a window is accepted when it holds more than one class (255 excluded)
and the largest class is under ``cat_max_ratio`` of the labelled pixels; mmseg checks up to 10
windows, drawing a new one after each failed check, and keeps the last one drawn when none passed
(so up to 11 draws, the last unchecked): :func:`redraw_until` is that loop.

Rare-class sampling with a crop rule (decision): as in ``UGDataset``/DAFormer, each stream item
draws a class c with probability softmax((1 - f_c) / T), then a file with *more than*
``min_pixels`` pixels of c, runs the pipeline, and re-runs the random part up to 10 times until
the crop holds more than ``min_pixels * min_crop_ratio`` (1500) pixels of c, keeping the last
draw otherwise. Each re-run redraws the resize *and* the ``cat_max`` crop (the official loop calls
the whole source pipeline again), so the RCS rule comes **in addition to** the ``cat_max`` rule,
not instead of it. Only the geometric part is re-run here: flip and photometric distortion do not
change class counts, so they are drawn once for the kept crop (same distribution, less work).

Padding (decision): the official pipelines normalise and then pad the image with 0 (and the label
with 255) at the bottom/right, so a padded pixel is 0 *after normalisation*. Our images are padded
before the model normalises them, so the image is padded with the mean (in [0, 1]) of the
normalisation the official pipeline applies before padding: ImageNet's for Rein (the data
preprocessor of ``configs/_base_/models/rein_dinov2_mask2former.py``), CLIP's for tqdm and for
MFuser *whichever encoders it fuses*, since MFuser's pipeline normalises with CLIP statistics before
padding and its fused backbone re-normalises afterwards (devinxzhang/MFuser@cd8ef85
``models/backbones/clip/models.py`` and the EVA and SigLIP encoders). :func:`pad_value_for` gives
the mean of an encoder bundle. Padding happens only where the resized image is smaller than the crop
(Rein's short side 256 on GTAV; never for tqdm on GTAV or Cityscapes, whose smallest ratio 0.5
leaves >= 512 pixels).

Determinism and resumption: the item at stream position p depends only on (seed, p). Without RCS
it is item ``perm_e[p % N]`` with ``perm_e`` the permutation of epoch e = p // N drawn by
``np.random.default_rng((seed, e))``; with RCS, class and file come from
``np.random.default_rng((seed, p))``. Augmentations use ``np.random.default_rng((seed, p, 1))``.
A trainer resumes by continuing at position step * global batch, and DDP ranks take disjoint
positions (:class:`StreamSampler`).

Benchmark (decode + pipeline through a DataLoader; ``--synthetic N`` writes N GTAV-size PNG scenes
into a temporary GTAV tree first)::

    python -m reprod.data.pipelines bench --synthetic 16 --pipeline rein --workers 2 --seconds 20
    python -m reprod.data.pipelines bench --root data/gta --dataset gtav --pipeline tqdm --rcs

Glossary: H W image height and width (h w after resizing); B batch size per rank (per step);
N items in the dataset; p stream position; c crop side; K = 19 classes; RCS rare-class sampling.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lessons.augment import photometric_distortion
from lessons.classes import CLASSES, IGNORE_INDEX
from reprod.data.datasets import SegmentationFiles

__all__ = [
    "CAT_MAX_RATIO",
    "CLIP_MEAN",
    "CROP_TRIES",
    "DEFAULT_PAD_MEAN",
    "GTAV_SIZE",
    "IMAGENET_MEAN",
    "PIPELINE_KINDS",
    "RATIO_RANGE",
    "RCS_MIN_CROP_RATIO",
    "REIN_MAX_LONG_SIDE",
    "REIN_SHORT_SIDES",
    "STATS_HINT",
    "Box",
    "PipelineConfig",
    "RareClassSampler",
    "Size",
    "StreamSampler",
    "TrainPipeline",
    "TrainingStream",
    "as_image",
    "as_label",
    "bench",
    "bilinear_window",
    "cat_max_crop_box",
    "cat_max_ok",
    "crop_box",
    "draw_ratio_size",
    "draw_short_side_size",
    "hflip",
    "main",
    "measure",
    "nearest_window",
    "pad_to_crop",
    "pad_value_for",
    "random_choice_resize",
    "random_crop_cat_max",
    "ratio_resize",
    "ratio_size",
    "redraw_until",
    "resample_window",
    "rescale_size",
    "resize_pair",
    "short_sides",
    "shortest_edge_size",
    "write_synthetic_gtav",
]

T = TypeVar("T")
Box = tuple[int, int, int, int]          # (top, left, height, width) of a crop window
Size = tuple[int, int]                   # (H, W)

# ----------------------------------------------------------------------------------------------
# Recipe constants
# ----------------------------------------------------------------------------------------------
PIPELINE_KINDS: tuple[str, ...] = ("rein", "tqdm")
"""``rein``: Rein's mmseg 1.x pipeline; ``tqdm``: tqdm's and MFuser's mmseg 0.x pipeline."""

CROP_TRIES = 10            # mmseg RandomCrop and DAFormer RCS: checks before keeping the last draw
CAT_MAX_RATIO = 0.75
RATIO_RANGE: tuple[float, float] = (0.5, 2.0)
RCS_MIN_CROP_RATIO = 0.5   # tqdm / MFuser UGDataset

# The normalisation means of lessons.backbones (IMAGENET_MEAN, CLIP_MEAN), repeated here because
# importing lessons.backbones loads open_clip and timm (seconds per process); a test keeps the
# two in step.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
DEFAULT_PAD_MEAN: dict[str, tuple[float, float, float]] = {"rein": IMAGENET_MEAN,
                                                           "tqdm": CLIP_MEAN}
"""Pad value per pipeline kind: Rein's DINOv2 config normalises with ImageNet statistics, tqdm and
MFuser with CLIP's (another run: pass the mean its official config normalises with)."""


def short_sides(base: int = 512) -> list[int]:
    """Rein's short-side choices ``int(base * x * 0.1)`` for x = 5..20, as the config writes it
    (base 512: 256, 307, ..., 1024; base 1024 for the 1024-crop configs)."""
    return [int(base * x * 0.1) for x in range(5, 21)]


REIN_SHORT_SIDES: list[int] = short_sides(512)
REIN_MAX_LONG_SIDE = 2048  # 4096 with the 1024-crop configs: 4 * crop


def pad_value_for(bundle_name_or_mean: str | Any | Sequence[float]) -> tuple[float, float, float]:
    """The image pad value (3 floats in [0, 1]) that normalises to 0: the mean of an encoder
    bundle given by name (``"dinov2_vitl14"``) or as a ``Bundle``, or a mean given directly.

    For MFuser pass the CLIP mean whatever encoders it fuses (see the module docstring).
    """
    value = bundle_name_or_mean
    if isinstance(value, str):
        # a heavy import (open_clip, timm), so only here
        from lessons.backbones import get_bundle

        try:
            value = get_bundle(value).mean
        except KeyError as e:
            raise ValueError(str(e).strip("'\"")) from e
    elif hasattr(value, "mean") and not isinstance(value, np.ndarray | torch.Tensor):
        value = value.mean
    return _check_mean(value, "pad value")


def _check_mean(value: Any, what: str) -> tuple[float, float, float]:
    try:
        mean = tuple(float(v) for v in value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}: expected 3 floats in [0, 1], got {value!r}") from e
    if len(mean) != 3 or not all(0.0 <= v <= 1.0 for v in mean):
        raise ValueError(f"{what}: expected 3 floats in [0, 1] (a mean of images in [0, 1]), "
                         f"got {value!r}")
    return mean  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------
def as_image(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """A uint8 (3, H, W) image as a numpy array (no copy for numpy input), else a ValueError."""
    array = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"image: expected uint8 values 0..255 as the dataset readers give, got "
                         f"{array.dtype}")
    if array.ndim != 3 or array.shape[0] != 3:
        hint = " (that is (H, W, 3): transpose it to (3, H, W))" if (
            array.ndim == 3 and array.shape[-1] == 3) else ""
        raise ValueError(f"image: expected shape (3, H, W), got {tuple(array.shape)}{hint}")
    return array


def as_label(label: torch.Tensor | np.ndarray, shape: Size | None = None) -> np.ndarray:
    """An integer (H, W) label as uint8 (values 0..255), checked against the image ``shape``."""
    array = label.numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    if array.dtype.kind not in "ui":
        raise ValueError(f"label: expected integer trainIds, got {array.dtype}")
    if array.ndim != 2:
        raise ValueError(f"label: expected shape (H, W), got {tuple(array.shape)}")
    if shape is not None and array.shape != tuple(shape):
        raise ValueError(f"label is {array.shape[1]}x{array.shape[0]} but the image is "
                         f"{shape[1]}x{shape[0]} (W x H)")
    if array.dtype != np.uint8 and array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError(f"label: values must be trainIds 0..255 (255 = ignore), got "
                         f"{int(array.min())}..{int(array.max())}")
    return array.astype(np.uint8, copy=False)


# ----------------------------------------------------------------------------------------------
# Sizes (mmcv's rules)
# ----------------------------------------------------------------------------------------------
def rescale_size(size: Size, target: Size) -> Size:
    """mmcv ``rescale_size`` with a target (keep_ratio): the largest aspect-kept size that fits
    ``target`` (h, w) with its long side <= max(target) and short side <= min(target)."""
    h, w = size
    factor = min(max(target) / max(h, w), min(target) / min(h, w))
    return max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))


def shortest_edge_size(size: Size, short_side: int, max_long_side: int) -> Size:
    """mmseg 1.x ``ResizeShortestEdge``: the short side becomes ``short_side``, the aspect ratio is
    kept, and if the long side would exceed ``max_long_side`` the size is scaled so that it is
    ``max_long_side`` instead; then mmcv's keep-ratio rescale to that size (which can move a side
    by one pixel)."""
    h, w = size
    scale = short_side / min(h, w)
    new_h, new_w = (short_side, scale * w) if h < w else (scale * h, short_side)
    if max(new_h, new_w) > max_long_side:
        cap = max_long_side / max(new_h, new_w)
        new_h, new_w = new_h * cap, new_w * cap
    return rescale_size(size, (int(new_h + 0.5), int(new_w + 0.5)))


def ratio_size(size: Size, ratio: float) -> Size:
    """mmseg 0.x ``Resize(img_scale=None, ratio_range)``: the native size times ``ratio``
    (``int(w * r), int(h * r)``), then mmcv's keep-ratio rescale to it; in effect
    ``(int(h * r + 0.5), int(w * r + 0.5))`` up to a pixel (GTAV at 0.5: 526 x 957)."""
    h, w = size
    return rescale_size(size, (max(1, int(h * ratio)), max(1, int(w * ratio))))


def draw_short_side_size(size: Size, rng: np.random.Generator,
                         sides: Sequence[int] = REIN_SHORT_SIDES,
                         max_long_side: int = REIN_MAX_LONG_SIDE) -> Size:
    """Rein's ``RandomChoiceResize``: one short side drawn uniformly from ``sides``."""
    return shortest_edge_size(size, int(sides[rng.integers(len(sides))]), max_long_side)


def draw_ratio_size(size: Size, rng: np.random.Generator,
                    ratio_range: tuple[float, float] = RATIO_RANGE) -> Size:
    """tqdm's ``Resize(ratio_range)``: a ratio uniform in ``ratio_range`` of the native size."""
    low, high = ratio_range
    return ratio_size(size, rng.random() * (high - low) + low)


# ----------------------------------------------------------------------------------------------
# Resampling a window of the resized image
# ----------------------------------------------------------------------------------------------
def _nearest_index(out_len: int, in_len: int, start: int, count: int) -> np.ndarray:
    """Source indices of output pixels start..start+count (torch "nearest" / OpenCV
    INTER_NEAREST: floor(i * in / out), computed in float32 as torch does)."""
    scale = np.float32(in_len) / np.float32(out_len)
    index = np.floor(np.arange(start, start + count, dtype=np.float32) * scale)
    return np.minimum(index.astype(np.int64), in_len - 1)


def _linear_index(out_len: int, in_len: int, start: int, count: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear taps with half-pixel centres (align_corners=False), float32 as torch: the two
    source indices and the weight of the second for each output pixel."""
    scale = np.float32(in_len) / np.float32(out_len)
    dst = np.arange(start, start + count, dtype=np.float32)
    src = np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0.0))
    first = src.astype(np.int64)                                   # floor (src >= 0)
    weight = np.clip(src - first, 0.0, 1.0).astype(np.float32)
    second = np.minimum(first + 1, in_len - 1)
    return first, second, weight


def bilinear_window(image: np.ndarray, size: Size, box: Box) -> np.ndarray:
    """The ``box`` window of ``image`` (3, H, W) bilinearly resized to ``size``, float32 0..255,
    not rounded: (3, box h, box w)."""
    (top, left, bh, bw), (h, w) = box, image.shape[1:]
    r0, r1, wy = _linear_index(size[0], h, top, bh)
    c0, c1, wx = _linear_index(size[1], w, left, bw)
    lo, hi = int(c0.min()), int(c1.max()) + 1                     # source columns needed
    wy = wy[:, None]
    rows = (image[:, r0, lo:hi].astype(np.float32) * (1 - wy)
            + image[:, r1, lo:hi].astype(np.float32) * wy)       # (3, bh, hi - lo)
    c0, c1 = c0 - lo, c1 - lo
    return rows[:, :, c0] * (1 - wx) + rows[:, :, c1] * wx       # (3, bh, bw)


def nearest_window(label: np.ndarray, size: Size, box: Box) -> np.ndarray:
    """The ``box`` window of ``label`` (H, W) nearest-resized to ``size``: (box h, box w)."""
    top, left, bh, bw = box
    rows = _nearest_index(size[0], label.shape[0], top, bh)
    cols = _nearest_index(size[1], label.shape[1], left, bw)
    return label[rows[:, None], cols[None, :]]


def resample_window(image: np.ndarray, label: np.ndarray, size: Size, box: Box
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Image (3, H, W) uint8 and label (H, W) resized to ``size`` and cropped to ``box``:
    float32 image of integer values 0..255 (3, bh, bw), as mmcv's uint8 resize rounds, and the
    uint8 label (bh, bw)."""
    return np.rint(bilinear_window(image, size, box)), nearest_window(label, size, box)


def resize_pair(image: torch.Tensor | np.ndarray, label: torch.Tensor | np.ndarray, size: Size
                ) -> tuple[np.ndarray, np.ndarray]:
    """Resize a whole image (3, H, W) uint8 (bilinear) and its label (H, W) (nearest) to ``size``:
    uint8 (3, h, w) and uint8 (h, w)."""
    img = as_image(image)
    lab = as_label(label, img.shape[1:])
    out_img, out_lab = resample_window(img, lab, size, (0, 0, *size))
    return out_img.astype(np.uint8), out_lab


def random_choice_resize(image: torch.Tensor | np.ndarray, label: torch.Tensor | np.ndarray,
                         rng: np.random.Generator, sides: Sequence[int] = REIN_SHORT_SIDES,
                         max_long_side: int = REIN_MAX_LONG_SIDE
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Rein's resize of a whole pair: short side drawn from ``sides``, long side capped."""
    size = draw_short_side_size(as_image(image).shape[1:], rng, sides, max_long_side)
    return resize_pair(image, label, size)


def ratio_resize(image: torch.Tensor | np.ndarray, label: torch.Tensor | np.ndarray,
                 rng: np.random.Generator, ratio_range: tuple[float, float] = RATIO_RANGE
                 ) -> tuple[np.ndarray, np.ndarray]:
    """tqdm's / MFuser's resize of a whole pair: a ratio in ``ratio_range`` of the native size."""
    size = draw_ratio_size(as_image(image).shape[1:], rng, ratio_range)
    return resize_pair(image, label, size)


# ----------------------------------------------------------------------------------------------
# Crop
# ----------------------------------------------------------------------------------------------
def redraw_until(draw: Callable[[], T], accept: Callable[[T], bool], tries: int = CROP_TRIES
                 ) -> T:
    """mmseg's ``RandomCrop`` and DAFormer's RCS retry loop: draw; then up to ``tries`` times keep
    the current draw if ``accept`` says so, else draw again. After ``tries`` failed checks the
    last draw is kept unchecked (at most ``tries + 1`` draws)."""
    value = draw()
    for _ in range(tries):
        if accept(value):
            break
        value = draw()
    return value


def crop_box(size: Size, crop: int, rng: np.random.Generator) -> Box:
    """A random crop window of side min(crop, size) per axis at uniform integer offsets
    (top in [0, h - ch], left in [0, w - cw]; mmseg draws top first)."""
    h, w = size
    ch, cw = min(crop, h), min(crop, w)
    top = int(rng.integers(0, h - ch + 1))
    left = int(rng.integers(0, w - cw + 1))
    return top, left, ch, cw


def cat_max_ok(label: np.ndarray, cat_max_ratio: float = CAT_MAX_RATIO) -> bool:
    """mmseg's crop rule: more than one class (255 excluded) and the largest class under
    ``cat_max_ratio`` of the labelled pixels."""
    counts = np.bincount(label.ravel(), minlength=IGNORE_INDEX + 1)[:IGNORE_INDEX]
    present = counts[counts > 0]
    return len(present) > 1 and present.max() / present.sum() < cat_max_ratio


def cat_max_crop_box(label_at: Callable[[Box], np.ndarray], size: Size, crop: int,
                     rng: np.random.Generator, cat_max_ratio: float = CAT_MAX_RATIO) -> Box:
    """The crop window mmseg's ``RandomCrop`` picks on a (resized) label of ``size``;
    ``label_at(box)`` gives the label inside a window. ``cat_max_ratio >= 1``: one plain draw."""
    if cat_max_ratio >= 1.0:
        return crop_box(size, crop, rng)
    return redraw_until(lambda: crop_box(size, crop, rng),
                        lambda box: cat_max_ok(label_at(box), cat_max_ratio))


def random_crop_cat_max(image: torch.Tensor | np.ndarray, label: torch.Tensor | np.ndarray,
                        rng: np.random.Generator, crop: int = 512,
                        cat_max_ratio: float = CAT_MAX_RATIO) -> tuple[np.ndarray, np.ndarray]:
    """mmseg ``RandomCrop(crop_size=(crop, crop), cat_max_ratio)`` on a whole (already resized)
    pair: image (3, H, W) and label (H, W) cropped together."""
    img = as_image(image)
    lab = as_label(label, img.shape[1:])

    def label_at(box: Box) -> np.ndarray:
        return lab[box[0]:box[0] + box[2], box[1]:box[1] + box[3]]

    top, left, ch, cw = cat_max_crop_box(label_at, lab.shape, crop, rng, cat_max_ratio)
    return img[:, top:top + ch, left:left + cw], label_at((top, left, ch, cw))


# ----------------------------------------------------------------------------------------------
# Flip and pad
# ----------------------------------------------------------------------------------------------
def hflip(image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Horizontal flip of an image (3, h, w) and its label (h, w) together."""
    return image[:, :, ::-1], label[:, ::-1]


def pad_to_crop(image: np.ndarray, label: np.ndarray, crop: int,
                pad_mean: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Pad a float image (3, h, w) in [0, 1] and its label (h, w) at the bottom/right to
    (crop, crop): the image with ``pad_mean`` per channel (0 after normalising with that mean),
    the label with 255. Returns float32 (3, crop, crop) and uint8 (crop, crop)."""
    h, w = label.shape
    if h > crop or w > crop:
        raise ValueError(f"cannot pad a {w}x{h} crop to {crop}x{crop}: it is larger")
    out = np.empty((3, crop, crop), np.float32)                   # (3, c, c)
    out[:] = np.asarray(pad_mean, np.float32)[:, None, None]
    out[:, :h, :w] = image
    out_label = np.full((crop, crop), IGNORE_INDEX, np.uint8)     # (c, c)
    out_label[:h, :w] = label
    return out, out_label


# ----------------------------------------------------------------------------------------------
# Config and pipeline
# ----------------------------------------------------------------------------------------------
@dataclass
class PipelineConfig:
    """One recipe's training pipeline. ``None`` fields take the recipe's value for ``crop``:
    ``short_sides`` int(crop * x * 0.1) for x = 5..20, ``max_long_side`` 4 * crop (2048 for 512,
    4096 for 1024), ``pad_mean`` the kind's normalisation mean (``DEFAULT_PAD_MEAN``).
    ``short_sides``/``max_long_side`` serve ``rein``, ``ratio_range`` serves ``tqdm``."""

    kind: str = "rein"
    crop: int = 512
    short_sides: tuple[int, ...] | None = None
    max_long_side: int | None = None
    ratio_range: tuple[float, float] = RATIO_RANGE
    cat_max_ratio: float = CAT_MAX_RATIO
    flip_prob: float = 0.5
    photometric: bool = True
    pad_mean: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        if self.kind not in PIPELINE_KINDS:
            raise ValueError(f"pipeline kind {self.kind!r}: choose from {PIPELINE_KINDS}")
        if not isinstance(self.crop, int) or self.crop < 1:
            raise ValueError(f"crop must be a positive integer, got {self.crop!r}")
        sides = short_sides(self.crop) if self.short_sides is None else self.short_sides
        self.short_sides = tuple(int(s) for s in sides)
        if not self.short_sides or min(self.short_sides) < 1:
            raise ValueError(f"short_sides must be positive integers, got {sides!r}")
        self.max_long_side = 4 * self.crop if self.max_long_side is None else self.max_long_side
        if self.max_long_side < 1:
            raise ValueError(f"max_long_side must be positive, got {self.max_long_side}")
        low, high = self.ratio_range = tuple(float(r) for r in self.ratio_range)
        if not 0 < low <= high:
            raise ValueError(f"ratio_range must be (low, high) with 0 < low <= high, got "
                             f"{self.ratio_range!r}")
        if not 0 < self.cat_max_ratio <= 1:
            raise ValueError(f"cat_max_ratio must be in (0, 1] (1 disables the rule), got "
                             f"{self.cat_max_ratio}")
        if not 0 <= self.flip_prob <= 1:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}")
        mean = DEFAULT_PAD_MEAN[self.kind] if self.pad_mean is None else self.pad_mean
        self.pad_mean = _check_mean(mean, "pad_mean")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PipelineConfig:
        """A config from a dict (a YAML/JSON section); unknown keys are a ValueError naming them."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown pipeline config keys {unknown}; known keys: {known}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain values (lists for tuples), for logs and checkpoints."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


class TrainPipeline:
    """The recipe's augmentation: ``(image, label, rng) -> (image, label)``.

    ``image`` uint8 (3, H, W), ``label`` integer (H, W) (torch or numpy); returns a float32 image
    in [0, 1] (3, c, c) and an int64 label (c, c) as torch tensors, c = ``config.crop``. With
    ``focus=(class, pixels)`` (rare-class sampling) the resize and crop are redrawn up to 10 times
    until the crop holds more than ``pixels`` pixels of ``class`` (module docstring).
    """

    def __init__(self, config: PipelineConfig | None = None, **fields: Any):
        if config is not None and fields:
            raise ValueError(f"give a PipelineConfig or config fields, not both (got {fields}); "
                             "the config's short_sides and max_long_side are already resolved")
        self.config = config if config is not None else PipelineConfig.from_dict(fields)

    def draw_size(self, size: Size, rng: np.random.Generator) -> Size:
        """The resized (h, w) of an image of ``size``, drawn as the recipe does."""
        cfg = self.config
        if cfg.kind == "rein":
            return draw_short_side_size(size, rng, cfg.short_sides, cfg.max_long_side)
        return draw_ratio_size(size, rng, cfg.ratio_range)

    def draw_geometry(self, label: np.ndarray, rng: np.random.Generator) -> tuple[Size, Box]:
        """Resize and cat-max crop, decided on the label alone: (resized size, crop window)."""
        size = self.draw_size(label.shape, rng)
        box = cat_max_crop_box(lambda b: nearest_window(label, size, b), size, self.config.crop,
                               rng, self.config.cat_max_ratio)
        return size, box

    def __call__(self, image: torch.Tensor | np.ndarray, label: torch.Tensor | np.ndarray,
                 rng: np.random.Generator, focus: tuple[int, float] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        img = as_image(image)                                           # (3, H, W) uint8
        lab = as_label(label, img.shape[1:])                            # (H, W) uint8
        if focus is None:
            size, box = self.draw_geometry(lab, rng)
        else:
            cls, pixels = focus
            size, box = redraw_until(
                lambda: self.draw_geometry(lab, rng),
                lambda g: int((nearest_window(lab, *g) == cls).sum()) > pixels)
        crop_img, crop_lab = resample_window(img, lab, size, box)       # (3, h, w), (h, w)
        if rng.random() < cfg.flip_prob:
            crop_img, crop_lab = hflip(crop_img, crop_lab)
        crop_img = crop_img / np.float32(255.0)                         # [0, 1]
        if cfg.photometric:
            crop_img = photometric_distortion(crop_img, rng)
        out_img, out_lab = pad_to_crop(crop_img, crop_lab, cfg.crop, cfg.pad_mean)
        return torch.from_numpy(out_img), torch.from_numpy(out_lab.astype(np.int64))

    def __repr__(self) -> str:
        return f"TrainPipeline({self.config!r})"


# ----------------------------------------------------------------------------------------------
# Rare-class sampling
# ----------------------------------------------------------------------------------------------
STATS_HINT = ("write them with `python -m reprod.prepare_data stats <dataset> <root>` "
              "(the same dataset, split and label format as training)")


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"rare-class sampling needs {path}: {STATS_HINT}")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); {STATS_HINT}") from e


def _class_pixels(stats: Any, path: Path) -> dict[int, int]:
    """Per-class pixel totals of ``sample_class_stats.json`` (a list of {"file", "<c>": n})."""
    if not isinstance(stats, list):
        raise ValueError(f"{path}: expected a list of per-image entries; {STATS_HINT}")
    pixels: dict[int, int] = {}
    for entry in stats:
        for key, n in entry.items():
            if key != "file":
                pixels[int(key)] = pixels.get(int(key), 0) + int(n)
    return pixels


def _class_name(c: int) -> str:
    return f"{c} ({CLASSES[c]})" if 0 <= c < len(CLASSES) else str(c)


@dataclass
class RareClassSampler:
    """tqdm/MFuser ``UGDataset`` rare-class sampling: ``draw(rng) -> (class, file)``.

    ``classes`` and ``probs``: the classes present in the stats and softmax((1 - f_c) / T);
    ``files[c]``: the stats files (trainId label paths relative to the root) with more than
    ``min_pixels`` pixels of c. After drawing, the pipeline redraws its crop until it holds more
    than ``min_crop_pixels`` = min_pixels * min_crop_ratio pixels of c (0: no redraw).
    """

    classes: tuple[int, ...]
    probs: np.ndarray
    files: dict[int, list[str]]
    min_pixels: int = 3000
    temperature: float = 100.0
    min_crop_ratio: float = RCS_MIN_CROP_RATIO
    stats_dir: Path | None = None

    def __post_init__(self) -> None:
        self.probs = np.asarray(self.probs, np.float64)
        if len(self.classes) != len(self.probs) or not len(self.classes):
            raise ValueError("RareClassSampler: one probability per class, at least one class")
        starved = [_class_name(c) for c in self.classes if not self.files.get(c)]
        if starved:
            raise ValueError(
                f"rare-class sampling: no image has more than {self.min_pixels} pixels of "
                f"class {', '.join(starved)} (tqdm's loader asserts on this): lower min_pixels "
                "(small or toy images) or train without RCS")

    @classmethod
    def from_stats(cls, stats_dir_or_root: str | Path | SegmentationFiles,
                   min_pixels: int | None = None, temperature: float | None = None,
                   min_crop_ratio: float = RCS_MIN_CROP_RATIO) -> RareClassSampler:
        """Read ``samples_with_class.json`` and ``sample_class_stats.json`` (``prepare_data
        stats``) from a folder, or from the root of a dataset reader given instead; defaults
        min_pixels 3000, temperature 100 (tqdm/MFuser)."""
        from reprod.prepare_data import RCS_MIN_PIXELS, RCS_TEMPERATURE, rcs_probabilities

        min_pixels = RCS_MIN_PIXELS if min_pixels is None else int(min_pixels)
        temperature = RCS_TEMPERATURE if temperature is None else float(temperature)
        if min_pixels < 0 or temperature <= 0 or min_crop_ratio < 0:
            raise ValueError(f"rare-class sampling: need min_pixels >= 0, temperature > 0 and "
                             f"min_crop_ratio >= 0, got {min_pixels}, {temperature}, "
                             f"{min_crop_ratio}")
        folder = Path(stats_dir_or_root.root if isinstance(stats_dir_or_root, SegmentationFiles)
                      else stats_dir_or_root)
        stats_path = folder / "sample_class_stats.json"
        pixels = _class_pixels(_read_json(stats_path), stats_path)
        with_class = _read_json(folder / "samples_with_class.json")
        probs = rcs_probabilities(pixels, temperature)
        files = {c: [str(f) for f, n in with_class.get(str(c), []) if n > min_pixels]
                 for c in probs}
        return cls(tuple(probs), np.array(list(probs.values())), files, min_pixels, temperature,
                   min_crop_ratio, folder)

    @property
    def min_crop_pixels(self) -> float:
        """The crop must hold more than this many pixels of the drawn class."""
        return self.min_pixels * self.min_crop_ratio

    def draw(self, rng: np.random.Generator) -> tuple[int, str]:
        """A class by its probability, then one of its files uniformly."""
        c = self.classes[int(rng.choice(len(self.classes), p=self.probs))]
        candidates = self.files[c]
        return c, candidates[int(rng.integers(len(candidates)))]

    def indices(self, files: SegmentationFiles) -> dict[str, int]:
        """Stats file -> item index of ``files``: by the path ``prepare_data stats`` writes
        (``files.rcs_label(sample)`` relative to the root), else by a unique base name (as the
        DAFormer loaders match). A file that matches no sample means stale stats: ValueError."""
        by_path, by_name = {}, {}
        for i, sample in enumerate(files.samples):
            rel = files.rcs_label(sample).relative_to(files.root).as_posix()
            by_path[rel] = i
            by_name.setdefault(PurePosixPath(rel).name, []).append(i)
        out, unmatched = {}, []
        for file in sorted({f for fs in self.files.values() for f in fs}):
            hits = [by_path[file]] if file in by_path else by_name.get(
                PurePosixPath(file.replace("\\", "/")).name, [])
            if len(hits) == 1:
                out[file] = hits[0]
            else:
                unmatched.append(file)
        if unmatched:
            shown = ", ".join(unmatched[:5]) + (", ..." if len(unmatched) > 5 else "")
            raise ValueError(
                f"stale rare-class statistics in {self.stats_dir}: {len(unmatched)} file(s) "
                f"match no single sample of {files!r} ({shown}); rerun `python -m "
                f"reprod.prepare_data stats {files.name} {files.root}`")
        return out


# ----------------------------------------------------------------------------------------------
# The stream a trainer reads
# ----------------------------------------------------------------------------------------------
def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


class TrainingStream(Dataset):
    """Augmented training samples indexed by stream position p = 0, 1, 2, ... (unbounded).

    Position p gives (image float32 (3, c, c) in [0, 1], label int64 (c, c)) as a function of
    (seed, p) only: item ``perm_e[p % N]`` of epoch e = p // N, or an RCS draw; augmentation from
    ``default_rng((seed, p, 1))`` (module docstring). ``len()`` is N, the epoch length; feed it
    positions with :class:`StreamSampler`.
    """

    def __init__(self, files: SegmentationFiles, pipeline: TrainPipeline, seed: int,
                 rcs: RareClassSampler | None = None):
        if len(files) == 0:
            raise ValueError(f"{files!r} has no samples to train on")
        self.files, self.pipeline, self.seed, self.rcs = files, pipeline, _check_seed(seed), rcs
        self._file_index = rcs.indices(files) if rcs is not None else {}
        self._epoch, self._perm = -1, np.empty(0, np.int64)

    def __len__(self) -> int:
        return len(self.files)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._perm = np.random.default_rng((self.seed, epoch)).permutation(len(self.files))
            self._epoch = epoch
        return self._perm

    def source(self, position: int) -> tuple[int, int | None]:
        """(item index, RCS class or None) of stream ``position``."""
        if isinstance(position, bool) or not isinstance(position, int | np.integer) \
                or position < 0:
            raise ValueError(f"stream positions are non-negative integers, got {position!r}")
        p = int(position)
        if self.rcs is None:
            n = len(self.files)
            return int(self._permutation(p // n)[p % n]), None
        cls, file = self.rcs.draw(np.random.default_rng((self.seed, p)))
        return self._file_index[file], cls

    def __getitem__(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        index, cls = self.source(position)
        item = self.files[index]
        rng = np.random.default_rng((self.seed, int(position), 1))
        focus = None
        if cls is not None and self.rcs.min_crop_ratio > 0:
            focus = (cls, self.rcs.min_crop_pixels)
        return self.pipeline(item[0], item[1], rng, focus=focus)

    def __repr__(self) -> str:
        return (f"TrainingStream({self.files!r}, {self.pipeline!r}, seed={self.seed}, "
                f"rcs={'on' if self.rcs else 'off'})")


class StreamSampler(Sampler[int]):
    """Stream positions for one rank: step s = start, start + 1, ... gives the B positions
    s * B * world_size + rank * B + j, j < B (B = ``batch_size`` per rank).

    Give it to ``DataLoader(stream, batch_size=B, sampler=...)``: each batch is one step, ranks
    are disjoint and together cover what one rank with batch B * world_size would, and a run
    resumed at step ``start`` sees exactly the data an unbroken one would. Infinite unless
    ``steps`` is given: stop the loop yourself (``len()`` is then a TypeError).
    """

    def __init__(self, start: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 steps: int | None = None):
        super().__init__()
        if start < 0 or batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"StreamSampler needs start >= 0, batch_size >= 1 and "
                             f"0 <= rank < world_size, got start={start}, "
                             f"batch_size={batch_size}, rank={rank}, world_size={world_size}")
        if steps is not None and steps < 0:
            raise ValueError(f"steps must be >= 0 or None (infinite), got {steps}")
        self.start, self.batch_size, self.rank, self.world_size = start, batch_size, rank, \
            world_size
        self.steps = steps

    def positions(self, step: int) -> range:
        """The stream positions of this rank at ``step``."""
        first = (step * self.world_size + self.rank) * self.batch_size
        return range(first, first + self.batch_size)

    def __iter__(self) -> Iterator[int]:
        step = self.start
        while self.steps is None or step < self.start + self.steps:
            yield from self.positions(step)
            step += 1

    def __len__(self) -> int:
        if self.steps is None:
            raise TypeError("an infinite StreamSampler has no length (pass steps=...)")
        return self.steps * self.batch_size


# ----------------------------------------------------------------------------------------------
# Benchmark
# ----------------------------------------------------------------------------------------------
GTAV_SIZE: Size = (1052, 1914)


def write_synthetic_gtav(root: str | Path, n: int, size: Size = GTAV_SIZE, seed: int = 0,
                         noise: float = 3.0) -> Path:
    """Write ``n`` GTAV-layout PNG pairs of ``size`` (H, W) under ``root``: ToyWorld scenes
    (``export_toyworld``) rendered at a quarter of the size, upscaled (image bilinear, label
    nearest, palettised label ids as GTAV ships) plus Gaussian noise of ``noise`` grey levels so
    that the lossless PNGs do not compress far better than photographs."""
    from PIL import Image

    from lessons import toyworld as tw
    from reprod.data.datasets import export_toyworld

    root = Path(root)
    h, w = size
    if n < 1 or h < 1 or w < 1:
        raise ValueError(f"synthetic GTAV: need n >= 1 and a positive size, got n={n}, {size}")
    render = tuple(int(min(max(math.ceil(s / 4), tw.MIN_SIZE), tw.MAX_SIZE)) for s in size)
    manifest = export_toyworld(root, "gtav", ["all"], length=n, size=render, seed=seed)
    rng = np.random.default_rng(seed)
    for rel in manifest["parts"]["all"]["files"]:
        path = root / rel
        with Image.open(path) as im:
            if rel.startswith("images/"):
                big = np.asarray(im.convert("RGB").resize((w, h), Image.BILINEAR), np.float32)
                big = np.clip(big + rng.normal(0.0, noise, big.shape), 0, 255)
                Image.fromarray(big.astype(np.uint8)).save(path)
            else:
                im.resize((w, h), Image.NEAREST).save(path)            # keeps the palette
    return root


def _parse_size(text: str) -> Size:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--size takes WxH, e.g. 1914x1052, got {text!r}") from None
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError(f"--size must be positive, got {text!r}")
    return h, w


def _one_process_costs(stream: TrainingStream, count: int) -> tuple[float, float]:
    """Mean milliseconds of decoding an item and of running the pipeline on it, in-process."""
    decode = augment = 0.0
    for p in range(count):
        index, cls = stream.source(p)
        t0 = time.perf_counter()
        item = stream.files[index]
        t1 = time.perf_counter()
        focus = (cls, stream.rcs.min_crop_pixels) if cls is not None else None
        stream.pipeline(item[0], item[1], np.random.default_rng((stream.seed, p, 1)), focus)
        t2 = time.perf_counter()
        decode, augment = decode + t1 - t0, augment + t2 - t1
    return 1000 * decode / count, 1000 * augment / count


def measure(stream: TrainingStream, workers: int, batch: int, seconds: float
            ) -> tuple[int, float, float]:
    """Images through a DataLoader in ``seconds`` after the first batch: (images, elapsed,
    seconds to the first batch, which includes starting the workers)."""
    loader = DataLoader(stream, batch_size=batch, sampler=StreamSampler(0, batch),
                        num_workers=workers)
    start = time.perf_counter()
    batches = iter(loader)
    next(batches)
    first = time.perf_counter() - start
    images, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        images += len(next(batches)[0])
    return images, time.perf_counter() - t0, first


def bench(args: argparse.Namespace) -> int:
    """The ``bench`` command: print images/s of decode + pipeline through a DataLoader."""
    from lessons.utils import hardware
    from reprod.data.datasets import build_dataset
    from reprod.prepare_data import class_stats, write_stats

    if args.workers < 0 or args.batch < 1 or args.seconds <= 0:
        raise ValueError("need --workers >= 0, --batch >= 1 and --seconds > 0")
    with tempfile.TemporaryDirectory(prefix="bench_gtav_") as tmp:
        if args.synthetic:
            t0 = time.perf_counter()
            root = write_synthetic_gtav(Path(tmp) / "gta", args.synthetic, args.size, args.seed)
            files = build_dataset("gtav", root, "all")
            mb = np.mean([s.image.stat().st_size for s in files.samples]) / 1e6
            print(f"data: {len(files)} synthetic GTAV PNG images {args.size[1]}x{args.size[0]} "
                  f"(mean {mb:.2f} MB) written in {time.perf_counter() - t0:.1f} s")
        else:
            if args.root is None:
                raise ValueError("give --root DIR (with --dataset) or --synthetic N")
            root = args.root
            files = build_dataset(args.dataset, root, args.split, labels=args.labels)
            print(f"data: {files!r}")
        rcs = None
        if args.rcs:
            stats_dir = args.stats or root
            if args.synthetic:
                write_stats(class_stats([files]), stats_dir, args.min_pixels)
            rcs = RareClassSampler.from_stats(stats_dir, args.min_pixels)
        pipeline = TrainPipeline(PipelineConfig(kind=args.pipeline, crop=args.crop))
        stream = TrainingStream(files, pipeline, args.seed, rcs)
        print(f"hardware: {hardware()}")
        print(f"pipeline: {args.pipeline}, crop {args.crop}, rcs "
              f"{'on' if rcs else 'off'}; {pipeline.config.to_dict()}")
        dec, aug = _one_process_costs(stream, min(4, len(files)))
        print(f"one process, per image: decode {dec:.1f} ms + pipeline {aug:.1f} ms")
        images, elapsed, first = measure(stream, args.workers, args.batch, args.seconds)
        rate = images / elapsed
        per = rate / max(args.workers, 1)
        who = f"{args.workers} workers" if args.workers else "the main process (workers 0)"
        print(f"DataLoader, {who}, batch {args.batch}: {images} images in {elapsed:.1f} s "
              f"(first batch after {first:.1f} s, not counted)")
        print(f"RESULT {args.pipeline}{' +rcs' if rcs else ''} workers {args.workers}: "
              f"{rate:.2f} images/s, {per:.2f} images/s per core")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m reprod.data.pipelines",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("bench", help="augmented images per second (decode + pipeline)")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--root", type=Path, help="a dataset root")
    data.add_argument("--synthetic", type=int, metavar="N",
                      help="write N GTAV-size scenes into a temporary GTAV tree")
    p.add_argument("--dataset", default="gtav", help="reader of --root (default gtav)")
    p.add_argument("--split", default="all", help="split of --root (default all)")
    p.add_argument("--labels", default=None, help="label format of --root")
    p.add_argument("--size", type=_parse_size, default=GTAV_SIZE, metavar="WxH",
                   help="synthetic image size (default 1914x1052, GTAV's)")
    p.add_argument("--pipeline", choices=PIPELINE_KINDS, default="rein")
    p.add_argument("--crop", type=int, default=512)
    p.add_argument("--rcs", action="store_true", help="rare-class sampling (tqdm / MFuser)")
    p.add_argument("--stats", type=Path, default=None,
                   help="folder of the RCS stats (default: the dataset root)")
    p.add_argument("--min-pixels", type=int, default=3000, help="RCS min_pixels")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: main process)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seconds", type=float, default=10.0, help="measuring time")
    p.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (2 with a message for bad data or settings)."""
    args = _parser().parse_args(argv)
    try:
        return bench(args)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
