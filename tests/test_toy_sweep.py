"""Tests of reprod.toy.sweep (a tiny sweep end to end, resuming, the table) and of the committed
lesson checkpoints and results it made (they load, fit the code and re-measure as recorded)."""

from __future__ import annotations

import json
import math

import pytest

from lessons import toyworld as tw
from lessons.benchmark import (
    METHODS,
    RESULTS_FILE,
    load_results,
    markdown_table,
    paired_difference,
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
        for seed in spec.seeds or tw.toy_benchmark()["seeds"]:
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
    faster = 2 * 0.1 + 5 * 0.001 + 10 * (0.01 + 0.5) + 2 * 5 * 0.01 + test
    assert r["cached and batched"] == pytest.approx(faster)
    c["step bf16"] = c["forward bf16"] = None          # bf16 emulated: the fp32 figures stand
    assert project(c, steps=10, validations=2, val_scenes=5, test_scenes=3,
                   train_scenes=32)["cached and batched"] > faster


def test_the_sweep_bench_measures_a_method_and_names_a_bad_one(tmp_path, capsys):
    from reprod.toy import bench_sweep

    out = tmp_path / "b.json"
    assert bench_sweep.main(["--methods", "scratch", "--repeats", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "scratch |" in text and "x |" in text
    record = json.loads(out.read_text())
    assert record["pieces"][0]["step fp32"] > 0 and record["runs"]["scratch"]["today"] > 0
    with pytest.raises(SystemExit):
        bench_sweep.main(["--methods", "nope"])
    assert "unknown method 'nope'" in capsys.readouterr().err
