"""Notebook 02's forgetting curve on ToyWorld 2: what full fine-tuning does to the targets.

    python -m reprod.toy.preconditions forgetting            # seeds 0-2, the sweep's budget
    python -m reprod.toy.preconditions forgetting --seeds 0 --steps 200 --out runs/f.json

Rein's argument against full fine-tuning (Rein, section 1 and Table 2) is that it overwrites what
the foundation model knew: the source's labels pull every weight toward the source's look. A
forgetting curve shows it as it happens: the target mIoU of full fine-tuning at every
``EVERY``-th step, at the sweep's encoder learning rate and a tenth of it (``LR_MULTS``; the head
keeps its own), beside the frozen encoder under the same head and recipe. It reads two targets:
``citylike``, whose look the toy VFM's pretraining world covers (its ``urban`` family), and
``streetview``, whose family is outside it. Everything else is the sweep's (``lessons.benchmark``:
recipe, budget, augmentation, seeds), and no checkpoint is selected: the curve is the run.

The lessons' other precondition experiments are sweep runs (``lessons.benchmark.METHODS`` with
``precondition=True``, seeds 0-2: the invariance-taught VFM of notebook 02, the oracle and
shuffled guidance of 05, the near-twin towers of 07), run by ``python -m reprod.toy.sweep
--world 2.0``; the analyses of 03 and 04 read the sweep's results and checkpoints.

Dimension glossary: none (runs and curves).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lessons import toyworld as tw
from lessons.benchmark import METHODS, PRECONDITION_SEEDS, forgetting_file, train_config
from lessons.checkpoints import build_model
from lessons.train import evaluate, train
from lessons.utils import hardware, seed_everything
from reprod.toy.sweep import add_result

__all__ = ["EVERY", "LR_MULTS", "TARGETS", "forgetting_run", "main"]

EVERY = 100                       # steps between two readings of the targets
LR_MULTS = (1.0, 0.1)             # full fine-tuning's encoder learning rate, x the sweep's
TARGETS = ("citylike", "streetview")      # inside / outside the toy VFM's pretraining looks
TEST_LENGTH = 100                 # test scenes per target at each reading


def results_file() -> Path:
    """Where the forgetting curves go: beside world 2's sweep results."""
    return forgetting_file()


def run_key(method: str, lr_mult: float, seed: int) -> str:
    return f"{method}/lr_x{lr_mult:g}/seed{seed}"


def forgetting_run(method: str, seed: int, lr_mult: float = 1.0, steps: int | None = None,
                   every: int = EVERY, targets: tuple[str, ...] = TARGETS,
                   test_length: int | None = None) -> dict:
    """One run of ``method`` (``full`` or ``frozen``) with the encoder's learning rate times
    ``lr_mult``, the targets' mIoU read every ``every`` steps and at the end (world 2)."""
    if method not in ("full", "frozen"):
        raise ValueError(f"the forgetting curve compares full and frozen, got {method!r}")
    test_length = TEST_LENGTH if test_length is None else test_length
    with tw.in_world(tw.TOYWORLD_VERSION):
        spec = METHODS[method]
        cfg = train_config(method, seed, steps, {"select_best": False, "eval_every": 0})
        sets = tw.benchmark_datasets(seed, {**tw.toy_benchmark(), "targets": targets,
                                            "test_length": test_length})
        source = tw.Rendered(sets.pop("train"))
        scenes = {d: tw.Rendered(sets[d]) for d in targets}
        seed_everything(seed)
        model = build_model(spec.builder, {**spec.builder_kwargs, "backbone_lr_mult": lr_mult})
        curve = {"steps": [], **{d: [] for d in targets}}

        def read(step: int, _out: dict) -> None:
            if step % every and step != cfg.steps:
                return
            curve["steps"].append(step)
            for d, data in scenes.items():
                miou = evaluate(model, data, batch_size=2 * cfg.batch_size)["mean_iou"]
                curve[d].append(round(float(miou), 4))

        start = time.perf_counter()
        train(model, source, cfg, callback=read)
    return {"method": method, "seed": seed, "lr_mult": lr_mult, "steps": cfg.steps,
            "every": every, "test_length": test_length, "curve": curve,
            "toyworld_version": tw.TOYWORLD_VERSION, "hardware": hardware(),
            "seconds": round(time.perf_counter() - start, 1)}


def plan(seeds: tuple[int, ...]) -> list[tuple[str, float, int]]:
    """(method, encoder lr multiplier, seed) of every run: full at each ``LR_MULTS``, frozen."""
    return [(m, mult, s) for s in seeds
            for m, mult in [("full", x) for x in LR_MULTS] + [("frozen", 1.0)]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("experiment", choices=["forgetting"])
    ap.add_argument("--seeds", nargs="+", type=int, default=list(PRECONDITION_SEEDS))
    ap.add_argument("--steps", type=int, default=None, help="default: the sweep's budget")
    ap.add_argument("--every", type=int, default=EVERY)
    ap.add_argument("--out", type=Path, default=None, help="default: forgetting.json beside "
                    "world 2's sweep results")
    args = ap.parse_args(argv)
    if args.every < 1 or (args.steps is not None and args.steps < 1):
        ap.error("--steps and --every must be >= 1")
    out = args.out or results_file()
    done = json.loads(out.read_text())["runs"] if out.is_file() else {}
    for method, mult, seed in plan(tuple(args.seeds)):
        key = run_key(method, mult, seed)
        with tw.in_world(tw.TOYWORLD_VERSION):
            steps = args.steps or train_config(method, seed).steps
        if key in done and (done[key]["steps"], done[key]["every"]) == (steps, args.every):
            print(f"{key}: done, skipped")
            continue
        rec = forgetting_run(method, seed, mult, args.steps, args.every)
        add_result(key, rec, out)
        last = {d: f"{100 * rec['curve'][d][-1]:.1f}" for d in TARGETS}
        print(f"{key}: {rec['seconds']:.0f} s, last reading {last}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
