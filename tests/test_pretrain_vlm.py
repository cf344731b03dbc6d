"""The toy VLM's contrastive pretraining: batches, the multi-positive CLIP loss, resumption."""

from __future__ import annotations

import numpy as np
import torch

from lessons import toyworld as tw
from reprod.toy.vlm import VLMConfig, VLMRun, clip_loss, make_batch

TINY = dict(steps=3, batch_size=4, warmup_steps=1)


def test_batches_are_deterministic_and_full_size():
    cfg = VLMConfig(batch_size=6)
    a, caps_a = make_batch(2, cfg)
    b, caps_b = make_batch(2, cfg)
    assert torch.equal(a, b) and caps_a == caps_b
    assert a.shape == (6, 3, *tw.DEFAULT_SIZE) and a.min() >= 0 and a.max() <= 1
    assert make_batch(3, cfg)[1] != caps_a


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
