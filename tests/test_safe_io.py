"""reprod.safe_io: atomic writes, weights-only loads that name the file, digests, the run lock;
and the pretraining runs' resume (reprod.toy.resumable, reprod.toy.pretrain) on files that cannot be
trusted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from reprod import safe_io
from reprod.toy.resumable import ResumableRun

REPO = Path(__file__).resolve().parents[1]


class NotWeights:
    """Any object beyond tensors and containers: torch.load(weights_only=True) refuses it."""


def test_atomic_write_leaves_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "state.json"
    safe_io.atomic_write_text(path, "old")

    def half_then_crash(tmp: Path) -> None:
        tmp.write_text("ne")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        safe_io.atomic_write(path, half_then_crash)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["state.json"]
    safe_io.atomic_write_bytes(path, b"new")
    assert path.read_text() == "new"


def test_load_weights_only_names_the_file(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(3)}, good)
    assert torch.equal(safe_io.load_weights_only(good)["w"], torch.ones(3))
    code = tmp_path / "code.pt"
    torch.save({"w": NotWeights()}, code)
    with pytest.raises(ValueError, match=f"{code} is not a weights-only checkpoint.*NotWeights"):
        safe_io.load_weights_only(code)
    for bad in (good.read_bytes()[:40], b"", b"junk" * 9):
        broken = tmp_path / "broken.pt"
        broken.write_bytes(bad)
        with pytest.raises(ValueError, match=f"{broken} cannot be read .* truncated or damaged"):
            safe_io.load_weights_only(broken)
    with pytest.raises(FileNotFoundError):
        safe_io.load_weights_only(tmp_path / "missing.pt")


def test_digests_see_every_byte_and_every_value():
    state = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "step": 3, "rng": [1, (2, 3.5)]}
    digest = safe_io.tensor_digest(state)
    assert digest == safe_io.tensor_digest({k: state[k] for k in reversed(state)})
    flipped = {**state, "model": {"w": state["model"]["w"].clone()}}
    flipped["model"]["w"][1, 2] = 5.000001
    for other in (flipped, {**state, "step": 4}, {**state, "rng": [1, (2, 3.25)]},
                  {**state, "model": {"w": state["model"]["w"].double()}}):
        assert safe_io.tensor_digest(other) != digest


def test_checked_safetensors_round_trip_and_damage(tmp_path):
    path = tmp_path / "w.safetensors"
    safe_io.save_safetensors_checked(path, {"a": torch.ones(4), "b": torch.zeros(2, 2)},
                                     {"steps": "7"})
    tensors, meta = safe_io.load_safetensors_checked(path)
    assert meta["steps"] == "7" and torch.equal(tensors["a"], torch.ones(4))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{path} is damaged"):
        safe_io.load_safetensors_checked(path)
    path.write_bytes(bytes(data[:20]))
    with pytest.raises(ValueError, match=f"{path} cannot be read as safetensors"):
        safe_io.load_safetensors_checked(path)


def test_the_run_lock_is_exclusive_and_dies_with_its_holder(tmp_path):
    held = f"{tmp_path} is in use by another training \\(pid {os.getpid()}\\)"
    with safe_io.RunLock(tmp_path), pytest.raises(ValueError, match=held):
        safe_io.RunLock(tmp_path).acquire()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from reprod.safe_io import RunLock; "
         f"RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=f"pid {holder.pid}"):
            safe_io.RunLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)                    # kill -9: no cleanup runs
        holder.wait(timeout=30)
    for _ in range(50):                                      # the OS drops the lock
        try:
            safe_io.RunLock(tmp_path).acquire().release()
            break
        except ValueError:
            time.sleep(0.1)
    else:
        pytest.fail("the lock outlived its killed holder")


# --- the pretraining runs' resume --------------------------------------------------------------
@dataclass
class TinyConfig:
    steps: int = 2
    lr: float = 0.1
    min_lr: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0
    bf16: bool = False


class TinyRun(ResumableRun):
    name = "tiny"

    def __init__(self, cfg, run_dir):
        super().__init__(cfg, run_dir)
        self.model = nn.Linear(2, 1)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=cfg.lr)

    def loss(self, step, batch):
        return self.model(torch.ones(1, 2)).pow(2).sum(), {}


def test_resumable_run_state_problems_name_the_file(tmp_path):
    run = TinyRun(TinyConfig(), tmp_path)
    run.train_chunk(1.0)
    good = run.ckpt.read_bytes()
    run.ckpt.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=f"{run.ckpt} cannot be read .* truncated"):
        TinyRun(TinyConfig(), tmp_path).load()
    torch.save({"cfg": {}, "model": NotWeights()}, run.ckpt)
    with pytest.raises(ValueError, match=f"{run.ckpt} is not a weights-only tiny run state"):
        TinyRun(TinyConfig(), tmp_path).load()
    torch.save({"w": torch.ones(1)}, run.ckpt)
    with pytest.raises(ValueError, match=f"{run.ckpt} is not a tiny run state"):
        TinyRun(TinyConfig(), tmp_path).load()


def test_pretrain_toy_resume_of_a_bad_state_is_one_line(tmp_path, capsys):
    from reprod.toy import pretrain as pretrain_toy

    state = tmp_path / "vfm_state.pt"
    torch.save({"cfg": {}, "model": NotWeights()}, state)
    with pytest.raises(SystemExit) as exit_:
        pretrain_toy.main(["vfm", "--run-dir", str(tmp_path), "--export"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err == (
        f"error: {state} is not a weights-only vfm run state: loading it would run code from "
        f"the file, which is refused (it names {__name__}.NotWeights)\n")
