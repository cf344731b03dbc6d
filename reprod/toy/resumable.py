"""A training run that can stop at any chunk boundary and resume bit for bit.

The toy models are pretrained in chunks of under ten minutes so a run can be split across short
GPU jobs or a laptop's coffee breaks. A subclass says what its state is (``state_modules``), how
a step's batch is drawn (``data``), how one step's loss is computed from it (``loss``) and what
happens after an optimizer step (``after_step``, e.g. an EMA teacher); this class owns the
learning-rate schedule, the chunked loop (its batches drawn ahead by data workers if asked), the
logging and the atomic save / checked load (a state that is not weights-only, truncated or
damaged is a ValueError naming the file). The batch of step ``i`` must depend only on
``(seed, i)``, so a resumed run sees exactly the data an unbroken one would, with or without
workers.

``bf16`` in a config means bfloat16 autocast *where the hardware has it natively* (a GPU, or a
CPU with AVX512-BF16 or AMX, as oneDNN reports): 1.6x faster on an AMX Xeon. A CPU with AVX2
only emulates bfloat16, and there one toy VFM step took 45 s against 1.7 s in fp32 (2-core AMD
EPYC, measured 2026-12-06), so such a run falls back to fp32 and its card says so.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lessons import toyworld as tw
from lessons.utils import bf16_native, hardware
from reprod.safe_io import load_weights_only

__all__ = [
    "ResumableRun", "bf16_autocast_pays", "card_facts", "cosine_lr", "data_lines", "gate_section",
    "no_data", "sha256", "step_batches", "write_card_files",
]


def sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file (cards name the exact weights they describe)."""
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def card_facts(run: ResumableRun, model: str, weights: Path) -> dict[str, Any]:
    """What every model card states: config, steps, wall time, hardware, seed, ToyWorld version
    and the weights file it describes."""
    return {"model": model, "weights": weights.name, "sha256": sha256(weights),
            "config": asdict(run.cfg), "steps_done": run.step,
            "wall_minutes": round(run.seconds / 60, 1),
            "hardware": run.trained_on or hardware(),
            "seed": run.cfg.seed, "toyworld_version": run.cfg.toyworld_version}


def write_card_files(facts: dict[str, Any], lines: list[str], weights: Path) -> Path:
    """Write the card beside the weights: ``<name>.md`` for people, ``<name>.json`` for code."""
    weights.with_suffix(".json").write_text(json.dumps(facts, indent=1, default=str) + "\n")
    card = weights.with_suffix(".md")
    card.write_text("\n".join(lines))
    return card


def bf16_autocast_pays(device: torch.device) -> bool:
    """Whether bfloat16 autocast is native on ``device`` (see the module docstring): a CUDA GPU
    that supports it, or a CPU whose oneDNN has bfloat16 kernels (``lessons.utils.bf16_native``)."""
    return bf16_native(device)


def cosine_lr(step: int, lr: float, min_lr: float, warmup: int, steps: int) -> float:
    """Linear warm-up to ``lr``, then a cosine decay to ``min_lr`` at ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(steps - warmup, 1)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


class ResumableRun:
    """Chunked training with exact resumption; subclasses set ``name``, ``model`` and ``opt``.

    The config is a dataclass with at least ``steps``, ``lr``, ``min_lr``, ``warmup_steps``,
    ``grad_clip`` and ``bf16`` (run ``loss`` under bfloat16 autocast where it is native:
    :func:`bf16_autocast_pays`).
    """

    name = "run"
    model: nn.Module                    # what the optimizer trains
    opt: torch.optim.Optimizer

    def __init__(self, cfg: Any, run_dir: str | Path, device: str | None = None):
        self.cfg, self.dir = cfg, Path(run_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.step, self.seconds, self.log = 0, 0.0, []
        self.trained_on: str | None = None    # hardware and precision of the chunks, for the card

    # --- what a subclass provides -------------------------------------------------------------
    def state_modules(self) -> dict[str, Any]:
        """Everything with a ``state_dict`` (or plain tensors / dicts of them) to save."""
        return {"model": self.model, "opt": self.opt}

    def data(self) -> Callable[[int], Any]:
        """Step -> that step's batch on the CPU, a function of ``(seed, step)`` only; picklable
        (a module-level function with the config bound), so data workers can draw it."""
        return no_data

    def loss(self, step: int, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """The step's loss on its batch (from :meth:`data`) and the parts to log."""
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Called after each optimizer step (an EMA teacher update goes here)."""

    # --- the loop -------------------------------------------------------------------------------
    @property
    def ckpt(self) -> Path:
        return self.dir / f"{self.name}_state.pt"

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.state_dict() if hasattr(v, "state_dict") else v
                 for k, v in self.state_modules().items()}
        state |= {"cfg": asdict(self.cfg), "step": self.step, "seconds": self.seconds,
                  "log": self.log, "trained_on": self.trained_on}
        tmp = self.ckpt.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.ckpt)                       # atomic: a killed job leaves the old one

    def load(self) -> bool:
        """Restore the saved state if there is one (False if not); refuse another config."""
        if not self.ckpt.exists():
            return False
        state = load_weights_only(self.ckpt, f"{self.name} run state")   # CPU; GPU runs too
        if not isinstance(state, dict) or not {"cfg", "step", "seconds", "log"} <= set(state):
            raise ValueError(f"{self.ckpt} is not a {self.name} run state")
        if state["cfg"] != asdict(self.cfg):
            diff = {k: (state["cfg"].get(k), v) for k, v in asdict(self.cfg).items()
                    if state["cfg"].get(k) != v}
            raise ValueError(f"{self.ckpt} was made with another config: {diff}; use another "
                             f"--run-dir or the same settings")
        for key, obj in self.state_modules().items():
            if hasattr(obj, "load_state_dict"):
                obj.load_state_dict(state[key])
            else:
                self._restore(key, state[key])
        self.step, self.seconds, self.log = state["step"], state["seconds"], state["log"]
        self.trained_on = state.get("trained_on")
        return True

    def _restore(self, key: str, value: Any) -> None:
        setattr(self, key, value)

    def train_chunk(self, minutes: float, log_every: int = 25, stop_at: int | None = None,
                    workers: int = 0) -> None:
        """Train until the run is done (or at step ``stop_at``) or ``minutes`` have passed; save.

        ``workers`` > 0 draws the batches ahead in that many data processes (:func:`step_batches`):
        the same batches, so the same weights, as ``workers=0``; on a GPU the renderer, not the
        model, is the bottleneck of a toy step."""
        cfg, start = self.cfg, time.perf_counter()
        bf16 = bool(cfg.bf16) and bf16_autocast_pays(self.device)
        self.trained_on = f"{hardware(self.device)}, {'bf16 autocast' if bf16 else 'fp32'}"
        device = self.device.type
        last = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
        self.model.train()
        batches = step_batches(self.data(), self.step, last, workers)
        for batch in batches:
            if time.perf_counter() - start >= 60 * minutes:
                break
            for group in self.opt.param_groups:
                group["lr"] = cosine_lr(self.step, cfg.lr, cfg.min_lr, cfg.warmup_steps,
                                        cfg.steps)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                loss, parts = self.loss(self.step, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at step {self.step}: {parts}")
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.opt.step()
            self.after_step(self.step)
            self.step += 1
            if self.step % log_every == 0 or self.step == cfg.steps:
                self.log.append({"step": self.step, "loss": loss.item(), **parts})
                print(f"step {self.step}/{cfg.steps} loss {loss.item():.3f} "
                      + " ".join(f"{k} {v:.3f}" for k, v in parts.items()), flush=True)
        del batches                                      # stops the data workers, if any
        self.seconds += time.perf_counter() - start
        self.save()


def no_data(step: int) -> None:
    """The data of a run whose ``loss`` draws nothing (tests' tiny runs)."""
    return None


class _StepData(torch.utils.data.Dataset):
    """Steps ``first .. last - 1`` as a map-style dataset: item ``i`` is step ``first + i``'s
    batch."""

    def __init__(self, make: Callable[[int], Any], first: int, last: int):
        self.make, self.first, self.last = make, first, last

    def __len__(self) -> int:
        return max(self.last - self.first, 0)

    def __getitem__(self, i: int) -> Any:
        return self.make(self.first + i)


def _enter_world(world: str, worker_id: int) -> None:
    tw.use_world(world)            # a data worker renders in the world its parent trains in


def step_batches(make: Callable[[int], Any], first: int, last: int, workers: int = 0
                 ) -> Iterator[Any]:
    """The batches of steps ``first .. last - 1`` in order: drawn here (``workers=0``), or ahead
    in ``workers`` processes by a ``DataLoader`` (``make`` must then be picklable: a module-level
    function of the step and the config). Each batch depends only on its step, so both give the
    same data; stopping early (a chunk's time is up) just drops the iterator."""
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if workers == 0:
        return (make(step) for step in range(first, last))
    loader = torch.utils.data.DataLoader(
        _StepData(make, first, last), batch_size=None, shuffle=False, num_workers=workers,
        prefetch_factor=4, worker_init_fn=partial(_enter_world, tw.current_world()))
    return iter(loader)


def data_lines(what: str, teacher: bool = False) -> list[str]:
    """A card's lines on its pretraining data and the benchmark looks that data contains."""
    from lessons import toyworld as tw

    inside = list(tw.PRETRAINING["covered_targets"]) + (["painted"] if teacher else [])
    outside = [d for d in tw.PRETRAINING["outside"] if not (teacher and d == "painted")]
    return [f"- data: {what}",
            f"- benchmark looks inside its data: {', '.join(inside)}; outside it: "
            f"{', '.join(outside)} (the source's rendered family, streetview's family with its "
            "glass panels and pavers" + ("" if teacher else ", the painted style") + ")"]


def gate_section(names: tuple[str, ...], weights: Path) -> list[str]:
    """The card's gate lines (``reprod.toy.gates``), if the gates were measured on these weights."""
    import json

    from reprod.toy.gates import GATES_FILE, gate_lines

    path = weights.parent / GATES_FILE.name
    if not path.is_file():
        return ["Gates: not measured yet (`python -m reprod.toy.gates`).", ""]
    record = json.loads(path.read_text())
    verdicts = {k: v for k, v in record["gates"].items() if k in names}
    return ["## Gates (`python -m reprod.toy.gates`, fixed before any method ran on world 2)", "",
            *[f"- {line}" for line in gate_lines(verdicts)], ""]
