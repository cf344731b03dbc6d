"""The package builds as a wheel that installs and imports on its own, with its data files."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}"
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # build from a copy, so setuptools' build/ and egg-info never land in the working tree
    src, dist = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for name in ("lessons", "reprod"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--quiet", "-w", str(dist), str(src)])
    wheels = list(dist.glob("dgss_lessons-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_installs_into_a_fresh_venv_and_ships_its_data(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    site = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    site = Path(site.stdout.strip())
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
          "--target", str(site), str(wheel)])
    # the runtime dependencies (torch, ...) come from this environment, but not its `lessons`:
    # a plain path entry, so the editable install's .pth hooks there are not run
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    probe = (
        "import importlib.resources as r, lessons, reprod\n"
        "from lessons.papers import load_paper_results\n"
        "from lessons.toyworld import ToyWorld\n"
        "print(lessons.__file__)\n"
        "assert (r.files('lessons') / 'weights' / 'README.md').is_file()\n"
        "assert len(load_paper_results()) > 10\n"
        "image, label = ToyWorld('fog', 'test', length=2)[1]\n"
        "assert image.shape == (3, 64, 128)\n"
    )
    out = _run([str(py), "-c", probe], cwd=tmp_path)
    assert out.stdout.strip().startswith(str(site)), out.stdout


def test_wheel_lists_the_package_data(wheel):
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    for expected in ("lessons/weights/README.md", "lessons/papers.yaml",
                     "lessons/weights/checkpoints/toy_sweep.json",
                     "lessons/weights/checkpoints/02_rein/rein_seed0.safetensors",
                     "lessons/toyworld.py", "reprod/course/notebooks.py",
                     "reprod/configs/rein_dinov2_gtav.yaml", "reprod/configs/_gtav_rein.yaml"):
        assert expected in names, expected


def test_declared_python_range_includes_this_interpreter():
    meta = (ROOT / "pyproject.toml").read_text()   # tomllib is 3.11+; the range starts at 3.10
    assert re.search(r'^requires-python = ">=3.10,<3.14"$', meta, re.M)
    assert (3, 10) <= sys.version_info[:2] < (3, 14)
    gpu = re.search(r"^gpu = \[(.*)\]$", meta, re.M).group(1)
    assert "mamba-ssm" in gpu
    runtime = meta.split("[project.optional-dependencies]")[0]
    cpu_safe = runtime + meta.split("dev = [")[1].split("]")[0]
    # mambapy (the pure-PyTorch peer in dev) is CPU-safe; mamba-ssm / causal-conv1d are not
    assert not re.search(r"mamba[-_]ssm|causal[-_]conv1d", cpu_safe), \
        "mamba-ssm needs CUDA to build: it must stay out of the CPU-safe dependencies"
