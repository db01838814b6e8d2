"""Pick the fastest available expert-choice implementation for the input's device.

CUDA tensors: the CUDA C++ kernel (``sgl-kernel``, JIT-built on first use) when it builds,
else the Triton kernel, else the reference. CPU tensors: the reference. ``backend`` forces
one ("triton" also runs on CPU tensors under ``TRITON_INTERPRET=1``).

Environment: ``SGLANG_MOE_EC_BACKEND`` overrides ``backend="auto"`` (cuda|triton|reference);
``SGLANG_MOE_EC_DISABLE_CUDA_EXT=1`` skips the CUDA C++ kernel in auto mode.

Two faces: ``expert_choice_route(router_logits, spec, num_token_non_padded, backend=...)``
takes a ``RoutingSpec`` (what the SGLang hook calls); ``expert_choice_topk(router_logits,
top_k, capacity_factor, **fields)`` builds the spec from keywords (users, benchmarks).
Validation and backend resolution (environment reads, the kernels' availability, the
once-per-shape warning for CUDA inputs outside the kernels' range) happen here in Python; the
routing itself is the custom op ``torch.ops.sglang_moe_routing.expert_choice_topk``
(``ops.py``), which ``torch.compile`` keeps as one opaque call (``fullgraph=True`` works) and
which runs the chosen backend's function unchanged.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional, Set, Tuple, Union

import torch

from sglang_moe_routing.expert_choice.kernel_args import MAX_EXPERTS, MAX_TOP_K
from sglang_moe_routing.expert_choice.ops import (
    expert_choice_topk_impl,
    expert_choice_topk_op,
    op_arguments,
)
from sglang_moe_routing.expert_choice.spec import RoutingSpec, validate_inputs

logger = logging.getLogger(__name__)
# The out-of-range warning goes to the package logger (what SGLang users configure).
_range_logger = logging.getLogger("sglang_moe_routing")

BACKENDS = ("auto", "cuda", "triton", "reference")

_cuda_ok: Optional[bool] = None
_triton_ok: Optional[bool] = None
# (E, k) shapes already warned about as outside the kernels' range (see resolve_backend).
_warned_outside_range: Set[Tuple[int, int]] = set()


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
    return _fastest_gpu_backend()


def _fastest_gpu_backend() -> str:
    """CUDA C++ if it builds, else Triton, else the reference (the availability probes)."""
    if _cuda_backend_available():
        return "cuda"
    if _triton_backend_available():
        return "triton"
    return "reference"


def _warn_outside_kernel_range(num_experts: int, top_k: int) -> None:
    """Say once per ``(E, k)`` that GPU inputs run on the slow reference (host-side only)."""
    if torch.compiler.is_compiling():
        # Logging breaks a torch.compile(fullgraph=True) trace; the eager calls (SGLang runs
        # prefill and the first passes eagerly) say it. Not marked as said here.
        return
    key = (int(num_experts), int(top_k))
    if key in _warned_outside_range:
        return
    _warned_outside_range.add(key)
    _range_logger.warning(
        "sglang-moe-routing: expert choice with E=%d, k=%d is outside the CUDA/Triton kernels' "
        "range (E <= %d, k <= %d): the PyTorch reference runs instead (several times slower; "
        "see docs/benchmarks.md)",
        key[0], key[1], MAX_EXPERTS, MAX_TOP_K,
    )


def resolve_backend(router_logits: torch.Tensor, top_k: int, backend: str = "auto") -> str:
    """The backend ``expert_choice_topk`` will run for these inputs.

    ``auto`` for CUDA inputs outside the kernels' range (``E > 512`` or ``k > 32``) resolves
    to ``"reference"`` and logs a warning once per ``(E, k)`` (logger ``sglang_moe_routing``;
    not while ``torch.compile`` traces).
    """
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
    if router_logits.dim() != 2:
        return "reference"  # the reference raises the clear error
    if router_logits.shape[-1] > MAX_EXPERTS or top_k > MAX_TOP_K:
        _warn_outside_kernel_range(router_logits.shape[-1], top_k)
        return "reference"
    return _fastest_gpu_backend()


def expert_choice_route(
    router_logits: torch.Tensor,
    spec: RoutingSpec,
    num_token_non_padded: Optional[Union[torch.Tensor, int]] = None,
    *,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Expert-choice top-k of ``router_logits [T, E]`` under ``spec``; the output of
    ``expert_choice_topk_reference(router_logits, spec, num_token_non_padded)``.

    Validates the inputs, resolves ``backend`` (:func:`resolve_backend`: environment,
    availability, kernel limits) here, in Python, then calls the custom op
    ``torch.ops.sglang_moe_routing.expert_choice_topk`` (``ops.py``) with the resolved
    backend, so ``torch.compile(fullgraph=True)`` sees one opaque call. When autograd would
    record a graph (grad mode on and the logits or the bias require grad) the op's
    implementation is called directly instead: the op has no autograd formula, the
    reference's weights are differentiable.
    """
    # Dynamo may hand float arguments over as SymFloats (dynamic=True, or a float that changed
    # between calls), which ``math.isfinite`` cannot trace: while compiling the capacity factor
    # is not checked here; the op's real implementation validates every field at run time.
    validate_inputs(router_logits, spec, check_capacity_factor=not torch.compiler.is_compiling())
    args = op_arguments(
        router_logits, spec, num_token_non_padded,
        resolve_backend(router_logits, spec.top_k, backend),
    )
    bias = spec.correction_bias
    if torch.is_grad_enabled() and (
        router_logits.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return expert_choice_topk_impl(*args)
    return expert_choice_topk_op(*args)


def expert_choice_topk(
    router_logits: torch.Tensor,
    top_k: int,
    capacity_factor: float = 1.25,
    *,
    num_token_non_padded: Optional[Union[torch.Tensor, int]] = None,
    backend: str = "auto",
    **fields: Any,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Keyword face of :func:`expert_choice_route`: ``fields`` are the other
    ``RoutingSpec`` fields (``renormalize``, ``scoring_func``, ``num_expert_group``,
    ``topk_group``, ``correction_bias``, ``routed_scaling_factor``,
    ``apply_routed_scaling_factor_on_output``, ``min_tokens``), with the same defaults."""
    spec = RoutingSpec(top_k, capacity_factor, **fields)
    return expert_choice_route(router_logits, spec, num_token_non_padded, backend=backend)
