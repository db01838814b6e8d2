"""The Omni router's public face: validation and backend resolution, then the op.

``omni_router(x, y, top_k, renormalize=False, backend="auto")`` returns
``(topk_weights [T, k] in x.dtype, topk_ids [T, k] int64)`` (see ``reference.py`` for the
contract). Backends:

* ``"triton"``: the fused kernels (forward and backward) for CUDA tensors the kernels
  support (no host sync, CUDA-graph capturable once compiled);
* ``"torch"``: the exact pruned ``k' x k'`` grid in plain torch (any device, fp64 too);
* ``"reference"``: the naive ``n * n`` materialisation (tests and small shapes only);
* ``"auto"``: ``"triton"`` for CUDA tensors the kernels support, else ``"torch"``.

Every backend runs inside the custom op ``torch.ops.sglang_moe_routing.omni_router``
(``ops.py``), which ``torch.compile`` keeps as one opaque call, except a torch backend whose
operations autograd must record (grad mode on and ``x`` or ``y`` requiring grad): that call
runs :func:`omni_router_impl` directly, as ``expert_choice_route`` does. All backends are
differentiable with respect to ``x`` and ``y``.
"""

from __future__ import annotations

from typing import Tuple

import torch

from .ops import omni_router_impl, omni_router_op, triton_supported
from .reference import validate_omni_inputs

__all__ = ["BACKENDS", "omni_router", "resolve_backend"]

BACKENDS = ("auto", "triton", "torch", "reference")


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
    args = (x, y, top_k, bool(renormalize), ids_dtype == torch.int32, which)
    if which != "triton" and torch.is_grad_enabled() and (x.requires_grad or y.requires_grad):
        return omni_router_impl(*args)
    return omni_router_op(*args)
