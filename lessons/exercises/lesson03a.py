"""Checks of lesson 03a's exercises (Mask2Former): see ``lessons.exercises``."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from lessons.exercises import NotYet, exercise, expect, expect_keys

__all__ = ["points"]

POINTS = (50, 200, 2000)
KINDS = ("importance", "uniform")


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
