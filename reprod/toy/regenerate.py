"""World 2's toy foundation models, regenerated and gated in one command.

    python -m reprod.toy.regenerate vfm --device cuda --vfm-steps 7200 --out runs/world2 \\
        --describe "vfm-2's recipe at twice the steps"          # a GPU machine's minutes
    python -m reprod.toy.regenerate vlm diffusion --out runs/world2 \\
        --describe "the first world-2 VLM and teacher"           # a CPU's hours
    python -m reprod.toy.regenerate vfm vlm diffusion --smoke --out /tmp/w2   # minutes, on a CPU
    python -m reprod.toy.regenerate vfm vlm diffusion --dry-run  # the plan, nothing run
    python -m reprod.toy.regenerate --untried --device cuda --out runs/world2 \
        --describe "the committed recipe, on a GPU"   # every model with no recorded try yet
    python -m reprod.toy.regenerate --uncommitted --device cuda --out runs/world2 \
        --describe "..."                  # every model whose weights lessons/weights lacks

For each model named, in the order given:

1. pretrain it (``reprod.toy.pretrain``: resumable, its state under ``OUT/<model>``, chunks of
   under ten minutes; on a GPU in bf16 with data workers drawing the batches);
2. export its fp16 weights into ``OUT`` (``toy_vfm.safetensors`` ...);
3. measure its gates (``reprod.toy.gates``; G1 and G2 for the VFM, G4 for the VLM, G5 for the
   teacher, whose ``painted`` comparison reads the VFM's probes from ``OUT/gates.json`` when the
   VFM was measured there, else from the last VFM try) into ``OUT/gates.json``;
4. record that measurement as the model's next try in ``docs/results/toyworld2_gates.json``
   (``vfm-3``, ``vlm-1``, ``teacher-1``), passed or not, and copy that file into ``OUT`` (a GPU
   machine hands back only its output folder);
5. write its model card beside the weights (``OUT/toy_vfm.md`` and ``.json``: config, time and
   hardware, the gates just measured, and the card's own measurements: the VFM's probe rows,
   the VLM's retrieval and zero-shot maps, the teacher's layout probes).

``--smoke`` runs the whole pipeline in minutes (two steps of each model, the gates' ``--small``
version, nothing recorded): run it on the CPU before spending a GPU's minutes.

Nothing is copied into ``lessons/weights``: a person reads the gates first, and no method of the
course runs on world 2 before every gate's figure is recorded. Committing a model is copying its
three files (``toy_<model>.safetensors``, ``.md``, ``.json``) into ``lessons/weights`` and its
gate verdicts into ``lessons/weights/gates.json``; ``tests/test_toy_weights.py`` checks that the
committed weights are the ones the model's last try measured. A run that was stopped resumes
where it stopped when the same command is given again (same ``OUT``, same steps).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from reprod.toy import gates, pretrain

__all__ = ["GATES_OF", "WEIGHTS_OF", "main", "plan", "regenerate", "uncommitted", "untried"]

WEIGHTS_OF = {"vfm": "toy_vfm.safetensors", "vlm": "toy_vlm.safetensors",
              "diffusion": "toy_diffusion.safetensors"}
GATES_OF = {"vfm": ("G1", "G2"), "vlm": ("G4",), "diffusion": ("G5",)}


def plan(model: str, out: Path, device: str | None = None, steps: int | None = None,
         chunk_minutes: float = 9.0, workers: int | None = None, small: bool = False
         ) -> dict[str, list[str]]:
    """The argument lists of one model's commands: pretrain, export, gates, and (not for a
    ``small`` smoke run) the card."""
    run = ["--run-dir", str(out / model)] + (["--steps", str(steps)] if steps else [])
    run += ["--device", device] if device else []
    train = ["--until-done", "--chunk-minutes", str(chunk_minutes)]
    train += ["--workers", str(workers)] if workers is not None else []
    commands = {"pretrain": [model, *run, *train],
                "export": [model, *run, "--export", "--out", str(out / WEIGHTS_OF[model])],
                "gates": ["--gates", *GATES_OF[model], "--weights", str(out),
                          "--out", str(out / "gates.json")] + (["--small"] if small else [])}
    if not small:                   # a smoke run records nothing, so it writes no card either
        commands["card"] = [model, *run, "--card", "--out",      # of the file just measured:
                            str(out / WEIGHTS_OF[model])]       # no re-export (safetensors#584)
    return commands


def regenerate(model: str, out: Path, describe: str, device: str | None = None,
               steps: int | None = None, chunk_minutes: float = 9.0,
               workers: int | None = None, smoke: bool = False) -> dict | None:
    """Pretrain, export, gate and record one model (module docstring); returns its try (None
    for a ``smoke`` run, which records nothing)."""
    commands = plan(model, out, device, steps, chunk_minutes, workers, small=smoke)
    start = time.perf_counter()
    for what in ("pretrain", "export", "gates"):
        print(f"[regenerate] {model}: {what}", flush=True)
        main_of = gates.main if what == "gates" else pretrain.main
        if main_of(commands[what]) != 0:
            raise SystemExit(f"error: {model}'s {what} step failed")
    measured = json.loads((out / "gates.json").read_text())
    if smoke:
        print(f"[regenerate] {model}: smoke run done ({time.perf_counter() - start:.0f} s); "
              "nothing recorded")
        return None
    measured["gates"] = {g: measured["gates"][g] for g in GATES_OF[model]}
    keep = {"vfm": ("probes",), "vlm": ("vlm",), "diffusion": ("teacher",)}[model]
    measured["results"] = {k: measured["results"][k] for k in keep}
    measured["weights"] = {k: v for k, v in measured["weights"].items() if k == WEIGHTS_OF[model]}
    measured["seconds"] = {k: v for k, v in measured["seconds"].items()
                           if set(k.split("+")) <= set(GATES_OF[model])}
    tries = gates.TRIES_FILE
    name = gates.next_try_name(model, tries)
    entry = gates.record_try(measured, name, describe, out / model, tries_file=tries)
    shutil.copy(tries, out / tries.name)
    print(f"[regenerate] {model}: recorded try {name!r} ({time.perf_counter() - start:.0f} s)")
    for line in gates.gate_lines(entry["gates"]):
        print(f"[regenerate]   {line}")
    print(f"[regenerate] {model}: card", flush=True)
    if pretrain.main(commands["card"]) != 0:
        raise SystemExit(f"error: {model}'s card step failed")
    return entry


def untried(tries_file: Path | None = None) -> list[str]:
    """The toy models with no try recorded in the tries file yet, in pipeline order."""
    tries_file = tries_file or gates.TRIES_FILE
    return [m for m in WEIGHTS_OF if gates.last_try(m, tries_file) is None]


def uncommitted(weights_dir: Path | None = None) -> list[str]:
    """The toy models whose world-2 weights ``lessons/weights`` does not hold yet, in pipeline
    order (a GPU remakes them with the committed recipe in minutes; each is still a try)."""
    from lessons.backbones import toy_weights_dir
    from lessons.toyworld import TOYWORLD_VERSION

    weights_dir = weights_dir or toy_weights_dir(TOYWORLD_VERSION)
    return [m for m, name in WEIGHTS_OF.items() if not (weights_dir / name).is_file()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m reprod.toy.regenerate",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", metavar="{vfm,vlm,diffusion}",
                    help="which toy models, in this order")
    ap.add_argument("--untried", action="store_true",
                    help="also every model with no try recorded yet (after those named)")
    ap.add_argument("--uncommitted", action="store_true",
                    help="also every model whose world-2 weights lessons/weights lacks")
    ap.add_argument("--out", type=Path, required=True, help="runs, weights and gates go here")
    ap.add_argument("--describe", required=True,
                    help="what these tries are (recorded beside their figures)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    ap.add_argument("--vfm-steps", type=int, default=None,
                    help="the VFM's pretraining steps (default: its config's)")
    ap.add_argument("--chunk-minutes", type=float, default=9.0)
    ap.add_argument("--workers", type=int, default=None,
                    help="data workers of the pretraining (default: reprod.toy.pretrain's)")
    ap.add_argument("--smoke", action="store_true",
                    help="two steps of each model, the gates' --small version, nothing recorded")
    ap.add_argument("--dry-run", action="store_true", help="print the commands and stop")
    args = ap.parse_args(argv)
    if args.vfm_steps is not None and args.vfm_steps <= 0:
        ap.error(f"--vfm-steps must be positive, got {args.vfm_steps}")
    if not args.describe.strip():
        ap.error("--describe must say what these tries are")
    unknown = [m for m in args.models if m not in WEIGHTS_OF]
    if unknown:
        ap.error(f"unknown model {unknown[0]!r}; choose from {', '.join(WEIGHTS_OF)}")
    models = list(args.models)
    asked = [(done, more) for flag, done, more in (
        (args.untried, "has a recorded try", untried),
        (args.uncommitted, "is in lessons/weights", uncommitted)) if flag]
    for _, more in asked:
        models += [m for m in more() if m not in models]
    if not models and asked:
        print(f"[regenerate] every toy model {' and '.join(d for d, _ in asked)}; nothing to run")
        return 0
    if not models:
        ap.error("name the models to regenerate, or --untried / --uncommitted")
    for model in models:
        steps = 2 if args.smoke else args.vfm_steps if model == "vfm" else None
        if args.dry_run:
            for what, cmd in plan(model, args.out, args.device, steps, args.chunk_minutes,
                                  args.workers, args.smoke).items():
                module = "gates" if what == "gates" else "pretrain"
                print(f"python -m reprod.toy.{module} {' '.join(cmd)}")
            continue
        args.out.mkdir(parents=True, exist_ok=True)
        regenerate(model, args.out, args.describe, args.device, steps, args.chunk_minutes,
                   args.workers, args.smoke)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
