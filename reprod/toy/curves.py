"""Learning curves on ToyWorld 2, and the sweep budget they choose, before any comparison runs.

    python -m reprod.toy.curves                           # the main methods, seed 0, 2,000 steps
    python -m reprod.toy.curves --methods frozen rein --jobs 2
    python -m reprod.toy.curves --choose                  # read the curves, print the budget

World 1's sweep stopped at 500 steps while 44 of its 45 runs' validation mIoU was still rising:
its comparisons were of methods at different distances from convergence. On world 2 the budget
is chosen once, from curves, before any paired comparison runs, by a rule written down first:

1. each main method of the course (``MAIN_METHODS``) trains at seed 0 for ``LONG`` steps under
   the sweep's recipe (``lessons.benchmark.train_config``: the same learning rates and their
   ratios, the poly schedule over the long budget), validating on the ``validation`` style every
   ``EVERY`` steps; each run's curve goes into ``CURVES_FILE`` as it finishes (resumable by
   method, the sweep's locked writer);
2. a method has **converged by step s** when its validation mIoU at s is within ``TOLERANCE``
   points of the best it reaches in the long run;
3. the budget is the smallest step of ``GRID`` by which at least ``QUORUM`` of the methods have
   converged. A shorter poly schedule anneals sooner, so the long run's curve is a cautious
   estimate of the step a method needs.

The rule does not look at any target domain, and the sweep (``python -m reprod.toy.sweep``) then
checks the promise the budget makes: most runs peak on the validation style before their last
step. Dimension glossary: none (curves and a rule).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

from lessons import toyworld as tw
from lessons.benchmark import METHODS, run_one, sweep_dir
from reprod.toy.sweep import add_result, start_job

__all__ = ["CURVES_FILE", "EVERY", "GRID", "LONG", "MAIN_METHODS", "QUORUM", "TOLERANCE",
           "budget_bounds", "choose_budget", "converged_at", "main"]

# beside world 2's sweep results, in the package: notebook 08 shows the curves (also on Colab)
CURVES_FILE = sweep_dir(tw.TOYWORLD_VERSION) / "toy_curves.json"
# notebook 08's six main methods (the papers' ranking is compared on them) and the two
# VLM-only models of lessons 03-04, each trained the sweep's way
MAIN_METHODS = ("frozen", "full", "rein", "rein_m2f", "tqdm", "catseg", "querydiff", "mfuser")
LONG, EVERY = 2000, 100
GRID = (250, 500, 750, 1000, 1500, 2000)
TOLERANCE = 1.0           # mIoU points below the run's best validation mIoU
QUORUM = 0.75             # the share of methods that must have converged by the budget


def converged_at(curve: dict, tolerance: float = TOLERANCE) -> int:
    """The first validated step whose mIoU is within ``tolerance`` points of the curve's best."""
    steps, miou = curve["steps"], [100 * v for v in curve["miou"]]
    if not steps or len(steps) != len(miou):
        raise ValueError(f"a curve needs as many steps as mIoU values, got {curve}")
    best = max(miou)
    return next(s for s, m in zip(steps, miou, strict=True) if m >= best - tolerance)


def choose_budget(curves: dict[str, dict], grid: tuple[int, ...] = GRID,
                  quorum: float = QUORUM, tolerance: float = TOLERANCE) -> dict:
    """The rule of the module docstring: the smallest grid step by which ``quorum`` of the
    methods have converged; with each method's step of convergence."""
    if not curves:
        raise ValueError("no curves to choose a budget from (run python -m reprod.toy.curves)")
    at = {m: converged_at(c, tolerance) for m, c in curves.items()}
    for budget in grid:
        share = sum(s <= budget for s in at.values()) / len(at)
        if share >= quorum:
            return {"budget": budget, "converged_at": at, "share": share}
    raise ValueError(f"fewer than {quorum:.0%} of the methods converge within {grid[-1]} "
                     f"steps: {at}; a longer run is needed")


def budget_bounds(curves: dict[str, dict], methods: tuple[str, ...] = MAIN_METHODS,
                  grid: tuple[int, ...] = GRID, quorum: float = QUORUM,
                  tolerance: float = TOLERANCE) -> tuple[int | None, int | None]:
    """The budget the rule gives over ``methods`` when some have no curve (a run that failed):
    (earliest, latest), with every missing method counted as converged at once, then as never
    converged; ``None`` where no grid step reaches the quorum. Equal bounds: the missing curves
    cannot change the budget."""
    at = [converged_at(curves[m], tolerance) for m in methods if m in curves]
    missing = sum(m not in curves for m in methods)

    def first(extra: int) -> int | None:
        return next((g for g in grid
                     if (sum(s <= g for s in at) + extra) / len(methods) >= quorum), None)

    return first(missing), first(0)


def _curve_run(method: str, steps: int, every: int) -> dict:
    start = time.perf_counter()
    rec = run_one(method, 0, steps=steps, test_length=40,
                  overrides={"eval_every": every, "select_best": False})
    return {"method": method, "seed": 0, "toyworld_version": rec["toyworld_version"],
            "train_config": rec["train_config"], "val_curve": rec["val_curve"],
            "hardware": rec["hardware"], "seconds": round(time.perf_counter() - start, 1),
            "final_loss": rec["final_loss"]}


def _keep(method: str, rec: dict, out: Path) -> None:
    add_result(method, rec, out)
    print(f"{method}: {rec['seconds']:.0f} s, best validation mIoU "
          f"{100 * max(rec['val_curve']['miou']):.1f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=list(MAIN_METHODS), choices=list(METHODS))
    ap.add_argument("--steps", type=int, default=LONG, help=f"the long budget (default {LONG})")
    ap.add_argument("--every", type=int, default=EVERY, help="steps between validations")
    ap.add_argument("--out", type=Path, default=CURVES_FILE)
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time, in processes")
    ap.add_argument("--choose", action="store_true", help="read the curves, print the budget")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.every < 1 or args.jobs < 1:
        ap.error("--steps, --every and --jobs must be >= 1")
    done = json.loads(args.out.read_text())["runs"] if args.out.is_file() else {}
    if args.choose:
        curves = {m: r["val_curve"] for m, r in done.items()}
        missing = [m for m in MAIN_METHODS if m not in curves]
        if missing:
            low, high = budget_bounds(curves, MAIN_METHODS)
            print(f"no curve of {missing}: the rule over the {len(MAIN_METHODS)} main methods "
                  f"gives {low} steps if they converge at once, {high} if never")
            if low != high or high is None:
                return 1
        chosen = choose_budget(curves)
        for m, s in chosen["converged_at"].items():
            print(f"{m}: within {TOLERANCE} point of its best by step {s}")
        print(f"budget: {chosen['budget']} steps ({chosen['share']:.0%} of the methods with a "
              f"curve converged by then; the rule needs {QUORUM:.0%})")
        return 0
    todo = [m for m in args.methods if m not in done
            or done[m]["train_config"]["steps"] != args.steps]
    with tw.in_world(tw.TOYWORLD_VERSION):
        if args.jobs == 1:
            for m in todo:
                _keep(m, _curve_run(m, args.steps, args.every), args.out)
            return 0
        threads = max(torch.get_num_threads() // args.jobs, 1)
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=start_job,
                                 initargs=(threads, tw.TOYWORLD_VERSION)) as pool:
            futures = {pool.submit(_curve_run, m, args.steps, args.every): m for m in todo}
            for future in as_completed(futures):       # each curve kept as soon as it is done
                _keep(futures[future], future.result(), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
