"""The toy VLM's contrastive pretraining: batches, the multi-positive CLIP loss, resumption."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lessons import toyworld as tw
from reprod.toy.vlm import VLMConfig, VLMRun, clip_loss, make_batch

pytestmark = pytest.mark.usefixtures("in_world_2")   # the toy models are made in world 2

TINY = dict(steps=3, batch_size=4, warmup_steps=1)


def test_batches_are_deterministic_and_full_size():
    cfg = VLMConfig(batch_size=6)
    a, b = make_batch(2, cfg), make_batch(2, cfg)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert torch.equal(a.boxes, b.boxes) and a.region_captions == b.region_captions
    assert a.images.shape == (6, 3, *tw.DEFAULT_SIZE)
    assert a.images.min() >= 0 and a.images.max() <= 1
    assert make_batch(3, cfg).captions != a.captions
    # regions: (view, top, left, height, width) boxes inside their view, one caption each
    assert a.boxes.shape == (len(a.region_captions), 5) and len(a.region_captions) > 0
    view, top, left, h, w = a.boxes.T
    assert (view >= 0).all() and (view < 6).all()
    assert (top >= 0).all() and (top + h <= tw.DEFAULT_SIZE[0]).all()
    assert (left >= 0).all() and (left + w <= tw.DEFAULT_SIZE[1]).all()


def test_equal_captions_are_positives_not_negatives():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    scale = torch.tensor(np.log(10.0))
    logits = 10.0 * img @ txt.T
    twins = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    by_hand = 0.5 * (torch.nn.functional.cross_entropy(logits, twins)
                     + torch.nn.functional.cross_entropy(logits.T, twins))
    torch.testing.assert_close(clip_loss(img, txt, scale, ["a car", "a car", "sky"]), by_hand)
    plain = 0.5 * (torch.nn.functional.cross_entropy(logits, torch.arange(3))
                   + torch.nn.functional.cross_entropy(logits.T, torch.arange(3)))
    torch.testing.assert_close(clip_loss(img, txt, scale, ["a car", "two cars", "sky"]), plain)


def test_a_few_steps_train_and_resume_exactly(tmp_path):
    straight = VLMRun(VLMConfig(**TINY), tmp_path / "a")
    straight.train_chunk(minutes=5, log_every=1)
    assert straight.step == 3 and all(np.isfinite(r["loss"]) for r in straight.log)
    first = VLMRun(VLMConfig(**TINY), tmp_path / "b")
    first.train_chunk(minutes=5, stop_at=1)
    resumed = VLMRun(VLMConfig(**TINY), tmp_path / "b")
    assert resumed.load() and resumed.step == 1
    resumed.train_chunk(minutes=5)
    for p, q in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_export_loads_through_the_toy_vlm_bundle(tmp_path):
    from lessons.backbones import create_model

    run = VLMRun(VLMConfig(**TINY), tmp_path)
    path = run.export(tmp_path / "toy_vlm.safetensors")
    model = create_model("toy_vlm", weights=path)
    ref = run.model.state_dict()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ref[k].half().float(), rtol=0, atol=0)
