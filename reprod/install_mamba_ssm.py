"""Build and install mamba-ssm's fused selective-scan kernel for this machine's NVIDIA GPU.

    python -m reprod.install_mamba_ssm                     # the GPU here, mamba-ssm 2.3.2.post1
    python -m reprod.install_mamba_ssm --arch 90           # for an H100 (9.0) not visible here
    python -m reprod.install_mamba_ssm --sdist mamba_ssm-2.3.2.post1.tar.gz   # offline GPU machine
    python -m reprod.install_mamba_ssm --keep-wheel dist/  # also keep the wheel, to reuse it
    python -m reprod.install_mamba_ssm --dry-run           # patch and print; build nothing

It installs into the *current* Python environment (the one running this script), or into
``--target DIR``. Nothing in the lessons needs it: every lesson runs on the pure-PyTorch scan of
``lessons/ssm.py``; the fused kernel only makes ``impl="auto"`` faster on CUDA tensors.

What it does:

1. Finds the compute capability of GPU 0 with ``torch.cuda.get_device_capability()``, or takes
   ``--arch`` (90, 9.0 or sm_90). It stops with an error when torch is a CPU build, when ``nvcc``
   is missing (``$CUDA_HOME``, torch's ``CUDA_HOME``, then ``PATH``), or when no GPU is visible and
   no ``--arch`` is given.
2. Takes the sdist from ``--sdist`` or downloads it from PyPI with ``pip download --no-binary
   :all: --no-build-isolation`` and ``MAMBA_SKIP_CUDA_BUILD=TRUE`` (setup.py imports torch and
   probes CUDA just to produce metadata), then unpacks it into a temporary folder (``--workdir``
   keeps it).
3. Patches ``setup.py`` so that nvcc compiles for exactly one architecture (see below).
4. Builds with ``MAMBA_FORCE_BUILD=TRUE MAX_JOBS=<n> pip install -v --no-build-isolation
   --no-deps --no-index --force-reinstall <source>`` (or ``pip wheel`` with ``--keep-wheel``),
   then checks in a fresh interpreter that
   ``from mamba_ssm.ops.selective_scan_interface import selective_scan_fn`` imports.

Facts it relies on (the mamba-ssm 2.3.2.post1 sdist's ``setup.py`` from PyPI; state-spaces/mamba
issue #1019 and PR #977; torch's ``torch/utils/cpp_extension.py``, ``_get_cuda_arch_flags``):

- **One arch, not nine.** setup.py appends a hard-coded ``-gencode`` list of up to nine
  architectures (sm_75 ... sm_121 with nvcc 13). ``TORCH_CUDA_ARCH_LIST`` is ignored: torch adds
  no arch flags of its own once any nvcc flag mentions an arch. Hence the patch: after the list
  is built, ``cc_flag`` is set to the one ``-gencode`` pair for this GPU.
  Measured for sm_90 only: 2 min 40 s wall (16 min CPU) on 16 cores (H100, torch 2.11+cu130,
  nvcc 13.0). All nine default arches take roughly 9x as long.
- **No prebuilt wheel for recent torch.** The project's wheel matrix stops at torch 2.10.
  ``MAMBA_FORCE_BUILD=TRUE`` skips the wheel guess, which otherwise calls GitHub without a
  timeout and fails offline with an uncaught ``URLError``.
- **--no-build-isolation**: torch is left out of the build requirements, yet setup.py imports it;
  an isolated build fails with ``No module named 'torch'`` (or would build against a CPU torch).
- **--no-deps**: the declared dependencies pull tilelang, quack-kernels, nvidia-cutlass-dsl and
  more (well over 150 MB), none of which the Mamba modules need to import, and can upgrade torch.
  Importing ``mamba_ssm`` needs only einops, triton, transformers and huggingface_hub.
- **--force-reinstall**: an already installed mamba-ssm of the same version (say the
  kernel-less CPU wheel) would otherwise be kept.
- Each of the ``MAX_JOBS`` compile jobs runs nvcc with ``--threads 4``; lower ``--jobs`` when
  memory is short. Without ``ninja`` the nine ``.cu`` files compile one at a time.
- ``causal-conv1d`` is optional and not installed here: only Mamba1's fused ``mamba_inner_fn``
  path and Mamba2's default memory-efficient path use it; the lessons never need it.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "BUILD_MODULES",
    "DEFAULT_VERSION",
    "MAX_MAJOR",
    "MIN_ARCH",
    "NO_MAMBA_NEEDED",
    "PATCH_MARKER",
    "RUNTIME_MODULES",
    "VERIFY_CODE",
    "Arch",
    "Environment",
    "InstallError",
    "Patch",
    "PatchError",
    "build_commands",
    "build_env_overrides",
    "check_arch",
    "check_patch",
    "choose_arch",
    "describe",
    "download_sdist",
    "environment_notes",
    "environment_problems",
    "find_nvcc",
    "install",
    "main",
    "minutes",
    "missing_modules",
    "parse_arch",
    "parse_args",
    "patch_setup_py",
    "prepare",
    "probe_environment",
    "report_patch",
    "run_builds",
    "sdist_version",
    "show_command",
    "unpack_sdist",
    "verify_import",
    "workspace",
]

DEFAULT_VERSION = "2.3.2.post1"
MIN_ARCH = (7, 5)  # the oldest architecture in mamba-ssm 2.3.2's own -gencode list
MAX_MAJOR = 15
BUILD_MODULES = ("setuptools", "wheel", "packaging")
RUNTIME_MODULES = ("einops", "triton", "transformers", "huggingface_hub")
PATCH_MARKER = "# one arch only (reprod.install_mamba_ssm)"
NO_MAMBA_NEEDED = ("Nothing was installed. The lessons do not need mamba-ssm: every lesson runs on "
                   "the pure-PyTorch selective scan in lessons/ssm.py.")
VERIFY_CODE = ("from mamba_ssm.ops.selective_scan_interface import selective_scan_fn\n"
               "import mamba_ssm, selective_scan_cuda\n"
               "print('mamba_ssm', mamba_ssm.__version__, 'from', mamba_ssm.__file__)\n"
               "print('selective_scan_cuda from', selective_scan_cuda.__file__)\n")


class InstallError(Exception):
    """A reason to stop, meant for the user."""


class PatchError(InstallError):
    """setup.py does not have the shape the patch expects."""


# ------------------------------------------------------------------------------------------------
# Architectures
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Arch:
    """A CUDA compute capability, e.g. Arch(9, 0) for sm_90."""

    major: int
    minor: int

    @property
    def sm(self) -> str:
        return f"sm_{self.major}{self.minor}"

    @property
    def gencode(self) -> str:
        return f"arch=compute_{self.major}{self.minor},code=sm_{self.major}{self.minor}"

    def __str__(self) -> str:
        return f"{self.sm} (compute capability {self.major}.{self.minor})"


_ARCH_RE = re.compile(r"^(?:sm_?|compute_?)?(?:(\d{1,2})\.(\d)|(\d{1,2})(\d))$")


def check_arch(arch: Arch) -> Arch:
    """``arch`` itself, or ValueError when mamba-ssm cannot be built for it."""
    if (arch.major, arch.minor) < MIN_ARCH:
        raise ValueError(f"{arch.sm} is older than sm_75, the oldest architecture mamba-ssm "
                         f"{DEFAULT_VERSION} compiles for")
    if arch.major > MAX_MAJOR:
        raise ValueError(f"there is no NVIDIA compute capability {arch.major}.{arch.minor}")
    return arch


def parse_arch(text: str) -> Arch:
    """Read ``90``, ``9.0``, ``sm_90`` or ``compute_90``; ValueError with the reason otherwise."""
    m = _ARCH_RE.match(text.strip().lower())
    if m is None:
        raise ValueError(f"cannot read {text!r} as a GPU architecture: give a compute capability "
                         "such as 90, 9.0 or sm_90 (8.6: RTX 30xx/A10, 8.9: RTX 40xx/L4, "
                         "9.0: H100/H200); suffixes such as 90a are not supported")
    major, minor = (m[1], m[2]) if m[1] is not None else (m[3], m[4])
    return check_arch(Arch(int(major), int(minor)))


def _arch_arg(text: str) -> Arch:
    try:
        return parse_arch(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# ------------------------------------------------------------------------------------------------
# The environment
# ------------------------------------------------------------------------------------------------

@dataclass
class Environment:
    """What this Python environment offers for the build."""

    torch_version: str | None = None  # None: torch does not import
    torch_cuda: str | None = None  # torch.version.cuda; None for a CPU (or ROCm) build
    torch_hip: str | None = None
    gpu: tuple[int, int] | None = None  # compute capability of GPU 0, when one is visible
    gpu_name: str | None = None
    gpu_error: str | None = None  # why GPU 0 could not be queried, when CUDA failed
    nvcc: Path | None = None
    ninja: bool = True
    missing_build: tuple[str, ...] = ()
    missing_runtime: tuple[str, ...] = ()


def find_nvcc(torch_cuda_home: str | None) -> Path | None:
    """nvcc from ``$CUDA_HOME``, ``$CUDA_PATH``, torch's ``CUDA_HOME``, then ``PATH``."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), torch_cuda_home):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return Path(home) / "bin" / "nvcc"
    found = shutil.which("nvcc")
    return Path(found) if found else None


def missing_modules(names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(n for n in names if importlib.util.find_spec(n) is None)


def _torch_cuda_home(torch: Any) -> str | None:
    if not torch.version.cuda:
        return None
    try:
        ext = getattr(torch.utils, "cpp_extension", None)
        if ext is None:
            ext = importlib.import_module("torch.utils.cpp_extension")
        return ext.CUDA_HOME
    except Exception:  # a broken CUDA install must not hide the clearer errors below
        return None


def _first_gpu(torch: Any) -> tuple[tuple[int, int] | None, str | None, str | None]:
    """(compute capability, name, None) of GPU 0, (None, None, None) without one, or
    (None, None, why) when CUDA fails to answer (a driver or runtime error)."""
    if not torch.cuda.is_available():
        return None, None, None
    try:
        major, minor = torch.cuda.get_device_capability(0)
        name = str(torch.cuda.get_device_name(0))
    except (RuntimeError, AssertionError, OSError) as e:    # CUDA's errors, torch's asserts
        return None, None, f"{type(e).__name__}: {e}"
    return (int(major), int(minor)), name, None


def probe_environment(torch: Any = None) -> Environment:
    """Probe torch (``torch``: a stand-in module for tests), nvcc, ninja and the helper packages."""
    env = Environment(ninja=shutil.which("ninja") is not None,
                      missing_build=missing_modules(BUILD_MODULES),
                      missing_runtime=missing_modules(RUNTIME_MODULES))
    if torch is None:
        try:
            torch = importlib.import_module("torch")
        except ImportError:
            env.nvcc = find_nvcc(None)
            return env
    env.torch_version = str(torch.__version__)
    env.torch_cuda = torch.version.cuda
    env.torch_hip = getattr(torch.version, "hip", None)
    env.nvcc = find_nvcc(_torch_cuda_home(torch))
    env.gpu, env.gpu_name, env.gpu_error = _first_gpu(torch)
    return env


def choose_arch(option: Arch | None, env: Environment) -> tuple[Arch, str]:
    """The architecture to build for and where it came from; InstallError when there is none."""
    if option is not None:
        return option, "from --arch"
    if env.torch_version is None:
        why = "torch does not import in this environment"
    elif env.torch_cuda is None:
        why = f"torch {env.torch_version} is a CPU build, so it cannot see a GPU"
    elif env.gpu_error is not None:
        why = f"querying GPU 0 failed ({env.gpu_error})"
    elif env.gpu is None:
        why = "torch.cuda.is_available() is False: no NVIDIA GPU is visible"
    else:
        try:
            return check_arch(Arch(*env.gpu)), f"detected on GPU 0, {env.gpu_name}"
        except ValueError as e:
            raise InstallError(f"GPU 0 ({env.gpu_name}): {e}") from None
    raise InstallError(f"cannot detect the GPU architecture: {why}, and no --arch was given. "
                       "On a GPU machine, run this script there; to build for a GPU that is not "
                       "here, pass --arch (e.g. --arch 90 for an H100).")


def environment_problems(env: Environment) -> list[str]:
    """Why a real build would fail here (empty when it can start)."""
    problems = []
    if env.torch_version is None:
        problems.append("torch does not import in this environment; install a CUDA build of "
                        "torch first (setup.py imports it)")
    elif env.torch_hip:
        problems.append(f"torch {env.torch_version} is a ROCm build; this script builds for "
                        "NVIDIA GPUs only")
    elif env.torch_version is not None and env.torch_cuda is None:
        problems.append(f"torch {env.torch_version} is a CPU build; mamba-ssm's CUDA kernel needs "
                        "a CUDA build of torch (e.g. +cu130) in this environment")
    if env.nvcc is None:
        problems.append("nvcc (the CUDA compiler) was not found in $CUDA_HOME/bin, torch's "
                        "CUDA_HOME or PATH; install the CUDA toolkit (a 'devel' image) or set "
                        "CUDA_HOME")
    if env.missing_build:
        problems.append("the build needs these packages in this environment: "
                        + ", ".join(env.missing_build))
    return problems


def environment_notes(env: Environment) -> list[str]:
    """Things that do not stop the build but slow it down or break the import afterwards."""
    notes = []
    if not env.ninja:
        notes.append("ninja not found: torch then compiles one file at a time and MAX_JOBS has "
                     "no effect (pip install ninja)")
    if env.missing_runtime:
        notes.append("importing mamba_ssm needs " + ", ".join(RUNTIME_MODULES) + " (the install "
                     "uses --no-deps); missing here: " + ", ".join(env.missing_runtime))
    return notes


def describe(env: Environment) -> str:
    torch = (f"torch {env.torch_version} (CUDA {env.torch_cuda})" if env.torch_cuda
             else f"torch {env.torch_version}" if env.torch_version else "torch: missing")
    gpu = f"{env.gpu_name}, sm_{env.gpu[0]}{env.gpu[1]}" if env.gpu else "none visible"
    return (f"python {sys.executable} ({sys.version.split()[0]})\n"
            f"{torch}; GPU 0: {gpu}\nnvcc {env.nvcc or 'not found'}")


# ------------------------------------------------------------------------------------------------
# The sdist
# ------------------------------------------------------------------------------------------------

def download_sdist(version: str, dest: Path) -> Path:
    """``pip download`` the mamba-ssm sdist into ``dest`` (the only network use here)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--no-build-isolation", f"mamba-ssm=={version}", "-d", str(dest)]
    print(f"downloading the sdist: MAMBA_SKIP_CUDA_BUILD=TRUE {shlex.join(cmd)}", flush=True)
    done = subprocess.run(cmd, env={**os.environ, "MAMBA_SKIP_CUDA_BUILD": "TRUE"}, check=False)
    if done.returncode != 0:
        raise InstallError(f"pip download of mamba-ssm=={version} failed (exit "
                           f"{done.returncode}). Offline, download it on a machine with network "
                           f"(`MAMBA_SKIP_CUDA_BUILD=TRUE pip download --no-deps --no-binary :all: "
                           f"--no-build-isolation mamba-ssm=={version}`) and pass --sdist FILE.")
    found = sorted(dest.glob("*.tar.gz"))
    if len(found) != 1:
        raise InstallError(f"expected one .tar.gz from pip download in {dest}, found {len(found)}")
    return found[0]


def _checked_members(tf: tarfile.TarFile, dest: Path) -> list[tarfile.TarInfo]:
    """Regular files and folders that land inside ``dest`` (for Pythons without tar filters)."""
    root = dest.resolve()
    for member in tf.getmembers():
        if not (member.isfile() or member.isdir()):
            raise InstallError(f"refusing to unpack {member.name!r}: not a plain file or folder")
        if not (root / member.name).resolve().is_relative_to(root):
            raise InstallError(f"refusing to unpack {member.name!r}: it points outside {dest}")
    return tf.getmembers()


def unpack_sdist(sdist: Path, dest: Path) -> Path:
    """Unpack ``sdist`` into ``dest`` safely; the folder holding its setup.py."""
    if not sdist.is_file():
        raise InstallError(f"--sdist {sdist}: no such file")
    try:
        with tarfile.open(sdist) as tf:
            members = _checked_members(tf, dest)
            if hasattr(tarfile, "data_filter"):  # Python 3.12, and 3.10.12 / 3.11.4 on
                tf.extractall(dest, members=members, filter="data")
            else:
                tf.extractall(dest, members=members)
    except (tarfile.TarError, OSError) as e:
        raise InstallError(f"cannot unpack {sdist}: {e}") from None
    roots = sorted(p.parent for p in dest.glob("*/setup.py"))
    if len(roots) != 1:
        raise InstallError(f"{sdist} does not look like the mamba-ssm sdist: expected one "
                           f"<name>/setup.py inside, found {len(roots)}")
    return roots[0]


def sdist_version(src: Path) -> str:
    """The ``Version:`` in PKG-INFO, else the folder name's suffix."""
    pkg_info = src / "PKG-INFO"
    if pkg_info.is_file():
        for line in pkg_info.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip()
    return src.name.rpartition("-")[2] or "unknown"


# ------------------------------------------------------------------------------------------------
# The setup.py patch
# ------------------------------------------------------------------------------------------------

@dataclass
class Patch:
    """The patched setup.py text and where things are in it (1-based line numbers)."""

    text: str
    line: int  # the inserted ``cc_flag = [...]``
    hard_coded: list[str]  # the arches of the original list, in order
    list_lines: tuple[int, int]  # from the first -gencode append to the end of its block
    used_at: list[int]  # lines after the patch that read cc_flag


def _is_gencode_append(node: ast.AST) -> bool:
    """``cc_flag.append("-gencode")`` as a statement."""
    call = node.value if isinstance(node, ast.Expr) else None
    return (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
            and call.func.attr == "append" and isinstance(call.func.value, ast.Name)
            and call.func.value.id == "cc_flag" and len(call.args) == 1
            and isinstance(call.args[0], ast.Constant) and call.args[0].value == "-gencode")


def _enclosing_block(tree: ast.AST, stmt: ast.stmt) -> list[ast.stmt]:
    """The statement list (a body or else branch) that holds ``stmt`` directly."""
    for node in ast.walk(tree):
        for name in ("body", "orelse", "finalbody"):
            block = getattr(node, name, None)
            if isinstance(block, list) and any(s is stmt for s in block):
                return block
    raise AssertionError("unreachable: every statement sits in a block")


def patch_setup_py(text: str, arch: Arch, where: str = "setup.py",
                   version: str = DEFAULT_VERSION) -> Patch:
    """Make setup.py compile for ``arch`` only.

    The anchor is the block that builds the hard-coded list with ``cc_flag.append("-gencode")``
    (the CUDA, non-ROCm branch). One line is added at the end of that block, at its indentation:
    ``cc_flag = ["-gencode", "arch=compute_XY,code=sm_XY"]``. Every later use of ``cc_flag`` (the
    nvcc flags of the CUDAExtension) then sees one arch. PatchError when the shape differs.
    """
    def fail(why: str) -> PatchError:
        return PatchError(f"cannot patch {where} of mamba-ssm {version}: {why}. Not building: "
                          "unpatched, it would compile every hard-coded architecture (about 9x "
                          f"as long). Edit its -gencode list by hand or use {DEFAULT_VERSION}.")

    if PATCH_MARKER in text:
        raise fail("it is already patched")
    try:
        tree = ast.parse(text)
    except SyntaxError as e:
        raise fail(f"it does not parse ({e})") from None
    appends = [n for n in ast.walk(tree) if _is_gencode_append(n)]
    if not appends:
        raise fail('the anchor cc_flag.append("-gencode") was not found')
    first, last = min(n.lineno for n in appends), max(n.end_lineno for n in appends)
    block = _enclosing_block(tree, min(appends, key=lambda n: n.lineno))
    start, end = block[0].lineno, block[-1].end_lineno
    if not start <= first <= last <= end:
        raise fail("the -gencode list is built in more than one block")
    lines = text.splitlines(keepends=True)
    indent = lines[start - 1][: block[0].col_offset]
    lines.insert(end, f'{indent}cc_flag = ["-gencode", "{arch.gencode}"]  {PATCH_MARKER}\n')
    patch = Patch(text="".join(lines), line=end + 1,
                  hard_coded=re.findall(r"code=(sm_\d+a?)", text), list_lines=(first, end),
                  used_at=[i for i, ln in enumerate(lines[end + 1:], end + 2)
                           if re.search(r"\bcc_flag\b", ln)])
    check_patch(patch, arch, fail)
    return patch


def check_patch(patch: Patch, arch: Arch, fail: Any) -> None:
    """The patch applied once, parses, names ``arch`` and is the last word on cc_flag."""
    lines = patch.text.splitlines()
    after = "\n".join(lines[patch.line:])
    if patch.text.count(PATCH_MARKER) != 1 or arch.gencode not in lines[patch.line - 1]:
        raise fail("the patch did not apply exactly once")
    try:
        ast.parse(patch.text)
    except SyntaxError as e:
        raise fail(f"the patched file does not parse ({e})") from None
    if re.search(r"\bcc_flag\s*(\.append|\.extend|\.insert|\+=)|arch=compute_", after):
        raise fail("cc_flag gets more architectures after the patched line")
    if not re.search(r"\+\s*cc_flag\b", after):
        raise fail("no `+ cc_flag` (the nvcc flags) follows the -gencode list")


# ------------------------------------------------------------------------------------------------
# Building, installing, checking
# ------------------------------------------------------------------------------------------------

def build_env_overrides(jobs: int, env: Environment) -> dict[str, str]:
    """The variables the build sets on top of the current environment."""
    overrides = {"MAMBA_FORCE_BUILD": "TRUE",  # no wheel download from GitHub
                 "MAMBA_KEEP_CUDA_BUILD": "TRUE",  # ignored by 2.3.2; the next release needs it
                 "MAX_JOBS": str(jobs)}
    if env.nvcc is not None and not os.environ.get("CUDA_HOME"):
        overrides["CUDA_HOME"] = str(env.nvcc.parent.parent)
    return overrides


def build_commands(src: Path, version: str, target: Path | None, wheel_dir: Path | None,
                   install: bool = True) -> list[list[str]]:
    """The pip commands, in order: ``pip install <src>``, or ``pip wheel`` then install it."""
    pip = [sys.executable, "-m", "pip"]
    flags = ["--no-build-isolation", "--no-deps", "--no-index"]
    into = ["--target", str(target)] if target is not None else []
    if wheel_dir is None:
        return [[*pip, "install", "-v", *flags, "--force-reinstall", *into, str(src)]]
    cmds = [[*pip, "wheel", "-v", *flags, "-w", str(wheel_dir), str(src)]]
    if install:
        cmds.append([*pip, "install", "--no-deps", "--no-index", "--force-reinstall", *into,
                     "--find-links", str(wheel_dir), f"mamba-ssm=={version}"])
    return cmds


def show_command(cmd: list[str], overrides: dict[str, str]) -> str:
    return " ".join(f"{k}={shlex.quote(v)}" for k, v in overrides.items()) + " " + shlex.join(cmd)


def run_builds(cmds: list[list[str]], overrides: dict[str, str]) -> float:
    """Run the pip commands with the build variables; seconds taken."""
    env = {k: v for k, v in os.environ.items() if k != "MAMBA_SKIP_CUDA_BUILD"}
    env.update(overrides)
    start = time.perf_counter()
    for cmd in cmds:
        print(f"\n$ {show_command(cmd, overrides)}", flush=True)
        done = subprocess.run(cmd, env=env, check=False)
        if done.returncode != 0:
            raise InstallError(f"pip {cmd[3]} failed (exit {done.returncode}); nvcc's or pip's "
                               "messages above say why")
    return time.perf_counter() - start


def verify_import(target: Path | None) -> str:
    """Import the fused scan in a fresh interpreter; its report, or InstallError."""
    env = dict(os.environ)
    if target is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(target), *filter(None, [env.get("PYTHONPATH")])])
    with tempfile.TemporaryDirectory() as empty:  # not the source tree: import the installed copy
        done = subprocess.run([sys.executable, "-c", VERIFY_CODE], env=env, cwd=empty,
                              capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-6:])
        raise InstallError(f"mamba-ssm was built, but the fused scan does not import:\n{tail}\n"
                           "(a missing module: pip install " + " ".join(RUNTIME_MODULES) + ")")
    return done.stdout.strip()


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m reprod.install_mamba_ssm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=_arch_arg, help="compute capability to build for: 90, 9.0 or "
                    "sm_90 (default: that of GPU 0)")
    ap.add_argument("--version", default=DEFAULT_VERSION,
                    help=f"mamba-ssm version to download (default {DEFAULT_VERSION})")
    ap.add_argument("--sdist", type=Path, metavar="FILE",
                    help="a local mamba_ssm-*.tar.gz instead of downloading")
    ap.add_argument("--jobs", type=int, metavar="N", default=os.cpu_count() or 1,
                    help="MAX_JOBS, parallel compile jobs (default: the CPU count)")
    ap.add_argument("--target", type=Path, metavar="DIR",
                    help="install into this folder (pip --target)")
    ap.add_argument("--keep-wheel", type=Path, metavar="DIR",
                    help="build a wheel into DIR with pip wheel, then install it from there")
    ap.add_argument("--wheel-only", action="store_true",
                    help="with --keep-wheel: build the wheel, install nothing")
    ap.add_argument("--workdir", type=Path, metavar="DIR", help="unpack here (new or empty) and "
                    "keep it (default: a temporary folder, removed at the end)")
    ap.add_argument("--dry-run", action="store_true", help="get, unpack and patch the sdist, "
                    "print the build command; build nothing")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error("--jobs must be at least 1")
    if args.wheel_only and args.keep_wheel is None:
        ap.error("--wheel-only needs --keep-wheel DIR")
    for name in ("sdist", "target", "keep_wheel", "workdir"):  # pip and the check run elsewhere
        if getattr(args, name) is not None:
            setattr(args, name, getattr(args, name).resolve())
    return args


@contextlib.contextmanager
def workspace(keep: Path | None) -> Iterator[Path]:
    """``keep`` (created, must be empty), or a temporary folder removed afterwards."""
    if keep is None:
        with tempfile.TemporaryDirectory(prefix="mamba-ssm-build-") as tmp:
            yield Path(tmp)
        return
    keep.mkdir(parents=True, exist_ok=True)
    if any(keep.iterdir()):
        raise InstallError(f"--workdir {keep} is not empty")
    yield keep


def prepare(args: argparse.Namespace, arch: Arch, work: Path) -> tuple[Path, str, Patch]:
    """Get, unpack and patch the sdist: (source folder, version, patch)."""
    if args.sdist is not None:
        sdist = args.sdist
    else:
        (work / "download").mkdir()
        sdist = download_sdist(args.version, work / "download")
    src = unpack_sdist(sdist, work / "src")
    version = sdist_version(src)
    setup_py = src / "setup.py"
    patch = patch_setup_py(setup_py.read_text(encoding="utf-8"), arch, str(setup_py), version)
    setup_py.write_text(patch.text, encoding="utf-8")
    print(f"sdist    {sdist} (mamba-ssm {version})\nsource   {src}")
    if version != DEFAULT_VERSION:
        print(f"note: the patch was written for {DEFAULT_VERSION}; this is {version}")
    return src, version, patch


def report_patch(patch: Patch, arch: Arch) -> None:
    lines = patch.text.splitlines()
    first, last = patch.list_lines
    print(f"setup.py hard-codes {len(patch.hard_coded)} arches at lines {first}-{last}: "
          f"{' '.join(patch.hard_coded)}")
    print(f"patched: line {patch.line} overrides them with {arch.sm} only:")
    print(f"  {patch.line:4d} | {lines[patch.line - 1]}")
    for n in patch.used_at:
        print(f"  {n:4d} | {lines[n - 1]}")


def install(args: argparse.Namespace) -> int:
    env = probe_environment()
    arch, arch_source = choose_arch(args.arch, env)
    print(f"mamba-ssm for {arch}, {arch_source}\n{describe(env)}")
    problems = environment_problems(env)
    if problems and not args.dry_run:
        raise InstallError("; ".join(problems))
    for p in problems:
        print(f"warning (a real build would stop here): {p}")
    for note in environment_notes(env):
        print(f"note: {note}")
    with workspace(args.workdir) as work:
        src, version, patch = prepare(args, arch, work)
        report_patch(patch, arch)
        overrides = build_env_overrides(args.jobs, env)
        cmds = build_commands(src, version, args.target, args.keep_wheel, not args.wheel_only)
        if args.dry_run:
            print("build command" + ("s" if len(cmds) > 1 else "") + ":")
            for cmd in cmds:
                print(f"  {show_command(cmd, overrides)}")
            kept = "kept" if args.workdir else "temporary, removed now; --workdir DIR keeps it"
            print(f"dry run: nothing built or installed (source {kept})")
            return 0
        seconds = run_builds(cmds, overrides)
    print(f"\nbuilt for {arch.sm} in {minutes(seconds)} with MAX_JOBS={args.jobs}")
    if args.wheel_only:
        for wheel in sorted(args.keep_wheel.glob("mamba_ssm-*.whl")):
            print(f"wheel: {wheel}  (install: pip install --no-deps --force-reinstall WHEEL)")
        return 0
    print(verify_import(args.target))
    print("next: python -m lessons.check_env   # the fused Mamba kernel should read 'available'\n"
          "      pytest -m gpu                 # parity of the pure-PyTorch scan with the kernel")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return install(args)
    except InstallError as e:
        print(f"error: {e}\n{NO_MAMBA_NEEDED}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
