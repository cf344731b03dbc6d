"""Tests of reprod.toy.sweep (a tiny sweep end to end, resuming, the table) and of the committed
lesson checkpoints and results it made (they load, fit the code and re-measure as recorded)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lessons import toyworld as tw
from lessons.benchmark import (
    METHODS,
    RESULTS_FILE,
    load_results,
    markdown_table,
    paired_difference,
    seeds_of,
    summary,
)
from lessons.checkpoints import CHECKPOINT_DIR, load_lesson_checkpoint, read_metadata
from lessons.train import evaluate
from reprod.toy import sweep as toy_sweep


def test_a_tiny_sweep_writes_checkpoints_and_results_and_resumes(tmp_path, capsys):
    args = ["--methods", "frozen", "rein", "--seeds", "0", "1", "--checkpoint-seeds", "0",
            "--steps", "2", "--test-length", "2", "--out", str(tmp_path)]
    assert toy_sweep.main(args) == 0
    results = load_results(tmp_path / RESULTS_FILE.name)
    assert set(results["runs"]) == {"frozen/seed0", "rein/seed0", "frozen/seed1", "rein/seed1"}
    rec = results["runs"]["rein/seed0"]
    assert set(rec["miou"]) == {tw.SOURCE_DOMAIN, *tw.TARGET_DOMAINS}
    assert set(rec["class_iou"]) == set(rec["miou"])               # per-class IoU, absent: None
    assert all(len(v) == 19 and all(x is None or 0 <= x <= 1 for x in v)
               for v in rec["class_iou"].values())
    assert rec["train_config"]["steps"] == 2 and rec["toyworld_version"] == tw.current_world()
    assert rec["checkpoint"] == "rein_seed0.safetensors"
    assert results["runs"]["rein/seed1"]["checkpoint"] is None
    ckpt = tmp_path / "02_rein" / "rein_seed0.safetensors"
    assert ckpt.exists() and not (tmp_path / "02_rein" / "rein_seed1.safetensors").exists()
    assert read_metadata(ckpt)["best_step"] == 2
    capsys.readouterr()
    assert toy_sweep.main(args) == 0                              # resumes: nothing to redo
    out = capsys.readouterr().out
    assert out.count("done, skipped") == 4
    table = markdown_table(results)
    assert "| Rein | 2 |" in table and "targets' mean" in table


def test_world_2_runs_the_faster_loop_and_records_its_validation_curve(monkeypatch):
    """World 2's run renders its scenes once, augments per batch, uses bf16 where native and
    records the mIoU at every validation; world 1's knobs stay those of its committed runs."""
    from lessons import benchmark
    from lessons.benchmark import SWEEP_TRAIN, is_done, run_one, train_config

    with tw.in_world("1.0"):
        one = train_config("scratch", 0)
    assert not one.augment and one.autocast is None and one.steps == SWEEP_TRAIN["steps"]
    rendered, keep = [], tw.Rendered
    monkeypatch.setattr(tw, "Rendered", lambda ds: rendered.append(ds) or keep(ds))
    with tw.in_world("2.0"):
        cfg = train_config("scratch", 0, steps=4, overrides={"eval_every": 2})
        assert cfg.augment and cfg.steps == 4 and cfg.eval_every == 2
        device = benchmark.get_device()
        assert cfg.autocast == ("bf16" if device.type == "cuda" and benchmark.bf16_native(device)
                                else None)                          # never bf16 on a CPU
        rec = run_one("scratch", 0, steps=4, test_length=2, overrides={"eval_every": 2})
    assert [ds.split for ds in rendered] == ["train", "val"]        # rendered once, not per step
    assert rec["val_curve"]["steps"] == [2, 4] and len(rec["val_curve"]["miou"]) == 2
    assert rec["val_miou"] == pytest.approx(max(rec["val_curve"]["miou"]), abs=1e-4)
    assert rec["toyworld_version"] == "2.0" and rec["train_config"]["augment"]
    # a result made with or without bf16 on a GPU is the same run; under bf16 on a CPU it is not
    # (wrong kernels); another budget is not either
    with tw.in_world("2.0"):
        other = {**rec, "train_config": {**rec["train_config"], "autocast": "bf16"},
                 "hardware": "NVIDIA H100 80GB HBM3 (CUDA 13.0)"}
        assert is_done(other, cfg, 2, True)
        assert not is_done({**other, "hardware": "CPU (Intel(R) Xeon(R), 2 cores, 1 threads)"},
                           cfg, 2, True)
        assert not is_done(rec, train_config("scratch", 0, steps=5), 2, True)


def test_rendered_keeps_the_same_items_and_names_bad_labels():
    ds = tw.ToyWorld("synthetic", "val", length=3, seed=1)
    kept = tw.Rendered(ds)
    assert len(kept) == 3 and kept.labels.dtype == torch.uint8
    assert repr(kept).startswith("Rendered(ToyWorld(")
    for i in range(3):
        image, label = kept[i]
        assert torch.equal(image, ds[i][0]) and torch.equal(label, ds[i][1])
        assert label.dtype == torch.int64
    with pytest.raises(ValueError, match="class ids in 0..255"):
        tw.Rendered([(torch.zeros(3, 4, 4), torch.full((4, 4), 300))])
    with pytest.raises(ValueError, match="at least one item"):
        tw.Rendered([])


def test_summary_is_mean_and_sample_spread_over_seeds():
    rec = {d: 0.0 for d in (tw.SOURCE_DOMAIN, *tw.TARGET_DOMAINS)}
    runs = {"runs": {"rein/seed0": {"method": "rein", "miou": {**rec, "fog": 0.2}},
                     "rein/seed1": {"method": "rein", "miou": {**rec, "fog": 0.4}}}}
    fog = summary(runs)["rein"]["fog"]
    # the sample standard deviation (ddof = 1): sqrt(((20 - 30)^2 + (40 - 30)^2) / 1)
    assert fog[0] == pytest.approx(30.0) and fog[1] == pytest.approx(200 ** 0.5) and fog[2] == 2
    assert summary(runs)["rein"]["targets' mean"][0] == pytest.approx(30.0 / 8)
    one = {"runs": {"rein/seed0": runs["runs"]["rein/seed0"]}}
    assert math.isnan(summary(one)["rein"]["fog"][1])            # one seed has no spread
    assert "| Rein | 1 | 0.0 |" in markdown_table(one)
    with pytest.raises(ValueError, match=r"no runs of \['rein_m80'\]"):
        markdown_table(one, ["rein", "rein_m80"])             # a missing row is an error


def _paired_runs(diffs: list[float]) -> dict:
    runs = {}
    for seed, d in enumerate(diffs):
        base = dict.fromkeys((tw.SOURCE_DOMAIN, *tw.TARGET_DOMAINS), 0.3)
        runs[f"frozen/seed{seed}"] = {"method": "frozen", "seed": seed, "miou": base}
        runs[f"rein/seed{seed}"] = {"method": "rein", "seed": seed,
                                    "miou": {k: v + d / 100 for k, v in base.items()}}
    return {"runs": runs}


def test_t_interval_by_hand():
    from lessons.benchmark import t_interval

    r = t_interval([1.0, 2.0, 3.0])                 # mean 2, sd 1, t(0.975, 2 dof) = 4.3027
    assert r["mean"] == 2.0 and r["sd"] == 1.0
    assert r["low"] == pytest.approx(2 - 4.302653 / 3 ** 0.5, abs=1e-5) and not r["resolved"]
    assert t_interval([1.0, 1.2, 0.9, 1.1])["resolved"]


def test_paired_difference_is_a_t_interval_over_seeds():
    # differences 1, 2, 3, 4, 5 points: mean 3, sd 1.58, t(0.975, 4) = 2.776 -> 3 +- 1.96
    p = paired_difference(_paired_runs([1, 2, 3, 4, 5]), "rein", "frozen")
    assert p["seeds"] == [0, 1, 2, 3, 4] and p["mean"] == pytest.approx(3.0)
    assert p["sd"] == pytest.approx(2.5 ** 0.5)
    assert p["low"] == pytest.approx(3 - 2.7764 * 2.5 ** 0.5 / 5 ** 0.5, abs=1e-3)
    assert p["resolved"]
    assert not paired_difference(_paired_runs([-2, 3, -1, 2, 0]), "rein", "frozen")["resolved"]
    with pytest.raises(ValueError, match="share 1 seed"):
        paired_difference(_paired_runs([1]), "rein", "frozen")


# --- what the sweep committed -----------------------------------------------------------------
COMMITTED = sorted(CHECKPOINT_DIR.glob("*/*.safetensors"))


def test_every_method_has_results_for_every_benchmark_seed():
    runs = load_results()["runs"]
    for method, spec in METHODS.items():
        for seed in seeds_of(method):
            rec = runs.get(f"{method}/seed{seed}")
            assert rec is not None, f"{method}/seed{seed} missing: run python -m reprod.toy.sweep"
            assert rec["toyworld_version"] == tw.current_world()
            # the same budget for every method, up to its own recipe (e.g. CAT-Seg's clipping)
            assert rec["train_config"] == (runs["frozen/seed0"]["train_config"] | spec.train
                                           | {"seed": seed})


@pytest.mark.parametrize("path", COMMITTED, ids=[p.name for p in COMMITTED])
def test_committed_checkpoints_load_into_the_current_code(path):
    _, meta = load_lesson_checkpoint(path)
    assert meta["method"] in METHODS and path.parent.name == METHODS[meta["method"]].lesson
    assert path.stat().st_size < 8 << 20


def test_a_committed_result_re_measures_as_recorded():
    """The Rein checkpoint, scored again on the source test split, gives its recorded mIoU."""
    rec = load_results()["runs"]["rein/seed0"]
    model, _ = load_lesson_checkpoint(CHECKPOINT_DIR / "02_rein" / rec["checkpoint"])
    test = tw.ToyWorld(tw.SOURCE_DOMAIN, "test", length=rec["test_length"], seed=0)
    miou = evaluate(model, test)["mean_iou"]
    assert miou == pytest.approx(rec["miou"][tw.SOURCE_DOMAIN], abs=5e-3)


def test_jobs_train_runs_in_parallel_processes_with_the_same_results(tmp_path, capsys):
    """``--jobs 2`` (the GPU path: several toy runs share one GPU) gives what one job gives."""
    args = ["--methods", "frozen", "--seeds", "0", "1", "--checkpoint-seeds", "--steps", "2",
            "--test-length", "2"]
    assert toy_sweep.main([*args, "--out", str(tmp_path / "one")]) == 0
    assert toy_sweep.main([*args, "--out", str(tmp_path / "two"), "--jobs", "2"]) == 0
    one, two = (load_results(tmp_path / d / RESULTS_FILE.name)["runs"] for d in ("one", "two"))
    assert set(one) == set(two) == {"frozen/seed0", "frozen/seed1"}
    for key in one:
        assert two[key]["miou"] == pytest.approx(one[key]["miou"], abs=1e-3)
    with pytest.raises(SystemExit):
        toy_sweep.main([*args, "--out", str(tmp_path / "x"), "--jobs", "0"])
    assert "--jobs must be >= 1" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# reprod.toy.bench_sweep: where a sweep run's time goes
# ----------------------------------------------------------------------------------------------
def test_the_projection_adds_the_pieces_of_a_run():
    from reprod.toy.bench_sweep import Costs, project

    c = Costs(method="m", render=0.1)
    c.update({"augment, per image": 0.05, "augment, batched": 0.01, "step fp32": 1.0,
              "step bf16": 0.5, "forward fp32": 0.02, "forward bf16": 0.01,
              "render, evaluation": 0.001})
    r = project(c, steps=10, validations=2, val_scenes=5, test_scenes=3, train_scenes=32)
    test = 9 * 3 * (0.001 + 0.02)
    assert r["today"] == pytest.approx(10 * (0.1 + 0.05 + 1.0) + 2 * 5 * 0.021 + test)
    # world 2's loop on a CPU: cached and batched, in float32 (the bf16 figures are not used)
    faster = 2 * 0.1 + 5 * 0.001 + 10 * (0.01 + 1.0) + 2 * 5 * 0.02 + test
    assert r["cached and batched"] == pytest.approx(faster)
    c["step bf16"] = c["forward bf16"] = None
    assert project(c, steps=10, validations=2, val_scenes=5, test_scenes=3,
                   train_scenes=32)["cached and batched"] == pytest.approx(faster)


def test_the_plan_times_a_run_by_its_own_runs_its_curve_or_a_method_like_it():
    def rec(method, seconds):
        return {"method": method, "seconds": seconds}

    results = {"runs": {"frozen/seed0": rec("frozen", 300.0), "frozen/seed1": rec("frozen", 500.0),
                        "rein/seed0": rec("rein", 600.0)}}
    curves = {"tqdm": {"train_config": {"steps": 2000}, "seconds": 4000.0}}
    seconds = lambda m: toy_sweep.run_seconds(results, m, curves, steps=1500)  # noqa: E731
    assert seconds("frozen") == (400.0, "2 run(s)")
    assert seconds("tqdm") == (3000.0, "its curve x0.75")
    assert seconds("frozen_invariant") == (400.0, "like frozen: 2 run(s)")    # same use of the VFM
    assert seconds("rein_invariant") == (600.0, "like rein: 1 run(s)")
    assert seconds("tqdm_learnable") == (3000.0, "like tqdm: its curve x0.75")
    assert seconds("querydiff") == (None, "unknown")
    text = toy_sweep.plan(results, ["frozen_invariant", "frozen_invariant", "querydiff"], curves,
                          steps=1500, cores=2)
    assert "| frozen_invariant | 2 | 400 | like frozen: 2 run(s) | 0.2 |" in text
    assert "| querydiff | 1 | ? | unknown | ? |" in text
    assert "3 run(s) left: 0.2 single-core hours known, about 0.1 h on 2 cores, plus 1 method(s) " \
           "of unknown time: ['querydiff']" in text


def test_the_sweep_bench_measures_a_method_and_names_a_bad_one(tmp_path, capsys):
    from reprod.toy import bench_sweep

    out = tmp_path / "b.json"
    assert bench_sweep.main(["--methods", "scratch", "--repeats", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "scratch |" in text and "x |" in text
    record = json.loads(out.read_text())
    assert record["pieces"][0]["step fp32"] > 0 and record["runs"]["scratch"]["today"] > 0
    assert record["pieces"][0]["step GFLOP"] > 0 and record["matmul GFLOP/s"] > 0
    assert "GFLOP a float32 step" in text and "% of the matmul's rate" in text
    with pytest.raises(SystemExit):
        bench_sweep.main(["--methods", "nope"])
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_the_sweep_bench_counts_a_steps_flops_by_hand():
    """A linear layer's forward and backward: 2mnk for the forward, twice that for the
    gradients of its input and weight (the bias and the loss are not counted)."""
    from reprod.toy.bench_sweep import step_gflop

    layer, x = torch.nn.Linear(8, 4), torch.randn(2, 8, requires_grad=True)
    assert step_gflop(lambda: layer(x)) == pytest.approx(2 * 2 * 8 * 4 / 1e9)
    assert step_gflop(lambda: layer(x).sum().backward()) == pytest.approx(3 * 2 * 2 * 8 * 4 / 1e9)


def test_the_sweep_bench_times_a_compiled_step_beside_the_eager_one(capsys, monkeypatch):
    """The bookkeeping of ``--compile`` (the compilation itself, a minute or more of inductor on
    a CPU, is left out: ``nn.Module.compile`` is a no-op here)."""
    from reprod.toy import bench_sweep

    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    assert bench_sweep.main(["--methods", "scratch", "--repeats", "1", "--compile"]) == 0
    text = capsys.readouterr().out
    assert len(compiled) == 1 and "scratch: compiled step" in text and "of compilation" in text


# ----------------------------------------------------------------------------------------------
# reprod.toy.curves: the budget chosen from learning curves, by a rule written down first
# ----------------------------------------------------------------------------------------------
def test_the_budget_is_the_first_grid_step_where_most_methods_have_converged():
    from reprod.toy.curves import choose_budget, converged_at

    steps = [100, 200, 300, 400]
    rising = {"steps": steps, "miou": [0.10, 0.20, 0.295, 0.30]}       # within 1 point by 300
    early = {"steps": steps, "miou": [0.30, 0.29, 0.28, 0.28]}         # best first, then falls
    late = {"steps": steps, "miou": [0.10, 0.15, 0.20, 0.25]}          # still rising at the end
    assert converged_at(rising) == 300 and converged_at(early) == 100 and converged_at(late) == 400
    chosen = choose_budget({"a": rising, "b": early, "c": late, "d": rising},
                           grid=(100, 200, 300, 400), quorum=0.75)
    assert chosen["budget"] == 300 and chosen["share"] == 0.75
    with pytest.raises(ValueError, match="fewer than 100% of the methods converge within 300"):
        choose_budget({"a": rising, "c": late}, grid=(100, 300), quorum=1.0)
    with pytest.raises(ValueError, match="no curves"):
        choose_budget({})


def test_the_curves_command_records_a_curve_resumes_and_chooses(tmp_path, capsys, monkeypatch):
    from reprod.toy import curves

    monkeypatch.setattr(curves, "MAIN_METHODS", ("scratch",))
    out = tmp_path / "curves.json"
    args = ["--methods", "scratch", "--steps", "4", "--every", "2", "--out", str(out)]
    assert curves.main(args) == 0
    rec = json.loads(out.read_text())["runs"]["scratch"]
    assert rec["val_curve"]["steps"] == [2, 4] and rec["toyworld_version"] == "2.0"
    assert "miou" not in rec                           # the rule never sees a target domain
    capsys.readouterr()
    assert curves.main(args) == 0 and capsys.readouterr().out == ""      # resumed: nothing to do
    assert curves.main(["--out", str(out), "--choose"]) == 0
    assert "budget: 250 steps" in capsys.readouterr().out
    monkeypatch.setattr(curves, "MAIN_METHODS", ("scratch", "rein"))    # rein has no curve
    assert curves.main(["--out", str(out), "--choose"]) == 1
    assert "no curve of ['rein']" in capsys.readouterr().out


def test_world_2_runs_every_compared_method_and_control_at_five_seeds():
    assert seeds_of("rein", "2.0") == (0, 1, 2, 3, 4) and seeds_of("rein", "1.0") == (0, 1, 2)
    for control in ("mfuser_concat", "tqdm_learnable", "querydiff_no_dcl", "catseg_all",
                    "frozen_m2f", "catseg_no_aggregation"):
        assert seeds_of(control, "2.0") == (0, 1, 2, 3, 4), control
    assert seeds_of("rein_m5", "2.0") == (0,) and seeds_of("mfuser_concat", "1.0") == (0,)
    assert seeds_of("frozen_m2f", "1.0") == ()            # world 1's sweep never ran it
    # the lessons' precondition experiments: world 2 only, seeds 0-2, builder kwargs a header holds
    from lessons.checkpoints import check_builder_kwargs

    experiments = [m for m, spec in METHODS.items() if spec.precondition]
    assert set(experiments) == {"frozen_invariant", "rein_invariant", "querydiff_oracle",
                                "querydiff_shuffled", "mfuser_twins", "mfuser_twins_concat"}
    for m in experiments:
        assert seeds_of(m, "2.0") == (0, 1, 2) and seeds_of(m, "1.0") == (), m
        check_builder_kwargs(METHODS[m].builder, METHODS[m].builder_kwargs)


def test_the_two_world_2_controls_train_and_predict():
    """frozen + Mask2Former (Rein + Mask2Former's head without Rein) and CAT-Seg without its
    aggregation layers (the raw cost's embedding straight into the upsampling decoder)."""
    from lessons.catseg import build_toy_catseg
    from lessons.mask2former import build_toy_frozen_mask2former, build_toy_rein_mask2former
    from lessons.train import TrainConfig, predict, train
    from lessons.utils import count_parameters

    images, labels = torch.rand(2, 3, 64, 128), torch.randint(0, 19, (2, 64, 128))
    frozen = build_toy_frozen_mask2former(pretrained=False)
    rein = build_toy_rein_mask2former(pretrained=False)
    assert frozen.reins is None and not any(p.requires_grad for p in frozen.encoder.parameters())
    assert count_parameters(frozen) < count_parameters(rein)
    plain = build_toy_catseg(pretrained=False, num_layers=0)
    assert len(plain.aggregator.layers) == 0
    assert count_parameters(plain) < count_parameters(build_toy_catseg(pretrained=False))
    data = list(zip(images, labels, strict=True))
    for model in (frozen, plain):
        train(model, data, TrainConfig(steps=1, batch_size=2, progress=False))
        assert predict(model, images).shape == (2, 19, 64, 128)


def test_the_docs_state_the_budget_rule_the_code_applies():
    from pathlib import Path

    from reprod.toy import curves

    doc = " ".join((Path(__file__).resolve().parents[1] / "docs" / "toyworld.md")
                   .read_text().split())
    section = doc[doc.index("## The sweep on world 2"):doc.index("## ToyWorld 1")]
    grid = ", ".join(f"{g:,}" for g in curves.GRID)
    assert f"seed 0 for {curves.LONG:,} steps, validating every {curves.EVERY}" in section
    assert f"within {curves.TOLERANCE:g} mIoU point of its best" in section
    assert f"{{{grid}}}" in section and "three quarters" in section and curves.QUORUM == 0.75
    assert "seeds 0-4" in section and tw.TOY_BENCHMARK["seeds"] == (0, 1, 2, 3, 4)


def test_rank_agreement_is_spearman_over_the_six_main_methods_and_their_paper_rows():
    from lessons.benchmark import PAPER_ROWS, paper_mean, rank_agreement

    assert paper_mean(*PAPER_ROWS["rein_m2f"]) == 64.3 and paper_mean(*PAPER_ROWS["mfuser"]) == 68.2
    paper = {m: paper_mean(*row) for m, row in PAPER_ROWS.items()}
    order = sorted(paper, key=paper.get)                     # the papers' ranking, lowest first
    domains = (tw.SOURCE_DOMAIN, *tw.TARGET_DOMAINS)

    def results(ranked):
        return {"runs": {f"{m}/seed{s}": {"method": m, "seed": s,
                                          "miou": dict.fromkeys(domains, (k + s / 10) / 100)}
                         for k, m in enumerate(ranked) for s in (0, 1)}}

    same = rank_agreement(results(order))
    assert same["rho"] == pytest.approx(1.0) and same["toy_order"] == same["paper_order"]
    assert rank_agreement(results(order[::-1]))["rho"] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="no runs of"):
        rank_agreement(results(order[:-1]))
    with pytest.raises(ValueError, match="0 row"):
        paper_mean("rein_gtav_main", "Rein", "no such backbone")


def _two_method_runs(a: str, b: str, diffs: list[float]) -> dict:
    domains = (tw.SOURCE_DOMAIN, *tw.TARGET_DOMAINS)
    runs = {}
    for seed, d in enumerate(diffs):
        runs[f"{b}/seed{seed}"] = {"method": b, "seed": seed, "miou": dict.fromkeys(domains, .3)}
        runs[f"{a}/seed{seed}"] = {"method": a, "seed": seed,
                                   "miou": dict.fromkeys(domains, .3 + d / 100)}
    return {"runs": runs}


def test_claims_are_read_from_paired_intervals_against_the_papers_sign():
    from lessons.benchmark import CLAIMS, METHODS, claims_table, paper_mean

    for c in CLAIMS:                                 # every claim names real runs and rows
        assert set(c.toy) <= set(METHODS) and (c.paper is None) == bool(c.source), c.claim
        assert all(seeds_of(m, w) for m in c.toy for w in c.worlds), c.claim
        if c.paper is not None:
            paper_mean(*c.paper[0]), paper_mean(*c.paper[1])
    # world 2's Rein claim is like for like: the frozen VFM under Rein's Mask2Former head
    by_name = {c.claim: c for c in CLAIMS if "2.0" in c.worlds}
    assert by_name["Rein vs frozen (Mask2Former heads)"].toy == ("rein_m2f", "frozen_m2f")
    rein_full = next(c for c in CLAIMS if c.toy == ("rein", "full"))      # paper: +2.6

    def verdict(diffs):
        rows = claims_table(_two_method_runs("rein", "full", diffs), "2.0", (rein_full,))
        return rows[0]

    row = verdict([1, 2, 3, 4, 5])
    assert row["verdict"] == "agrees" and row["paper"] == pytest.approx(2.6)
    assert row["mean"] == pytest.approx(3.0) and row["seeds"] == 5 and row["low"] > 0
    assert verdict([-1, -2, -3, -4, -5])["verdict"] == "disagrees"
    assert verdict([-2, 3, -1, 2, 0])["verdict"].startswith("not resolved")
    one = verdict([4])
    assert one["verdict"].startswith("not testable") and one["seeds"] == 1 and one["mean"] is None
    # a claim with only a direction (A beats B) is read as a positive paper sign
    aggregation = next(c for c in CLAIMS if c.toy == ("catseg", "catseg_no_aggregation"))
    rows = claims_table(_two_method_runs("catseg", "catseg_no_aggregation", [3, 4, 5]), "2.0",
                        (aggregation,))
    assert rows[0]["paper"] is None and rows[0]["verdict"] == "agrees"
    assert claims_table({"runs": {}}, "1.0", (aggregation,)) == []       # not a world-1 claim


def test_each_world_keeps_its_own_sweep_folder(tmp_path, monkeypatch, capsys):
    from lessons import benchmark
    from lessons.benchmark import checkpoint_path, sweep_dir

    assert sweep_dir("1.0") == CHECKPOINT_DIR and sweep_dir("2.0") == CHECKPOINT_DIR / "world2"
    assert load_results()["runs"] == load_results(RESULTS_FILE)["runs"]   # the course's world 1
    with tw.in_world("2.0"):
        assert checkpoint_path("rein", 0).parent == CHECKPOINT_DIR / "world2" / "02_rein"
    monkeypatch.setattr(benchmark, "CHECKPOINT_DIR", tmp_path)
    monkeypatch.setattr(toy_sweep, "sweep_dir", benchmark.sweep_dir)
    args = ["--world", "2.0", "--methods", "frozen", "--seeds", "0", "--steps", "2",
            "--test-length", "2"]
    assert toy_sweep.main(args) == 0
    rec = load_results(tmp_path / "world2" / RESULTS_FILE.name)["runs"]["frozen/seed0"]
    assert rec["toyworld_version"] == "2.0" and rec["val_curve"]["steps"] == [2]
    assert (tmp_path / "world2" / "02_rein" / "frozen_seed0.safetensors").is_file()
    assert not (tmp_path / RESULTS_FILE.name).exists() and tw.current_world() == tw.COURSE_WORLD


def test_per_class_difference_pairs_seeds_class_by_class_over_the_domains_present():
    from lessons.benchmark import per_class_difference
    from lessons.classes import CLASSES

    car, bus = CLASSES.index("car"), CLASSES.index("bus")
    runs = {}
    for seed, d in enumerate([10, 20, 30]):
        for method, shift in (("tqdm", d), ("tqdm_learnable", 0)):
            iou = {dom: [0.5] * 19 for dom in tw.TARGET_DOMAINS}
            for dom in tw.TARGET_DOMAINS:
                iou[dom][car] = 0.4 + shift / 100
                iou[dom][bus] = None                          # absent everywhere: left out
            iou["fog"][car] = None                            # absent in one domain: averaged
            runs[f"{method}/seed{seed}"] = {"method": method, "seed": seed, "class_iou": iou}
    diff = per_class_difference({"runs": runs}, "tqdm", "tqdm_learnable")
    assert "bus" not in diff and diff["car"]["mean"] == pytest.approx(20.0)
    assert diff["car"]["seeds"] == [0, 1, 2] and diff["road"]["mean"] == 0
    assert not diff["road"]["resolved"] and diff["car"]["low"] == pytest.approx(
        20 - 4.3027 * 10 / 3 ** 0.5, abs=1e-3)
    del runs["tqdm/seed0"]["class_iou"]
    with pytest.raises(ValueError, match="no per-class IoU"):
        per_class_difference({"runs": runs}, "tqdm", "tqdm_learnable")


def test_a_failed_run_is_named_and_the_sweep_goes_on(tmp_path, capsys, monkeypatch):
    real = toy_sweep._timed_run

    def flaky(method, *args):
        if method == "rein":
            raise FileNotFoundError("toy_vfm_invariant.safetensors is not in lessons/weights")
        return real(method, *args)

    monkeypatch.setattr(toy_sweep, "_timed_run", flaky)
    args = ["--methods", "rein", "frozen", "--seeds", "0", "--steps", "1", "--test-length", "1",
            "--out", str(tmp_path), "--checkpoint-seeds"]
    assert toy_sweep.main(args) == 1
    out = capsys.readouterr().out
    assert "rein/seed0: failed: FileNotFoundError" in out and "1 run(s) failed" in out
    assert set(load_results(tmp_path / RESULTS_FILE.name)["runs"]) == {"frozen/seed0"}


def test_world_2s_budget_is_what_its_committed_curves_chose():
    """The rule of reprod.toy.curves on the committed curves: six of the eight main methods
    converge by SWEEP_TRAIN_2's steps, so the budget is settled whatever the missing curve says
    (QueryDiff's diverged on a wrong CPU bf16 kernel and is owed in float32); CAT-Seg's bf16
    curve is withdrawn and its float32 curve stands in its place; the docs say each method's
    step of convergence as the curves have it."""
    from pathlib import Path

    from lessons.benchmark import SWEEP_TRAIN_2
    from reprod.toy import curves

    committed = json.loads(curves.CURVES_FILE.read_text())
    runs = committed["runs"]
    assert set(runs) <= set(curves.MAIN_METHODS)
    assert all(r["train_config"]["steps"] == curves.LONG for r in runs.values())
    assert runs["catseg"]["train_config"]["autocast"] is None     # the float32 curve
    assert set(committed["withdrawn"]) == {"catseg"}
    got = {m: r["val_curve"] for m, r in runs.items()}
    assert curves.budget_bounds(got) == (SWEEP_TRAIN_2["steps"],) * 2 == (1500, 1500)
    assert curves.choose_budget(got)["budget"] == 1500
    doc = " ".join((Path(__file__).resolve().parents[1] / "docs" / "toyworld.md")
                   .read_text().split())
    assert f"The curves chose {SWEEP_TRAIN_2['steps']:,} steps" in doc
    at = {m: curves.converged_at(c) for m, c in got.items()}
    assert (at["tqdm"], at["mfuser"], at["full"], at["catseg"], at["rein_m2f"], at["rein"],
            at["frozen"]) == (1000, 1000, 1100, 1300, 1400, 1500, 1600)
    assert ("1,000 (tqdm, MFuser), 1,100 (full fine-tuning), 1,300 (CAT-Seg), 1,400 (Rein + "
            "Mask2Former), 1,500 (Rein) and 1,600 (frozen)") in doc
    if "querydiff" not in runs:                          # until its float32 curve is committed
        assert sorted(set(curves.MAIN_METHODS) - set(runs)) == ["querydiff"]
        assert "QueryDiff has none yet" in doc


def test_budget_bounds_count_a_missing_curve_both_ways():
    from reprod.toy.curves import budget_bounds

    steps = [100, 200]
    fast, slow = ({"steps": steps, "miou": m} for m in ([0.5, 0.5], [0.1, 0.5]))
    grid = (100, 200)
    assert budget_bounds({"a": fast, "b": fast}, ("a", "b", "c"), grid, 0.6) == (100, 100)
    assert budget_bounds({"a": fast, "b": slow}, ("a", "b", "c"), grid, 0.6) == (100, 200)
    assert budget_bounds({"a": slow}, ("a", "b", "c"), grid, 1.0) == (200, None)


def test_a_claimed_run_is_left_to_the_live_process_that_claimed_it(tmp_path, capsys):
    """Two sweeps over overlapping methods (one per core) never train the same run: a run
    claimed by a live process is skipped; a claim whose process is gone is taken over."""
    import os
    import subprocess
    import sys

    results_file = tmp_path / RESULTS_FILE.name
    mine = toy_sweep.claim("frozen/seed0", results_file)
    assert mine == tmp_path / "toy_sweep.claims" / "frozen_seed0.pid"
    assert mine.read_text() == str(os.getpid())
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (mine.parent / "rein_seed0.pid").write_text(str(sleeper.pid))    # another live sweep
        args = ["--methods", "rein", "--seeds", "0", "--steps", "1", "--test-length", "1",
                "--out", str(tmp_path), "--checkpoint-seeds"]
        assert toy_sweep.main(args) == 0
        assert "rein/seed0: trained by another sweep process, skipped" in capsys.readouterr().out
        assert "rein/seed0" not in load_results(results_file)["runs"]
    finally:
        sleeper.kill()
        sleeper.wait()
    assert toy_sweep.main(args) == 0                  # its process is gone: the claim is taken
    assert "rein/seed0" in load_results(results_file)["runs"]
    assert not (mine.parent / "rein_seed0.pid").exists()                # released after the run
    toy_sweep.release(mine)
    assert not mine.exists()
