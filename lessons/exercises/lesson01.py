"""Checks of lesson 01's exercises (foundation models): see ``lessons.exercises``."""

from __future__ import annotations

from lessons.exercises import exercise, expect, expect_domain_rows

__all__ = ["block", "prompts", "vlm_invariance"]

DOMAINS = ("synthetic", "citylike", "fog", "night")           # the solutions' test_sets
SHOWN = ("synthetic", "citylike", "dashcam", "fog", "night", "painted")   # exercise 2's views
TEMPLATES = ("A photo of a {} in the scene", "{}", "a photo of a {}")


def _off_source_mean(row: dict[str, float]) -> float:
    targets = [v for d, v in row.items() if d != "synthetic"]
    return sum(targets) / len(targets)


@exercise("01", 1,
          block_results="{'block 2': {domain: mIoU}, 'last block': {domain: mIoU}}, each from "
                        "evaluate_domains(probe, test_sets)",
          earlier_more_invariant="True or False: does block 2 lose less from the source to the "
                                 "targets than the last block?")
def block(block_results, earlier_more_invariant):
    rows = expect_domain_rows(block_results, ("block 2", "last block"), DOMAINS, "block_results")
    expect(rows["block 2"] != rows["last block"],
           "the two rows are identical: did both probes read the same layer (LinearProbe's "
           "`layer`)?")
    expect(isinstance(earlier_more_invariant, bool), "`earlier_more_invariant` should be a bool.")
    drop = {k: r["synthetic"] - _off_source_mean(r) for k, r in rows.items()}
    expect(earlier_more_invariant == (drop["block 2"] < drop["last block"]),
           "`earlier_more_invariant` does not agree with your table: compare each row's source "
           "mIoU minus its targets' mean.")
    return "both probes are scored on every domain, and your conclusion follows from them."


@exercise("01", 2,
          vlm_accuracy="{'raw tokens': {domain: %}, 'MaskCLIP embeddings': {domain: %}}, each "
                       "from nn_label_accuracy(...)",
          maskclip_more_invariant="True or False: are the MaskCLIP embeddings' accuracies off "
                                  "the source higher than the raw tokens'?")
def vlm_invariance(vlm_accuracy, maskclip_more_invariant):
    rows = expect_domain_rows(vlm_accuracy, ("raw tokens", "MaskCLIP embeddings"), SHOWN,
                              "vlm_accuracy", high=100)
    expect(rows["raw tokens"] != rows["MaskCLIP embeddings"],
           "the two rows are identical: the second should use zero_shot.dense as the features.")
    expect(isinstance(maskclip_more_invariant, bool),
           "`maskclip_more_invariant` should be a bool.")
    higher = _off_source_mean(rows["MaskCLIP embeddings"]) > _off_source_mean(rows["raw tokens"])
    expect(maskclip_more_invariant == higher,
           "`maskclip_more_invariant` does not agree with your numbers: average each row over "
           "the domains other than synthetic.")
    return "both feature kinds are measured on every view, and your conclusion follows from them."


@exercise("01", 3,
          prompt_results="{template: {domain: mIoU}} for the three templates of the exercise, "
                         "on two domains (evaluate_domains)",
          best_template="the template with the highest mIoU averaged over your two domains")
def prompts(prompt_results, best_template):
    expect(isinstance(prompt_results, dict), "`prompt_results` should be a dict.")
    domains = list(next(iter(prompt_results.values()), {})) if prompt_results else []
    expect(len(domains) >= 2, "score each template on (at least) two domains.")
    rows = expect_domain_rows(prompt_results, TEMPLATES, domains, "prompt_results")
    expect(len({tuple(r.values()) for r in rows.values()}) > 1,
           "every template scores the same: did each MaskCLIPSegmenter get its own `template`?")
    means = {t: sum(r.values()) / len(r) for t, r in rows.items()}
    expect(best_template in TEMPLATES, f"`best_template` should be one of {TEMPLATES}.")
    expect(means[best_template] == max(means.values()),
           "`best_template` is not the one with the highest mean in your table.")
    return "the three templates are scored on two domains, and the best one is read off them."
