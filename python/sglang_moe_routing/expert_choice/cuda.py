"""Expert-choice routing: the CUDA C++ kernels of ``sgl-kernel/csrc`` (JIT-built on first use).

No host sync, CUDA-graph capturable. Large problems take three launches:

1. ``ec_score``  (row tiles): scores -> pick keys, stored transposed ``keysT [E, T]``.
2. ``ec_select`` (one CTA per expert; one warp per expert for T <= 256): radix select of the
   expert's C-th best token on ``(key << 32 | ~t)``; C is computed on the device from
   ``num_token_non_padded``.
3. ``ec_route``  (rows): recompute scores, mark picks, row top-k, weights.

Steps 2 and 3 use programmatic dependent launch (Hopper) to hide launch gaps. Small problems
take one launch of a thread-block cluster (``ec_fused.cu``, see ``choose_path``); large ones
replace steps 1-2 by histogram passes over the logits (``ec_stream.cu``: no ``keysT``).

The extension is built with ``torch.utils.cpp_extension.load`` from the sources found by
``kernel_source_dir`` (``$SGLANG_MOE_ROUTING_KERNEL_DIR``, else the checkout's
``sgl-kernel/csrc``, else the copy installed as package data ``sglang_moe_routing/_csrc``) into
``build_directory()`` (``$SGLANG_MOE_ROUTING_BUILD_DIR``, else
``$XDG_CACHE_HOME/sglang_moe_routing/ec_cuda/<tag>``, ``~/.cache`` by default; the tag names
the torch, CUDA and arch versions and a hash of the sources). The target architecture is
passed as explicit ``-gencode`` flags for this build only; the process environment
(``TORCH_CUDA_ARCH_LIST`` included) is read, never changed. An ahead-of-time build is
``python sgl-kernel/build.py``, which fills that same directory so that the first call only
imports the module.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import List, Optional, Tuple, Union

import torch

from sglang_moe_routing.expert_choice.kernel_args import (
    check_kernel_args,
    kernel_inputs,
    prepare_num_valid,
)
from sglang_moe_routing.expert_choice.spec import RoutingSpec

_EXT_NAME = "sglang_moe_routing_ec_cuda"
_SOURCES = ("ec_ops.cpp", "ec_score.cu", "ec_select.cu", "ec_route.cu", "ec_fused.cu", "ec_stream.cu")
_DEPS = ("ec_params.h", "ec_device.cuh", "ec_warp_select.cuh")
_LOCK = threading.Lock()
_MODULE = None
_LOAD_ERROR: Optional[BaseException] = None

# Host compiler and nvcc flags besides the arch. Exactness: no --use_fast_math, no -ftz
# (see ec_device.cuh).
_EXTRA_CFLAGS = ("-O3",)
_EXTRA_CUDA_CFLAGS = ("-O3", "--expt-relaxed-constexpr", "-lineinfo")


def _missing_files(directory: Path) -> List[str]:
    return [f for f in _SOURCES + _DEPS if not (directory / f).is_file()]


def _source_dir_candidates() -> List[Tuple[str, Path]]:
    """Where the kernel sources may be, in the order they are tried (the env var first)."""
    here = Path(__file__).resolve()
    return [
        # Editable install / source checkout: <repo>/python/sglang_moe_routing/expert_choice/cuda.py
        ("source checkout", here.parents[3] / "sgl-kernel" / "csrc"),
        # Wheel install: sgl-kernel/csrc shipped as package data (pyproject.toml).
        ("installed package data", here.parents[1] / "_csrc"),
    ]


def kernel_source_dir() -> Path:
    """The directory with the kernel sources (all of ``_SOURCES`` and ``_DEPS``).

    ``$SGLANG_MOE_ROUTING_KERNEL_DIR`` if set (an error if it lacks a file), else the source
    checkout's ``sgl-kernel/csrc`` (editable install), else the installed package data
    ``sglang_moe_routing/_csrc`` (wheel install).
    """
    env = os.environ.get("SGLANG_MOE_ROUTING_KERNEL_DIR")
    if env:
        missing = _missing_files(Path(env))
        if missing:
            raise RuntimeError(
                "expert choice CUDA kernel: $SGLANG_MOE_ROUTING_KERNEL_DIR="
                f"{env!r} lacks {', '.join(missing)}; point it at a copy of sgl-kernel/csrc "
                "or unset it to use the installed sources"
            )
        return Path(env)
    looked = []
    for what, candidate in _source_dir_candidates():
        if not _missing_files(candidate):
            return candidate
        looked.append(f"{candidate} ({what})")
    raise RuntimeError(
        "expert choice CUDA kernel: sources not found (looked in "
        f"{'; '.join(looked)}); reinstall sglang-moe-routing or point "
        "SGLANG_MOE_ROUTING_KERNEL_DIR at a copy of the repo's sgl-kernel/csrc directory"
    )


def source_hash(src: Optional[Path] = None) -> str:
    """Short sha256 of the names and contents of every kernel source and header."""
    src = kernel_source_dir() if src is None else Path(src)
    h = hashlib.sha256()
    for name in sorted(_SOURCES + _DEPS):
        h.update(name.encode() + b"\0")
        h.update((src / name).read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:12]


_ARCH_RE = re.compile(r"(\d+)\.(\d+)([af]?)(\+PTX)?", re.IGNORECASE)
# torch.utils.cpp_extension's names for TORCH_CUDA_ARCH_LIST (torch 2.14); combined names first.
_NAMED_ARCHES = (
    ("Kepler+Tesla", "3.7"), ("Kepler", "3.5+PTX"), ("Maxwell+Tegra", "5.3"),
    ("Maxwell", "5.0;5.2+PTX"), ("Pascal", "6.0;6.1+PTX"), ("Volta+Tegra", "7.2"),
    ("Volta", "7.0+PTX"), ("Turing", "7.5+PTX"), ("Ampere+Tegra", "8.7"),
    ("Ampere", "8.0;8.6+PTX"), ("Ada", "8.9+PTX"), ("Hopper", "9.0+PTX"),
    ("Blackwell+Tegra", "11.0"), ("Blackwell", "10.0;10.3;12.0;12.1+PTX"), ("Rubin", "10.7+PTX"),
)


def _arch_list(arch: Optional[str] = None) -> str:
    """The target architectures in ``TORCH_CUDA_ARCH_LIST`` syntax (e.g. ``"9.0"``): ``arch``,
    else ``$TORCH_CUDA_ARCH_LIST`` (read only), else the current GPU's capability, else ``""``."""
    archs = (arch or os.environ.get("TORCH_CUDA_ARCH_LIST") or "").strip()
    if archs and archs.lower() != "native":
        return archs
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}.{minor}"
    return ""


def _arch_tag(arch: Optional[str] = None) -> str:
    archs = _arch_list(arch)
    return (archs or "none").replace(" ", "_").replace(";", "_").replace("+", "p")


def cuda_arch_flags(arch: Optional[str] = None) -> List[str]:
    """``-gencode`` flags for ``_arch_list(arch)``, as torch would derive them from the same
    ``TORCH_CUDA_ARCH_LIST`` (``"9.0"`` -> ``-gencode=arch=compute_90,code=sm_90``; ``+PTX``
    adds ``code=compute_XX``; ``9.0a`` -> ``sm_90a``). Passed in ``extra_cuda_cflags``, they
    make torch add no arch flags of its own (it skips them when a flag names an arch)."""
    archs = _arch_list(arch)
    if not archs:
        raise RuntimeError(
            "expert choice CUDA kernel: no target architecture (no GPU visible and "
            "TORCH_CUDA_ARCH_LIST unset); pass --arch to sgl-kernel/build.py, e.g. --arch 9.0"
        )
    expanded = archs.replace(" ", ";")
    for name, value in _NAMED_ARCHES:
        expanded = expanded.replace(name, value)
    flags = set()
    for entry in expanded.replace(";", " ").split():
        m = _ARCH_RE.fullmatch(entry)
        if m is None:
            raise ValueError(
                f"expert choice CUDA kernel: cannot read CUDA arch {entry!r} of {archs!r} "
                "(expected e.g. 9.0, 9.0a, 10.0+PTX)"
            )
        num = f"{m.group(1)}{m.group(2)}{m.group(3).lower()}"
        flags.add(f"-gencode=arch=compute_{num},code=sm_{num}")
        if m.group(4):
            flags.add(f"-gencode=arch=compute_{num},code=compute_{num}")
    return sorted(flags)


def _extra_cuda_cflags(arch: Optional[str] = None) -> List[str]:
    """All nvcc flags the loader passes (the arch flags last)."""
    return list(_EXTRA_CUDA_CFLAGS) + cuda_arch_flags(arch)


def _cache_root() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg)
    try:
        return Path.home() / ".cache"
    except RuntimeError:  # no home directory
        uid = os.getuid() if hasattr(os, "getuid") else "user"
        return Path(tempfile.gettempdir()) / f"sglang_moe_routing-{uid}"


def build_tag(arch: Optional[str] = None, src: Optional[Path] = None) -> str:
    """``torch<ver>_cu<ver>_sm<arch>_<source hash>``: one build directory per combination."""
    return (
        f"torch{torch.__version__.split('+')[0]}_cu{torch.version.cuda}_sm{_arch_tag(arch)}"
        f"_{source_hash(src)}"
    )


def build_directory(arch: Optional[str] = None, src: Optional[Path] = None) -> Path:
    """Where the extension is built and looked for (shared with ``sgl-kernel/build.py``):
    ``$SGLANG_MOE_ROUTING_BUILD_DIR`` as given, else
    ``$XDG_CACHE_HOME/sglang_moe_routing/ec_cuda/<build_tag>`` (``~/.cache`` by default)."""
    env = os.environ.get("SGLANG_MOE_ROUTING_BUILD_DIR")
    if env:
        return Path(env)
    return _cache_root() / "sglang_moe_routing" / "ec_cuda" / build_tag(arch, src)


def _check_toolchain() -> None:
    if torch.version.cuda is None:
        raise RuntimeError(
            "expert choice CUDA kernel: this PyTorch build has no CUDA support "
            f"(torch {torch.__version__}); use backend='triton' or 'reference'"
        )
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = shutil.which("nvcc")
    if CUDA_HOME is None and nvcc is None:
        raise RuntimeError(
            "expert choice CUDA kernel: nvcc not found (set CUDA_HOME or put nvcc on PATH); "
            "use backend='triton' or 'reference', or build ahead of time with "
            "`python sgl-kernel/build.py` on a machine with the CUDA toolkit"
        )


def load_extension(verbose: bool = False, *, arch: Optional[str] = None,
                   build_dir: Optional[Union[str, Path]] = None):
    """Build (first time) and import the extension module. Raises ``RuntimeError`` on failure.

    ``arch`` (``TORCH_CUDA_ARCH_LIST`` syntax) and ``build_dir`` override the defaults
    (``_arch_list``, ``build_directory``); ``sgl-kernel/build.py`` passes them. Nothing in
    ``os.environ`` is changed.
    """
    global _MODULE, _LOAD_ERROR
    if _MODULE is not None:
        return _MODULE
    with _LOCK:
        if _MODULE is not None:
            return _MODULE
        if _LOAD_ERROR is not None:
            raise RuntimeError(f"expert choice CUDA kernel unavailable: {_LOAD_ERROR}")
        try:
            _check_toolchain()
            src = kernel_source_dir()
            cuda_cflags = _extra_cuda_cflags(arch)
            out = Path(build_dir) if build_dir is not None else build_directory(arch, src)
            out.mkdir(parents=True, exist_ok=True)
            from torch.utils.cpp_extension import load

            _MODULE = load(
                name=_EXT_NAME,
                sources=[str(src / s) for s in _SOURCES],
                extra_include_paths=[str(src)],
                extra_cflags=list(_EXTRA_CFLAGS),
                extra_cuda_cflags=cuda_cflags,
                build_directory=str(out),
                verbose=verbose,
            )
        except Exception as exc:  # noqa: BLE001 - re-raised with context
            _LOAD_ERROR = exc
            raise RuntimeError(f"expert choice CUDA kernel unavailable: {exc}") from exc
    return _MODULE


def is_available() -> bool:
    """True when the extension is (or can be) loaded and a CUDA device is present."""
    if not torch.cuda.is_available():
        return False
    try:
        load_extension()
    except RuntimeError:
        return False
    return True


def _pdl_default() -> bool:
    return os.environ.get("SGLANG_MOE_EC_PDL", "1") != "0"


# Which path runs (identical results, different speed), chosen per static shape (no host
# sync, CUDA-graph safe) from the H100 runs of 2026-11-23 (docs/benchmarks.md, run 5):
#   one launch (``ec_fused.cu``: a Hopper thread-block cluster of 8 CTAs does score ->
#     select -> route with cluster barriers and distributed shared memory) for small
#     problems: T <= 128 and T * E <= 16384 (4.2-8.7 us there vs 6.5-11.6 us) and E <= 256
#     (E = 384 runs three launches: on the H200, k 8, three vs one launch 10.2 vs 10.9 us at
#     T = 1 and 10.1 vs 12.9 us at T = 32, the same order in the three runs of 2026-11-30,
#     docs/benchmarks.md "Runs of 2026-11-30, fifth session");
#   three launches (score, select, route with programmatic dependent launch) elsewhere.
#   stream (``ec_stream.cu``: per-expert histograms of the keys while streaming the logits,
#     the threshold bin's tokens collected, then the route kernel; no [E, T] key matrix)
#     only when forced: it has not yet run on a GPU, so ``auto`` never picks it
#     (STREAM_MIN_T = None) until its GPU tests pass and bench_routing.py shows where it wins.
# ``path="one_launch"`` / ``"three_launch"`` / ``"stream"`` or ``$SGLANG_MOE_EC_PATH`` force
# one; the one-launch kernel falls back to three launches where it does not fit (T > 1024,
# pre-Hopper GPU, shared memory), the stream path where its histogram does not fit.
PATHS = ("one_launch", "three_launch", "stream")
ONE_LAUNCH_MAX_T = 128
ONE_LAUNCH_MAX_ELEMENTS = 16384
ONE_LAUNCH_MAX_E = 256
STREAM_MIN_T = None  # e.g. 8192 once measured; None: never chosen by auto


def choose_path(num_tokens: int, num_experts: int, path: Optional[str] = None) -> str:
    """The CUDA path for a static shape: ``path``, else ``$SGLANG_MOE_EC_PATH``, else by shape."""
    path = path or os.environ.get("SGLANG_MOE_EC_PATH") or "auto"
    if path == "auto":
        small = (num_tokens <= ONE_LAUNCH_MAX_T and num_experts <= ONE_LAUNCH_MAX_E
                 and num_tokens * num_experts <= ONE_LAUNCH_MAX_ELEMENTS)
        if small:
            return "one_launch"
        return ("stream" if STREAM_MIN_T is not None and num_tokens >= STREAM_MIN_T
                else "three_launch")
    if path not in PATHS:
        raise ValueError(f"expert choice CUDA kernel: path must be one of auto, {', '.join(PATHS)}; got {path!r}")
    return path


def _launch(router_logits, spec: RoutingSpec, *, token_choice, num_token_non_padded=None,
            pdl=False, one_launch=False, write_keys=False, stream=False):
    """Prepare the arguments (dtype, bias, T') the same way for both entry points and call
    the extension; returns ``(weights, ids, keysT, thr)``."""
    if not router_logits.is_cuda:
        raise ValueError("expert choice CUDA kernel: router_logits must be a CUDA tensor")
    mod = load_extension()
    ki = kernel_inputs(router_logits, spec)
    logits = ki.logits
    n_dev, n_host = prepare_num_valid(num_token_non_padded, logits.shape[0], logits.device)
    # cf * k / E in the same double arithmetic as the reference; unused by token choice.
    factor = 1.0 if token_choice else spec.capacity_ratio(logits.shape[1])
    min_tokens = 0 if token_choice else int(spec.min_tokens)
    return mod.ec_topk(
        logits, ki.bias, n_dev, n_host, spec.top_k, float(factor), bool(spec.renormalize),
        ki.scoring, ki.num_groups, ki.topk_group, ki.scale, ki.apply_scale,
        token_choice, pdl, one_launch, min_tokens, write_keys, stream,
    )


def expert_choice_topk_cuda(
    router_logits: torch.Tensor,
    spec: RoutingSpec,
    num_token_non_padded: Optional[Union[torch.Tensor, int]] = None,
    *,
    pdl: Optional[bool] = None,
    path: Optional[str] = None,
    return_intermediates: bool = False,
):
    """Expert-choice top-k on the CUDA kernels; same arguments/output as the reference.

    ``path``: ``"one_launch"`` / ``"three_launch"`` / ``"stream"`` / ``None`` (by shape, see
    ``choose_path``); identical results. ``return_intermediates=True`` also returns ``(keysT
    [E, T] int32 (uint32 bits; empty on the stream path), thr [E] int64 (uint64 bits))`` for
    tests.
    """
    check_kernel_args(router_logits, spec)
    num_tokens, num_experts = router_logits.shape
    chosen = choose_path(num_tokens, num_experts, path)
    w, ids, keys, thr = _launch(
        router_logits, spec, token_choice=False, num_token_non_padded=num_token_non_padded,
        pdl=_pdl_default() if pdl is None else bool(pdl), one_launch=chosen == "one_launch",
        write_keys=return_intermediates, stream=chosen == "stream",
    )
    if return_intermediates:
        return w, ids, keys, thr
    return w, ids


def token_choice_topk_cuda(
    router_logits: torch.Tensor, spec: RoutingSpec
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused token-choice top-k (one launch, same scoring code): the benchmark's yardstick.

    Same output as ``token_choice_topk_reference``; ``spec.capacity_factor`` and
    ``spec.min_tokens`` are not used.
    """
    check_kernel_args(router_logits, spec, token_choice=True)
    w, ids, _, _ = _launch(router_logits, spec, token_choice=True)
    return w, ids
