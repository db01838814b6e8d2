"""Pick the fastest available expert-choice implementation for the input's device.

CUDA tensors: the CUDA C++ kernel (``sgl-kernel``, JIT-built on first use) when it builds,
else the Triton kernel, else the reference. CPU tensors: the reference. ``backend`` forces
one ("triton" also runs on CPU tensors under ``TRITON_INTERPRET=1``).

Environment: ``SGLANG_MOE_EC_BACKEND`` overrides ``backend="auto"`` (cuda|triton|reference);
``SGLANG_MOE_EC_DISABLE_CUDA_EXT=1`` skips the CUDA C++ kernel in auto mode.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Tuple, Union

import torch

from sglang_moe_routing.expert_choice.reference import expert_choice_topk_reference

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "cuda", "triton", "reference")
KERNEL_MAX_EXPERTS = 512
KERNEL_MAX_TOP_K = 32

_cuda_ok: Optional[bool] = None
_triton_ok: Optional[bool] = None


def _cuda_backend_available() -> bool:
    global _cuda_ok
    if _cuda_ok is None:
        if os.environ.get("SGLANG_MOE_EC_DISABLE_CUDA_EXT", "0") == "1":
            _cuda_ok = False
        else:
            try:
                from sglang_moe_routing.expert_choice import cuda as ec_cuda

                ec_cuda.load_extension()
                _cuda_ok = True
            except Exception as exc:  # noqa: BLE001 - fall back, say why once
                logger.warning("expert choice: CUDA kernel unavailable, using Triton (%s)", exc)
                _cuda_ok = False
    return _cuda_ok


def _triton_backend_available() -> bool:
    global _triton_ok
    if _triton_ok is None:
        try:
            import triton  # noqa: F401

            from sglang_moe_routing.expert_choice import triton_kernel  # noqa: F401

            _triton_ok = not triton_kernel._INTERPRET
        except Exception as exc:  # noqa: BLE001
            logger.warning("expert choice: Triton kernel unavailable, using reference (%s)", exc)
            _triton_ok = False
    return _triton_ok


def prepare_backends() -> str:
    """Load (and JIT-build, on first use) the fastest available GPU backend now, on the host.

    Called once after the model is loaded so that the ~30 s build of the CUDA extension and
    its loading never happen inside the first forward or a CUDA-graph capture. Returns the
    backend ``auto`` will use for CUDA inputs ("cuda", "triton" or "reference").
    """
    if not torch.cuda.is_available():
        return "reference"
    if _cuda_backend_available():
        return "cuda"
    if _triton_backend_available():
        return "triton"
    return "reference"


def resolve_backend(router_logits: torch.Tensor, top_k: int, backend: str = "auto") -> str:
    """The backend ``expert_choice_topk`` will run for these inputs."""
    if backend not in BACKENDS:
        raise ValueError(f"expert choice: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("SGLANG_MOE_EC_BACKEND", "auto")
        if backend not in BACKENDS:
            raise ValueError(
                f"expert choice: SGLANG_MOE_EC_BACKEND must be one of {BACKENDS}, got {backend!r}"
            )
    if backend != "auto":
        return backend
    if not router_logits.is_cuda:
        return "reference"
    if (
        router_logits.dim() != 2
        or router_logits.shape[-1] > KERNEL_MAX_EXPERTS
        or top_k > KERNEL_MAX_TOP_K
    ):
        return "reference"  # outside the kernels' range; the reference raises or computes
    if _cuda_backend_available():
        return "cuda"
    if _triton_backend_available():
        return "triton"
    return "reference"


def expert_choice_topk(
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
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Expert-choice top-k; same arguments and output as ``expert_choice_topk_reference``."""
    chosen = resolve_backend(router_logits, top_k, backend)
    kwargs = dict(
        renormalize=renormalize, scoring_func=scoring_func,
        num_expert_group=num_expert_group, topk_group=topk_group,
        correction_bias=correction_bias, routed_scaling_factor=routed_scaling_factor,
        apply_routed_scaling_factor_on_output=apply_routed_scaling_factor_on_output,
        num_token_non_padded=num_token_non_padded, min_tokens=min_tokens,
    )
    if chosen == "cuda":
        from sglang_moe_routing.expert_choice.cuda import expert_choice_topk_cuda

        return expert_choice_topk_cuda(router_logits, top_k, capacity_factor, **kwargs)
    if chosen == "triton":
        from sglang_moe_routing.expert_choice.triton_kernel import expert_choice_topk_triton

        return expert_choice_topk_triton(router_logits, top_k, capacity_factor, **kwargs)
    return expert_choice_topk_reference(router_logits, top_k, capacity_factor, **kwargs)
