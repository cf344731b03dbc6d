"""Checks of lesson 05's exercises (QueryDiff): see ``lessons.exercises``."""

from __future__ import annotations

from collections.abc import Mapping

from lessons.exercises import exercise, expect, expect_keys, expect_number

__all__ = ["agent_queries", "guidance_cost", "huber_target", "noise_level"]

TIMESTEPS = (0, 5, 25, 50, 100, 200, 400)        # exercise 1's noise levels
FADE = 0.95                                      # noise stability below this: the layout fades
LAYERS = (0, 1, 2)                               # the toy teacher's hooked layers
TARGETS = ("strong", "weak")
STEP_KINDS = ("teacher running", "cached features", "no guidance")
SD_TFLOP_PER_PASS = 0.804257                     # FlopCounterMode, SD 2.1 U-Net, 64 x 64 latent
FORMS = ("rein", "agents")


def _layer_rows(table, what: str) -> dict:
    """``{layer: {t: similarity}}`` with three layers and every t of the exercise."""
    expect(isinstance(table, Mapping), f"`{what}` should be a dict, not {type(table).__name__}.")
    expect(len(table) == 3, f"`{what}` should have one entry per hooked layer (three: "
                            f"teacher.layers); it has {len(table)}.")
    out = {}
    for layer, row in table.items():
        expect_keys(row, TIMESTEPS, f"{what}[{layer!r}]")
        out[layer] = {t: expect_number(row[t], f"{what}[{layer!r}][{t}]", -1.0, 1.0)
                      for t in TIMESTEPS}
    return out


def _first_below(row: dict, level: float):
    return next((t for t in TIMESTEPS if row[t] < level), None)


@exercise("05", 1,
          noise_level_invariance="{layer label: {t: mean cosine similarity of each target "
                                 "style's features to the synthetic rendering's (same noise), "
                                 "averaged over targets and scenes}} for the three hooked layers "
                                 "and t in (0, 5, 25, 50, 100, 200, 400)",
          noise_level_stability="{layer label: {t: mean cosine similarity of the synthetic "
                                "features under two different noise draws}}, same layers and t",
          most_invariant_at="(layer label, t): where noise_level_invariance is highest",
          layout_fades_at="{layer label: the smallest t whose noise stability is below 0.95, or "
                          "None if it never falls that low}")
def noise_level(noise_level_invariance, noise_level_stability, most_invariant_at,
                layout_fades_at):
    inv = _layer_rows(noise_level_invariance, "noise_level_invariance")
    stab = _layer_rows(noise_level_stability, "noise_level_stability")
    expect(set(inv) == set(stab), "the two tables should have the same layer labels.")
    for layer, row in inv.items():
        expect(len(set(row.values())) > 1, f"layer {layer!r} has the same invariance at every t: "
                                           "did features_at get all the timesteps?")
        expect(max(row.values()) < 0.999, f"layer {layer!r} has a similarity of 1, as if a style "
                                          "were compared with itself: compare each target style "
                                          "with the synthetic rendering.")
        expect(stab[layer][0] > FADE, f"the noise stability of layer {layer!r} at t = 0 is low: "
                                      "at t = 0 two noise draws barely differ. Compare the same "
                                      "synthetic scene under two draws.")
        expect(stab[layer][400] < stab[layer][0], f"the noise stability of layer {layer!r} does "
                                                  "not fall from t = 0 to t = 400: are the two "
                                                  "draws really different?")
    expect(isinstance(most_invariant_at, (tuple, list)) and len(most_invariant_at) == 2,
           "`most_invariant_at` should be a (layer label, t) pair.")
    layer, t = most_invariant_at
    expect(layer in inv and t in TIMESTEPS, "`most_invariant_at` should name one of your layer "
                                            "labels and one of the exercise's t.")
    best = max(v for row in inv.values() for v in row.values())
    expect(inv[layer][t] == best, "`most_invariant_at` is not where your invariance table is "
                                  "highest.")
    expect_keys(layout_fades_at, list(stab), "layout_fades_at")
    for layer, row in stab.items():
        expect(layout_fades_at[layer] == _first_below(row, FADE),
               f"`layout_fades_at[{layer!r}]` does not agree with your stability table: the "
               "first t (in increasing order) below 0.95, or None.")
    return ("both measurements cover every layer and noise level, and your conclusions follow "
            "from them.")


@exercise("05", 2,
          q_opt_change="{j: {'strong': ..., 'weak': ...}} for the hooked layers j = 0, 1, 2: "
                       "the relative change ||q_opt(painted) - q_opt(synthetic)|| / "
                       "||q_opt(synthetic)|| of the pooled target (Eq. 10) from the strong and "
                       "from the weak features, averaged over your scenes",
          steadier_target="{j: 'strong' or 'weak'}: per layer, the target that changes less with "
                          "the style")
def huber_target(q_opt_change, steadier_target):
    expect_keys(q_opt_change, LAYERS, "q_opt_change")
    rows = {}
    for j in LAYERS:
        expect_keys(q_opt_change[j], TARGETS, f"q_opt_change[{j}]")
        rows[j] = {k: expect_number(q_opt_change[j][k], f"q_opt_change[{j}][{k!r}]", 0.0, 10.0)
                   for k in TARGETS}
        expect(min(rows[j].values()) > 0, f"layer {j}: a change of 0 means the two renderings "
                                          "gave the same q_opt: render the scene as painted too.")
        expect(rows[j]["strong"] != rows[j]["weak"],
               f"layer {j}: both targets change by the same amount: pool the strong features "
               "for one and the weak ones for the other.")
    expect_keys(steadier_target, LAYERS, "steadier_target")
    for j, row in rows.items():
        expect(steadier_target[j] in TARGETS, f"`steadier_target[{j}]` should be 'strong' or "
                                              "'weak'.")
        expect(row[steadier_target[j]] == min(row.values()),
               f"`steadier_target[{j}]` does not agree with your numbers for layer {j}.")
    return ("both targets are compared on every hooked layer, and the steadier one is read off "
            "your numbers.")


@exercise("05", 3,
          guidance_step_seconds="{'teacher running': s, 'cached features': s, 'no guidance': s}: "
                                "seconds of one training step (batch 8, forward, backward and "
                                "optimiser step; median of a few)",
          caching_saves="the fraction of the teacher-running step's time that caching saves: "
                        "1 - cached / teacher running",
          sd_tflop_per_image="TFLOP the SD 2.1 U-Net adds per training image: two passes at a "
                             "64 x 64 latent (FlopCounterMode on the meta device)",
          sd_inference_tflop="TFLOP the teacher adds per image at inference")
def guidance_cost(guidance_step_seconds, caching_saves, sd_tflop_per_image, sd_inference_tflop):
    expect_keys(guidance_step_seconds, STEP_KINDS, "guidance_step_seconds")
    times = {k: expect_number(guidance_step_seconds[k], f"guidance_step_seconds[{k!r}]", 0, 600)
             for k in STEP_KINDS}
    expect(min(times.values()) > 0, "every step takes some time: a time of 0 is not measured.")
    saves = expect_number(caching_saves, "`caching_saves`", -10, 1)
    expect(abs(saves - (1 - times["cached features"] / times["teacher running"])) < 0.01,
           "`caching_saves` does not agree with your step times.")
    flop = expect_number(sd_tflop_per_image, "`sd_tflop_per_image`", 0)
    expect(abs(flop / (2 * SD_TFLOP_PER_PASS) - 1) < 0.05,
           "`sd_tflop_per_image` is off: count one U-Net pass (FlopCounterMode counts a "
           "multiply-add as two FLOPs) at t = 100 with the empty prompt's (1, 77, 1024) "
           "embedding, then take both timesteps.")
    expect(expect_number(sd_inference_tflop, "`sd_inference_tflop`", 0) == 0,
           "`sd_inference_tflop` is not what the teacher costs at inference: which parts of the "
           "model run when it predicts (lesson 05, section 4)?")
    return ("the three step times are measured, and the teacher's cost per training image and "
            "at inference are right.")


def _losses(values, what: str) -> list[float]:
    expect(hasattr(values, "__len__") and len(values) >= 10,
           f"`{what}` should hold one segmentation loss per step (at least 10 steps).")
    out = [expect_number(v, f"a step of {what}", 0) for v in values]
    return out


def _drop(losses: list[float]) -> float:
    return sum(losses[:5]) / 5 - sum(losses[-5:]) / 5


@exercise("05", 4,
          agent_query_losses="{'rein': [...], 'agents': [...]}: the segmentation loss (DCL terms "
                             "left out) at each step of section 5's live loop, with Rein's link "
                             "and with queries_from='agents' as the decoder's queries",
          slower_to_train="'rein' or 'agents': the form whose mean loss falls less from the "
                          "first 5 steps to the last 5")
def agent_queries(agent_query_losses, slower_to_train):
    expect_keys(agent_query_losses, FORMS, "agent_query_losses")
    runs = {k: _losses(agent_query_losses[k], f"agent_query_losses[{k!r}]") for k in FORMS}
    expect(len(runs["rein"]) == len(runs["agents"]), "run both forms for the same steps.")
    expect(runs["rein"] != runs["agents"], "the two runs are identical: build the second with "
                                           "build_toy_querydiff(queries_from='agents').")
    for k, losses in runs.items():
        expect(_drop(losses) > 0, f"the loss of the {k!r} run does not fall over the run: does "
                                  "the loop step the optimiser?")
    expect(slower_to_train in FORMS, f"`slower_to_train` should be one of {FORMS}.")
    drops = {k: _drop(v) for k, v in runs.items()}
    expect(drops[slower_to_train] == min(drops.values()),
           "`slower_to_train` does not agree with your losses.")
    return "both forms are trained the same way, and your conclusion follows from their losses."

