"""reprod.train and reprod.evaluate end to end on ToyWorld exported into the official layouts:
schedule, exact resumption (N + stop + N == 2N), two-process DDP on gloo, the NaN guard, logs,
and the evaluation CLI on the trained checkpoint."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import reprod.train as rt
from reprod.data.datasets import export_toyworld
from reprod.evaluate import main as evaluate_main
from reprod.experiment import load_experiment
from reprod.prepare_data import main as prepare_data

REPO = Path(__file__).resolve().parents[1]
SMALL = ["train.steps=4", "train.batch_size=2", "train.checkpoint_every=2", "train.log_every=1",
         "train.num_workers=0"]


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    """data/toy/{gta,cityscapes,bdd100k,mapillary} with a few scenes each, as the toy configs
    expect (relative to the working directory)."""
    root = tmp_path_factory.mktemp("toy")
    for name, folder, split in (("gtav", "gta", "all"), ("cityscapes", "cityscapes", "val"),
                                ("bdd100k", "bdd100k", "val"), ("mapillary", "mapillary", "val")):
        export_toyworld(root / "data" / "toy" / folder, name, [split], length=6)
    assert prepare_data(["stats", "gtav", str(root / "data/toy/gta")]) == 0    # toy_mfuser's RCS
    return root


@pytest.fixture
def in_toy(toy_root, monkeypatch) -> Path:
    monkeypatch.chdir(toy_root)
    return toy_root


def _exp(name: str = "toy_rein", *more: str):
    return load_experiment(name, [*SMALL, *more])


def test_poly_schedule_with_warmup_and_min_lr_as_mmcv():
    exp = load_experiment("mfuser_eva_gtav")           # 20k steps, warm-up 1500, min_lr 1e-6
    t = exp.train
    assert rt.lr_at(0, 1e-4, exp) == pytest.approx(1e-4 * 1e-6, rel=1e-3)   # x warmup_ratio
    mid = (1e-4 - 1e-6) * (1 - 750 / t.steps) ** 0.9 + 1e-6
    assert rt.lr_at(750, 1e-4, exp) == pytest.approx(mid * (1 - 0.5 * (1 - 1e-6)))
    assert rt.lr_at(t.steps, 1e-4, exp) == pytest.approx(1e-6)
    assert 1e-6 < rt.lr_at(t.steps - 1, 1e-4, exp) < 1.02e-6
    # tqdm's G->X backbone group (1e-5 x 0.1 = min_lr) sits at 1e-6 throughout (tqdm's
    # configs/_base_/schedules/schedule_20k.py with mmcv's per-group poly)
    tq = load_experiment("tqdm_eva02_gtav")
    assert all(rt.lr_at(s, 1e-6, tq) == pytest.approx(1e-6, rel=1e-9) for s in (1500, 5000, 19999))
    rein = load_experiment("rein_dinov2_gtav")          # no warm-up, eta_min 0
    assert rt.lr_at(0, 1e-4, rein) == 1e-4 and rt.lr_at(rein.train.steps, 1e-4, rein) == 0.0


@pytest.mark.parametrize("name", ["toy_rein", "toy_mfuser"])
def test_n_steps_stop_n_steps_equals_2n_steps(in_toy, name):
    exp = _exp(name)
    whole = rt.train(exp, in_toy / f"runs/{name}_whole", progress=False, evaluate=False)
    split = in_toy / f"runs/{name}_split"
    first = rt.train(exp, split, stop_at=2, progress=False, evaluate=False)
    assert (first["start_step"], first["end_step"]) == (0, 2) and "final" not in first
    second = rt.train(exp, split, progress=False, evaluate=False)
    assert second["start_step"] == 2
    a, b = load_file(whole["final"]), load_file(second["final"])
    assert a.keys() == b.keys() and len(a) > 10
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from an unbroken run"
    sa = torch.load(Path(whole["final"]).with_name(rt.CHECKPOINT), weights_only=True)
    sb = torch.load(split / rt.CHECKPOINT, weights_only=True)
    assert sa["step"] == sb["step"] == 4
    for ga, gb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values(),
                      strict=True):
        assert torch.equal(ga["exp_avg_sq"], gb["exp_avg_sq"])
    rerun = rt.train(exp, split, progress=False, evaluate=False)      # done: nothing to do
    assert rerun["start_step"] == rerun["end_step"] == 4


def test_resume_refuses_another_config(in_toy):
    rt.train(_exp(), in_toy / "runs/other", stop_at=2, progress=False, evaluate=False)
    with pytest.raises(ValueError, match="another config; differing sections: \\['train'\\]"):
        rt.train(_exp("toy_rein", "train.lr=0.5"), in_toy / "runs/other", progress=False)


def test_run_files_tensorboard_and_evaluation(in_toy):
    run = in_toy / "runs/files"
    out = rt.train(_exp("toy_rein", "train.eval_max_images=2"), run, progress=False)
    assert set(out["evaluations"]) == {4}
    info = json.loads((run / "run.json").read_text())
    assert info["world_size"] == 1 and info["versions"]["torch"] == torch.__version__
    assert load_experiment(run / "config.yaml").train.steps == 4
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").open()] == [1, 2, 3, 4]
    assert list((run / "tb").glob("events.out.tfevents.*"))
    report = json.loads((run / "eval/step_4/results.json").read_text())
    assert set(report["targets"]) == {"cityscapes", "bdd100k", "mapillary"}
    assert report["subset"] and "Subset" in (run / "eval/step_4/results.md").read_text()


def test_bf16_autocast_trains(in_toy):
    out = rt.train(_exp("toy_rein", "train.precision=bf16", "train.steps=2"),
                   in_toy / "runs/bf16", progress=False, evaluate=False)
    assert out["end_step"] == 2 and torch.isfinite(torch.tensor(out["last"]["loss"]))
    weights = load_file(out["final"])
    assert all(v.dtype == torch.float32 for v in weights.values())    # fp32 master weights


def test_non_finite_loss_stops_with_a_clear_message(in_toy, monkeypatch):
    def nan_loss(model, images, labels):
        return {"loss_ce": (images.sum() * float("nan")).requires_grad_()}

    monkeypatch.setattr(rt, "compute_losses", nan_loss)
    with pytest.raises(rt.NonFiniteLoss, match=r"non-finite loss nan at step 1 .*checkpoint.pt"):
        rt.train(_exp(), in_toy / "runs/nan", progress=False, evaluate=False)


def test_train_cli_errors_are_clear(in_toy, capsys):
    assert rt.main(["toy_rein", "train.stepz=3"]) == 2
    assert "train.stepz" in capsys.readouterr().err
    assert rt.main(["toy_rein", *SMALL, "data.source.root=nowhere/gta"]) == 2
    err = capsys.readouterr().err
    assert "nowhere/gta does not exist" in err and "GTAV" in err


def test_evaluate_cli_on_a_trained_checkpoint(in_toy, capsys):
    run = in_toy / "runs/cli"
    rt.train(_exp(), run, progress=False, evaluate=False)
    out = in_toy / "eval_cli"
    rc = evaluate_main(["toy_rein", "--checkpoint", str(run / rt.FINAL), "--targets",
                        "cityscapes", "bdd100k", "--max-images", "3", "--out", str(out),
                        "--no-progress", "--num-workers", "0"])
    assert rc == 0
    report = json.loads((out / "results.json").read_text())
    assert set(report["targets"]) == {"cityscapes", "bdd100k"}
    assert report["targets"]["cityscapes"]["images"] == 3
    assert report["extra"]["checkpoint"].endswith("final.safetensors")
    # the resumable checkpoint scores the same weights
    rc = evaluate_main(["toy_rein", "--checkpoint", str(run / rt.CHECKPOINT), "--targets",
                        "cityscapes", "--max-images", "3", "--out", str(out / "pt"),
                        "--no-progress", "--num-workers", "0"])
    assert rc == 0
    again = json.loads((out / "pt/results.json").read_text())
    assert again["targets"]["cityscapes"]["miou"] == report["targets"]["cityscapes"]["miou"]
    capsys.readouterr()
    # another model's checkpoint is refused, by name
    assert evaluate_main(["toy_mfuser", "--checkpoint", str(run / rt.FINAL),
                          "--no-progress"]) == 2
    assert "does not fit this config's model" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_on_gloo(in_toy):
    run = in_toy / "runs/ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), "-m", "reprod.train", "toy_rein", *SMALL,
           "--run-dir", str(run), "--device", "cpu", "--no-eval", "--no-progress"]
    done = subprocess.run(cmd, cwd=in_toy, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["end_step"] == 4
    assert summary["ddp_max_param_diff"] == 0.0          # the ranks' weights stayed identical
    state = torch.load(run / rt.CHECKPOINT, weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    with pytest.raises(ValueError, match="written by 2 process"):   # exact resume needs 2
        rt.train(_exp("toy_rein"), run, progress=False)


# ----------------------------------------------------------------------------------------------
# Interrupted runs, shared run directories, files that cannot be trusted
# ----------------------------------------------------------------------------------------------
class NotWeights:
    """Any object beyond tensors and containers: torch.load(weights_only=True) refuses it."""


def test_a_run_stopped_during_its_final_evaluation_finishes_on_rerun(in_toy, monkeypatch):
    run = in_toy / "runs/final_eval"
    calls = []

    def killed(*args, **kwargs):
        calls.append(args[3])
        raise KeyboardInterrupt          # as a job killed in the middle of the evaluation

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(rt, "_evaluate", killed)
        rt.train(_exp("toy_rein", "train.eval_max_images=2"), run, progress=False)
    assert calls == [4] and (run / rt.FINAL).is_file()      # the weights came first
    import shutil

    shutil.copytree(in_toy / "data/toy/cityscapes", in_toy / "data/toy/cityscapes_moved",
                    dirs_exist_ok=True)
    moved = _exp("toy_rein", "train.eval_max_images=2",   # an evaluation path may change
                 "data.targets.cityscapes.root=data/toy/cityscapes_moved")
    out = rt.train(moved, run, progress=False)
    assert out["start_step"] == 4 and set(out["evaluations"]) == {4}
    assert out["final"] == str(run / rt.FINAL)
    report = json.loads((run / "eval/step_4/results.json").read_text())
    assert set(report["targets"]) == {"cityscapes", "bdd100k", "mapillary"}
    assert "evaluations" not in rt.train(moved, run, progress=False)    # nothing left to do
    # a damaged final.safetensors is refused when read, and rewritten by a rerun
    weights = {k: v.clone() for k, v in load_file(run / rt.FINAL).items()}   # (mmapped)
    data = bytearray((run / rt.FINAL).read_bytes())
    data[-3] ^= 0xFF
    (run / rt.FINAL).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="final.safetensors is damaged"):
        load_trained_into(run / rt.FINAL)
    rt.train(moved, run, progress=False)
    again = load_file(run / rt.FINAL)
    assert all(torch.equal(weights[k], again[k]) for k in weights)


def load_trained_into(path: Path) -> None:
    from reprod.evaluate import load_trained
    from reprod.experiment import build_model

    load_trained(build_model(_exp()), path)


def test_two_trainings_cannot_share_a_run_directory(in_toy):
    import fcntl

    run = in_toy / "runs/shared"
    run.mkdir(parents=True)
    with open(run / ".lock", "w") as held:                  # another live training holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ValueError, match="is in use by another training"):
            rt.train(_exp(), run, stop_at=1, progress=False, evaluate=False)
    assert not (run / "config.yaml").exists() and not (run / rt.CHECKPOINT).exists()
    out = rt.train(_exp(), run, stop_at=1, progress=False, evaluate=False)   # released: fine
    assert out["end_step"] == 1


@pytest.mark.parametrize("override, key", [
    ("train.checkpoint_every=0", "train.checkpoint_every must be >= 1"),
    ("train.log_every=0", "train.log_every must be >= 1"),
    ("train.eval_every=-5", "train.eval_every must be >= 0"),
    ("train.warmup_steps=-1", "train.warmup_steps must be >= 0"),
])
def test_settings_that_would_divide_by_zero_or_mean_nothing_are_refused(override, key):
    with pytest.raises(ValueError, match=key):
        _exp("toy_rein", override)


def test_stop_at_must_not_be_negative(in_toy, capsys):
    assert rt.main(["toy_rein", *SMALL, "--stop-at", "-1", "--run-dir", "runs/neg"]) == 2
    assert "--stop-at must be >= 0, got -1" in capsys.readouterr().err
    assert not (in_toy / "runs/neg").exists()


def test_unreadable_checkpoints_are_one_sentence_naming_the_file(in_toy, capsys):
    run = in_toy / "runs/bad_ckpt"
    rt.train(_exp(), run, stop_at=2, progress=False, evaluate=False)
    ckpt = run / rt.CHECKPOINT
    good = ckpt.read_bytes()
    ckpt.write_bytes(good[: len(good) // 2])                  # truncated
    with pytest.raises(ValueError, match=f"{ckpt} cannot be read .* truncated or damaged"):
        rt.train(_exp(), run, progress=False, evaluate=False)
    args = ["toy_rein", "--checkpoint", str(ckpt), "--no-progress", "--num-workers", "0"]
    assert evaluate_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {ckpt} cannot be read") and err.count("\n") == 1
    torch.save({"model": NotWeights()}, ckpt)                 # a pickle that would run code
    with pytest.raises(ValueError, match=f"{ckpt} is not a weights-only"):
        rt.train(_exp(), run, progress=False, evaluate=False)
    assert evaluate_main(args) == 2
    assert "is not a weights-only" in capsys.readouterr().err
    state = torch.load(io.BytesIO(good), weights_only=True)   # loads, but not what was written
    state["model"][next(iter(state["model"]))].add_(1.0)
    torch.save(state, ckpt)
    with pytest.raises(ValueError, match=f"{ckpt} is damaged"):
        rt.train(_exp(), run, progress=False, evaluate=False)


def test_run_directories_that_cannot_be_written(in_toy, capsys, monkeypatch):
    blocker = in_toy / "runs/a_file"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a directory")
    assert rt.main(["toy_rein", *SMALL, "--run-dir", str(blocker / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot create the run directory") and err.count("\n") == 1
    read_only = in_toy / "runs/read_only"
    read_only.mkdir()
    if os.geteuid() == 0:                  # root writes anywhere: simulate the refusal
        def refused(self):
            raise PermissionError(13, "Permission denied", str(self.path))

        monkeypatch.setattr(rt.RunLock, "acquire", refused)
    else:
        read_only.chmod(0o555)
    try:
        assert rt.main(["toy_rein", *SMALL, "--run-dir", str(read_only)]) == 2
    finally:
        read_only.chmod(0o755)
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write in the run directory {read_only}: Permission "
                          "denied") and err.count("\n") == 1


def test_overrides_after_options(in_toy, capsys):
    run = in_toy / "runs/intermixed"
    assert rt.main(["toy_rein", "--run-dir", str(run), "--no-eval", "--no-progress", *SMALL,
                    "--stop-at", "1", "train.seed=3"]) == 0
    assert load_experiment(run / "config.yaml").train.seed == 3
    out = in_toy / "eval_intermixed"
    assert evaluate_main(["toy_rein", "--checkpoint", str(run / rt.CHECKPOINT), "--targets",
                          "cityscapes", "evaluate.crop=32", "--max-images", "1", "--out",
                          str(out), "--no-progress", "--num-workers", "0",
                          "evaluate.stride=16"]) == 0
    report = json.loads((out / "results.json").read_text())
    assert set(report["targets"]) == {"cityscapes"}
    assert (report["protocol"]["crop"], report["protocol"]["stride"]) == (32, 16)
    capsys.readouterr()


def test_log_has_no_duplicated_rows_after_a_resume(in_toy, monkeypatch):
    run = in_toy / "runs/log_resume"
    save = rt.save_checkpoint

    def killed_at_3(run_dir, model, opt, step, exp, d):
        if step == 3:
            raise KeyboardInterrupt      # step 3 was logged, its checkpoint never written
        save(run_dir, model, opt, step, exp, d)

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(rt, "save_checkpoint", killed_at_3)
        rt.train(_exp("toy_rein", "train.checkpoint_every=1"), run, progress=False,
                 evaluate=False)
    out = rt.train(_exp("toy_rein", "train.checkpoint_every=1"), run, progress=False,
                   evaluate=False)
    assert out["start_step"] == 2
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").open()] == [1, 2, 3, 4]


def test_a_run_that_fails_to_start_leaves_no_directory(in_toy, capsys):
    run = in_toy / "runs/never_started"
    assert rt.main(["toy_rein", *SMALL, "data.source.root=nowhere/gta", "--run-dir",
                    str(run)]) == 2
    assert "nowhere/gta does not exist" in capsys.readouterr().err
    assert not run.exists()
    assert rt.main(["toy_rein", *SMALL, "data.targets.bdd100k.root=nowhere/bdd",  # found now,
                    "--run-dir", str(run)]) == 2                 # not after the training
    assert "nowhere/bdd" in capsys.readouterr().err and not run.exists()


def test_distributed_needs_torchrun(monkeypatch):
    """``--distributed`` (DDP at world size 1, the GPU check's smoke run) outside torchrun is a
    one-line error, not a hang waiting for a rendezvous."""
    from reprod.train import setup_distributed

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ValueError, match="--distributed needs torchrun"):
        setup_distributed("cpu", force=True)
    assert not setup_distributed("cpu").ddp
