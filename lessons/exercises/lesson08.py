"""Checks of lesson 08's exercises (the toy benchmark): see ``lessons.exercises``.

The checks recompute what they compare from the committed toy sweep (``load_results``) and the
papers' tables, as the exercises do."""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy.stats import kendalltau, spearmanr

from lessons import toyworld as tw
from lessons.benchmark import load_results, summary
from lessons.classes import CLASSES
from lessons.exercises import exercise, expect, expect_keys, expect_number
from lessons.papers import get_table

__all__ = ["per_class", "rank_agreement", "seeds", "separating_target"]

PAIRED = ("frozen", "full", "rein_m2f", "tqdm", "querydiff", "mfuser")
MAIN = ["scratch", "scratch_vit", "frozen", "full", "rein", "rein_m2f", "tqdm", "catseg",
        "querydiff", "querydiff_no_dcl", "mfuser"]                  # the solutions' MAIN
FUSION_TABLE = "mfuser_fusion_choice"


def _toy_mean(method: str) -> tuple[float, float]:
    """(mean, sample std) over seeds of the method's targets' mean, in points."""
    mu, sd, _ = summary(load_results(), [method])[method]["targets' mean"]
    return mu, sd


def _paper_mean(table_id: str, method: str, backbone: str) -> float:
    return next(r for r in get_table(table_id).rows
                if (r.method, r.backbone) == (method, backbone)).values["mean"]


def _rho(paper: list[float], toy: list[float]) -> float:
    return float(spearmanr(paper, toy).statistic)


@exercise("08", 1,
          toy_vs_paper="{method: {'paper': targets' mean, 'toy': targets' mean}} for 'frozen', "
                       "'full', 'rein_m2f', 'tqdm', 'querydiff', 'mfuser' (mIoU %, the paper "
                       "rows of section 6, the toy means from summary)",
          rank_rho="Spearman's rho between the paper and the toy column",
          rank_rho_simple_rein="the same rho with Rein's simple head ('rein') standing for "
                               "Rein: its toy mean in place of rein_m2f's")
def rank_agreement(toy_vs_paper, rank_rho, rank_rho_simple_rein):
    expect_keys(toy_vs_paper, PAIRED, "toy_vs_paper")
    paper, toy = [], []
    for m in PAIRED:
        expect_keys(toy_vs_paper[m], ("paper", "toy"), f"toy_vs_paper[{m!r}]")
        paper.append(expect_number(toy_vs_paper[m]["paper"], f"toy_vs_paper[{m!r}]['paper']",
                                   0, 100))
        toy.append(expect_number(toy_vs_paper[m]["toy"], f"toy_vs_paper[{m!r}]['toy']", 0, 100))
        expect(abs(toy[-1] - _toy_mean(m)[0]) < 0.06,
               f"`toy_vs_paper[{m!r}]['toy']` is not the sweep's targets' mean (in %) for {m}.")
    expect(abs(expect_number(rank_rho, "`rank_rho`", -1, 1) - _rho(paper, toy)) < 0.01,
           "`rank_rho` is not Spearman's rho of your two columns.")
    rein = _toy_mean("rein")[0]
    simple = [rein if m == "rein_m2f" else t for m, t in zip(PAIRED, toy, strict=True)]
    expect(abs(expect_number(rank_rho_simple_rein, "`rank_rho_simple_rein`", -1, 1)
               - _rho(paper, simple)) < 0.01,
           "`rank_rho_simple_rein` is not the rho you get with 'rein''s toy mean in place of "
           "'rein_m2f''s.")
    return ("the six methods' toy means are the sweep's, and both rank correlations follow from "
            "your table.")


@exercise("08", 2,
          mfuser_seed_spread="the sample standard deviation over seeds of MFuser's targets' mean "
                             "(points, from summary)",
          toy_fusion_gain="MFuser minus 'mfuser_concat' (plain concatenation), toy targets' "
                          "means, in points",
          paper_fusion_gain="the paper's MVFuser minus 'no fine-tuning (concat)' (table "
                            "mfuser_fusion_choice, DINOv2 + EVA02), in points",
          seeds_needed="{'toy': n, 'paper': n}: seeds per method for which each difference is "
                       "larger than twice its standard error, with MFuser's spread")
def seeds(mfuser_seed_spread, toy_fusion_gain, paper_fusion_gain, seeds_needed):
    sigma = expect_number(mfuser_seed_spread, "`mfuser_seed_spread`", 0)
    expect(abs(sigma - _toy_mean("mfuser")[1]) < 0.01,
           "`mfuser_seed_spread` is not MFuser's spread over seeds (sample std, as summary "
           "gives it).")
    toy_gain = expect_number(toy_fusion_gain, "`toy_fusion_gain`")
    expect(abs(toy_gain - (_toy_mean("mfuser")[0] - _toy_mean("mfuser_concat")[0])) < 0.01,
           "`toy_fusion_gain` is not MFuser's toy mean minus mfuser_concat's.")
    paper_gain = expect_number(paper_fusion_gain, "`paper_fusion_gain`")
    want = (_paper_mean(FUSION_TABLE, "MVFuser", "DINOv2 + EVA02")
            - _paper_mean(FUSION_TABLE, "no fine-tuning (concat)", "DINOv2 + EVA02"))
    expect(abs(paper_gain - want) < 0.01, "`paper_fusion_gain` is not the paper's MVFuser minus "
                                          "its plain concatenation.")
    expect_keys(seeds_needed, ("toy", "paper"), "seeds_needed")
    for name, gain in (("toy", toy_gain), ("paper", paper_gain)):
        n = expect_number(seeds_needed[name], f"seeds_needed[{name!r}]", 1)
        bound = 8 * sigma**2 / gain**2          # 2 sqrt(2) sigma / sqrt(n) < gain
        expect(n == int(n) and abs(n - max(1, math.ceil(bound))) <= 1,
               f"`seeds_needed[{name!r}]` is not the number of seeds that makes the difference "
               "exceed twice the standard error of a difference of two means.")
    return ("the spread and both differences are right, and so are the seeds each difference "
            "needs.")


def _per_domain() -> dict[str, dict[str, float]]:
    s = summary(load_results(), MAIN)
    return {m: {d: v[0] for d, v in row.items()} for m, row in s.items()}


def _choice(name: str, value, scores: dict[str, float], pick) -> None:
    expect(value in scores, f"`{name}` should be one of the target domains.")
    expect(scores[value] == pick(scores.values()), f"`{name}` does not agree with your spreads.")


@exercise("08", 3,
          target_spread="{target domain: sample standard deviation of the MAIN methods' mean "
                        "mIoU (%) on it} for every target of tw.TARGET_DOMAINS",
          most_separating="the target with the largest spread",
          least_separating="the target with the smallest spread",
          target_taus="{target domain: Kendall's tau between the MAIN methods' means on it and "
                      "their targets' mean}",
          same_order_everywhere="True or False: do all targets order the methods as the "
                                "targets' mean does?")
def separating_target(target_spread, most_separating, least_separating, target_taus,
                      same_order_everywhere):
    targets = list(tw.TARGET_DOMAINS)
    expect_keys(target_spread, targets, "target_spread")
    expect_keys(target_taus, targets, "target_taus")
    table = _per_domain()
    spread, taus = {}, {}
    for d in targets:
        spread[d] = expect_number(target_spread[d], f"target_spread[{d!r}]", 0, 100)
        column = [row[d] for row in table.values()]
        expect(abs(spread[d] - float(np.std(column, ddof=1))) < 0.06,
               f"`target_spread[{d!r}]` is not the sample std of the MAIN methods' means there.")
        taus[d] = expect_number(target_taus[d], f"target_taus[{d!r}]", -1, 1)
        mean = [row["targets' mean"] for row in table.values()]
        expect(abs(taus[d] - kendalltau(column, mean).statistic) < 0.01,
               f"`target_taus[{d!r}]` is not Kendall's tau of that target against the mean.")
    _choice("most_separating", most_separating, spread, max)
    _choice("least_separating", least_separating, spread, min)
    expect(isinstance(same_order_everywhere, bool), "`same_order_everywhere` should be a bool.")
    expect(same_order_everywhere == all(t == 1 for t in taus.values()),
           "`same_order_everywhere` does not agree with your taus.")
    return ("the spreads and taus of every target are right, and your conclusions follow from "
            "them.")


def _class_means(method: str) -> np.ndarray:
    """Per class, the mean IoU (%) over the method's seeds and the targets (None skipped)."""
    runs = [r for r in load_results()["runs"].values() if r["method"] == method]
    vals = np.array([[np.nan if v is None else v for v in r["class_iou"][d]]
                     for r in runs for d in tw.TARGET_DOMAINS], dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)      # a class absent everywhere: NaN
        return 100 * np.nanmean(vals, axis=0)


@exercise("08", 4,
          class_gain="{class name: MFuser's IoU minus the scratch TinySegNet's, in %, averaged "
                     "over seeds and targets} for every class present in the targets (classes "
                     "with no IoU, None in class_iou, left out)",
          gains_most="the class with the largest gain",
          gains_least="the class with the smallest gain")
def per_class(class_gain, gains_most, gains_least):
    gain = _class_means("mfuser") - _class_means("scratch")
    present = {c: g for c, g in zip(CLASSES, gain, strict=True) if np.isfinite(g)}
    expect_keys(class_gain, present, "class_gain")
    theirs = {}
    for c, g in present.items():
        theirs[c] = expect_number(class_gain[c], f"class_gain[{c!r}]", -100, 100)
        expect(abs(theirs[c] - g) < 0.06, f"`class_gain[{c!r}]` is not MFuser's mean IoU minus "
                                          "scratch's over seeds and targets.")
    for name, value, pick in (("gains_most", gains_most, max), ("gains_least", gains_least, min)):
        expect(value in theirs, f"`{name}` should be one of the classes of `class_gain`.")
        expect(theirs[value] == pick(theirs.values()), f"`{name}` does not agree with your "
                                                       "gains.")
    return "every class's gain is right, and the classes that gain most and least are read off it."
