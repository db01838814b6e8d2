"""The expert-choice CUDA extension's JIT build behaves like a library (CPU tests).

- the kernel sources ship in the wheel (``sglang_moe_routing/_csrc``) and a non-editable
  install finds them without ``$SGLANG_MOE_ROUTING_KERNEL_DIR``;
- the build directory lives in the user's cache, keyed by torch / CUDA / arch / source hash,
  and ``sgl-kernel/build.py`` uses the loader's directory;
- the target arch goes to nvcc as explicit ``-gencode`` flags (the same ones torch derives from
  ``TORCH_CUDA_ARCH_LIST``); nothing in ``os.environ`` changes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from sglang_moe_routing.expert_choice import cuda as ec_cuda

REPO = Path(__file__).resolve().parents[1]
ALL_FILES = ec_cuda._SOURCES + ec_cuda._DEPS


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No build-dir / kernel-dir / arch overrides; the cache under tmp_path."""
    for var in ("SGLANG_MOE_ROUTING_BUILD_DIR", "SGLANG_MOE_ROUTING_KERNEL_DIR",
                "TORCH_CUDA_ARCH_LIST"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path


# --------------------------------------------------------------------------- sources


def test_source_dir_order(clean_env, tmp_path, monkeypatch):
    # Editable checkout: the repo's sgl-kernel/csrc.
    assert ec_cuda.kernel_source_dir() == REPO / "sgl-kernel" / "csrc"
    # The env var comes first when set ...
    copy = tmp_path / "csrc"
    shutil.copytree(REPO / "sgl-kernel" / "csrc", copy)
    monkeypatch.setenv("SGLANG_MOE_ROUTING_KERNEL_DIR", str(copy))
    assert ec_cuda.kernel_source_dir() == copy
    # ... and must hold every file (no silent fallback).
    (copy / "ec_device.cuh").unlink()
    with pytest.raises(RuntimeError, match="ec_device.cuh"):
        ec_cuda.kernel_source_dir()
    # Nothing anywhere: an error that names the places looked in.
    monkeypatch.delenv("SGLANG_MOE_ROUTING_KERNEL_DIR")
    monkeypatch.setattr(ec_cuda, "_source_dir_candidates",
                        lambda: [("nowhere", tmp_path / "none")])
    with pytest.raises(RuntimeError, match="sources not found.*nowhere"):
        ec_cuda.kernel_source_dir()


def test_pyproject_lists_every_package():
    """pyproject.toml lists packages explicitly (for the _csrc mapping): none may be missing."""
    tomllib = pytest.importorskip("tomllib")
    from setuptools import find_packages

    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    on_disk = set(find_packages(str(REPO / "python")))
    assert on_disk - listed == set(), "add these packages to [tool.setuptools] packages"
    assert cfg["package-dir"]["sglang_moe_routing._csrc"] == "sgl-kernel/csrc"
    globs = cfg["package-data"]["sglang_moe_routing._csrc"]
    assert {Path(f).suffix for f in ALL_FILES} <= {g.lstrip("*") for g in globs}


# --------------------------------------------------------------------------- build directory


def test_build_dir_in_cache_keyed_by_sources(clean_env, tmp_path, monkeypatch):
    cache = tmp_path / "xdg"
    d = ec_cuda.build_directory("9.0")
    assert d.parent == cache / "sglang_moe_routing" / "ec_cuda"
    tag = d.name
    assert tag.startswith(f"torch{torch.__version__.split('+')[0]}_cu{torch.version.cuda}_sm9.0_")
    assert tag.endswith("_" + ec_cuda.source_hash())
    assert REPO not in d.parents  # nothing written into the source tree
    # Another arch, another directory.
    assert ec_cuda.build_directory("10.0") != d
    # A copy of the sources: same hash; a changed header or source: another directory.
    copy = tmp_path / "csrc"
    shutil.copytree(REPO / "sgl-kernel" / "csrc", copy)
    monkeypatch.setenv("SGLANG_MOE_ROUTING_KERNEL_DIR", str(copy))
    assert ec_cuda.build_directory("9.0") == d
    seen = {d}
    for name in ("ec_device.cuh", "ec_route.cu"):
        with open(copy / name, "a") as f:
            f.write("\n// changed\n")
        changed = ec_cuda.build_directory("9.0")
        assert changed.parent == d.parent and changed not in seen
        seen.add(changed)
    # Without XDG_CACHE_HOME: ~/.cache.
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert ec_cuda.build_directory("9.0").parent == (
        tmp_path / "home" / ".cache" / "sglang_moe_routing" / "ec_cuda")
    # A relative XDG_CACHE_HOME is ignored (XDG spec).
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    assert ec_cuda.build_directory("9.0").parent.parent.parent == tmp_path / "home" / ".cache"
    # $SGLANG_MOE_ROUTING_BUILD_DIR is used as given.
    monkeypatch.setenv("SGLANG_MOE_ROUTING_BUILD_DIR", str(tmp_path / "mine"))
    assert ec_cuda.build_directory("9.0") == tmp_path / "mine"


@pytest.mark.parametrize("arch", ["9.0", None])
def test_build_script_uses_loader_dir(clean_env, arch, monkeypatch):
    """sgl-kernel/build.py fills the directory the loader looks in."""
    if arch is None:
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")  # the default comes from the env
    cmd = [sys.executable, str(REPO / "sgl-kernel" / "build.py"), "--print-build-dir"]
    cmd += ["--arch", arch] if arch else []
    out = subprocess.run(cmd, env=dict(os.environ), capture_output=True, text=True, timeout=120,
                         cwd=clean_env)
    assert out.returncode == 0, out.stderr
    printed = Path(out.stdout.strip().splitlines()[-1])
    assert printed == ec_cuda.build_directory(arch)
    assert f"_sm{arch or '9.0a'}_" in printed.name


# --------------------------------------------------------------------------- arch flags


@pytest.mark.parametrize("archs", ["9.0", "9.0a", "8.0;9.0+PTX", "8.6 9.0", "10.0+PTX", "Hopper",
                                   "Ampere;Hopper"])
def test_arch_flags_match_torch(archs, monkeypatch):
    """Our flags = the ones torch derives from the same TORCH_CUDA_ARCH_LIST (so the kernels
    are compiled exactly as when the old loader set the env var), and with ours present torch
    adds none."""
    from torch.utils.cpp_extension import _get_cuda_arch_flags

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", archs)
    torch_flags = _get_cuda_arch_flags()
    assert ec_cuda.cuda_arch_flags() == torch_flags
    assert ec_cuda.cuda_arch_flags(archs) == torch_flags
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    assert ec_cuda.cuda_arch_flags(archs) == torch_flags
    assert _get_cuda_arch_flags(ec_cuda._extra_cuda_cflags(archs)) == []


def test_arch_flags_hopper_default():
    assert ec_cuda.cuda_arch_flags("9.0") == ["-gencode=arch=compute_90,code=sm_90"]
    assert ec_cuda._extra_cuda_cflags("9.0") == [
        "-O3", "--expt-relaxed-constexpr", "-lineinfo", "-gencode=arch=compute_90,code=sm_90"]
    for bad in ("--use_fast_math", "-ftz=true"):  # exactness (ec_device.cuh)
        assert bad not in ec_cuda._extra_cuda_cflags("9.0")
    with pytest.raises(ValueError, match="sm_90"):
        ec_cuda.cuda_arch_flags("sm_90")


def test_no_arch_without_gpu(clean_env):
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        assert ec_cuda.cuda_arch_flags() == [
            f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"]
    else:
        with pytest.raises(RuntimeError, match="--arch"):
            ec_cuda.cuda_arch_flags()


def test_helpers_leave_environ_alone():
    """Importing the module and calling the tag / flag / directory helpers changes no env var."""
    code = (
        "import json, os, sys\n"
        "import torch\n"
        "before = dict(os.environ)\n"
        "from sglang_moe_routing.expert_choice import cuda as ec\n"
        "ec.kernel_source_dir(); ec.source_hash(); ec.build_tag('9.0'); ec._arch_tag()\n"
        "ec.build_directory(); ec.build_directory('9.0'); ec._extra_cuda_cflags('9.0')\n"
        "try:\n    ec.cuda_arch_flags()\nexcept RuntimeError:\n    pass\n"
        "print(json.dumps(dict(os.environ) == before))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_CUDA_ARCH_LIST",
                                                             "SGLANG_MOE_ROUTING_BUILD_DIR")}
    env["PYTHONPATH"] = str(REPO / "python")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) is True
    # In this process too.
    before = dict(os.environ)
    ec_cuda.build_directory("9.0"), ec_cuda._extra_cuda_cflags("8.0;9.0+PTX"), ec_cuda._arch_tag()
    assert dict(os.environ) == before


def test_loader_passes_flags_not_env(clean_env, monkeypatch):
    """load_extension hands torch the gencode flags and the cache directory, env untouched."""
    import torch.utils.cpp_extension as cpp_ext

    seen = {}

    def fake_load(**kwargs):
        seen.update(kwargs, arch_env=os.environ.get("TORCH_CUDA_ARCH_LIST"))
        return "module"

    monkeypatch.setattr(cpp_ext, "load", fake_load)
    monkeypatch.setattr(ec_cuda, "_check_toolchain", lambda: None)
    monkeypatch.setattr(ec_cuda, "_MODULE", None)
    monkeypatch.setattr(ec_cuda, "_LOAD_ERROR", None)
    before = dict(os.environ)
    assert ec_cuda.load_extension(arch="9.0") == "module"
    assert dict(os.environ) == before
    assert seen["arch_env"] is None
    assert seen["extra_cuda_cflags"] == ec_cuda._extra_cuda_cflags("9.0")
    assert seen["extra_cflags"] == ["-O3"]
    assert seen["build_directory"] == str(ec_cuda.build_directory("9.0"))
    assert Path(seen["build_directory"]).is_dir()
    assert seen["sources"] == [str(REPO / "sgl-kernel" / "csrc" / s) for s in ec_cuda._SOURCES]


# --------------------------------------------------------------------------- wheel


def _pip(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_wheel_ships_kernel_sources(tmp_path):
    """A wheel carries sgl-kernel/csrc as sglang_moe_routing/_csrc, and a non-editable install
    (outside the repo, no env var) finds the sources there."""
    # Build from a copy, so nothing (build/, *.egg-info) is written into the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "MANIFEST.in", "LICENSE"):
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "*.so")
    shutil.copytree(REPO / "python", src / "python", ignore=ignore)
    shutil.copytree(REPO / "sgl-kernel", src / "sgl-kernel", ignore=ignore)
    wheels = tmp_path / "wheels"
    out = _pip("wheel", str(src), "--no-deps", "-w", str(wheels))
    if out.returncode != 0:  # no isolated build env (offline): use this environment's setuptools
        out = _pip("wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(wheels))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (wheel,) = wheels.glob("sglang_moe_routing-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ALL_FILES:
        assert f"sglang_moe_routing/_csrc/{f}" in names, f
    assert "sglang_moe_routing/expert_choice/cuda.py" in names

    target = tmp_path / "site"
    out = _pip("install", "--no-deps", "--no-index", "--target", str(target), str(wheel))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    code = (
        "import json, os, sys\n"
        f"repo_py = {str(REPO / 'python')!r}\n"
        "sys.path[:] = [p for p in sys.path if os.path.realpath(p) != os.path.realpath(repo_py)]\n"
        "from sglang_moe_routing.expert_choice import cuda as ec\n"
        "d = ec.kernel_source_dir()\n"
        "print(json.dumps({'module': ec.__file__, 'src': str(d),\n"
        "                  'files': sorted(os.listdir(d)), 'build': str(ec.build_directory('9.0'))}))\n"
    )
    env = {k: v for k, v in os.environ.items()
           if k not in ("SGLANG_MOE_ROUTING_KERNEL_DIR", "SGLANG_MOE_ROUTING_BUILD_DIR")}
    env["PYTHONPATH"] = str(target)
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=elsewhere,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    target = target.resolve()
    assert target in Path(got["module"]).resolve().parents
    assert Path(got["src"]).resolve() == target / "sglang_moe_routing" / "_csrc"
    assert set(ALL_FILES) <= set(got["files"])
    assert Path(got["build"]).parent == tmp_path / "xdg" / "sglang_moe_routing" / "ec_cuda"
    assert Path(got["build"]).name == ec_cuda.build_tag("9.0")  # same sources, same hash
