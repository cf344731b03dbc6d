"""Checks of lesson 09's exercises (reproducing at scale): see ``lessons.exercises``."""

from __future__ import annotations

from collections.abc import Mapping
from itertools import pairwise
from pathlib import Path

import torch
import yaml

from lessons.exercises import exercise, expect, expect_keys, expect_number

__all__ = ["h100_hour", "own_config", "protocol_cost", "three_jobs"]

BASE = "rein_eva02_gtav.yaml"
TARGETS = {"bdd100k", "mapillary"}
SIZES = {"cityscapes": ((1024, 2048), 500), "bdd100k": ((720, 1280), 1000),
         "mapillary": ((3024, 4032), 2000)}                     # (H, W), images (exercise 3)
PROTOCOL_NAMES = ("rein", "tqdm")
TFLOP_PER_IMAGE, BATCH, STEPS, PEAK, SHARE = 5.3, 2, 20_000, 989.0, 0.4   # exercise 4


@exercise("09", 1,
          own_config_path="the path (str or Path) of your YAML: it extends rein_eva02_gtav.yaml "
                          "with `base:` and trains on Cityscapes, tested on BDD100K and "
                          "Mapillary",
          own_trainable="int: the trainable parameters of build_model(your experiment, "
                        "meta=True)")
def own_config(own_config_path, own_trainable):
    from reprod.experiment import CONFIG_DIR, build_model, load_experiment
    from reprod.models import trainable_parameters

    path = Path(own_config_path)
    expect(path.is_file(), "`own_config_path` should be the path of the YAML file you wrote.")
    raw = yaml.safe_load(path.read_text())
    expect(isinstance(raw, Mapping) and Path(str(raw.get("base", ""))).name == BASE,
           f"your YAML should extend {BASE} with a `base:` line.")
    exp, base = load_experiment(path), load_experiment(CONFIG_DIR / BASE)
    expect(exp.data.source.dataset == "cityscapes", "your source dataset should be cityscapes.")
    expect(set(exp.data.targets) == TARGETS, "your targets should be bdd100k and mapillary only "
                                             "(`null` drops a base config's target).")
    expect(exp.model == base.model, "your config changes the model: extend the base and change "
                                    "only the data.")
    count = trainable_parameters(build_model(exp, meta=True))
    expect(count == base.expected.trainable, "your config's model does not have Rein's trainable "
                                             "total.")
    expect(expect_number(own_trainable, "`own_trainable`", 0) == count,
           "`own_trainable` is not what build_model(..., meta=True) of your experiment trains.")
    return ("your config extends Rein's EVA02 config for Cityscapes -> BDD100K, Mapillary, and "
            "its trainable total is Rein's.")


def _steps(run, what: str) -> tuple[int, int]:
    expect_keys(run, ("start_step", "end_step"), what)
    return int(run["start_step"]), int(run["end_step"])


@exercise("09", 2,
          unbroken_run="the dict train(...) returned for the run that was never stopped",
          job_runs="[dict, dict, dict]: what train(...) returned for each of the three jobs, in "
                   "order (stop_at a third, two thirds, then to the end; one run directory)",
          resume_refusal="str: the message of the error train(...) raises when you resume that "
                         "run directory with a changed train.lr")
def three_jobs(unbroken_run, job_runs, resume_refusal):
    from safetensors.torch import load_file

    _, total = _steps(unbroken_run, "unbroken_run")
    expect(isinstance(job_runs, (list, tuple)) and len(job_runs) == 3,
           "`job_runs` should be a list of the three jobs' results.")
    spans = [_steps(r, f"job_runs[{i}]") for i, r in enumerate(job_runs)]
    expect(spans[0][0] == 0 and spans[-1][1] == total,
           "the jobs should start at step 0 and end where the unbroken run ends.")
    expect(all(a[1] == b[0] for a, b in pairwise(spans)),
           "each job should resume where the one before it stopped.")
    expect(all(s < e for s, e in spans), "every job should run at least one step: stop at a "
                                         "third and at two thirds of the steps.")
    expect_keys(unbroken_run, ("final",), "unbroken_run")
    expect_keys(job_runs[-1], ("final",), "job_runs[-1]")
    a, b = load_file(unbroken_run["final"]), load_file(job_runs[-1]["final"])
    expect(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a),
           "the three jobs' final weights differ from the unbroken run's: same config, same run "
           "directory for all three jobs?")
    expect(isinstance(resume_refusal, str) and "another config" in resume_refusal,
           "`resume_refusal` should be the message of the error train raises on resuming with a "
           "changed config (catch it: `except ValueError as e`, then str(e)).")
    return ("three jobs give the unbroken run's weights bit for bit, and resuming under a changed "
            "config is refused.")


def _windows(protocol, target: str, h: int, w: int) -> int:
    th, tw = protocol.test_size(h, w, target)
    rows = (max(th - protocol.crop, 0) + protocol.stride - 1) // protocol.stride + 1
    cols = (max(tw - protocol.crop, 0) + protocol.stride - 1) // protocol.stride + 1
    return rows * cols


@exercise("09", 3,
          protocol_windows="{'rein': n, 'tqdm': n}: 512 windows to evaluate Cityscapes (500), "
                           "BDD100K (1,000) and Mapillary (2,000 images, 4032 x 3024) under each "
                           "protocol",
          full_resolution_factor="the full-resolution (tqdm) total divided by Rein's")
def protocol_cost(protocol_windows, full_resolution_factor):
    from reprod.protocols import PROTOCOLS

    expect_keys(protocol_windows, PROTOCOL_NAMES, "protocol_windows")
    totals = {}
    for name in PROTOCOL_NAMES:
        totals[name] = expect_number(protocol_windows[name], f"protocol_windows[{name!r}]", 1)
        want = sum(n * _windows(PROTOCOLS[name], t, *hw) for t, (hw, n) in SIZES.items())
        expect(totals[name] == want, f"`protocol_windows[{name!r}]` is off: windows per image of "
                                     "each target (section 6's table) times its images, summed.")
    factor = expect_number(full_resolution_factor, "`full_resolution_factor`", 0)
    expect(abs(factor - totals["tqdm"] / totals["rein"]) < 0.01,
           "`full_resolution_factor` does not agree with your totals.")
    return "both protocols' window counts are right, and so is their ratio."


@exercise("09", 4,
          h100_step_seconds="seconds per step: batch 2 at 5.3 TFLOP per image, at 40% of 989 "
                            "TFLOP/s",
          h100_schedule_minutes="minutes for the 20,000 steps",
          within_an_hour="True or False: does the schedule fit in an hour?")
def h100_hour(h100_step_seconds, h100_schedule_minutes, within_an_hour):
    step = expect_number(h100_step_seconds, "`h100_step_seconds`", 0)
    want = BATCH * TFLOP_PER_IMAGE / (SHARE * PEAK)
    expect(abs(step / want - 1) < 0.02, "`h100_step_seconds` is off: FLOPs per step over the "
                                        "FLOP/s you get at 40% of the peak.")
    minutes = expect_number(h100_schedule_minutes, "`h100_schedule_minutes`", 0)
    expect(abs(minutes / (STEPS * step / 60) - 1) < 0.02,
           "`h100_schedule_minutes` does not agree with your step time.")
    expect(isinstance(within_an_hour, bool), "`within_an_hour` should be a bool.")
    expect(within_an_hour == (minutes <= 60), "`within_an_hour` does not agree with your "
                                              "minutes.")
    return "the step time and the schedule's length are right, and so is your conclusion."
