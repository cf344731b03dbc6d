"""The toy VFM's self-supervised pretraining: data pairs, losses, EMA, exact resumption."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lessons import toyworld as tw
from reprod.pretrain_toy import DINOHead, VFMConfig, VFMRun, make_batch, render_pair

TINY = dict(steps=4, batch_size=2, warmup_steps=1, prototypes=64)


def test_pairs_share_geometry_and_differ_in_style():
    cfg = VFMConfig(p_same_style=0.0)
    a, b = render_pair([0, 1, 2, 3], cfg)
    assert a.shape == b.shape == (3, *tw.DEFAULT_SIZE)
    assert np.abs(a - b).mean() > 0.01                    # two styles
    same = VFMConfig(p_same_style=1.0)
    a2, b2 = render_pair([0, 1, 2, 3], same)
    assert np.abs(a2 - b2).mean() < np.abs(a - b).mean()  # one style, only noise crops differ


def test_batches_are_deterministic_per_step_and_views_aligned():
    cfg = VFMConfig(batch_size=3)
    a1, b1 = make_batch(5, cfg)
    a2, b2 = make_batch(5, cfg)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    a3, _ = make_batch(6, cfg)
    assert not torch.equal(a1, a3)
    assert a1.shape == (3, 3, *tw.DEFAULT_SIZE) and a1.min() >= 0 and a1.max() <= 1


def test_dino_head_shapes():
    head = DINOHead(192, 64)
    assert head(torch.randn(5, 192)).shape == (5, 64)
    assert head(torch.randn(2, 7, 192)).shape == (2, 7, 64)


def test_a_few_steps_train_the_student_and_move_the_teacher(tmp_path):
    run = VFMRun(VFMConfig(**TINY), tmp_path)
    before_s = [p.clone() for p in run.student.parameters()]
    before_t = [p.clone() for p in run.teacher.parameters()]
    run.train_chunk(minutes=5, log_every=1)
    assert run.step == 4 and len(run.log) == 4
    assert all(np.isfinite(r["loss"]) for r in run.log)
    assert any(not torch.equal(a, b) for a, b in zip(before_s, run.student.parameters(),
                                                     strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(before_t, run.teacher.parameters(),
                                                     strict=True))
    assert all(not p.requires_grad for p in run.teacher.parameters())
    assert (tmp_path / "vfm_state.pt").exists()


def test_resuming_gives_the_same_weights_as_an_unbroken_run(tmp_path):
    straight = VFMRun(VFMConfig(**TINY), tmp_path / "a")
    straight.train_chunk(minutes=5)
    first = VFMRun(VFMConfig(**TINY), tmp_path / "b")
    first.train_chunk(minutes=5, stop_at=2)  # stop half way, as a time limit would ...
    resumed = VFMRun(VFMConfig(**TINY), tmp_path / "b")
    assert resumed.load() and resumed.step == 2
    resumed.train_chunk(minutes=5)           # ... and a later chunk finishes it
    for p, q in zip(straight.teacher.parameters(), resumed.teacher.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_resuming_with_another_config_is_refused(tmp_path):
    run = VFMRun(VFMConfig(**TINY), tmp_path)
    run.save()
    other = VFMRun(VFMConfig(**{**TINY, "p_same_style": 0.9}), tmp_path)
    with pytest.raises(ValueError, match="another config"):
        other.load()


def test_export_loads_through_the_toy_vfm_bundle(tmp_path):
    from lessons.backbones import build_encoder

    run = VFMRun(VFMConfig(**TINY), tmp_path)
    path = run.export(tmp_path / "toy_vfm.safetensors")
    enc = build_encoder("toy_vfm", weights=path)
    ref = run.teacher.encoder.vit.state_dict()
    for k, v in enc.vit.state_dict().items():
        torch.testing.assert_close(v, ref[k].half().float(), rtol=0, atol=0)


@pytest.mark.parametrize("objective", ["dino_ibot", "dino_ibot_nce"])
def test_the_dino_ibot_objectives_run(tmp_path, objective):
    run = VFMRun(VFMConfig(**TINY, objective=objective), tmp_path)
    run.train_chunk(minutes=5, log_every=1)
    last = run.log[-1]
    assert np.isfinite(last["dino"]) and np.isfinite(last["ibot"])
    assert 0 < last["entropy"] <= np.log(TINY["prototypes"]) + 1e-4
    assert (objective == "dino_ibot_nce") == (last["nce"] > 0)


def test_unknown_objective(tmp_path):
    run = VFMRun(VFMConfig(**TINY, objective="mae"), tmp_path)
    with pytest.raises(ValueError, match="unknown objective 'mae'"):
        run.train_chunk(minutes=1)


def test_dense_nce_prefers_the_matching_scene():
    from reprod.pretrain_toy import dense_nce

    z = torch.nn.functional.normalize(torch.randn(4, 6, 8), dim=-1)
    assert dense_nce(z, z, 0.1) < dense_nce(z, z.roll(1, dims=0), 0.1)
