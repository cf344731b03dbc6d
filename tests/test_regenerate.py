"""``reprod.toy.regenerate``: one command pretrains, exports, gates and records each toy model."""

from __future__ import annotations

import json

import pytest
import torch

from reprod.toy import gates, pretrain, regenerate


def test_dry_run_prints_each_models_four_commands(capsys):
    assert regenerate.main(["vfm", "vlm", "--out", "o", "--describe", "d", "--vfm-steps", "7200",
                            "--device", "cuda", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 8
    assert lines[0].startswith("python -m reprod.toy.pretrain vfm --run-dir o/vfm --steps 7200")
    assert "--until-done" in lines[0] and "--export --out o/toy_vfm.safetensors" in lines[1]
    assert lines[2] == "python -m reprod.toy.gates --gates G1 G2 --weights o --out o/gates.json"
    assert lines[3].endswith("--card --out o/toy_vfm.safetensors"), lines[3]
    assert "--export" not in lines[3]          # the card describes the file the gates measured
    assert "--steps" not in lines[4]
    assert lines[6] == "python -m reprod.toy.gates --gates G4 --weights o --out o/gates.json"


def test_a_smoke_plan_takes_two_steps_and_small_gates(capsys):
    regenerate.main(["vfm", "--out", "o", "--describe", "d", "--smoke", "--workers", "1",
                     "--vfm-steps", "7200", "--dry-run"])
    pre, export, gate = capsys.readouterr().out.splitlines()
    assert "--steps 2 " in pre and "--workers 1" in pre and "--steps 2 " in export
    assert gate.endswith("--small")


@pytest.mark.parametrize("argv, message", [
    (["vfm", "--out", "o", "--describe", "d", "--vfm-steps", "0"], "--vfm-steps must be positive"),
    (["vfm", "--out", "o", "--describe", "  "], "--describe must say"),
])
def test_bad_arguments_are_one_line(capsys, argv, message):
    with pytest.raises(SystemExit):
        regenerate.main(argv)
    assert message in capsys.readouterr().err


def test_regenerate_records_the_models_next_try_with_only_its_own_gates(tmp_path, monkeypatch):
    tries = tmp_path / "tries.json"
    tries.write_text(json.dumps({"tries": [{"name": "vfm-1"}, {"name": "vlm-1"}]}))
    monkeypatch.setattr(gates, "TRIES_FILE", tries)
    out = tmp_path / "out"
    out.mkdir()
    calls = []

    def fake_pretrain(argv):
        calls.append(("pretrain", argv))
        (out / "vlm").mkdir(exist_ok=True)
        torch.save({"cfg": {"steps": 3}, "step": 3, "seconds": 60.0, "log": [],
                    "trained_on": "a CPU, fp32"}, out / "vlm" / "vlm_state.pt")
        return 0

    def fake_gates(argv):
        calls.append(("gates", argv))
        (out / "gates.json").write_text(json.dumps({
            "toyworld_version": "2.0", "small": False,
            "results": {"vlm": {"x": 1}, "probes": {"y": 2}},
            "gates": {"G4": {"passed": False}, "G1": {"passed": True}},
            "seconds": {"G4": 5.0, "G1+G2": 9.0},
            "weights": {"toy_vlm.safetensors": "ab", "toy_vfm.safetensors": "cd"}}))
        return 0

    monkeypatch.setattr(pretrain, "main", fake_pretrain)
    monkeypatch.setattr(gates, "main", fake_gates)
    entry = regenerate.regenerate("vlm", out, "the first world-2 VLM")
    assert [c[0] for c in calls] == ["pretrain", "pretrain", "gates", "pretrain"]
    assert calls[-1][1][-3:] == ["--card", "--out", str(out / "toy_vlm.safetensors")]
    assert entry["name"] == "vlm-2"
    assert entry["gates"] == {"G4": {"passed": False}} and set(entry["results"]) == {"vlm"}
    assert entry["weights"] == {"toy_vlm.safetensors": "ab"} and entry["seconds"] == {"G4": 5.0}
    assert entry["pretraining"]["hardware"] == "a CPU, fp32"
    recorded = json.loads(tries.read_text())["tries"]
    assert [t["name"] for t in recorded] == ["vfm-1", "vlm-1", "vlm-2"]
    assert json.loads((out / tries.name).read_text()) == json.loads(tries.read_text())


def test_a_failed_step_stops_the_model(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain, "main", lambda argv: 1)
    with pytest.raises(SystemExit, match="vfm's pretrain step failed"):
        regenerate.regenerate("vfm", tmp_path, "d")


def test_try_names_count_each_models_tries(tmp_path):
    tries = tmp_path / "t.json"
    assert gates.next_try_name("diffusion", tries) == "teacher-1"
    tries.write_text(json.dumps({"tries": [{"name": "vfm-1"}, {"name": "vfm-2"},
                                           {"name": "teacher-1"}]}))
    assert gates.next_try_name("vfm", tries) == "vfm-3"
    assert gates.next_try_name("diffusion", tries) == "teacher-2"
    assert gates.last_try("vfm", tries) == {"name": "vfm-2"}
    assert gates.last_try("vlm", tries) is None


def test_untried_names_the_models_without_a_recorded_try(tmp_path, monkeypatch, capsys):
    tries = tmp_path / "t.json"
    assert regenerate.untried(tries) == ["vfm", "vlm", "diffusion"]
    tries.write_text(json.dumps({"tries": [{"name": "vfm-1"}, {"name": "vlm-1"}]}))
    assert regenerate.untried(tries) == ["diffusion"]
    monkeypatch.setattr(gates, "TRIES_FILE", tries)
    assert regenerate.main(["--untried", "--dry-run", "--out", str(tmp_path), "--describe",
                            "d"]) == 0
    plan = capsys.readouterr().out
    assert "pretrain diffusion" in plan and "pretrain vlm" not in plan
    tries.write_text(json.dumps({"tries": [{"name": "vfm-1"}, {"name": "vlm-1"},
                                           {"name": "teacher-1"}]}))
    assert regenerate.main(["--untried", "--out", str(tmp_path), "--describe", "d"]) == 0
    assert "nothing to run" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        regenerate.main(["--out", str(tmp_path), "--describe", "d"])
    assert "or --untried" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        regenerate.main(["vfn", "--out", str(tmp_path), "--describe", "d"])
    assert "unknown model 'vfn'" in capsys.readouterr().err


def test_uncommitted_names_the_models_lessons_weights_lacks(tmp_path, monkeypatch, capsys):
    assert regenerate.uncommitted(tmp_path) == ["vfm", "vlm", "diffusion"]
    (tmp_path / "toy_vlm.safetensors").write_bytes(b"x")
    (tmp_path / "toy_diffusion.safetensors").write_bytes(b"x")
    assert regenerate.uncommitted(tmp_path) == ["vfm"]
    monkeypatch.setattr(regenerate, "uncommitted", lambda: ["vfm"])
    monkeypatch.setattr(regenerate, "untried", lambda: [])        # every model has a try
    assert regenerate.main(["--untried", "--uncommitted", "--dry-run", "--out", "o",
                            "--describe", "d"]) == 0
    assert "pretrain vfm" in capsys.readouterr().out
    monkeypatch.setattr(regenerate, "uncommitted", lambda: [])
    assert regenerate.main(["--uncommitted", "--out", "o", "--describe", "d"]) == 0
    assert "every toy model is in lessons/weights; nothing to run" in capsys.readouterr().out
