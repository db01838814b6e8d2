"""Expert-choice routing: the CUDA C++ kernels of ``sgl-kernel/csrc`` (JIT-built on first use).

No host sync, CUDA-graph capturable. Large problems take three launches:

1. ``ec_score``  (row tiles): scores -> pick keys, stored transposed ``keysT [E, T]``.
2. ``ec_select`` (one CTA per expert; one warp per expert for T <= 256): radix select of the
   expert's C-th best token on ``(key << 32 | ~t)``; C is computed on the device from
   ``num_token_non_padded``.
3. ``ec_route``  (rows): recompute scores, mark picks, row top-k, weights.

Steps 2 and 3 use programmatic dependent launch (Hopper) to hide launch gaps. Small problems
take one launch of a thread-block cluster (``ec_fused.cu``, see ``choose_path``).

The extension is built with ``torch.utils.cpp_extension.load`` from the sources in
``<repo>/sgl-kernel/csrc`` (or ``$SGLANG_MOE_ROUTING_KERNEL_DIR``) into
``<repo>/sgl-kernel/build/<tag>`` (or ``$SGLANG_MOE_ROUTING_BUILD_DIR``); an ahead-of-time
build is ``python sgl-kernel/build.py``, which fills that same directory so that the first
call only imports the module.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import Optional, Tuple, Union

import torch

from sglang_moe_routing.expert_choice.reference import validate_inputs

_EXT_NAME = "sglang_moe_routing_ec_cuda"
_SOURCES = ("ec_ops.cpp", "ec_score.cu", "ec_select.cu", "ec_route.cu", "ec_fused.cu")
_DEPS = ("ec_params.h", "ec_device.cuh", "ec_warp_select.cuh")
_LOCK = threading.Lock()
_MODULE = None
_LOAD_ERROR: Optional[BaseException] = None

MAX_EXPERTS = 512
MAX_TOP_K = 32


def kernel_source_dir() -> Path:
    """``sgl-kernel/csrc`` next to the package's repo root, else ``$SGLANG_MOE_ROUTING_KERNEL_DIR``."""
    repo_root = Path(__file__).resolve().parents[3]
    candidate = repo_root / "sgl-kernel" / "csrc"
    if (candidate / _SOURCES[0]).is_file():
        return candidate
    env = os.environ.get("SGLANG_MOE_ROUTING_KERNEL_DIR")
    if env and (Path(env) / _SOURCES[0]).is_file():
        return Path(env)
    raise RuntimeError(
        "expert choice CUDA kernel: sources not found (looked in "
        f"{candidate} and $SGLANG_MOE_ROUTING_KERNEL_DIR={env!r}); point "
        "SGLANG_MOE_ROUTING_KERNEL_DIR at the sgl-kernel/csrc directory"
    )


def _arch_tag() -> str:
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not archs and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        archs = f"{major}.{minor}"
    return (archs or "none").replace(" ", "").replace(";", "_").replace("+", "p")


def build_directory() -> Path:
    """Where the extension is built (and looked for)."""
    env = os.environ.get("SGLANG_MOE_ROUTING_BUILD_DIR")
    if env:
        return Path(env)
    tag = f"torch{torch.__version__.split('+')[0]}_cu{torch.version.cuda}_sm{_arch_tag()}"
    return kernel_source_dir().parent / "build" / tag


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


def load_extension(verbose: bool = False):
    """Build (first time) and import the extension module. Raises ``RuntimeError`` on failure."""
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
            build_dir = build_directory()
            build_dir.mkdir(parents=True, exist_ok=True)
            if not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.is_available():
                major, minor = torch.cuda.get_device_capability()
                os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
            from torch.utils.cpp_extension import load

            _MODULE = load(
                name=_EXT_NAME,
                sources=[str(src / s) for s in _SOURCES],
                extra_include_paths=[str(src)],
                extra_cflags=["-O3"],
                # Exactness: no --use_fast_math, no -ftz (see ec_device.cuh).
                extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
                build_directory=str(build_dir),
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
#     problems: T <= 128 and T * E <= 16384 (4.2-8.7 us there vs 6.5-11.6 us);
#   three launches (score, select, route with programmatic dependent launch) elsewhere.
# ``path="one_launch"`` / ``"three_launch"`` or ``$SGLANG_MOE_EC_PATH`` force one; the one-
# launch kernel falls back to three launches where it does not fit (T > 1024, pre-Hopper
# GPU, shared memory).
PATHS = ("one_launch", "three_launch")
ONE_LAUNCH_MAX_T = 128
ONE_LAUNCH_MAX_ELEMENTS = 16384


def choose_path(num_tokens: int, num_experts: int, path: Optional[str] = None) -> str:
    """The CUDA path for a static shape: ``path``, else ``$SGLANG_MOE_EC_PATH``, else by shape."""
    path = path or os.environ.get("SGLANG_MOE_EC_PATH") or "auto"
    if path == "auto":
        small = num_tokens <= ONE_LAUNCH_MAX_T and num_tokens * num_experts <= ONE_LAUNCH_MAX_ELEMENTS
        return "one_launch" if small else "three_launch"
    if path not in PATHS:
        raise ValueError(f"expert choice CUDA kernel: path must be one of auto, {', '.join(PATHS)}; got {path!r}")
    return path


def prepare_num_valid(
    num_token_non_padded: Optional[Union[torch.Tensor, int]], num_tokens: int, device: torch.device
) -> Tuple[Optional[torch.Tensor], int]:
    """``T'`` as (device scalar tensor or None, host int used when the tensor is None)."""
    if num_token_non_padded is None:
        return None, num_tokens
    if isinstance(num_token_non_padded, torch.Tensor):
        if num_token_non_padded.numel() != 1:
            raise ValueError(
                "expert choice: num_token_non_padded must hold one value, got shape "
                f"{tuple(num_token_non_padded.shape)}"
            )
        if num_token_non_padded.is_floating_point() or num_token_non_padded.is_complex():
            raise ValueError(
                "expert choice: num_token_non_padded must be an integer tensor, got "
                f"{num_token_non_padded.dtype}"
            )
        if num_token_non_padded.device.type == "cpu":
            # A host value: reading it does not touch the GPU.
            return None, max(0, min(int(num_token_non_padded.reshape(())), num_tokens))
        if num_token_non_padded.device != device:
            raise ValueError(
                "expert choice: num_token_non_padded is on "
                f"{num_token_non_padded.device}, logits on {device}"
            )
        n = num_token_non_padded.reshape(1)
        if n.dtype not in (torch.int32, torch.int64):
            n = n.to(torch.int64)
        return n, num_tokens
    return None, max(0, min(int(num_token_non_padded), num_tokens))


def kernel_inputs(
    router_logits: torch.Tensor,
    correction_bias: Optional[torch.Tensor],
    routed_scaling_factor: Optional[float],
    apply_routed_scaling_factor_on_output: bool,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], float, bool]:
    """What both kernel wrappers (CUDA and Triton) pass down: logits in a kernel dtype (other
    floats go to fp32), the bias as contiguous fp32 on the logits' device, and the output
    scale with whether to apply it."""
    logits = router_logits
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        logits = logits.float()
    bias = None
    if correction_bias is not None:
        bias = correction_bias.to(device=logits.device, dtype=torch.float32).contiguous()
    scale = float(routed_scaling_factor) if routed_scaling_factor is not None else 1.0
    apply_scale = bool(apply_routed_scaling_factor_on_output and routed_scaling_factor is not None)
    return logits, bias, scale, apply_scale


def check_common_args(
    router_logits: torch.Tensor,
    top_k: int,
    capacity_factor: float,
    scoring_func: str,
    num_expert_group: Optional[int],
    topk_group: Optional[int],
    correction_bias: Optional[torch.Tensor],
    max_top_k: int,
    min_tokens: int = 0,
) -> None:
    """The reference's checks plus the kernels' limits (shared by the CUDA and Triton wrappers)."""
    validate_inputs(
        router_logits, top_k, capacity_factor, scoring_func, num_expert_group, topk_group,
        correction_bias, min_tokens,
    )
    num_tokens, num_experts = router_logits.shape
    if num_experts > MAX_EXPERTS:
        raise ValueError(
            f"expert choice kernels support E <= {MAX_EXPERTS}, got E={num_experts}; "
            "use backend='reference'"
        )
    if top_k > max_top_k:
        raise ValueError(
            f"expert choice kernels support top_k <= {max_top_k}, got {top_k}; "
            "use backend='reference'"
        )
    if num_tokens >= 2**31 // max(num_experts, 1):
        raise ValueError(f"expert choice kernels need T * E < 2**31, got T={num_tokens}")


def _launch(router_logits, top_k, factor, renormalize, scoring_func, num_expert_group,
            topk_group, correction_bias, routed_scaling_factor,
            apply_routed_scaling_factor_on_output, *, token_choice, num_token_non_padded=None,
            pdl=False, one_launch=False, min_tokens=0, write_keys=False):
    """Prepare the arguments (dtype, bias, T') the same way for both entry points and call
    the extension; returns ``(weights, ids, keysT, thr)``."""
    if not router_logits.is_cuda:
        raise ValueError("expert choice CUDA kernel: router_logits must be a CUDA tensor")
    mod = load_extension()
    logits, bias, scale, apply_scale = kernel_inputs(
        router_logits, correction_bias, routed_scaling_factor, apply_routed_scaling_factor_on_output)
    n_dev, n_host = prepare_num_valid(num_token_non_padded, logits.shape[0], logits.device)
    return mod.ec_topk(
        logits, bias, n_dev, n_host, top_k, float(factor), bool(renormalize),
        0 if scoring_func == "softmax" else 1,
        int(num_expert_group or 0), int(topk_group or 0), scale, apply_scale,
        token_choice, pdl, one_launch, int(min_tokens), write_keys,
    )


def expert_choice_topk_cuda(
    router_logits: torch.Tensor,
    top_k: int,
    capacity_factor: float = 1.25,
    *,
    renormalize: bool = True,
    scoring_func: str = "softmax",
    num_expert_group: Optional[int] = None,
    topk_group: Optional[int] = None,
    correction_bias: Optional[torch.Tensor] = None,
    routed_scaling_factor: Optional[float] = None,
    apply_routed_scaling_factor_on_output: bool = False,
    num_token_non_padded: Optional[Union[torch.Tensor, int]] = None,
    min_tokens: int = 0,
    pdl: Optional[bool] = None,
    path: Optional[str] = None,
    return_intermediates: bool = False,
):
    """Expert-choice top-k on the CUDA kernels; same arguments/output as the reference.

    ``path``: ``"one_launch"`` / ``"three_launch"`` / ``None`` (by shape, see ``choose_path``);
    identical results. ``return_intermediates=True`` also returns ``(keysT [E, T] int32
    (uint32 bits), thr [E] int64 (uint64 bits))`` for tests.
    """
    check_common_args(
        router_logits, top_k, capacity_factor, scoring_func, num_expert_group, topk_group,
        correction_bias, MAX_TOP_K, min_tokens,
    )
    num_tokens, num_experts = router_logits.shape
    chosen = choose_path(num_tokens, num_experts, path)
    w, ids, keys, thr = _launch(
        router_logits, top_k, capacity_factor * top_k / num_experts,  # same double arithmetic as the reference
        renormalize, scoring_func, num_expert_group, topk_group, correction_bias,
        routed_scaling_factor, apply_routed_scaling_factor_on_output, token_choice=False,
        num_token_non_padded=num_token_non_padded, pdl=_pdl_default() if pdl is None else bool(pdl),
        one_launch=chosen == "one_launch", min_tokens=min_tokens, write_keys=return_intermediates,
    )
    if return_intermediates:
        return w, ids, keys, thr
    return w, ids


def token_choice_topk_cuda(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    renormalize: bool = True,
    scoring_func: str = "softmax",
    num_expert_group: Optional[int] = None,
    topk_group: Optional[int] = None,
    correction_bias: Optional[torch.Tensor] = None,
    routed_scaling_factor: Optional[float] = None,
    apply_routed_scaling_factor_on_output: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused token-choice top-k (one launch, same scoring code): the benchmark's yardstick.

    Same output as ``token_choice_topk_reference``.
    """
    check_common_args(
        router_logits, top_k, 1.0, scoring_func, num_expert_group, topk_group,
        correction_bias, MAX_TOP_K,
    )
    w, ids, _, _ = _launch(
        router_logits, top_k, 1.0, renormalize, scoring_func, num_expert_group, topk_group,
        correction_bias, routed_scaling_factor, apply_routed_scaling_factor_on_output,
        token_choice=True,
    )
    return w, ids
