"""lessons.checkpoints' builder registry: a lesson checkpoint's header can choose among the
registered builders with checked JSON arguments, and do nothing else."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lessons import checkpoints as ck
from lessons.toyworld import TOYWORLD_VERSION

COMMITTED = sorted(ck.CHECKPOINT_DIR.glob("*/*.safetensors"))


def _hostile(path: Path, builder: str, kwargs: dict) -> Path:
    header = {"builder": builder, "builder_kwargs": kwargs, "toyworld_version": TOYWORLD_VERSION,
              "lessons_digest": "0" * 16, "method": "rein", "seed": 0}
    save_file({"w": torch.zeros(1)}, str(path), metadata={k: json.dumps(v)
                                                          for k, v in header.items()})
    return path


def test_a_header_cannot_call_any_lessons_function(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    bad = _hostile(tmp_path / "bad.safetensors", "lessons.checkpoints:save_file",
                   {"tensors": {}, "filename": str(victim)})
    with pytest.raises(ValueError, match="not a registered lesson builder"):
        ck.load_lesson_checkpoint(bad)
    assert victim.read_text() == "precious"
    for name in ("lessons.segmentor:torch", "os:system", "lessons.checkpoints:build_model",
                 "lessons.utils:seed_everything"):           # imported names count neither
        with pytest.raises(ValueError, match="not a registered lesson builder"):
            ck.build_model(name, {})


@pytest.mark.parametrize("kwargs, error", [
    ({"method": "rein", "nope": 1}, r"\['nope'\] are not arguments"),
    ({}, r"lack \['method'\]"),
    ({"method": 3}, r"builder_kwargs.method = 3 should be str"),
    ({"method": "rein", "pretrained": "yes"}, "should be bool"),
    ({"method": "rein", "head_dim": True}, "should be int"),
    ({"method": "rein", "lora_rank": 1.5}, "should be int | None"),
    (["rein"], "must be a JSON object"),
])
def test_builder_kwargs_are_checked_against_the_signature(kwargs, error):
    with pytest.raises(ValueError, match=error):
        ck.check_builder_kwargs("lessons.segmentor:build_toy_segmentor", kwargs)


def test_arguments_a_header_may_not_set():
    with pytest.raises(ValueError, match="teacher_weights .* cannot come from a checkpoint"):
        ck.check_builder_kwargs("lessons.querydiff:build_toy_querydiff",
                                {"teacher_weights": "/etc/passwd"})
    assert ck.check_builder_kwargs("lessons.querydiff:build_toy_querydiff",   # no file: fine
                                   {"teacher_weights": None})
    with pytest.raises(ValueError, match=r"\['hidden'\] are not arguments"):   # **overrides
        ck.check_builder_kwargs("lessons.catseg:build_toy_catseg", {"hidden": 8})
    assert ck.check_builder_kwargs("lessons.catseg:build_toy_catseg", {"num_layers": 0})
    with pytest.raises(ValueError, match="should be tuple"):
        ck.check_builder_kwargs("lessons.baselines:TinySegNet", {"widths": [8, "x"]})
    assert ck.check_builder_kwargs("lessons.baselines:TinySegNet", {"widths": [8, 16]})


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_committed_checkpoint_headers_stay_valid(path):
    meta = ck.read_metadata(path)
    assert meta["builder"] in ck.BUILDERS
    ck.check_builder_kwargs(meta["builder"], meta["builder_kwargs"])


def test_a_committed_checkpoint_still_loads_in_its_own_world():
    from lessons import toyworld as tw

    path = ck.CHECKPOINT_DIR / "02_rein/frozen_seed0.safetensors"
    with tw.in_world("2.0"):                     # whatever the default, it loads in its world
        model, meta = ck.load_lesson_checkpoint(path)
        assert tw.current_world() == "2.0"          # and the default is left as it was
    assert meta["builder"] == "lessons.segmentor:build_toy_segmentor" and not model.training
    assert meta["toyworld_version"] == "1.0"


def test_the_toy_sweep_builds_through_the_registry():
    from lessons.benchmark import METHODS

    for name, spec in METHODS.items():
        assert spec.builder in ck.BUILDERS, name
        ck.check_builder_kwargs(spec.builder, spec.builder_kwargs)
