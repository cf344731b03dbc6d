"""Every owed GPU figure from one prepared run: the course's evidence on a GPU, in one command.

    python -m reprod.gpu_check                       # on a GPU machine; stops at --budget-min 9
    python -m reprod.gpu_check --dry-run             # the plan, with each step's expected time
    python -m reprod.gpu_check --wheels .whl --sdist .whl/mamba_ssm-2.3.2.post1.tar.gz
    make gpu-check                                   # the same, with the carried files in .whl/
    python3 -m reprod.gpu_check --wheels .whl --sdist .whl/mamba_ssm-2.3.2.post1.tar.gz \
        --collect "$OUT"                            # on a lent device machine (carry .whl/)

A GPU machine is lent now and then, bare (CUDA, nvcc, PyTorch, no network) and for minutes. This
runs, in the order that puts the most valuable evidence first, and stops cleanly when the next
step would not fit the time budget:

1. ``detect``: the GPU, its memory, torch and CUDA versions;
2. ``wheels``: installs the carried wheels the bare machine lacks (``--wheels``: open_clip_torch,
   diffusers, ftfy, ...; ``make gpu-carry`` downloads them); the repository runs from its root;
3. ``world2``: world 2's toy models that have no recorded try yet, or whose weights
   ``lessons/weights`` does not hold yet (``reprod.toy.regenerate --untried --uncommitted``: the
   committed recipe, pretrained in bf16 with data workers, fp16 weights, their gates, recorded as
   tries, and their cards; everything under ``OUT/world2``, ready to commit; nothing to do once
   every model is committed). It comes first because a 2-core CPU needs one to two hours per
   model (the VFM's 7,200 steps were estimated at 7 to 8 minutes on an H100). It saves every 2
   minutes, so if its limit stops it, the same command again on the still-warm machine resumes
   it (``--only world2``); the rest follows in a second command (``--skip world2``);
4. ``curves``: world 2's learning curves, the main methods at seed 0 for 2,000 steps, eight at a
   time (``reprod.toy.curves --jobs 8``, resumable by method: it starts from the committed
   curves and has nothing to do once they are all there), from which the sweep's budget is
   chosen by the rule written down first;
5. ``invariant``: notebook 02's invariance-taught toy VFM (``reprod.toy.pretrain vfm_invariant``
   on CUDA, exported with its card into ``OUT/invariant``) unless ``lessons/weights`` holds it;
   about 2 hours on a 2-core CPU;
6. ``sweep2``: world 2's sweep (``reprod.toy.sweep --world 2.0 --jobs 8``), resuming from the
   committed results and checkpoints (``lessons/weights/checkpoints/world2``): a 2-core CPU
   needs about a day for it, so each lent GPU adds what it can in its minutes;
7. ``mamba_ssm``: builds mamba-ssm's fused selective scan for this GPU's architecture only from the
   carried sdist (``reprod.install_mamba_ssm --sdist``); skipped when it already imports;
8. ``pytest_gpu``: ``pytest -m gpu`` (the fused kernel against the references, the toy models on
   CUDA);
9. ``scan``: the selective scan on the GPU, the fused kernel against ``lessons.ssm``'s pure-PyTorch
   chunked scan, forward and forward + backward, with the maximum difference;
10. ``step_bf16``: ``reprod.bench step`` for every real-scale config in bf16 at 512², batch 2,
   random weights (MFuser first: its targets are <= 24 GB at batch 2 and 20k steps within an hour
   on one H100);
11. ``fusion``: MVFuser against self-attention at width 1024 from 1k to 16k tokens;
12. ``ddp``: a DDP smoke run with NCCL at world size 1 (``torchrun -m reprod.train toy_rein``);
13. ``toy_sweep``: a few toy-sweep runs on CUDA, two at a time (``--jobs 2``), with their
   images / s;
14. ``step_fp32``: the Rein and MFuser rows again in fp32.

Each step runs as its own process with a time limit, and its result is appended, as it finishes,
to ``runs/gpu_check/report.json`` and ``report.md`` (``--out``). ``--collect DIR`` copies what
must come home into one flat folder at the end: the two reports (every step's figures are in
``report.json``), the world-2 tries' gates and tries file, each model ``world2`` or
``invariant`` made as one tar, the learning curves, world 2's sweep results and its lesson
checkpoints as one tar: at most eight files in practice (the three world-2 models are
committed), as a lent machine hands back. Standing
order: whenever a GPU is lent, run this first, commit the report, and copy its figures into
docs/measured.md with the GPU named.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["COLLECT", "COLLECT_MODELS", "MAX_FILES", "STEPS", "Step", "collect", "main", "plan",
           "run_steps"]

ROOT = Path(__file__).resolve().parents[1]
OUT = Path("runs/gpu_check")

REAL_CONFIGS = ("mfuser_eva_gtav", "mfuser_clip_gtav", "mfuser_siglip_gtav", "rein_dinov2_gtav",
                "tqdm_eva02_gtav", "querydiff_dinov2_gtav", "catseg_clipl_gtav",
                "frozen_dinov2_gtav", "full_dinov2_gtav", "rein_eva02_gtav")
FP32_CONFIGS = ("mfuser_eva_gtav", "rein_dinov2_gtav")


@dataclass(frozen=True)
class Step:
    """One step of the check: a command line (``{py}``, ``{out}``, ``{sdist}`` and ``{wheels}`` are
    filled in), the seconds it is expected to take on an H100, what it needs, and its hard limit."""

    name: str
    command: str
    expected_s: int
    needs: str
    limit_s: int = 0                # 0: 2.5 x expected
    optional: bool = False          # skipped without a complaint when its input is missing
    env: dict = field(default_factory=dict)


_STEP = "{py} -m reprod.bench step {configs} --precision {p} --batch 2 --size 512 --steps 6 " \
        "--warmup 2 --json {out}/step_{p}.json"
STEPS: tuple[Step, ...] = (
    Step("detect", "{py} -m reprod.gpu_check --detect --out {out}", 10, "a CUDA GPU"),
    Step("wheels", "{py} -m pip install -q --no-index --no-deps {wheels}/*.whl", 40,
         "--wheels: a folder of carried wheels (make gpu-carry fills .whl/)",
         optional=True),
    Step("world2", "{py} -m reprod.toy.regenerate --untried --uncommitted --device cuda "
         "--chunk-minutes 2 --out {out}/world2 --describe \"the committed recipe, on a GPU in "
         "bf16\"", 450,
         "timm, open_clip, diffusers, safetensors (carried wheels)", limit_s=570),
    Step("bf16", "{py} -m reprod.toy.bf16_check --device cuda --json {out}/bf16_check.json "
         "&& touch {out}/bf16_ok", 90, "world 2's three toy models in lessons/weights (the "
         "curves and the sweep train in bf16 on CUDA: they run only if it passes)", limit_s=300),
    Step("curves", "test -f {out}/bf16_ok && (cp -n lessons/weights/checkpoints/world2/"
         "toy_curves.json {out}/toy_curves_world2.json 2>/dev/null; {py} -m reprod.toy.curves "
         "--jobs 8 --out {out}/toy_curves_world2.json)", 300,
         "world 2's three toy models in lessons/weights", limit_s=540),
    Step("invariant", "test -f lessons/weights/toy_vfm_invariant.safetensors || "
         "({py} -m reprod.toy.pretrain vfm_invariant --device cuda --until-done "
         "--chunk-minutes 2 --run-dir {out}/invariant_run && "
         "{py} -m reprod.toy.pretrain vfm_invariant --run-dir {out}/invariant_run --export "
         "--card --out {out}/invariant/toy_vfm_invariant.safetensors)", 480,
         "world 2's pretraining world (lessons.toyworld)", limit_s=570),
    Step("sweep2", "test -f {out}/bf16_ok && mkdir -p {out}/sweep2 && (cp -rn "
         "lessons/weights/checkpoints/world2/. {out}/sweep2/ 2>/dev/null; {py} -m "
         "reprod.toy.sweep --world 2.0 --jobs 8 --out {out}/sweep2)", 540,
         "world 2's toy models in lessons/weights (the invariance-taught VFM for its two "
         "precondition runs); the bf16 check passed", limit_s=570),
    Step("mamba_ssm", "{py} -m reprod.install_mamba_ssm --sdist {sdist}", 180,
         "--sdist: mamba-ssm's source archive, nvcc", limit_s=420, optional=True),
    Step("pytest_gpu", "{py} -m pytest -m gpu -q -o addopts= tests",
         60, "pytest; mamba_ssm for the fused-kernel tests (they skip without it)"),
    Step("scan", "{py} -m reprod.gpu_check --scan --out {out}", 30, "mamba_ssm (else the "
         "pure-PyTorch scan alone is timed)"),
    Step("step_bf16", _STEP.format(py="{py}", configs=" ".join(REAL_CONFIGS), p="bf16",
                                   out="{out}"), 240, "open_clip_torch, diffusers", limit_s=480),
    Step("fusion", "{py} -m reprod.bench fusion --dim 1024 --heads 16 --batch 2 --precision bf16 "
         "--lengths 1024 2048 4096 8192 16384 --json {out}/fusion.json", 45, "a GPU"),
    Step("ddp", "{py} -m reprod.prepare_data export-toyworld {out}/toy_data --length 8 "
         "--datasets gtav cityscapes bdd100k mapillary && "
         "{py} -m torch.distributed.run --standalone --nproc_per_node 1 -m reprod.train "
         "toy_rein --distributed --no-progress --run-dir {out}/ddp train.steps=20 "
         "train.eval_every=0 train.eval_max_images=4 data.source.root={out}/toy_data/gta "
         "data.targets.cityscapes.root={out}/toy_data/cityscapes "
         "data.targets.bdd100k.root={out}/toy_data/bdd100k "
         "data.targets.mapillary.root={out}/toy_data/mapillary", 60,
         "torch.distributed with NCCL"),
    Step("toy_sweep", "{py} -m reprod.toy.sweep --methods rein mfuser --seeds 0 --steps 100 "
         "--test-length 50 --out {out}/toy_sweep --checkpoint-seeds --jobs 2", 90,
         "the toy weights (lessons/weights)"),
    Step("step_fp32", _STEP.format(py="{py}", configs=" ".join(FP32_CONFIGS), p="fp32",
                                   out="{out}"), 90, "open_clip_torch, diffusers"),
)


def plan(budget_min: float, steps: tuple[Step, ...] = STEPS) -> list[tuple[Step, float]]:
    """The steps with their expected cumulative finish time (minutes)."""
    out, total = [], 0.0
    for step in steps:
        total += step.expected_s / 60
        out.append((step, total))
    return out


def print_plan(budget_min: float, args: argparse.Namespace) -> None:
    print(f"GPU check plan (budget {budget_min:g} min; expected times are for one H100):")
    for step, finish in plan(budget_min):
        fits = "" if finish <= budget_min else "   (beyond the budget: runs only if time is left)"
        print(f"  {step.name:11s} ~{step.expected_s:4d} s, done by ~{finish:4.1f} min  "
              f"needs: {step.needs}{fits}")
        print(f"      $ {_fill(step.command, args)}")


def _fill(command: str, args: argparse.Namespace) -> str:
    return command.format(py=shlex.quote(sys.executable), out=shlex.quote(str(args.out)),
                          sdist=shlex.quote(str(args.sdist or "")),
                          wheels=shlex.quote(str(args.wheels or "")))


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------
def _append(out: Path, record: dict) -> None:
    """Append one step's record to report.json (atomically) and report.md."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.json"
    report = json.loads(path.read_text()) if path.is_file() else {"steps": []}
    report["steps"].append(record)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, path)
    with open(out / "report.md", "a") as md:
        md.write(f"\n## {record['name']}: {record['status']} ({record['seconds']:.0f} s)\n\n")
        md.write(f"`{record['command']}`\n\n")
        if record.get("figures"):
            md.write("```\n" + json.dumps(record["figures"], indent=1) + "\n```\n")
        md.write("```\n" + record["tail"] + "\n```\n")


def _figures(step: Step, out: Path) -> object:
    """The JSON a step wrote, if any (bench rows, scan rows, detection)."""
    files = {"detect": "detect.json", "world2": "world2/gates.json", "scan": "scan.json",
             "step_bf16": "step_bf16.json", "fusion": "fusion.json",
             "toy_sweep": "toy_sweep/toy_sweep.json", "step_fp32": "step_fp32.json"}
    path = out / files.get(step.name, "-")
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            return {"unreadable": f"{path}: {e}"}
    return None


def run_steps(args: argparse.Namespace) -> int:
    """Run the plan until it is done or the next step would not fit the budget."""
    start = time.monotonic()
    budget = 60 * args.budget_min
    failed = 0
    for step in STEPS:
        if (args.only and step.name not in args.only) or step.name in args.skip:
            continue
        if step.optional and ((step.name == "wheels" and not args.wheels)
                              or (step.name == "mamba_ssm" and not args.sdist)):
            _append(args.out, {"name": step.name, "status": "skipped (not carried)",
                               "command": "", "seconds": 0.0, "tail": step.needs})
            continue
        left = budget - (time.monotonic() - start)
        if step.expected_s > left:
            _append(args.out, {"name": step.name, "status": "not run (time budget)",
                               "command": _fill(step.command, args), "seconds": 0.0,
                               "tail": f"{left:.0f} s left, expected {step.expected_s} s"})
            continue
        limit = min(step.limit_s or int(2.5 * step.expected_s), max(int(left), 1))
        command = _fill(step.command, args)
        print(f"[gpu_check] {step.name}: {command}", flush=True)
        t0 = time.monotonic()
        try:
            proc = subprocess.run(command, shell=True, cwd=ROOT, capture_output=True, text=True,
                                  timeout=limit, env={**os.environ, **step.env})
            status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
            tail = (proc.stdout + proc.stderr)[-3000:]
        except subprocess.TimeoutExpired as e:
            status = f"stopped at its {limit} s limit"
            tail = ((e.stdout or b"").decode(errors="replace")
                    + (e.stderr or b"").decode(errors="replace"))[-3000:]
        failed += status != "ok"
        record = {"name": step.name, "status": status, "command": command,
                  "seconds": time.monotonic() - t0, "tail": tail,
                  "figures": _figures(step, args.out)}
        _append(args.out, record)
        print(f"[gpu_check] {step.name}: {status} in {record['seconds']:.0f} s", flush=True)
    print(f"[gpu_check] done in {(time.monotonic() - start) / 60:.1f} min; report in {args.out}")
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------
# Steps that live here
# ----------------------------------------------------------------------------------------------
COLLECT = {"report.json": "report.json", "report.md": "report.md",
           "world2/gates.json": "world2_gates.json",
           "world2/toyworld2_gates.json": "toyworld2_gates.json",
           "toy_curves_world2.json": "toy_curves_world2.json",
           "sweep2/toy_sweep.json": "toy_sweep_world2.json"}
"""What ``--collect`` copies (path under ``--out`` -> name in the flat folder), when present."""
COLLECT_MODELS = ("toy_vfm", "toy_vlm", "toy_diffusion")
"""World-2 toy models ``--collect`` brings home as one ``<model>.tar`` each (weights, card),
when ``world2`` made them (``toy_vfm_invariant`` when ``invariant`` made it)."""
MAX_FILES = 8
"""A device machine hands back at most eight files: ``collect`` writes the most valuable first
and names what it leaves out."""


def _tar(dest: Path, files: list[tuple[Path, str]]) -> Path:
    import tarfile

    with tarfile.open(dest, "w") as tar:
        for f, name in files:
            tar.add(f, arcname=name)
    return dest


def collect(out: Path, dest: Path) -> list[Path]:
    """Bring home, into the flat folder ``dest``, what exists under ``out``: the reports, the
    curves and world 2's sweep results (:data:`COLLECT`), world 2's lesson checkpoints as one tar,
    each toy model ``world2`` or ``invariant`` made as a tar of its weights and card, then the
    gates; at most :data:`MAX_FILES`, in that order (what does not fit is printed). Returns what
    it wrote."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    wanted = []                                        # (name, write) in order of value
    first = ("report.json", "report.md", "toy_curves_world2.json", "sweep2/toy_sweep.json")
    gates = ("world2/gates.json", "world2/toyworld2_gates.json")
    for src in first:
        if (out / src).is_file():
            wanted.append((COLLECT[src], lambda s=src: Path(shutil.copy(out / s,
                                                                       dest / COLLECT[s]))))
    checkpoints = sorted((out / "sweep2").glob("*/*.safetensors"))
    if checkpoints:                  # world 2's lesson checkpoints, one folder per lesson
        wanted.append(("sweep2_checkpoints.tar", lambda: _tar(
            dest / "sweep2_checkpoints.tar", [(f, f"{f.parent.name}/{f.name}")
                                              for f in checkpoints])))
    folders = {"toy_vfm_invariant": out / "invariant"} | {m: out / "world2"
                                                          for m in COLLECT_MODELS}
    for model, folder in folders.items():
        files = [folder / f"{model}{ext}" for ext in (".safetensors", ".md", ".json")]
        if files[0].is_file():
            wanted.append((f"{model}.tar", lambda m=model, fs=files: _tar(
                dest / f"{m}.tar", [(f, f.name) for f in fs if f.is_file()])))
    for src in gates:
        if (out / src).is_file():
            wanted.append((COLLECT[src], lambda s=src: Path(shutil.copy(out / s,
                                                                       dest / COLLECT[s]))))
    if len(wanted) > MAX_FILES:
        print(f"[gpu_check] left out (a device machine hands back {MAX_FILES} files): "
              f"{[name for name, _ in wanted[MAX_FILES:]]}")
    return [write() for _, write in wanted[:MAX_FILES]]


def detect(out: Path) -> dict:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("error: no CUDA GPU is visible (torch.cuda.is_available() is False)")
    p = torch.cuda.get_device_properties(0)
    facts = {"gpu": p.name, "memory_gb": round(p.total_memory / 2**30, 1),
             "capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count,
             "torch": torch.__version__, "cuda": torch.version.cuda,
             "python": sys.version.split()[0], "cpus": os.cpu_count()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "detect.json").write_text(json.dumps(facts, indent=1) + "\n")
    print(json.dumps(facts))
    return facts


def _scan(x: dict, impl: str, grad: bool):
    """One selective scan of inputs ``x`` (``lessons.ssm.scan_inputs``) with ``impl``, and its
    backward."""
    import torch

    from lessons.ssm import selective_scan

    inputs = {k: v.detach().requires_grad_(grad) for k, v in x.items()}
    with torch.set_grad_enabled(grad):
        y = selective_scan(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"],
                           inputs["D"], impl=impl)
        if grad:
            y.square().mean().backward()
    return y.detach()


def _median_ms(fn, repeats: int, warmup: int = 2) -> float:
    import statistics

    import torch

    times = []
    for k in range(warmup + repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        if k >= warmup:
            times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def scan_benchmark(out: Path, repeats: int = 10) -> list[dict]:
    """The fused kernel (``impl="cuda"``) against the pure-PyTorch chunked scan (``"fast"``) on
    the GPU: medians of forward and forward + backward, and the forward's max difference."""
    import torch

    from lessons.ssm import SCAN_SHAPES, available_impls, scan_inputs

    device = torch.device("cuda")
    impls = [i for i in ("fast", "cuda") if i in available_impls(device)]
    rows = []
    for name in ("issue", "mvfuser_full", "mvfuser_toy"):
        x = {k: v.to(device) for k, v in scan_inputs(*SCAN_SHAPES[name]).items()}
        row: dict = {"shape": name, "BDLN": SCAN_SHAPES[name]}
        for impl in impls:
            for mode, grad in (("forward", False), ("forward+backward", True)):
                row[f"{impl}_{mode}_ms"] = _median_ms(lambda i=impl, g=grad, x=x: _scan(x, i, g),
                                                      repeats)
        if len(impls) == 2:
            diff = (_scan(x, "fast", False).float() - _scan(x, "cuda", False).float())
            row["max_abs_diff"] = diff.abs().max().item()
            for mode in ("forward", "forward+backward"):
                row[f"cuda_speedup_{mode}"] = row[f"fast_{mode}_ms"] / row[f"cuda_{mode}_ms"]
        rows.append(row)
        print(json.dumps(row))
    (out / "scan.json").write_text(json.dumps(rows, indent=1) + "\n")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m reprod.gpu_check",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--budget-min", type=float, default=9.0,
                    help="stop before a step that would not fit (default: 9 minutes)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    ap.add_argument("--out", type=Path, default=OUT, help="report folder (runs/gpu_check)")
    ap.add_argument("--sdist", type=Path, help="mamba-ssm's source archive (carried)")
    ap.add_argument("--wheels", type=Path, help="a folder of carried wheels to install first")
    ap.add_argument("--only", nargs="+", choices=[s.name for s in STEPS], help="just these")
    ap.add_argument("--skip", nargs="+", choices=[s.name for s in STEPS], default=[],
                    help="all but these")
    ap.add_argument("--collect", type=Path, default=None,
                    help="at the end, copy the reports and the world-2 tries' files into this "
                         "flat folder (a device machine's $OUT)")
    ap.add_argument("--detect", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--scan", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.budget_min <= 0:
        ap.error(f"--budget-min must be positive, got {args.budget_min}")
    for path, what in ((args.sdist, "--sdist"), (args.wheels, "--wheels")):
        if path is not None and not path.exists():
            ap.error(f"{what} {path} does not exist")
    if args.dry_run:
        print_plan(args.budget_min, args)
        return 0
    if args.detect:
        detect(args.out)
        return 0
    if args.scan:
        scan_benchmark(args.out)
        return 0
    (args.out / "report.md").parent.mkdir(parents=True, exist_ok=True)
    for name in ("report.json", "report.md"):
        (args.out / name).unlink(missing_ok=True)
    code = run_steps(args)
    if args.collect is not None:
        copied = collect(args.out, args.collect)
        print(f"[gpu_check] collected {len(copied)} files into {args.collect}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
