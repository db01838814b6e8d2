"""Public Omni router API: backend dispatch, autograd and the ``torch.library`` op.

``omni_router(x, y, top_k, renormalize=False, backend="auto")`` returns
``(topk_weights [T, k] in x.dtype, topk_ids [T, k] int64)`` (see ``reference.py`` for the
contract). Backends:

* ``"triton"``: the fused kernels through the custom op
  ``torch.ops.sglang_moe_routing.omni_router`` (autograd registered, fake tensor impl for
  ``torch.compile``, no host sync so it can be captured in a CUDA graph once compiled);
* ``"torch"``: the exact pruned ``k' x k'`` grid in plain torch (any device, fp64 too);
* ``"reference"``: the naive ``n * n`` materialisation (tests and small shapes only);
* ``"auto"``: ``"triton"`` for CUDA tensors the kernels support, else ``"torch"``.

All backends are differentiable with respect to ``x`` and ``y``.
"""

from __future__ import annotations

from typing import Tuple

import torch

from .reference import (
    omni_router_pruned_torch,
    omni_router_reference,
    validate_omni_inputs,
)
from .triton import (
    omni_router_bwd_triton,
    omni_router_fwd_triton,
    triton_supported,
)

__all__ = ["omni_router", "OmniRouterFunction", "BACKENDS", "resolve_backend"]

BACKENDS = ("auto", "triton", "torch", "reference")


# ----------------------------------------------------------------------------- custom op


@torch.library.custom_op("sglang_moe_routing::omni_router", mutates_args=())
def _omni_router_op(
    x: torch.Tensor, y: torch.Tensor, top_k: int, renormalize: bool, ids_int32: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    ids_dtype = torch.int32 if ids_int32 else torch.int64
    return omni_router_fwd_triton(x, y, top_k, renormalize, ids_dtype)


@_omni_router_op.register_fake
def _omni_router_op_fake(x, y, top_k, renormalize, ids_int32):
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
def _omni_router_backward_op_fake(x, y, ids, grad_weights, renormalize):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(
        y, memory_format=torch.contiguous_format
    )


def _op_setup_context(ctx, inputs, output):
    x, y, _top_k, renormalize, _ids_int32 = inputs
    _w, ids = output
    ctx.save_for_backward(x, y, ids)
    ctx.renormalize = renormalize


def _op_backward(ctx, grad_w, _grad_ids):
    x, y, ids = ctx.saved_tensors
    dx, dy = _omni_router_backward_op(x, y, ids, grad_w, ctx.renormalize)
    return dx, dy, None, None, None


_omni_router_op.register_autograd(_op_backward, setup_context=_op_setup_context)


# ----------------------------------------------------------------------------- autograd.Function


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


# ----------------------------------------------------------------------------- dispatch


def resolve_backend(x: torch.Tensor, top_k: int, backend: str = "auto") -> str:
    """The backend ``omni_router`` runs for these inputs (``auto`` resolved)."""
    if backend not in BACKENDS:
        raise ValueError(f"omni_router: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if x.is_cuda and triton_supported(x, top_k) is None:
            return "triton"
        return "torch"
    if backend == "triton":
        reason = triton_supported(x, top_k)
        if reason is not None:
            raise ValueError(f"omni_router: backend='triton' cannot run here: {reason}")
    return backend


def omni_router(
    x: torch.Tensor,
    y: torch.Tensor,
    top_k: int,
    *,
    renormalize: bool = False,
    backend: str = "auto",
    ids_dtype: torch.dtype = torch.int64,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Omni (Cartesian-product) routing of ``E = n * n`` experts from two logit vectors.

    Args:
        x, y: ``[T, n]`` router logits (fp16 / bf16 / fp32; fp64 on the torch backends).
            Column slices of one ``[T, 2n]`` tensor are fine (row stride is honoured).
        top_k: experts per token, ``1 <= top_k <= n * n``.
        renormalize: renormalise the softmax weights again (``norm_topk_prob``).
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` | ``"reference"``.
        ids_dtype: ``torch.int64`` (default, as transformers' ``DogeCDMoE``) or
            ``torch.int32``.

    Returns:
        ``topk_weights [T, top_k]`` in ``x.dtype`` (softmax computed in fp32) and
        ``topk_ids [T, top_k]`` with ``id = i * n + j``, sorted by descending score
        ``x[t, i] + y[t, j]``. Differentiable with respect to ``x`` and ``y``.
    """
    validate_omni_inputs(x, y, top_k, ids_dtype)
    which = resolve_backend(x, top_k, backend)
    if which == "triton":
        return _omni_router_op(x, y, top_k, bool(renormalize), ids_dtype == torch.int32)
    if which == "torch":
        return omni_router_pruned_torch(x, y, top_k, renormalize=renormalize, ids_dtype=ids_dtype)
    return omni_router_reference(x, y, top_k, renormalize=renormalize, ids_dtype=ids_dtype)
