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
- **Exact resumption**: ``checkpoint.pt`` holds the trained tensors, the optimiser, the step,
  every process's RNG states and the world size. The learning rate is a function of the step,
  and the sample at stream position p depends only on (seed, p) (:mod:`reprod.data.pipelines`), so N
  steps + stop + N steps equals 2N steps bit for bit on the CPU (a test checks it). A resume
  refuses a config whose training differs; what is evaluated and where its data lie
  (``data.targets``, ``evaluate``, ``train.eval_every``, ``train.eval_max_images``) may change.
- **The end is resumable too**: at the last step the checkpoint is written, then
  ``final.safetensors``, then the final evaluation; a rerun of a finished run writes whichever is
  missing or damaged (an evaluation stopped midway, a wrong target path fixed since). An
  evaluation never moves the training RNG, so a resumed run matches an unbroken one.
- **Files**: every file is written atomically (a temporary file renamed over the old one: a
  job killed at any moment leaves the old file or the new one), and the weights carry a SHA-256
  of their tensors that is checked when they are read back (:mod:`reprod.safe_io`); checkpoints
  load ``weights_only``. The run directory is locked (``.lock``): a second training there is an
  error, and a run that fails before it starts leaves no directory behind.
- **Precision**: fp32 by default as the official runs; ``train.precision=bf16`` autocasts the
  forward to bfloat16 (weights and optimiser stay fp32).
- **Logging**: a progress bar, TensorBoard scalars in ``tb/``, ``log.jsonl`` (a resume drops
  the rows past its checkpoint, so no step appears twice); a non-finite loss stops the run with
  the step, the loss terms and the last checkpoint named.
- **Weights**: ``final.safetensors`` (the trained tensors, fp32) for ``reprod.evaluate``.

Dimension glossary: B batch, K classes, H W crop size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from lessons.checkpoints import trainable_state_dict
from lessons.train import NonFiniteLoss as StepNonFinite
from lessons.train import TrainConfig, compute_losses, make_optimizer, poly_lr, train_step
from lessons.utils import hardware
from reprod.experiment import (
    Experiment,
    build_model,
    load_experiment,
    source_dataset,
    target_datasets,
    to_yaml,
)
from reprod.safe_io import (
    RunLock,
    atomic_write,
    atomic_write_text,
    check_digest,
    load_safetensors_checked,
    load_weights_only,
    save_safetensors_checked,
    tensor_digest,
)

__all__ = [
    "CHECKPOINT",
    "CHECKPOINT_KEYS",
    "EVAL_ONLY",
    "FINAL",
    "LOG",
    "Dist",
    "LossModule",
    "NonFiniteLoss",
    "build_optimizer",
    "final_is_complete",
    "load_checkpoint",
    "lr_at",
    "main",
    "read_checkpoint",
    "replica_difference",
    "rng_state",
    "run_info",
    "save_checkpoint",
    "set_lr",
    "set_rng_state",
    "setup_distributed",
    "train",
    "train_loader",
    "training_config",
    "write_final",
]

CHECKPOINT = "checkpoint.pt"
FINAL = "final.safetensors"
LOG = "log.jsonl"
CHECKPOINT_KEYS = ("model", "optimizer", "step", "rng", "world_size", "config")
# What may change between the jobs of one run: it is evaluated or described, never trained.
EVAL_ONLY = ("path", "name", "description", "departures", "expected", "paper", "evaluate",
             "data.targets", "train.eval_every", "train.eval_max_images")


# ----------------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dist:
    """This process's place: rank, world size, device."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    ddp: bool = False                  # a process group and DistributedDataParallel are in use

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None = None, force: bool = False) -> Dist:
    """One process, or DDP when ``torchrun`` set ``WORLD_SIZE`` > 1 (NCCL on CUDA, else gloo).
    ``force`` (``--distributed``) takes the DDP path at world size 1 too: a smoke test of the
    process group and the DDP wrapper on one GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and device != "cpu"
    if world == 1 and not (force and "RANK" in os.environ):
        if force:
            raise ValueError("--distributed needs torchrun (it sets RANK, WORLD_SIZE, "
                             "MASTER_ADDR): torchrun --nproc_per_node 1 -m reprod.train ...")
        return Dist(device=torch.device(device or ("cuda" if cuda else "cpu")))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(dist.get_rank(), world, torch.device(f"cuda:{local}" if cuda else "cpu"), True)


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
    """One parameter group's rate at ``step``: :func:`lessons.train.poly_lr` with the config's
    power, ``min_lr`` and warm-up, composed as mmcv 1.x does (tqdm's and MFuser's framework):
    ``lr = ((base - min_lr) (1 - step / steps)^power + min_lr) * w``, with the warm-up factor
    ``w = warmup_ratio + (1 - warmup_ratio) step / warmup`` during the warm-up, else 1."""
    t = exp.train
    return poly_lr(step, t.steps, base_lr, power=t.power, min_lr=t.min_lr,
                   warmup_steps=t.warmup_steps, warmup_ratio=t.warmup_ratio, warmup="mmcv")


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
    if not d.ddp:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def save_checkpoint(run_dir: Path, model: nn.Module, opt: torch.optim.Optimizer, step: int,
                    exp: Experiment, d: Dist) -> None:
    """Atomic (a temporary file renamed over the previous checkpoint), with the SHA-256 of its
    contents inside, checked by :func:`load_checkpoint`."""
    rngs = _gather(rng_state(), d)                     # every process's RNG, for exact resume
    if d.main:
        state = {"model": {k: v.detach().cpu() for k, v in trainable_state_dict(model).items()},
                 "optimizer": opt.state_dict(), "step": step, "rng": rngs, "world_size": d.world,
                 "config": exp.to_dict()}
        state["sha256"] = tensor_digest(state)
        atomic_write(run_dir / CHECKPOINT, lambda tmp: torch.save(state, tmp))
    if d.ddp:
        dist.barrier()


def read_checkpoint(path: Path) -> dict:
    """A ``checkpoint.pt`` loaded ``weights_only`` and checked (its keys, its SHA-256); every
    problem is a ValueError naming the file."""
    state = load_weights_only(path, "reprod.train checkpoint")
    if not isinstance(state, dict) or not set(CHECKPOINT_KEYS) <= set(state):
        raise ValueError(f"{path} is not a reprod.train checkpoint (it lacks "
                         f"{sorted(set(CHECKPOINT_KEYS) - set(state or {}))})")
    return check_digest(state, path)


def training_config(config: dict) -> dict:
    """A config (``Experiment.to_dict()``) without what :data:`EVAL_ONLY` lets change."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in config.items()}
    for key in EVAL_ONLY:
        section, _, sub = key.partition(".")
        if sub and isinstance(out.get(section), dict):
            out[section].pop(sub, None)
        elif not sub:
            out.pop(section, None)
    return out


def _config_diff(saved: dict, now: dict) -> list[str]:
    a, b = training_config(saved), training_config(now)
    out = []
    for section in sorted(set(a) | set(b)):
        x, y = a.get(section), b.get(section)
        if isinstance(x, dict) and isinstance(y, dict):
            out += [f"{section}.{k}: {x.get(k)!r} -> {y.get(k)!r}"
                    for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)]
        elif x != y:
            out.append(f"{section}: {x!r} -> {y!r}")
    return out


def load_checkpoint(run_dir: Path, model: nn.Module, opt: torch.optim.Optimizer,
                    exp: Experiment, d: Dist) -> int:
    """Restore a run's checkpoint (0 when there is none); refuse another training config (what
    :data:`EVAL_ONLY` names may differ) or world size."""
    path = run_dir / CHECKPOINT
    if not path.is_file():
        return 0
    state = read_checkpoint(path)
    diff = _config_diff(state["config"], exp.to_dict())
    if diff:
        sections = sorted({k.split(".")[0].split(":")[0] for k in diff})
        raise ValueError(f"{path} belongs to another config; differing sections: {sections} "
                         f"({'; '.join(diff[:5])}). Use another --run-dir, or the same config")
    if state["world_size"] != d.world:
        raise ValueError(f"{path} was written by {state['world_size']} process(es), this run "
                         f"has {d.world}: the data order depends on it, so exact resumption "
                         "needs the same number")
    missing = set(trainable_state_dict(model)) - set(state["model"])
    if missing:
        raise ValueError(f"{path} lacks trained tensors {sorted(missing)[:5]}")
    try:
        model.load_state_dict(state["model"], strict=False)
        opt.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise ValueError(f"{path} does not fit this config's model: {str(e)[:300]}") from e
    set_rng_state(state["rng"][d.rank])
    return int(state["step"])


def write_final(run_dir: Path, model: nn.Module, exp: Experiment) -> Path:
    """``final.safetensors``: the trained tensors (fp32) with their SHA-256, written atomically
    and read back."""
    return save_safetensors_checked(
        run_dir / FINAL, {k: v.float() for k, v in trainable_state_dict(model).items()},
        {"experiment": exp.name, "steps": str(exp.train.steps)})


def final_is_complete(run_dir: Path, exp: Experiment) -> bool:
    """``final.safetensors`` is there, reads back intact and records this run's steps."""
    path = run_dir / FINAL
    if not path.is_file():
        return False
    try:
        _, meta = load_safetensors_checked(path)
    except ValueError:
        return False
    return "sha256" in meta and meta.get("steps") == str(exp.train.steps)


def run_info(exp: Experiment, d: Dist, argv: Sequence[str]) -> dict:
    import importlib.metadata as md

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    return {"experiment": exp.name, "command": " ".join(argv), "world_size": d.world,
            "hardware": hardware(d.device), "python": platform.python_version(),
            "versions": {"torch": torch.__version__, "cuda": torch.version.cuda,
                         **{p: version(p) for p in ("timm", "open_clip_torch", "diffusers",
                                                    "dgss-lessons")}},
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def train_loader(exp: Experiment, d: Dist, start_step: int) -> DataLoader:
    """Batches of this process from stream position ``start_step * batch_size`` on."""
    from reprod.data.pipelines import (
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
    """A non-finite loss, with the step and the last good checkpoint named."""


def train(exp: Experiment, run_dir: str | Path, *, stop_at: int | None = None,
          device: str | None = None, argv: Sequence[str] = (), progress: bool = True,
          evaluate: bool = True, distributed: bool = False) -> dict:
    """Train (or resume) ``exp`` in ``run_dir`` up to ``train.steps`` (or ``stop_at``, to split
    a run); returns a summary. Evaluates the targets every ``train.eval_every`` steps
    (``evaluate``); at the end writes ``final.safetensors``, then evaluates. A rerun of a
    finished run completes whichever of the two is missing. The run directory is locked for the
    run; one this call created is removed again if the run fails before it starts."""
    if stop_at is not None and stop_at < 0:
        raise ValueError(f"--stop-at must be >= 0, got {stop_at}")
    d = setup_distributed(device, force=distributed)
    run_dir = Path(run_dir)
    created, lock = False, None
    try:
        created, lock = _claim(run_dir, d)
        model, opt, start = _start(exp, run_dir, d, argv, stop_at, evaluate)
    except BaseException:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        if lock is not None:
            lock.release()
        raise
    try:
        return _run(exp, run_dir, d, model, opt, start, stop_at, progress, evaluate)
    finally:
        if lock is not None:
            lock.release()


def _claim(run_dir: Path, d: Dist) -> tuple[bool, RunLock | None]:
    """Create (if needed) and lock the run directory on the main process: (created, lock). A
    directory locked by another run is a ValueError on every process."""
    created, lock, error = False, None, None
    if d.main:
        try:
            run_dir.mkdir(parents=True)
            created = True
        except FileExistsError:
            if not run_dir.is_dir():
                error = f"--run-dir {run_dir} is a file, not a directory"
        except OSError as e:
            error = f"cannot create the run directory {run_dir}: {e.strerror or e}"
        if error is None:
            try:
                lock = RunLock(run_dir).acquire()
            except ValueError as e:
                error = str(e)
            except OSError as e:
                error = (f"cannot write in the run directory {run_dir}: {e.strerror or e} "
                         f"({e.filename})")
    error = _gather(error, d)[0]
    if error is not None:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise ValueError(error)
    return created, lock


def _start(exp: Experiment, run_dir: Path, d: Dist, argv: Sequence[str], stop_at: int | None,
           evaluate: bool) -> tuple[nn.Module, torch.optim.Optimizer, int]:
    """Everything that can fail before the first step: data, model, checkpoint, run files."""
    t = exp.train
    torch.manual_seed(t.seed + d.rank)
    np.random.seed(t.seed + d.rank)
    random.seed(t.seed + d.rank)
    if evaluate and exp.data.targets:
        target_datasets(exp)                    # a wrong target path fails now, not at the end
    model = build_model(exp).to(d.device)
    opt = build_optimizer(model, exp)
    start = load_checkpoint(run_dir, model, opt, exp, d)
    if start < (t.steps if stop_at is None else min(stop_at, t.steps)):
        source_dataset(exp, return_name=False)          # the training data is there
    if d.main:
        atomic_write_text(run_dir / "config.yaml", to_yaml(exp))
        atomic_write_text(run_dir / "run.json", json.dumps(run_info(exp, d, argv), indent=1))
        _trim_log(run_dir, start)
    return model, opt, start


def _run(exp: Experiment, run_dir: Path, d: Dist, model: nn.Module,
         opt: torch.optim.Optimizer, start: int, stop_at: int | None, progress: bool,
         evaluate: bool) -> dict:
    t = exp.train
    step_model = LossModule(model)
    if d.ddp:
        step_model = nn.parallel.DistributedDataParallel(
            step_model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
            find_unused_parameters=t.find_unused_parameters)
    end = t.steps if stop_at is None else min(stop_at, t.steps)
    summary: dict = {"start_step": start, "end_step": end, "seconds": 0.0}
    evals: dict[int, float | None] = {}
    targets = evaluate and bool(exp.data.targets)
    if start < end:
        if targets and 0 < start < t.steps and _eval_due(start, exp) \
                and not _evaluated(run_dir, start, exp, d):   # stopped during that evaluation
            evals[start] = _evaluate(exp, model, run_dir, start, d)
        summary |= _loop(exp, run_dir, d, step_model, model, opt, start, end, progress,
                         evals if targets else None)
    if max(start, end) >= t.steps:                      # done: the final weights, then scores
        if d.main and not final_is_complete(run_dir, exp):
            write_final(run_dir, model, exp)
        summary["final"] = str(run_dir / FINAL)
        if targets and not _evaluated(run_dir, t.steps, exp, d):
            evals[t.steps] = _evaluate(exp, model, run_dir, t.steps, d)
    if evals:
        summary["evaluations"] = evals
    return summary


def _loop(exp: Experiment, run_dir: Path, d: Dist, step_model: nn.Module, model: nn.Module,
          opt: torch.optim.Optimizer, start: int, end: int, progress: bool,
          evals: dict | None) -> dict:
    """Steps ``start`` to ``end``: log, checkpoint, evaluate on schedule (not the last step:
    that evaluation follows the final weights)."""
    t = exp.train
    writer = _tensorboard(run_dir, start) if d.main else None
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
        if evals is not None and done < t.steps and _eval_due(done, exp):
            evals[done] = _evaluate(exp, model, run_dir, done, d)
    if writer is not None:
        writer.close()
    out = {"seconds": time.perf_counter() - began, "last": last}
    if d.ddp:
        out["ddp_max_param_diff"] = replica_difference(model)
    return out


def _eval_due(step: int, exp: Experiment) -> bool:
    t = exp.train
    return step == t.steps or bool(t.eval_every and step % t.eval_every == 0)


def _evaluated(run_dir: Path, step: int, exp: Experiment, d: Dist) -> bool:
    """Whether step ``step`` has a complete report of every target (decided on the main process,
    so every process takes the same branch)."""
    done = False
    if d.main:
        try:
            report = json.loads((run_dir / "eval" / f"step_{step}" / "results.json").read_text())
            done = set(exp.data.targets) <= set(report.get("targets", {}))
        except (OSError, ValueError, AttributeError):
            done = False
    return bool(_gather(done, d)[0])


def _trim_log(run_dir: Path, start: int) -> None:
    """Drop the ``log.jsonl`` rows past the checkpoint being resumed (and a torn last line):
    they are logged again."""
    path = run_dir / LOG
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= start:
                keep.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    atomic_write_text(path, "".join(keep))


def _step(step_model: nn.Module, model: nn.Module, opt: torch.optim.Optimizer,
          images: torch.Tensor, labels: torch.Tensor, step: int, exp: Experiment,
          run_dir: Path) -> dict[str, float]:
    """One optimisation step: the step's learning rate, then :func:`lessons.train.train_step`
    through ``step_model`` (the DDP wrapper when there is one), under bf16 autocast when
    ``train.precision`` says so."""
    t = exp.train
    set_lr(opt, step, exp)
    try:
        return train_step(model, images.float() if images.dtype == torch.uint8 else images,
                          labels, opt, t.grad_clip, forward=step_model,
                          autocast_dtype=torch.bfloat16 if t.precision == "bf16" else None)
    except StepNonFinite as e:
        raise NonFiniteLoss(f"non-finite loss {e.loss} at step {step + 1} (parts: {e.parts}). "
                            f"The last good state is {run_dir / CHECKPOINT}; try fp32, a lower "
                            "train.lr or train.grad_clip, and check the data with "
                            "`python -m reprod.prepare_data verify`") from e


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

        rng = rng_state()                       # an evaluation never moves the training RNG
        report = evaluate_experiment(exp, model, run_dir / "eval" / f"step_{step}",
                                     max_images=exp.train.eval_max_images, device=d.device,
                                     extra={"step": step, "run_dir": str(run_dir)})
        set_rng_state(rng)
        mean = report["mean"]
    if d.ddp:
        dist.barrier()
    return mean


def _tensorboard(run_dir: Path, start: int = 0):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:              # tensorboard is a dependency; a broken install still trains
        print("tensorboard is not importable: logging to log.jsonl only", file=sys.stderr)
        return None
    return SummaryWriter(str(run_dir / "tb"), purge_step=start or None)   # no step twice


def _log(run_dir: Path, writer, step: int, losses: dict[str, float],
         opt: torch.optim.Optimizer, images_per_s: float) -> None:
    lr = max(g["lr"] for g in opt.param_groups)
    row = {"step": step, **losses, "lr": lr, "images_per_s": images_per_s}
    with open(run_dir / LOG, "a") as f:
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
    p.add_argument("--distributed", action="store_true",
                   help="DDP even at world size 1 under torchrun (a smoke test on one GPU)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)        # key=value before or after options
    try:
        exp = load_experiment(args.config, args.overrides)
        run_dir = Path(args.run_dir or Path("runs") / exp.name)
        summary = train(exp, run_dir, stop_at=args.stop_at, device=args.device,
                        argv=["python -m reprod.train", *(argv or sys.argv[1:])],
                        progress=not args.no_progress, evaluate=not args.no_eval,
                        distributed=args.distributed)
    except (ValueError, FileNotFoundError, NonFiniteLoss) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:                      # a read-only or full run directory, mid-run too
        print(f"error: cannot write {e.filename or 'a run file'}: {e.strerror or e}",
              file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "last"}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
