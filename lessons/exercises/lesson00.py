"""Checks of lesson 00's exercises (the DGSS problem): see ``lessons.exercises``.

Lesson 00 runs in ToyWorld 2 with the toy benchmark's test sets (200 scenes per domain at 64 x 128,
seed 0); the checks that render a test set do so in that world, whatever the current default.
"""

from __future__ import annotations

import functools

import torch

from lessons.classes import CLASSES
from lessons.exercises import (
    NotYet,
    exercise,
    expect,
    expect_domain_rows,
    expect_keys,
    expect_number,
)

__all__ = ["adabn", "night_failure", "randomisation"]

WORLD, SIZE, SEED, TEST_LEN = "2.0", (64, 128), 0, 200
TARGETS = ("citylike", "dashcam", "streetview", "fog", "night", "rain", "snow", "painted")
DOMAINS = ("synthetic", *TARGETS)
OUTSIDE = ("streetview", "painted")      # the targets whose looks the web world never draws
ROWS = ("trained on synthetic", "trained on web")
K = len(CLASSES)


def _names(value, what: str) -> list[str]:
    """A list, tuple or set of strings, returned as a list."""
    expect(isinstance(value, (list, tuple, set, frozenset)),
           f"`{what}` should be a list of names, not {type(value).__name__}.")
    expect(all(isinstance(v, str) for v in value), f"`{what}` should hold names (strings).")
    return list(value)


@functools.lru_cache(maxsize=4)
def _test_set(domain: str):
    from lessons import toyworld as tw
    return tw.ToyWorld(domain, "test", size=SIZE, length=TEST_LEN, seed=SEED, world=WORLD)


@functools.lru_cache(maxsize=1)
def _night_label_counts() -> tuple[int, ...]:
    """Pixels of each class in the night test labels (255 left out)."""
    counts = torch.zeros(K, dtype=torch.long)
    night = _test_set("night")
    for i in range(len(night)):
        label = torch.as_tensor(night[i][1]).flatten()
        counts += torch.bincount(label[label != 255], minlength=K)[:K]
    return tuple(counts.tolist())


@exercise("00", 1,
          randomisation_results="{'trained on synthetic': {domain: mIoU}, 'trained on web': "
                                "{domain: mIoU}}: evaluate_domains(model, test_sets) of the "
                                "synthetic-trained and the web-trained TinySegNet (fractions, "
                                "all nine domains)",
          improved_targets="list of the target domains (not 'synthetic') on which the "
                           "web-trained model scores higher than the synthetic-trained one",
          outside_gains_less="True or False: do streetview and painted (outside the web world) "
                             "gain less from web training, on average, than the six other "
                             "targets?")
def randomisation(randomisation_results, improved_targets, outside_gains_less):
    rows = expect_domain_rows(randomisation_results, ROWS, DOMAINS, "randomisation_results")
    expect(rows[ROWS[0]] != rows[ROWS[1]],
           "the two rows are identical: did the second model train on ToyWorld('web', ...)?")
    own = rows[ROWS[0]]
    expect(own["synthetic"] == max(own.values()),
           "the 'trained on synthetic' row is not highest on synthetic, its training domain: are "
           "the rows swapped?")
    gain = {d: rows[ROWS[1]][d] - rows[ROWS[0]][d] for d in TARGETS}
    improved = _names(improved_targets, "improved_targets")
    expect(set(improved) <= set(TARGETS),
           f"`improved_targets` should name target domains only: {', '.join(TARGETS)}.")
    expect(set(improved) == {d for d, g in gain.items() if g > 0},
           "`improved_targets` does not list exactly the targets on which your web-trained row "
           "is higher.")
    expect(isinstance(outside_gains_less, bool), "`outside_gains_less` should be a bool.")
    inside = [d for d in TARGETS if d not in OUTSIDE]
    mean_out = sum(gain[d] for d in OUTSIDE) / len(OUTSIDE)
    mean_in = sum(gain[d] for d in inside) / len(inside)
    expect(outside_gains_less == (mean_out < mean_in),
           "`outside_gains_less` does not agree with your table: average the gain (web minus "
           "synthetic) over streetview and painted, and over the six other targets.")
    return "both models are scored on every domain, and your conclusions follow from them."


@exercise("00", 2,
          night_confusion="the 19 x 19 confusion matrix of the synthetic-trained model on "
                          "test_sets['night'] (evaluate(...)['confusion']: rows ground truth, "
                          "columns prediction)",
          collapsed_at_night="list of the class names present in the night labels whose night "
                             "IoU is below 5%",
          road_mistaken_for="the class name, other than 'road', that takes the largest share of "
                            "the night road pixels (from the road row of night_confusion)")
def night_failure(night_confusion, collapsed_at_night, road_mistaken_for):
    try:
        cm = torch.as_tensor(night_confusion).double()
    except (TypeError, ValueError, RuntimeError):
        raise NotYet("`night_confusion` should be a matrix of pixel counts (a tensor).") from None
    expect(tuple(cm.shape) == (K, K),
           f"`night_confusion` should be {K} x {K} (one row and column per class), not "
           f"{' x '.join(map(str, cm.shape))}.")
    expect(bool(torch.isfinite(cm).all()) and bool((cm >= 0).all()),
           "`night_confusion` should hold pixel counts (finite, non-negative).")
    expect(tuple(int(v) for v in cm.sum(1).round().tolist()) == _night_label_counts(),
           "the rows of `night_confusion` do not count the ground-truth pixels of the 200 night "
           "test scenes: evaluate on test_sets['night'] and keep evaluate's orientation (rows: "
           "ground truth).")
    diag = cm.diagonal()
    union = cm.sum(0) + cm.sum(1) - diag
    present = cm.sum(1) > 0
    iou = diag / union.clamp(min=1)
    collapsed = _names(collapsed_at_night, "collapsed_at_night")
    unknown = sorted(set(collapsed) - set(CLASSES))
    expect(not unknown, f"`collapsed_at_night` holds names that are not classes (CLASSES): "
                        f"{', '.join(unknown)}.")
    want = {CLASSES[k] for k in range(K) if present[k] and iou[k] < 0.05}
    expect(set(collapsed) == want,
           "`collapsed_at_night` is not the set of classes present at night whose IoU (from your "
           "confusion matrix: diagonal / (row + column - diagonal)) is below 5%.")
    expect(road_mistaken_for in CLASSES, "`road_mistaken_for` should be a class name of CLASSES.")
    expect(road_mistaken_for != "road", "`road_mistaken_for` should be a class other than road.")
    row = cm[CLASSES.index("road")].clone()
    row[CLASSES.index("road")] = -1
    expect(row[CLASSES.index(road_mistaken_for)] == row.max(),
           "`road_mistaken_for` does not take the largest share of the road row of your "
           "confusion matrix (road itself left out).")
    return ("the confusion matrix counts the night test pixels, and the collapsed classes and "
            "road's confusion are read off it.")


@exercise("00", 3,
          adabn_model="a copy of the synthetic-trained model whose BatchNorm running statistics "
                      "were recomputed on unlabelled night images (train mode, no gradient), "
                      "returned in eval mode",
          adabn_scores="{'source': mIoU of the original model on test_sets['synthetic'], "
                       "'night before': the original model on test_sets['night'], 'night after': "
                       "adabn_model on test_sets['night']} (evaluate(...)['mean_iou'], fractions)",
          gap_recovered="the share of the night gap that AdaBN closes: (night after - night "
                        "before) / (source - night before)",
          still_generalisation="True or False: is this still domain generalization?")
def adabn(adabn_model, adabn_scores, gap_recovered, still_generalisation):
    keys = ("source", "night before", "night after")
    expect_keys(adabn_scores, keys, "adabn_scores")
    s = {k: expect_number(adabn_scores[k], f"`adabn_scores[{k!r}]`", 0.0, 1.0) for k in keys}
    expect(s["night after"] != s["night before"],
           "the night mIoU did not change: were the BatchNorm statistics recomputed (train mode, "
           "running statistics reset) before evaluating?")
    expect(s["source"] > s["night before"],
           "'source' should be the original model's mIoU on the synthetic test set, where it was "
           "trained.")
    expect(isinstance(adabn_model, torch.nn.Module), "`adabn_model` should be the model (a "
                                                     "torch.nn.Module).")
    norms = [m for m in adabn_model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    expect(norms, "`adabn_model` has no BatchNorm2d layer: it should be a copy of TinySegNet.")
    from lessons.train import evaluate
    after = evaluate(adabn_model, _test_set("night"))["mean_iou"]
    expect(abs(after - s["night after"]) < 1e-4,
           "`adabn_scores['night after']` is not what `adabn_model` scores on the 200 night test "
           "scenes (test_sets['night']).")
    g = expect_number(gap_recovered, "`gap_recovered`", -10.0, 10.0)
    share = (s["night after"] - s["night before"]) / (s["source"] - s["night before"])
    expect(abs(g - share) < 1e-3,
           "`gap_recovered` is not (night after - night before) / (source - night before) of your "
           "scores (a fraction, not a percentage).")
    expect(isinstance(still_generalisation, bool), "`still_generalisation` should be a bool.")
    expect(not still_generalisation,
           "reconsider `still_generalisation`: which images did the re-estimation see, and which "
           "may a domain-generalization method see before it is tested?")
    return ("your AdaBN model scores what you report on the night test set, and the share of the "
            "gap and the conclusion follow.")
