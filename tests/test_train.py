"""Tests of lessons.train (loss, schedules, step, loop, evaluation) and lessons.baselines."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

import lessons.train as train_mod
from lessons.baselines import TinySegNet
from lessons.classes import IGNORE_INDEX, NUM_CLASSES
from lessons.toyworld import ToyWorld
from lessons.train import (
    History,
    NonFiniteLoss,
    TrainConfig,
    domain_table,
    evaluate,
    evaluate_domains,
    lr_factor,
    make_optimizer,
    poly_lr,
    predict,
    resize_to,
    segmentation_loss,
    train,
    train_step,
)

K = NUM_CLASSES
SIZE = (32, 64)


def tiny_model(seed: int = 0) -> nn.Module:
    """A 3x3 convolution from RGB straight to class logits, at full resolution."""
    torch.manual_seed(seed)
    return nn.Conv2d(3, K, 3, padding=1)


def toy(length: int = 32, split: str = "train", domain: str = "synthetic") -> ToyWorld:
    return ToyWorld(domain, split, size=SIZE, length=length, seed=0)


def quick_config(**kw) -> TrainConfig:
    base = {"steps": 10, "batch_size": 8, "lr": 0.05, "progress": False, "device": "cpu"}
    return TrainConfig(**{**base, **kw})


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


class PairDataset(Dataset):
    """Precomputed (image, label) pairs."""

    def __init__(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pairs[i]


def encoded_pairs(n: int = 6, h: int = 8, w: int = 12, seed: int = 0) -> PairDataset:
    """Random labels (with some ignored pixels); image channel 0 holds the label (0 if ignored)."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        label = torch.randint(0, K, (h, w), generator=g)
        label[torch.rand(h, w, generator=g) < 0.1] = IGNORE_INDEX
        image = torch.zeros(3, h, w)
        image[0] = torch.where(label == IGNORE_INDEX, 0, label).float()
        pairs.append((image, label))
    return PairDataset(pairs)


class Oracle(nn.Module):
    """Decodes the label from image channel 0 and returns its one-hot logits."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))  # evaluate() takes the device from a parameter

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        labels = images[:, 0].round().long().clamp(0, K - 1)            # (B, H, W)
        return F.one_hot(labels, K).permute(0, 3, 1, 2).float()         # (B, K, H, W)


class ConstantClass(nn.Module):
    """Predicts one class everywhere."""

    def __init__(self, cls: int = 0):
        super().__init__()
        self.cls = cls
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        out = torch.zeros(b, K, h, w)
        out[:, self.cls] = 1.0
        return out


# ---------------------------------------------------------------- segmentation_loss, resize_to


def test_segmentation_loss_is_cross_entropy_on_upsampled_logits():
    torch.manual_seed(0)
    logits = torch.randn(2, K, 4, 6)
    labels = torch.randint(0, K, (2, 8, 12))
    labels[0, :2] = IGNORE_INDEX
    up = F.interpolate(logits, size=(8, 12), mode="bilinear", align_corners=False)
    expected = F.cross_entropy(up, labels, ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(segmentation_loss(logits, labels), expected)
    # the low-resolution logits are not simply compared with a nearest-downsampled label
    assert not torch.allclose(segmentation_loss(logits, labels),
                              F.cross_entropy(logits, labels[:, ::2, ::2].contiguous(),
                                              ignore_index=IGNORE_INDEX))


def test_segmentation_loss_ignores_255_pixels():
    torch.manual_seed(1)
    logits = torch.randn(2, K, 8, 12)
    labels = torch.randint(0, K, (2, 8, 12))
    ignored = torch.zeros(2, 8, 12, dtype=torch.bool)
    ignored[:, :, :5] = True
    labels[ignored] = IGNORE_INDEX
    changed = logits.clone()
    changed[ignored.unsqueeze(1).expand_as(logits)] = 100.0 * torch.randn(int(ignored.sum()) * K)
    torch.testing.assert_close(segmentation_loss(changed, labels),
                               segmentation_loss(logits, labels))
    # the mean is over the evaluated pixels only
    keep = ~ignored
    per_pixel = F.cross_entropy(logits, labels.clamp(max=K - 1), reduction="none")
    torch.testing.assert_close(segmentation_loss(logits, labels), per_pixel[keep].mean())
    # and changing an evaluated pixel does change it
    changed[0, :, 0, 7] += 5.0 * torch.randn(K)
    assert segmentation_loss(changed, labels) != segmentation_loss(logits, labels)


@pytest.mark.parametrize(
    ("logit_shape", "label_shape"),
    [((K, 4, 4), (1, 8, 8)), ((1, K, 4, 4), (8, 8)), ((2, K, 4, 4), (3, 8, 8)),
     ((1, K, 4, 4), (1, 1, 8, 8))],
)
def test_segmentation_loss_rejects_bad_shapes(logit_shape, label_shape):
    with pytest.raises(ValueError, match="expected logits"):
        segmentation_loss(torch.randn(logit_shape), torch.zeros(label_shape, dtype=torch.long))


def test_resize_to_is_a_noop_at_the_same_size_and_bilinear_otherwise():
    x = torch.randn(1, K, 4, 6)
    assert resize_to(x, (4, 6)) is x
    assert resize_to(x, torch.Size([4, 6])) is x
    y = resize_to(x, (8, 12))
    assert y.shape == (1, K, 8, 12)
    torch.testing.assert_close(
        y, F.interpolate(x, size=(8, 12), mode="bilinear", align_corners=False))


def test_predict_resizes_scores_to_the_image_size():
    model = nn.Conv2d(3, K, 2, stride=2)        # half resolution
    out = predict(model, torch.rand(2, 3, 8, 12))
    assert out.shape == (2, K, 8, 12)
    assert not out.requires_grad


# ---------------------------------------------------------------- lr_factor and TrainConfig


def test_lr_factor_constant():
    cfg = TrainConfig(steps=10, schedule="constant")
    assert [lr_factor(s, cfg) for s in (0, 5, 9, 10)] == [1.0, 1.0, 1.0, 1.0]


def test_lr_factor_linear():
    cfg = TrainConfig(steps=10, schedule="linear")
    assert lr_factor(0, cfg) == pytest.approx(1.0)
    assert lr_factor(5, cfg) == pytest.approx(0.5)
    assert lr_factor(9, cfg) == pytest.approx(0.1)
    assert lr_factor(10, cfg) == pytest.approx(0.0)


def test_lr_factor_poly():
    cfg = TrainConfig(steps=10, schedule="poly")
    assert lr_factor(0, cfg) == pytest.approx(1.0)
    assert lr_factor(5, cfg) == pytest.approx(0.5**0.9)
    assert lr_factor(9, cfg) == pytest.approx(0.1**0.9)
    assert lr_factor(10, cfg) == pytest.approx(0.0)
    # poly with power 0.9 decays more slowly than linear in the middle
    assert lr_factor(5, cfg) > 0.5


@pytest.mark.parametrize("schedule", ["poly", "linear", "constant"])
def test_lr_factor_warmup(schedule):
    cfg = TrainConfig(steps=10, warmup_steps=4, schedule=schedule)
    assert lr_factor(0, cfg) == pytest.approx(1e-6)
    assert lr_factor(2, cfg) == pytest.approx(1e-6 + (1 - 1e-6) * 0.5)
    assert lr_factor(3, cfg) == pytest.approx(1e-6 + (1 - 1e-6) * 0.75)
    assert lr_factor(4, cfg) == pytest.approx(1.0)             # warm-up done: schedule starts
    t = 3 / 6                                                  # step 7 of the 6 after warm-up
    mid = {"poly": (1 - t) ** 0.9, "linear": 1 - t, "constant": 1.0}[schedule]
    assert lr_factor(7, cfg) == pytest.approx(mid)
    end = {"poly": 0.0, "linear": 0.0, "constant": 1.0}[schedule]
    assert lr_factor(10, cfg) == pytest.approx(end)


def test_poly_lr_is_mmseg_poly_with_either_warm_up():
    # no warm-up: both forms are (base - min_lr) (1 - s / steps)^0.9 + min_lr
    for form in ("mmengine", "mmcv"):
        assert poly_lr(0, 100, 1e-4, warmup=form) == 1e-4
        assert poly_lr(50, 100, 1e-4, min_lr=1e-6, warmup=form) == pytest.approx(
            (1e-4 - 1e-6) * 0.5**0.9 + 1e-6)
        assert poly_lr(100, 100, 1e-4, min_lr=1e-6, warmup=form) == pytest.approx(1e-6)
        assert poly_lr(150, 100, 1e-4, min_lr=1e-6, warmup=form) == pytest.approx(1e-6)
    # mmengine (Rein's mmseg 1.x): LinearLR over the warm-up, then poly over the rest
    assert poly_lr(5, 110, 2.0, warmup_steps=10, warmup="mmengine") == pytest.approx(
        2.0 * (1e-6 + (1 - 1e-6) * 0.5))
    assert poly_lr(60, 110, 2.0, warmup_steps=10, warmup="mmengine") == pytest.approx(
        2.0 * 0.5**0.9)
    # mmcv (tqdm's and MFuser's mmcv 1.x): the warm-up scales the poly over all the steps
    assert poly_lr(5, 110, 2.0, warmup_steps=10, warmup="mmcv") == pytest.approx(
        2.0 * (1 - 5 / 110) ** 0.9 * (1e-6 + (1 - 1e-6) * 0.5))
    assert poly_lr(60, 110, 2.0, warmup_steps=10, warmup="mmcv") == pytest.approx(
        2.0 * (1 - 60 / 110) ** 0.9)
    assert poly_lr(3, 10, power=1.0) == pytest.approx(0.7)          # linear
    assert poly_lr(10, 10, power=0.0) == 1.0                        # constant
    with pytest.raises(ValueError, match="warm-up form"):
        poly_lr(0, 10, warmup="cosine")


def test_train_config_validates():
    TrainConfig()  # the defaults are valid
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="adam")
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="cosine")
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)


def test_train_config_from_dict_names_unknown_keys():
    cfg = TrainConfig.from_dict({"steps": 7, "lr": 0.1, "schedule": "linear"})
    assert (cfg.steps, cfg.lr, cfg.schedule) == (7, 0.1, "linear")
    with pytest.raises(ValueError, match=r"\['setps'\]"):
        TrainConfig.from_dict({"setps": 7, "lr": 0.1})
    with pytest.raises(ValueError, match="optimizer"):      # values are still validated
        TrainConfig.from_dict({"optimizer": "lamb"})


# ---------------------------------------------------------------- make_optimizer, train_step


def test_make_optimizer_kinds_and_frozen_models():
    model = tiny_model()
    opt = make_optimizer(model, TrainConfig(optimizer="sgd", lr=0.2, weight_decay=0.0))
    assert isinstance(opt, torch.optim.SGD)
    assert opt.param_groups[0]["lr"] == 0.2 and opt.param_groups[0]["momentum"] == 0.9
    assert isinstance(make_optimizer(model, TrainConfig()), torch.optim.AdamW)
    model.bias.requires_grad_(False)
    params = make_optimizer(model, TrainConfig()).param_groups[0]["params"]
    assert len(params) == 1 and params[0] is model.weight      # frozen ones are left out
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        make_optimizer(model, TrainConfig())


def test_train_step_reduces_the_loss_on_a_fixed_batch():
    images, labels = next(iter(torch.utils.data.DataLoader(toy(8), batch_size=8)))
    model = tiny_model()
    opt = make_optimizer(model, TrainConfig(lr=0.05))
    losses = [train_step(model, images, labels, opt)["loss"] for _ in range(20)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0], losses


def test_train_step_raises_on_a_nan_loss_before_updating():
    class NaNModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, K, 1)

        def forward(self, x):
            return self.conv(x) * float("nan")

    model = NaNModel()
    before = state_copy(model)
    opt = make_optimizer(model, TrainConfig())
    images, labels = torch.rand(2, 3, 8, 8), torch.randint(0, K, (2, 8, 8))
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        train_step(model, images, labels, opt)
    assert same_state(model, before)


def test_train_step_clips_gradients():
    images, labels = torch.rand(2, 3, 8, 8), torch.randint(0, K, (2, 8, 8))
    cfg = TrainConfig(optimizer="sgd", lr=1.0, weight_decay=0.0)
    moves = {}
    for clip in (None, 1e-3):
        model = tiny_model()
        start = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        train_step(model, images, labels, make_optimizer(model, cfg), grad_clip=clip)
        end = torch.cat([p.detach().flatten() for p in model.parameters()])
        moves[clip] = float((end - start).norm())      # SGD's first step moves lr * grad
    assert moves[1e-3] == pytest.approx(1e-3, rel=1e-3)
    assert moves[None] > 10 * moves[1e-3]


def test_train_step_names_the_terms_of_a_non_finite_loss():
    model = nn.Conv2d(3, K, 1)
    images, labels = torch.rand(2, 3, 8, 8), torch.randint(0, K, (2, 8, 8))

    def forward(x, y):
        return {"loss_ok": segmentation_loss(model(x), y), "loss_bad": torch.tensor(float("inf"))}

    with pytest.raises(NonFiniteLoss) as err:
        train_step(model, images, labels, make_optimizer(model, TrainConfig()), forward=forward)
    assert err.value.loss == float("inf") and set(err.value.parts) == {"loss_ok", "loss_bad"}
    assert isinstance(err.value, FloatingPointError)


def test_train_step_hooks_forward_autocast_and_scaler():
    images, labels = torch.rand(2, 3, 8, 8), torch.randint(0, K, (2, 8, 8))
    model = tiny_model()
    seen = []

    def forward(x, y):
        logits = model(x)
        seen.append(logits.dtype)
        return {"loss_ce": segmentation_loss(logits, y)}

    out = train_step(model, images, labels, make_optimizer(model, TrainConfig()),
                     autocast_dtype=torch.bfloat16, forward=forward)
    assert seen == [torch.bfloat16] and math.isfinite(out["loss"])
    assert model.weight.dtype == torch.float32                 # weights stay fp32
    # a gradient scaler: the same update as without one (it unscales before clipping)
    moved = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**10)):
        m = tiny_model()
        start = m.weight.detach().clone()
        opt = make_optimizer(m, TrainConfig(optimizer="sgd", lr=1.0, weight_decay=0.0))
        train_step(m, images, labels, opt, grad_clip=1e-3, scaler=scaler)
        moved.append(m.weight.detach() - start)
    assert torch.allclose(moved[0], moved[1], atol=1e-7)


# ---------------------------------------------------------------- the model protocol


class ProtocolModel(nn.Module):
    """Has its own ``loss`` (two parts) and ``predict``; calling it directly is an error."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, K, 3, padding=1)
        self.calls = {"loss": 0, "predict": 0}

    def forward(self, images):
        raise AssertionError("the protocol's loss/predict must be used, not forward")

    def loss(self, images, labels):
        self.calls["loss"] += 1
        ce = segmentation_loss(self.conv(images), labels)
        return {"loss_a": ce, "loss_b": 0.5 * ce}

    def predict(self, images):
        self.calls["predict"] += 1
        return self.conv(images)[:, :, ::2, ::2]          # lower resolution: predict() resizes


def test_model_protocol_loss_and_predict_are_used():
    model = ProtocolModel()
    opt = make_optimizer(model, TrainConfig())
    images, labels = torch.rand(2, 3, 8, 8), torch.randint(0, K, (2, 8, 8))
    out = train_step(model, images, labels, opt)
    assert set(out) == {"loss_a", "loss_b", "loss"}
    assert out["loss"] == pytest.approx(out["loss_a"] + out["loss_b"])
    assert out["loss_b"] == pytest.approx(0.5 * out["loss_a"])
    assert predict(model, images).shape == (2, K, 8, 8)

    model = ProtocolModel()
    cfg = quick_config(steps=6, batch_size=4, eval_every=3)
    hist = train(model, toy(16), cfg, val_dataset=toy(8, "val", "validation"))
    assert model.calls["loss"] == 6
    # 2 validations (steps 3 and 6) of 8 images in batches of 2 * batch_size = 8: one batch each
    assert model.calls["predict"] == 2
    assert hist.val_steps == [3, 6]


# ---------------------------------------------------------------- train


def test_train_lowers_the_loss_and_records_its_history():
    model = tiny_model()
    seen = []
    cfg = quick_config(steps=40, warmup_steps=5, schedule="poly")
    hist = train(model, toy(32), cfg, callback=lambda step, out: seen.append((step, out["loss"])))
    assert isinstance(hist, History)
    first, last = sum(hist.loss[:5]) / 5, sum(hist.loss[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    assert hist.steps == list(range(1, 41))
    assert len(hist.loss) == len(hist.lr) == 40
    assert hist.lr == pytest.approx([cfg.lr * lr_factor(s, cfg) for s in range(40)], rel=1e-6)
    assert seen == list(zip(hist.steps, hist.loss, strict=True))
    assert hist.val_steps == [] and hist.best_step is None       # no validation set
    assert hist.config["steps"] == 40 and hist.config["lr"] == cfg.lr
    assert hist.seconds > 0 and hist.images_per_second > 0


def test_train_rejects_a_dataset_smaller_than_a_batch():
    with pytest.raises(ValueError, match="smaller than one batch"):
        train(tiny_model(), toy(4), quick_config(batch_size=8))


@pytest.mark.parametrize(("eval_every", "expected"), [(0, [5]), (2, [2, 4, 5]), (5, [5])])
def test_train_validates_at_eval_every_and_at_the_end(eval_every, expected):
    model = tiny_model()
    cfg = quick_config(steps=5, batch_size=4, eval_every=eval_every, eval_batches=1)
    hist = train(model, toy(8), cfg, val_dataset=toy(16, "val", "validation"))
    assert hist.val_steps == expected
    assert len(hist.val_miou) == len(expected)
    assert all(0.0 <= m <= 1.0 for m in hist.val_miou)
    assert hist.best_miou == max(hist.val_miou)
    assert hist.best_step == expected[hist.val_miou.index(hist.best_miou)]


def test_train_passes_eval_batches_to_evaluate(monkeypatch):
    calls = []

    def fake_evaluate(model, dataset, **kw):
        calls.append(kw)
        return {"mean_iou": 0.5}

    monkeypatch.setattr(train_mod, "evaluate", fake_evaluate)
    train(tiny_model(), toy(8), quick_config(steps=2, batch_size=4, eval_batches=3),
          val_dataset=toy(8, "val", "validation"))
    assert calls == [{"batch_size": 8, "max_batches": 3}]


def scripted_run(monkeypatch, mious: list[float], select_best: bool = True):
    """Train with ``evaluate`` replaced by a scripted mIoU sequence; returns the model, the
    history and the weights at each validation."""
    snapshots, script = [], iter(mious)

    def fake_evaluate(model, dataset, **kw):
        snapshots.append(state_copy(model))
        return {"mean_iou": next(script)}

    monkeypatch.setattr(train_mod, "evaluate", fake_evaluate)
    model = tiny_model()
    cfg = quick_config(steps=2 * len(mious), batch_size=4, eval_every=2, select_best=select_best)
    hist = train(model, toy(8), cfg, val_dataset=toy(8, "val", "validation"))
    assert len(snapshots) == len(mious)
    # the weights move between validations, so each snapshot identifies one validation
    assert all(not torch.equal(a["weight"], b["weight"]) for a, b in pairwise(snapshots))
    return model, hist, snapshots


def test_select_best_restores_the_best_weights(monkeypatch):
    model, hist, snaps = scripted_run(monkeypatch, [0.3, 0.7, 0.5])
    assert hist.val_steps == [2, 4, 6] and hist.val_miou == [0.3, 0.7, 0.5]
    assert (hist.best_step, hist.best_miou) == (4, 0.7)
    assert same_state(model, snaps[1])
    assert not same_state(model, snaps[2]) and not same_state(model, snaps[0])


def test_select_best_keeps_the_first_of_two_bests_and_the_earliest_best(monkeypatch):
    model, hist, snaps = scripted_run(monkeypatch, [0.9, 0.1, 0.9, 0.2])
    assert hist.best_step == 2
    assert same_state(model, snaps[0])


def test_select_best_keeps_the_last_weights_when_they_are_best(monkeypatch):
    model, hist, snaps = scripted_run(monkeypatch, [0.3, 0.5, 0.8])
    assert hist.best_step == 6
    assert same_state(model, snaps[2])


def test_without_select_best_the_last_weights_stay(monkeypatch):
    model, hist, snaps = scripted_run(monkeypatch, [0.3, 0.7, 0.5], select_best=False)
    assert hist.best_step == 4                       # still recorded
    assert same_state(model, snaps[2])


def test_select_best_with_real_evaluation_undoes_a_corrupting_callback():
    """After the step-10 validation a callback wrecks the weights; the step-10 ones come back."""
    model = tiny_model()
    saved = {}

    def callback(step, out):
        if step == 10:
            saved["state"] = state_copy(model)
        if step == 11:
            with torch.no_grad():
                model.weight.zero_()
                model.bias.zero_()
                model.bias[16] = 10.0    # "train" everywhere: ToyWorld never renders it, mIoU 0

    cfg = quick_config(steps=12, batch_size=8, lr=0.05, schedule="constant", eval_every=10)
    hist = train(model, toy(32), cfg, callback=callback, val_dataset=toy(16, "val", "validation"))
    assert hist.val_steps == [10, 12]
    assert hist.val_miou[0] > 0.02 and hist.val_miou[1] == 0.0
    assert hist.best_step == 10
    assert same_state(model, saved["state"])


def test_train_is_deterministic_for_a_seed():
    def losses(seed: int) -> list[float]:
        return train(tiny_model(), toy(32), quick_config(steps=8, seed=seed)).loss

    assert losses(0) == losses(0)
    assert losses(0) != losses(1)           # the seed drives the batch order


def test_train_seeds_the_model_randomness_too():
    """Dropout draws come from the config's seed, not from whatever the global RNG holds."""

    def losses(global_seed: int) -> list[float]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Dropout2d(0.5), nn.Conv2d(3, K, 3, padding=1))
        torch.manual_seed(global_seed)      # the global RNG state when train() is called
        return train(model, toy(16), quick_config(steps=4)).loss

    assert losses(1) == losses(2)


# ---------------------------------------------------------------- evaluate, domains, table


def test_evaluate_oracle_scores_one_and_a_constant_model_does_not():
    ds = encoded_pairs()
    res = evaluate(Oracle(), ds, batch_size=4)
    assert res["mean_iou"] == 1.0
    assert res["per_class_iou"].shape == (K,)
    assert res["confusion"].shape == (K, K)
    labels = torch.stack([lab for _, lab in ds.pairs])
    assert int(res["confusion"].sum()) == int((labels != IGNORE_INDEX).sum())
    assert int(res["confusion"].trace()) == int(res["confusion"].sum())
    assert evaluate(ConstantClass(0), ds, batch_size=4)["mean_iou"] < 0.2


def test_evaluate_max_batches_and_training_mode():
    ds = encoded_pairs(n=6)
    model = Oracle().train()
    res = evaluate(model, ds, batch_size=2, max_batches=1)
    labels = torch.stack([lab for _, lab in ds.pairs[:2]])
    assert int(res["confusion"].sum()) == int((labels != IGNORE_INDEX).sum())
    assert model.training                     # restored after evaluation
    model.eval()
    evaluate(model, ds, batch_size=2)
    assert not model.training


def _uniform(label_rows: list[int]) -> PairDataset:
    """Two 4x4 items whose rows carry the given classes."""
    label = torch.tensor(label_rows).view(4, 1).expand(4, 4).contiguous()
    return PairDataset([(torch.zeros(3, 4, 4), label)] * 2)


def test_evaluate_domains_keeps_the_mapping_order_and_values():
    domains = {
        "zeta": _uniform([0, 0, 0, 0]),            # always right: IoU(0) = 1
        "alpha": _uniform([0, 0, 1, 1]),           # IoU(0) = 1/2, IoU(1) = 0 -> 1/4
        "mid": _uniform([0, 1, 1, 1]),             # IoU(0) = 1/4, IoU(1) = 0 -> 1/8
    }
    out = evaluate_domains(ConstantClass(0), domains, batch_size=1)
    assert list(out) == ["zeta", "alpha", "mid"]
    assert out == pytest.approx({"zeta": 1.0, "alpha": 0.25, "mid": 0.125})


def test_domain_table_formats_percentages_with_a_mean_column():
    results = {
        "scratch": {"fog": 0.5, "night": 0.25},
        "rein-dinov2": {"fog": 0.1234, "night": 0.9},
    }
    lines = domain_table(results).splitlines()
    assert len(lines) == 3
    assert lines[0].split() == ["model", "fog", "night", "mean"]
    assert lines[1].split() == ["scratch", "50.0", "25.0", "37.5"]
    assert lines[2].split() == ["rein-dinov2", "12.3", "90.0", "51.2"]
    assert len({len(line) for line in lines}) == 1           # aligned columns
    lines2 = domain_table(results, digits=2).splitlines()
    assert lines2[2].split() == ["rein-dinov2", "12.34", "90.00", "51.17"]


def test_domain_table_leaves_the_source_out_of_the_mean_and_says_so():
    results = {"m": {"synthetic": 0.9, "fog": 0.5, "night": 0.25}}
    lines = domain_table(results).splitlines()
    assert lines[0].split()[-2:] == ["targets'", "mean"]
    assert lines[1].split() == ["m", "90.0", "50.0", "25.0", "37.5"]    # fog and night only
    assert len({len(line) for line in lines}) == 1
    assert domain_table(results, source="fog").splitlines()[1].split()[-1] == "57.5"
    single = domain_table({"m": {"synthetic": 0.9}}).splitlines()
    assert single[0].split() == ["model", "synthetic"] and single[1].split() == ["m", "90.0"]


# ---------------------------------------------------------------- baselines.TinySegNet


def test_tiny_seg_net_output_shape():
    model = TinySegNet().eval()
    out = model(torch.rand(2, 3, 32, 64))
    assert out.shape == (2, NUM_CLASSES, 32 // 8, 64 // 8)
    assert TinySegNet(num_classes=5, widths=(8, 8, 8), context=8)(
        torch.rand(1, 3, 16, 24)).shape == (1, 5, 2, 3)


@pytest.mark.parametrize("shape", [(1, 1, 32, 32), (1, 4, 32, 32), (3, 32, 32)])
def test_tiny_seg_net_rejects_wrong_input(shape):
    with pytest.raises(ValueError, match=r"expected images \(B, 3, H, W\)"):
        TinySegNet()(torch.rand(shape))


def test_tiny_seg_net_parameter_count():
    # conv_bn_relu(c_in, c_out): 3x3 conv without bias (9 * c_in * c_out) + BatchNorm weight and
    # bias (2 * c_out); running statistics and mean/std are buffers, not parameters.
    def cbr(c_in, c_out):
        return 9 * c_in * c_out + 2 * c_out

    # encoder: per width w, conv_bn_relu(c, w, stride 2) then conv_bn_relu(w, w)
    stage1 = 9 * 3 * 32 + 64 + 9 * 32 * 32 + 64             # 864 + 64 + 9216 + 64 = 10208
    stage2 = 9 * 32 * 64 + 128 + 9 * 64 * 64 + 128          # 18432 + 128 + 36864 + 128 = 55552
    stage3 = 9 * 64 * 96 + 192 + 9 * 96 * 96 + 192         # 55296 + 192 + 82944 + 192 = 138624
    context = 9 * 96 * 128 + 256 + 9 * 128 * 128 + 256      # 110592 + 256 + 147456 + 256 = 258560
    classifier = 128 * 19 + 19                              # 1x1 conv with bias: 2451
    assert (stage1, stage2, stage3, context, classifier) == (10208, 55552, 138624, 258560, 2451)
    assert stage1 == cbr(3, 32) + cbr(32, 32) and context == cbr(96, 128) + cbr(128, 128)
    total = stage1 + stage2 + stage3 + context + classifier
    assert total == 465395
    assert sum(p.numel() for p in TinySegNet().parameters()) == total
    assert sum(b.numel() for n, b in TinySegNet().named_buffers() if n in ("mean", "std")) == 6


def test_tiny_seg_net_gradients_reach_the_first_conv():
    torch.manual_seed(0)
    model = TinySegNet()
    images, labels = torch.rand(2, 3, 32, 32), torch.randint(0, NUM_CLASSES, (2, 32, 32))
    segmentation_loss(model(images), labels).backward()
    first = model.encoder[0][0]
    assert isinstance(first, nn.Conv2d) and first.in_channels == 3
    assert first.weight.grad is not None and float(first.weight.grad.abs().sum()) > 0
    assert all(p.grad is not None for p in model.parameters())


def test_train_with_batch_augmentation_and_bf16_autocast():
    """The sweep's fast path: per-batch augmentation and bfloat16 autocast train and stay
    reproducible for a seed."""
    data = ToyWorld("synthetic", "train", length=32, seed=0)
    cfg = TrainConfig(steps=3, batch_size=8, augment=True, autocast="bf16", progress=False,
                      device="cpu")
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = TinySegNet()
        hist = train(model, data, cfg)
        runs.append((hist.loss, next(iter(model.parameters())).detach().clone()))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])
    assert all(math.isfinite(v) for v in runs[0][0])
    with pytest.raises(ValueError, match="unknown autocast"):
        TrainConfig(autocast="fp8")
