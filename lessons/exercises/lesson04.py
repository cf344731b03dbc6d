"""Checks of lesson 04's exercises (CAT-Seg): see ``lessons.exercises``.

The solutions score the trained CAT-Seg with the setup's ``miou(model)``: mIoU in percent, rounded
to one decimal, on the source and two adverse targets.
"""

from __future__ import annotations

from collections.abc import Mapping

from lessons.exercises import exercise, expect, expect_domain_rows, expect_keys, expect_number

__all__ = ["aggregations", "pooling", "unseen_name"]

DOMAINS = ("synthetic", "fog", "night")
ABLATIONS = ("CAT-Seg", "without spatial aggregation", "without class aggregation",
             "raw cost argmax")
PARTS = {"spatial": "without spatial aggregation", "class": "without class aggregation"}
NAMES = ("bus", "coach", "school bus", "vehicle", "truck")


def _mean(row: Mapping[str, float]) -> float:
    return sum(row.values()) / len(row)


@exercise("04", 1,
          ablation_scores="{'CAT-Seg': row, 'without spatial aggregation': row, 'without class "
                          "aggregation': row, 'raw cost argmax': row}, each row miou(...) of "
                          "that model ({domain: mIoU %} on synthetic, fog and night); the raw "
                          "cost is MaskCLIPSegmenter(model.encoder)",
          costlier_aggregation="'spatial' or 'class': the aggregation whose skipping lowers the "
                               "mIoU averaged over the three domains more",
          largest_drop_domain="the domain on which skipping that aggregation loses the most "
                              "mIoU points against the full CAT-Seg")
def aggregations(ablation_scores, costlier_aggregation, largest_drop_domain):
    rows = expect_domain_rows(ablation_scores, ABLATIONS, DOMAINS, "ablation_scores", high=100)
    for name in ABLATIONS[1:]:
        expect(rows[name] != rows["CAT-Seg"],
               f"the {name!r} row equals the full CAT-Seg's: did the change take effect while "
               f"scoring (and was it undone after)?")
    expect(rows[PARTS["spatial"]] != rows[PARTS["class"]],
           "the two skipped rows are identical: skip a different part in each.")
    expect(costlier_aggregation in PARTS, "`costlier_aggregation` should be 'spatial' or 'class'.")
    full = _mean(rows["CAT-Seg"])
    loss = {part: full - _mean(rows[row]) for part, row in PARTS.items()}
    expect(loss[costlier_aggregation] == max(loss.values()),
           "`costlier_aggregation` does not lose the most in your table (mean over the three "
           "domains).")
    expect(largest_drop_domain in DOMAINS,
           f"`largest_drop_domain` should be one of {', '.join(DOMAINS)}.")
    skipped = rows[PARTS[costlier_aggregation]]
    drop = {d: rows["CAT-Seg"][d] - skipped[d] for d in DOMAINS}
    expect(drop[largest_drop_domain] == max(drop.values()),
           "`largest_drop_domain` is not where skipping your costlier aggregation loses the most "
           "in your table.")
    return ("each ablation and the raw cost are scored on the three domains, and your "
            "conclusions follow from them.")


@exercise("04", 2,
          pooling_scores="{(1, 1): row, (2, 2): row}: miou(model) with model.aggregator.cfg's "
                         "eval_pooling set to (1, 1) (no pooling, as eval.sh) and to (2, 2) (as "
                         "in training), {domain: mIoU %}",
          better_pooling="(1, 1) or (2, 2): the eval pooling with the higher mIoU averaged over "
                         "the three domains")
def pooling(pooling_scores, better_pooling):
    rows = expect_domain_rows(pooling_scores, ((1, 1), (2, 2)), DOMAINS, "pooling_scores",
                              high=100)
    expect(rows[1, 1] != rows[2, 2],
           "the two rows are identical: set eval_pooling on a copy of the aggregator's config "
           "(dataclasses.replace) and assign it to model.aggregator.cfg before scoring.")
    expect(better_pooling in ((1, 1), (2, 2)), "`better_pooling` should be (1, 1) or (2, 2).")
    other = (2, 2) if tuple(better_pooling) == (1, 1) else (1, 1)
    expect(_mean(rows[tuple(better_pooling)]) > _mean(rows[other]),
           "`better_pooling` does not have the higher mean in your `pooling_scores`.")
    return "both eval poolings are scored, and the better one is read off them."


@exercise("04", 3,
          bus_iou="{name: IoU %}: the IoU of class 15 (bus) on the source test scenes that show a "
                  "bus, with class 15 named 'bus', 'coach', 'school bus', 'vehicle' and 'truck' "
                  "(CAT-Seg's template), plus one more entry, under a key of your choice, for "
                  "'bus' in another template (set model.eval_names and model.template, then "
                  "restore them)",
          best_bus_name="the key of `bus_iou` with the highest IoU",
          any_name_works="True or False: does any entry of `bus_iou` reach an IoU of 10% or more?")
def unseen_name(bus_iou, best_bus_name, any_name_works):
    expect_keys(bus_iou, NAMES, "bus_iou")
    expect(len(bus_iou) > len(NAMES),
           "`bus_iou` needs one more entry: 'bus' in a template other than CAT-Seg's.")
    ious = {k: expect_number(v, f"`bus_iou[{k!r}]`", 0.0, 100.0) for k, v in bus_iou.items()}
    expect(len(set(ious.values())) > 1,
           "every name gives the same IoU: did the model use your names (model.eval_names) and "
           "templates (model.template) while scoring?")
    expect(best_bus_name in ious, "`best_bus_name` should be one of the keys of `bus_iou`.")
    expect(ious[best_bus_name] == max(ious.values()),
           "`best_bus_name` does not have the highest IoU in your `bus_iou`.")
    expect(isinstance(any_name_works, bool), "`any_name_works` should be a bool.")
    expect(any_name_works == (max(ious.values()) >= 10),
           "`any_name_works` does not agree with your `bus_iou`.")
    return "every name and the second template are scored, and your conclusions follow from them."
