"""Released checkpoints -> ours: ``python -m reprod.convert {rein,mfuser} CONFIG CKPT OUT``.

    python -m reprod.convert rein rein_dinov2_gtav rein_dinov2_mask2former_512x512_bs1x4.pth \\
        weights/rein_dinov2_gtav_official.safetensors
    python -m reprod.convert mfuser mfuser_eva_gtav mfuser_eva_gta.pth \\
        weights/mfuser_eva_gtav_official.safetensors
    python -m reprod.evaluate rein_dinov2_gtav \\
        --checkpoint weights/rein_dinov2_gtav_official.safetensors

Writes the trained tensors of the config's model (Reins / MVFusers, heads, prompts) as
safetensors, converted by name from the official mmseg ``state_dict``; the frozen encoders come
from their own pretrained files, as in the official runs (Rein's ``state_dict`` override keeps
only ``backbone.reins.*`` and ``decode_head.*``, rein_tqdm.md A4). The model is built on the
meta device, so converting reads nothing but the checkpoint. A report lists every converted,
missing, unexpected and mis-shaped key; any of the last three stops the conversion unless
``--lenient``. ``reprod.evaluate --official`` converts on the fly instead.

Rein's head is mmdet 3.x's ``Mask2FormerHead`` with Rein's ``querys2feat``; its key names come
from the notes (rein_tqdm.md A7, "check against a released checkpoint before relying on them"),
so the report says "not yet verified on a released checkpoint" until one has loaded.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lessons.rein import ConversionReport, convert_official_rein, read_official_checkpoint

REIN_HEAD_PREFIX = "decode_head."
_REIN_PIXEL_DECODER = [            # mmdet 3.x MSDeformAttnPixelDecoder -> lessons.mask2former
    (r"input_convs\.(\d)\.conv\.", r"input_convs.\1.0."),
    (r"input_convs\.(\d)\.gn\.", r"input_convs.\1.1."),
    (r"encoder\.layers\.(\d+)\.self_attn\.", r"layers.\1.self_attn."),
    (r"encoder\.layers\.(\d+)\.ffn\.layers\.0\.0\.", r"layers.\1.ffn.0."),
    (r"encoder\.layers\.(\d+)\.ffn\.layers\.1\.", r"layers.\1.ffn.2."),
    (r"encoder\.layers\.(\d+)\.norms\.0\.", r"layers.\1.norm1."),
    (r"encoder\.layers\.(\d+)\.norms\.1\.", r"layers.\1.norm2."),
    (r"lateral_convs\.0\.conv\.", "lateral_conv.0."),
    (r"lateral_convs\.0\.gn\.", "lateral_conv.1."),
    (r"output_convs\.0\.conv\.", "output_conv.0."),
    (r"output_convs\.0\.gn\.", "output_conv.1."),
]
_REIN_TRANSFORMER_DECODER = [     # mmdet 3.x Mask2FormerTransformerDecoder: cross, self, ffn
    (r"layers\.(\d+)\.cross_attn\.attn\.", r"layers.\1.cross_attn."),
    (r"layers\.(\d+)\.self_attn\.attn\.", r"layers.\1.self_attn."),
    (r"layers\.(\d+)\.ffn\.layers\.0\.0\.", r"layers.\1.ffn.0."),
    (r"layers\.(\d+)\.ffn\.layers\.1\.", r"layers.\1.ffn.2."),
    (r"layers\.(\d+)\.norms\.(\d)\.", None),                 # norms.k -> norm{k+1}
]
_REIN_HEAD_TOP = ("level_embed", "cls_embed", "mask_embed")
_REIN_UNUSED = ("query_embed", "query_feat")    # mmdet's own queries, replaced by Rein's link


def _norm(match: re.Match) -> str:
    return f"layers.{match.group(1)}.norm{int(match.group(2)) + 1}."


def official_rein_head_to_ours(key: str) -> str | None:
    """Our name for an official ``decode_head.*`` key of Rein, or None for mmdet's unused
    ``query_embed`` / ``query_feat`` (Rein's tokens give the queries)."""
    rest = key[len(REIN_HEAD_PREFIX):]
    part, _, tail = rest.partition(".")
    if part in _REIN_UNUSED:
        return None
    if part in _REIN_HEAD_TOP:
        return f"head.transformer_decoder.{part}.{tail}"
    if part in ("pixel_decoder", "transformer_decoder"):
        rules = _REIN_PIXEL_DECODER if part == "pixel_decoder" else _REIN_TRANSFORMER_DECODER
        for pattern, repl in rules:
            tail = re.sub("^" + pattern, repl or _norm, tail)
        return f"head.{part}.{tail}"
    return f"head.{rest}"                                            # querys2feat


def convert_official_rein_model(checkpoint: Mapping, model: nn.Module
                                ) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """A released Rein (+ Mask2Former) checkpoint -> our trained state for ``model`` (a
    ``reprod.models.rein_mask2former``): the Reins through
    :func:`lessons.rein.convert_official_rein`, the head by the mmdet 3.x names above; frozen
    backbone keys are reported under ``other``."""
    if getattr(model, "reins", None) is None:
        raise ValueError("a Rein checkpoint needs a model with Reins (builder rein_mask2former)")
    sd = checkpoint.get("state_dict", checkpoint)
    reins_sd, report = convert_official_rein(checkpoint, model.reins)
    report.what = "Rein + Mask2Former"
    out = {f"reins.{k}": v for k, v in reins_sd.items()}
    ours = model.state_dict()
    other, report.other = report.other, []
    for key in other:
        if not key.startswith(REIN_HEAD_PREFIX):
            report.other.append(key)
            continue
        name = official_rein_head_to_ours(key)
        if name is None:
            report.other.append(key)
        else:
            report.place(key, name, sd[key], ours, out)
    from lessons.checkpoints import trainable_keys

    report.missing = sorted(k for k in trainable_keys(model) if k not in out)
    return out, report


def load_official_rein_model(path: str | Path, model: nn.Module, strict: bool = True
                             ) -> ConversionReport:
    """Load a released Rein ``.pth`` (``weights_only=True``) into ``model``; returns the report
    (``strict``: a missing, unexpected or mis-shaped key is an error listing them)."""
    ckpt = read_official_checkpoint(path, "the released Rein checkpoints are linked from the "
                                          "official README (w1oves/Rein)")
    sd, report = convert_official_rein_model(ckpt, model)
    if strict and not report.ok:
        raise ValueError(f"{path} does not fit this Rein model:\n{report}")
    model.load_state_dict(sd, strict=False)
    return report


def convert(kind: str, config: str, checkpoint: str | Path, out: str | Path,
            strict: bool = True, overrides: Sequence[str] = ()) -> ConversionReport:
    """Convert a released checkpoint for ``config``'s model and write our safetensors."""
    from lessons.mfuser import convert_official_mfuser
    from reprod.experiment import build_model, load_experiment

    exp = load_experiment(config, overrides)
    model = build_model(exp, meta=True)
    where = {"rein": "the official README (w1oves/Rein)",
             "mfuser": "the official README (devinxzhang/MFuser)"}
    if kind not in where:
        raise ValueError(f"unknown checkpoint kind {kind!r}; choose from {sorted(where)}")
    ckpt = read_official_checkpoint(checkpoint, f"the released checkpoints are linked from "
                                                f"{where[kind]}")
    fn = convert_official_rein_model if kind == "rein" else convert_official_mfuser
    sd, report = fn(ckpt, model)
    if strict and not report.ok:
        raise ValueError(f"{checkpoint} does not fit {exp.name}'s model:\n{report}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out),
              metadata={"experiment": exp.name, "converted_from": str(checkpoint),
                        "kind": kind, "report": str(report)})
    return report


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m reprod.convert",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=("rein", "mfuser"))
    p.add_argument("config", help="the experiment config whose model the checkpoint fits")
    p.add_argument("checkpoint", help="the released .pth")
    p.add_argument("out", help="our .safetensors")
    p.add_argument("overrides", nargs="*", help="dotted key=value for the config")
    p.add_argument("--lenient", action="store_true", help="write what fits")
    args = p.parse_args(argv)
    try:
        report = convert(args.kind, args.config, args.checkpoint, args.out, not args.lenient,
                         args.overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
