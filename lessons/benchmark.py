"""The toy benchmark: every lesson model under one protocol, its runs, and how to read them.

``METHODS`` lists every model the course trains on ToyWorld (which lesson shows it, how to build
it, its recipe's training knobs); ``run_one`` trains one (method, seed) under the toy benchmark
protocol (``lessons.toyworld.toy_benchmark``): train on ``synthetic`` with the same budget for
every method (``lessons.train``; the recipes' random flip and photometric distortion,
``lessons.augment``), select the checkpoint by mIoU on the ``validation`` style, then score the
source test split and every target domain (mIoU, and every class's IoU, None where a class is
absent). The scores are measured on the checkpoint as written (fp16 tensors loaded back), so a
notebook that loads it and evaluates the same scenes gets the same numbers. Each run records
its validation curve (the mIoU at every validation), from which a budget is judged converged.

The loop differs by world. World 1's committed runs were made as ``SWEEP_TRAIN`` says: scenes
rendered on the fly, the augmentation drawn per image (``lessons.augment.Augmented``), float32.
World 2's (``SWEEP_TRAIN_2``) renders the training and validation scenes once
(``lessons.toyworld.Rendered``), draws the augmentation per batch (``augment_batch``, the same
distributions) and trains under bfloat16 autocast on a CUDA GPU, in float32 on a CPU: the same
protocol, a faster loop (``python -m reprod.toy.bench_sweep``). Not bf16 on a CPU: PyTorch 2.14's
CPU bf16 kernels returned wrong gradients for layers of two of the course's models (CAT-Seg's 4x
transposed convolution, QueryDiff's dilated depthwise convolutions of a channels-last map), found
by ``python -m reprod.toy.bf16_check``; a CPU run made under bf16 is not counted (``is_done``).

Reading the runs: ``summary`` gives each method's mean and **sample** standard deviation
(ddof = 1) over seeds; ``paired_difference`` compares two methods seed by seed, the mean of the
per-seed differences with a 95% t interval, and calls the difference resolved only when the
interval excludes zero; ``rank_agreement`` is the Spearman rank correlation of the six main
methods' toy targets' means with the papers' GTAV -> Cityscapes / BDD100K / Mapillary means
(``PAPER_ROWS``), printed whatever it is.

``python -m reprod.toy.sweep`` runs the sweep (resumably) and writes ``RESULTS_FILE``.

Dimension glossary: none (runs and tables).
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from lessons import toyworld as tw
from lessons.augment import Augmented
from lessons.checkpoints import (
    CHECKPOINT_DIR,
    build_model,
    load_lesson_checkpoint,
    save_lesson_checkpoint,
    trainable_state_dict,
)
from lessons.train import TrainConfig, evaluate, train
from lessons.utils import (
    bf16_native,
    count_parameters,
    get_device,
    hardware,
    lessons_digest,
    module_closure,
    seed_everything,
)

__all__ = [
    "CLAIMS", "METHODS", "PAPER_ROWS", "PRECONDITION_SEEDS", "RESULTS_FILE", "RUNTIME_KEYS",
    "SWEEP_TRAIN", "SWEEP_TRAIN_2", "Claim", "Method", "checkpoint_path", "claims_table",
    "cpu_bf16", "forgetting_file", "is_done", "load_forgetting", "load_results", "markdown_table",
    "paired_difference", "paper_mean", "per_class_difference", "per_seed", "rank_agreement",
    "run_key", "run_one", "seeds_of", "summary", "sweep_dir", "sweep_train", "t_interval",
    "train_config",
]

RESULTS_FILE = CHECKPOINT_DIR / "toy_sweep.json"     # world 1's sweep (``sweep_dir("1.0")``)


@dataclass(frozen=True)
class Method:
    """A lesson model: how to build it, which lesson shows it, how it trains."""

    lesson: str                       # notebook stem prefix, e.g. "02_rein"
    builder: str                      # a name in lessons.checkpoints.BUILDERS
    builder_kwargs: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)     # TrainConfig overrides for this method
    label: str = ""
    seeds: tuple[int, ...] | None = None          # world 1: None the benchmark's, ablations (0,)
    augment: bool = True              # the recipes' flip + photometric distortion (lessons.augment)
    keep_checkpoint: bool = True      # ablations keep results only
    worlds: tuple[str, ...] = ("1.0", "2.0")      # the worlds whose sweep runs it
    explore: bool = False             # world 2: an open choice explored at seed 0, no comparison
    precondition: bool = False        # world 2: a lesson's precondition experiment, seeds 0-2


# The same budget for every method (the toy benchmark compares at equal steps and batch).
# World 1's, under which its committed runs were made:
SWEEP_TRAIN = dict(steps=500, batch_size=16, lr=1e-3, weight_decay=0.05, schedule="poly",
                   eval_every=100, select_best=True)
# World 2's: the same knobs in the faster loop (module docstring); the augmentation is the
# method's (``Method.augment``) and bf16 autocast is set on a CUDA GPU (``train_config``). Its
# budget is what world 2's learning curves chose (``python -m reprod.toy.curves --choose`` on
# lessons/weights/checkpoints/world2/toy_curves.json; the rule in reprod.toy.curves, written
# before they ran)
SWEEP_TRAIN_2 = dict(SWEEP_TRAIN, steps=1500)
# A lesson's precondition experiment (world 2 only) shows a mechanism on and off at fewer seeds
PRECONDITION_SEEDS = (0, 1, 2)
# Knobs that say how a run was computed, not what was trained: a result made with another
# value (bf16 or not, a GPU or not) counts as the same run
RUNTIME_KEYS = ("progress", "device", "num_workers", "autocast")

_SEG = "lessons.segmentor:build_toy_segmentor"
_TQDM = "lessons.mask2former:build_toy_tqdm"
_REIN_M2F = "lessons.mask2former:build_toy_rein_mask2former"
_FROZEN_M2F = "lessons.mask2former:build_toy_frozen_mask2former"
_CATSEG = "lessons.catseg:build_toy_catseg"
_QUERYDIFF = "lessons.querydiff:build_toy_querydiff"
_MFUSER = "lessons.mfuser:build_toy_mfuser"
_INVARIANT = "toy_vfm_invariant"
METHODS: dict[str, Method] = {
    # notebook 08's references: no foundation model at all, with the same budget and augmentation
    "scratch": Method("00_dgss_problem", "lessons.baselines:TinySegNet", label="scratch TinySegNet",
                      keep_checkpoint=False),
    "scratch_vit": Method("08_toy_benchmark", _SEG, {"method": "full", "pretrained": False},
                          label="toy ViT from scratch (no pretraining)", keep_checkpoint=False),
    "frozen": Method("02_rein", _SEG, {"method": "frozen"}, label="frozen + head"),
    "full": Method("02_rein", _SEG, {"method": "full"}, label="full fine-tune"),
    "rein": Method("02_rein", _SEG, {"method": "rein"}, label="Rein"),
    # ablations behind notebook 02's exercises (seed 0 only, results without checkpoints)
    "rein_zero_init": Method("02_rein", _SEG, {"method": "rein", "zero_init": True},
                             label="Rein, paper init", seeds=(0,),
                             keep_checkpoint=False, explore=True),
    "rein_m5": Method("02_rein", _SEG, {"method": "rein", "token_length": 5},
                      label="Rein, 5 tokens", seeds=(0,),
                      keep_checkpoint=False, explore=True),
    "full_lr_0.1": Method("02_rein", _SEG, {"method": "full", "backbone_lr_mult": 0.1},
                          label="full, encoder lr x0.1", seeds=(0,),
                          keep_checkpoint=False, explore=True),
    # notebook 02's precondition experiment: the same runs on the invariance-taught toy VFM
    # (world 1's recipe on world 2's pretraining world), {generic, invariance taught} x
    # {frozen, Rein}: an adapter pays when the foundation model lacks the invariance
    "frozen_invariant": Method("02_rein", _SEG, {"method": "frozen", "encoder": _INVARIANT},
                               label="frozen + head, invariance-taught VFM",
                               keep_checkpoint=False, worlds=("2.0",), precondition=True),
    "rein_invariant": Method("02_rein", _SEG, {"method": "rein", "encoder": _INVARIANT},
                             label="Rein, invariance-taught VFM", keep_checkpoint=False,
                             worlds=("2.0",), precondition=True),
    # notebooks 03a and 03b: Mask2Former heads (03a: Rein's query link on the VFM; 03b: tqdm's text
    # queries on the VLM); their checkpoints share one folder, 03_text_queries
    "rein_m2f": Method("03_text_queries", _REIN_M2F, label="Rein + Mask2Former (query link)"),
    # world 2's like-for-like control of Rein + Mask2Former and QueryDiff: the same head and
    # matching on the frozen VFM, Mask2Former's learnable queries, no Rein
    "frozen_m2f": Method("03_text_queries", _FROZEN_M2F, label="frozen + Mask2Former",
                         keep_checkpoint=False, worlds=("2.0",)),
    "tqdm": Method("03_text_queries", _TQDM, label="tqdm (toy VLM, text queries)"),
    "tqdm_learnable": Method("03_text_queries", _TQDM,
                             {"queries": "learnable", "matcher": "hungarian"},
                             label="toy VLM, learnable queries + Hungarian", seeds=(0,),
                             keep_checkpoint=False),
    # notebook 04: CAT-Seg on the toy VLM, `bus` held out of training (scored from its name);
    # the official full-model gradient clipping at 0.01 (cvlab-kaist/CAT-Seg@6d3a188
    # configs/config.yaml, SOLVER.CLIP_GRADIENTS)
    "catseg": Method("04_catseg", _CATSEG, train={"grad_clip": 0.01},
                     label="CAT-Seg (toy VLM, bus unseen)"),
    "catseg_all": Method("04_catseg", _CATSEG, {"held_out": []}, train={"grad_clip": 0.01},
                         label="CAT-Seg, bus trained", seeds=(0,)),
    # world 2's control of the aggregation: the cost volume's embedding goes straight to the
    # upsampling decoder (no spatial or class aggregation layers), `bus` still held out
    "catseg_no_aggregation": Method("04_catseg", _CATSEG, {"num_layers": 0},
                                    train={"grad_clip": 0.01},
                                    label="CAT-Seg without aggregation (raw cost + upsampling)",
                                    keep_checkpoint=False, worlds=("2.0",)),
    # notebook 05: QueryDiff on notebook 03a's Rein + Mask2Former, with and without the toy
    # diffusion teacher's guidance; the open choices (Huber target, alpha) at seed 0
    "querydiff": Method("05_querydiff", _QUERYDIFF, label="QueryDiff (diffusion-guided)"),
    "querydiff_no_dcl": Method("05_querydiff", _QUERYDIFF, {"alpha": 0.0},
                               label="agent queries + refinement, no guidance",
                               keep_checkpoint=False),
    # notebook 05's precondition experiment: what the teacher is shown (lessons.querydiff,
    # guidance controls): the scene with no look (an invariant oracle) or another image
    "querydiff_oracle": Method("05_querydiff", _QUERYDIFF, {"guidance": "oracle"},
                               label="QueryDiff, guided by a look-free oracle",
                               keep_checkpoint=False, worlds=("2.0",), precondition=True),
    "querydiff_shuffled": Method("05_querydiff", _QUERYDIFF, {"guidance": "shuffled"},
                                 label="QueryDiff, guided by a shuffled teacher",
                                 keep_checkpoint=False, worlds=("2.0",), precondition=True),
    "querydiff_weak": Method("05_querydiff", _QUERYDIFF, {"huber_target": "weak"},
                             label="QueryDiff, Huber on weak features (code)", seeds=(0,),
                             keep_checkpoint=False, explore=True),
    "querydiff_alpha10": Method("05_querydiff", _QUERYDIFF, {"alpha": 10.0},
                                label="QueryDiff, alpha 10", seeds=(0,), keep_checkpoint=False,
                                explore=True),
    # notebook 07: MFuser on the frozen toy VFM + toy VLM, and the fusions its Tables 3, 4 and 6
    # compare (seed 0); Rein (VFM only) and tqdm (VLM only) are notebooks 03a's and 03b's runs
    "mfuser": Method("07_mfuser", _MFUSER, label="MFuser (MVFuser + MTEnhancer)"),
    "mfuser_self_attention": Method("07_mfuser", _MFUSER, {"fusion": "self_attention"},
                                    label="self-attention over [VFM; VLM]", seeds=(0,),
                                    keep_checkpoint=False),
    "mfuser_cross_attention": Method("07_mfuser", _MFUSER, {"fusion": "cross_attention"},
                                     label="Rein-style cross-attention", seeds=(0,),
                                     keep_checkpoint=False),
    "mfuser_separate": Method("07_mfuser", _MFUSER, {"fusion": "separate_mvfusers"},
                              label="separate MVFusers", seeds=(0,), keep_checkpoint=False),
    "mfuser_concat": Method("07_mfuser", _MFUSER, {"fusion": "none"},
                            label="no fuser (frozen concatenation)", seeds=(0,),
                            keep_checkpoint=False),
    "mfuser_no_enhancer": Method("07_mfuser", _MFUSER, {"enhancer": "none"},
                                 label="MFuser without MTEnhancer", seeds=(0,),
                                 keep_checkpoint=False),
    # notebook 07's precondition experiment: near-twin towers (the VLM's image tower in both
    # slots, one set of blind spots), fused and concatenated, against the VFM + VLM pair
    "mfuser_twins": Method("07_mfuser", _MFUSER, {"first_tower": "toy_vlm"},
                           label="MFuser on near-twin towers (VLM + VLM)",
                           keep_checkpoint=False, worlds=("2.0",), precondition=True),
    "mfuser_twins_concat": Method("07_mfuser", _MFUSER, {"first_tower": "toy_vlm",
                                                         "fusion": "none"},
                                  label="near-twin towers, frozen concatenation",
                                  keep_checkpoint=False, worlds=("2.0",), precondition=True),
}


def seeds_of(method: str, world: str | None = None) -> tuple[int, ...]:
    """The seeds a world's sweep runs ``method`` at (default: the current world). World 2: every
    benchmark seed for a run that enters a comparison (controls included), seeds 0-2 for a
    lesson's ``precondition`` experiment, seed 0 for an ``explore`` run; none where the method
    is not in that world's sweep. World 1: as its committed sweep ran (``Method.seeds``)."""
    world = world or tw.current_world()
    spec, benchmark_seeds = METHODS[method], tuple(tw.toy_benchmark(world)["seeds"])
    if world not in spec.worlds:
        return ()
    if world == tw.TOYWORLD_VERSION:
        return (0,) if spec.explore else PRECONDITION_SEEDS if spec.precondition \
            else benchmark_seeds
    return spec.seeds or benchmark_seeds


def run_key(method: str, seed: int) -> str:
    return f"{method}/seed{seed}"


def sweep_dir(world: str | None = None) -> Path:
    """Where a world's sweep keeps its results (``toy_sweep.json``) and its lesson checkpoints
    (one folder per lesson): world 1 in ``CHECKPOINT_DIR``, world 2 in ``CHECKPOINT_DIR/world2``
    (default: the current world), so neither world's runs overwrite the other's."""
    world = world or tw.current_world()
    return CHECKPOINT_DIR / "world2" if world == tw.TOYWORLD_VERSION else CHECKPOINT_DIR


def checkpoint_path(method: str, seed: int, root: Path | None = None) -> Path:
    """A run's lesson checkpoint under ``root`` (default: the current world's ``sweep_dir``)."""
    root = sweep_dir() if root is None else root
    return root / METHODS[method].lesson / f"{method}_seed{seed}.safetensors"


def sweep_train(world: str | None = None) -> dict:
    """The sweep's training knobs of a ToyWorld version (default: the current world)."""
    world = world or tw.current_world()
    return dict(SWEEP_TRAIN_2 if world == tw.TOYWORLD_VERSION else SWEEP_TRAIN)


def _fast_loop(world: str | None = None) -> bool:
    return (world or tw.current_world()) == tw.TOYWORLD_VERSION


def train_config(method: str, seed: int, steps: int | None = None,
                 overrides: dict | None = None) -> TrainConfig:
    """One run's TrainConfig: the world's sweep knobs, the method's own, the seed, then
    ``steps`` and any ``overrides`` (e.g. a learning-curve run's longer budget)."""
    cfg = {**sweep_train(), **METHODS[method].train, "seed": seed, "progress": False}
    if _fast_loop():
        device = get_device()
        cfg |= {"augment": METHODS[method].augment,
                "autocast": "bf16" if device.type == "cuda" and bf16_native(device) else None}
    if steps is not None:
        cfg["steps"] = steps
    return TrainConfig.from_dict(cfg | dict(overrides or {}))


def protocol(test_length: int) -> dict:
    return {**tw.toy_benchmark(), "test_length": test_length,
            "targets": (tw.SOURCE_DOMAIN, *tw.TARGET_DOMAINS)}


def run_one(method: str, seed: int, steps: int | None = None, test_length: int = 200,
            checkpoint: Path | None = None, overrides: dict | None = None) -> dict:
    """Train one (method, seed), write its checkpoint (if a path is given), score every domain.
    ``steps`` and ``overrides`` change the run's TrainConfig (``train_config``)."""
    spec = METHODS[method]
    cfg = train_config(method, seed, steps, overrides)
    proto = protocol(test_length)
    sets = tw.benchmark_datasets(seed, proto)
    seed_everything(seed)
    model = build_model(spec.builder, spec.builder_kwargs)
    source, val = sets.pop("train"), sets.pop("val")
    if _fast_loop():
        source, val = tw.Rendered(source), tw.Rendered(val)      # the batches augment (cfg)
    elif spec.augment:
        source = Augmented(source, seed=seed)
    hist = train(model, source, cfg, val_dataset=val)
    modules = module_closure(spec.builder.split(":")[0].removeprefix("lessons."))
    meta = {"builder": spec.builder, "builder_kwargs": spec.builder_kwargs, "method": method,
            "lesson": spec.lesson, "seed": seed, "train_config": asdict(cfg),
            "toyworld_version": tw.current_world(), "lessons_modules": modules,
            "lessons_digest": lessons_digest(modules), "best_step": hist.best_step,
            "val_miou": hist.best_miou, "seconds": round(hist.seconds, 1),
            "augment": spec.augment, "hardware": hardware(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint or Path(tmp) / f"{method}_seed{seed}.safetensors"
        state = (model.trainable_state_dict() if hasattr(model, "trainable_state_dict")
                 else trainable_state_dict(model))         # a plain nn.Module: the scratch nets
        save_lesson_checkpoint(path, state, meta)
        scored, _ = load_lesson_checkpoint(path)      # score what was written (fp16)
    miou, class_iou = {}, {}
    for domain, dataset in sets.items():
        result = evaluate(scored, dataset)
        miou[domain] = result["mean_iou"]
        class_iou[domain] = [None if math.isnan(v) else round(float(v), 4)   # absent: None
                             for v in result["per_class_iou"].tolist()]
    return {**{k: meta[k] for k in ("method", "seed", "best_step", "val_miou", "seconds",
                                     "augment", "hardware", "torch", "lessons_digest")},
            "toyworld_version": tw.current_world(), "train_config": asdict(cfg),
            "test_length": test_length, "miou": miou, "class_iou": class_iou,
            "val_curve": {"steps": hist.val_steps,
                          "miou": [round(float(v), 4) for v in hist.val_miou]},
            "trainable_parameters": count_parameters(model),
            "checkpoint": checkpoint.name if checkpoint else None,
            "final_loss": float(np.mean(hist.loss[-20:]))}


# Notebook 08's six main methods and the published row each stands for: (table in
# lessons/papers.yaml, method, backbone), whose `mean` is over GTAV -> Cityscapes, BDD100K and
# Mapillary. Rein's Table 2 trains its frozen and fully fine-tuned rows under the same
# Mask2Former head as Rein; the toy's `frozen` and `full` have a linear head (notebook 02).
PAPER_ROWS: dict[str, tuple[str, str, str]] = {
    "frozen": ("rein_gtav_main", "Frozen", "DINOv2-L"),
    "full": ("rein_gtav_main", "Full fine-tuning", "DINOv2-L"),
    "rein_m2f": ("rein_gtav_main", "Rein", "DINOv2-L"),
    "tqdm": ("tqdm_gtav_main", "tqdm", "EVA02-CLIP-L"),
    "querydiff": ("querydiff_gtav_main", "QueryDiff", "DINOv2-L"),
    "mfuser": ("mfuser_gtav_main", "MFuser", "DINOv2-L + EVA02-L"),
}


def paper_mean(table_id: str, method: str, backbone: str) -> float:
    """A published row's mean mIoU (lessons/papers.yaml); an error if the row is not there."""
    from lessons.papers import get_table

    rows = [r for r in get_table(table_id).rows if (r.method, r.backbone) == (method, backbone)]
    if len(rows) != 1 or rows[0].values.get("mean") is None:
        raise ValueError(f"{table_id} has {len(rows)} row(s) {method!r} / {backbone!r} with a mean")
    return float(rows[0].values["mean"])


def rank_agreement(results: dict, rows: dict[str, tuple[str, str, str]] | None = None) -> dict:
    """Spearman's rank correlation between the toy targets' mean of each method (mean over its
    seeds) and its paper row's mean (``PAPER_ROWS``), with the two-sided p-value and both
    rankings. Every method must have runs (an error names the missing ones)."""
    rows = rows or PAPER_ROWS
    toy = {m: row["targets' mean"][0] for m, row in summary(results, list(rows)).items()}
    paper = {m: paper_mean(*rows[m]) for m in rows}
    rho, p = stats.spearmanr([toy[m] for m in rows], [paper[m] for m in rows])
    return {"rho": float(rho), "p": float(p), "methods": list(rows), "toy": toy, "paper": paper,
            "toy_order": sorted(rows, key=toy.get, reverse=True),
            "paper_order": sorted(rows, key=paper.get, reverse=True)}


@dataclass(frozen=True)
class Claim:
    """A published comparison and the toy runs that test it: the paper's row A minus row B (two
    ``(table, method, backbone)`` rows of ``lessons/papers.yaml``, each table's ``mean`` over
    GTAV -> Cityscapes / BDD100K / Mapillary), or, where the paper states only a direction
    (``paper=None``), that A beats B, as ``source`` says; against the toy's method A minus method
    B, paired by seed (``paired_difference``)."""

    claim: str
    toy: tuple[str, str]
    paper: tuple[tuple[str, str, str], tuple[str, str, str]] | None
    source: str = ""
    worlds: tuple[str, ...] = ("1.0", "2.0")


_REIN_T2 = "rein_gtav_main"
_FUSION = "mfuser_fusion_choice"
_MVFUSER = (_FUSION, "MVFuser", "DINOv2 + EVA02")
#: Notebook 08's claims. On world 2 each is like for like: Rein + Mask2Former against the frozen
#: VFM under the same Mask2Former head (Rein's Table 2 trains its frozen row under Rein's head),
#: tqdm's text queries against learnable queries on the same VLM, QueryDiff's guidance against
#: the same model unguided, CAT-Seg's aggregation against its raw cost map with the same decoder.
CLAIMS: tuple[Claim, ...] = (
    Claim("full fine-tuning vs frozen", ("full", "frozen"),
          ((_REIN_T2, "Full fine-tuning", "DINOv2-L"), (_REIN_T2, "Frozen", "DINOv2-L"))),
    Claim("Rein vs frozen (linear heads)", ("rein", "frozen"),
          ((_REIN_T2, "Rein", "DINOv2-L"), (_REIN_T2, "Frozen", "DINOv2-L")), worlds=("1.0",)),
    Claim("Rein vs frozen (Mask2Former heads)", ("rein_m2f", "frozen_m2f"),
          ((_REIN_T2, "Rein", "DINOv2-L"), (_REIN_T2, "Frozen", "DINOv2-L")), worlds=("2.0",)),
    Claim("Rein vs full fine-tuning", ("rein", "full"),
          ((_REIN_T2, "Rein", "DINOv2-L"), (_REIN_T2, "Full fine-tuning", "DINOv2-L"))),
    Claim("tqdm (VLM) vs Rein (VFM)", ("tqdm", "rein_m2f"),
          (("tqdm_gtav_main", "tqdm", "EVA02-CLIP-L"),
           ("tqdm_gtav_main", "Rein", "DINOv2 ViT-L"))),
    Claim("text queries vs learnable queries (same VLM)", ("tqdm", "tqdm_learnable"), None,
          "tqdm, section 3: text object queries generalise better than learnable ones"),
    Claim("cost aggregation vs raw cost map", ("catseg", "catseg_no_aggregation"), None,
          "CAT-Seg, section 4 ablations: the aggregation lifts the raw cost", worlds=("2.0",)),
    Claim("QueryDiff vs Rein", ("querydiff", "rein_m2f"),
          (("querydiff_gtav_main", "QueryDiff", "DINOv2-L"),
           ("querydiff_gtav_main", "Rein", "DINOv2-L"))),
    Claim("diffusion guidance vs none (same agent queries)", ("querydiff", "querydiff_no_dcl"),
          None, "QueryDiff, section 5.3 (Table 3): each component helps, L_dist included",
          worlds=("2.0",)),
    Claim("MFuser vs VFM only", ("mfuser", "rein_m2f"),
          (_MVFUSER, (_FUSION, "VFM-only", "DINOv2"))),
    Claim("MFuser vs VLM only", ("mfuser", "tqdm"), (_MVFUSER, (_FUSION, "VLM-only", "EVA02"))),
    Claim("MVFuser vs plain concatenation", ("mfuser", "mfuser_concat"),
          (_MVFUSER, (_FUSION, "no fine-tuning (concat)", "DINOv2 + EVA02"))),
    Claim("MVFuser vs Rein-style cross-attention", ("mfuser", "mfuser_cross_attention"),
          (_MVFUSER, (_FUSION, "Cross-Attention (Rein-style)", "DINOv2 + EVA02"))),
    Claim("MVFuser vs separate MVFusers", ("mfuser", "mfuser_separate"),
          (_MVFUSER, (_FUSION, "Separate MVFusers", "DINOv2 + EVA02"))),
    Claim("MTEnhancer vs no text enhancement", ("mfuser", "mfuser_no_enhancer"),
          (("mfuser_text_enhancement", "MTEnhancer", "DINOv2 + EVA02"),
           ("mfuser_text_enhancement", "no enhancement", "DINOv2 + EVA02"))),
)


def claims_table(results: dict, world: str | None = None,
                 claims: tuple[Claim, ...] = CLAIMS) -> list[dict]:
    """Each claim of ``world`` (default: the current) against ``results``: the paper's
    difference (None where only its direction is stated), the toy's paired difference of the
    targets' mean with its 95% t interval, and a verdict: ``agrees`` / ``disagrees`` when the
    interval excludes zero, ``not resolved`` when it does not, ``not testable`` when the two
    methods share fewer than two seeds."""
    world = world or tw.current_world()
    rows = []
    for c in (c for c in claims if world in c.worlds):
        paper = None if c.paper is None else paper_mean(*c.paper[0]) - paper_mean(*c.paper[1])
        row = {"claim": c.claim, "toy": f"{c.toy[0]} - {c.toy[1]}", "paper": paper,
               "source": c.source}
        shared = set(per_seed(results, c.toy[0])) & set(per_seed(results, c.toy[1]))
        if len(shared) < 2:
            rows.append(row | {"mean": None, "low": None, "high": None, "seeds": len(shared),
                               "verdict": "not testable (fewer than 2 paired seeds)"})
            continue
        d = paired_difference(results, *c.toy)
        sign = 1.0 if paper is None else math.copysign(1.0, paper)
        verdict = (("agrees" if sign * d["mean"] > 0 else "disagrees") if d["resolved"]
                   else "not resolved (the interval includes 0)")
        rows.append(row | {k: d[k] for k in ("mean", "low", "high")}
                    | {"seeds": len(d["seeds"]), "verdict": verdict})
    return rows


def load_results(path: Path | None = None) -> dict:
    """A sweep's results (default: the current world's, ``sweep_dir() / "toy_sweep.json"``);
    no runs where the file does not exist yet."""
    path = sweep_dir() / RESULTS_FILE.name if path is None else path
    if not path.exists():
        return {"runs": {}}
    return json.loads(path.read_text())


def forgetting_file() -> Path:
    """Where notebook 02's forgetting curves are (``python -m reprod.toy.preconditions
    forgetting`` writes them): beside world 2's sweep results."""
    return sweep_dir("2.0") / "forgetting.json"


def load_forgetting(path: Path | None = None) -> dict[tuple[str, float], dict[int, dict]]:
    """Notebook 02's forgetting curves by (method, encoder learning-rate multiplier) and seed.

    Each curve is a dict: ``steps``, the steps it was read at (n,), and every target it read
    (``citylike``, ``streetview``): its mIoU (a fraction) at those steps (n,). Empty where the
    file does not exist yet.
    """
    path = forgetting_file() if path is None else path
    if not path.exists():
        return {}
    curves: dict[tuple[str, float], dict[int, dict]] = {}
    for rec in json.loads(path.read_text())["runs"].values():
        curves.setdefault((rec["method"], float(rec["lr_mult"])), {})[rec["seed"]] = rec["curve"]
    return {key: dict(sorted(by_seed.items())) for key, by_seed in sorted(curves.items())}


def cpu_bf16(record: dict) -> bool:
    """Whether a run was trained under bfloat16 autocast on a CPU, whose bf16 kernels PyTorch
    2.14 gets wrong for some of the course's layers (``reprod.toy.bf16_check``)."""
    return (record.get("train_config", {}).get("autocast") == "bf16"
            and str(record.get("hardware", "")).startswith("CPU"))


def is_done(record: dict | None, cfg: TrainConfig, test_length: int, augment: bool) -> bool:
    """Whether ``record`` is this run already: same world, knobs (``RUNTIME_KEYS`` aside), test
    scenes and augmentation, and not trained under bf16 on a CPU (``cpu_bf16``)."""
    def trained(config: dict) -> dict:
        return {k: v for k, v in config.items() if k not in RUNTIME_KEYS}

    return (record is not None and record.get("toyworld_version") == tw.current_world()
            and trained(record.get("train_config", {})) == trained(asdict(cfg))
            and record.get("test_length") == test_length and record.get("augment") == augment
            and not cpu_bf16(record))


def per_seed(results: dict, method: str, domain: str = "targets' mean") -> dict[int, float]:
    """A method's mIoU (points) on ``domain`` (or the targets' mean) at each seed it ran."""
    out = {}
    for rec in results["runs"].values():
        if rec["method"] == method:
            targets = [v for d, v in rec["miou"].items() if d in tw.TARGET_DOMAINS]
            value = np.mean(targets) if domain == "targets' mean" else rec["miou"][domain]
            out[rec["seed"]] = 100 * float(value)
    return out


def t_interval(differences: np.ndarray, confidence: float = 0.95) -> dict:
    """Per-seed differences (n,) -> their mean, sample standard deviation (ddof = 1), the
    ``confidence`` Student t interval of the mean, and ``resolved``: the interval excludes zero."""
    d = np.asarray(differences, dtype=float)
    sd = float(d.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, len(d) - 1)) * sd / math.sqrt(len(d))
    mean = float(d.mean())
    return {"mean": mean, "sd": sd, "low": mean - half, "high": mean + half,
            "resolved": mean - half > 0 or mean + half < 0}


def _shared_seeds(ra: dict, rb: dict, a: str, b: str) -> list[int]:
    seeds = sorted(set(ra) & set(rb))
    if len(seeds) < 2:
        raise ValueError(f"{a} and {b} share {len(seeds)} seed(s); a paired interval needs 2+")
    return seeds


def paired_difference(results: dict, a: str, b: str, domain: str = "targets' mean",
                      confidence: float = 0.95) -> dict:
    """Method ``a`` minus method ``b`` seed by seed (mIoU points): the mean of the per-seed
    differences, its sample standard deviation, a ``confidence`` t interval, and ``resolved``
    (the interval excludes zero). Only seeds both methods ran count."""
    ra, rb = per_seed(results, a, domain), per_seed(results, b, domain)
    seeds = _shared_seeds(ra, rb, a, b)
    interval = t_interval([ra[s] - rb[s] for s in seeds], confidence)
    return {"a": a, "b": b, "domain": domain, "seeds": seeds, **interval}


def per_class_difference(results: dict, a: str, b: str,
                         domains: tuple[str, ...] | None = None,
                         confidence: float = 0.95) -> dict[str, dict]:
    """Method ``a`` minus method ``b``, class by class (IoU points), paired by seed: per seed, a
    class's IoU averaged over the ``domains`` where it is present (default: the targets), then
    the mean of the per-seed differences with its ``confidence`` t interval (``resolved``: the
    interval excludes zero). Classes absent from every domain are left out."""
    from lessons.classes import CLASSES

    domains = tuple(tw.TARGET_DOMAINS) if domains is None else domains

    def per_seed_class(method: str) -> dict[int, np.ndarray]:
        out = {}
        for rec in results["runs"].values():
            if rec["method"] == method:
                if "class_iou" not in rec:
                    raise ValueError(f"{method} seed {rec['seed']} has no per-class IoU (a run "
                                     "made before the sweep recorded it)")
                rows = np.array([[np.nan if v is None else v for v in rec["class_iou"][d]]
                                 for d in domains], dtype=float)               # (domains, K)
                present = (~np.isnan(rows)).sum(0)
                mean = np.nansum(rows, 0) / np.maximum(present, 1)
                out[rec["seed"]] = 100 * np.where(present > 0, mean, np.nan)   # (K,)
        return out

    ra, rb = per_seed_class(a), per_seed_class(b)
    seeds = _shared_seeds(ra, rb, a, b)
    diffs = np.stack([ra[s] - rb[s] for s in seeds])                      # (seeds, K)
    return {name: {**t_interval(diffs[:, k], confidence), "seeds": seeds}
            for k, name in enumerate(CLASSES) if not np.isnan(diffs[:, k]).any()}


def summary(results: dict, methods: list[str] | None = None) -> dict[str, dict]:
    """Per method: mean, sample standard deviation (ddof = 1; NaN for one seed) and the number of
    seeds, of mIoU per domain and the targets' mean (percent). A method asked for by name that
    has no run is an error, never a silently missing row."""
    by_method: dict[str, list[dict]] = {}
    for rec in results["runs"].values():
        by_method.setdefault(rec["method"], []).append(rec["miou"])
    missing = [m for m in methods or [] if m not in by_method]
    if missing:
        raise ValueError(f"no runs of {missing} in these results (run python -m reprod.toy.sweep "
                         f"--methods {' '.join(missing)})")
    out = {}
    for m in methods or [m for m in METHODS if m in by_method]:
        runs = by_method[m]
        domains = [d for d in (tw.SOURCE_DOMAIN, *tw.TARGET_DOMAINS) if d in runs[0]]
        targets = domains[1:]
        vals = {d: 100 * np.array([r[d] for r in runs]) for d in domains}
        vals["targets' mean"] = np.mean([vals[d] for d in targets], axis=0)
        out[m] = {d: (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan"),
                      len(v)) for d, v in vals.items()}
    return out


def markdown_table(results: dict, methods: list[str] | None = None) -> str:
    """mIoU (%) mean ± sample std over seeds, a row per method."""
    s = summary(results, methods)
    if not s:
        return "(no results yet)"
    domains = list(next(iter(s.values())))
    lines = ["| method | seeds | " + " | ".join(domains) + " |",
             "|---|---|" + "---|" * len(domains)]
    for m, row in s.items():
        n = next(iter(row.values()))[2]
        cells = [f"{mu:.1f} ± {sd:.1f}" if n > 1 else f"{mu:.1f}" for mu, sd, _ in row.values()]
        lines.append(f"| {METHODS[m].label or m} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
