"""reprod.install_mamba_ssm without a GPU, nvcc or network: arch parsing, the setup.py patch, the
sdist handling and --dry-run end to end on a synthetic sdist."""

from __future__ import annotations

import ast
import io
import subprocess
import tarfile
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from reprod import install_mamba_ssm as ims

# A made-up setup.py with the shape of mamba-ssm's: a ROCm branch, a CUDA branch that appends a
# hard-coded -gencode list (some entries behind nvcc-version checks), and nvcc flags "+ cc_flag".
SETUP_PY = textwrap.dedent('''\
    import os
    from setuptools import setup
    from torch.utils.cpp_extension import CUDAExtension

    SKIP = os.getenv("SKIP") == "TRUE"
    ROCM = False
    NVCC_MAJOR = 13
    ext_modules = []

    if not SKIP:
        cc_flag = []
        if ROCM:
            cc_flag.append("-DROCM")
        else:
            cc_flag.append("-gencode")
            cc_flag.append("arch=compute_80,code=sm_80")
            if NVCC_MAJOR >= 12:
                cc_flag.append("-gencode")
                cc_flag.append("arch=compute_90,code=sm_90")
            if NVCC_MAJOR >= 13:
                cc_flag.append("-gencode")
                cc_flag.append("arch=compute_120,code=sm_120")

        nvcc_args = ["-O3", "--use_fast_math"] + cc_flag
        ext_modules.append(
            CUDAExtension(
                name="toy_scan_cuda",
                sources=["csrc/scan.cu"],
                extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_args},
            )
        )

    setup(name="mamba_ssm", ext_modules=ext_modules)
''')

H100 = ims.Arch(9, 0)


def cc_flag_after(text: str) -> list[str]:
    """Run the patched setup.py's module body up to the nvcc flags and return cc_flag."""
    head = text.split("    nvcc_args =")[0]
    scope: dict = {}
    exec(compile(head.replace("from torch.utils.cpp_extension import CUDAExtension", "")
                 .replace("from setuptools import setup", ""), "setup.py", "exec"), scope)
    return scope["cc_flag"]


def make_sdist(tmp_path: Path, setup_py: str = SETUP_PY, version: str = "2.3.2.post1") -> Path:
    top = f"mamba_ssm-{version}"
    sdist = tmp_path / f"{top}.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        pkg_info = f"Metadata-Version: 2.4\nName: mamba_ssm\nVersion: {version}\n"
        files = {"setup.py": setup_py, "PKG-INFO": pkg_info, "csrc/scan.cu": "// toy\n"}
        for name, body in files.items():
            data = body.encode()
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return sdist


def fake_env(**kw) -> ims.Environment:
    base = dict(torch_version="2.14.1+cu130", torch_cuda="13.0", gpu=None,
                nvcc=Path("/opt/cuda/bin/nvcc"), ninja=True)
    return ims.Environment(**{**base, **kw})


@pytest.fixture
def no_subprocess(monkeypatch):
    """Any subprocess call fails the test: proves that nothing is built or downloaded."""
    calls: list = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError(f"subprocess called: {args}")

    for name in ("run", "Popen", "call", "check_call", "check_output"):
        monkeypatch.setattr(subprocess, name, refuse)
    return calls


# ------------------------------------------------------------------------------------------------
# --arch
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["90", "9.0", "sm_90", "SM90", " compute_90 "])
def test_parse_arch_h100_spellings(text):
    arch = ims.parse_arch(text)
    assert arch == H100 and arch.sm == "sm_90"
    assert arch.gencode == "arch=compute_90,code=sm_90"


@pytest.mark.parametrize(("text", "sm"), [("8.6", "sm_86"), ("120", "sm_120"), ("10.3", "sm_103"),
                                          ("75", "sm_75")])
def test_parse_arch_others(text, sm):
    assert ims.parse_arch(text).sm == sm


@pytest.mark.parametrize(("text", "says"), [
    ("h100", "give a compute capability such as 90, 9.0 or sm_90"),
    ("9", "give a compute capability"),
    ("9.", "give a compute capability"),
    ("90a", "suffixes such as 90a are not supported"),
    ("", "give a compute capability"),
    ("7.0", "older than sm_75"),
    ("61", "older than sm_75"),
    ("900", "no NVIDIA compute capability 90.0"),
])
def test_parse_arch_rejects_with_reason(text, says):
    with pytest.raises(ValueError, match=says):
        ims.parse_arch(text)


def test_bad_arch_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        ims.parse_args(["--arch", "hopper"])
    assert e.value.code == 2
    assert "argument --arch" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# The setup.py patch
# ------------------------------------------------------------------------------------------------

def test_synthetic_setup_py_builds_three_arches_unpatched():
    assert cc_flag_after(SETUP_PY) == ["-gencode", "arch=compute_80,code=sm_80",
                                       "-gencode", "arch=compute_90,code=sm_90",
                                       "-gencode", "arch=compute_120,code=sm_120"]


def test_patch_leaves_exactly_one_arch():
    patch = ims.patch_setup_py(SETUP_PY, ims.parse_arch("8.6"))
    assert cc_flag_after(patch.text) == ["-gencode", "arch=compute_86,code=sm_86"]
    assert patch.text.count(ims.PATCH_MARKER) == 1
    assert patch.hard_coded == ["sm_80", "sm_90", "sm_120"]
    ast.parse(patch.text)


def test_patch_sits_at_the_end_of_the_cuda_branch():
    patch = ims.patch_setup_py(SETUP_PY, H100)
    lines = patch.text.splitlines()
    inserted = lines[patch.line - 1]
    assert inserted == (f'        cc_flag = ["-gencode", "arch=compute_90,code=sm_90"]  '
                        f"{ims.PATCH_MARKER}")
    assert lines[patch.line - 2].strip() == 'cc_flag.append("arch=compute_120,code=sm_120")'
    assert [lines[n - 1].strip() for n in patch.used_at] == [
        'nvcc_args = ["-O3", "--use_fast_math"] + cc_flag']
    # every other line is unchanged
    assert lines[: patch.line - 1] + lines[patch.line:] == SETUP_PY.splitlines()


def test_patch_missing_anchor_names_file_and_version():
    no_list = SETUP_PY.replace('cc_flag.append("-gencode")', 'cc_flag += ["-gencode"]')
    with pytest.raises(ims.PatchError) as e:
        ims.patch_setup_py(no_list, H100, "/x/mamba_ssm-9.9/setup.py", "9.9")
    msg = str(e.value)
    assert "/x/mamba_ssm-9.9/setup.py" in msg and "mamba-ssm 9.9" in msg
    assert 'cc_flag.append("-gencode") was not found' in msg and "Not building" in msg


@pytest.mark.parametrize(("edit", "says"), [
    (lambda t: t + ims.PATCH_MARKER + "\n", "already patched"),
    (lambda t: t.replace("    nvcc_args =", '    cc_flag.append("-gencode")\n'
                         '    cc_flag.append("arch=compute_75,code=sm_75")\n'
                         "    nvcc_args ="), "more than one block"),
    (lambda t: t.replace(' + cc_flag', ''), r"no `\+ cc_flag`"),
    (lambda t: t.replace("if not SKIP:", "if not SKIP"), "does not parse"),
])
def test_patch_refuses_other_shapes(edit, says):
    with pytest.raises(ims.PatchError, match=says):
        ims.patch_setup_py(edit(SETUP_PY), H100)


# ------------------------------------------------------------------------------------------------
# The sdist
# ------------------------------------------------------------------------------------------------

def test_unpack_and_version(tmp_path):
    src = ims.unpack_sdist(make_sdist(tmp_path, version="2.3.2.post1"), tmp_path / "src")
    assert (src / "setup.py").read_text() == SETUP_PY
    assert ims.sdist_version(src) == "2.3.2.post1"


def test_unpack_refuses_paths_outside(tmp_path):
    sdist = tmp_path / "evil.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(ims.InstallError, match="outside"):
        ims.unpack_sdist(sdist, tmp_path / "src")
    assert not (tmp_path / "escaped.txt").exists()


def test_unpack_refuses_links_and_non_tars(tmp_path):
    sdist = tmp_path / "link.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        info = tarfile.TarInfo("pkg/setup.py")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(info)
    with pytest.raises(ims.InstallError, match="not a plain file"):
        ims.unpack_sdist(sdist, tmp_path / "src")
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(ims.InstallError, match="cannot unpack"):
        ims.unpack_sdist(tmp_path / "junk.tar.gz", tmp_path / "src2")


# ------------------------------------------------------------------------------------------------
# The environment
# ------------------------------------------------------------------------------------------------

def fake_torch(cuda: str | None, capability: tuple[int, int] | None, cuda_home: str | None = None):
    return SimpleNamespace(
        __version__="2.14.1+" + ("cu130" if cuda else "cpu"),
        version=SimpleNamespace(cuda=cuda, hip=None),
        cuda=SimpleNamespace(is_available=lambda: capability is not None,
                             get_device_capability=lambda i=0: capability,
                             get_device_name=lambda i=0: "NVIDIA H200"),
        utils=SimpleNamespace(cpp_extension=SimpleNamespace(CUDA_HOME=cuda_home)))


@pytest.fixture
def no_cuda_toolkit(monkeypatch, tmp_path):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))


def test_probe_detects_the_gpu(no_cuda_toolkit, tmp_path):
    (tmp_path / "cuda" / "bin").mkdir(parents=True)
    (tmp_path / "cuda" / "bin" / "nvcc").write_text("")
    env = ims.probe_environment(fake_torch("13.0", (9, 0), str(tmp_path / "cuda")))
    assert env.gpu == (9, 0) and env.nvcc == tmp_path / "cuda" / "bin" / "nvcc"
    arch, source = ims.choose_arch(None, env)
    assert arch == H100 and "H200" in source
    assert not [p for p in ims.environment_problems(env) if "CPU build" in p or "nvcc" in p]


def test_probe_cpu_machine_finds_nothing(no_cuda_toolkit):
    env = ims.probe_environment(fake_torch(None, None))
    assert env.gpu is None and env.nvcc is None and env.torch_cuda is None
    problems = " ".join(ims.environment_problems(env))
    assert "CPU build" in problems and "nvcc" in problems


def test_no_gpu_no_nvcc_no_arch_is_a_clear_error(no_cuda_toolkit, monkeypatch, capsys,
                                                 no_subprocess):
    cpu_env = ims.probe_environment(fake_torch(None, None))
    monkeypatch.setattr(ims, "probe_environment", lambda: cpu_env)
    assert ims.main([]) == 1
    err = capsys.readouterr().err
    assert "cannot detect the GPU architecture" in err and "CPU build" in err
    assert "--arch 90" in err and "pure-PyTorch" in err
    assert no_subprocess == []


def test_cuda_torch_without_gpu_asks_for_arch(monkeypatch, capsys, no_subprocess):
    monkeypatch.setattr(ims, "probe_environment", lambda: fake_env(nvcc=None))
    assert ims.main(["--dry-run"]) == 1
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err


def test_no_nvcc_stops_a_real_build(monkeypatch, capsys, no_subprocess, tmp_path):
    monkeypatch.setattr(ims, "probe_environment", lambda: fake_env(nvcc=None))
    assert ims.main(["--arch", "90", "--sdist", str(make_sdist(tmp_path))]) == 1
    err = capsys.readouterr().err
    assert "nvcc (the CUDA compiler) was not found" in err and "pure-PyTorch" in err


# ------------------------------------------------------------------------------------------------
# --dry-run end to end
# ------------------------------------------------------------------------------------------------

def test_dry_run_patches_and_prints_without_building(monkeypatch, capsys, no_subprocess, tmp_path):
    monkeypatch.setattr(ims, "probe_environment", lambda: fake_env())
    monkeypatch.delenv("CUDA_HOME", raising=False)
    work = tmp_path / "work"
    rc = ims.main(["--sdist", str(make_sdist(tmp_path)), "--arch", "9.0", "--dry-run",
                   "--jobs", "3", "--workdir", str(work)])
    out = capsys.readouterr().out
    assert rc == 0 and no_subprocess == []
    assert 'cc_flag = ["-gencode", "arch=compute_90,code=sm_90"]' in out
    assert "hard-codes 3 arches" in out and "sm_80 sm_90 sm_120" in out
    assert "MAMBA_FORCE_BUILD=TRUE" in out and "MAX_JOBS=3" in out
    assert "CUDA_HOME=/opt/cuda" in out
    assert "-m pip install -v --no-build-isolation --no-deps --no-index" in out
    assert "nothing built or installed" in out
    setup_py = work / "src" / "mamba_ssm-2.3.2.post1" / "setup.py"
    assert cc_flag_after(setup_py.read_text()) == ["-gencode", "arch=compute_90,code=sm_90"]


def test_dry_run_with_keep_wheel_prints_both_steps(monkeypatch, capsys, no_subprocess, tmp_path):
    monkeypatch.setattr(ims, "probe_environment", lambda: fake_env())
    rc = ims.main(["--sdist", str(make_sdist(tmp_path)), "--arch", "sm_90", "--dry-run",
                   "--keep-wheel", str(tmp_path / "dist"), "--target", str(tmp_path / "site")])
    out = capsys.readouterr().out
    assert rc == 0 and no_subprocess == []
    dist, site = tmp_path / "dist", tmp_path / "site"
    assert f"-m pip wheel -v --no-build-isolation --no-deps --no-index -w {dist}" in out
    assert f"--target {site} --find-links {dist} mamba-ssm==2.3.2.post1" in out


def test_dry_run_stops_on_an_unknown_setup_py(monkeypatch, capsys, no_subprocess, tmp_path):
    monkeypatch.setattr(ims, "probe_environment", lambda: fake_env())
    sdist = make_sdist(tmp_path, SETUP_PY.replace("cc_flag.append", "cc_flag.extend"), "3.0")
    assert ims.main(["--sdist", str(sdist), "--arch", "90", "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "mamba_ssm-3.0/setup.py of mamba-ssm 3.0" in err and "was not found" in err


def test_build_env_drops_skip_and_sets_force(monkeypatch):
    monkeypatch.setenv("MAMBA_SKIP_CUDA_BUILD", "TRUE")
    seen = {}

    def fake_run(cmd, env, check):
        seen.update(env)
        return SimpleNamespace(returncode=0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    ims.run_builds([["pip", "-m", "pip", "install"]],
                   ims.build_env_overrides(4, fake_env(nvcc=None)))
    assert "MAMBA_SKIP_CUDA_BUILD" not in seen
    assert seen["MAMBA_FORCE_BUILD"] == "TRUE" and seen["MAX_JOBS"] == "4"


def test_a_failing_cuda_query_is_named(no_cuda_toolkit):
    torch = fake_torch("13.0", (9, 0))

    def broken(i=0):
        raise RuntimeError("CUDA driver initialization failed")

    torch.cuda.get_device_capability = broken
    env = ims.probe_environment(torch)
    assert env.gpu is None and "driver initialization failed" in env.gpu_error
    with pytest.raises(ims.InstallError, match="querying GPU 0 failed .*driver initialization"):
        ims.choose_arch(None, env)
