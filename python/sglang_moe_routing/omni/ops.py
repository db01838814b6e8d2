"""Omni routing as the ``torch.library`` custom op ``sglang_moe_routing::omni_router`` (the
same pattern as ``expert_choice/ops.py``).

``torch.compile`` treats the op as opaque: it records one call whose output shapes come from
the fake implementation, and the real implementation runs the resolved backend's function
unchanged. Use :func:`sglang_moe_routing.omni.omni_router` (``dispatch.py``), the public face:
it validates the arguments and resolves ``backend="auto"`` outside the op, then calls it.

Schema (inferred from :func:`omni_router_impl`)::

    sglang_moe_routing::omni_router(Tensor x, Tensor y, SymInt top_k, bool renormalize,
                                    bool ids_int32, str backend) -> (Tensor, Tensor)

``backend`` is already resolved: one of :data:`RESOLVED_BACKENDS` (``"triton"``: the fused
kernels; ``"torch"``: the exact pruned grid in plain torch; ``"reference"``: the naive
``n * n`` materialisation). Returns ``(weights [T, k] in x.dtype, ids [T, k] int32 or
int64)``.

Autograd: the op's backward is the op ``sglang_moe_routing::omni_router_backward`` (the Triton
backward kernel) for ``"triton"``, the fixed-selection reference
(``omni_router_backward_reference``) for the torch backends. The face sends torch-backend calls that autograd must record past the op, to
:func:`omni_router_impl` directly, so that autograd differentiates the torch ops themselves
(as ``expert_choice/dispatch.py`` does for the expert-choice reference).

:class:`OmniRouterFunction` is the same forward and backward as a
``torch.autograd.Function`` over the Triton kernels (kept for callers that use it directly).
"""

from __future__ import annotations

from typing import Callable, Tuple

import torch

from .reference import (
    omni_router_backward_reference,
    omni_router_pruned_torch,
    omni_router_reference,
    validate_omni_inputs,
)
from .triton import (
    omni_router_bwd_triton,
    omni_router_fwd_triton,
    triton_supported,
)

__all__ = ["OP_NAME", "RESOLVED_BACKENDS", "OmniRouterFunction", "backend_function",
           "omni_router_impl", "omni_router_op"]

OP_NAME = "sglang_moe_routing::omni_router"
RESOLVED_BACKENDS = ("triton", "torch", "reference")


def _triton_forward(x, y, top_k, *, renormalize, ids_dtype):
    return omni_router_fwd_triton(x, y, top_k, renormalize, ids_dtype)


def backend_function(backend: str) -> Callable[..., Tuple[torch.Tensor, torch.Tensor]]:
    """``fn(x, y, top_k, *, renormalize, ids_dtype)`` of a resolved backend."""
    if backend == "triton":
        return _triton_forward
    if backend == "torch":
        return omni_router_pruned_torch
    if backend == "reference":
        return omni_router_reference
    raise ValueError(
        f"omni_router op: backend must be one of {RESOLVED_BACKENDS} (resolved), got {backend!r}"
    )


def omni_router_impl(
    x: torch.Tensor, y: torch.Tensor, top_k: int, renormalize: bool, ids_int32: bool, backend: str
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The op's real implementation: the resolved backend's forward, unchanged. Also called
    directly (not through the op) when autograd must record a torch backend's operations."""
    ids_dtype = torch.int32 if ids_int32 else torch.int64
    return backend_function(backend)(x, y, top_k, renormalize=renormalize, ids_dtype=ids_dtype)


omni_router_op = torch.library.custom_op(OP_NAME, omni_router_impl, mutates_args=())


@omni_router_op.register_fake
def _omni_router_fake(x, y, top_k, renormalize, ids_int32, backend):
    T = x.shape[0]
    w = x.new_empty((T, top_k))
    ids = x.new_empty((T, top_k), dtype=torch.int32 if ids_int32 else torch.int64)
    return w, ids


@torch.library.custom_op("sglang_moe_routing::omni_router_backward", mutates_args=())
def _omni_router_backward_op(
    x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, grad_weights: torch.Tensor, renormalize: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    return omni_router_bwd_triton(x, y, ids, grad_weights, renormalize)


@_omni_router_backward_op.register_fake
def _omni_router_backward_fake(x, y, ids, grad_weights, renormalize):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(
        y, memory_format=torch.contiguous_format
    )


def _setup_context(ctx, inputs, output):
    x, y, _top_k, renormalize, _ids_int32, backend = inputs
    _w, ids = output
    ctx.save_for_backward(x, y, ids)
    ctx.renormalize = renormalize
    ctx.backend = backend


def _backward(ctx, grad_w, _grad_ids):
    x, y, ids = ctx.saved_tensors
    if ctx.backend == "triton":
        dx, dy = _omni_router_backward_op(x, y, ids, grad_w, ctx.renormalize)
    else:  # autograd of the fixed selection; not an op (autograd does not run inside one)
        dx, dy = omni_router_backward_reference(x, y, ids, grad_w, renormalize=ctx.renormalize)
    return dx, dy, None, None, None, None


omni_router_op.register_autograd(_backward, setup_context=_setup_context)


class OmniRouterFunction(torch.autograd.Function):
    """``torch.autograd.Function`` around the Triton forward and backward kernels.

    ``OmniRouterFunction.apply(x, y, top_k, renormalize=False, ids_dtype=torch.int64)``
    returns ``(weights, ids)``; gradients flow to ``x`` and ``y`` (not through ``ids``).
    Inputs are validated. :func:`omni_router` with ``backend="triton"`` goes through the
    equivalent ``torch.library`` op instead, which ``torch.compile`` treats as opaque.
    """

    @staticmethod
    def forward(ctx, x, y, top_k, renormalize=False, ids_dtype=torch.int64):
        validate_omni_inputs(x, y, top_k, ids_dtype)
        reason = triton_supported(x, top_k)
        if reason is not None:
            raise ValueError(f"OmniRouterFunction: triton backend unavailable: {reason}")
        w, ids = omni_router_fwd_triton(x, y, top_k, renormalize, ids_dtype)
        ctx.save_for_backward(x, y, ids)
        ctx.renormalize = renormalize
        ctx.mark_non_differentiable(ids)
        return w, ids

    @staticmethod
    def backward(ctx, grad_w, _grad_ids):
        x, y, ids = ctx.saved_tensors
        if grad_w is None:
            grad_w = torch.zeros(ids.shape, dtype=x.dtype, device=x.device)
        dx, dy = omni_router_bwd_triton(x, y, ids, grad_w, ctx.renormalize)
        return dx, dy, None, None, None
