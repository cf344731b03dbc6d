"""Evaluate a trained or released model on an experiment's targets.

    python -m reprod.evaluate rein_dinov2_gtav --checkpoint runs/rein_dinov2_gtav/final.safetensors
    python -m reprod.evaluate mfuser_eva_gtav --official mfuser --checkpoint mfuser_eva_gta.pth
    python -m reprod.evaluate rein_dinov2_gtav --official rein --checkpoint rein_dinov2_gta.pth
    python -m reprod.evaluate tqdm_eva02_gtav --official tqdm --checkpoint tqdm_eva_gta.pth
    python -m reprod.evaluate toy_rein --checkpoint runs/toy_rein/final.safetensors \\
        --targets cityscapes --max-images 8
    python -m reprod.evaluate tqdm_eva02_gtav --checkpoint final.safetensors --tta

The config gives the model (its frozen parts from the local weight files it names), the target
datasets and the protocol (:mod:`reprod.protocols`: sliding window 512 / 341, Rein's
1024 x 512 with half-size Mapillary, or tqdm / MFuser's full resolution). ``--checkpoint`` is
ours (``final.safetensors`` or ``checkpoint.pt`` of ``reprod.train``) or, with ``--official``,
a released ``.pth`` converted on the fly (``rein``, ``mfuser``, ``tqdm``, ``catseg``: the
converters of :mod:`lessons.convert`; tqdm's is unverified until a released file has loaded);
the conversion report is printed and saved.
Writes ``results.json`` and ``results.md`` (ours beside the paper's row of
``lessons/papers.yaml``) into ``--out`` (default ``runs/<name>/eval-<checkpoint>``).
``--max-images`` scores an evenly spread subset, marked as such in every table.

``--tta`` (off by default, so the published protocols stay as they are) adds test-time
augmentation around each image's prediction (:class:`reprod.protocols.TTA`, mmseg's
``--aug-test``): each scale (``--tta-scales``, default 0.5 0.75 1.0 1.25 1.5 1.75) multiplies the
target's test scale before the protocol's keep-ratio resize and sliding window over the whole
image, each view is also flipped (unless ``--tta-no-flip``), and the softmax scores are averaged.
``results.json`` (``tta``) and ``results.md`` say when it was on and with which scales; the
default report folder gets a ``-tta`` suffix.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from lessons.checkpoints import trainable_state_dict
from reprod.experiment import Experiment, build_model, load_experiment, target_datasets
from reprod.protocols import (
    TTA,
    evaluate_targets,
    get_protocol,
    paper_row,
    run_info,
    write_report,
)
from reprod.safe_io import check_digest, load_safetensors_checked, load_weights_only

__all__ = [
    "OFFICIAL",
    "evaluate_experiment",
    "experiment_protocol",
    "load_official",
    "load_trained",
    "main",
    "tta_option",
]

OFFICIAL = ("rein", "mfuser", "tqdm", "catseg")
"""The released-checkpoint families ``--official`` converts (:mod:`lessons.convert`)."""


def experiment_protocol(exp: Experiment):
    """The config's protocol, with its window when the config changes it."""
    proto = get_protocol(exp.evaluate.protocol)
    if (exp.evaluate.crop, exp.evaluate.stride) != (proto.crop, proto.stride):
        proto = proto.with_window(exp.evaluate.crop, exp.evaluate.stride)
    return proto


def load_trained(model: nn.Module, path: str | Path) -> list[str]:
    """Our checkpoint (``final.safetensors`` or ``checkpoint.pt``) into ``model``; every trained
    tensor must be there. Returns the loaded names."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (reprod.train writes "
                                "runs/<name>/final.safetensors and checkpoint.pt)")
    if path.suffix == ".safetensors":
        state, _ = load_safetensors_checked(path)           # its SHA-256, when recorded
    else:
        state = load_weights_only(path, "reprod.train checkpoint")
        if not isinstance(state, Mapping) or "model" not in state:
            raise ValueError(f"{path} is not a reprod.train checkpoint (no 'model' entry); a "
                             f"released checkpoint needs --official {'|'.join(OFFICIAL)}")
        state = check_digest(state, path)["model"]
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    lacking = sorted(set(trainable_state_dict(model)) - set(state))
    if unknown or lacking:
        raise ValueError(f"{path} does not fit this config's model: "
                         + (f"unknown tensors {unknown[:5]} " if unknown else "")
                         + (f"missing trained tensors {lacking[:5]}" if lacking else ""))
    try:
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)
    except RuntimeError as e:
        raise ValueError(f"{path} does not fit this config's model: {e}") from e
    return sorted(state)


def load_official(model: nn.Module, path: str | Path, kind: str, strict: bool = True):
    """A released checkpoint of family ``kind`` (:data:`OFFICIAL`) converted into ``model``;
    returns the conversion report. The tqdm converter is unverified until a released file has
    loaded (:func:`lessons.convert.convert_official_tqdm`)."""
    from lessons import convert

    loaders = {"rein": convert.load_official_rein_model, "mfuser": convert.load_official_mfuser,
               "tqdm": convert.load_official_tqdm, "catseg": convert.load_official_catseg}
    if kind not in loaders:
        raise ValueError(f"unknown --official {kind!r}; choose from {OFFICIAL}")
    return loaders[kind](path, model, strict=strict)


def evaluate_experiment(exp: Experiment, model: nn.Module, out_dir: str | Path,
                        targets: Sequence[str] | None = None, max_images: int | None = None,
                        device: torch.device | str | None = None, extra: dict | None = None,
                        progress: bool = False, num_workers: int = 0,
                        tta: TTA | None = None) -> dict:
    """Score ``model`` on the experiment's targets under its protocol (with test-time
    augmentation ``tta`` when given; the report says so), write the report next to the paper's
    row; returns the report's essentials (per-target and mean mIoU, paths)."""
    proto = experiment_protocol(exp)
    datasets = target_datasets(exp, targets)
    was_training = model.training
    results = evaluate_targets(model, datasets, proto, device=device, max_images=max_images,
                               progress=progress, num_workers=num_workers, tta=tta)
    model.train(was_training)
    paper = label = None
    if exp.paper is not None:
        p = exp.paper
        paper = paper_row(p["table"], p["method"], p["backbone"])
        label = f"{p['method']} {p['backbone']}, {p['table']}"
    json_path, md_path = write_report(
        results, out_dir, experiment=exp.name, protocol=proto, paper=paper, paper_label=label,
        extra={**run_info(device), "config": exp.path, **(extra or {})})
    return {"mean": results["mean"], "json": str(json_path), "markdown": str(md_path),
            "targets": {t: r.miou for t, r in results["targets"].items()}}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m reprod.evaluate",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("config", help="a YAML path or the name of a shipped config")
    p.add_argument("overrides", nargs="*", help="dotted key=value, e.g. "
                   "data.targets.cityscapes.root=/data/cityscapes")
    p.add_argument("--checkpoint", required=True, help="ours, or a released .pth with --official")
    p.add_argument("--official", choices=OFFICIAL, help="convert a released checkpoint")
    p.add_argument("--lenient", action="store_true", help="with --official: load what fits "
                   "(the report lists the rest) instead of refusing")
    p.add_argument("--targets", nargs="+", help="a subset of the config's targets")
    p.add_argument("--max-images", type=int, help="an evenly spread subset per target")
    p.add_argument("--out", type=Path, help="report folder")
    p.add_argument("--device", help="default: CUDA when present")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--tta", action="store_true", help="test-time augmentation: flips and "
                   "scales of the test scale, softmax averaged (off: the published protocols)")
    p.add_argument("--tta-scales", type=float, nargs="+", metavar="S",
                   help="TTA's scales (default mmseg's 0.5 ... 1.75); implies --tta")
    p.add_argument("--tta-no-flip", action="store_true", help="TTA without flips; implies --tta")
    return p


def tta_option(args: argparse.Namespace) -> TTA | None:
    """The :class:`TTA` the command line asks for, or None (``--tta``, ``--tta-scales``,
    ``--tta-no-flip``)."""
    if not (args.tta or args.tta_scales or args.tta_no_flip):
        return None
    scales = tuple(args.tta_scales) if args.tta_scales else TTA().scales
    return TTA(scales=scales, flip=not args.tta_no_flip)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)        # key=value before or after options
    if args.targets:                                     # `--targets a b k=v`: k=v overrides
        args.overrides += [t for t in args.targets if "=" in t]
        args.targets = [t for t in args.targets if "=" not in t] or None
    try:
        tta = tta_option(args)
        exp = load_experiment(args.config, args.overrides)
        target_datasets(exp, args.targets)               # missing data: fail before the model
        model = build_model(exp)
        extra = {"checkpoint": str(args.checkpoint)}
        if args.official:
            report = load_official(model, args.checkpoint, args.official, not args.lenient)
            print(report)
            extra["conversion"] = str(report)
        else:
            load_trained(model, args.checkpoint)
        device = torch.device(args.device) if args.device else (
            torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        model.to(device).eval()
        out = args.out or Path("runs") / exp.name / (f"eval-{Path(args.checkpoint).stem}"
                                                     + ("-tta" if tta else ""))
        summary = evaluate_experiment(exp, model, out, args.targets, args.max_images, device,
                                      extra, progress=not args.no_progress,
                                      num_workers=args.num_workers, tta=tta)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(Path(summary["markdown"]).read_text())
    print(json.dumps({k: summary[k] for k in ("mean", "targets", "json")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
