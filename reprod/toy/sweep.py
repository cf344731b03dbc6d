"""The toy sweep: train every lesson model on ToyWorld, write lesson checkpoints, tabulate results.

    python -m reprod.toy.sweep                              # every method, the benchmark's seeds
    python -m reprod.toy.sweep --methods rein --seeds 0     # one run
    python -m reprod.toy.sweep --table                      # print the results table only
    python -m reprod.toy.sweep --jobs 2                     # two runs at a time (processes)
    python -m reprod.toy.sweep --world 2.0 --plan           # what is left, and how long it takes

What runs and how it is read live in ``lessons.benchmark`` (the methods, ``run_one``, the
summaries); this is the command that runs them. Resumable by run: results are written after each
(method, seed) run (atomically, under a lock, so sweeps may run in parallel processes) and a run
with a result for the same protocol and configuration is skipped; ``--force`` reruns. A process
*claims* each run before it trains it (a file holding its pid in ``toy_sweep.claims/``, made
atomically), so two sweeps over overlapping methods, one per core, never train the same run: a
run claimed by a live process is skipped, a claim left by a dead one is taken over. Checkpoints
(adapters and heads only, fp16, with the ToyWorld version and ``lessons`` digest in their header)
are kept for ``--checkpoint-seeds`` (default: seed 0), the rest record results only, to keep the
package's toy weights small. Runs on CPU (the figures in the README are 2 cores) or a GPU.

``--jobs N`` trains N runs at a time in N processes (spawned; the parent writes every result):
on a CPU the cores are split between them, on a GPU they share it (one toy run leaves most of a
GPU idle). Results do not depend on ``--jobs`` beyond the last digits another thread count gives.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch

from lessons import toyworld as tw
from lessons.benchmark import (
    METHODS,
    RESULTS_FILE,
    checkpoint_path,
    is_done,
    load_results,
    markdown_table,
    run_key,
    run_one,
    seeds_of,
    sweep_dir,
    train_config,
)

__all__ = ["add_result", "claim", "main", "plan", "release", "run_seconds", "start_job"]


def add_result(key: str, record: dict, path: Path) -> dict:
    """Add one run to the results file under a lock (sweeps may run in parallel processes)."""
    try:
        import fcntl  # POSIX; on Windows, run one sweep process at a time
    except ImportError:
        fcntl = None
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        results = load_results(path)
        results["runs"][key] = record
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1) + "\n")
        tmp.replace(path)
    return results


def _alive(pid: int) -> bool:
    """Whether a process with this pid runs on this machine (POSIX: signal 0 only checks)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:             # another user's process: alive
        return True
    return True


def claim(key: str, results_file: Path) -> Path | None:
    """Claim run ``key`` for this process: ``<results>.claims/<method>_seed<k>.pid`` made with
    O_EXCL, holding this pid. None when a live process holds the claim; a claim whose process
    is gone (a sweep killed or ended with its session) is taken over. On Windows no claim is
    made (liveness cannot be checked there without ending the process): one sweep at a time."""
    folder = results_file.with_suffix(".claims")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (key.replace("/", "_") + ".pid")
    if os.name == "nt":         # os.kill(pid, 0) would end that process: one sweep at a time
        return path
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            text = path.read_text().strip()
            if text.isdigit() and int(text) != os.getpid() and _alive(int(text)):
                return None
            path.unlink(missing_ok=True)            # stale (or ours from an earlier try)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return path
    return None


def release(path: Path | None) -> None:
    """Give a claim back (after the run's result is written, or when it failed)."""
    if path is not None:
        path.unlink(missing_ok=True)


def start_job(threads: int, world: str) -> None:
    """A job process: its share of the CPU threads, the parent's ToyWorld."""
    torch.set_num_threads(threads)
    tw.use_world(world)


def _done(results: dict, method: str, seed: int, steps: int | None, test_length: int) -> bool:
    """Whether ``results`` hold this run for the same protocol and configuration."""
    return is_done(results["runs"].get(run_key(method, seed)), train_config(method, seed, steps),
                   test_length, METHODS[method].augment)


def _timed_run(method: str, seed: int, steps: int | None, test_length: int,
               ckpt: Path | None, results_file: Path, force: bool = False,
               ) -> tuple[dict | None, float]:
    """Train one run under its claim: (record, seconds), or (None, 0) when another live sweep
    holds the run or finished it since this sweep listed its runs."""
    owned = claim(run_key(method, seed), results_file)
    if owned is None or (not force and _done(load_results(results_file), method, seed, steps,
                                             test_length)):
        release(owned)
        return None, 0.0
    try:
        start = time.perf_counter()
        return run_one(method, seed, steps, test_length, ckpt), time.perf_counter() - start
    finally:
        release(owned)


def run_seconds(results: dict, method: str, curves: dict | None = None,
                steps: int | None = None) -> tuple[float | None, str]:
    """Seconds one run of ``method`` takes, and where the figure comes from: the mean of its
    recorded runs, else its learning curve (``curves``: ``reprod.toy.curves``' runs, scaled to
    ``steps``); failing both, the same of a method *like* it (the same builder, and for the
    segmentor the same use of the encoder: ``frozen_invariant`` is like ``frozen``,
    ``catseg_all`` like ``catseg``); else (None, "unknown"). An estimate for planning, made on
    the hardware the runs name, which need not be this machine's."""
    def own(name: str) -> tuple[float | None, str]:
        done = [r["seconds"] for r in results["runs"].values()
                if r["method"] == name and "seconds" in r]
        if done:
            return float(np.mean(done)), f"{len(done)} run(s)"
        curve = (curves or {}).get(name)
        if curve is not None and steps:
            scale = steps / curve["train_config"]["steps"]
            return curve["seconds"] * scale, f"its curve x{scale:.2f}"
        return None, "unknown"

    seconds, source = own(method)
    if seconds is not None:
        return seconds, source
    spec = METHODS[method]
    for name, other in METHODS.items():
        if (name != method and other.builder == spec.builder
                and other.builder_kwargs.get("method") == spec.builder_kwargs.get("method")):
            seconds, source = own(name)
            if seconds is not None:
                return seconds, f"like {name}: {source}"
    return None, "unknown"


def plan(results: dict, todo: list[str], curves: dict | None = None,
         steps: int | None = None, cores: int = 2) -> str:
    """The runs still to do (``todo``: one method name per run), method by method, with the time
    they are expected to take (:func:`run_seconds`), in single-core hours and in wall hours on
    ``cores`` one-thread processes (the sweep's way on a CPU)."""
    lines = ["| method | runs left | s / run | from | hours |", "|---|---|---|---|---|"]
    known, unknown = 0.0, []
    for method, n in Counter(todo).items():
        seconds, source = run_seconds(results, method, curves, steps)
        if seconds is None:
            unknown.append(method)
            lines.append(f"| {method} | {n} | ? | {source} | ? |")
            continue
        known += n * seconds
        lines.append(f"| {method} | {n} | {seconds:.0f} | {source} | {n * seconds / 3600:.1f} |")
    lines.append(f"\n{len(todo)} run(s) left: {known / 3600:.1f} single-core hours known, "
                 f"about {known / 3600 / cores:.1f} h on {cores} cores"
                 + (f", plus {len(unknown)} method(s) of unknown time: {unknown}" if unknown
                    else ""))
    return "\n".join(lines)


def _report(key: str, rec: dict, seconds: float) -> None:
    targets = [v for d, v in rec["miou"].items() if d != tw.SOURCE_DOMAIN]
    print(f"{key}: {seconds:.0f} s, val {100 * rec['val_miou']:.1f} (step {rec['best_step']}), "
          f"source {100 * rec['miou'][tw.SOURCE_DOMAIN]:.1f}, targets' mean "
          f"{100 * np.mean(targets):.1f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--world", default=tw.current_world(), choices=tw.WORLD_VERSIONS,
                    help="the ToyWorld version to sweep (default: the course's world); world 2's "
                         "results and checkpoints go to lessons.benchmark.sweep_dir(world)")
    ap.add_argument("--seeds", nargs="+", type=int, default=None,
                    help="benchmark seeds (default: the world's protocol; an ablation runs only "
                         "its own seeds)")
    ap.add_argument("--checkpoint-seeds", nargs="*", type=int, default=[0],
                    help="seeds whose checkpoints are written (default: 0)")
    ap.add_argument("--steps", type=int, default=None, help="override the training steps")
    ap.add_argument("--test-length", type=int, default=None,
                    help="test scenes per domain (default: the world's protocol)")
    ap.add_argument("--out", type=Path, default=None,
                    help="where checkpoints and toy_sweep.json go (default: the world's "
                         "lessons.benchmark.sweep_dir)")
    ap.add_argument("--force", action="store_true", help="rerun runs that have results")
    ap.add_argument("--table", action="store_true", help="print the results table and exit")
    ap.add_argument("--plan", action="store_true",
                    help="print the runs still to do and their expected time, and exit")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs trained at a time, in that many processes (default: 1)")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {args.jobs}")
    with tw.in_world(args.world):
        return _sweep(args)


def _sweep(args: argparse.Namespace) -> int:
    """The sweep of ``main``, in the world ``args.world`` (already entered)."""
    args.out = sweep_dir() if args.out is None else args.out
    protocol = tw.toy_benchmark()
    args.seeds = list(protocol["seeds"]) if args.seeds is None else args.seeds
    args.test_length = protocol["test_length"] if args.test_length is None else args.test_length
    results_file = args.out / RESULTS_FILE.name
    results = load_results(results_file)
    if args.table:
        print(markdown_table(results, args.methods))
        return 0
    todo = []
    for seed in args.seeds:                           # seed-major: seed 0 of everything first
        for method in args.methods:
            if seed not in seeds_of(method):         # an ablation's seed 0, or not this world
                continue
            key = run_key(method, seed)
            if not args.force and _done(results, method, seed, args.steps, args.test_length):
                if not args.plan:
                    print(f"{key}: done, skipped")
                continue
            keep = seed in args.checkpoint_seeds and METHODS[method].keep_checkpoint
            ckpt = checkpoint_path(method, seed, args.out) if keep else None
            todo.append((key, (method, seed, args.steps, args.test_length, ckpt, results_file,
                               args.force)))
    if args.plan:
        from reprod.toy.curves import CURVES_FILE

        curves = json.loads(CURVES_FILE.read_text())["runs"] if CURVES_FILE.is_file() else {}
        steps = args.steps or train_config(args.methods[0], 0).steps
        print(plan(results, [run[0] for _, run in todo], curves, steps))
        return 0
    failed = []

    def keep(key: str, outcome) -> None:
        """Record a finished run; a run that raised is named and the sweep goes on (e.g. a
        precondition run whose toy model is not in lessons/weights yet)."""
        nonlocal results
        try:
            rec, seconds = outcome()
        except Exception as e:              # one failed run must not lose the others
            failed.append(key)
            print(f"{key}: failed: {type(e).__name__}: {e}", flush=True)
            return
        if rec is None:
            print(f"{key}: trained by another sweep process, skipped", flush=True)
            return
        results = add_result(key, rec, results_file)
        _report(key, rec, seconds)

    if args.jobs == 1:
        for key, run in todo:
            keep(key, lambda run=run: _timed_run(*run))
    else:
        threads = max(torch.get_num_threads() // args.jobs, 1)
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=start_job,
                                 initargs=(threads, tw.current_world())) as pool:
            futures = {pool.submit(_timed_run, *run): key for key, run in todo}
            for future in as_completed(futures):       # each result kept as soon as it is done
                keep(futures[future], future.result)
    shown = [m for m in args.methods if any(r["method"] == m for r in results["runs"].values())]
    print(markdown_table(results, shown))
    if failed:
        print(f"{len(failed)} run(s) failed: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
