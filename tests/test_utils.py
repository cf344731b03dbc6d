"""Tests of lessons.utils: seeding, threads, devices, parameter counts and the package digest."""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lessons import utils
from lessons.utils import (
    count_parameters,
    get_device,
    lessons_digest,
    lessons_imports,
    module_closure,
    module_files,
    seed_everything,
    set_threads,
)


def draws() -> tuple[float, list[float], list[float]]:
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()


def test_seed_everything_repeats_python_numpy_and_torch():
    seed_everything(123)
    first = draws()
    seed_everything(123)
    assert draws() == first
    seed_everything(124)
    again = draws()
    for a, b in zip(again, first, strict=True):    # each generator is seeded, not just one
        assert a != b
    seed_everything(2**40 + 5)                     # larger than NumPy's 32-bit seed range
    big = draws()
    seed_everything(2**40 + 5)
    assert draws() == big


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_set_threads(restore_threads):
    now = torch.get_num_threads()
    assert set_threads(None) == now
    assert torch.get_num_threads() == now
    assert set_threads(1) == 1
    assert torch.get_num_threads() == 1
    for bad in (0, -3):
        with pytest.raises(ValueError, match=">= 1"):
            set_threads(bad)
    assert torch.get_num_threads() == 1


def test_get_device():
    assert get_device("cpu") == torch.device("cpu")
    assert get_device("meta") == torch.device("meta")           # by name, even if unusual
    assert get_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_count_parameters_with_frozen_parameters():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    total = (4 * 3 + 3) + (3 + 3) + (3 * 2 + 2)          # 15 + 6 + 8; BN running stats are buffers
    assert count_parameters(model) == total == 29
    model[0].requires_grad_(False)
    model[2].bias.requires_grad_(False)
    assert count_parameters(model) == 29 - 15 - 2
    assert count_parameters(model, trainable_only=False) == 29
    model.requires_grad_(False)
    assert count_parameters(model) == 0


# ---------------------------------------------------------------- module_closure, lessons_digest


def test_lessons_imports_finds_every_import_form():
    source = (
        "import os\n"
        "import lessons.metrics\n"
        "from lessons.train import train\n"
        "from lessons import viz, __version__, not_a_module\n"
        "from lessons.classes import CLASSES as C\n"
        "def f():\n"
        "    from lessons.toyworld import ToyWorld\n"
        "import lessonsx.utils\n"
    )
    assert lessons_imports(source) == {"metrics", "train", "viz", "classes", "toyworld"}
    assert lessons_imports("import numpy as np\n") == set()


def test_module_closure_follows_imports_transitively():
    assert module_closure(["train"]) == ["augment", "classes", "metrics", "train", "utils"]
    assert module_closure({"metrics"}) == ["classes", "metrics"]
    assert module_closure(["classes"]) == ["classes"]
    both = module_closure(["baselines", "metrics"])
    assert both == ["baselines", "classes", "metrics"]
    # check_env imports lessons.toyworld inside a function: it counts, and so does what
    # toyworld imports (classes), which check_env does not import itself
    assert {"check_env", "toyworld", "classes"} <= set(module_closure(["check_env"]))


def test_a_subpackage_counts_as_one_module_made_of_all_its_files():
    files = module_files("exercises")
    assert files[0].name == "__init__.py" and len(files) > 1
    assert all(f.parent.name == "exercises" for f in files)
    assert module_files("train") == [files[0].parents[1] / "train.py"]
    assert module_files("nope") == []
    assert lessons_imports("from lessons.exercises import check_exercise") == {"exercises"}
    closure = module_closure(["exercises"])
    assert "exercises" in closure and "train" in closure       # what its files import


def test_module_closure_rejects_unknown_modules():
    with pytest.raises(ValueError, match=r"no module lessons\.nope"):
        module_closure(["train", "nope"])


def test_module_closure_accepts_a_single_name_or_says_it_wants_a_list():
    try:
        got = module_closure("train")
    except TypeError:
        return                                     # a clear refusal would do as well
    assert got == ["augment", "classes", "metrics", "train", "utils"]


@pytest.fixture
def package_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the package's sources that lessons.utils reads instead of the real one."""
    dest = tmp_path / "lessons"
    dest.mkdir()
    for src in utils.PACKAGE_DIR.glob("*.py"):
        shutil.copy2(src, dest / src.name)
    monkeypatch.setattr(utils, "PACKAGE_DIR", dest)
    return dest


def test_lessons_digest_is_stable_and_well_formed():
    d = lessons_digest()
    assert re.fullmatch(r"[0-9a-f]{16}", d)
    assert lessons_digest() == d
    assert lessons_digest(["train"]) == lessons_digest({"train"}) == lessons_digest(
        ["metrics", "train"])                     # the closure, in sorted order
    assert lessons_digest(["train"]) != d
    assert lessons_digest(["train"]) != lessons_digest(["metrics"])


def test_lessons_digest_depends_on_names_and_bytes_not_location(tmp_path, monkeypatch):
    real = (lessons_digest(), lessons_digest(["train"]))
    dest = tmp_path / "elsewhere"
    shutil.copytree(utils.PACKAGE_DIR, dest,
                    ignore=shutil.ignore_patterns("__pycache__", "weights"))
    monkeypatch.setattr(utils, "PACKAGE_DIR", dest)
    assert (lessons_digest(), lessons_digest(["train"])) == real


def test_lessons_digest_changes_with_the_source(package_copy, monkeypatch):
    all_before, train_before = lessons_digest(), lessons_digest(["train"])
    toy_before = lessons_digest(["toyworld"])

    viz = package_copy / "viz.py"                  # not imported by train
    viz.write_text(viz.read_text() + "\n# edited\n")
    assert lessons_digest() != all_before
    assert lessons_digest(["train"]) == train_before

    metrics = package_copy / "metrics.py"          # imported by train, not by toyworld
    metrics.write_text(metrics.read_text().replace("Segmentation metrics", "Segment metrics"))
    assert lessons_digest(["train"]) != train_before
    assert lessons_digest(["toyworld"]) == toy_before

    classes = package_copy / "classes.py"          # imported by both (transitively by train)
    classes.write_text(classes.read_text() + "\n")
    assert lessons_digest(["toyworld"]) != toy_before


def test_module_closure_of_a_chain(package_copy):
    (package_copy / "chain_a.py").write_text("from lessons import chain_b\n")
    (package_copy / "chain_b.py").write_text("import lessons.chain_c\n")
    (package_copy / "chain_c.py").write_text("from lessons.metrics import mean_iou\n")
    assert module_closure(["chain_a"]) == ["chain_a", "chain_b", "chain_c", "classes", "metrics"]
    assert module_closure(["chain_c"]) == ["chain_c", "classes", "metrics"]


def test_lessons_digest_follows_a_new_import(package_copy):
    before = lessons_digest(["baselines"])
    viz_before = module_closure(["baselines"])
    assert "viz" not in viz_before
    src = package_copy / "baselines.py"
    src.write_text(src.read_text().replace(
        "from lessons.classes import NUM_CLASSES",
        "from lessons.classes import NUM_CLASSES\nfrom lessons.viz import colorize  # noqa"))
    assert "viz" in module_closure(["baselines"])
    after = lessons_digest(["baselines"])
    assert after != before
    viz = package_copy / "viz.py"
    viz.write_text(viz.read_text() + "\n")
    assert lessons_digest(["baselines"]) != after   # viz's source now counts


def test_hardware_names_the_cpu_or_the_gpu(monkeypatch):
    cpu = utils.hardware("cpu")
    assert cpu.startswith("CPU (") and utils.cpu_name() in cpu
    assert f"{torch.get_num_threads()} threads" in cpu
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert utils.hardware("cuda:0") == "NVIDIA H100 80GB HBM3 (CUDA 13.0)"
