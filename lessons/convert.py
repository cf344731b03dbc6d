"""Released checkpoints -> our state dicts: every official converter and their shared rules.

The official repositories publish trained weights in their frameworks' names; each converter here
maps them onto this package's modules by name and shape, and returns a
:class:`ConversionReport` that accounts for every key (converted, missing, unexpected,
mis-shaped, or someone else's):

- **Rein** (``w1oves/Rein``, mmseg 1.x / mmdet 3.x): :func:`convert_official_rein` (the Reins
  alone, ``backbone.reins.*``) and :func:`convert_official_rein_model` (Reins + Mask2Former
  head). Rein's checkpoints hold only ``backbone.reins.*`` and ``decode_head.*``: its backbone
  overrides ``state_dict`` to drop every frozen key (``rein/models/backbones/reins_dinov2.py``).
- **MFuser** (``devinxzhang/MFuser``, mmseg 0.16 / mmcv 1.x, tqdm's head):
  :func:`convert_official_mfuser`; its checkpoints hold everything, the frozen towers included,
  which come from their own pretrained files here.
- **CAT-Seg** (``cvlab-kaist/CAT-Seg``, detectron2): :func:`convert_official_catseg`.
- **tqdm** (``ByeongHyunPak/tqdm``, mmseg 0.16 / mmcv 1.x): :func:`convert_official_tqdm`; its
  checkpoints hold everything (the fine-tuned visual tower, the frozen text tower and the visual
  regulariser's frozen copy of the initial tower); the trained parts are converted. Unverified:
  no released tqdm file has been loaded yet.

The Mask2Former head has the same modules in both frameworks but two naming schemes, mmdet 3.x's
(Rein: ``self_attn`` / ``cross_attn`` / ``ffn.layers``) and mmcv 1.x's (tqdm and MFuser:
``attentions.k`` / ``ffns.0.layers``, plus tqdm's text cross-attention in the pixel decoder);
:func:`m2f_head_to_ours` holds the rules for both.

A report is ``verified`` only when the file's SHA-256 is in :data:`VERIFIED_CHECKPOINTS` (a
released file that was converted and checked by hand) and the conversion is clean; everything
else says "not yet verified on a released checkpoint".
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from lessons.catseg import CATSeg
    from lessons.mask2former import MaskFormerSegmentor
    from lessons.mfuser import MFuserSegmentor
    from lessons.rein import Reins

__all__ = [
    "CATSEG_AGGREGATOR",
    "CATSEG_CLIP",
    "NAMINGS",
    "OFFICIAL_PREFIX",
    "REIN_HEAD_PREFIX",
    "SOURCES",
    "TQDM_NOT_CONVERTED",
    "VERIFIED_CHECKPOINTS",
    "ConversionReport",
    "convert_official_catseg",
    "convert_official_mfuser",
    "convert_official_rein",
    "convert_official_rein_model",
    "convert_official_tqdm",
    "file_sha256",
    "load_official",
    "load_official_catseg",
    "load_official_mfuser",
    "load_official_rein",
    "load_official_rein_model",
    "load_official_tqdm",
    "m2f_head_to_ours",
    "official_mfuser_to_ours",
    "official_rein_head_to_ours",
    "official_tqdm_to_ours",
    "read_official_checkpoint",
]

VERIFIED_CHECKPOINTS: dict[str, str] = {}
"""SHA-256 of a released checkpoint file -> what it is, for files that converted with no missing,
unexpected or mis-shaped key and then reproduced their published number. Add a file only after
that check. Empty: no released file has been checked yet."""

SOURCES = {
    "rein": "the released Rein checkpoints are linked from the official README (w1oves/Rein)",
    "mfuser": "the released MFuser checkpoints are linked (Google Drive) from the official README "
              "(devinxzhang/MFuser)",
    "catseg": "the released CAT-Seg weights are in the Hugging Face repository "
              "hamacojr/CAT-Seg-weights (see the official README); download them on a machine "
              "with internet",
    "tqdm": "the released tqdm checkpoints (tqdm-eva02-clip-vit-l-gta, tqdm-eva02-clip-vit-l-city, "
            "tqdm-clip-vit-b-gta) are linked (Google Drive) from the official README "
            "(ByeongHyunPak/tqdm)",
}


# ----------------------------------------------------------------------------------------------
# The report and reading a file
# ----------------------------------------------------------------------------------------------
@dataclass
class ConversionReport:
    """What happened to every key of an official checkpoint during conversion."""

    converted: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)      # ours, absent from the checkpoint
    unexpected: list[str] = field(default_factory=list)   # in the checkpoint, unknown to us
    mismatched: list[str] = field(default_factory=list)   # same name, other shape
    other: list[str] = field(default_factory=list)        # not this converter's (head etc.)
    verified: bool = False    # a file in VERIFIED_CHECKPOINTS that converted cleanly
    what: str = "Rein"        # whose tensors (the report of another method's converter)
    sha256: str | None = None                              # of the file, when one was read

    def place(self, key: str, name: str, value: torch.Tensor, ours: Mapping[str, torch.Tensor],
              out: dict[str, torch.Tensor]) -> None:
        """Put the official ``key`` into ``out`` as our ``name`` if it fits ``ours`` (cast to our
        dtype); otherwise record it as unexpected or mismatched."""
        if name not in ours:
            self.unexpected.append(key)
        elif tuple(value.shape) != tuple(ours[name].shape):
            self.mismatched.append(f"{key} {tuple(value.shape)} vs ours "
                                   f"{tuple(ours[name].shape)}")
        else:
            out[name] = value.to(ours[name].dtype)
            self.converted.append(key)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} {self.what} tensors"
                 + ("" if self.verified else " (converter not yet verified on a released "
                                                "checkpoint)")]
        for name in ("missing", "unexpected", "mismatched"):
            keys = getattr(self, name)
            if keys:
                lines.append(f"{name} ({len(keys)}): {', '.join(keys)}")
        if self.other:
            heads = sorted({k.split(".")[0] for k in self.other})
            lines.append(f"not {self.what} ({len(self.other)} keys under {', '.join(heads)}): "
                         f"left for their own converter")
        return "\n".join(lines)


def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            h.update(piece)
    return h.hexdigest()


def read_official_checkpoint(path: str | Path, where: str) -> Mapping:
    """``torch.load(path, weights_only=True)`` with clear errors: a missing file says ``where``
    the released weights come from; an unreadable one says why it failed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: {where}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:      # only torch.load: pickle, zip and torch each raise their own kind
        raise ValueError(f"{path} is not a checkpoint torch can read with weights_only=True: "
                         f"{type(e).__name__}: {e}") from e


def _state_dict(checkpoint: Mapping, key: str, framework: str) -> Mapping[str, torch.Tensor]:
    sd = checkpoint.get(key, checkpoint)
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"expected a {framework} checkpoint: a dict of tensors, or one under "
                         f"{key!r}")
    return sd


Converter = Callable[[Mapping, nn.Module], "tuple[dict[str, torch.Tensor], ConversionReport]"]


def load_official(path: str | Path, model: nn.Module, convert: Converter, where: str,
                  strict: bool = True, load: bool = True
                  ) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Read a released file (``weights_only``), convert it for ``model`` with ``convert`` and
    record the file's SHA-256 in the report (``verified`` when it is a known, checked file and
    the conversion is clean). ``strict``: a missing, unexpected or mis-shaped key is an error
    that lists them. ``load``: load what converted into ``model`` (``strict=False``: the frozen
    parts come from their own files)."""
    sd, report = convert(read_official_checkpoint(path, where), model)
    report.sha256 = file_sha256(path)
    report.verified = report.ok and report.sha256 in VERIFIED_CHECKPOINTS
    if strict and not report.ok:
        raise ValueError(f"{path} does not fit this {report.what} model:\n{report}")
    if load:
        model.load_state_dict(sd, strict=False)
    return sd, report


# ----------------------------------------------------------------------------------------------
# Mask2Former heads: mmdet 3.x (Rein) and mmcv 1.x (tqdm, MFuser) -> lessons.mask2former
# ----------------------------------------------------------------------------------------------
_PIXEL_DECODER_COMMON = [     # MSDeformAttnPixelDecoder's convolutions: the same in both
    (r"input_convs\.(\d)\.conv\.", r"input_convs.\1.0."),
    (r"input_convs\.(\d)\.gn\.", r"input_convs.\1.1."),
    (r"lateral_convs\.0\.conv\.", "lateral_conv.0."),
    (r"lateral_convs\.0\.gn\.", "lateral_conv.1."),
    (r"output_convs\.0\.conv\.", "output_conv.0."),
    (r"output_convs\.0\.gn\.", "output_conv.1."),
]
_PIXEL_DECODER = {
    "mmdet3": [
        (r"encoder\.layers\.(\d+)\.self_attn\.", r"layers.\1.self_attn."),
        (r"encoder\.layers\.(\d+)\.ffn\.layers\.0\.0\.", r"layers.\1.ffn.0."),
        (r"encoder\.layers\.(\d+)\.ffn\.layers\.1\.", r"layers.\1.ffn.2."),
        (r"encoder\.layers\.(\d+)\.norms\.0\.", r"layers.\1.norm1."),
        (r"encoder\.layers\.(\d+)\.norms\.1\.", r"layers.\1.norm2."),
    ],
    "mmcv1": [                # tqdm's layer: deformable self-attention, text attention, FFN
        (r"encoder\.layers\.(\d+)\.attentions\.0\.", r"layers.\1.self_attn."),
        (r"encoder\.layers\.(\d+)\.attentions\.1\.attn\.", r"layers.\1.text_attn."),
        (r"encoder\.layers\.(\d+)\.ffn\.", r"layers.\1.ffn."),
        (r"encoder\.layers\.(\d+)\.norms\.0\.", r"layers.\1.norm1."),
        (r"encoder\.layers\.(\d+)\.norms\.1\.", r"layers.\1.norm_text."),
        (r"encoder\.layers\.(\d+)\.norms\.2\.", r"layers.\1.norm2."),
        (r"encoder\.post_norm\.", "post_norm."),
    ],
}
_TRANSFORMER_DECODER = {      # per layer: masked cross-attention, self-attention, FFN
    "mmdet3": [
        (r"layers\.(\d+)\.cross_attn\.attn\.", r"layers.\1.cross_attn."),
        (r"layers\.(\d+)\.self_attn\.attn\.", r"layers.\1.self_attn."),
        (r"layers\.(\d+)\.ffn\.layers\.0\.0\.", r"layers.\1.ffn.0."),
        (r"layers\.(\d+)\.ffn\.layers\.1\.", r"layers.\1.ffn.2."),
    ],
    "mmcv1": [
        (r"layers\.(\d+)\.attentions\.0\.attn\.", r"layers.\1.cross_attn."),
        (r"layers\.(\d+)\.attentions\.1\.attn\.", r"layers.\1.self_attn."),
    ],
}
_DECODER_NORM = r"layers\.(\d+)\.norms\.(\d)\."                 # norms.k -> norm{k+1}
_HEAD_TOP = ("level_embed", "cls_embed", "mask_embed")          # ours: in the decoder
NAMINGS = tuple(_PIXEL_DECODER)


def _norm(match: re.Match) -> str:
    return f"layers.{match.group(1)}.norm{int(match.group(2)) + 1}."


def m2f_head_to_ours(rest: str, naming: str) -> str:
    """Our name (under ``head.``) for an official Mask2Former head key without its
    ``decode_head.`` prefix, in mmdet 3.x (``naming="mmdet3"``) or mmcv 1.x (``"mmcv1"``) names.
    Keys outside the two decoders and the top-level embeddings keep their names."""
    if naming not in NAMINGS:
        raise ValueError(f"unknown Mask2Former naming {naming!r}; choose from {NAMINGS}")
    part, _, tail = rest.partition(".")
    if part in _HEAD_TOP:
        return f"head.transformer_decoder.{part}.{tail}"
    if part not in ("pixel_decoder", "transformer_decoder"):
        return f"head.{rest}"
    if naming == "mmcv1":
        tail = tail.replace("ffns.0.layers.0.0.", "ffn.0.").replace("ffns.0.layers.1.", "ffn.2.")
    if part == "pixel_decoder":
        rules = _PIXEL_DECODER_COMMON + _PIXEL_DECODER[naming]
    else:
        rules = [*_TRANSFORMER_DECODER[naming], (_DECODER_NORM, _norm)]
    for pattern, repl in rules:
        tail = re.sub("^" + pattern, repl, tail)
    return f"head.{part}.{tail}"


# ----------------------------------------------------------------------------------------------
# Rein
# ----------------------------------------------------------------------------------------------
OFFICIAL_PREFIX = "backbone.reins."
REIN_HEAD_PREFIX = "decode_head."
_REIN_UNUSED = ("query_embed", "query_feat")    # mmdet's own queries, replaced by Rein's link


def convert_official_rein(checkpoint: Mapping[str, torch.Tensor] | Mapping[str, Mapping],
                          reins: Reins) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """An official Rein checkpoint (mmseg ``state_dict``) -> a state dict for ``reins``.

    Accepts the raw checkpoint (``{"state_dict": ..., "meta": ...}``) or its state dict. Keys under
    ``backbone.reins.`` are matched by name and shape against ``reins``; the head
    (``decode_head.*``) and any frozen backbone keys are reported under ``other``. Load the
    result with ``reins.load_state_dict(sd, strict=report.ok)``.
    """
    sd = _state_dict(checkpoint, "state_dict", "mmseg")
    ours = reins.state_dict()
    out, seen, report = {}, set(), ConversionReport()
    for key, value in sd.items():
        if not key.startswith(OFFICIAL_PREFIX):
            report.other.append(key)
            continue
        name = key[len(OFFICIAL_PREFIX):]
        seen.add(name)
        report.place(key, name, value, ours, out)
    report.missing = [OFFICIAL_PREFIX + k for k in ours if k not in seen]
    return out, report


def load_official_rein(path: str | Path, reins: Reins, strict: bool = True) -> ConversionReport:
    """Load an official Rein ``.pth`` into ``reins`` (weights_only); returns the report.

    ``strict``: a missing, unexpected or mis-shaped Rein key is an error (the report says which);
    with ``strict=False`` what fits is loaded and the rest keeps its initialisation.
    """
    sd, report = load_official(path, reins, convert_official_rein, SOURCES["rein"], strict,
                               load=False)
    reins.load_state_dict(sd, strict=report.ok)
    return report


def official_rein_head_to_ours(key: str) -> str | None:
    """Our name for an official ``decode_head.*`` key of Rein (mmdet 3.x names), or None for
    mmdet's unused ``query_embed`` / ``query_feat`` (Rein's tokens give the queries)."""
    rest = key[len(REIN_HEAD_PREFIX):]
    if rest.partition(".")[0] in _REIN_UNUSED:
        return None
    return m2f_head_to_ours(rest, "mmdet3")


def convert_official_rein_model(checkpoint: Mapping, model: nn.Module
                                ) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """A released Rein (+ Mask2Former) checkpoint -> our trained state for ``model`` (a
    ``reprod.models.rein_mask2former``): the Reins through :func:`convert_official_rein`, the
    head by :func:`official_rein_head_to_ours`; frozen backbone keys are reported under
    ``other``."""
    from lessons.checkpoints import trainable_keys

    if getattr(model, "reins", None) is None:
        raise ValueError("a Rein checkpoint needs a model with Reins (builder rein_mask2former)")
    sd = _state_dict(checkpoint, "state_dict", "mmseg")
    reins_sd, report = convert_official_rein(checkpoint, model.reins)
    report.what = "Rein + Mask2Former"
    out = {f"reins.{k}": v for k, v in reins_sd.items()}
    ours = model.state_dict()
    other, report.other = report.other, []
    for key in other:
        name = official_rein_head_to_ours(key) if key.startswith(REIN_HEAD_PREFIX) else None
        if name is None:
            report.other.append(key)
        else:
            report.place(key, name, sd[key], ours, out)
    report.missing = sorted(k for k in trainable_keys(model) if k not in out)
    return out, report


def load_official_rein_model(path: str | Path, model: nn.Module, strict: bool = True
                             ) -> ConversionReport:
    """Load a released Rein ``.pth`` (``weights_only=True``) into ``model``; returns the report
    (``strict``: a missing, unexpected or mis-shaped key is an error listing them)."""
    return load_official(path, model, convert_official_rein_model, SOURCES["rein"], strict)[1]


# ----------------------------------------------------------------------------------------------
# MFuser
# ----------------------------------------------------------------------------------------------
_MFUSER_BACKBONE = [
    (r"^backbone\.adapter\.(\d+)\.", r"encoder.fusers.\1.mixer."),
    (r"^backbone\.adapter_proj([12])\.(\d+)\.", r"encoder.proj\1.\2."),
    (r"^backbone\.adapter_proj3\.", "encoder.proj3."),
    (r"^backbone\.fpn2\.0\.", "neck.fpn2."),     # the code's Sequential(ConvT); ours is bare
    (r"^backbone\.fpn(\d)\.", r"neck.fpn\1."),
    (r"^gamma$", "context_decoder.gamma"),
    (r"^contexts$", "prompts.contexts"),
    (r"^context_decoder\.", "context_decoder."),
]


def official_mfuser_to_ours(key: str) -> str | None:
    """Our state-dict name for an official MFuser key, or None for what we do not convert (the
    frozen towers, the text encoder, EVA's unused ``random_text``)."""
    for pattern, repl in _MFUSER_BACKBONE:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    if not key.startswith("decode_head."):
        return None
    return m2f_head_to_ours(key[len("decode_head."):], "mmcv1")


def convert_official_mfuser(checkpoint: Mapping, model: MFuserSegmentor
                            ) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """An official MFuser checkpoint (mmseg ``{"state_dict": ...}``) -> our trainable state.

    MVFusers, projections, FPN, context decoder (MTEnhancer), ``gamma``, ``contexts`` and the
    Mask2Former head are converted by name (mmcv's names mapped to ours); the frozen towers and
    the text encoder come from the pretrained files and are reported under ``other``, as are
    SigLIP's created-but-unused ``adapter_proj*`` when the model has no projections.
    """
    from lessons.checkpoints import trainable_keys

    sd = _state_dict(checkpoint, "state_dict", "mmseg")
    ours = model.state_dict()
    out, report = {}, ConversionReport(what="MFuser")
    no_proj = model.encoder.proj1 is None
    for key, value in sd.items():
        name = official_mfuser_to_ours(key)
        if name is None or (no_proj and key.startswith("backbone.adapter_proj")):
            report.other.append(key)
            continue
        if key == "contexts" and value.dim() == 3:
            value = value[0]                                   # (1, N_ctx, C) -> (N_ctx, C)
        report.place(key, name, value, ours, out)
    report.missing = sorted(k for k in trainable_keys(model) if k not in out)
    return out, report


def load_official_mfuser(path: str | Path, model: MFuserSegmentor, strict: bool = True
                         ) -> ConversionReport:
    """Load a released MFuser ``.pth`` (``weights_only=True``) into ``model``; returns the report
    (``strict``: any missing, unexpected or mis-shaped key is an error that lists them)."""
    return load_official(path, model, convert_official_mfuser, SOURCES["mfuser"], strict)[1]


# ----------------------------------------------------------------------------------------------
# CAT-Seg
# ----------------------------------------------------------------------------------------------
CATSEG_AGGREGATOR = "sem_seg_head.predictor.transformer."
CATSEG_CLIP = "sem_seg_head.predictor.clip_model."
_CATSEG_RECOMPUTED = ("attn_mask",)           # Swin shift masks: recomputed, not stored here
_CATSEG_NON_PERSISTENT = ("pixel_mean", "pixel_std", "clip_pixel_mean", "clip_pixel_std")


def convert_official_catseg(checkpoint: Mapping, model: CATSeg
                            ) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """An official CAT-Seg checkpoint (detectron2 ``{"model": state_dict}``) -> our state dict.

    Aggregator keys (``sem_seg_head.predictor.transformer.*``) map by prefix onto
    ``aggregator.*``, ``upsample1/2.*`` keep their names, CLIP keys
    (``sem_seg_head.predictor.clip_model.*``) map onto ``encoder.model.*`` (fused
    ``in_proj_weight``, from a stock CLIP, is split on the way). The Swin blocks' stored shift
    masks are skipped (recomputed here). Every key is accounted for in the report.
    """
    from lessons.catseg import split_qkv_state_dict

    sd = split_qkv_state_dict(_state_dict(checkpoint, "model", "detectron2"))
    ours = model.state_dict()
    out, report = {}, ConversionReport(what="CAT-Seg")
    for key, value in sd.items():
        if key.startswith(CATSEG_AGGREGATOR):
            name = "aggregator." + key[len(CATSEG_AGGREGATOR):]
        elif key.startswith(CATSEG_CLIP):
            name = "encoder.model." + key[len(CATSEG_CLIP):]
        elif key.startswith(("upsample1.", "upsample2.")):
            name = key
        else:
            report.other.append(key)
            continue
        if key.endswith(_CATSEG_RECOMPUTED) or key.endswith(_CATSEG_NON_PERSISTENT):
            report.other.append(key)
        else:
            report.place(key, name, value, ours, out)
    loaded = {ours[k].data_ptr() for k in out if ours[k].numel()}
    # our aliases (encoder.vit.* is encoder.model.visual.*) are covered by their storage
    report.missing = [k for k in ours if k not in out
                      and not (ours[k].numel() and ours[k].data_ptr() in loaded)]
    return out, report


def load_official_catseg(path: str | Path, model: CATSeg, strict: bool = True
                         ) -> ConversionReport:
    """Load a released CAT-Seg ``.pth`` (``model_base.pth`` / ``model_large.pth``) into
    ``model`` with ``weights_only=True``; returns the report (``strict``: any missing,
    unexpected or mis-shaped key is an error that lists them)."""
    return load_official(path, model, convert_official_catseg, SOURCES["catseg"], strict)[1]


# ----------------------------------------------------------------------------------------------
# tqdm
# ----------------------------------------------------------------------------------------------
# Names read from ByeongHyunPak/tqdm@46e616c (mmseg 0.16 / mmcv 1.x): the segmentor
# (models/segmentors/tqdm_eva_clip.py, tqdm_clip.py) holds ``backbone`` (the visual tower),
# ``text_encoder``, ``context_decoder``, ``decode_head``, ``contexts`` (1, N_ctx, E), ``gamma`` (E,)
# and ``reg_E0``, a deep copy of the initial backbone for the visual regulariser. EVA02-CLIP's
# tower (models/backbones/eva_clip/eva_vit_model.py) names its parts as EVA-CLIP does; ours is
# timm's ``Eva`` under open_clip, whose names differ in the SwiGLU MLP, the sub-LayerNorms and
# the q / v biases. The tower also holds the SimpleFPN (``fpn1`` = ConvT, BN, GELU, ConvT;
# ``fpn2`` = Sequential(ConvT)) and, with RoPE, its sin / cos tables under ``rope`` and under
# every block's ``attn.rope`` (the same module), which are recomputed from the grid here.
_EVA_CLIP_TOWER = [           # EVA-CLIP's eva_vit_model.py -> timm's Eva (open_clip's EVA02)
    (r"^(blocks\.\d+\.attn)\.q_bias$", r"\1.q_proj.bias"),
    (r"^(blocks\.\d+\.attn)\.v_bias$", r"\1.v_proj.bias"),
    (r"^(blocks\.\d+\.attn)\.inner_attn_ln\.", r"\1.norm."),
    (r"^(blocks\.\d+\.mlp)\.w1\.", r"\1.fc1_g."),      # SwiGLU: act(w1 x) * w2 x
    (r"^(blocks\.\d+\.mlp)\.w2\.", r"\1.fc1_x."),
    (r"^(blocks\.\d+\.mlp)\.ffn_ln\.", r"\1.norm."),
    (r"^(blocks\.\d+\.mlp)\.w3\.", r"\1.fc2."),
]
_TQDM_TOP = [
    (r"^backbone\.fpn2\.0\.", "neck.fpn2."),     # the code's Sequential(ConvT); ours is bare
    (r"^backbone\.fpn(\d)\.", r"neck.fpn\1."),
    (r"^gamma$", "context_decoder.gamma"),
    (r"^contexts$", "prompts.contexts"),
    (r"^context_decoder\.", "context_decoder."),
]
TQDM_NOT_CONVERTED = ("text_encoder.", "reg_E0.")
"""Official tqdm key prefixes that are not converted: the frozen text tower, and ``reg_E0``, the
frozen copy of the initial visual tower (both come from the pretrained VLM file here)."""
_ROPE_TABLE = re.compile(r"(^|\.)rope\.freqs_(cos|sin)$")


def official_tqdm_to_ours(key: str, tower: str = "encoder.model.visual.trunk") -> str | None:
    """Our state-dict name for an official tqdm key, or None for what is not converted
    (:data:`TQDM_NOT_CONVERTED`, and EVA's RoPE tables, which are recomputed). ``tower`` is
    where our visual tower lives (``encoder.model.visual.trunk`` for EVA02-CLIP under open_clip,
    ``encoder.model.visual`` for an OpenAI-style CLIP). A key of no known part keeps its name
    (and is then reported as unexpected)."""
    if key.startswith(TQDM_NOT_CONVERTED) or _ROPE_TABLE.search(key):
        return None
    for pattern, repl in _TQDM_TOP:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    if key.startswith("backbone."):
        rest = key[len("backbone."):]
        for pattern, repl in _EVA_CLIP_TOWER:
            rest = re.sub(pattern, repl, rest)
        return f"{tower}.{rest}"
    if key.startswith("decode_head."):
        return m2f_head_to_ours(key[len("decode_head."):], "mmcv1")
    return key


def _module_name(model: nn.Module, module: nn.Module) -> str:
    """The first (state-dict order) name under which ``module`` sits in ``model``."""
    return next(name for name, m in model.named_modules(remove_duplicate=False) if m is module)


def convert_official_tqdm(checkpoint: Mapping, model: MaskFormerSegmentor
                          ) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """An official tqdm checkpoint (mmseg 0.16 ``{"state_dict": ...}``) -> our trained state for
    ``model`` (``reprod.models.tqdm_mask2former``, or the toy :func:`build_toy_tqdm`).

    Converted by name and shape: the fine-tuned visual tower (EVA-CLIP's names mapped onto
    timm's ``Eva``; an OpenAI-style CLIP tower keeps its names), the SimpleFPN, ``contexts``
    ((1, N_ctx, E) -> (N_ctx, E)), ``gamma``, the context decoder and the Mask2Former head in
    mmcv 1.x names (:func:`m2f_head_to_ours`). The text tower, ``reg_E0`` and the RoPE tables
    are reported under ``other``. Our encoder's alias of its tower (``encoder.vit.*``) counts as
    loaded with the tower.

    **Unverified**: the names are derived from the official modules (read at
    ByeongHyunPak/tqdm@46e616c, the code's only stored version; the project pins 75168af) for
    the EVA02-CLIP-L-14-336 config ``configs/tqdm/tqdm_eva_vit-l_1e-5_20k-g2c-512.py``, and no
    released tqdm file has been loaded yet; the report says so until one is in
    :data:`VERIFIED_CHECKPOINTS`.
    """
    from lessons.checkpoints import trainable_keys

    encoder = getattr(model, "encoder", None)
    if getattr(model, "prompts", None) is None or getattr(encoder, "vit", None) is None:
        raise ValueError("a tqdm checkpoint needs a tqdm model with prompts (builder tqdm)")
    sd = _state_dict(checkpoint, "state_dict", "mmseg")
    tower = _module_name(model, encoder.vit)
    ours = model.state_dict(keep_vars=True)        # the tensors themselves: aliases are `is`
    out, report = {}, ConversionReport(what="tqdm")
    for key, value in sd.items():
        name = official_tqdm_to_ours(key, tower)
        if name is None:
            report.other.append(key)
            continue
        if key == "contexts" and value.dim() == 3:
            value = value[0]                                   # (1, N_ctx, C) -> (N_ctx, C)
        report.place(key, name, value, ours, out)
    seen = {id(ours[k]) for k in out}                  # each tensor once, by its first name
    trained = trainable_keys(model)
    for k, v in ours.items():
        if k in trained and id(v) not in seen:
            seen.add(id(v))
            report.missing.append(k)
    report.missing.sort()
    return out, report


def load_official_tqdm(path: str | Path, model: MaskFormerSegmentor, strict: bool = True
                       ) -> ConversionReport:
    """Load a released tqdm ``.pth`` (``weights_only=True``) into ``model``; returns the report
    (``strict``: any missing, unexpected or mis-shaped key is an error that lists them).
    Unverified until a released file has loaded (see :func:`convert_official_tqdm`)."""
    return load_official(path, model, convert_official_tqdm, SOURCES["tqdm"], strict)[1]
