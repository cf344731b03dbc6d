"""reprod.bench on CPU at toy size: the step and fusion benchmarks run and report sane figures
(their real-scale numbers are GPU measurements recorded in docs/measured.md)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from lessons.classes import NUM_CLASSES
from reprod import bench
from reprod.bench import main, synthetic_batch
from reprod.toy import resumable


def test_synthetic_batch_has_classes_and_ignore():
    images, labels = synthetic_batch(2, 96, torch.device("cpu"))
    assert images.shape == (2, 3, 96, 96) and images.min() >= 0 and images.max() <= 1
    assert labels.shape == (2, 96, 96) and (labels[:, :8] == 255).all()
    assert len(labels[labels != 255].unique()) > 3 and labels[labels != 255].max() < NUM_CLASSES


def test_step_benchmark_reports_time_memory_and_flops(tmp_path, capsys):
    out = tmp_path / "step.json"
    assert main(["step", "toy_rein", "--steps", "2", "--warmup", "1", "--batch", "2",
                 "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["config"] == "toy_rein" and row["batch"] == 2 and row["crop"] == 64
    assert row["trainable"] == 771_989 and row["step_s"] > 0 and row["peak_memory_gb"] > 0
    assert row["gflops_per_step"] > 0.1 and 0 < row["tflops_per_s"] < 10
    assert row["schedule_hours"] == row["schedule_steps"] * row["step_s"] / 3600
    assert "| toy_rein |" in capsys.readouterr().out


def test_fusion_benchmark_compares_mvfuser_and_attention(tmp_path):
    out = tmp_path / "fusion.json"
    assert main(["fusion", "--lengths", "64", "128", "--dim", "32", "--heads", "2",
                 "--repeats", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["length"] for r in rows] == [64, 128]
    assert all(r["mvfuser_ms"] > 0 and r["attention_ms"] > 0 for r in rows)
    assert rows[0]["attention_over_mvfuser"] == rows[0]["attention_ms"] / rows[0]["mvfuser_ms"]


def test_unknown_config_is_a_clear_error(capsys):
    assert main(["step", "no_such_config"]) == 2
    assert "no config 'no_such_config'" in capsys.readouterr().err


def test_bf16_where_it_is_emulated_is_said(monkeypatch):
    monkeypatch.setattr(resumable, "bf16_autocast_pays", lambda device: False)
    with pytest.warns(UserWarning, match="bf16 is emulated"):
        bench.warn_if_emulated(torch.device("cpu"), "bf16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bench.warn_if_emulated(torch.device("cpu"), "fp32")     # fp32: nothing to say
    monkeypatch.setattr(resumable, "bf16_autocast_pays", lambda device: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bench.warn_if_emulated(torch.device("cpu"), "bf16")     # native: nothing to say
