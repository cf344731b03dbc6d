"""Evaluation as the papers run it: test-time resize, sliding window, mIoU per target, a report.

The DGSS papers score a trained model on each target's validation set with mmsegmentation's test
pipeline. What the official code calls each piece, and where it is here:

- ``Resize(scale, keep_ratio=True)`` (mmseg 1.x, Rein) / ``MultiScaleFlipAug(img_scale,
  keep_ratio=True)`` without flip (mmseg 0.x, tqdm, MFuser): the image is rescaled by
  ``f = min(max(scale) / long_side, min(scale) / short_side)`` to ``int(x * f + 0.5)`` (mmcv's
  ``rescale_size``; cv2 bilinear on uint8, so the resized image is uint8 again). Only the image:
  labels are loaded after the resize. -> :func:`rescale_size`, :class:`Protocol`.
- ``test_cfg=dict(mode='slide', crop_size=(512, 512), stride=(341, 341))``: the segmentor's
  ``slide_inference`` averages the scores of overlapping crops, clamping the last window to the
  border (an image smaller than the crop is one window of its own size; nothing is padded);
  1024-crop configs use stride 683. -> :func:`lessons.mask2former.slide_inference`.
- ``postprocess_result`` / ``rescale=True``: the averaged scores are resized (bilinear,
  ``align_corners=False``) to ``ori_shape``, the image size as loaded, then argmax.
  -> :func:`predict_image`.
- ``IoUMetric`` (mmseg 1.x) / ``eval_metrics`` (0.x): one confusion matrix over the whole set,
  19 classes, ignore 255; a class absent from ground truth and prediction has no IoU and is left
  out of the mean. Rein's ``DGIoUMetric`` adds ``mean_mIoU``, the unweighted mean over the targets.
  -> :func:`evaluate_dataset`, :func:`evaluate_targets` (with :mod:`lessons.metrics`).
- ``tools/convert_datasets/mapillary_resize.py`` (Rein): the Mapillary validation images and
  labels are halved *on disk* once (PIL: bicubic for images, nearest for labels, to
  ``(W // 2, H // 2)``), so Rein's Mapillary mIoU is computed at half-resolution labels. We halve
  on the fly, with the same PIL calls (-> :func:`halve_mapillary`); the official halved images
  are then saved as JPEG at PIL's default quality 75, a re-compression we do not repeat.
- ``tools/test.py --aug-test`` (mmseg 0.x, which tqdm ships): ``MultiScaleFlipAug`` with
  ``img_ratios`` 0.5 ... 1.75 and flip, softmax scores averaged. Off unless asked for (none of the
  papers' tables uses it). -> :class:`TTA`, ``tta=`` of :func:`evaluate_targets`.

The protocols (:data:`PROTOCOLS`): Rein's test pipelines (w1oves/Rein@7da85bc
``configs/_base_/datasets/*_512x512.py``, ``rein/dg_metrics.py``) and tqdm's, which MFuser keeps
(``configs/_base_/datasets/*-512.py`` of ByeongHyunPak/tqdm@75168af and devinxzhang/MFuser@cd8ef85).
The two are not like-for-like (Rein's issue #68: its 64.3 rises to 66.09 at tqdm's Cityscapes
size): pick one and state it.

- ``rein``: Rein's configs (also the Rein-family baselines and QueryDiff, which inherits them).
  Cityscapes at (1024, 512), i.e. halved; BDD100K (1280, 720); Mapillary pre-halved, then fitted
  into (1024, 512); GTAV (1280, 720); ACDC (1920, 1080). ``rein_citys2acdc`` is Rein's
  Cityscapes -> ACDC config: 1024 crops, stride 683, Cityscapes at (2048, 1024).
- ``tqdm``: tqdm's full-resolution protocol, also MFuser's: Cityscapes (2048, 1024); BDD100K
  (1280, 720); Mapillary fitted to (2048, 1024) with full-resolution labels. ACDC (1920, 1080) and
  GTAV (1280, 720) are ours: neither tqdm nor MFuser ships a config for them.

Every target's :class:`TargetSpec` names its source (or says it is ours).

Images: uint8 (3, H, W) RGB as :mod:`reprod.data.datasets` gives them; they reach the model as float
in [0, 1] (each model normalises inside, :func:`lessons.train.predict`). mIoU and per-class IoU
are reported in percent, as the papers print them.

Dimension glossary: B batch (always 1 here: images differ in size), K classes (19), H W the image
or label size as loaded (halved for Rein's Mapillary), h w the test size after the resize.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from lessons.classes import CLASSES, IGNORE_INDEX, NUM_CLASSES
from lessons.mask2former import slide_inference
from lessons.metrics import ConfusionMatrix, mean_iou, per_class_iou
from lessons.papers import Table, get_table, load_paper_results
from lessons.train import predict, resize_to
from lessons.utils import get_device, hardware
from reprod.data.datasets import ACDC_CONDITIONS
from reprod.safe_io import atomic_write_text

__all__ = [
    "PROTOCOLS",
    "TTA",
    "Protocol",
    "TargetResult",
    "TargetSpec",
    "evaluate_dataset",
    "evaluate_targets",
    "get_protocol",
    "halve_image",
    "halve_label",
    "halve_mapillary",
    "halved_size",
    "paper_row",
    "predict_image",
    "report_markdown",
    "rescale_size",
    "run_info",
    "write_report",
]

# ----------------------------------------------------------------------------------------------
# Protocols
# ----------------------------------------------------------------------------------------------


def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv's keep-ratio ``rescale_size``: the (h, w) an (H, W) image is resized to.

    ``f = min(max(scale) / max(H, W), min(scale) / min(H, W))`` and each side becomes
    ``int(side * f + 0.5)``: the image fits into ``scale`` (either orientation), up or down.
    """
    if min(height, width) < 1:
        raise ValueError(f"image size must be positive, got {height}x{width} (HxW)")
    if len(scale) != 2 or min(scale) < 1:
        raise ValueError(f"scale must be two positive sides, got {scale}")
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def halved_size(height: int, width: int) -> tuple[int, int]:
    """The size Rein's ``mapillary_resize.py`` halves to: ``(H // 2, W // 2)``."""
    if min(height, width) < 2:
        raise ValueError(f"cannot halve a {height}x{width} (HxW) image")
    return height // 2, width // 2


@dataclass(frozen=True)
class TargetSpec:
    """The test-time settings of one target dataset.

    ``scale`` is the config's ``(long, short)`` pair (mmseg writes (w, h); keep-ratio makes the
    order irrelevant). ``halve``: image and label are halved first (Rein's Mapillary).
    ``source`` is where the value comes from; ``ours`` marks a value no official config gives.
    """

    scale: tuple[int, int]
    source: str
    halve: bool = False
    ours: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"scale": list(self.scale), "halve": self.halve, "source": self.source,
                "ours": self.ours}


@dataclass(frozen=True)
class Protocol:
    """A paper's evaluation protocol: sliding-window crop and stride, and a spec per target.

    ACDC's conditions (fog, night, rain, snow) are accepted as target names and use ACDC's spec,
    so per-condition results line up with the papers' per-condition columns.
    """

    name: str
    crop: int
    stride: int
    targets: Mapping[str, TargetSpec]
    description: str

    def __post_init__(self) -> None:
        if self.crop < 1 or self.stride < 1 or self.stride > self.crop:
            raise ValueError(f"protocol {self.name!r}: need 1 <= stride <= crop, got crop "
                             f"{self.crop}, stride {self.stride}")
        if not self.targets:
            raise ValueError(f"protocol {self.name!r} has no targets")

    def target_names(self) -> tuple[str, ...]:
        """The accepted target names: the specs' keys, plus ACDC's conditions when ACDC is in."""
        return tuple(self.targets) + (ACDC_CONDITIONS if "acdc" in self.targets else ())

    def spec(self, target: str) -> TargetSpec:
        """The spec of ``target``; a ValueError listing the accepted names otherwise."""
        key = "acdc" if target in ACDC_CONDITIONS else target
        if key not in self.targets:
            raise ValueError(f"protocol {self.name!r} has no target {target!r}; choose from "
                             f"{self.target_names()}")
        return self.targets[key]

    def label_size(self, height: int, width: int, target: str) -> tuple[int, int]:
        """The (H, W) at which mIoU is computed for a label of (height, width) on disk."""
        return halved_size(height, width) if self.spec(target).halve else (height, width)

    def test_size(self, height: int, width: int, target: str) -> tuple[int, int]:
        """The (h, w) the model sees for an image of (height, width) as loaded from disk."""
        return rescale_size(*self.label_size(height, width, target), self.spec(target).scale)

    def with_window(self, crop: int, stride: int | None = None) -> Protocol:
        """The same protocol with another sliding window; the default stride is
        ``round(2 * crop / 3)``, which gives the configs' 341 for 512 and 683 for 1024."""
        stride = round(2 * crop / 3) if stride is None else stride
        return replace(self, crop=crop, stride=stride, description=(
            f"{self.description} [window changed to {crop}, stride {stride}]"))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "crop": self.crop, "stride": self.stride,
                "description": self.description,
                "targets": {k: v.to_dict() for k, v in self.targets.items()}}


_REIN = "w1oves/Rein@7da85bc configs/_base_/datasets/*_512x512.py"
_REIN_ACDC = "w1oves/Rein@7da85bc configs/_base_/datasets/dg_citys2acdc_1024x1024.py"
_TQDM = ("ByeongHyunPak/tqdm@75168af and devinxzhang/MFuser@cd8ef85 "
         "configs/_base_/datasets/*-512.py")

PROTOCOLS: dict[str, Protocol] = {
    "rein": Protocol(
        name="rein", crop=512, stride=341,
        description=("Rein's configs: sliding window 512 stride 341; Cityscapes at 1024x512, "
                     "BDD100K 1280x720, Mapillary halved (half-resolution labels; on the fly "
                     "here, on disk officially) then fitted to 1024x512"),
        targets={
            "cityscapes": TargetSpec((1024, 512), f"{_REIN} (Cityscapes halved)"),
            "bdd100k": TargetSpec((1280, 720), f"{_REIN} (native size)"),
            "mapillary": TargetSpec((1024, 512),
                                    f"{_REIN}; tools/convert_datasets/mapillary_resize.py",
                                    halve=True),
            "gtav": TargetSpec((1280, 720), "FanLiHub/QueryDiff@c4cae29 "
                               "configs/_base_/datasets/gta_512x512.py (Rein's dataset "
                               "configs as QueryDiff ships them)"),
            "acdc": TargetSpec((1920, 1080), f"{_REIN_ACDC} (native size)"),
        }),
    "rein_citys2acdc": Protocol(
        name="rein_citys2acdc", crop=1024, stride=683,
        description=("Rein's Cityscapes -> ACDC config: sliding window 1024 stride 683; "
                     "Cityscapes at 2048x1024, ACDC at 1920x1080"),
        targets={
            "cityscapes": TargetSpec((2048, 1024), f"{_REIN_ACDC}"),
            "acdc": TargetSpec((1920, 1080), f"{_REIN_ACDC}"),
        }),
    "tqdm": Protocol(
        name="tqdm", crop=512, stride=341,
        description=("tqdm / MFuser full resolution: sliding window 512 stride 341; Cityscapes "
                     "2048x1024, BDD100K 1280x720, Mapillary fitted to 2048x1024 with "
                     "full-resolution labels"),
        targets={
            "cityscapes": TargetSpec((2048, 1024), f"{_TQDM} (native size, 3x6 windows)"),
            "bdd100k": TargetSpec((1280, 720), f"{_TQDM} (native size, 2x4 windows)"),
            "mapillary": TargetSpec((2048, 1024), _TQDM),
            "acdc": TargetSpec((1920, 1080), "ours: neither tqdm nor MFuser ships an ACDC "
                               "config (MFuser's Table 10 has none); native size, as Rein's",
                               ours=True),
            "gtav": TargetSpec((1280, 720), "ours: tqdm / MFuser never test on GTAV; Rein's "
                               "value", ours=True),
        }),
    "toy": Protocol(
        name="toy", crop=512, stride=341,
        description=("ToyWorld exported into the official layouts: every target at its own "
                     "64x128 size (one window); for laptop runs and tests, not a paper's"),
        targets={name: TargetSpec((128, 64), "ours: ToyWorld's native size", ours=True)
                 for name in ("cityscapes", "bdd100k", "mapillary", "gtav", "acdc")}),
}
"""The evaluation protocols by name: ``rein`` (also the Rein-family baselines' and QueryDiff's:
its released configs follow Rein's: FanLiHub/QueryDiff@c4cae29 ``configs/_base_/datasets/``),
``rein_citys2acdc`` and
``tqdm`` (tqdm's full-resolution protocol, also MFuser's); ``toy`` for ToyWorld exports."""


def get_protocol(protocol: str | Protocol) -> Protocol:
    """A protocol by name (or the protocol itself); a ValueError listing the names otherwise."""
    if isinstance(protocol, Protocol):
        return protocol
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {tuple(PROTOCOLS)}")
    return PROTOCOLS[protocol]


# ----------------------------------------------------------------------------------------------
# Half-size Mapillary (Rein)
# ----------------------------------------------------------------------------------------------


def _check_image(image: torch.Tensor, what: str = "image") -> None:
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{what} must be a (3, H, W) RGB tensor, got {shape}")
    if image.dtype != torch.uint8:
        raise ValueError(f"{what} must be uint8 in 0..255 as the reprod.data.datasets readers give "
                         f"it, got dtype {image.dtype} (a float [0, 1] image: (x * 255).round()"
                         ".to(torch.uint8))")


def _check_label(label: torch.Tensor, size: tuple[int, int] | None, what: str = "label") -> None:
    if not isinstance(label, torch.Tensor) or label.dim() != 2:
        shape = tuple(label.shape) if isinstance(label, torch.Tensor) else type(label).__name__
        raise ValueError(f"{what} must be an (H, W) tensor of trainIds, got {shape}")
    if size is not None and tuple(label.shape) != tuple(size):
        raise ValueError(f"{what} is {tuple(label.shape)} but its image is {tuple(size)} (HxW)")
    if label.is_floating_point():
        raise ValueError(f"{what} must hold integer trainIds, got dtype {label.dtype}")


def halve_image(image: torch.Tensor) -> torch.Tensor:
    """Rein's on-disk halving of a Mapillary image: PIL bicubic to (H // 2, W // 2), uint8."""
    _check_image(image)
    h, w = halved_size(*image.shape[-2:])
    pil = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
    out = np.asarray(pil.resize((w, h), resample=Image.BICUBIC))
    return torch.from_numpy(out.copy()).permute(2, 0, 1).contiguous()        # (3, H/2, W/2)


def halve_label(label: torch.Tensor) -> torch.Tensor:
    """Rein's on-disk halving of a Mapillary label: PIL nearest to (H // 2, W // 2), int64."""
    _check_label(label, None)
    if label.numel() and (int(label.min()) < 0 or int(label.max()) > 255):
        raise ValueError(f"label values must lie in 0..255 (trainIds, 255 = ignore), got "
                         f"{int(label.min())}..{int(label.max())}")
    h, w = halved_size(*label.shape)
    pil = Image.fromarray(label.cpu().numpy().astype(np.uint8))
    out = np.asarray(pil.resize((w, h), resample=Image.NEAREST))
    return torch.from_numpy(out.astype(np.int64))                             # (H/2, W/2)


def halve_mapillary(image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image (bicubic) and label (nearest) halved as Rein's ``mapillary_resize.py`` does on disk
    (we do it on the fly; the official halved JPEGs are also re-compressed, which we skip)."""
    _check_image(image)
    _check_label(label, tuple(image.shape[-2:]))
    return halve_image(image), halve_label(label)


# ----------------------------------------------------------------------------------------------
# Prediction
# ----------------------------------------------------------------------------------------------


def _model_placement(model: nn.Module, device: str | torch.device | None
                     ) -> tuple[torch.device, torch.dtype]:
    """The device to run on (the model's own unless given) and the dtype its inputs need."""
    tensors = [*model.parameters(), *model.buffers()]
    floats = [t for t in tensors if t.is_floating_point()]
    dtype = floats[0].dtype if floats else torch.float32
    if device is None:
        return (tensors[0].device if tensors else get_device()), dtype
    device = torch.device(device)
    where = {t.device for t in tensors}
    if where and all(d.type != device.type for d in where):
        raise ValueError(f"the model is on {sorted(map(str, where))} but device={device} was "
                         "asked for: move it first (model.to(device))")
    return device, dtype


def _resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (3, H, W) -> float (1, 3, h, w) in 0..255: bilinear, rounded back to integers as
    mmcv's cv2 resize of a uint8 image is."""
    x = image[None].float()                                                   # (1, 3, H, W)
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x.round_().clamp_(0, 255)                                          # (1, 3, h, w)


def _predict_scores(model: nn.Module, image: torch.Tensor, protocol: Protocol, spec: TargetSpec,
                    device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Resize, slide, resize back: uint8 (3, H, W) (already halved if the spec says so) ->
    float32 scores (K, H, W)."""
    size = tuple(image.shape[-2:])
    x = _resize_image(image.to(device), rescale_size(*size, spec.scale)) / 255  # (1, 3, h, w)

    def crop_scores(crop: torch.Tensor) -> torch.Tensor:                     # (1, 3, c, c)
        out = predict(model, crop.to(dtype))
        if out.dim() != 4:
            raise ValueError(f"the model returned scores of shape {tuple(out.shape)}; expected "
                             "(B, K, h, w)")
        return out.float()                                                    # (1, K, c, c)

    scores = slide_inference(crop_scores, x, protocol.crop, protocol.stride, NUM_CLASSES)
    return resize_to(scores, size)[0]                                         # (K, H, W)


def _tta_scores(model: nn.Module, image: torch.Tensor, protocol: Protocol, spec: TargetSpec,
                device: torch.device, dtype: torch.dtype, tta: TTA) -> torch.Tensor:
    """mmseg's ``aug_test`` under a protocol: per ratio the target's scale times the ratio
    (``MultiScaleFlipAug``: ``int(side * ratio)``), each view also flipped; per view the
    protocol's keep-ratio resize, sliding window and scores back to the image size; the softmax
    probabilities averaged: uint8 (3, H, W) -> float32 (K, H, W)."""
    total, n = None, 0
    for ratio in tta.scales:
        view = replace(spec, scale=tuple(max(1, int(side * ratio)) for side in spec.scale))
        for flipped in ((False, True) if tta.flip else (False,)):
            x = image.flip(-1) if flipped else image
            probs = _predict_scores(model, x, protocol, view, device, dtype).softmax(0)
            probs = probs.flip(-1) if flipped else probs                       # (K, H, W)
            total = probs if total is None else total.add_(probs)
            n += 1
    return total / n


@torch.no_grad()
def predict_image(model: nn.Module, image: torch.Tensor, protocol: str | Protocol, target: str,
                  device: str | torch.device | None = None, tta: TTA | None = None
                  ) -> torch.Tensor:
    """Class scores (K, H, W) of one uint8 image (3, H, W) as ``protocol`` tests on ``target``.

    The image is halved first where the protocol does (Rein's Mapillary: the scores are then at
    the halved size, where Rein's mIoU is computed), resized keep-ratio into the target's scale,
    scored by a sliding window (``protocol.crop`` / ``.stride``) and the scores resized back.
    With ``tta`` the result is the mean softmax probability over its views (each ratio scales
    the target's test scale; :class:`TTA`). The model's mode is left as it is (call
    ``model.eval()`` first).
    """
    protocol = get_protocol(protocol)
    spec = protocol.spec(target)
    _check_image(image)
    if spec.halve:
        image = halve_image(image)
    device, dtype = _model_placement(model, device)
    if tta is not None:
        return _tta_scores(model, image, protocol, spec, device, dtype, tta)
    return _predict_scores(model, image, protocol, spec, device, dtype)


@dataclass(frozen=True)
class TTA:
    """Test-time augmentation: the image at several scales, each also flipped, scored, resized
    back and averaged as softmax probabilities.

    The scales are mmsegmentation 0.x's ``--aug-test`` ones (``tools/test.py`` sets
    ``img_ratios = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]`` and ``flip = True``; tqdm ships that
    script). Under a protocol (``tta=`` of :func:`predict_image`, :func:`evaluate_dataset`,
    :func:`evaluate_targets`) a ratio scales the target's test scale, as ``MultiScaleFlipAug``
    scales ``img_scale``; each view then gets the protocol's keep-ratio resize and sliding
    window over the whole image. (Rescaling the image itself first would be undone by that
    keep-ratio resize.) :meth:`apply` rescales the image itself, for a score function that keeps
    the size it is given. Off by default: none of the papers' tables uses it.
    """

    scales: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    flip: bool = True

    def __post_init__(self) -> None:
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"TTA needs one or more positive scales, got {self.scales}")

    def apply(self, score, image: torch.Tensor) -> torch.Tensor:
        """``score(image (3, h, w) uint8) -> (K, h, w)`` under every view of ``image`` (3, H, W);
        the mean probabilities (K, H, W)."""
        _check_image(image)
        H, W = image.shape[-2:]
        total, n = None, 0
        for s in self.scales:
            size = (max(1, int(H * s + 0.5)), max(1, int(W * s + 0.5)))
            scaled = image if size == (H, W) else _resize_image(image, size)[0].to(torch.uint8)
            for flipped in ((False, True) if self.flip else (False,)):
                view = scaled.flip(-1) if flipped else scaled
                probs = score(view).float().softmax(0)                  # (K, h, w)
                probs = probs.flip(-1) if flipped else probs
                probs = F.interpolate(probs[None], size=(H, W), mode="bilinear",
                                      align_corners=False)[0]
                total = probs if total is None else total + probs
                n += 1
        return total / n

    def to_dict(self) -> dict[str, Any]:
        return {"scales": list(self.scales), "flip": self.flip}


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


@dataclass
class TargetResult:
    """One target's evaluation. ``miou`` and ``per_class_iou`` are in percent; a class absent
    from both ground truth and prediction is None (and not in the mean). ``images`` were
    evaluated out of ``dataset_size``: fewer means a subset (``max_images``)."""

    target: str
    protocol: str
    images: int
    dataset_size: int
    confusion: torch.Tensor                      # (K, K) int64, rows ground truth
    per_class_iou: dict[str, float | None]
    miou: float
    seconds: float
    spec: TargetSpec | None = None
    tta: TTA | None = None                       # test-time augmentation, when it was on

    @property
    def subset(self) -> bool:
        return self.images < self.dataset_size

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN becomes None), without the confusion matrix."""
        return {"miou": _finite(self.miou), "per_class_iou": dict(self.per_class_iou),
                "images": self.images, "dataset_size": self.dataset_size,
                "subset": self.subset, "seconds": round(self.seconds, 3),
                "settings": self.spec.to_dict() if self.spec else None,
                "tta": self.tta.to_dict() if self.tta else None}


def _finite(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def _percent_ious(confusion: torch.Tensor) -> dict[str, float | None]:
    iou = per_class_iou(confusion).tolist()                                   # (K,)
    return {name: _finite(100 * v) for name, v in zip(CLASSES, iou, strict=True)}


def _unpack(item: Any, index: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(image, label[, name]) -> (image, label, name) with tensors."""
    if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
        raise ValueError(f"dataset item {index} must be (image, label) or (image, label, name), "
                         f"got {type(item).__name__}")
    image, label = (torch.as_tensor(x) for x in item[:2])
    name = str(item[2]) if len(item) == 3 else f"item {index}"
    _check_image(image, f"image of {name}")
    _check_label(label, tuple(image.shape[-2:]), f"label of {name}")
    return image, label, name


def _subset_indices(size: int, max_images: int | None) -> list[int]:
    """Every image, or ``max_images`` spread evenly over the set (deterministic)."""
    if max_images is None or max_images >= size:
        return list(range(size))
    if max_images < 1:
        raise ValueError(f"max_images must be >= 1 (or None for the whole set), got {max_images}")
    return [i * size // max_images for i in range(max_images)]


def _loader(dataset: Dataset, indices: list[int], num_workers: int) -> DataLoader:
    """Items one by one, unbatched (images differ in size)."""
    return DataLoader(Subset(dataset, indices), batch_size=None, shuffle=False,
                      num_workers=num_workers)


@torch.no_grad()
def evaluate_dataset(model: nn.Module, dataset: Dataset, protocol: str | Protocol, target: str,
                     device: str | torch.device | None = None, max_images: int | None = None,
                     progress: bool = False, num_workers: int = 0, tta: TTA | None = None
                     ) -> TargetResult:
    """mIoU of ``model`` on ``dataset`` (items ``(uint8 image (3, H, W), label (H, W)[, name])``)
    as ``protocol`` tests on ``target``; one confusion matrix over all images, batch size 1.

    Runs under ``no_grad`` in eval mode and restores the model's mode afterwards. ``max_images``
    evaluates that many images spread evenly over the set (a subset: the result says so).
    ``tta``: test-time augmentation around each image's prediction (:class:`TTA`; the result
    records it).
    """
    protocol = get_protocol(protocol)
    spec = protocol.spec(target)
    size = len(dataset)
    if size == 0:
        raise ValueError(f"the {target} dataset is empty")
    indices = _subset_indices(size, max_images)
    device, dtype = _model_placement(model, device)
    matrix = ConfusionMatrix(NUM_CLASSES, IGNORE_INDEX)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        bar = {} if progress else {"disable": True}
        items = _loader(dataset, indices, num_workers)
        for i, item in enumerate(tqdm(items, desc=f"{target} ({protocol.name})", leave=False,
                                      total=len(indices), **bar)):
            image, label, _ = _unpack(item, indices[i])
            if spec.halve:
                image, label = halve_mapillary(image, label)
            if tta is None:
                scores = _predict_scores(model, image, protocol, spec, device, dtype)  # (K, H, W)
            else:
                scores = _tta_scores(model, image, protocol, spec, device, dtype, tta)
            matrix.update(scores.argmax(0), label.to(scores.device))
    finally:
        model.train(was_training)
    confusion = matrix.matrix                                                 # (K, K)
    return TargetResult(target=target, protocol=protocol.name, images=len(indices),
                        dataset_size=size, confusion=confusion,
                        per_class_iou=_percent_ious(confusion),
                        miou=100 * mean_iou(confusion), seconds=time.perf_counter() - start,
                        spec=spec, tta=tta)


def evaluate_targets(model: nn.Module, datasets: Mapping[str, Dataset], protocol: str | Protocol,
                     device: str | torch.device | None = None, max_images: int | None = None,
                     progress: bool = False, num_workers: int = 0, tta: TTA | None = None
                     ) -> dict[str, Any]:
    """Every target of ``datasets`` (keyed by target name) under ``protocol``.

    Returns ``{"protocol": name, "settings": Protocol, "targets": {target: TargetResult},
    "mean": mIoU %, "tta": TTA or None}``; ``mean`` is the unweighted mean over the targets
    (Rein's ``DGIoUMetric`` ``mean_mIoU``). Target names are checked before anything is
    evaluated. ``tta``: test-time augmentation (:class:`TTA`; off by default, as the papers).
    """
    protocol = get_protocol(protocol)
    if not datasets:
        raise ValueError("no target datasets to evaluate")
    for target in datasets:
        protocol.spec(target)
    results = {target: evaluate_dataset(model, ds, protocol, target, device, max_images,
                                        progress, num_workers, tta)
               for target, ds in datasets.items()}
    mean = sum(r.miou for r in results.values()) / len(results)
    return {"protocol": protocol.name, "settings": protocol, "targets": results, "mean": mean,
            "tta": tta}


# ----------------------------------------------------------------------------------------------
# Paper numbers and the report
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _paper_tables() -> tuple[Table, ...]:
    """The shipped paper results, loaded once per process."""
    return tuple(load_paper_results())


def paper_row(table_id: str, method: str, backbone: str | None) -> dict[str, float | None]:
    """A published row of ``lessons/papers.yaml``: ``{column: mIoU or None}``.

    ``method`` and ``backbone`` match case-insensitively (``backbone=None`` matches a row without
    one); an unknown table is a KeyError, a missing row a ValueError listing the table's rows.
    """
    table = get_table(table_id, list(_paper_tables()))

    def same(a: str | None, b: str | None) -> bool:
        return (a or "").casefold() == (b or "").casefold()

    rows = [r for r in table.rows if same(r.method, method) and same(r.backbone, backbone)]
    if len(rows) != 1:
        listing = "\n".join(f"  {r.method} / {r.backbone}" for r in table.rows)
        what = "no row" if not rows else f"{len(rows)} rows"
        raise ValueError(f"table {table_id!r} has {what} for method {method!r}, backbone "
                         f"{backbone!r}; its rows (method / backbone):\n{listing}")
    return dict(rows[0].values)


def run_info(device: str | torch.device | None = None) -> dict[str, Any]:
    """Date, versions and hardware, for a report's ``extra``."""
    device = torch.device(device) if device is not None else get_device()
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "hardware": hardware(device), "device": str(device), "python": sys.version.split()[0],
            "torch": torch.__version__, "platform": platform.platform()}


def _comparison(targets: Mapping[str, dict], mean: float | None,
                paper: Mapping[str, float | None] | None) -> dict[str, dict]:
    """Ours vs paper per target and for the mean; the mean only when the target sets agree."""
    paper = dict(paper or {})
    rows = {}
    for name, t in targets.items():
        theirs = paper.get(name)
        rows[name] = {"ours": t["miou"], "paper": theirs,
                      "delta": None if theirs is None or t["miou"] is None else t["miou"] - theirs,
                      "subset": t["subset"]}
    paper_targets = {k for k in paper if k != "mean"}
    comparable = paper_targets == set(targets)
    theirs = paper.get("mean")
    rows["mean"] = {"ours": mean, "paper": theirs,
                    "delta": (mean - theirs) if comparable and None not in (mean, theirs)
                    else None,
                    "subset": any(t["subset"] for t in targets.values()),
                    "paper_over": sorted(paper_targets), "comparable": comparable}
    return rows


def write_report(results: Mapping[str, Any], out_dir: str | Path, *, experiment: str,
                 protocol: str | Protocol, paper: Mapping[str, float | None] | None = None,
                 extra: Mapping[str, Any] | None = None, paper_label: str | None = None
                 ) -> tuple[Path, Path]:
    """Write ``results.json`` and ``results.md`` into ``out_dir`` (atomically, the JSON last);
    returns their paths.

    The JSON holds the protocol, the test-time augmentation (``tta``: its scales and flip, or
    None when off), per target mIoU, per-class IoU, images (of the set's size), seconds and
    settings, the mean, the paper row and the comparison, ``extra``, and last the confusion
    matrices (rows ground truth, columns prediction).

    ``results`` is :func:`evaluate_targets`' output; ``paper`` a :func:`paper_row` dict (or None);
    ``extra`` anything to record (checkpoint, hardware, date, versions: see :func:`run_info`);
    ``paper_label`` names the paper row (e.g. "Rein DINOv2-L, rein_gtav_main"). ``protocol``
    must be the one the results were measured under (pass the :class:`Protocol` itself when its
    window was changed).
    """
    proto = get_protocol(protocol)
    if results.get("protocol", proto.name) != proto.name:
        raise ValueError(f"results were measured under protocol {results['protocol']!r}, not "
                         f"{proto.name!r}")
    measured = results.get("settings", proto)
    if measured != proto:
        raise ValueError(f"results were measured with window {measured.crop} stride "
                         f"{measured.stride} (or other settings) than protocol {proto.name!r} "
                         f"has ({proto.crop}, {proto.stride}): pass that Protocol itself")
    targets = {t: r.to_dict() for t, r in results["targets"].items()}
    mean = _finite(results.get("mean"))
    tta = results.get("tta")
    report = {"experiment": experiment, "protocol": proto.to_dict(),
              "tta": tta.to_dict() if tta is not None else None,
              "targets": targets, "mean": mean,
              "subset": any(t["subset"] for t in targets.values()),
              "paper": None if paper is None else {"label": paper_label, "values": dict(paper)},
              "comparison": _comparison(targets, mean, paper), "extra": dict(extra or {}),
              "confusion": {t: r.confusion.tolist() for t, r in results["targets"].items()}}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "results.json", out / "results.md"
    atomic_write_text(md_path, report_markdown(report))
    atomic_write_text(json_path, json.dumps(report, indent=1, default=str) + "\n")  # last:
    return json_path, md_path                            # reprod.train's "evaluated" mark


def _num(value: float | None, places: int = 2, sign: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.{places}f}" if sign else f"{value:.{places}f}"


def _subset_note(t: Mapping[str, Any]) -> str:
    return f"subset of {t['images']} of {t['dataset_size']} images" if t["subset"] else \
        f"{t['images']} images"


def _md_line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _header(report: Mapping[str, Any]) -> list[str]:
    extra, proto, targets = report["extra"], report["protocol"], report["targets"]
    measured = extra.get("hardware", "hardware not recorded")
    if "date" in extra:
        measured += f", {extra['date']}"
    lines = [f"# {report['experiment']}", "",
             f"- Protocol: `{proto['name']}`: {proto['description']} (window {proto['crop']}, "
             f"stride {proto['stride']})",
             f"- Measured on: {measured}",
             "- Images per target: " + ", ".join(f"{k} {_subset_note(t)}"
                                                 for k, t in targets.items())]
    tta = report.get("tta")
    if tta:
        scales = ", ".join(f"{s:g}" for s in tta["scales"])
        lines.append(f"- **Test-time augmentation**: on: scales {scales} of each target's test "
                     f"scale{', each also flipped' if tta['flip'] else ', no flip'}, softmax "
                     "averaged (mmseg's --aug-test); the papers test without it, so the deltas "
                     "are not like-for-like")
    ours = [f"{k} ({t['settings']['source']})" for k, t in targets.items()
            if t.get("settings") and t["settings"]["ours"]]
    if ours:
        lines.append("- Test scale chosen by us (no official config): " + "; ".join(ours))
    if report["subset"]:
        lines.append("- **Subset evaluation**: numbers marked *subset* use only part of a "
                     "validation set; they are not comparable to the papers' full-set numbers.")
    if report["paper"] is not None:
        lines.append(f"- Paper: {report['paper']['label'] or 'published row'}")
    return [*lines, ""]


def _comparison_table(report: Mapping[str, Any]) -> list[str]:
    lines = ["## mIoU (%): ours vs the paper", "",
             _md_line(["target", "ours", "paper", "delta", "images"]),
             _md_line(["---"] * 5)]
    paper = (report["paper"] or {}).get("values", {})
    for name, row in report["comparison"].items():
        if name == "mean":      # first the paper's targets we did not evaluate
            for other in (k for k in paper if k != "mean" and k not in report["targets"]):
                theirs = "-" if paper[other] is None else f"{paper[other]:g}"
                lines.append(_md_line([other, "not evaluated", theirs, "-", "-"]))
        mark = " (subset)" if row["subset"] else ""
        theirs = "-" if row["paper"] is None else f"{row['paper']:g}"
        if name == "mean":
            images = "mean over " + ", ".join(report["targets"])
            if row["paper"] is not None and not row["comparable"]:
                theirs += f" (over {', '.join(row['paper_over'])}: not comparable)"
        else:
            images = _subset_note(report["targets"][name])
        delta = _num(row["delta"], sign=True) + (mark if row["delta"] is not None else "")
        lines.append(_md_line([name, _num(row["ours"]) + mark, theirs, delta, images]))
    return [*lines, ""]


def _class_table(report: Mapping[str, Any]) -> list[str]:
    targets = report["targets"]
    names = [f"{k} (subset)" if t["subset"] else k for k, t in targets.items()]
    lines = ["## Per-class IoU (%)", "", "- = class absent from ground truth and prediction", "",
             _md_line(["class", *names]), _md_line(["---"] * (len(names) + 1))]
    for cls in CLASSES:
        lines.append(_md_line([cls, *(_num(t["per_class_iou"].get(cls)) for t in
                                      targets.values())]))
    lines.append(_md_line(["**mIoU**", *(_num(t["miou"]) for t in targets.values())]))
    return [*lines, ""]


def _extra_lines(report: Mapping[str, Any]) -> list[str]:
    shown = {"hardware", "date"}
    rest = {k: v for k, v in report["extra"].items() if k not in shown}
    if not rest:
        return []
    return ["## Run details", "", *(f"- {k}: {v}" for k, v in rest.items()), ""]


def report_markdown(report: Mapping[str, Any]) -> str:
    """The markdown of a ``results.json`` dict: what was measured, ours vs the paper per target
    and for the mean (with the delta), then per-class IoU (classes x targets)."""
    lines = [*_header(report), *_comparison_table(report), *_class_table(report),
             *_extra_lines(report)]
    return "\n".join(lines)

