"""Checks of lesson 03a's exercises (Mask2Former): see ``lessons.exercises``."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from lessons.exercises import NotYet, exercise, expect, expect_keys, expect_number

__all__ = ["masked_attention", "points"]

POINTS = (50, 200, 2000)
KINDS = ("importance", "uniform")
LAYERS = 6                         # the toy transformer decoder's layers


def _draws(value, what: str) -> torch.Tensor:
    try:
        t = torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise NotYet(f"`{what}` should be a (10, 2) tensor of [BCE, dice] draws.") from None
    expect(tuple(t.shape) == (10, 2),
           f"`{what}` should be a (10, 2) tensor: ten draws of [BCE, dice], not shape "
           f"{tuple(t.shape)}.")
    expect(bool(torch.isfinite(t).all()) and bool((t >= 0).all()),
           f"`{what}` should hold finite, non-negative losses.")
    return t


@exercise("03a", 1,
          every_pixel_loss="(BCE, dice): loss_masks of MaskClassificationLoss(num_points=None) on "
                           "the trained Rein + Mask2Former's prediction, every pixel of the grid",
          point_draws="{(kind, n): (10, 2) tensor of ten [BCE, dice] draws}: kind 'importance' "
                      "(importance_sample_ratio=0.75) or 'uniform' (0.0), n in 50, 200, 2000 "
                      "points per mask, with the given matching",
          importance_raises_bce="True or False: is the importance-sampled BCE (mean of the ten "
                                "draws) above the uniform one at every number of points?",
          noise_falls_with_points="True or False: is the standard deviation of the ten BCE draws "
                                  "smaller at 2000 points than at 50, for both kinds?")
def points(every_pixel_loss, point_draws, importance_raises_bce, noise_falls_with_points):
    try:
        exact = [float(v) for v in every_pixel_loss]
    except (TypeError, ValueError, RuntimeError):
        raise NotYet("`every_pixel_loss` should be the pair (BCE, dice) that loss_masks "
                     "returns.") from None
    expect(len(exact) == 2, "`every_pixel_loss` should be the pair (BCE, dice).")
    expect(all(math.isfinite(v) and v >= 0 for v in exact),
           "`every_pixel_loss` should hold finite, non-negative losses.")
    expect(exact[1] <= 1, "the dice loss is at most 1: is `every_pixel_loss` (BCE, dice)?")
    expect(isinstance(point_draws, Mapping), "`point_draws` should be a dict.")
    keys = [(kind, n) for kind in KINDS for n in POINTS]
    expect_keys(point_draws, keys, "point_draws")
    draws = {key: _draws(point_draws[key], f"point_draws[{key!r}]") for key in keys}
    expect(all(bool((d[:, 1] <= 1).all()) for d in draws.values()),
           "a dice loss above 1: is each draw [BCE, dice], in that order?")
    expect(all(bool((d[:, 0] != d[0, 0]).any()) for d in draws.values()),
           "some ten draws are all equal: draw new points each time (no fixed seed inside the "
           "loop).")
    expect(any(not torch.equal(draws["importance", n], draws["uniform", n]) for n in POINTS),
           "the importance and uniform draws are the same: set importance_sample_ratio.")
    mean = {key: d[:, 0].mean().item() for key, d in draws.items()}
    std = {key: d[:, 0].std().item() for key, d in draws.items()}
    expect(isinstance(importance_raises_bce, bool), "`importance_raises_bce` should be a bool.")
    expect(importance_raises_bce == all(mean["importance", n] > mean["uniform", n]
                                        for n in POINTS),
           "`importance_raises_bce` does not agree with the means of your draws.")
    expect(isinstance(noise_falls_with_points, bool),
           "`noise_falls_with_points` should be a bool.")
    expect(noise_falls_with_points == all(std[kind, 2000] < std[kind, 50] for kind in KINDS),
           "`noise_falls_with_points` does not agree with the spread of your draws.")
    return ("the every-pixel loss and the ten draws of each estimate are measured, and your "
            "conclusions follow from them.")


def _attention_shares() -> tuple[list[float], list[float]]:
    """The exercise, recomputed on the trained Rein + Mask2Former (seed 0 of the current
    world's sweep) and the first 16 source test scenes: per decoder layer, the share of memory
    pixels a query may attend to and the share of queries whose attention is not masked."""
    import torch.nn.functional as F

    from lessons import toyworld as tw
    from lessons.benchmark import checkpoint_path
    from lessons.checkpoints import load_lesson_checkpoint

    test = tw.ToyWorld("synthetic", "test", size=(64, 128), length=16, seed=0)
    images = torch.stack([test[k][0] for k in range(len(test))])             # (16, 3, H, W)
    model, _ = load_lesson_checkpoint(checkpoint_path("rein_m2f", 0))
    model.eval()
    with torch.no_grad():
        preds = model(images)[0]
    sizes = [(64 // s, 128 // s) for s in (32, 16, 8)] * 2
    visible, open_ = [], []
    for layer, size in enumerate(sizes):
        shown = F.interpolate(preds[layer].mask_logits, size=size, mode="bilinear",
                              align_corners=False).sigmoid().flatten(2) >= 0.5   # (B, Q, hw)
        shown = shown | ~shown.any(-1, keepdim=True)       # an empty mask: attends everywhere
        visible.append(shown.float().mean().item())
        open_.append(shown.all(-1).float().mean().item())
    return visible, open_


def _shares(value, what: str) -> list[float]:
    expect(isinstance(value, (list, tuple)) and len(value) == LAYERS,
           f"`{what}` should be a list of {LAYERS} numbers, one per decoder layer.")
    return [expect_number(v, f"`{what}[{i}]`", 0.0, 1.0) for i, v in enumerate(value)]


@exercise("03a", 2,
          visible_share="list of 6 floats: for each decoder layer, the share of the memory's "
                        "pixels a query may attend to (its previous mask at the memory's size, "
                        "sigmoid >= 0.5; an empty mask attends everywhere), over the 16 test "
                        "images and all queries",
          sees_all_share="list of 6 floats: for each decoder layer, the share of (image, query) "
                         "pairs whose attention is not masked at all",
          narrows_with_depth="True or False: at every memory level, is the visible share of "
                             "the second pass (layers 3-5) below that of the first (layers 0-2)?")
def masked_attention(visible_share, sees_all_share, narrows_with_depth):
    visible = _shares(visible_share, "visible_share")
    open_ = _shares(sees_all_share, "sees_all_share")
    expect(all(o <= v + 1e-6 for o, v in zip(open_, visible, strict=True)),
           "a share of queries that see everything above the share of visible pixels: a query "
           "that sees everything counts fully in both.")
    expect(all(v > 0 for v in visible),
           "a layer where no query sees anything: Mask2Former lets a query whose mask is empty "
           "attend everywhere.")
    expect(isinstance(narrows_with_depth, bool), "`narrows_with_depth` should be a bool.")
    expect(narrows_with_depth == all(visible[i + 3] < visible[i] for i in range(3)),
           "`narrows_with_depth` does not agree with your `visible_share` (compare layer i + 3 "
           "with layer i: the same memory level, one pass deeper).")
    ref_visible, ref_open = _attention_shares()
    expect(all(abs(a - b) < 1e-3 for a, b in zip(visible, ref_visible, strict=True)),
           "`visible_share` does not match the trained model: for layer i use prediction i (the "
           "initial one for layer 0) at the size of the memory layer i attends to (strides 32, "
           "16, 8, 32, 16, 8), bilinear, align_corners=False.")
    expect(all(abs(a - b) < 1e-3 for a, b in zip(open_, ref_open, strict=True)),
           "`sees_all_share` does not match the trained model: count the queries whose every "
           "memory pixel is visible, empty masks included.")
    return ("the attention masks of the six layers are measured, and your conclusion follows "
            "from them.")

