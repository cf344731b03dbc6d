"""Released checkpoints -> ours: ``python -m reprod.convert {rein,mfuser,tqdm,catseg} CONFIG CKPT
OUT``.

    python -m reprod.convert rein rein_dinov2_gtav rein_dinov2_mask2former_512x512_bs1x4.pth \\
        weights/rein_dinov2_gtav_official.safetensors
    python -m reprod.convert mfuser mfuser_eva_gtav mfuser_eva_gta.pth \\
        weights/mfuser_eva_gtav_official.safetensors
    python -m reprod.evaluate rein_dinov2_gtav \\
        --checkpoint weights/rein_dinov2_gtav_official.safetensors

Writes the trained tensors of the config's model (Reins / MVFusers, heads, prompts) as
safetensors, converted by name from the official mmseg ``state_dict`` by the converters of
:mod:`lessons.convert`; the frozen encoders come from their own pretrained files, as in the
official runs (Rein's checkpoints hold only ``backbone.reins.*`` and ``decode_head.*``: its
backbone's ``state_dict`` drops the rest, ``rein/models/backbones/reins_dinov2.py`` of
w1oves/Rein). The model is built on the meta device, so converting reads nothing but the
checkpoint. A report lists every converted, missing, unexpected and mis-shaped key; any of the
last three stops the conversion unless ``--lenient``. ``reprod.evaluate --official`` converts on
the fly instead.

Rein's head is mmdet 3.x's ``Mask2FormerHead`` with Rein's ``querys2feat``; its key names follow
mmdet 3.x's module names and have not been checked against a released file yet, so the report
says "not yet verified on a released checkpoint" until a file listed in
:data:`lessons.convert.VERIFIED_CHECKPOINTS` converts cleanly.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from safetensors.torch import save_file

from lessons.convert import (
    SOURCES,
    ConversionReport,
    convert_official_catseg,
    convert_official_mfuser,
    convert_official_rein_model,
    convert_official_tqdm,
    load_official,
    load_official_rein_model,
    official_rein_head_to_ours,
)

__all__ = [
    "ConversionReport",
    "convert",
    "convert_official_rein_model",
    "load_official_rein_model",
    "main",
    "official_rein_head_to_ours",
]

CONVERTERS = {"rein": convert_official_rein_model, "mfuser": convert_official_mfuser,
              "tqdm": convert_official_tqdm, "catseg": convert_official_catseg}


def convert(kind: str, config: str, checkpoint: str | Path, out: str | Path,
            strict: bool = True, overrides: Sequence[str] = ()) -> ConversionReport:
    """Convert a released checkpoint for ``config``'s model and write our safetensors."""
    from reprod.experiment import build_model, load_experiment

    exp = load_experiment(config, overrides)
    model = build_model(exp, meta=True)
    if kind not in CONVERTERS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; choose from {sorted(CONVERTERS)}")
    sd, report = load_official(checkpoint, model, CONVERTERS[kind], SOURCES[kind],
                               strict=False, load=False)
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
    p.add_argument("kind", choices=tuple(CONVERTERS))
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
