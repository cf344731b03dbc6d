"""Checks of lesson 02's exercises (Rein): see ``lessons.exercises``.

The sweep's numbers are read back from ``lessons.benchmark.load_results()`` (seed 0, mIoU in
percent, as ``markdown_table`` prints them); a value read off the printed table, rounded to one
decimal, passes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import torch

from lessons.exercises import exercise, expect, expect_keys, expect_number

__all__ = ["full_baseline", "null_token", "paper_init", "token_count"]

WORLD = "2.0"                      # lesson 02 runs in ToyWorld 2 with its checkpoints
TOLERANCE = 0.15                   # mIoU points: one-decimal rounding of two table cells
TOKEN_LENGTHS = (5, 20, 80)
BLOCKS = tuple(range(6))           # the toy VFM's blocks


def _sweep(method: str, domain: str = "targets' mean") -> float:
    """Seed 0 of the sweep: ``method``'s mIoU (%) on ``domain`` or the mean over the targets."""
    from lessons.benchmark import load_results
    miou = load_results()["runs"][f"{method}/seed0"]["miou"]
    if domain != "targets' mean":
        return 100 * miou[domain]
    targets = [v for d, v in miou.items() if d != "synthetic"]
    return 100 * sum(targets) / len(targets)


def _curve(values, what: str) -> list[float]:
    expect(isinstance(values, Sequence) or hasattr(values, "tolist"),
           f"`{what}` should be a list of losses (History.loss).")
    values = values.tolist() if hasattr(values, "tolist") else list(values)
    expect(len(values) >= 10, f"`{what}` should hold one loss per step, ten steps or more.")
    return [expect_number(v, f"a loss in `{what}`", 0.0) for v in values]


@exercise("02", 1,
          init_gap="{'official': float, 'zero_init': float}: at initialisation, the largest "
                   "|feature - frozen feature| over some images and every feature map of "
                   "model.features(images), for build_toy_segmentor('rein') and for "
                   "build_toy_segmentor('rein', zero_init=True) against "
                   "build_toy_segmentor('frozen')",
          loss_curves="{'official': losses, 'zero_init': losses}: train(...).loss of the two "
                      "forms, trained the same number of steps on the same data",
          sweep_zero_init_gap="the sweep's rein_zero_init minus rein on the targets' mean, seed "
                              "0, in mIoU points")
def paper_init(init_gap, loss_curves, sweep_zero_init_gap):
    expect_keys(init_gap, ("official", "zero_init"), "init_gap")
    official = expect_number(init_gap["official"], "`init_gap['official']`", 0.0)
    zero = expect_number(init_gap["zero_init"], "`init_gap['zero_init']`", 0.0)
    expect(zero < 1e-6,
           "`init_gap['zero_init']` is not what a Rein with W_f and every bias at zero gives: "
           "compare its features with the frozen model's on the same images.")
    expect(0 < official < 0.1,
           "`init_gap['official']` is not what the official form gives (the frozen features plus "
           "a random update scaled by 1e-3): build it with the default arguments and compare on "
           "the same images.")
    expect_keys(loss_curves, ("official", "zero_init"), "loss_curves")
    curves = {k: _curve(loss_curves[k], f"loss_curves[{k!r}]") for k in ("official", "zero_init")}
    expect(len(curves["official"]) == len(curves["zero_init"]),
           "train both forms for the same number of steps.")
    expect(curves["official"] != curves["zero_init"],
           "the two loss curves are identical: did the second model get zero_init=True?")
    for k, c in curves.items():
        expect(sum(c[-5:]) < sum(c[:5]),
               f"`loss_curves[{k!r}]` does not fall: is the model trained (learning rate, steps)?")
    gap = expect_number(sweep_zero_init_gap, "`sweep_zero_init_gap`", -100.0, 100.0)
    expect(abs(gap - (_sweep("rein_zero_init") - _sweep("rein"))) < TOLERANCE,
           "`sweep_zero_init_gap` does not match the sweep: rein_zero_init's targets' mean minus "
           "rein's, seed 0, in mIoU points (seed0 or markdown_table).")
    return ("both initialisations are measured against the frozen model, trained alike, and "
            "compared on the sweep.")


def _reference(f, T, W_T, W_f, scale, keep_token0: bool):
    S = torch.softmax(f @ T.T / math.sqrt(f.shape[-1]), dim=-1)
    dfbar = S @ W_T(T) if keep_token0 else S[..., 1:] @ W_T(T[1:])
    return f + scale * W_f(dfbar + f)


@exercise("02", 2,
          rein_layer_kept="a function with rein_layer's arguments (f, T, W_T, W_f, scale) and "
                          "return value (f + scale * delta, S) that keeps token 0 in the update: "
                          "S @ W_T(T)",
          sink_updates="{block: {'token 0 weight': float, 'with sink': float, 'token 0 kept': "
                       "float}} for the trained Rein's blocks 0-5: the patches' mean weight on "
                       "token 0 and the mean |update| = |output - f| per patch of rein_layer and "
                       "of rein_layer_kept (feats[i], reins.tokens(i), reins.mlp_token2feat, "
                       "reins.mlp_delta_f, reins.scale)",
          top_token0_weight="the largest weight any patch puts on token 0, over all blocks",
          any_patch_parks_on_sink="True or False: does any patch put more than half of its "
                                  "attention on token 0?")
def null_token(rein_layer_kept, sink_updates, top_token0_weight, any_patch_parks_on_sink):
    expect(callable(rein_layer_kept), "`rein_layer_kept` should be a function.")
    g = torch.Generator().manual_seed(0)
    f, T = torch.randn(2, 12, 16, generator=g), torch.randn(6, 16, generator=g)
    W_T, W_f = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
    with torch.no_grad():
        for p in [*W_T.parameters(), *W_f.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g) / 4)
        out = rein_layer_kept(f, T, W_T, W_f, 0.5)
        expect(isinstance(out, (tuple, list)) and len(out) == 2,
               "`rein_layer_kept` should return (output, S), as rein_layer does.")
        out = torch.as_tensor(out[0])
        expect(tuple(out.shape) == tuple(f.shape),
               "`rein_layer_kept`'s output should have the shape of f (B, n, c).")
        expect(not torch.allclose(out, _reference(f, T, W_T, W_f, 0.5, False), atol=1e-5),
               "`rein_layer_kept` gives what rein_layer gives: it still drops token 0.")
        expect(torch.allclose(out, _reference(f, T, W_T, W_f, 0.5, True), atol=1e-5),
               "`rein_layer_kept` does not compute f + scale * W_f(S @ W_T(T) + f) on random "
               "inputs.")
    expect(isinstance(sink_updates, Mapping), "`sink_updates` should be a dict.")
    expect(set(sink_updates) == set(BLOCKS),
           f"`sink_updates` should have one entry per block, keys {list(BLOCKS)}.")
    fields = ("token 0 weight", "with sink", "token 0 kept")
    rows = {}
    for i in BLOCKS:
        expect_keys(sink_updates[i], fields, f"sink_updates[{i}]")
        rows[i] = {k: expect_number(sink_updates[i][k], f"`sink_updates[{i}][{k!r}]`", 0.0,
                                    1.0 if k == "token 0 weight" else math.inf) for k in fields}
    expect(any(r["with sink"] != r["token 0 kept"] for r in rows.values()),
           "'with sink' and 'token 0 kept' are equal in every block: measure each with its own "
           "function.")
    expect(all(r["with sink"] > 0 for r in rows.values()),
           "an update of size 0: is the trained Rein's learned scale passed to rein_layer?")
    top = expect_number(top_token0_weight, "`top_token0_weight`", 0.0, 1.0)
    expect(top >= max(r["token 0 weight"] for r in rows.values()),
           "`top_token0_weight` is below a block's mean weight on token 0 in `sink_updates`: "
           "take the largest over every patch of every block.")
    expect(isinstance(any_patch_parks_on_sink, bool), "`any_patch_parks_on_sink` should be a bool.")
    expect(any_patch_parks_on_sink == (top > 0.5),
           "`any_patch_parks_on_sink` does not agree with your `top_token0_weight`.")
    return ("your copy of rein_layer keeps token 0, and the trained Rein's updates and weights on "
            "token 0 are measured in every block.")


@functools.lru_cache(maxsize=1)
def _rein_parameters() -> dict[int, int]:
    from lessons import toyworld as tw
    from lessons.segmentor import build_toy_segmentor
    from lessons.utils import count_parameters
    with tw.in_world(WORLD):
        return {m: count_parameters(build_toy_segmentor("rein", token_length=m,
                                                        pretrained=False).reins)
                for m in TOKEN_LENGTHS}


@exercise("02", 3,
          rein_parameters="{5: int, 20: int, 80: int}: the trainable parameters of the Rein "
                          "module (build_toy_segmentor('rein', token_length=m).reins) per token "
                          "length m",
          m5_minus_m20="the sweep's rein_m5 minus rein on the targets' mean, seed 0, in mIoU "
                       "points",
          token_count_matters="True or False: does going from 20 tokens to 5 change the sweep's "
                              "targets' mean by more than one mIoU point?")
def token_count(rein_parameters, m5_minus_m20, token_count_matters):
    expect_keys(rein_parameters, TOKEN_LENGTHS, "rein_parameters")
    counts = {m: expect_number(rein_parameters[m], f"`rein_parameters[{m}]`", 1.0)
              for m in TOKEN_LENGTHS}
    expect(len(set(counts.values())) == 3,
           "the three counts are equal: was each Rein built with its own token_length?")
    want = _rein_parameters()
    wrong = [m for m in TOKEN_LENGTHS if counts[m] != want[m]]
    expect(not wrong, f"`rein_parameters` is off for m = {', '.join(map(str, wrong))}: count the "
                      "trainable parameters of the `.reins` module only (count_parameters).")
    diff = expect_number(m5_minus_m20, "`m5_minus_m20`", -100.0, 100.0)
    expect(abs(diff - (_sweep("rein_m5") - _sweep("rein"))) < TOLERANCE,
           "`m5_minus_m20` does not match the sweep: rein_m5's targets' mean minus rein's, seed "
           "0, in mIoU points.")
    expect(isinstance(token_count_matters, bool), "`token_count_matters` should be a bool.")
    expect(token_count_matters == (abs(diff) > 1.0),
           "`token_count_matters` does not agree with your `m5_minus_m20`.")
    return "the parameter counts are right, and the 5-token run is compared with the sweep's."


@exercise("02", 4,
          full_scores="{'rein': row, 'full': row, 'full_lr_0.1': row}, each row {'synthetic': "
                      "mIoU, \"targets' mean\": mIoU} from the sweep's seed-0 runs, in % (as "
                      "markdown_table prints them)",
          better_full_form="'full' or 'full_lr_0.1': the Full baseline whose targets' mean comes "
                           "closer to Rein's (the higher one)")
def full_baseline(full_scores, better_full_form):
    methods, columns = ("rein", "full", "full_lr_0.1"), ("synthetic", "targets' mean")
    expect_keys(full_scores, methods, "full_scores")
    rows = {}
    for m in methods:
        expect_keys(full_scores[m], columns, f"full_scores[{m!r}]")
        rows[m] = {c: expect_number(full_scores[m][c], f"`full_scores[{m!r}][{c!r}]`", 0.0, 100.0)
                   for c in columns}
        expect(all(rows[m][c] > 1 for c in columns),
               f"`full_scores[{m!r}]` looks like fractions: give mIoU in %.")
        off = [c for c in columns if abs(rows[m][c] - _sweep(m, c)) >= TOLERANCE]
        expect(not off, f"`full_scores[{m!r}]` does not match the sweep's seed-0 run of {m} "
                        f"({', '.join(off)}).")
    expect(better_full_form in ("full", "full_lr_0.1"),
           "`better_full_form` should be 'full' or 'full_lr_0.1'.")
    other = "full" if better_full_form == "full_lr_0.1" else "full_lr_0.1"
    expect(rows[better_full_form]["targets' mean"] > rows[other]["targets' mean"],
           "`better_full_form` does not have the higher targets' mean in your `full_scores`.")
    return "the three runs are read back right, and the Full form you name follows from them."
