"""The committed toy foundation models of the course's world (``lessons.toyworld.COURSE_WORLD``):
files, cards, and one gate figure re-measured small."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lessons import toyworld as tw
from lessons.backbones import build_encoder, create_model, toy_weights_dir
from reprod.toy.resumable import sha256

MODELS = ("toy_vfm", "toy_vlm", "toy_diffusion")
WEIGHTS_DIR = toy_weights_dir(tw.COURSE_WORLD)
WORLD2_DIR = toy_weights_dir(tw.TOYWORLD_VERSION)
WORLD2_MODELS = [m for m in MODELS if (WORLD2_DIR / f"{m}.safetensors").is_file()]


def _card(model: str) -> dict:
    return json.loads((WEIGHTS_DIR / f"{model}.json").read_text())


@pytest.mark.parametrize("model", MODELS)
def test_weights_match_their_card(model):
    weights = WEIGHTS_DIR / f"{model}.safetensors"
    card = _card(model)
    assert card["sha256"] == sha256(weights), f"{model}: the card describes other weights"
    assert card["toyworld_version"] == tw.COURSE_WORLD, \
        f"{model} was trained on ToyWorld {card['toyworld_version']}: retrain it"
    assert card["steps_done"] == card["config"]["steps"]
    text = (WEIGHTS_DIR / f"{model}.md").read_text()
    assert card["sha256"][:16] in text and "## Measured" in text


def test_the_vfm_card_records_a_passed_gate():
    gate = _card("toy_vfm")["gate"]["gate"]
    assert gate["passed"], gate
    assert gate["over_random_init"] >= 10 and gate["over_scratch"] >= 5
    assert gate["fraction_of_source"] < 0.9


def _probe_miou(weights, source, tests, steps):
    from lessons.probe import LinearProbe
    from lessons.train import TrainConfig, evaluate_domains, train
    from lessons.utils import seed_everything

    seed_everything(0)
    probe = LinearProbe(build_encoder("toy_vfm", weights))
    train(probe, source, TrainConfig(steps=steps, batch_size=16, lr=3e-3, seed=0))
    return evaluate_domains(probe, tests)


def test_a_gate_figure_re_measured_small():
    """The frozen toy VFM's probe beats the random-init probe on fog and night (the domains
    where the scratch CNN collapses) with a short probe and 50 test scenes; the margin agrees
    with the card's full measurement to within 10 points."""
    source = tw.ToyWorld("synthetic", "train", length=2000, seed=0)
    tests = {d: tw.ToyWorld(d, "test", length=50, seed=0) for d in ("fog", "night")}
    vfm = _probe_miou(WEIGHTS_DIR, source, tests, steps=150)
    rand = _probe_miou(None, source, tests, steps=150)
    margin = 100 * np.mean([vfm[d] - rand[d] for d in tests])
    card = _card("toy_vfm")["gate"]["results"]
    card_margin = 100 * np.mean([card["frozen toy VFM + linear"][d]
                                 - card["random-init ViT + linear"][d] for d in tests])
    assert margin > 5, (vfm, rand)
    assert abs(margin - card_margin) < 10, (margin, card_margin)


@torch.no_grad()
def test_the_vlm_names_crops_zero_shot_and_segments_above_a_random_clip():
    from reprod.toy.vlm import crop_classification

    crops = crop_classification(create_model("toy_vlm", WEIGHTS_DIR).eval(), n=80)
    assert crops["crop_top1"] > 0.5 > 5 * crops["chance"], crops     # card: 88% on 400 scenes
    card = _card("toy_vlm")["measured"]
    zs, rand = card["toy VLM"]["zero_shot_miou"], card["random-init CLIP"]["zero_shot_miou"]
    assert zs["synthetic"] > rand["synthetic"]


@torch.no_grad()
def test_the_diffusion_teacher_denoises_and_its_probe_beats_a_random_unet():
    """The committed DDPM predicts the noise at t_s far better than a random-init U-Net (the
    DDPM loss on 16 held-out scenes), and its card's layout probe beats the random one."""
    from lessons import querydiff as qd
    from reprod.toy.diffusion import DiffusionConfig, make_batch

    x = 2 * make_batch(10_000, DiffusionConfig(batch_size=16, seed=1)) - 1      # unseen seed
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=g)
    t = torch.full((16,), qd.toy_timesteps()[1])
    sched = qd.toy_scheduler()
    mse = {}
    for name, w in (("trained", WEIGHTS_DIR / "toy_diffusion.safetensors"), ("random", None)):
        torch.manual_seed(0)
        unet = qd.build_toy_unet(w).eval()
        mse[name] = torch.nn.functional.mse_loss(unet(sched.add_noise(x, noise, t), t).sample,
                                                 noise).item()
    assert mse["trained"] < 0.5 * mse["random"], mse
    probe = _card("toy_diffusion")["layout_probe"]
    strong = next(v for k, v in probe.items() if k.startswith("toy DDPM") and "strong" in k)
    rand = next(v for k, v in probe.items() if k.startswith("random-init"))
    assert np.mean(list(strong.values())) > np.mean(list(rand.values())) + 5e-2, probe


@pytest.mark.skipif(tw.COURSE_WORLD == tw.TOYWORLD_VERSION,
                    reason="the course's world: the tests above check its models")
@pytest.mark.parametrize("model", WORLD2_MODELS)
def test_a_world2_model_enters_lessons_weights_as_its_recorded_try(model):
    """Before the course moves to world 2, a world-2 toy model enters ``lessons/weights`` only
    as the weights its model's last recorded try measured (``docs/results/
    toyworld2_gates.json``): the card's SHA-256 is the file's and the try's, the card says
    ToyWorld 2, and its gate lines are the try's verdicts, passed or not."""
    from reprod.toy.gates import gate_lines, last_try

    weights = WORLD2_DIR / f"{model}.safetensors"
    card = json.loads((WORLD2_DIR / f"{model}.json").read_text())
    assert card["sha256"] == sha256(weights), f"{model}: the card describes other weights"
    assert card["toyworld_version"] == tw.TOYWORLD_VERSION
    assert card["steps_done"] == card["config"]["steps"]
    last = last_try(model.removeprefix("toy_"))
    assert last is not None, f"{model}: no try of it is recorded"
    assert last["weights"].get(weights.name) == card["sha256"], \
        f"{model}: the committed weights are not the ones try {last['name']} measured"
    text = (WORLD2_DIR / f"{model}.md").read_text()
    for line in gate_lines(last["gates"]):
        assert line in text, f"{model}'s card does not say {line!r}"
