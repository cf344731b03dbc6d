"""Tests of lessons.check_env: version checks, declared minimums, the report and its exit code."""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lessons import check_env
from lessons.check_env import (
    MINIMUMS,
    check_packages,
    declared_minimums,
    main,
    mamba_status,
)

ROOT = Path(__file__).resolve().parents[1]


def fake_metadata(versions: dict[str, str] | None = None, requires=None) -> SimpleNamespace:
    """Stand-in for importlib.metadata with fixed versions and requirements."""

    def version(name):
        if versions is None or name not in versions:
            raise md.PackageNotFoundError(name)
        return versions[name]

    def requires_(name):
        if requires is None:
            raise md.PackageNotFoundError(name)
        return requires

    return SimpleNamespace(version=version, requires=requires_,
                           PackageNotFoundError=md.PackageNotFoundError)


def test_main_passes_here_and_reports_ok(capsys):
    assert main() == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(re.match(rf"\[OK\] torch {re.escape(md.version('torch'))} \(need >=", ln)
               for ln in lines), lines
    assert any(re.match(r"\[OK\] numpy \S+ \(need >=", ln) for ln in lines), lines
    assert any(ln.startswith("[OK] python ") for ln in lines)
    assert any(ln.startswith("[OK] device: ") for ln in lines)
    assert any(ln.startswith("[--] fused Mamba kernel: ") for ln in lines)
    assert lines[-1] == "all requirements met"
    assert not any(ln.startswith("[FAIL]") for ln in lines)


def test_main_fails_on_a_too_old_package(monkeypatch, capsys):
    monkeypatch.setattr(check_env, "declared_minimums", lambda: {"numpy": "999.0"})
    assert main() == 1
    out = capsys.readouterr().out
    assert re.search(r"^\[FAIL\] numpy \S+ \(need >=999\.0\)$", out, re.M), out
    assert out.rstrip().endswith("some requirements are NOT met (see [FAIL])")


def test_check_packages_marks_old_and_missing_packages():
    have = md.version("numpy")
    assert check_packages({"numpy": "999.0"}) == [("numpy", have, "999.0", False)]
    assert check_packages({"numpy": "1.0"}) == [("numpy", have, "1.0", True)]
    assert check_packages({"numpy": have}) == [("numpy", have, have, True)]   # equal is enough
    name = "dgss-lessons-surely-not-installed-pkg"
    assert check_packages({name: "1.0"}) == [(name, "missing", "1.0", False)]
    rows = check_packages({"torch": "2.4", name: "0.1"})
    assert [r[0] for r in rows] == ["torch", name] and [r[3] for r in rows] == [True, False]


def test_check_packages_compares_versions_numerically(monkeypatch):
    monkeypatch.setattr(check_env, "md", fake_metadata(
        {"a": "1.10.0", "b": "2.14.1+cu130", "c": "1.0.31", "d": "0.9.9"}))
    rows = check_packages({"a": "1.9", "b": "2.14.1", "c": "1.0.9", "d": "1.0"})
    assert [r[3] for r in rows] == [True, True, True, False]


def test_check_packages_treats_trailing_zeros_as_equal(monkeypatch):
    monkeypatch.setattr(check_env, "md", fake_metadata({"pyyaml": "6.0"}))
    assert check_packages({"pyyaml": "6.0.0"}) == [("pyyaml", "6.0", "6.0.0", True)]


def test_declared_minimums_include_torch():
    mins = declared_minimums()
    assert mins["torch"] == "2.4"
    assert {"numpy", "tqdm", "torchvision"} <= set(mins)
    assert all(re.fullmatch(r"[0-9.]+", v) for v in mins.values())


def test_declared_minimums_from_metadata_and_fallback(monkeypatch):
    reqs = ["torch>=2.4", "numpy >= 1.26", "PyYAML>=6.0", 'pytest>=8.0; extra == "dev"',
            "somepkg"]
    monkeypatch.setattr(check_env, "md", fake_metadata(requires=reqs))
    assert declared_minimums() == {"torch": "2.4", "numpy": "1.26", "pyyaml": "6.0"}
    monkeypatch.setattr(check_env, "md", fake_metadata(requires=None))     # not installed
    assert declared_minimums() == MINIMUMS
    assert declared_minimums() is not MINIMUMS


def test_fallback_minimums_match_pyproject():
    tomllib = pytest.importorskip("tomllib")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    declared = dict(re.fullmatch(r"([A-Za-z0-9_.\-]+)>=([0-9.]+)", d).groups() for d in deps)
    assert {k.lower(): v for k, v in declared.items()} == MINIMUMS


def test_mamba_status_without_cuda():
    status = mamba_status()
    assert isinstance(status, str) and status
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: the fused kernel may be used here")
    assert status == "not used (no CUDA): lessons use the pure-PyTorch scan"


def test_running_the_module_exits_zero():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "lessons.check_env"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[OK] torch " in proc.stdout
    assert proc.stdout.rstrip().endswith("all requirements met")


def test_mamba_status_says_why_the_kernel_does_not_import(monkeypatch):
    import torch

    from lessons import ssm

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    why = "ImportError: libcudart.so.12: cannot open shared object file"
    monkeypatch.setattr(ssm, "_mamba_ssm_import", lambda: (None, why))
    status = check_env.mamba_status()
    assert why in status and "does not import" in status and "install_mamba_ssm" in status
    assert ssm.mamba_ssm_import_error() == why and not ssm.mamba_ssm_available()
