"""The gates of ToyWorld 2: do the world and its toy foundation models have the properties the
papers rely on? Measured before any method of the course runs on the world.

    python -m reprod.toy.gates                     # every gate, printed, written to GATES_FILE
    python -m reprod.toy.gates --gates G1 G2       # some of them
    python -m reprod.toy.gates --small             # a few-minute version (numbers not recorded)
    python -m reprod.toy.gates --record-try NAME --from FILE --run-dir DIR --describe TEXT
                                                   # add one honest try to TRIES_FILE
    python -m reprod.toy.gates --tries-table       # the tries as docs/toyworld.md shows them
    python -m reprod.toy.gates --invariance-table  # world 1's toy VFM on the invariance meter
    python -m reprod.toy.gates --headroom          # what bounds G2 (a diagnostic, not a gate)

The gates are fixed in advance (the issue "ToyWorld 2") and never moved to fit a result:

- **G1 useful features.** A linear probe (300 steps x 16 on ``synthetic``, lr 3e-3) on the
  frozen generic toy VFM beats the same probe on a random-init ViT of the same shape by at least
  10 mIoU on the targets' mean.
- **G2 headroom.** The same probe trained on each target's own labels (its ``train`` split) beats
  the source-trained probe by at least 15 mIoU on the targets' mean: to frozen features the
  domains are not interchangeable (on real data a Cityscapes-trained model leads a GTAV-trained
  one by 15-20 points; world 1's toy VFM left about 9.5).
- **G3 the gap survives augmentation.** A scratch CNN (``TinySegNet``, 1,000 steps x 16) trained
  on the source with the recipes' flip and photometric distortion loses at least 20 mIoU from
  the source to the targets' mean.
- **G4 an aligned VLM.** MaskCLIP zero-shot (no segmentation training) reaches at least 10 mIoU
  on the source and 5 on the targets' mean; zero-shot classification of crops (CAT-Seg's
  prompts, crops whose largest class fills half) at least 80% top-1; the held-out class
  (``bus``, named in captions, never segmented) at least 10 IoU zero-shot from its name on the
  source test split.
- **G5 a teacher that knows more.** The toy diffusion teacher's strong-noise features are more
  style-invariant than its weak-noise ones (mean cosine of pixel-aligned features of one scene
  in the source look and in each target look, same noise), and its layout probe at t_s
  (BatchNorm + 1x1 conv on its features, 300 steps on ``synthetic``) beats the student's frozen
  probe (G1's) on ``painted``, the style the teacher saw and the student did not.

mIoU is measured on 200 ``test`` scenes per domain at 64x128; "targets' mean" is the mean over
the eight targets of ``TOY_BENCHMARK``. Each model card quotes its gates from ``GATES_FILE``.
Every full measurement of a candidate model is kept, passed or not, in ``TRIES_FILE`` (the
pretraining config and time of the run that made it beside the figures), so a failed try is
published rather than replaced.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lessons import toyworld as tw
from lessons.augment import Augmented
from lessons.backbones import WEIGHTS_DIR, build_encoder
from lessons.baselines import TinySegNet
from lessons.captions import HELD_OUT_CLASS, class_id
from lessons.invariance import aligned_renders
from lessons.probe import LinearProbe
from lessons.train import TrainConfig, evaluate, evaluate_domains, train
from lessons.utils import seed_everything

__all__ = [
    "GATES", "GATES_FILE", "HEADROOM_FILE", "HEADROOM_TARGETS", "INVARIANCE_ROWS", "THRESHOLDS",
    "TRIES_FILE", "TRY_PREFIX", "check_probes", "check_scratch", "check_teacher", "check_vlm",
    "domains_table", "gate_lines", "headroom_results", "invariance", "invariance_table",
    "last_try", "main", "measure", "next_try_name", "probe_results", "probe_table", "record_try",
    "scratch_results", "teacher_results", "tries_table", "vlm_results",
]

GATES_FILE = WEIGHTS_DIR / "gates.json"
TRIES_FILE = Path(__file__).resolve().parents[2] / "docs" / "results" / "toyworld2_gates.json"
HEADROOM_FILE = TRIES_FILE.with_name("toyworld2_headroom.json")
GATES = ("G1", "G2", "G3", "G4", "G5")
THRESHOLDS = {"G1": 10.0, "G2": 15.0, "G3": 20.0, "G4_source": 10.0, "G4_targets": 5.0,
              "G4_crops": 80.0, "G4_held_out": 10.0}
"""The gates' margins (mIoU or IoU points, crop accuracy in %), fixed before any measurement."""


def _scale(small: bool) -> dict:
    """Sizes of a measurement: the recorded one, or a few-minute smoke version."""
    if small:
        return {"steps": 40, "scratch_steps": 60, "test": 24, "train": 200, "crops": 120,
                "pairs": 8}
    return {"steps": 300, "scratch_steps": 1000, "test": 200, "train": 2000, "crops": 400,
            "pairs": 48}


def _tests(n: int, seed: int = 0) -> dict[str, tw.ToyWorld]:
    return {d: tw.ToyWorld(d, "test", length=n, seed=seed)
            for d in (tw.SOURCE_DOMAIN, *tw.TARGET_DOMAINS)}


def _targets_mean(result: dict[str, float]) -> float:
    return 100 * float(np.mean([result[d] for d in tw.TARGET_DOMAINS]))


def _fit(make: Callable[[], torch.nn.Module], data, steps: int, seed: int = 0,
         lr: float = 3e-3) -> torch.nn.Module:
    seed_everything(seed)
    model = make()
    train(model, data, TrainConfig(steps=steps, batch_size=16, lr=lr, seed=seed))
    return model


# ----------------------------------------------------------------------------------------------
# G1, G2: the generic VFM's frozen features
# ----------------------------------------------------------------------------------------------
def probe_results(vfm_weights: str | Path | None, small: bool = False) -> dict:
    """G1 and G2's measurements: the source-trained probes (toy VFM, random-init ViT) on every
    domain, and per target a probe trained on that target's own labels."""
    s = _scale(small)
    tests = _tests(s["test"])
    source = tw.ToyWorld(tw.SOURCE_DOMAIN, "train", length=s["train"])
    vfm = _fit(lambda: LinearProbe(build_encoder("toy_vfm", vfm_weights)), source, s["steps"])
    rand = _fit(lambda: LinearProbe(build_encoder("toy_vfm")), source, s["steps"])
    own = {}
    for d in tw.TARGET_DOMAINS:
        probe = _fit(lambda: LinearProbe(build_encoder("toy_vfm", vfm_weights)),
                     tw.ToyWorld(d, "train", length=s["train"]), s["steps"])
        own[d] = evaluate(probe, tests[d])["mean_iou"]
    return {"frozen toy VFM + linear": evaluate_domains(vfm, tests),
            "random-init ViT + linear": evaluate_domains(rand, tests),
            "frozen toy VFM + linear, trained on each target": own}


HEADROOM_TARGETS = ("citylike", "fog")


def headroom_results(small: bool = False) -> dict:
    """What bounds G2, a diagnostic beside the gates (it decides nothing): G2's probe on a
    random-init ViT trained on each target's own labels (how far probing alone gets without
    pretraining), and G3's scratch CNN trained, without augmentation, on the own labels of
    ``HEADROOM_TARGETS`` (what the world lets a trainable network reach there)."""
    s = _scale(small)
    tests = _tests(s["test"])
    rand = {}
    for d in tw.TARGET_DOMAINS:
        probe = _fit(lambda: LinearProbe(build_encoder("toy_vfm")),
                     tw.ToyWorld(d, "train", length=s["train"]), s["steps"])
        rand[d] = evaluate(probe, tests[d])["mean_iou"]
    scratch = {d: evaluate(_fit(TinySegNet, tw.ToyWorld(d, "train", length=s["train"]),
                                s["scratch_steps"]), tests[d])["mean_iou"]
               for d in HEADROOM_TARGETS}
    return {"random-init ViT + linear, trained on each target": rand,
            "scratch CNN, trained on each target (no augmentation)": scratch}


def check_probes(r: dict) -> dict:
    vfm = _targets_mean(r["frozen toy VFM + linear"])
    rand = _targets_mean(r["random-init ViT + linear"])
    own = _targets_mean(r["frozen toy VFM + linear, trained on each target"])
    return {"G1": {"vfm_targets": vfm, "random_init_targets": rand, "margin": vfm - rand,
                   "needs": THRESHOLDS["G1"], "passed": vfm - rand >= THRESHOLDS["G1"]},
            "G2": {"own_labels_targets": own, "source_trained_targets": vfm, "margin": own - vfm,
                   "needs": THRESHOLDS["G2"], "passed": own - vfm >= THRESHOLDS["G2"]}}


# ----------------------------------------------------------------------------------------------
# G3: the gap against a scratch CNN with the recipes' augmentation
# ----------------------------------------------------------------------------------------------
def scratch_results(small: bool = False) -> dict:
    s = _scale(small)
    source = Augmented(tw.ToyWorld(tw.SOURCE_DOMAIN, "train", length=s["train"]), seed=0)
    model = _fit(TinySegNet, source, s["scratch_steps"], lr=1e-3)
    return {"scratch CNN + flip + photometric distortion": evaluate_domains(model,
                                                                            _tests(s["test"]))}


def check_scratch(r: dict) -> dict:
    res = r["scratch CNN + flip + photometric distortion"]
    src, tgt = 100 * res[tw.SOURCE_DOMAIN], _targets_mean(res)
    return {"G3": {"source": src, "targets": tgt, "drop": src - tgt, "needs": THRESHOLDS["G3"],
                   "passed": src - tgt >= THRESHOLDS["G3"]}}


# ----------------------------------------------------------------------------------------------
# G4: the VLM, zero-shot
# ----------------------------------------------------------------------------------------------
def vlm_results(vlm_weights: str | Path | None, small: bool = False) -> dict:
    from lessons.backbones import Encoder, create_model, get_bundle
    from lessons.zeroshot import MaskCLIPSegmenter
    from reprod.toy.vlm import crop_classification

    s = _scale(small)
    model = create_model("toy_vlm", vlm_weights).eval()
    seg = MaskCLIPSegmenter(Encoder(get_bundle("toy_vlm"), model))
    tests = _tests(s["test"])
    per_domain = {d: evaluate(seg, ds) for d, ds in tests.items()}
    bus = class_id(HELD_OUT_CLASS)
    return {"maskclip_miou": {d: r["mean_iou"] for d, r in per_domain.items()},
            "held_out_iou": {d: float(np.nan_to_num(r["per_class_iou"][bus]))
                             for d, r in per_domain.items()},
            "crops": crop_classification(model, n=s["crops"])}


def check_vlm(r: dict) -> dict:
    src = 100 * r["maskclip_miou"][tw.SOURCE_DOMAIN]
    tgt = _targets_mean(r["maskclip_miou"])
    crops = 100 * r["crops"]["crop_top1"]
    held = 100 * r["held_out_iou"][tw.SOURCE_DOMAIN]
    t = THRESHOLDS
    return {"G4": {"maskclip_source": src, "maskclip_targets": tgt, "crop_top1": crops,
                   "held_out_iou_source": held, "held_out_class": HELD_OUT_CLASS,
                   "needs": {k: v for k, v in t.items() if k.startswith("G4")},
                   "passed": (src >= t["G4_source"] and tgt >= t["G4_targets"]
                              and crops >= t["G4_crops"] and held >= t["G4_held_out"])}}


# ----------------------------------------------------------------------------------------------
# G5: the diffusion teacher
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def invariance(teacher, pairs: int, seed: int = 0) -> dict[str, float]:
    """Mean cosine of the teacher's pixel-aligned features at t_w and t_s between one scene in
    the source look and the same scene in each target look (one noise draw for both views)."""
    out = {"weak": [], "strong": []}
    looks = (tw.SOURCE_DOMAIN, *tw.TARGET_DOMAINS)
    renders = aligned_renders(pairs, looks, seed)                        # look -> (S, 3, H, W)
    for k in range(pairs):
        images = torch.stack([renders[d][k] for d in looks])                     # (9, 3, H, W)
        g = torch.Generator().manual_seed(k)
        noise_free = teacher.features(images, generator=g)
        for which in ("weak", "strong"):
            maps = getattr(noise_free, which)
            cos = [F.cosine_similarity(m[:1], m[1:], dim=1).mean().item() for m in maps]
            out[which].append(float(np.mean(cos)))
    return {k: float(np.mean(v)) for k, v in out.items()}


def teacher_results(teacher_weights: str | Path | None, probe: dict | None,
                    small: bool = False) -> dict:
    from lessons.querydiff import DiffusionTeacher
    from reprod.toy.diffusion import DiffusionProbe

    s = _scale(small)
    teacher = DiffusionTeacher.toy(teacher_weights)
    source = tw.ToyWorld(tw.SOURCE_DOMAIN, "train", length=s["train"])
    layout = _fit(lambda: DiffusionProbe(teacher, "strong"), source, s["steps"])
    painted = tw.ToyWorld("painted", "test", length=s["test"])
    return {"invariance": invariance(teacher, s["pairs"]),
            "teacher_probe_painted": evaluate(layout, painted)["mean_iou"],
            "student_probe_painted": (probe or {}).get("frozen toy VFM + linear", {}).get(
                "painted")}


def check_teacher(r: dict) -> dict:
    inv = r["invariance"]
    teacher, student = 100 * r["teacher_probe_painted"], r["student_probe_painted"]
    student = None if student is None else 100 * student
    return {"G5": {"cosine_weak": inv["weak"], "cosine_strong": inv["strong"],
                   "teacher_probe_painted": teacher, "student_probe_painted": student,
                   "passed": bool(inv["strong"] > inv["weak"] and student is not None
                                  and teacher > student)}}


# ----------------------------------------------------------------------------------------------
# All of them
# ----------------------------------------------------------------------------------------------
def measure(gates: Sequence[str] = GATES, small: bool = False,
            weights: Path = WEIGHTS_DIR, recorded: Path = GATES_FILE) -> dict:
    """Measure ``gates``; returns {"results": raw measurements, "gates": verdicts, ...}.

    G5 compares the teacher with the student's probe on ``painted``: the probes measured here,
    else those recorded in ``recorded``, else the last VFM try's in ``TRIES_FILE``."""
    results, verdicts, seconds = {}, {}, {}
    steps = [("G1", "G2"), ("G3",), ("G4",), ("G5",)]
    for group in steps:
        if not set(group) & set(gates):
            continue
        start = time.perf_counter()
        if "G1" in group:
            results["probes"] = probe_results(weights / "toy_vfm.safetensors", small)
            verdicts |= check_probes(results["probes"])
        elif group == ("G3",):
            results["scratch"] = scratch_results(small)
            verdicts |= check_scratch(results["scratch"])
        elif group == ("G4",):
            results["vlm"] = vlm_results(weights / "toy_vlm.safetensors", small)
            verdicts |= check_vlm(results["vlm"])
        else:
            probes, student = results.get("probes"), "measured with it"
            if probes is None and (earlier := _recorded("probes", recorded)):
                probes, student = earlier, str(recorded)
            if probes is None and (last := last_try("vfm")) is not None:
                probes, student = last["results"].get("probes"), f"try {last['name']}"
            results["teacher"] = teacher_results(weights / "toy_diffusion.safetensors", probes,
                                                 small) | {"student_from": student}
            verdicts |= check_teacher(results["teacher"])
        seconds["+".join(group)] = round(time.perf_counter() - start, 1)
    from reprod.toy.resumable import sha256

    used = {f.name: sha256(f) for f in (weights / n for n in ("toy_vfm.safetensors",
            "toy_vlm.safetensors", "toy_diffusion.safetensors")) if f.is_file()}
    return {"toyworld_version": tw.TOYWORLD_VERSION, "small": small, "results": results,
            "gates": verdicts, "seconds": seconds, "weights": used}


def _recorded(key: str, path: Path = GATES_FILE) -> dict | None:
    if path.is_file():
        return json.loads(path.read_text())["results"].get(key)
    return None


def probe_table(weights: Path, small: bool = False) -> dict[str, dict[str, float]]:
    """A VFM card's probe rows: the source-trained probe on these frozen features per domain,
    beside the random-init ViT's (G1's rows when these are the gated weights)."""
    recorded = _recorded("probes", weights.parent / GATES_FILE.name)
    names = ("frozen toy VFM + linear", "random-init ViT + linear")
    if weights.name == "toy_vfm.safetensors" and recorded:
        return {k: recorded[k] for k in names}
    s = _scale(small)
    tests = _tests(s["test"])
    source = tw.ToyWorld(tw.SOURCE_DOMAIN, "train", length=s["train"])
    probe = _fit(lambda: LinearProbe(build_encoder("toy_vfm", weights)), source, s["steps"])
    rows = {f"frozen {weights.stem} + linear": evaluate_domains(probe, tests)}
    if recorded:
        rows |= {k: recorded[k] for k in names}
    return rows


def _figure(key: str, x: object) -> str:
    """A gate figure as text: mIoU points to 0.1, cosines to 0.001 (G5's differ in the third)."""
    if not isinstance(x, float):
        return str(x)
    return f"{x:.3f}" if key.startswith("cosine") else f"{x:.1f}"


def gate_lines(verdicts: dict) -> list[str]:
    """One line per gate, with its figures, for cards and the command's output."""
    out = []
    for name, v in sorted(verdicts.items()):
        figures = ", ".join(f"{k} {_figure(k, x)}" for k, x in v.items()
                            if k not in ("passed", "needs"))
        needs = v.get("needs")
        needs = "" if needs is None else f" (needs {needs})"
        out.append(f"{name}: {'passed' if v['passed'] else 'NOT passed'}; {figures}{needs}")
    return out


def record_try(measured: dict, name: str, describe: str, run_dir: Path | None = None,
               tries_file: Path = TRIES_FILE) -> dict:
    """Append one full (not ``--small``) gate measurement to ``tries_file`` as try ``name``,
    with the pretraining config, steps and minutes of the run in ``run_dir`` (its state file)."""
    if measured.get("small"):
        raise ValueError("a --small measurement is a smoke test, not a try: measure in full")
    entry: dict = {"name": name, "describe": describe, "gates": measured["gates"],
                   "results": measured["results"], "seconds": measured.get("seconds", {}),
                   "weights": measured.get("weights", {}),
                   "toyworld_version": measured["toyworld_version"]}
    if run_dir is not None:
        states = sorted(Path(run_dir).glob("*_state.pt"))
        if len(states) != 1:
            raise FileNotFoundError(f"{run_dir} holds {len(states)} *_state.pt files, needs one")
        state = torch.load(states[0], map_location="cpu", weights_only=True)
        entry["pretraining"] = {"config": state["cfg"], "steps_done": int(state["step"]),
                                "minutes": round(float(state["seconds"]) / 60, 1),
                                "hardware": state["trained_on"]}
    tries = json.loads(tries_file.read_text()) if tries_file.is_file() else {"tries": []}
    if any(t["name"] == name for t in tries["tries"]):
        raise ValueError(f"{tries_file} already holds a try named {name!r}; tries are never "
                         "replaced, give this one a new name")
    tries["tries"].append(entry)
    tries_file.parent.mkdir(parents=True, exist_ok=True)
    tries_file.write_text(json.dumps(tries, indent=1) + "\n")
    return entry


TRY_PREFIX = {"vfm": "vfm", "vlm": "vlm", "diffusion": "teacher"}
"""The name of a model's tries: ``vfm-3``, ``vlm-1``, ``teacher-1``."""


def _model_of(entry: dict) -> str:
    prefix = entry["name"].rsplit("-", 1)[0]
    return next((m for m, p in TRY_PREFIX.items() if p == prefix), "vfm")


def next_try_name(model: str, tries_file: Path = TRIES_FILE) -> str:
    """The name the next try of ``model`` gets: its prefix and one more than its tries so far."""
    tries = json.loads(tries_file.read_text())["tries"] if tries_file.is_file() else []
    return f"{TRY_PREFIX[model]}-{sum(_model_of(t) == model for t in tries) + 1}"


def last_try(model: str, tries_file: Path = TRIES_FILE) -> dict | None:
    """The latest recorded try of ``model`` (``vfm``, ``vlm``, ``diffusion``), or None."""
    tries = json.loads(tries_file.read_text())["tries"] if tries_file.is_file() else []
    return next((t for t in reversed(tries) if _model_of(t) == model), None)


def _cell(v: dict | None, keys: tuple[str, str, str]) -> str:
    if v is None:
        return "not measured"
    a, b, margin = (v[k] for k in keys)
    return f"{a:.1f} / {b:.1f} / **{margin:+.1f}** {'✓' if v['passed'] else '✗'}"


def _when(t: dict) -> str:
    pre = t.get("pretraining")
    return (f"{pre['steps_done']:,} steps, {pre['minutes']:.0f} min on {pre['hardware']}"
            if pre else "")


def _mark(v: dict) -> str:
    return "✓" if v["passed"] else "✗"


def tries_table(tries: dict) -> str:
    """The tries as markdown tables, one per model: the VFM's G1 / G2 (and G3, the world's)
    with their two figures and margin, the VLM's G4 and the teacher's G5 figures (✓ passed)."""
    tables = [_vfm_table([t for t in tries["tries"] if _model_of(t) == "vfm"])]
    vlm = [t for t in tries["tries"] if _model_of(t) == "vlm"]
    if vlm:
        n = {k: THRESHOLDS[f"G4_{k}"] for k in ("source", "targets", "crops", "held_out")}
        rows = [f"| try | pretraining | MaskCLIP source (≥ {n['source']}) | MaskCLIP targets' "
                f"mean (≥ {n['targets']}) | crops top-1 % (≥ {n['crops']}) | held-out class "
                f"IoU, source (≥ {n['held_out']}) | G4 |", "|---|---|---|---|---|---|---|"]
        for t in vlm:
            g = t["gates"]["G4"]
            rows.append(f"| {t['name']}: {t['describe']} | {_when(t)} | "
                        f"{g['maskclip_source']:.1f} | {g['maskclip_targets']:.1f} | "
                        f"{g['crop_top1']:.1f} | {g['held_out_iou_source']:.1f} "
                        f"(`{g['held_out_class']}`) | {_mark(g)} |")
        tables.append("\n".join(rows))
    teacher = [t for t in tries["tries"] if _model_of(t) == "diffusion"]
    if teacher:
        rows = ["| try | pretraining | cosine across looks, weak / strong noise (strong > weak) "
                "| layout probe on `painted`, teacher / student (teacher > student) | G5 |",
                "|---|---|---|---|---|"]
        for t in teacher:
            g, r = t["gates"]["G5"], t["results"]["teacher"]
            student = ("not measured" if g["student_probe_painted"] is None else
                       f"{g['student_probe_painted']:.1f} ({r.get('student_from', '')})")
            rows.append(f"| {t['name']}: {t['describe']} | {_when(t)} | {g['cosine_weak']:.3f} "
                        f"/ {g['cosine_strong']:.3f} | {g['teacher_probe_painted']:.1f} / "
                        f"{student} | {_mark(g)} |")
        tables.append("\n".join(rows))
    return "\n\n".join(tables)


def _vfm_table(tries: list[dict]) -> str:
    needs = {g: THRESHOLDS.get(g) for g in ("G1", "G2", "G3")}
    rows = ["| try | pretraining | G1 VFM / random-init / margin (≥ +{}) | G2 own labels / source "
            "/ margin (≥ +{}) | G3 source / targets / drop (≥ {}) |".format(
                *(needs[g] for g in ("G1", "G2", "G3"))),
            "|---|---|---|---|---|"]
    world_g3 = None                  # G3 is the world's, not the VFM's: a try without it
    for t in tries:                  # shows the last one measured, and says whose it is
        g = t["gates"]
        g3, by = (g["G3"], "") if "G3" in g else (world_g3 or (None, ""))
        g3_cell = ("not measured" if g3 is None else
                   f"{g3['source']:.1f} / {g3['targets']:.1f} / **{g3['drop']:.1f}** "
                   f"{'✓' if g3['passed'] else '✗'}{by}")
        if "G3" in g and world_g3 is None:
            world_g3 = (g["G3"], f" ({t['name']}'s: the same world)")
        g1 = _cell(g.get("G1"), ("vfm_targets", "random_init_targets", "margin"))
        g2 = _cell(g.get("G2"), ("own_labels_targets", "source_trained_targets", "margin"))
        rows.append(f"| {t['name']}: {t['describe']} | {_when(t)} | {g1} | {g2} | {g3_cell} |")
    return "\n".join(rows)


def domains_table(entry: dict) -> str:
    """One try's rows per domain (mIoU %; the VFM's G1 / G2 / G3 probes, or the VLM's
    MaskCLIP zero-shot and its held-out class's IoU), as docs/toyworld.md shows them."""
    rows = {**entry["results"].get("probes", {}), **entry["results"].get("scratch", {})}
    if "vlm" in entry["results"]:
        vlm = entry["results"]["vlm"]
        rows |= {"toy VLM, MaskCLIP zero-shot": vlm["maskclip_miou"],
                 f"its IoU of the held-out class ({HELD_OUT_CLASS})": vlm["held_out_iou"]}
    domains = [tw.SOURCE_DOMAIN, *tw.TARGET_DOMAINS]
    out = [f"| {entry['name']} | {' | '.join(domains)} | targets' mean |",
           "|---" * (len(domains) + 2) + "|"]
    for name, r in rows.items():
        cells = [f"{100 * r[d]:.1f}" if d in r else "" for d in domains]
        out.append(f"| {name} | {' | '.join(cells)} | {_targets_mean(r):.1f} |")
    return "\n".join(out)


INVARIANCE_ROWS = ("targets' mean", "fog", "night", "painted", "other scenes")


def invariance_table(world: str = "1.0", scenes: int = 16) -> str:
    """The invariance meter (``lessons.invariance``) of ``world``'s committed toy VFM (frozen),
    of lesson 02's Rein and full fine-tuning checkpoints (seed 0) where they were trained in
    ``world``, and of a random-init ViT of the VFM's shape (seed 0), as docs/toyworld.md shows
    it."""
    from lessons.backbones import toy_weights_dir
    from lessons.checkpoints import CHECKPOINT_DIR, load_lesson_checkpoint, read_metadata
    from lessons.invariance import invariance_meter, meter_table

    with tw.in_world(world):
        vfm = build_encoder("toy_vfm", toy_weights_dir(world) / "toy_vfm.safetensors")
        meters = {f"world-{world[0]} toy VFM, frozen": invariance_meter(vfm, scenes)}
        for method, name in (("rein", "Rein"), ("full", "full fine-tuning")):
            path = CHECKPOINT_DIR / "02_rein" / f"{method}_seed0.safetensors"
            if read_metadata(path)["toyworld_version"] != world:
                continue
            model = load_lesson_checkpoint(path)[0].eval()
            reins = getattr(model, "reins", None)
            adapter = reins.adapter(model.encoder) if reins is not None else None
            meters[f"{name} (lesson 02, seed 0)"] = invariance_meter(model.encoder, scenes,
                                                                      adapter=adapter)
        torch.manual_seed(0)
        meters["random-init ViT"] = invariance_meter(build_encoder("toy_vfm"), scenes)
    return meter_table(meters, INVARIANCE_ROWS)


def _main(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gates", nargs="+", choices=GATES, default=list(GATES))
    ap.add_argument("--small", action="store_true", help="a quick smoke version, not recorded")
    ap.add_argument("--weights", type=Path, default=WEIGHTS_DIR,
                    help="folder of toy_vfm / toy_vlm / toy_diffusion .safetensors")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"where to write the JSON (default: {GATES_FILE}, merged with what is "
                         "there; never for --small)")
    ap.add_argument("--record-try", metavar="NAME", default=None,
                    help="record the measurement in --from FILE as a try in TRIES_FILE (no "
                         "measuring)")
    ap.add_argument("--from", dest="from_file", type=Path, default=None,
                    help="with --record-try: a JSON this command wrote")
    ap.add_argument("--run-dir", type=Path, default=None,
                    help="with --record-try: the pretraining run that made the weights")
    ap.add_argument("--describe", default="", help="with --record-try: what this try changed")
    ap.add_argument("--tries-table", action="store_true", help="print the tries' table and stop")
    ap.add_argument("--headroom", action="store_true",
                    help=f"measure what bounds G2 into {HEADROOM_FILE.name} and stop")
    ap.add_argument("--invariance-table", action="store_true",
                    help="print world 1's toy VFM on the invariance meter and stop")
    args = ap.parse_args(argv)
    if args.invariance_table:
        print(invariance_table())
        return 0
    if args.headroom:
        start = time.perf_counter()
        rows = headroom_results(args.small)
        for name, row in rows.items():
            print(name + ": " + ", ".join(f"{d} {100 * v:.1f}" for d, v in row.items()))
        if not args.small:
            HEADROOM_FILE.write_text(json.dumps(
                {"toyworld_version": tw.TOYWORLD_VERSION, "results": rows,
                 "seconds": round(time.perf_counter() - start, 1)}, indent=1) + "\n")
            print(f"wrote {HEADROOM_FILE}")
        return 0
    if args.tries_table:
        if not TRIES_FILE.is_file():
            raise SystemExit(f"error: no tries recorded yet ({TRIES_FILE} does not exist)")
        tries = json.loads(TRIES_FILE.read_text())
        last = [last_try(m) for m in ("vfm", "vlm")]
        print(tries_table(tries), *(domains_table(t) for t in last if t), sep="\n\n")
        return 0
    if args.record_try:
        if args.from_file is None or not args.from_file.is_file():
            raise SystemExit("error: --record-try needs --from FILE, a JSON this command wrote")
        entry = record_try(json.loads(args.from_file.read_text()), args.record_try,
                           args.describe, args.run_dir)
        print(f"recorded try {entry['name']!r} in {TRIES_FILE}")
        return 0
    measured = measure(args.gates, args.small, args.weights, args.out or GATES_FILE)
    for line in gate_lines(measured["gates"]):
        print(line)
    print(json.dumps(measured["seconds"]))
    out = args.out or (None if args.small else GATES_FILE)
    if out is not None:
        old = json.loads(out.read_text()) if out.is_file() else {}
        for key in ("results", "gates", "seconds", "weights"):
            old[key] = {**old.get(key, {}), **measured[key]}
        old["toyworld_version"], old["small"] = measured["toyworld_version"], args.small
        out.write_text(json.dumps(old, indent=1) + "\n")
        print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    with tw.in_world(tw.TOYWORLD_VERSION):       # world 2, whatever the course's default
        return _main(argv)

if __name__ == "__main__":
    raise SystemExit(main())
