"""Benchmarks at the papers' scale with random weights: training steps and fusion mixers.

    python -m reprod.bench step mfuser_eva_gtav                   # batch and crop of the config
    python -m reprod.bench step mfuser_eva_gtav --precision bf16 --steps 20
    python -m reprod.bench step rein_dinov2_gtav tqdm_eva02_gtav --json runs/bench.json
    python -m reprod.bench fusion --lengths 512 1024 2048 4096   # MVFuser vs self-attention

``step``: the config's model with random weights (no files read; frozen parts stay frozen, so
the optimiser and the backward cover what the recipe trains) and synthetic GTAV-like 512 crops
(random images, labels of random class blocks): optimiser steps of ``reprod.train``
(forward, loss, backward, AdamW) timed after ``--warmup`` steps. Reports the median step time,
iterations / s, images / s, the peak memory (CUDA's allocator; the process's peak RSS on a CPU),
the FLOPs of one step counted by ``torch.utils.flop_counter`` (forward + backward; the optimiser
and data loading are not counted) and the achieved TFLOP/s, and the time the config's schedule
(``train.steps``) would take at that speed, data loading excluded (``python -m reprod.data.pipelines
bench`` measures that; docs/measured.md adds the two). QueryDiff's teacher is Stable Diffusion 2.1's
architecture with random weights.

``fusion``: one fusion mixer at width C over L tokens, batch B, forward + backward: MFuser's
MVFuser against the ``self_attention`` alternative (scaled multi-head attention, the paper's
Table 3 peer), time and peak memory per length; ratios attention / MVFuser from the same run.

Targets for a GPU (issue 11), recorded in docs/measured.md once measured: MFuser (DINOv2-L +
EVA02-L, 512², batch 2) within the 24 GB of the paper's RTX A5000; its 20k-step schedule within
one hour on one H100 in bf16, data loading included.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from lessons.classes import NUM_CLASSES
from lessons.utils import hardware
from reprod.experiment import Experiment, build_model, load_experiment
from reprod.models import trainable_parameters

__all__ = [
    "bench_fusion",
    "bench_step",
    "main",
    "random_model",
    "random_sd_teacher",
    "stand_in_tokenizer",
    "step_flops",
    "synthetic_batch",
    "warn_if_emulated",
]


def synthetic_batch(batch: int, size: int, device: torch.device, seed: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [0, 1] (B, 3, S, S) and labels (B, S, S) of 32-pixel class blocks with some
    ignore, so every loss term (matching, masks, pixel-text) has classes to work on."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=g)
    blocks = torch.randint(0, NUM_CLASSES, (batch, 1, -(-size // 32), -(-size // 32)),
                           generator=g)
    labels = nn.functional.interpolate(blocks.float(), scale_factor=32, mode="nearest")
    labels = labels[:, 0, :size, :size].long()
    labels[:, :8] = 255                                            # a strip of ignore
    return images.to(device), labels.to(device)


def random_model(exp: Experiment, device: torch.device) -> nn.Module:
    """The config's model with random weights (no weight file read)."""
    from dataclasses import replace

    if exp.model.args.get("variant") == "siglip":
        exp = replace(exp, model=replace(exp.model, args={**exp.model.args,
                                                          "tokenizer": stand_in_tokenizer}))
    model = build_model(exp, random_weights=True)
    if exp.model.builder == "querydiff" and exp.model.args.get("alpha", 1.0):
        model.__dict__["_teacher"] = random_sd_teacher()
    return model.to(device)


def stand_in_tokenizer(texts, context_length=64):
    """SigLIP's vocabulary size with CLIP's BPE: shapes and cost, not meaning."""
    from lessons.text import default_tokenizer

    return default_tokenizer()(texts, context_length) % 32000


def random_sd_teacher():
    """Stable Diffusion 2.1's VAE and U-Net architectures with random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from lessons.querydiff import (
        SD21_UNET,
        SD_FEATURE_LAYERS,
        SD_TIMESTEPS,
        DiffusionTeacher,
        sd_scheduler,
    )

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                        block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4)
    return DiffusionTeacher(UNet2DConditionModel(**SD21_UNET), sd_scheduler(), SD_TIMESTEPS,
                            SD_FEATURE_LAYERS, vae=vae, prompt_embedding=torch.zeros(1, 77, 1024))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_gb(device: torch.device) -> float:
    """CUDA's allocator peak on a GPU; on a CPU the process's peak resident memory (NaN where
    the POSIX ``resource`` module is missing: Windows)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource  # POSIX only: imported here so that Windows imports this module
    except ImportError:
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)   # macOS: bytes; Linux: kB


def step_flops(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
               precision: str) -> int:
    """FLOPs of one forward + backward (torch.utils.flop_counter; matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    from lessons.train import compute_losses

    with FlopCounterMode(display=False) as counter, _autocast(images.device, precision):
        total = sum(compute_losses(model, images, labels).values())
    with FlopCounterMode(display=False) as back:
        total.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() + back.get_total_flops()


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" \
        else nullcontext()


def warn_if_emulated(device: torch.device, precision: str) -> None:
    """Say so when ``bf16`` was asked for where bfloat16 is emulated (a CPU without AVX512-BF16
    or AMX, e.g. an AVX2-only one: a toy ViT step measured 26x slower than fp32 there), so a slow
    figure is not read as the model's cost."""
    from reprod.toy.resumable import bf16_autocast_pays

    if precision == "bf16" and not bf16_autocast_pays(device):
        warnings.warn(f"bf16 is emulated on this {device.type} (no native bfloat16 kernels): "
                      "its times measure the emulation; compare with --precision fp32",
                      stacklevel=2)


def bench_step(name: str, steps: int = 10, warmup: int = 3, batch: int | None = None,
               size: int | None = None, precision: str | None = None,
               device: str | None = None, overrides: Sequence[str] = ()) -> dict:
    """Time ``steps`` optimiser steps of config ``name`` (see the module docstring)."""
    from reprod.train import LossModule, _step, build_optimizer

    exp = load_experiment(name, overrides)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batch = batch or exp.train.batch_size
    size = size or exp.data.pipeline.get("crop", 512)
    precision = precision or exp.train.precision
    exp.train.precision = precision
    warn_if_emulated(dev, precision)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    torch.manual_seed(0)
    model = random_model(exp, dev)
    opt = build_optimizer(model, exp)
    step_model, run_dir = LossModule(model), Path(".")
    images, labels = synthetic_batch(batch, size, dev)
    flops = step_flops(model, images, labels, precision)
    times = []
    for i in range(warmup + steps):
        _sync(dev)
        start = time.perf_counter()
        _step(step_model, model, opt, images, labels, i, exp, run_dir)
        _sync(dev)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    t = statistics.median(times)
    return {"config": exp.name, "hardware": hardware(dev), "precision": precision,
            "batch": batch, "crop": size, "trainable": trainable_parameters(model),
            "step_s": t, "it_per_s": 1 / t, "images_per_s": batch / t,
            "peak_memory_gb": _peak_memory_gb(dev), "gflops_per_step": flops / 1e9,
            "tflops_per_s": flops / t / 1e12, "schedule_steps": exp.train.steps,
            "schedule_hours": exp.train.steps * t / 3600, "timed_steps": steps}


def _mixer(kind: str, dim: int, heads: int) -> nn.Module:
    from lessons.mfuser import MVFuser, SelfAttentionMixer

    if kind == "mvfuser":
        return MVFuser(dim)
    if kind == "attention":
        return SelfAttentionMixer(dim, heads)
    raise ValueError(f"unknown mixer {kind!r}")


def bench_fusion(lengths: Sequence[int], dim: int = 1024, heads: int = 16, batch: int = 2,
                 repeats: int = 5, device: str | None = None, precision: str = "fp32"
                 ) -> list[dict]:
    """MVFuser vs self-attention, forward + backward, per sequence length L."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    warn_if_emulated(dev, precision)
    rows = []
    for L in lengths:
        row = {"length": L, "dim": dim, "batch": batch}
        for kind in ("mvfuser", "attention"):
            torch.manual_seed(0)
            mixer = _mixer(kind, dim, heads).to(dev)
            x = torch.randn(batch, L, dim, device=dev, requires_grad=True)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            times = []
            for i in range(repeats + 1):
                _sync(dev)
                start = time.perf_counter()
                with _autocast(dev, precision):
                    y = mixer(x)
                y.float().square().mean().backward()
                _sync(dev)
                if i:
                    times.append(time.perf_counter() - start)
            row[f"{kind}_ms"] = 1000 * statistics.median(times)
            row[f"{kind}_peak_gb"] = _peak_memory_gb(dev) if dev.type == "cuda" else None
        row["attention_over_mvfuser"] = row["attention_ms"] / row["mvfuser_ms"]
        rows.append(row)
    return rows


def _print_step_header() -> None:
    print("| config | hardware | precision | batch x crop | trainable | step (s) | it/s | "
          "images/s | peak memory (GB) | GFLOP/step | TFLOP/s | schedule (h) |")
    print("|" + "---|" * 12, flush=True)


def _print_step(r: dict) -> None:
    print(f"| {r['config']} | {r['hardware']} | {r['precision']} | {r['batch']} x "
              f"{r['crop']}² | {r['trainable']:,} | {r['step_s']:.3f} | {r['it_per_s']:.2f} | "
              f"{r['images_per_s']:.1f} | {r['peak_memory_gb']:.1f} | "
              f"{r['gflops_per_step']:.0f} | {r['tflops_per_s']:.2f} | "
              f"{r['schedule_hours']:.2f} for {r['schedule_steps']} |", flush=True)


def _print_fusion(rows: list[dict], hw: str) -> None:
    print(f"MVFuser vs self-attention, forward + backward, {hw}")
    print("| L | MVFuser (ms) | attention (ms) | attention / MVFuser | MVFuser peak (GB) | "
          "attention peak (GB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        mem = [f"{r[k]:.2f}" if r[k] is not None else "-"
               for k in ("mvfuser_peak_gb", "attention_peak_gb")]
        print(f"| {r['length']} | {r['mvfuser_ms']:.1f} | {r['attention_ms']:.1f} | "
              f"{r['attention_over_mvfuser']:.2f} | {mem[0]} | {mem[1]} |")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m reprod.bench",
                                description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("step", help="training-step time, memory and FLOP/s per config")
    s.add_argument("configs", nargs="+")
    s.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE")
    s.add_argument("--steps", type=int, default=10)
    s.add_argument("--warmup", type=int, default=3)
    s.add_argument("--batch", type=int, help="default: the config's train.batch_size")
    s.add_argument("--size", type=int, help="crop side; default: the config's crop")
    s.add_argument("--precision", choices=("fp32", "bf16"))
    s.add_argument("--device")
    s.add_argument("--json", type=Path)
    f = sub.add_parser("fusion", help="MVFuser vs self-attention against sequence length")
    f.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    f.add_argument("--dim", type=int, default=1024)
    f.add_argument("--heads", type=int, default=16)
    f.add_argument("--batch", type=int, default=2)
    f.add_argument("--repeats", type=int, default=5)
    f.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    f.add_argument("--device")
    f.add_argument("--json", type=Path)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "step":
            _print_step_header()
            rows = []
            for c in args.configs:           # one at a time: a real-scale row takes a while
                rows.append(bench_step(c, args.steps, args.warmup, args.batch, args.size,
                                       args.precision, args.device, args.override))
                _print_step(rows[-1])
        else:
            rows = bench_fusion(args.lengths, args.dim, args.heads, args.batch, args.repeats,
                                args.device, args.precision)
            dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
            _print_fusion(rows, hardware(dev))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
