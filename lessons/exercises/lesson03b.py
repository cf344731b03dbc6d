"""Checks of lesson 03b's exercises (text queries): see ``lessons.exercises``.

The sweep's numbers are read back from ``lessons.benchmark.load_results()`` (seed 0, mIoU in
percent); a value read off the printed table, rounded to one decimal, passes.
"""

from __future__ import annotations

import itertools

from lessons.classes import CLASSES
from lessons.exercises import exercise, expect, expect_keys, expect_number

__all__ = ["hungarian_text_queries", "temperature"]

K = len(CLASSES)
TOLERANCE = 0.15                   # mIoU points: one-decimal rounding of two table cells
TAUS = (0.01, 0.07, 0.5)


def _targets_mean(method: str) -> float:
    """Seed 0 of the sweep: ``method``'s mIoU (%) averaged over the targets."""
    from lessons.benchmark import load_results
    miou = load_results()["runs"][f"{method}/seed0"]["miou"]
    targets = [v for d, v in miou.items() if d != "synthetic"]
    return 100 * sum(targets) / len(targets)


@exercise("03b", 1,
          hungarian_pairs="list of (query, class) pairs: the Hungarian matches of the briefly "
                          "trained build_toy_tqdm(matcher='hungarian') on the 16 test images "
                          "(matched(model))",
          diagonal_share="{'initialisation': share, 'trained': share}: the fraction of the "
                         "matched pairs in which query k gets class k, before and after training",
          query_k_is_class_k="True or False: after training, does query k get class k in most "
                             "of the matches?",
          learnable_minus_tqdm="the sweep's tqdm_learnable minus tqdm on the targets' mean, seed "
                               "0, in mIoU points")
def hungarian_text_queries(hungarian_pairs, diagonal_share, query_k_is_class_k,
                           learnable_minus_tqdm):
    expect(isinstance(hungarian_pairs, (list, tuple)),
           "`hungarian_pairs` should be a list of (query, class) pairs.")
    pairs = []
    for p in hungarian_pairs:
        expect(isinstance(p, (list, tuple)) and len(p) == 2,
               "each entry of `hungarian_pairs` should be a (query, class) pair.")
        q, k = (int(v) for v in p)
        expect(0 <= q < K and 0 <= k < K,
               f"a pair of `hungarian_pairs` is outside 0..{K - 1} (the 19 text queries and "
               f"classes).")
        pairs.append((q, k))
    expect(len(pairs) >= 16, "`hungarian_pairs` should hold every match of the 16 test images "
                             "(each has several classes).")
    expect_keys(diagonal_share, ("initialisation", "trained"), "diagonal_share")
    share = {k: expect_number(diagonal_share[k], f"`diagonal_share[{k!r}]`", 0.0, 1.0)
             for k in ("initialisation", "trained")}
    mine = sum(q == k for q, k in pairs) / len(pairs)
    expect(abs(share["trained"] - mine) < 1e-6,
           "`diagonal_share['trained']` is not the fraction of your `hungarian_pairs` with query "
           "k = class k.")
    expect(isinstance(query_k_is_class_k, bool), "`query_k_is_class_k` should be a bool.")
    expect(query_k_is_class_k == (share["trained"] > 0.5),
           "`query_k_is_class_k` does not agree with your `diagonal_share['trained']`.")
    diff = expect_number(learnable_minus_tqdm, "`learnable_minus_tqdm`", -100.0, 100.0)
    expect(abs(diff - (_targets_mean("tqdm_learnable") - _targets_mean("tqdm"))) < TOLERANCE,
           "`learnable_minus_tqdm` does not match the sweep: tqdm_learnable's targets' mean minus "
           "tqdm's, seed 0, in mIoU points.")
    return ("the matches are counted before and after training, your conclusion follows from "
            "them, and the sweep's runs are compared.")


@exercise("03b", 2,
          temperature_rows="{tau: {'loss': pixel-text loss, 'confidence': mean max softmax "
                           "probability over the labelled pixels, 'accuracy': pixel accuracy}} "
                           "for tau in 0.01, 0.07, 0.5, on the trained tqdm's scores of the 16 "
                           "source test images",
          lowest_loss_tau="the tau (0.01, 0.07 or 0.5) with the lowest pixel-text loss")
def temperature(temperature_rows, lowest_loss_tau):
    expect_keys(temperature_rows, TAUS, "temperature_rows")
    fields = ("loss", "confidence", "accuracy")
    rows = {}
    for tau in TAUS:
        expect_keys(temperature_rows[tau], fields, f"temperature_rows[{tau}]")
        r = temperature_rows[tau]
        rows[tau] = {"loss": expect_number(r["loss"], f"the loss at tau = {tau}", 0.0),
                     "confidence": expect_number(r["confidence"],
                                                 f"the confidence at tau = {tau}", 0.0, 1.0),
                     "accuracy": expect_number(r["accuracy"],
                                               f"the accuracy at tau = {tau}", 0.0, 1.0)}
        expect(rows[tau]["confidence"] >= 1 / K - 1e-6,
               f"the confidence at tau = {tau} is below 1/{K}: the largest of {K} probabilities "
               f"cannot be.")
    expect(max(r["accuracy"] for r in rows.values()) - min(r["accuracy"] for r in rows.values())
           < 1e-6,
           "the accuracy differs between the temperatures: dividing a pixel's scores by tau "
           "keeps their order, so compute every row from the same scores and pixels.")
    conf = [rows[tau]["confidence"] for tau in TAUS]
    expect(all(a > b for a, b in itertools.pairwise(conf))
           or (len(set(conf)) == 1 and conf[0] == 1),
           "your confidences are not ordered as one set of scores divided by each tau orders "
           "them: compute every row from the same scores and pixels.")
    expect(len({r["loss"] for r in rows.values()}) == 3,
           "the loss is the same at two temperatures: pass tau to pixel_text_loss.")
    expect(lowest_loss_tau in TAUS, f"`lowest_loss_tau` should be one of {TAUS}.")
    expect(rows[lowest_loss_tau]["loss"] == min(r["loss"] for r in rows.values()),
           "`lowest_loss_tau` does not have the lowest loss in your `temperature_rows`.")
    return ("the three temperatures are measured on the same scores, and the lowest loss is read "
            "off them.")
