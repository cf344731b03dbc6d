"""Linear probing of frozen encoders, and the toy VFM gate's arithmetic."""

from __future__ import annotations

import pytest
import torch

from lessons.backbones import build_encoder
from lessons.probe import LinearProbe
from reprod.toy.gates import GATE_TARGETS, check_gate


def test_probe_shapes_and_only_the_head_trains():
    torch.manual_seed(0)
    probe = LinearProbe(build_encoder("toy_vfm"))
    images = torch.rand(2, 3, 64, 128)
    logits = probe(images)
    assert logits.shape == (2, 19, 8, 16)
    logits.sum().backward()
    assert all(p.grad is None for p in probe.encoder.parameters())
    assert probe.head.weight.grad is not None and probe.head.weight.grad.abs().sum() > 0
    trainable = sum(p.numel() for p in probe.parameters() if p.requires_grad)
    assert trainable == 192 * 19 + 19


def test_probe_keeps_the_encoder_in_eval_mode_and_reads_a_chosen_layer():
    enc = build_encoder("toy_vfm")
    probe = LinearProbe(enc, layer=2).train()
    assert probe.training and not probe.encoder.training
    images = torch.rand(1, 3, 64, 128)
    x, grid = enc.embed(enc.normalize(images))
    for i in range(3):
        x = enc.block(i, x, grid)
    torch.testing.assert_close(probe.features(images), enc.patch_map(x, grid))
    with pytest.raises(ValueError, match="layer 6"):
        LinearProbe(enc, layer=6)


def _results(vfm: float, rand: float, scratch: float, source: float) -> dict:
    row = lambda v, s: {"synthetic": s, **{d: v for d in GATE_TARGETS}}  # noqa: E731
    return {"frozen toy VFM + linear": row(vfm, source),
            "random-init ViT + linear": row(rand, 0.5), "scratch CNN": row(scratch, 0.6)}


def test_gate_arithmetic():
    ok = check_gate(_results(vfm=0.45, rand=0.30, scratch=0.35, source=0.60))
    assert ok["passed"] and ok["over_random_init"] == pytest.approx(15)
    assert ok["over_scratch"] == pytest.approx(10)
    assert not check_gate(_results(0.45, 0.40, 0.35, 0.60))["passed"]   # < 10 over random init
    assert not check_gate(_results(0.45, 0.30, 0.42, 0.60))["passed"]   # < 5 over scratch
    assert not check_gate(_results(0.58, 0.30, 0.35, 0.60))["passed"]   # no headroom left
