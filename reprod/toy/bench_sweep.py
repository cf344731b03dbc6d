"""Benchmark: where a toy-sweep run's time goes on a CPU, and what a faster loop would save.

    python -m reprod.toy.bench_sweep                          # frozen, rein, full; one thread
    python -m reprod.toy.bench_sweep --methods tqdm mfuser --threads 2 --json runs/bench.json
    python -m reprod.toy.bench_sweep --check 60               # also time a real run_one

``lessons.benchmark.run_one`` trains one (method, seed) for ``SWEEP_TRAIN``'s 500 steps of 16
source scenes, validates on 200 ``validation`` scenes every 100 steps and scores 200 test scenes
in each of the nine domains. This times each piece of that on its own, on one model built by
the method's builder (on the course's world's committed toy models), in the same process; the
scenes come from ``--world`` (default: the course's; world 2 renders shadows, textures and more
content, so its scenes cost more):

- ``render``: 16 training scenes rendered on the fly (ToyWorld draws every scene from its seed at
  every access, so 500 steps render the 2,000-scene split four times over);
- ``augment, per image``: the recipes' flip and photometric distortion as ``run_one`` applies them
  today (``lessons.augment.Augmented``: numpy, one HSV round trip per image) and ``augment,
  batched`` (``lessons.augment.augment_batch``: one torch pass for the 16);
- ``step fp32`` and ``step bf16``: ``lessons.train.train_step`` (forward, loss, backward, AdamW),
  the second under bfloat16 autocast, measured only where it is native (AMX / AVX512-BF16 CPUs);
- ``forward fp32`` / ``bf16``: ``lessons.train.predict`` on 32 scenes, per scene;
- ``render, evaluation``: a scene of each evaluated domain (weather costs more than the source).

From these it prints the projected run **as run_one does it today** (render every step, augment
per image, fp32, render the validation set at every validation) beside **cached and batched**
(render the 2,000 training and 200 validation scenes once, augment per batch, still fp32: world
2's loop on a CPU, whose bf16 kernels are wrong for some of the course's layers,
``reprod.toy.bf16_check``), and the ratio of the two, measured in the same run. The bf16 step
and forward are still timed, as what bf16 would buy on a CPU whose kernels were right.
``--check N`` also times a real ``run_one`` of N steps (validation every N/5, 40 test scenes per
domain) against the projection for that size, so a reader can see how far the sum of the pieces
is from the whole.
``--compile`` also times the step of a ``torch.compile``-d copy of the model (``nn.Module.compile``,
inductor; float32): its compilation (the first three steps) and its step.

**The ceiling.** ``step GFLOP`` counts one float32 training step's floating-point operations
(``torch.utils.flop_counter.FlopCounterMode``: matmuls, convolutions and attention, forward and
backward; the optimizer and elementwise work are not counted), and the peer measured in the same
process, ``matmul GFLOP/s``, is the rate a square float32 matmul (``MATMUL_SIZE``) reaches on the
same threads: the step's rate over the matmul's says how much room is left for a faster
float32 step on this CPU (a step already near it cannot be made much faster by compiling).

Threads: one by default, as ``python -m reprod.toy.sweep --jobs 2`` runs each job on one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lessons import toyworld as tw
from lessons.augment import Augmented, augment_batch
from lessons.benchmark import METHODS, SWEEP_TRAIN, run_one, train_config
from lessons.checkpoints import build_model
from lessons.train import make_optimizer, predict, train_step
from lessons.utils import hardware, seed_everything
from reprod.toy.resumable import bf16_autocast_pays

__all__ = ["DEFAULT_METHODS", "Costs", "main", "measure", "project"]

DEFAULT_METHODS = ("frozen", "rein", "full")
BATCH, EVAL_BATCH = 16, 32
MATMUL_SIZE = 1024                # the peer: (1024, 1024) @ (1024, 1024) in float32


def _median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class Costs(dict):
    """Seconds per piece (keys as the module docstring names them; None: not measured)."""


def matmul_rate(repeats: int = 5, n: int = MATMUL_SIZE) -> float:
    """GFLOP/s of a square float32 matmul on this process's threads (the step's peer)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / _median_seconds(lambda: a @ b, max(repeats, 5), warmup=2) / 1e9


def step_gflop(step: Callable[[], object]) -> float:
    """Floating-point operations of one call of ``step`` in GFLOP, as FlopCounterMode counts them
    (matmuls, convolutions, attention; forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / 1e9


def _render_seconds(dataset: tw.ToyWorld, n: int, offset: int = 0) -> float:
    start = time.perf_counter()
    for i in range(offset, offset + n):
        dataset[i % len(dataset)]
    return (time.perf_counter() - start) / n


def measure(method: str, repeats: int = 5, world: str | None = None,
            compiled: bool = False) -> Costs:
    """Seconds of each piece of one ``run_one`` of ``method`` (module docstring), per batch of 16
    for training pieces and per scene for evaluation pieces; scenes from ``world``; with
    ``compiled``, also the compiled model's compilation and step."""
    seed_everything(0)
    cfg = train_config(method, 0)
    spec = METHODS[method]
    sets = tw.benchmark_datasets(0, world=world)
    train_set = sets["train"]
    c = Costs(method=method)
    c["render"] = BATCH * _render_seconds(train_set, BATCH * repeats)
    pairs = [train_set[i] for i in range(BATCH)]
    images = torch.stack([x for x, _ in pairs])                               # (16, 3, H, W)
    labels = torch.stack([y for _, y in pairs])                               # (16, H, W)
    per_image = Augmented(pairs, seed=0)             # over rendered scenes: augmentation only
    c["augment, per image"] = _median_seconds(lambda: [per_image[i] for i in range(BATCH)],
                                              repeats)
    g = torch.Generator().manual_seed(0)
    c["augment, batched"] = _median_seconds(lambda: augment_batch(images, labels, g), repeats)
    model = build_model(spec.builder, spec.builder_kwargs)
    opt = make_optimizer(model, cfg)
    c["step fp32"] = _median_seconds(lambda: train_step(model, images, labels, opt,
                                                        cfg.grad_clip), repeats)
    c["step GFLOP"] = step_gflop(lambda: train_step(model, images, labels, opt, cfg.grad_clip))
    native = bf16_autocast_pays(torch.device("cpu"))
    c["step bf16"] = (_median_seconds(lambda: train_step(model, images, labels, opt, cfg.grad_clip,
                                                         autocast_dtype=torch.bfloat16), repeats)
                      if native else None)
    model.eval()
    scenes = torch.stack([train_set[i][0] for i in range(EVAL_BATCH)])

    def forward(dtype: torch.dtype | None) -> Callable[[], object]:
        def run():
            with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                predict(model, scenes)
        return run

    c["forward fp32"] = _median_seconds(forward(None), repeats) / EVAL_BATCH
    c["forward bf16"] = (_median_seconds(forward(torch.bfloat16), repeats) / EVAL_BATCH
                         if native else None)
    evaluated = [d for d in sets if d != "train"] + [
        tw.ToyWorld(tw.SOURCE_DOMAIN, "test", length=200, seed=0, world=world)]
    c["render, evaluation"] = float(np.mean([
        _render_seconds(sets[d] if isinstance(d, str) else d, 2 * repeats) for d in evaluated]))
    if compiled:
        c |= _compiled_step(method, images, labels, repeats, None)
    return c


def _compiled_step(method: str, images: torch.Tensor, labels: torch.Tensor, repeats: int,
                   dtype: torch.dtype | None) -> dict[str, float]:
    """The compilation (three steps) and step of a fresh, compiled copy of ``method``'s model."""
    spec, cfg = METHODS[method], train_config(method, 0)
    seed_everything(0)
    model = build_model(spec.builder, spec.builder_kwargs)
    opt = make_optimizer(model, cfg)
    model.compile()

    def step():
        return train_step(model, images, labels, opt, cfg.grad_clip, autocast_dtype=dtype)

    start = time.perf_counter()
    for _ in range(3):
        step()
    return {"compile seconds": time.perf_counter() - start,
            "step compiled": _median_seconds(step, repeats)}


def project(c: Costs, steps: int = SWEEP_TRAIN["steps"],
            validations: int | None = None, val_scenes: int = 200,
            test_scenes: int = 200, train_scenes: int = 2000) -> dict[str, float]:
    """The run's seconds, today and cached + batched (module docstring), from measured pieces."""
    validations = validations or steps // SWEEP_TRAIN["eval_every"]
    domains = 1 + len(tw.TARGET_DOMAINS)
    test = domains * test_scenes * (c["render, evaluation"] + c["forward fp32"])
    today = (steps * (c["render"] + c["augment, per image"] + c["step fp32"])
             + validations * val_scenes * (c["render, evaluation"] + c["forward fp32"]) + test)
    renders = train_scenes / BATCH * c["render"] + val_scenes * c["render, evaluation"]
    faster = (renders + steps * (c["augment, batched"] + c["step fp32"])
              + validations * val_scenes * c["forward fp32"] + test)       # float32 on a CPU
    return {"today": today, "cached and batched": faster,
            "training step share today": steps * c["step fp32"] / today}


def _check(method: str, steps: int, costs: Costs, world: str) -> dict[str, float]:
    """A real ``run_one`` of ``steps`` steps (validation every steps/5, 40 test scenes) in
    ``world`` against the projection of the same size: of today's loop for world 1, of the
    cached and batched one for world 2 (``lessons.benchmark``'s loop of each world)."""
    with tw.in_world(world):
        start = time.perf_counter()
        run_one(method, 0, steps=steps, test_length=40,
                overrides={"eval_every": max(steps // 5, 1)})
        seconds = time.perf_counter() - start
    loop = "cached and batched" if world == tw.TOYWORLD_VERSION else "today"
    projected = project(costs, steps, validations=5, test_scenes=40)[loop]
    return {"run_one seconds": seconds, "projected": projected, "loop": loop}


def _table(rows: list[Costs], runs: dict[str, dict]) -> str:
    keys = ["render", "augment, per image", "augment, batched", "step fp32", "step bf16"]
    per_scene = ["forward fp32", "forward bf16", "render, evaluation"]
    head = ("method | " + " | ".join(f"{k} (ms/16)" for k in keys) + " | "
            + " | ".join(f"{k} (ms/scene)" for k in per_scene)
            + " | run today (s) | cached + batched (s) | ratio |")
    out = [head, "|".join(["---"] * (len(keys) + len(per_scene) + 4))]
    for c in rows:
        cells = ["n/a" if c[k] is None else f"{1000 * c[k]:.1f}" for k in keys + per_scene]
        r = runs[c["method"]]
        out.append(f"{c['method']} | " + " | ".join(cells) + f" | {r['today']:.0f} | "
                   f"{r['cached and batched']:.0f} | {r['today'] / r['cached and batched']:.2f}x |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--world", choices=tw.WORLD_VERSIONS, default=tw.COURSE_WORLD,
                    help="the ToyWorld the scenes come from (default: the course's)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--check", type=int, default=0, metavar="STEPS",
                    help="also time a real run_one of STEPS steps against its projection")
    ap.add_argument("--json", type=Path, default=None, help="write the measurements here")
    ap.add_argument("--compile", action="store_true",
                    help="also time the step of a torch.compile-d model (and its compilation)")
    args = ap.parse_args(argv)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    if args.threads < 1 or args.repeats < 1 or args.check < 0:
        ap.error("--threads and --repeats must be >= 1, --check >= 0")
    torch.set_num_threads(args.threads)
    print(f"scenes of ToyWorld {args.world}, {hardware('cpu')}, {args.threads} thread(s), "
          f"torch {torch.__version__}; bf16 autocast native: "
          f"{bf16_autocast_pays(torch.device('cpu'))}", flush=True)
    rows, runs, checks = [], {}, {}
    matmul = matmul_rate(args.repeats)
    for m in args.methods:
        with tw.in_world(args.world):            # its toy models and its loop, too
            rows.append(measure(m, args.repeats, args.world, args.compile))
        runs[m] = project(rows[-1])
        if args.check:
            checks[m] = _check(m, args.check, rows[-1], args.world)
        print(f"{m}: measured", flush=True)
    print(_table(rows, runs))
    for m, r in runs.items():
        print(f"{m}: the training steps are {100 * r['training step share today']:.0f}% of "
              "today's run")
    print(f"the peer: a {MATMUL_SIZE}-square float32 matmul runs at {matmul:.0f} GFLOP/s here")
    for c in rows:
        rate = c["step GFLOP"] / c["step fp32"]
        print(f"{c['method']}: {c['step GFLOP']:.1f} GFLOP a float32 step, {rate:.0f} GFLOP/s "
              f"({100 * rate / matmul:.0f}% of the matmul's rate)")
    for c in rows:
        if "step compiled" in c:
            eager = c["step fp32"]
            print(f"{c['method']}: compiled step {1000 * c['step compiled']:.0f} ms against "
                  f"{1000 * eager:.0f} ms eager ({eager / c['step compiled']:.2f}x), after "
                  f"{c['compile seconds']:.0f} s of compilation")
    for m, c in checks.items():
        print(f"{m}: run_one of {args.check} steps ({c['loop']}) took "
              f"{c['run_one seconds']:.1f} s; the pieces project {c['projected']:.1f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"hardware": hardware("cpu"), "threads": args.threads,
                                         "world": args.world, "matmul GFLOP/s": matmul,
                                         "torch": torch.__version__, "pieces": rows,
                                         "runs": runs, "checks": checks}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
