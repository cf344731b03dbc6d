"""Tests of lessons.segmentor (frozen / full / Rein on one head), the optimiser groups it gives
lessons.train, and lessons.checkpoints (lesson checkpoints: fp16 round trip, header checks)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lessons import checkpoints
from lessons.checkpoints import (
    build_model,
    load_lesson_checkpoint,
    read_metadata,
    save_lesson_checkpoint,
)
from lessons.segmentor import LevelHead, Segmentor, build_toy_segmentor
from lessons.toyworld import current_world
from lessons.train import TrainConfig, make_optimizer
from lessons.utils import count_parameters

BUILDER = "lessons.segmentor:build_toy_segmentor"


def _toy(method: str, **kw) -> Segmentor:
    torch.manual_seed(0)
    return build_toy_segmentor(method, pretrained=False, **kw)


def test_level_head_shapes_and_level_count():
    head = LevelHead(32, num_levels=3, hidden=16, num_classes=19)
    maps = [torch.randn(2, 32, 8, 16), torch.randn(2, 32, 8, 16), torch.randn(2, 32, 4, 8)]
    assert head(maps).shape == (2, 19, 8, 16)
    with pytest.raises(ValueError, match="expected 3 levels"):
        head(maps[:2])
    with pytest.raises(ValueError, match="num_levels"):
        LevelHead(32)


@pytest.mark.parametrize("method", ["frozen", "full", "rein"])
def test_the_three_ways_build_train_and_predict(method):
    model = _toy(method)
    out = model(torch.rand(2, 3, 64, 128))
    assert out.shape == (2, 19, 8, 16)
    enc_trainable = any(p.requires_grad for p in model.encoder.parameters())
    assert enc_trainable == (method == "full")
    model.train()
    assert model.encoder.training == (method == "full")     # frozen stays in eval mode
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.head.parameters())
    if method == "rein":
        assert all(p.grad is not None for p in model.reins.parameters())
    assert count_parameters(model) > 0


def test_reins_and_full_fine_tuning_are_exclusive():
    model = _toy("rein")
    with pytest.raises(ValueError, match="not both"):
        Segmentor(model.encoder, model.head, reins=model.reins, finetune_encoder=True)


def test_param_groups_follow_reins_no_decay_names_and_the_backbone_lr_mult():
    rein = _toy("rein")
    groups = rein.param_groups(0.05)
    by_name = {id(p): g for g in groups for p in g["params"]}
    named = dict(rein.named_parameters())
    for name in ("reins.learnable_tokens_a", "reins.scale", "head.fuse.1.weight"):
        assert by_name[id(named[name])]["weight_decay"] == 0.0, name
    assert by_name[id(named["reins.mlp_delta_f.weight"])]["weight_decay"] == 0.05
    full = _toy("full", backbone_lr_mult=0.1)
    cfg = TrainConfig(lr=1e-3, weight_decay=0.05)
    opt = make_optimizer(full, cfg)
    enc_ids = {id(p) for p in full.encoder.parameters()}
    for g in opt.param_groups:
        want = 1e-4 if id(g["params"][0]) in enc_ids else 1e-3
        assert g["lr"] == pytest.approx(want)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(
        [p for p in full.parameters() if p.requires_grad])


def test_trainable_state_dict_stores_what_trains_once():
    frozen, full = _toy("frozen"), _toy("full")
    assert not any(k.startswith("encoder.") for k in frozen.trainable_state_dict())
    sd = full.trainable_state_dict()
    ptrs = [v.data_ptr() for v in sd.values() if v.numel()]
    assert len(ptrs) == len(set(ptrs))                    # timm's model is reachable twice
    n = sum(v.numel() for k, v in sd.items() if v.is_floating_point() and "running" not in k)
    assert n == count_parameters(full)


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="unknown method 'adapter'"):
        build_toy_segmentor("adapter", pretrained=False)


# --- lesson checkpoints ------------------------------------------------------------------------
def _meta(**kw) -> dict:
    return {"builder": BUILDER, "builder_kwargs": {"method": "rein", "pretrained": False},
            "toyworld_version": current_world(), "lessons_digest": "0" * 16,
            "method": "rein", "seed": 0, **kw}


def test_checkpoint_round_trip_in_fp16(tmp_path):
    model = _toy("rein")
    with torch.no_grad():
        model.reins.scale.fill_(0.5)
    path = save_lesson_checkpoint(tmp_path / "rein.safetensors", model.trainable_state_dict(),
                                  _meta(val_miou=0.25, train_config={"steps": 3}))
    meta = read_metadata(path)
    assert meta["toyworld_version"] == current_world() and meta["val_miou"] == 0.25
    assert meta["train_config"] == {"steps": 3} and meta["seed"] == 0
    torch.manual_seed(0)                  # the same random encoder (pretrained=False) as `model`
    loaded, _ = load_lesson_checkpoint(path)
    assert not loaded.training
    model.eval()
    images = torch.rand(2, 3, 64, 128)
    torch.testing.assert_close(loaded(images), model(images), atol=2e-2, rtol=2e-2)
    assert loaded.reins.scale.dtype == torch.float32 and loaded.reins.scale.item() == 0.5


def test_checkpoint_header_problems_are_named(tmp_path):
    model = _toy("frozen")
    sd = model.trainable_state_dict()
    with pytest.raises(ValueError, match="lacks"):
        save_lesson_checkpoint(tmp_path / "x.safetensors", sd, {"method": "frozen"})
    old = save_lesson_checkpoint(tmp_path / "old.safetensors", sd,
                                 _meta(toyworld_version="0.9"))
    with pytest.raises(ValueError, match="ToyWorld '0.9', which this code does not know"):
        load_lesson_checkpoint(old)
    with pytest.raises(FileNotFoundError, match="reprod.toy.sweep"):
        load_lesson_checkpoint(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        read_metadata(tmp_path / "junk.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(1)}, str(plain), metadata={"method": json.dumps("rein")})
    with pytest.raises(ValueError, match="not a lesson checkpoint"):
        load_lesson_checkpoint(plain)


def test_checkpoint_must_fit_the_model(tmp_path):
    sd = _toy("rein").trainable_state_dict()
    wrong = save_lesson_checkpoint(tmp_path / "frozen_as_rein.safetensors",
                                   _toy("frozen").trainable_state_dict(), _meta())
    with pytest.raises(ValueError, match="lacks trained tensors"):
        load_lesson_checkpoint(wrong)                     # Rein's tokens are not in it
    sd["reins.learnable_tokens_a"] = torch.zeros(6, 3, 8)
    bad = save_lesson_checkpoint(tmp_path / "bad.safetensors", sd, _meta())
    with pytest.raises(ValueError, match="does not fit"):
        load_lesson_checkpoint(bad)
    sd = _toy("rein").trainable_state_dict()
    sd["extra.weight"] = torch.zeros(2)
    extra = save_lesson_checkpoint(tmp_path / "extra.safetensors", sd, _meta())
    with pytest.raises(ValueError, match="does not"):
        load_lesson_checkpoint(extra)


def test_builders_are_limited_to_lessons_code():
    with pytest.raises(ValueError, match="lessons.<module>:<function>"):
        build_model("os:system", {"command": "true"})
    assert checkpoints.CHECKPOINT_DIR.name == "checkpoints"
