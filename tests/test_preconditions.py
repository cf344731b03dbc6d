"""Notebook 02's forgetting curve (reprod.toy.preconditions): a tiny run end to end, resuming."""

from __future__ import annotations

import json

import pytest

from lessons import toyworld as tw
from lessons.benchmark import load_forgetting
from reprod.toy import preconditions as pre


def test_a_tiny_forgetting_curve_reads_the_targets_every_few_steps_and_resumes(
        tmp_path, capsys, monkeypatch):
    out = tmp_path / "forgetting.json"
    args = ["forgetting", "--seeds", "0", "--steps", "3", "--every", "2", "--out", str(out)]
    monkeypatch.setattr(pre, "TEST_LENGTH", 2)
    assert pre.main(args) == 0
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"full/lr_x1/seed0", "full/lr_x0.1/seed0", "frozen/lr_x1/seed0"}
    rec = runs["full/lr_x0.1/seed0"]
    assert rec["curve"]["steps"] == [2, 3] and rec["toyworld_version"] == "2.0"
    assert rec["test_length"] == 2
    assert all(len(rec["curve"][d]) == 2 and all(0 <= v <= 1 for v in rec["curve"][d])
               for d in pre.TARGETS)
    assert tw.current_world() == tw.COURSE_WORLD
    curves = load_forgetting(out)                  # what notebook 02 reads: by (method, rate), seed
    assert list(curves) == [("frozen", 1.0), ("full", 0.1), ("full", 1.0)]
    assert curves["full", 0.1][0] == rec["curve"]
    assert load_forgetting(tmp_path / "none.json") == {}
    capsys.readouterr()
    assert pre.main(args) == 0
    assert capsys.readouterr().out.count("done, skipped") == 3
    with pytest.raises(ValueError, match="compares full and frozen"):
        pre.forgetting_run("rein", 0)


def test_the_plan_is_full_at_two_encoder_rates_beside_frozen():
    assert pre.plan((0,)) == [("full", 1.0, 0), ("full", 0.1, 0), ("frozen", 1.0, 0)]
    assert pre.results_file().parent.name == "world2"
    committed = load_forgetting()                  # notebook 02's: all three lines at seeds 0-2
    assert {key: list(by_seed) for key, by_seed in committed.items()} == {
        ("frozen", 1.0): [0, 1, 2], ("full", 0.1): [0, 1, 2], ("full", 1.0): [0, 1, 2]}
