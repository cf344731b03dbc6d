"""Check this environment against what dgss-lessons needs: ``python -m lessons.check_env``.

Prints Python and package versions with ``[OK]`` / ``[FAIL]`` against the minimums declared in
``pyproject.toml`` (the installed distribution's metadata), the compute device, and whether the
fused Mamba kernel (``mamba_ssm``, optional, CUDA only) imports. Exit code 1 if a required package
is missing or too old. Paste its output into bug reports.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import platform
import re
import sys

__all__ = [
    "MINIMUMS",
    "PYTHON_RANGE",
    "check_packages",
    "declared_minimums",
    "main",
    "mamba_status",
]

# Fallback minimums when the package metadata is unavailable (running from a source tree).
MINIMUMS: dict[str, str] = {
    "torch": "2.4", "torchvision": "0.19", "timm": "1.0.9", "open_clip_torch": "2.26",
    "einops": "0.8", "numpy": "1.26", "scipy": "1.11", "safetensors": "0.4.3",
    "matplotlib": "3.8", "seaborn": "0.13", "pandas": "2.0", "tqdm": "4.66", "pyyaml": "6.0",
    "diffusers": "0.30", "transformers": "4.40", "tensorboard": "2.16", "imageio": "2.31",
    "imageio-ffmpeg": "0.5",
}
PYTHON_RANGE = ((3, 10), (3, 14))  # >=3.10,<3.14


def _version_tuple(v: str) -> tuple[int, ...]:
    """(major, minor, micro) of a version string, zero-padded so 6.0 == 6.0.0."""
    parts = [int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3]]
    return tuple(parts + [0] * (3 - len(parts)))


def declared_minimums() -> dict[str, str]:
    """Runtime requirements with their lower bounds, from the installed package's metadata."""
    try:
        reqs = md.requires("dgss-lessons") or []
    except md.PackageNotFoundError:
        return dict(MINIMUMS)
    out = {}
    for r in reqs:
        if "extra ==" in r:
            continue
        m = re.match(r"([A-Za-z0-9_.\-]+)\s*>=\s*([0-9.]+)", r)
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out or dict(MINIMUMS)


def check_packages(minimums: dict[str, str]) -> list[tuple[str, str, str, bool]]:
    """(name, installed version or 'missing', minimum, ok) for each requirement."""
    rows = []
    for name, minimum in minimums.items():
        try:
            have = md.version(name)
        except md.PackageNotFoundError:
            rows.append((name, "missing", minimum, False))
            continue
        rows.append((name, have, minimum, _version_tuple(have) >= _version_tuple(minimum)))
    return rows


def mamba_status() -> str:
    """Whether the fused selective-scan kernel can be used here."""
    try:
        import torch
    except ImportError:
        return "torch missing"
    if not torch.cuda.is_available():
        return "not used (no CUDA): lessons use the pure-PyTorch scan"
    from lessons.ssm import INSTALL_HINT, mamba_ssm_import_error

    reason = mamba_ssm_import_error()
    if reason is not None:
        return f"selective_scan_fn does not import ({reason}): {INSTALL_HINT}"
    return f"available (mamba_ssm {md.version('mamba-ssm')})"


def main() -> int:
    ok_all = True
    py_ok = PYTHON_RANGE[0] <= sys.version_info[:2] < PYTHON_RANGE[1]
    ok_all &= py_ok
    print(f"[{'OK' if py_ok else 'FAIL'}] python {platform.python_version()} "
          f"(need >=3.10,<3.14) on {platform.system()} {platform.machine()}")
    for name, have, minimum, ok in check_packages(declared_minimums()):
        ok_all &= ok
        print(f"[{'OK' if ok else 'FAIL'}] {name} {have} (need >={minimum})")
    try:
        import torch  # noqa: F401

        from lessons.utils import get_device, hardware

        print(f"[OK] device: {get_device()}, {hardware()}")
    except ImportError:
        print("[FAIL] device: torch is not importable")
        ok_all = False
    print(f"[--] fused Mamba kernel: {mamba_status()}")
    try:
        from lessons.toyworld import TOYWORLD_VERSION

        print(f"[OK] lessons {importlib.import_module('lessons').__version__}, "
              f"ToyWorld {TOYWORLD_VERSION}")
    except Exception as e:
        print(f"[FAIL] lessons does not import: {type(e).__name__}: {e}")
        ok_all = False
    print("all requirements met" if ok_all else "some requirements are NOT met (see [FAIL])")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
