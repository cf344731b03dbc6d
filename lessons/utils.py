"""Small utilities every lesson uses: seeding, device and thread choice, the hardware a result
was measured on, the package digest.

Nothing here reads environment variables: notebooks and scripts pass their choices in.
"""

from __future__ import annotations

import ast
import hashlib
import os
import platform
import random
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "PACKAGE_DIR",
    "bf16_native",
    "count_parameters",
    "cpu_name",
    "get_device",
    "hardware",
    "lessons_digest",
    "lessons_imports",
    "module_closure",
    "module_files",
    "seed_everything",
    "set_threads",
]

PACKAGE_DIR = Path(__file__).resolve().parent


def seed_everything(seed: int = 0) -> None:
    """Seed Python's, NumPy's and PyTorch's (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_device(prefer: str | None = None) -> torch.device:
    """CUDA when present, else CPU (MPS only when asked for by name: its kernels still differ)."""
    if prefer is not None:
        return torch.device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_threads(n: int | None) -> int:
    """Pin PyTorch's intra-op threads (``None`` leaves them as they are); returns the count."""
    if n is not None:
        if n < 1:
            raise ValueError(f"thread count must be >= 1, got {n}")
        torch.set_num_threads(n)
    return torch.get_num_threads()


def cpu_name() -> str:
    """The processor's model name (Linux's ``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:             # not Linux: macOS and Windows have no /proc
        pass
    return platform.processor() or platform.machine() or "unknown processor"


def hardware(device: torch.device | str | None = None) -> str:
    """One line naming what a result was measured on, for logs, reports and model cards.

    A CUDA device: its name and the CUDA version (``NVIDIA H100 80GB HBM3 (CUDA 13.0)``);
    otherwise the CPU: ``CPU (<model name>, <n> cores, <t> threads)``, the threads being
    PyTorch's intra-op threads. ``None``: the device :func:`get_device` picks.
    """
    device = torch.device(device) if device is not None else get_device()
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    cpu = f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    if device.type == "mps":
        return f"Apple MPS (CPU {cpu})"
    return f"CPU ({cpu})"


def bf16_native(device: torch.device | str) -> bool:
    """Whether bfloat16 autocast runs natively on ``device``: a CUDA GPU that supports it, or a
    CPU whose oneDNN has bfloat16 kernels (AVX512-BF16 / AMX). Elsewhere PyTorch emulates it,
    several times slower than float32 (measured: 3-4x on an AVX2-only AMD EPYC)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):       # a build without oneDNN
        return False


def count_parameters(module: torch.nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters of a module."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def lessons_imports(source: str) -> set[str]:
    """The ``lessons`` modules a piece of Python source imports (``lessons.x`` -> ``x``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] == "lessons":
                if len(parts) > 1:
                    found.add(parts[1])
                else:
                    found.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "lessons" and len(parts) > 1:
                    found.add(parts[1])
    return {m for m in found if module_files(m)}


def module_files(module: str) -> list[Path]:
    """The source files of ``lessons.<module>``: its ``.py`` file, or every ``.py`` file of a
    subpackage (``lessons/exercises/``), sorted; empty when there is no such module."""
    path = PACKAGE_DIR / f"{module}.py"
    if path.exists():
        return [path]
    if (PACKAGE_DIR / module / "__init__.py").exists():
        return sorted((PACKAGE_DIR / module).glob("*.py"))
    return []


def module_closure(modules: str | set[str] | list[str]) -> list[str]:
    """The given ``lessons`` modules and every ``lessons`` module they import, transitively."""
    todo, seen = [modules] if isinstance(modules, str) else list(modules), set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        files = module_files(m)
        if not files:
            raise ValueError(f"no module lessons.{m} (looked for {PACKAGE_DIR / f'{m}.py'})")
        seen.add(m)
        for f in files:
            todo.extend(lessons_imports(f.read_text("utf-8")) - seen)
    return sorted(seen)


def lessons_digest(modules: str | list[str] | set[str] | None = None) -> str:
    """sha256 (16 hex digits) of the source of ``lessons`` modules (default: all of them).

    Notebooks record the digest of the modules they import (with their imports), so a test can
    tell when a notebook's committed outputs were made by older code.
    """
    names = module_closure(modules) if modules is not None else sorted(
        [p.stem for p in PACKAGE_DIR.glob("*.py")]
        + [p.parent.name for p in PACKAGE_DIR.glob("*/__init__.py")])
    h = hashlib.sha256()
    for m in names:
        for f in module_files(m):       # a subpackage: each file, named below the package
            name = m if f.name == f"{m}.py" else f"{m}/{f.name}"
            h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]
