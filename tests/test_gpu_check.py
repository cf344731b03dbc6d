"""reprod.gpu_check on a CPU: the plan prints, and the runner keeps its report and its budget.

The GPU steps themselves run only where a GPU is lent; these tests keep the script from rotting
while none is."""

from __future__ import annotations

import json
import sys

import pytest

from reprod import gpu_check as gc


def test_dry_run_prints_every_step_with_its_time_and_needs(capsys):
    assert gc.main(["--dry-run", "--budget-min", "9"]) == 0
    text = capsys.readouterr().out
    assert "budget 9 min" in text
    for step in gc.STEPS:
        assert f"  {step.name} " in text, step.name
        assert step.needs in text
    assert "mfuser_eva_gtav" in text and "--precision bf16 --batch 2 --size 512" in text
    assert "beyond the budget" in text            # the plan is longer than nine minutes
    finishes = [finish for _, finish in gc.plan(9)]
    assert finishes == sorted(finishes)
    assert [s.name for s in gc.STEPS][:9] == ["detect", "wheels", "world2", "bf16", "curves",
                                              "invariant", "sweep2", "mamba_ssm", "pytest_gpu"]
    bf16 = next(s for s in gc.STEPS if s.name == "bf16").command
    assert "reprod.toy.bf16_check --device cuda" in bf16 and bf16.endswith("touch {out}/bf16_ok")
    for name in ("curves", "sweep2"):           # they train in bf16 on CUDA: only if it checks
        assert next(s for s in gc.STEPS if s.name == name).command.startswith(
            "test -f {out}/bf16_ok && ")
    curves = next(s for s in gc.STEPS if s.name == "curves")
    assert "reprod.toy.curves --jobs 8" in curves.command and curves.limit_s < 600
    assert "toy_curves_world2.json" in gc.COLLECT.values()
    assert gc.MAX_FILES == 8                                   # a lent machine's eight files
    for name in ("curves", "invariant", "sweep2"):             # each resumes what is committed
        step = next(s for s in gc.STEPS if s.name == name)
        assert step.limit_s < 600, name
    sweep2 = next(s for s in gc.STEPS if s.name == "sweep2").command
    assert "lessons/weights/checkpoints/world2/." in sweep2 and "--world 2.0 --jobs 8" in sweep2
    invariant = next(s for s in gc.STEPS if s.name == "invariant").command
    assert invariant.startswith("test -f lessons/weights/toy_vfm_invariant.safetensors ||")
    world2 = next(s for s in gc.STEPS if s.name == "world2")
    assert "reprod.toy.regenerate --untried --uncommitted --device cuda" in world2.command
    assert world2.limit_s < 600                     # one device command runs at most 10 minutes


def test_the_runner_reports_each_step_and_stops_at_the_budget(tmp_path, monkeypatch):
    py = sys.executable
    steps = (gc.Step("ok", f"{py} -c 'print(42)'", 1, "nothing"),
             gc.Step("broken", f"{py} -c 'raise SystemExit(3)'", 1, "nothing"),
             gc.Step("wheels", "true", 1, "--wheels", optional=True),
             gc.Step("slow", f"{py} -c 'import time; time.sleep(30)'", 10, "nothing",
                     limit_s=1),
             gc.Step("too_long", "true", 10_000, "nothing"))
    monkeypatch.setattr(gc, "STEPS", steps)
    code = gc.main(["--out", str(tmp_path), "--budget-min", "5"])
    assert code == 1                                # a step failed
    report = json.loads((tmp_path / "report.json").read_text())
    status = {s["name"]: s["status"] for s in report["steps"]}
    assert status == {"ok": "ok", "broken": "failed (exit 3)", "wheels": "skipped (not carried)",
                      "slow": "stopped at its 1 s limit", "too_long": "not run (time budget)"}
    assert "42" in report["steps"][0]["tail"]
    md = (tmp_path / "report.md").read_text()
    assert md.index("## ok") < md.index("## broken") < md.index("## too_long")


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gc.main(["--budget-min", "0"])
    assert "--budget-min must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gc.main(["--sdist", str(tmp_path / "none.tar.gz"), "--dry-run"])
    assert "does not exist" in capsys.readouterr().err


def test_collect_copies_what_must_come_home_into_one_flat_folder(tmp_path):
    out = tmp_path / "run"
    import tarfile

    (out / "world2" / "diffusion").mkdir(parents=True)
    for rel in ("report.json", "report.md", "world2/gates.json",
                "world2/toy_diffusion.safetensors", "world2/toy_diffusion.md",
                "world2/toy_diffusion.json", "world2/diffusion/diffusion_state.pt",
                "step_bf16.json"):
        (out / rel).write_text(rel)
    copied = gc.collect(out, tmp_path / "home")
    names = sorted(p.name for p in copied)
    assert names == ["report.json", "report.md", "toy_diffusion.tar",
                     "world2_gates.json"]     # no tries file written, no VLM trained, no state
    assert (tmp_path / "home" / "world2_gates.json").read_text() == "world2/gates.json"
    with tarfile.open(tmp_path / "home" / "toy_diffusion.tar") as tar:
        assert sorted(tar.getnames()) == ["toy_diffusion.json", "toy_diffusion.md",
                                          "toy_diffusion.safetensors"]


def test_skip_leaves_steps_out_of_the_report(tmp_path, monkeypatch):
    py = sys.executable
    steps = (gc.Step("a", f"{py} -c 'print(1)'", 1, "nothing"),
             gc.Step("b", f"{py} -c 'print(2)'", 1, "nothing"))
    monkeypatch.setattr(gc, "STEPS", steps)
    assert gc.main(["--out", str(tmp_path), "--skip", "a"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert [s["name"] for s in report["steps"]] == ["b"]


def test_collect_brings_the_sweep_first_and_never_more_than_eight_files(tmp_path, capsys):
    import tarfile

    out = tmp_path / "run"
    for rel in ("report.json", "report.md", "toy_curves_world2.json", "sweep2/toy_sweep.json",
                "sweep2/02_rein/rein_seed0.safetensors",
                "sweep2/07_mfuser/mfuser_seed0.safetensors",
                "invariant/toy_vfm_invariant.safetensors", "invariant/toy_vfm_invariant.json",
                *(f"world2/{m}.safetensors" for m in gc.COLLECT_MODELS),
                "world2/gates.json", "world2/toyworld2_gates.json"):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(rel)
    copied = gc.collect(out, tmp_path / "home")
    assert [p.name for p in copied] == [
        "report.json", "report.md", "toy_curves_world2.json", "toy_sweep_world2.json",
        "sweep2_checkpoints.tar", "toy_vfm_invariant.tar", "toy_vfm.tar", "toy_vlm.tar"]
    left = capsys.readouterr().out
    assert "toy_diffusion.tar" in left and "world2_gates.json" in left
    with tarfile.open(tmp_path / "home" / "sweep2_checkpoints.tar") as tar:
        assert sorted(tar.getnames()) == ["02_rein/rein_seed0.safetensors",
                                          "07_mfuser/mfuser_seed0.safetensors"]
    with tarfile.open(tmp_path / "home" / "toy_vfm_invariant.tar") as tar:
        assert sorted(tar.getnames()) == ["toy_vfm_invariant.json",
                                          "toy_vfm_invariant.safetensors"]
