"""The toy VFM's self-supervised pretraining: data pairs, losses, EMA, exact resumption."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lessons import toyworld as tw
from reprod.toy import pretrain, resumable
from reprod.toy.pretrain import (
    DINOHead,
    VFMConfig,
    VFMRun,
    at_corresponding,
    correspondence,
    make_batch,
    render_pair,
    sinkhorn_knopp,
)

pytestmark = pytest.mark.usefixtures("in_world_2")   # the toy models are made in world 2

TINY = dict(steps=4, batch_size=2, warmup_steps=1, prototypes=64, cls_prototypes=16)


def test_pairs_share_geometry_and_differ_in_style():
    cfg = VFMConfig(p_same_style=0.0)
    a, b = render_pair([0, 1, 2, 3], cfg)
    assert a.shape == b.shape == (3, *tw.DEFAULT_SIZE)
    assert np.abs(a - b).mean() > 0.01                    # two styles
    same = VFMConfig(p_same_style=1.0)
    a2, b2 = render_pair([0, 1, 2, 3], same)
    assert np.abs(a2 - b2).mean() < np.abs(a - b).mean()  # one style, only noise crops differ


def test_batches_are_deterministic_per_step():
    cfg = VFMConfig(batch_size=3)
    a1, b1, box_a1, box_b1 = make_batch(5, cfg)
    a2, b2, box_a2, _ = make_batch(5, cfg)
    assert torch.equal(a1, a2) and torch.equal(b1, b2) and torch.equal(box_a1, box_a2)
    a3, *_ = make_batch(6, cfg)
    assert not torch.equal(a1, a3)
    assert a1.shape == (3, 3, *tw.DEFAULT_SIZE) and a1.min() >= 0 and a1.max() <= 1
    assert box_a1.shape == (3, 5) and not torch.equal(box_a1, box_b1)   # two crops


def test_correspondence_finds_the_same_scene_point_in_the_other_crop():
    """With one style for both views and no colour jitter, the other view sampled at the
    corresponding patch centres reproduces this view's patch colours; a shuffled pairing does
    not."""
    cfg = VFMConfig(batch_size=8, p_same_style=1.0, jitter=False)
    a, b, box_a, box_b = make_batch(3, cfg)
    pa = torch.nn.functional.avg_pool2d(a, 8).flatten(2).transpose(1, 2)     # (B, P, 3)
    pb = torch.nn.functional.avg_pool2d(b, 8).flatten(2).transpose(1, 2)
    grid, valid = correspondence(box_a, box_b, 8, 16)
    assert grid.shape == (8, 8, 16, 2) and valid.shape == (8, 128)
    assert 0.3 <= valid.float().mean() <= 1.0
    err = (at_corresponding(pb, grid) - pa).abs().mean(-1)[valid].mean()
    shuffled = (pb.roll(1, 0) - pa).abs().mean()
    assert err < 0.05 < shuffled


def test_correspondence_of_a_flipped_identical_crop_mirrors_columns():
    box = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0]])
    flipped = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0]])
    grid, valid = correspondence(box, flipped, 2, 4)
    assert valid.all()
    x = grid[0, 0, :, 0]
    torch.testing.assert_close(x, -x.flip(0))                 # column j -> column w - 1 - j
    assert x[0] > 0                                           # the left edge is now on the right


def test_sinkhorn_knopp_balances_the_prototypes():
    logits = torch.randn(512, 8) + torch.tensor([3.0, 0, 0, 0, 0, 0, 0, 0])   # one favourite
    q = sinkhorn_knopp(logits, temp=0.5, iters=10)
    torch.testing.assert_close(q.sum(-1), torch.ones(512))
    torch.testing.assert_close(q.mean(0), torch.full((8,), 1 / 8), atol=2e-3, rtol=0)
    plain = torch.softmax(logits / 0.5, -1).mean(0)
    assert plain[0] > 0.6                                      # without it: one favourite


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


@pytest.mark.parametrize(("objective", "centering"),
                         [("dino_ibot", "ema"), ("dino_ibot_nce", "sinkhorn"), ("nce", "sinkhorn"),
                          ("vicreg", "sinkhorn")])
def test_every_objective_runs(tmp_path, objective, centering):
    run = VFMRun(VFMConfig(**TINY, objective=objective, centering=centering), tmp_path)
    run.train_chunk(minutes=5, log_every=1)
    last = run.log[-1]
    assert np.isfinite(last["loss"])
    if "dino" in objective:
        assert np.isfinite(last["dino"]) and np.isfinite(last["ibot"])
        assert 0 < last["entropy"] <= np.log(TINY["prototypes"]) + 1e-4
        assert 1 <= last["used"] <= TINY["prototypes"] + 1e-3
    assert ("nce" in objective) == ("nce" in last)
    assert (objective == "vicreg") == ("inv" in last)


def test_unknown_objective(tmp_path):
    run = VFMRun(VFMConfig(**TINY, objective="mae"), tmp_path)
    with pytest.raises(ValueError, match="unknown objective 'mae'"):
        run.train_chunk(minutes=1)


def test_dense_nce_prefers_the_matching_scene_point():
    from reprod.toy.pretrain import dense_nce

    torch.manual_seed(0)
    box = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0]]).repeat(4, 1)
    grid, valid = correspondence(box, box, 2, 3)                   # identical crops
    z = torch.nn.functional.normalize(torch.randn(4, 6, 8), dim=-1)
    assert dense_nce(z, z, grid, valid, 0.1) < dense_nce(z, z.roll(1, dims=0), grid, valid, 0.1)
    nothing = torch.zeros_like(valid)
    assert dense_nce(z, z, grid, nothing, 0.1) == 0                # no valid patch, no loss


def test_vicreg_terms_punish_collapse_and_redundancy():
    from reprod.toy.pretrain import vicreg_terms

    torch.manual_seed(0)
    spread = 1.5 * torch.randn(4, 64, 8)
    var, cov = vicreg_terms(spread)
    assert var < 0.05 and cov < 0.5
    var, _ = vicreg_terms(torch.ones(4, 64, 8) + 1e-3 * torch.randn(4, 64, 8))
    assert var > 0.95                                      # collapsed: std ~0 in every dim
    twin = spread.clone()
    twin[..., 1] = twin[..., 0]                            # two identical dimensions
    assert vicreg_terms(twin)[1] > cov + 0.5


def test_dense_vicreg_invariance_is_zero_for_matching_embeddings():
    from reprod.toy.pretrain import dense_vicreg

    box = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0]]).repeat(2, 1)
    grid, valid = correspondence(box, box, 4, 8)
    z = torch.randn(2, 32, 16)
    _, parts = dense_vicreg(z, z.clone(), grid, grid, valid, valid, (25.0, 25.0, 1.0))
    assert parts["inv"] < 1e-10
    _, shuffled = dense_vicreg(z, z.roll(1, 0), grid, grid, valid, valid, (25.0, 25.0, 1.0))
    assert shuffled["inv"] > 1.0


@pytest.mark.parametrize("native", [True, False])
def test_bf16_autocast_only_where_it_is_native(tmp_path, monkeypatch, native):
    """An AVX2-only CPU emulates bfloat16 (27x slower): there the run trains in fp32 and its
    recorded hardware says so; where bfloat16 is native the loss runs under autocast."""
    monkeypatch.setattr(resumable, "bf16_autocast_pays", lambda device: native)
    run = VFMRun(VFMConfig(**(TINY | {"steps": 1})), tmp_path)
    seen = []
    loss = run.loss
    monkeypatch.setattr(run, "loss", lambda step, batch: (
        seen.append(torch.is_autocast_enabled("cpu")), loss(step, batch))[1])
    run.train_chunk(minutes=5)
    assert seen == [native]
    assert run.trained_on.endswith("bf16 autocast" if native else "fp32")


def test_bf16_autocast_pays_answers_for_this_machine():
    assert isinstance(resumable.bf16_autocast_pays(torch.device("cpu")), bool)
    assert resumable.bf16_autocast_pays(torch.device("meta")) is False


def test_data_workers_draw_the_same_batches_so_the_same_weights(tmp_path):
    """Batches drawn ahead by a data process (the GPU path) are the batches drawn in line."""
    runs = []
    for workers in (0, 1):
        run = VFMRun(VFMConfig(**(TINY | {"steps": 2, "bf16": False})), tmp_path / str(workers))
        run.train_chunk(minutes=5, workers=workers)
        runs.append(run)
    assert runs[1].step == 2
    for a, b in zip(runs[0].student.parameters(), runs[1].student.parameters(), strict=True):
        assert torch.equal(a, b)


def test_step_batches_are_in_step_order_and_refuse_negative_workers():
    assert list(resumable.step_batches(lambda s: s * 10, 3, 6)) == [30, 40, 50]
    with pytest.raises(ValueError, match="workers"):
        resumable.step_batches(lambda s: s, 0, 1, workers=-1)


def test_pretrain_refuses_negative_workers(capsys):
    from reprod.toy.pretrain import main

    with pytest.raises(SystemExit):
        main(["vfm", "--workers", "-1"])
    assert "--workers must be >= 0" in capsys.readouterr().err


def test_card_alone_needs_the_weights_at_out(tmp_path, capsys):
    """``--card`` without ``--export`` describes weights already written (the file a try's gates
    measured): a missing file is a one-line error, not a fresh export."""
    with pytest.raises(SystemExit):
        pretrain.main(["diffusion", "--run-dir", str(tmp_path / "run"), "--card", "--out",
                       str(tmp_path / "missing.safetensors")])
    assert "--card alone writes the card of the weights at --out" in capsys.readouterr().err
    assert not (tmp_path / "missing.safetensors").exists()


def test_a_cards_text_is_rewritten_without_re_measuring_the_same_weights(tmp_path, monkeypatch):
    """A card beside the very same file lends its measurement (the teacher's layout probes take
    a quarter of an hour); a card of other weights does not."""
    from reprod.toy import diffusion
    from reprod.toy.diffusion import DiffusionConfig, DiffusionRun

    run = DiffusionRun(DiffusionConfig(steps=1, batch_size=2), tmp_path / "run", "cpu")
    weights = run.export(tmp_path / "toy_diffusion.safetensors")
    probe = {"toy DDPM, t_s=100 (strong)": {"synthetic": 0.5}}
    (tmp_path / "toy_diffusion.json").write_text(json.dumps(
        {"sha256": resumable.sha256(weights), "layout_probe": probe}))

    def measured_again(_):
        raise AssertionError("re-measured the same weights")

    monkeypatch.setattr(diffusion, "layout_probe", measured_again)
    pretrain._measure_and_card(run, weights)
    assert json.loads((tmp_path / "toy_diffusion.json").read_text())["layout_probe"] == probe
    (tmp_path / "toy_diffusion.json").write_text(json.dumps({"sha256": "other",
                                                             "layout_probe": probe}))
    monkeypatch.setattr(diffusion, "layout_probe", lambda _: {"fresh": {"synthetic": 0.1}})
    pretrain._measure_and_card(run, weights)
    assert "fresh" in json.loads((tmp_path / "toy_diffusion.json").read_text())["layout_probe"]
