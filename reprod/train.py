"""Train an experiment config: ``python -m reprod.train CONFIG [key=value ...]``.

    python -m reprod.train rein_dinov2_gtav                        # one GPU (or the CPU)
    python -m reprod.train rein_dinov2_gtav train.precision=bf16   # bf16 autocast
    torchrun --nproc_per_node 4 -m reprod.train rein_dinov2_acdc   # DDP on 4 GPUs
    python -m reprod.train mfuser_eva_gtav --run-dir runs/x        # resumes runs/x if present

The step is ``lessons.train``'s (the model's own ``loss``, the same optimiser groups and the same
non-finite guard); this module adds what a multi-day run needs:

- **Configs** (:mod:`reprod.experiment`), saved resolved as ``config.yaml`` with the versions,
  hardware and command in ``run.json``.
- **Devices**: CPU, one GPU, or DDP under ``torchrun`` (NCCL on GPUs, gloo on CPUs; one node:
  multi-node launches are not tested here, so not claimed). ``train.batch_size`` is the total
  over processes.
- **Exact resumption**: ``checkpoint.pt`` (written atomically: a killed job leaves the previous
  one) holds the trained tensors, the optimiser, the step, every process's RNG states and the
  world size. The learning rate is a function of the step, and the sample at stream position p
  depends only on (seed, p) (:mod:`reprod.pipelines`), so N steps + stop + N steps equals 2N
  steps bit for bit on the CPU (a test checks it).
- **Precision**: fp32 by default as the official runs; ``train.precision=bf16`` autocasts the
  forward to bfloat16 (weights and optimiser stay fp32).
- **Logging**: a progress bar, TensorBoard scalars in ``tb/``, ``log.jsonl``; a non-finite loss
  stops the run with the step, the loss terms and the last checkpoint named.
- **Weights**: ``final.safetensors`` (the trained tensors, fp32) for ``reprod.evaluate``.

Dimension glossary: B batch, K classes, H W crop size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from lessons.checkpoints import trainable_state_dict
from lessons.train import TrainConfig, compute_losses, make_optimizer
from reprod.experiment import Experiment, build_model, load_experiment, source_dataset, to_yaml

CHECKPOINT = "checkpoint.pt"
FINAL = "final.safetensors"


# ----------------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dist:
    """This process's place: rank, world size, device."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None = None) -> Dist:
    """One process, or DDP when ``torchrun`` set ``WORLD_SIZE`` > 1 (NCCL on CUDA, else gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and device != "cpu"
    if world == 1:
        return Dist(device=torch.device(device or ("cuda" if cuda else "cpu")))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(dist.get_rank(), world, torch.device(f"cuda:{local}" if cuda else "cpu"))


class LossModule(nn.Module):
    """``forward(images, labels) -> losses``: the model's loss behind a forward, so DDP's
    gradient synchronisation (which hooks ``forward``) sees it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return compute_losses(self.model, images, labels)


# ----------------------------------------------------------------------------------------------
# Schedule
# ----------------------------------------------------------------------------------------------
def lr_at(step: int, base_lr: float, exp: Experiment) -> float:
    """mmcv's poly with ``min_lr`` and linear warm-up, for one parameter group at ``step``:
    ``lr = (base - min_lr) (1 - step / steps)^power + min_lr``, times
    ``1 - (1 - step / warmup) (1 - warmup_ratio)`` during the warm-up."""
    t = exp.train
    lr = (base_lr - t.min_lr) * (1 - min(step / t.steps, 1.0)) ** t.power + t.min_lr
    if step < t.warmup_steps:
        lr *= 1 - (1 - step / t.warmup_steps) * (1 - t.warmup_ratio)
    return lr


def set_lr(optimizer: torch.optim.Optimizer, step: int, exp: Experiment) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, group["base_lr"], exp)


def build_optimizer(model: nn.Module, exp: Experiment) -> torch.optim.Optimizer:
    """``lessons.train.make_optimizer`` (the model's groups and ``lr_mult``); each group keeps
    its ``base_lr`` for the schedule."""
    t = exp.train
    opt = make_optimizer(model, TrainConfig(lr=t.lr, weight_decay=t.weight_decay,
                                            optimizer=t.optimizer))
    for group in opt.param_groups:
        group["base_lr"] = group["lr"]
    return opt


# ----------------------------------------------------------------------------------------------
# State
# ----------------------------------------------------------------------------------------------
def rng_state() -> dict:
    """Every RNG a step may draw from, as tensors and plain numbers (``weights_only`` loads)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": [version, list(internal), py_gauss],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, py_gauss = state["python"]
    random.setstate((version, tuple(internal), py_gauss))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather(obj, d: Dist) -> list:
    if d.world == 1:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def save_checkpoint(run_dir: Path, model: nn.Module, opt: torch.optim.Optimizer, step: int,
                    exp: Experiment, d: Dist) -> None:
    """Atomic: written to a temporary file, then renamed over the previous checkpoint."""
    rngs = _gather(rng_state(), d)                     # every process's RNG, for exact resume
    if d.main:
        state = {"model": {k: v.detach().cpu() for k, v in trainable_state_dict(model).items()},
                 "optimizer": opt.state_dict(), "step": step, "rng": rngs, "world_size": d.world,
                 "config": exp.to_dict()}
        tmp = run_dir / (CHECKPOINT + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, run_dir / CHECKPOINT)
    if d.world > 1:
        dist.barrier()


def load_checkpoint(run_dir: Path, model: nn.Module, opt: torch.optim.Optimizer,
                    exp: Experiment, d: Dist) -> int:
    """Restore a run's checkpoint (0 when there is none); refuse another config or world size."""
    path = run_dir / CHECKPOINT
    if not path.is_file():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved, now = state["config"], exp.to_dict()
    diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v and k != "path"}
    if diff:
        raise ValueError(f"{path} belongs to another config; differing sections: "
                         f"{sorted(diff)}. Use another --run-dir, or the same config")
    if state["world_size"] != d.world:
        raise ValueError(f"{path} was written by {state['world_size']} process(es), this run "
                         f"has {d.world}: the data order depends on it, so exact resumption "
                         "needs the same number")
    missing = set(trainable_state_dict(model)) - set(state["model"])
    if missing:
        raise ValueError(f"{path} lacks trained tensors {sorted(missing)[:5]}")
    model.load_state_dict(state["model"], strict=False)
    opt.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"][d.rank])
    return int(state["step"])


def run_info(exp: Experiment, d: Dist, argv: Sequence[str]) -> dict:
    import importlib.metadata as md

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    hw = torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else \
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    return {"experiment": exp.name, "command": " ".join(argv), "world_size": d.world,
            "hardware": hw, "python": platform.python_version(),
            "versions": {"torch": torch.__version__, "cuda": torch.version.cuda,
                         **{p: version(p) for p in ("timm", "open_clip_torch", "diffusers",
                                                    "dgss-lessons")}},
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def train_loader(exp: Experiment, d: Dist, start_step: int) -> DataLoader:
    """Batches of this process from stream position ``start_step * batch_size`` on."""
    from reprod.pipelines import (
        PipelineConfig,
        RareClassSampler,
        StreamSampler,
        TrainingStream,
        TrainPipeline,
    )

    t = exp.train
    if t.batch_size % d.world:
        raise ValueError(f"train.batch_size {t.batch_size} does not divide over {d.world} "
                         "processes")
    files = source_dataset(exp, return_name=False)
    pipeline = TrainPipeline(PipelineConfig.from_dict(exp.data.pipeline))
    rcs = None
    if exp.data.rcs is not None:
        rcs = RareClassSampler.from_stats(files, **exp.data.rcs)
    stream = TrainingStream(files, pipeline, seed=t.seed, rcs=rcs)
    local = t.batch_size // d.world
    sampler = StreamSampler(start_step, local, d.rank, d.world)
    return DataLoader(stream, batch_size=local, sampler=sampler, num_workers=t.num_workers,
                      pin_memory=d.device.type == "cuda", persistent_workers=t.num_workers > 0,
                      generator=torch.Generator())  # its own: the global RNG is not consumed


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
class NonFiniteLoss(FloatingPointError):
    pass


def train(exp: Experiment, run_dir: str | Path, *, stop_at: int | None = None,
          device: str | None = None, argv: Sequence[str] = (), progress: bool = True,
          evaluate: bool = True) -> dict:
    """Train (or resume) ``exp`` in ``run_dir`` up to ``train.steps`` (or ``stop_at``, to split
    a run); returns a summary. Writes ``final.safetensors`` when the run is complete, and
    evaluates the targets every ``train.eval_every`` steps and at the end (``evaluate``)."""
    d = setup_distributed(device)
    run_dir = Path(run_dir)
    t = exp.train
    torch.manual_seed(t.seed + d.rank)
    np.random.seed(t.seed + d.rank)
    random.seed(t.seed + d.rank)
    model = build_model(exp).to(d.device)
    opt = build_optimizer(model, exp)
    start = load_checkpoint(run_dir, model, opt, exp, d)
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(exp))
        (run_dir / "run.json").write_text(json.dumps(run_info(exp, d, argv), indent=1))
    step_model = LossModule(model)
    if d.world > 1:
        step_model = nn.parallel.DistributedDataParallel(
            step_model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
            find_unused_parameters=t.find_unused_parameters)
    end = t.steps if stop_at is None else min(stop_at, t.steps)
    summary = {"start_step": start, "end_step": end, "seconds": 0.0}
    if start >= end:
        return summary | {"final": str(run_dir / FINAL) if (run_dir / FINAL).exists() else None}
    writer = _tensorboard(run_dir) if d.main else None
    batches = iter(train_loader(exp, d, start))
    bar = tqdm(range(start, end), initial=start, total=t.steps, desc=exp.name,
               disable=not (progress and d.main))
    began, last = time.perf_counter(), {}
    for step in bar:
        images, labels = next(batches)
        last = _step(step_model, model, opt, images.to(d.device, non_blocking=True),
                     labels.to(d.device, non_blocking=True), step, exp, run_dir)
        bar.set_postfix(loss=f"{last['loss']:.3f}")
        done = step + 1
        if d.main and (done % t.log_every == 0 or done == end):
            _log(run_dir, writer, done, last, opt, t.batch_size * (done - start)
                 / (time.perf_counter() - began))
        if done % t.checkpoint_every == 0 or done == end:
            save_checkpoint(run_dir, model, opt, done, exp, d)
        if evaluate and exp.data.targets and (
                done == t.steps or (t.eval_every and done % t.eval_every == 0)):
            summary.setdefault("evaluations", {})[done] = _evaluate(exp, model, run_dir, done, d)
    summary |= {"seconds": time.perf_counter() - began, "last": last}
    if d.world > 1:
        summary["ddp_max_param_diff"] = replica_difference(model)
    if end == t.steps and d.main:
        save_file({k: v.detach().float().cpu().contiguous()
                   for k, v in trainable_state_dict(model).items()}, str(run_dir / FINAL),
                  metadata={"experiment": exp.name, "steps": str(t.steps)})
        summary["final"] = str(run_dir / FINAL)
    if writer is not None:
        writer.close()
    return summary


def _step(step_model: nn.Module, model: nn.Module, opt: torch.optim.Optimizer,
          images: torch.Tensor, labels: torch.Tensor, step: int, exp: Experiment,
          run_dir: Path) -> dict[str, float]:
    """One optimisation step: lr, (bf16) forward, the guard, backward, (clip), update."""
    t = exp.train
    set_lr(opt, step, exp)
    model.train()
    amp = torch.autocast(images.device.type, dtype=torch.bfloat16) \
        if t.precision == "bf16" else nullcontext()
    with amp:
        losses = step_model(images.float() if images.dtype == torch.uint8 else images, labels)
    total = sum(losses.values())
    if not torch.isfinite(total):
        parts = {k: round(float(v.detach()), 4) for k, v in losses.items()}
        raise NonFiniteLoss(f"non-finite loss {float(total.detach())} at step {step + 1} "
                            f"(parts: {parts}). The last good state is {run_dir / CHECKPOINT}; "
                            "try fp32, a lower train.lr or train.grad_clip, and check the data "
                            "with "
                            "`python -m reprod.prepare_data verify`")
    opt.zero_grad(set_to_none=True)
    total.backward()
    if t.grad_clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
    opt.step()
    out = {k: float(v.detach()) for k, v in losses.items()}
    out["loss"] = float(total.detach())
    return out


def replica_difference(model: nn.Module) -> float:
    """The largest difference of any trained value between the DDP processes (0 when the
    gradient synchronisation works)."""
    worst = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if p.requires_grad:
            hi, lo = p.detach().double().clone(), p.detach().double().clone()
            dist.all_reduce(hi, dist.ReduceOp.MAX)
            dist.all_reduce(lo, dist.ReduceOp.MIN)
            worst = torch.maximum(worst, (hi - lo).abs().max().cpu())
    return float(worst)


def _evaluate(exp: Experiment, model: nn.Module, run_dir: Path, step: int, d: Dist) -> float | None:
    """The targets under the config's protocol on the main process (the others wait); the report
    goes to ``eval/step_<n>/``; returns the mean mIoU (%)."""
    mean = None
    if d.main:
        from reprod.evaluate import evaluate_experiment

        report = evaluate_experiment(exp, model, run_dir / "eval" / f"step_{step}",
                                     max_images=exp.train.eval_max_images, device=d.device,
                                     extra={"step": step, "run_dir": str(run_dir)})
        mean = report["mean"]
    if d.world > 1:
        dist.barrier()
    return mean


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:              # tensorboard is a dependency; a broken install still trains
        print("tensorboard is not importable: logging to log.jsonl only", file=sys.stderr)
        return None
    return SummaryWriter(str(run_dir / "tb"))


def _log(run_dir: Path, writer, step: int, losses: dict[str, float],
         opt: torch.optim.Optimizer, images_per_s: float) -> None:
    lr = max(g["lr"] for g in opt.param_groups)
    row = {"step": step, **losses, "lr": lr, "images_per_s": images_per_s}
    with open(run_dir / "log.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    if writer is not None:
        for k, v in losses.items():
            writer.add_scalar(f"train/{k}", v, step)
        writer.add_scalar("train/lr", lr, step)
        writer.add_scalar("train/images_per_s", images_per_s, step)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    from reprod.experiment import list_configs

    p = argparse.ArgumentParser(
        prog="python -m reprod.train", description=__doc__.split("\n\n")[0],
        epilog="Shipped configs: " + ", ".join(list_configs()))
    p.add_argument("config", help="a YAML path or the name of a shipped config")
    p.add_argument("overrides", nargs="*", help="dotted key=value, e.g. train.steps=100")
    p.add_argument("--run-dir", help="where checkpoints and logs go (default runs/<name>); an "
                   "existing checkpoint there is resumed")
    p.add_argument("--stop-at", type=int, help="stop (with a checkpoint) at this step, to "
                   "split a run into jobs")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: CUDA when present")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-eval", action="store_true", help="skip the target evaluations")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        exp = load_experiment(args.config, args.overrides)
        run_dir = Path(args.run_dir or Path("runs") / exp.name)
        summary = train(exp, run_dir, stop_at=args.stop_at, device=args.device,
                        argv=["python -m reprod.train", *(argv or sys.argv[1:])],
                        progress=not args.no_progress, evaluate=not args.no_eval)
    except (ValueError, FileNotFoundError, NonFiniteLoss) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "last"}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
