"""Backward kernel of the Omni router and the backward entry point
:func:`omni_router_bwd_triton`.

Deterministic, no atomics: per token, recompute the selected scores from ``x``, ``y`` and
the ids, ``ds = softmax backward``, sum ``ds`` over slots that share a row index ``i``
(resp. column ``j``) in registers, write zeros to the token's ``dx``/``dy`` rows, a CTA
barrier, then store each distinct index once.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .config import (
    _BWD_TUNED,
    HAS_TRITON,
    BwdConfig,
    _can_tune,
    _dims,
    _pick,
    _rows_contiguous,
    _t_bucket,
    bwd_config,
    bwd_config_candidates,
    tl,
    triton,
)

if HAS_TRITON:
    @triton.jit(do_not_specialize=["T", "k"])
    def _omni_bwd_kernel(
        x_ptr,
        y_ptr,
        ids_ptr,
        gw_ptr,
        dx_ptr,
        dy_ptr,
        T,
        n,
        k,
        stride_x,
        stride_y,
        stride_ids,
        stride_gw,
        stride_dx,
        stride_dy,
        RENORM: tl.constexpr,
        BLOCK_T: tl.constexpr,
        K: tl.constexpr,
        BLOCK_N: tl.constexpr,
        ZERO_FILL: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        rmask = rows < T
        rows = rows.to(tl.int64)
        slot = tl.arange(0, K)
        valid = rmask[:, None] & (slot[None, :] < k)

        ids = tl.load(ids_ptr + rows[:, None] * stride_ids + slot[None, :], mask=valid, other=0)
        ids = ids.to(tl.int32)  # n * n < 2**31
        i = ids // n
        j = ids - i * n
        xs = tl.load(x_ptr + rows[:, None] * stride_x + i, mask=valid, other=0.0).to(tl.float32)
        ys = tl.load(y_ptr + rows[:, None] * stride_y + j, mask=valid, other=0.0).to(tl.float32)
        s = tl.where(valid, xs + ys, float("-inf"))
        smax = tl.max(s, axis=1)
        e = tl.where(valid, tl.exp(s - smax[:, None]), 0.0)
        p = e / tl.sum(e, axis=1)[:, None]
        g = tl.load(gw_ptr + rows[:, None] * stride_gw + slot[None, :], mask=valid, other=0.0)
        g = g.to(tl.float32)
        if RENORM:  # w = p / sum(p)
            tot = tl.sum(p, axis=1)[:, None]
            dp = g / tot - tl.sum(g * p, axis=1)[:, None] / (tot * tot)
        else:
            dp = g
        ds = p * (dp - tl.sum(p * dp, axis=1)[:, None])
        ds = tl.where(valid, ds, 0.0)

        # sum over slots sharing an index; the first such slot stores the sum
        lvalid = valid[:, None, :]
        earlier = slot[None, None, :] < slot[None, :, None]  # [1, m, l]: l < m
        same_i = (i[:, :, None] == i[:, None, :]) & lvalid
        same_j = (j[:, :, None] == j[:, None, :]) & lvalid
        dsx = tl.sum(tl.where(same_i, ds[:, None, :], 0.0), axis=2)
        dsy = tl.sum(tl.where(same_j, ds[:, None, :], 0.0), axis=2)
        first_i = tl.sum((same_i & earlier).to(tl.int32), axis=2) == 0
        first_j = tl.sum((same_j & earlier).to(tl.int32), axis=2) == 0

        if ZERO_FILL:
            zero = tl.zeros([BLOCK_T, BLOCK_N], dtype=dx_ptr.dtype.element_ty)
            for c0 in range(0, n, BLOCK_N):
                cols = c0 + tl.arange(0, BLOCK_N)[None, :]
                zm = rmask[:, None] & (cols < n)
                tl.store(dx_ptr + rows[:, None] * stride_dx + cols, zero, mask=zm)
                tl.store(dy_ptr + rows[:, None] * stride_dy + cols, zero, mask=zm)
            tl.debug_barrier()  # zeros land before the values below (same addresses)
        tl.store(
            dx_ptr + rows[:, None] * stride_dx + i,
            dsx.to(dx_ptr.dtype.element_ty),
            mask=valid & first_i,
        )
        tl.store(
            dy_ptr + rows[:, None] * stride_dy + j,
            dsy.to(dy_ptr.dtype.element_ty),
            mask=valid & first_j,
        )


def _launch_bwd(x, y, ids, gw, renormalize, dx, dy, cfg: BwdConfig) -> None:
    T, n = x.shape
    top_k = ids.shape[1]
    _, K = _dims(n, top_k)
    grid = (triton.cdiv(T, cfg.block_t),)
    _omni_bwd_kernel[grid](
        x,
        y,
        ids,
        gw,
        dx,
        dy,
        T,
        n,
        top_k,
        x.stride(0),
        y.stride(0),
        ids.stride(0),
        gw.stride(0),
        dx.stride(0),
        dy.stride(0),
        RENORM=bool(renormalize),
        BLOCK_T=cfg.block_t,
        K=K,
        BLOCK_N=cfg.block_n,
        ZERO_FILL=True,
        num_warps=cfg.num_warps,
    )


def omni_router_bwd_triton(
    x: torch.Tensor,
    y: torch.Tensor,
    ids: torch.Tensor,
    grad_weights: torch.Tensor,
    renormalize: bool = False,
    config: Optional[BwdConfig] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel: ``(dL/dx, dL/dy)`` in ``x.dtype``, both ``[T, n]``.

    Deterministic: every element of ``dx``/``dy`` is written by exactly one thread
    (zeros first, then, after a CTA barrier, the per-index sums); no atomics.
    """
    T, n = x.shape
    dx = torch.empty((T, n), dtype=x.dtype, device=x.device)
    dy = torch.empty((T, n), dtype=y.dtype, device=y.device)
    if T == 0:
        return dx, dy
    top_k = ids.shape[1]
    x = _rows_contiguous(x)
    y = _rows_contiguous(y)
    ids = _rows_contiguous(ids)
    gw = _rows_contiguous(grad_weights)
    if config is None:
        if _can_tune(x):
            key = (n, top_k, _t_bucket(T), x.dtype, bool(renormalize), x.device)
            config = _BWD_TUNED.get(key)
            if config is None:
                cands = bwd_config_candidates(n, top_k, T, x.device)
                config = _pick(("bwd",) + key, cands,
                               lambda c: _launch_bwd(x, y, ids, gw, renormalize, dx, dy, c))
                _BWD_TUNED[key] = config
        else:
            config = bwd_config(n, top_k, T, x.device)
    _launch_bwd(x, y, ids, gw, renormalize, dx, dy, config)
    return dx, dy
