"""Omni (Cartesian-product) router: the plain-PyTorch specification and test oracles.

Routing contract (shapes, ``T`` tokens, ``n`` keys per axis, ``E = n * n`` experts):

* inputs ``x, y: [T, n]`` router logits of one dtype (fp16 / bf16 / fp32; fp64 on the
  torch paths only);
* expert ``(i, j)`` has id ``i * n + j`` and score ``x[t, i] + y[t, j]``, computed in
  fp32 (fp64 for fp64 inputs);
* each token keeps the ``top_k`` highest-scoring experts; outputs are sorted by
  descending score;
* ``weights = softmax(selected scores)`` in fp32, then, if ``renormalize``, divided by
  their sum again (``norm_topk_prob``; a no-op up to rounding), then cast to ``x.dtype``;
* ``ids`` are ``int64`` by default (what ``DogeCDMoE`` in transformers produces and
  ``nn.Embedding`` takes), ``int32`` on request.

Ties: experts with equal scores may be chosen in any order; which of several tied
experts at the k-th place is kept is not specified (compare ids as sets where scores
tie). NaN: ``torch.topk`` ranks NaN above every number, so a row whose ``x`` or ``y`` holds
a NaN selects NaN scores and gets NaN in all of its ``k`` weights; its ids stay in range
and distinct. Other rows are unaffected. No error is raised (that would need a host sync).
``+-inf`` follow IEEE arithmetic through the softmax (a row whose best score is ``+inf``
or ``-inf`` gets NaN weights, as ``torch.softmax`` gives).

This module holds:

* :func:`validate_omni_inputs`: the argument checks every backend shares;
* :func:`omni_router_reference`: the naive spec, materialises ``T * n * n`` scores;
* :func:`omni_router_pruned_torch`: exact ``O(n + k^2)``-per-token pruning in torch
  (per-axis top-k, then top-k of the ``k' x k'`` candidate grid, ``k' = min(k, n)``);
* :func:`omni_router_backward_reference`: ``dL/dx, dL/dy`` for a *given* selection, the
  oracle for the backward kernel when ties make selections differ.

All functions are differentiable with respect to ``x`` and ``y`` through autograd.
"""

from __future__ import annotations

from typing import Tuple

import torch

__all__ = [
    "validate_omni_inputs",
    "omni_router_reference",
    "omni_router_pruned_torch",
    "omni_router_backward_reference",
    "compute_dtype_for",
]

_IDS_DTYPES = (torch.int64, torch.int32)


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Dtype in which scores and softmax are computed: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def validate_omni_inputs(
    x: torch.Tensor,
    y: torch.Tensor,
    top_k: int,
    ids_dtype: torch.dtype = torch.int64,
) -> Tuple[int, int]:
    """Check the arguments of an Omni router call; return ``(T, n)``.

    Raises ``TypeError`` for non-tensors, non-floating or mismatched dtypes and a bad
    ``ids_dtype``; ``ValueError`` for shapes (``x``/``y`` not both ``[T, n]``, ``n == 0``),
    mismatched devices and ``top_k`` outside ``[1, n * n]``.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(
            f"omni_router: x and y must be torch.Tensor, got {type(x).__name__} and "
            f"{type(y).__name__}"
        )
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(
            f"omni_router: x and y must be 2-D [T, n] logits, got shapes "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape != y.shape:
        raise ValueError(
            f"omni_router: x and y must have the same shape [T, n], got "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    if not x.is_floating_point() or not y.is_floating_point():
        raise TypeError(
            f"omni_router: x and y must be floating-point logits, got {x.dtype} and {y.dtype}"
        )
    if x.dtype != y.dtype:
        raise TypeError(f"omni_router: x and y must share a dtype, got {x.dtype} and {y.dtype}")
    if x.device != y.device:
        raise ValueError(f"omni_router: x and y are on different devices ({x.device}, {y.device})")
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"omni_router: top_k must be an int, got {type(top_k).__name__}")
    if ids_dtype not in _IDS_DTYPES:
        raise TypeError(f"omni_router: ids_dtype must be torch.int64 or torch.int32, got {ids_dtype}")
    T, n = int(x.shape[0]), int(x.shape[1])
    if n < 1:
        raise ValueError("omni_router: n (the logits' last dimension) must be >= 1")
    if not 1 <= top_k <= n * n:
        raise ValueError(
            f"omni_router: top_k must be in [1, n * n] = [1, {n * n}] (n={n}), got {top_k}"
        )
    if ids_dtype == torch.int32 and n * n > 2**31 - 1:
        raise ValueError(f"omni_router: ids do not fit int32 for n={n}; use ids_dtype=torch.int64")
    return T, n


def _finish(
    scores: torch.Tensor,
    ids: torch.Tensor,
    renormalize: bool,
    out_dtype: torch.dtype,
    ids_dtype: torch.dtype,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the selected scores (in their compute dtype), optional renormalisation."""
    weights = torch.softmax(scores, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(out_dtype), ids.to(ids_dtype)


def omni_router_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    top_k: int,
    *,
    renormalize: bool = False,
    ids_dtype: torch.dtype = torch.int64,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Naive Omni routing: materialise all ``n * n`` scores per token, then top-k.

    Args:
        x, y: ``[T, n]`` logits (same dtype and device).
        top_k: experts per token, ``1 <= top_k <= n * n``.
        renormalize: divide the softmax weights by their sum again (``norm_topk_prob``).
        ids_dtype: ``torch.int64`` (default) or ``torch.int32``.

    Returns:
        ``(weights [T, top_k] in x.dtype, ids [T, top_k])`` sorted by descending score.

    Memory is ``T * n * n`` elements of fp32: this is the spec and the oracle, not a
    production path.
    """
    T, n = validate_omni_inputs(x, y, top_k, ids_dtype)
    cdt = compute_dtype_for(x.dtype)
    scores = x.to(cdt).unsqueeze(2) + y.to(cdt).unsqueeze(1)  # [T, n, n]; (i, j) -> i*n + j
    top_scores, ids = torch.topk(scores.reshape(T, n * n), top_k, dim=-1, sorted=True)
    return _finish(top_scores, ids, renormalize, x.dtype, ids_dtype)


def omni_router_pruned_torch(
    x: torch.Tensor,
    y: torch.Tensor,
    top_k: int,
    *,
    renormalize: bool = False,
    ids_dtype: torch.dtype = torch.int64,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact Omni routing with candidate pruning, in plain torch (``O(n + k^2)`` per token).

    If ``(i, j)`` is among the top-k of ``x_i + y_j``, then ``i`` is among the top-k of
    ``x`` and ``j`` among the top-k of ``y`` (k larger pairs would otherwise dominate it;
    fp32 rounding of the sum is monotone, so this holds for the computed scores too).
    So the answer lies in the ``k' x k'`` grid of the two per-axis top-``k'`` lists,
    ``k' = min(top_k, n)``. Same contract and return values as
    :func:`omni_router_reference`.
    """
    T, n = validate_omni_inputs(x, y, top_k, ids_dtype)
    cdt = compute_dtype_for(x.dtype)
    kk = min(top_k, n)
    xv, xi = torch.topk(x, kk, dim=-1, sorted=True)  # [T, kk]
    yv, yj = torch.topk(y, kk, dim=-1, sorted=True)
    grid = xv.to(cdt).unsqueeze(2) + yv.to(cdt).unsqueeze(1)  # [T, kk, kk]
    grid_ids = xi.unsqueeze(2) * n + yj.unsqueeze(1)
    top_scores, pos = torch.topk(grid.reshape(T, kk * kk), top_k, dim=-1, sorted=True)
    ids = grid_ids.reshape(T, kk * kk).gather(1, pos)
    return _finish(top_scores, ids, renormalize, x.dtype, ids_dtype)


def omni_router_backward_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    ids: torch.Tensor,
    grad_weights: torch.Tensor,
    *,
    renormalize: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients ``(dL/dx, dL/dy)`` of the Omni weights for a *fixed* selection ``ids``.

    ``dL/dx[t, i] = sum over slots m with ids[t, m] // n == i of dL/dscore[t, m]``
    (and the same for ``y`` with ``ids % n``), where ``dL/dscore`` is the softmax (and
    renormalisation) backward of ``grad_weights``. Computed through autograd in the
    compute dtype; returned in ``x.dtype``.
    """
    n = x.shape[1]
    cdt = compute_dtype_for(x.dtype)
    with torch.enable_grad():
        xd = x.detach().to(cdt).requires_grad_(True)
        yd = y.detach().to(cdt).requires_grad_(True)
        ids64 = ids.to(torch.int64)
        scores = xd.gather(1, ids64 // n) + yd.gather(1, ids64 % n)
        weights = torch.softmax(scores, dim=-1)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        dx, dy = torch.autograd.grad(weights, (xd, yd), grad_weights.to(cdt), allow_unused=True)
    dx = torch.zeros_like(xd) if dx is None else dx
    dy = torch.zeros_like(yd) if dy is None else dy
    return dx.to(x.dtype), dy.to(y.dtype)
