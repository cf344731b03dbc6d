"""The one training step, training loop and per-domain evaluation every lesson uses.

Every method in this course (a scratch baseline, Rein, tqdm, CAT-Seg, QueryDiff, MFuser) trains
through :func:`train` and is scored by :func:`evaluate_domains`; ``reprod.train`` wraps the same
functions with configs, DDP and checkpoints at real scale.

A model plugs in through one small protocol:

- ``model(images)`` returns per-pixel class logits (B, K, h, w) at any resolution; they are
  resized (bilinear) to the label size for the loss and for prediction; or
- the model defines ``model.loss(images, labels) -> dict[str, Tensor]`` (e.g. Mask2Former's
  matching losses; every entry is summed) and/or ``model.predict(images) -> (B, K, h, w)``
  per-pixel class scores (e.g. Mask2Former's semantic inference), which take precedence.

Dimension glossary: B batch, K classes, H W label height and width, h w logit height and width.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from lessons.augment import augment_batch
from lessons.classes import IGNORE_INDEX, NUM_CLASSES
from lessons.metrics import ConfusionMatrix, per_class_iou
from lessons.utils import get_device

__all__ = [
    "CPU_BF16_ATTENTION",
    "SCHEDULE_POWER",
    "History",
    "NonFiniteLoss",
    "TrainConfig",
    "compute_losses",
    "domain_table",
    "evaluate",
    "evaluate_domains",
    "lr_factor",
    "make_optimizer",
    "poly_lr",
    "predict",
    "resize_to",
    "segmentation_loss",
    "train",
    "train_step",
]


@dataclass
class TrainConfig:
    """Knobs of :func:`train`; the defaults suit a toy model on ToyWorld at 64x128 on a CPU."""

    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"         # adamw or sgd (momentum 0.9)
    schedule: str = "poly"           # poly (power 0.9, as the papers' configs), linear, constant
    warmup_steps: int = 0            # linear warm-up from 1e-6 x lr
    grad_clip: float | None = None   # max gradient norm
    eval_every: int = 0              # steps between validations (0: only at the end)
    eval_batches: int | None = None  # cap on validation batches (None: the whole set)
    select_best: bool = True         # restore the weights with the best validation mIoU
    num_workers: int = 0
    seed: int = 0
    progress: bool = True            # tqdm progress bar
    device: str | None = None        # None: CUDA when present, else CPU
    augment: bool = False            # the recipes' flip + photometric distortion, per batch
    autocast: str | None = None      # "bf16": forward under bfloat16 autocast (AMX CPUs, GPUs)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps}, "
                             f"{self.batch_size}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose adamw or sgd")
        if self.schedule not in ("poly", "linear", "constant"):
            raise ValueError(f"unknown schedule {self.schedule!r}; choose poly, linear, constant")
        if self.autocast not in (None, "bf16"):
            raise ValueError(f"unknown autocast {self.autocast!r}; choose None or 'bf16'")

    @classmethod
    def from_dict(cls, d: Mapping) -> TrainConfig:
        """Build from a mapping, naming any unknown key (a typo must not pass silently)."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig key(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


@dataclass
class History:
    """What :func:`train` records: losses per step, validation mIoU per evaluation, timing."""

    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_miou: list[float] = field(default_factory=list)
    best_step: int | None = None
    best_miou: float | None = None
    seconds: float = 0.0
    images_per_second: float = 0.0
    config: dict = field(default_factory=dict)


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor,
                      ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Pixel-wise cross-entropy; logits (B, K, h, w) are resized to labels (B, H, W) first."""
    if logits.dim() != 4 or labels.dim() != 3 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"expected logits (B, K, h, w) and labels (B, H, W), got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    logits = resize_to(logits, labels.shape[-2:])                       # (B, K, H, W)
    return F.cross_entropy(logits, labels, ignore_index=ignore_index)


def resize_to(logits: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize of (B, K, h, w) logits to (B, K, H, W); a no-op at the same size."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def compute_losses(model: nn.Module, images: torch.Tensor, labels: torch.Tensor
                   ) -> dict[str, torch.Tensor]:
    """The model's own ``loss`` if it has one, else cross-entropy on ``model(images)``."""
    if _has_method(model, "loss"):
        return dict(model.loss(images, labels))
    return {"loss_ce": segmentation_loss(model(images), labels)}


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Per-pixel class scores (B, K, H, W) at the image size."""
    scores = model.predict(images) if _has_method(model, "predict") else model(images)
    return resize_to(scores, images.shape[-2:])


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD over the trainable parameters.

    A model may define ``param_groups(weight_decay) -> list[dict]``: groups with their own
    ``weight_decay`` and an ``lr_mult`` on ``cfg.lr`` (no decay on norms and tokens, a reduced
    encoder learning rate, as the papers' optimisers have them).
    """
    if _has_method(model, "param_groups"):
        groups = [dict(g) for g in model.param_groups(cfg.weight_decay)]
        for g in groups:
            g["lr"] = cfg.lr * g.pop("lr_mult", 1.0)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters (all requires_grad=False)")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def poly_lr(step: int, steps: int, base_lr: float = 1.0, *, power: float = 0.9,
            min_lr: float = 0.0, warmup_steps: int = 0, warmup_ratio: float = 1e-6,
            warmup: str = "mmengine") -> float:
    """The papers' learning rate at ``step`` (0-based): mmseg's poly decay after a linear warm-up.

    Poly (``PolyLR`` of mmseg 1.x / mmengine, ``PolyLrUpdaterHook`` of mmcv 1.x), with
    ``eta_min`` = ``min_lr``::

        poly(t) = (base_lr - min_lr) * (1 - t)^power + min_lr,   t in [0, 1]

    The linear warm-up factor over the first ``warmup_steps`` steps is
    ``w(s) = warmup_ratio + (1 - warmup_ratio) * s / warmup_steps``. The two frameworks the
    official configs run on compose the two differently; ``warmup`` picks one:

    - ``"mmengine"`` (mmseg 1.x: Rein's and QueryDiff's configs; the lessons' loop):
      ``LinearLR`` then ``PolyLR`` over the remaining steps,
      ``lr = base_lr * w(s)`` while ``s < warmup_steps``, then
      ``poly((s - warmup_steps) / (steps - warmup_steps))``;
    - ``"mmcv"`` (mmcv 1.x: tqdm's and MFuser's configs; ``reprod.train``): the warm-up scales
      the poly decay over all the steps, ``lr = poly(s / steps) * w(s)`` (``w = 1`` after it).

    Without a warm-up both give ``poly(s / steps)``. ``power=1`` is a linear decay and
    ``power=0`` a constant rate. Past ``steps`` the rate stays at ``min_lr``.
    """
    if warmup not in ("mmengine", "mmcv"):
        raise ValueError(f"unknown warm-up form {warmup!r}; choose mmengine or mmcv")
    warm = 1.0
    if step < warmup_steps:
        warm = warmup_ratio + (1 - warmup_ratio) * step / warmup_steps
        if warmup == "mmengine":
            return base_lr * warm
    if warmup == "mmengine":
        t = (step - warmup_steps) / max(steps - warmup_steps, 1)
    else:
        t = step / steps
    return ((base_lr - min_lr) * (1 - min(t, 1.0)) ** power + min_lr) * warm


SCHEDULE_POWER = {"poly": 0.9, "linear": 1.0, "constant": 0.0}


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier at ``step`` (0-based): :func:`poly_lr` with mmengine's warm-up
    from 1e-6, and the power of ``cfg.schedule`` (poly 0.9, linear 1, constant 0)."""
    return poly_lr(step, cfg.steps, power=SCHEDULE_POWER[cfg.schedule],
                   warmup_steps=cfg.warmup_steps, warmup_ratio=1e-6, warmup="mmengine")


class NonFiniteLoss(FloatingPointError):
    """A step's summed loss is NaN or infinite; ``loss`` and ``parts`` (the terms) say which.
    Raised before any gradient is applied."""

    def __init__(self, loss: float, parts: Mapping[str, float]):
        self.loss, self.parts = loss, dict(parts)
        super().__init__(f"non-finite loss {loss} (parts: {self.parts})")


# Attention's kernel for a bfloat16 training step on a CPU: the math path (softmax(QK^T)V as
# matmuls). Profiled on an AMX Xeon, torch 2.14, the toy ViT's step on 16 scenes at 64x128: the
# flash kernel's bf16 backward took 3.5x its fp32 time, over a third of the bf16 step.
CPU_BF16_ATTENTION = SDPBackend.MATH


def train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
               optimizer: torch.optim.Optimizer, grad_clip: float | None = None, *,
               autocast_dtype: torch.dtype | None = None,
               scaler: torch.amp.GradScaler | None = None,
               forward: Callable[[torch.Tensor, torch.Tensor], Mapping[str, torch.Tensor]]
               | None = None) -> dict[str, float]:
    """One optimisation step: forward, summed losses, backward, (clip), step. Returns floats.

    The hooks a larger run needs (``reprod.train`` uses them; the lessons use none):

    - ``autocast_dtype``: run the forward under ``torch.autocast`` in that dtype (bfloat16, or
      float16 with a ``scaler``); weights and optimiser stay in their own dtype. On a CPU in
      bfloat16, attention takes PyTorch's math path: its CPU flash kernel's bfloat16 backward
      costs more than the float32 step saves (``CPU_BF16_ATTENTION``). Check a model before
      training it in bf16 on a CPU: PyTorch 2.14's CPU bf16 convolutions get a kernel = stride
      >= 4 convolution of few (< 32) input channels wrong, as in the input gradient of CAT-Seg's
      4x transposed convolution, and dilated depthwise ones of a channels-last map
      (``reprod.toy.bf16_check``);
    - ``scaler``: a ``torch.amp.GradScaler``: the loss is scaled for the backward, the gradients
      unscaled before clipping, and the step goes through the scaler (skipped on inf/NaN);
    - ``forward``: ``(images, labels) -> losses`` instead of :func:`compute_losses` on
      ``model`` (e.g. a DistributedDataParallel wrapper, whose gradient synchronisation hooks
      its own ``forward``).

    A non-finite summed loss raises :class:`NonFiniteLoss` before any update.
    """
    model.train()
    amp = (torch.autocast(images.device.type, dtype=autocast_dtype)
           if autocast_dtype is not None else nullcontext())
    cpu_bf16 = autocast_dtype == torch.bfloat16 and images.device.type == "cpu"
    attention = sdpa_kernel(CPU_BF16_ATTENTION) if cpu_bf16 else nullcontext()
    with amp, attention:
        losses = dict(forward(images, labels) if forward is not None
                      else compute_losses(model, images, labels))
    total = sum(losses.values())
    if not torch.isfinite(total):
        raise NonFiniteLoss(float(total.detach()),
                            {k: round(float(v.detach()), 4) for k, v in losses.items()})
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(total).backward()
        if grad_clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        total.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
    out = {k: float(v.detach()) for k, v in losses.items()}
    out["loss"] = float(total.detach())
    return out


def _batches(dataset: Dataset, cfg: TrainConfig) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled batches, reshuffled each epoch from the config's seed."""
    g = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                        num_workers=cfg.num_workers, generator=g)
    if len(loader) == 0:
        raise ValueError(f"dataset of {len(dataset)} items is smaller than one batch "
                         f"({cfg.batch_size})")
    while True:
        yield from loader


def train(model: nn.Module, dataset: Dataset, config: TrainConfig | None = None,
          val_dataset: Dataset | None = None,
          callback: Callable[[int, dict[str, float]], None] | None = None) -> History:
    """Train ``model`` on ``dataset`` for ``config.steps`` steps; validate on ``val_dataset``.

    With a validation set and ``select_best``, the weights with the best validation mIoU are
    restored at the end (model selection on the validation style, as the toy protocol says).
    """
    cfg = config or TrainConfig()
    device = torch.device(cfg.device) if cfg.device else get_device()
    model.to(device)
    torch.manual_seed(cfg.seed)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    hist = History(config=asdict(cfg))
    best_state = None
    batches = _batches(dataset, cfg)
    aug = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 17)       # augmentation draws
    amp = torch.bfloat16 if cfg.autocast == "bf16" else None
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="train", leave=False, **_quiet(cfg.progress))
    for step in bar:
        images, labels = next(batches)
        if cfg.augment:
            images, labels = augment_batch(images, labels, aug)
        out = train_step(model, images.to(device), labels.to(device), optimizer, cfg.grad_clip,
                         autocast_dtype=amp)
        hist.steps.append(step + 1)
        hist.loss.append(out["loss"])
        hist.lr.append(max(scheduler.get_last_lr()))
        scheduler.step()
        bar.set_postfix(loss=f"{out['loss']:.3f}")
        if callback is not None:
            callback(step + 1, out)
        last = step + 1 == cfg.steps
        due = last or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)
        if val_dataset is not None and due:
            miou = evaluate(model, val_dataset, batch_size=cfg.batch_size * 2,
                            max_batches=cfg.eval_batches)["mean_iou"]
            hist.val_steps.append(step + 1)
            hist.val_miou.append(miou)
            if hist.best_miou is None or miou > hist.best_miou:
                hist.best_miou, hist.best_step = miou, step + 1
                if cfg.select_best and not last:
                    best_state = copy.deepcopy(model.state_dict())
    hist.seconds = time.perf_counter() - start
    hist.images_per_second = cfg.steps * cfg.batch_size / max(hist.seconds, 1e-9)
    if best_state is not None and hist.best_step != cfg.steps:
        model.load_state_dict(best_state)
    return hist


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 32,
             num_classes: int = NUM_CLASSES, max_batches: int | None = None,
             device: torch.device | str | None = None) -> dict:
    """mIoU of ``model`` over ``dataset``: dict with mean_iou, per_class_iou (K,), confusion."""
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(num_classes)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for k, (images, labels) in enumerate(loader):
        if max_batches is not None and k >= max_batches:
            break
        scores = predict(model, images.to(device))                       # (B, K, H, W)
        cm.update(scores.argmax(1), labels.to(device))
    model.train(was_training)
    return {"mean_iou": _nan_to_zero(cm.compute()["mean_iou"]),
            "per_class_iou": per_class_iou(cm.matrix), "confusion": cm.matrix}


def evaluate_domains(model: nn.Module, datasets: Mapping[str, Dataset], batch_size: int = 32,
                     progress: bool = False) -> dict[str, float]:
    """mIoU per domain, in the mapping's order: ``{domain: miou}`` (fractions in [0, 1])."""
    out = {}
    for name, ds in tqdm(datasets.items(), desc="evaluate", leave=False, **_quiet(progress)):
        out[name] = evaluate(model, ds, batch_size=batch_size)["mean_iou"]
    return out


def domain_table(results: Mapping[str, Mapping[str, float]], digits: int = 1,
                 source: str = "synthetic") -> str:
    """A text table of mIoU (%) with models as rows and domains as columns, plus a mean column
    whose header says what it averages: "targets' mean" (every column but ``source``) when the
    source is shown beside other domains, "mean" (every column) when it is not; no mean column
    for a single domain."""
    if not results or not all(results.values()):
        raise ValueError("domain_table needs at least one model with at least one domain")
    domains = list(next(iter(results.values())).keys())
    averaged = [d for d in domains if d != source] if source in domains else domains
    header = "targets' mean" if len(averaged) < len(domains) else "mean"
    with_mean = len(domains) > 1 and bool(averaged)
    width = max(9, *(len(d) + 1 for d in domains))
    mean_w = max(width, len(header) + 1)
    name_w = max(12, *(len(m) + 1 for m in results))
    lines = [f"{'model':<{name_w}}" + "".join(f"{d:>{width}}" for d in domains)
             + (f"{header:>{mean_w}}" if with_mean else "")]
    for model_name, res in results.items():
        vals = {d: 100 * res[d] for d in domains}
        mean = sum(vals[d] for d in averaged) / len(averaged) if with_mean else None
        lines.append(f"{model_name:<{name_w}}" + "".join(f"{v:>{width}.{digits}f}"
                                                         for v in vals.values())
                     + (f"{mean:>{mean_w}.{digits}f}" if with_mean else ""))
    return "\n".join(lines)


def _quiet(progress: bool) -> dict:
    """tqdm arguments: off when asked, else tqdm's defaults (so TQDM_DISABLE=1 still works)."""
    return {} if progress else {"disable": True}


def _has_method(model: nn.Module, name: str) -> bool:
    """A method defined on the model's class (not a sub-module that happens to share the name)."""
    return callable(getattr(type(model), name, None))


def _nan_to_zero(x: float) -> float:
    return 0.0 if math.isnan(x) else float(x)
