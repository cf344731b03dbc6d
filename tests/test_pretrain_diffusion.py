"""The toy diffusion teacher's pretraining: batches, DDPM loss, resumption, export, probe."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lessons import querydiff as qd
from reprod.toy.diffusion import DiffusionConfig, DiffusionProbe, DiffusionRun, make_batch

pytestmark = pytest.mark.usefixtures("in_world_2")   # the toy models are made in world 2

TINY = dict(steps=3, batch_size=4, warmup_steps=1)


def test_batches_are_deterministic_and_teacher_sized():
    cfg = DiffusionConfig(batch_size=5)
    a, b = make_batch(2, cfg), make_batch(2, cfg)
    assert torch.equal(a, b)
    assert a.shape == (5, 3, *qd.TOY_IMAGE_SIZE) and a.min() >= 0 and a.max() <= 1
    assert not torch.equal(make_batch(3, cfg), a)


def test_a_few_steps_train_and_resume_exactly(tmp_path):
    straight = DiffusionRun(DiffusionConfig(**TINY), tmp_path / "a")
    straight.train_chunk(minutes=5, log_every=1)
    assert straight.step == 3 and all(np.isfinite(r["loss"]) for r in straight.log)
    first = DiffusionRun(DiffusionConfig(**TINY), tmp_path / "b")
    first.train_chunk(minutes=5, stop_at=1)
    resumed = DiffusionRun(DiffusionConfig(**TINY), tmp_path / "b")
    assert resumed.load() and resumed.step == 1
    resumed.train_chunk(minutes=5)
    for p, q in zip(straight.ema.parameters(), resumed.ema.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    # the EMA trails the trained weights
    assert any(not torch.equal(p, q) for p, q in zip(straight.ema.parameters(),
                                                      straight.model.parameters(), strict=True))


def test_export_loads_as_the_toy_teacher(tmp_path):
    run = DiffusionRun(DiffusionConfig(**TINY), tmp_path)
    path = run.export(tmp_path / "toy_diffusion.safetensors")
    unet = qd.build_toy_unet(path)
    ref = run.ema.state_dict()
    for k, v in unet.state_dict().items():
        torch.testing.assert_close(v, ref[k].half().float(), rtol=0, atol=0)


def test_probe_reads_all_hooked_layers_at_one_timestep():
    torch.manual_seed(0)
    teacher = qd.DiffusionTeacher(qd.build_toy_unet(None), qd.toy_scheduler(), (5, 100),
                                  qd.TOY_FEATURE_LAYERS, image_size=qd.TOY_IMAGE_SIZE)
    probe = DiffusionProbe(teacher, "strong")
    x = torch.rand(2, 3, 64, 128)
    assert probe(x).shape == (2, 19, 16, 32)
    assert torch.equal(probe.features(x), probe.features(x))           # seeded noise
    assert not any(k.startswith("teacher") for k in probe.state_dict())
    channels = sum(qd.unet_channels()[layer] for layer in qd.TOY_FEATURE_LAYERS)   # 3 x 64
    assert DiffusionProbe(teacher, "weak").features(x).shape == (2, channels, 16, 32)
