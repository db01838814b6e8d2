"""Forward kernel of the Omni router (per-axis top-k variants dense, chunk and iter) and the
forward entry point :func:`omni_router_fwd_triton`.

Per token (one program handles ``BLOCK_T`` tokens):

1. **Per-axis top-k** of ``x`` and of ``y`` on packed integer keys (``keys.py``).

   * ``SPLIT=False`` (small ``n``, < 128): the whole row is one register tile; a bitonic
     top-k (``tl.topk``) selects ``K`` keys.
   * ``SPLIT=True`` (large ``n``, >= 128): the row is split into ``C = NP / S`` chunks
     of ``S`` columns; only the chunk maxima enter a bitonic top-k of ``C`` keys. The
     top-k elements of the row lie in the ``K`` chunks with the largest maxima (an
     element of any other chunk is beaten by ``K`` chunk maxima), so those ``K * S``
     elements are reloaded (L1/L2 hits) and a second top-k of ``K * S`` keys gives the
     answer. Work per token ~ ``n + K log^2 K`` instead of ``n log^2 K``.
   * MODE_LANE (16 lanes per row, keys in registers): ``forward_lane.py``.

2. **Candidate grid.** If ``(i, j)`` is in the top-k of ``x_i + y_j``, ``i`` is in the
   top-k of ``x`` and ``j`` in the top-k of ``y``. The ``K x K`` grid of fp32 sums of the
   two lists (int64 keys: score bits, then ``MAXID - id``) goes through one more bitonic
   top-k; the result is sorted by descending score.

3. softmax in fp32 over the ``k`` selected scores (optionally renormalised), stored in
   ``x.dtype``; ids ``i * n + j`` stored as int64 (or int32).

The configuration comes from ``config.py`` (heuristic, or autotuned when enabled).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .config import (
    _FWD_TUNED,
    HAS_TRITON,
    MODE_LANE,
    FwdConfig,
    _can_tune,
    _dims,
    _pair_table,
    _pick,
    _rows_contiguous,
    _t_bucket,
    fwd_config,
    fwd_config_candidates,
    tl,
    triton,
)
from .forward_lane import _launch_fwd_lane

if HAS_TRITON:
    from .keys import (
        _MIN32,
        _MIN64,
        _col_lo,
        _decode_col,
        _grid_keys,
        _keys_of,
        _pruned_grid_store,
        _store_topk,
        _topk_desc,
    )

    @triton.jit
    def _chunk_gather_topk(base, rows_ok, top_c, n, IS16: tl.constexpr, MINK: tl.constexpr,
                           BLOCK_T: tl.constexpr, K: tl.constexpr, S: tl.constexpr):
        """Top-K keys of the elements of the K chunks whose maxima are ``top_c``."""
        ss = tl.arange(0, S)
        chunk = _decode_col(top_c, IS16) // S
        col = chunk[:, :, None] * S + ss[None, None, :]  # [BLOCK_T, K, S]
        m = (top_c > MINK)[:, :, None] & rows_ok[:, None, None] & (col < n)
        v = tl.load(base + col, mask=m, other=0.0)
        key, _mag = _keys_of(v, _col_lo(col, IS16), IS16)
        key = tl.where(m, key, MINK)
        return _topk_desc(tl.reshape(key, [BLOCK_T, K * S]), K)

    @triton.jit
    def _axis_topk(
        ptr,
        rows,
        rmask,
        stride,
        n,
        MODE: tl.constexpr,
        IS16: tl.constexpr,
        IS_BF16: tl.constexpr,
        BLOCK_T: tl.constexpr,
        NP: tl.constexpr,
        K: tl.constexpr,
        S: tl.constexpr,
    ):
        """Per-token top-``K`` packed keys ``[BLOCK_T, K]`` (descending) of one logit row,
        and whether the row holds a NaN (bitonic variants, MODE 0 and 1).

        MODE 0 (dense): bitonic top-K of the whole row.
        MODE 1 (chunk): bitonic top-K of the ``NP/S`` chunk maxima, then of the ``K*S``
        elements of the K best chunks (which hold the row's top-K: an element of any
        other chunk is beaten by K chunk maxima).
        """
        if IS16:
            MINK: tl.constexpr = _MIN32
            if IS_BF16:
                INF: tl.constexpr = 0x7F80  # magnitude bits of inf; larger means NaN
            else:
                INF: tl.constexpr = 0x7C00
        else:
            MINK: tl.constexpr = _MIN64
            INF: tl.constexpr = 0x7F800000
        base = ptr + rows[:, None, None] * stride
        if MODE == 0:
            col = tl.arange(0, NP)[None, None, :]
            m = rmask[:, None, None] & (col < n)
            v = tl.load(base + col, mask=m, other=0.0)
            key, mag = _keys_of(v, _col_lo(col, IS16), IS16)
            key = tl.reshape(tl.where(m, key, MINK), [BLOCK_T, NP])
            row_nan = tl.max(tl.reshape(tl.where(m, mag, 0), [BLOCK_T, NP]), axis=1) > INF
            out = _topk_desc(key, K)
        else:
            C: tl.constexpr = NP // S
            col = tl.arange(0, C)[None, :, None] * S + tl.arange(0, S)[None, None, :]
            m = rmask[:, None, None] & (col < n)
            v = tl.load(base + col, mask=m, other=0.0)
            key, mag = _keys_of(v, _col_lo(col, IS16), IS16)
            key = tl.where(m, key, MINK)
            row_nan = tl.max(tl.max(tl.where(m, mag, 0), axis=2), axis=1) > INF
            top_c = _topk_desc(tl.max(key, axis=2), K)  # K best chunk maxima
            out = _chunk_gather_topk(base, rmask, top_c, n, IS16, MINK, BLOCK_T, K, S)
        return out, row_nan

    @triton.jit
    def _chunk_maxima(
        ptr,
        rows,
        rmask,
        stride,
        n,
        IS16: tl.constexpr,
        IS_BF16: tl.constexpr,
        NP: tl.constexpr,
        S: tl.constexpr,
    ):
        """MODE 2 set-up: ``[BLOCK_T, NP/S]`` chunk maxima of the packed keys, NaN flags."""
        if IS16:
            MINK: tl.constexpr = _MIN32
            if IS_BF16:
                INF: tl.constexpr = 0x7F80
            else:
                INF: tl.constexpr = 0x7C00
        else:
            MINK: tl.constexpr = _MIN64
            INF: tl.constexpr = 0x7F800000
        C: tl.constexpr = NP // S
        col = tl.arange(0, C)[None, :, None] * S + tl.arange(0, S)[None, None, :]
        m = rmask[:, None, None] & (col < n)
        v = tl.load(ptr + rows[:, None, None] * stride + col, mask=m, other=0.0)
        key, mag = _keys_of(v, _col_lo(col, IS16), IS16)
        cmax = tl.max(tl.where(m, key, MINK), axis=2)
        row_nan = tl.max(tl.max(tl.where(m, mag, 0), axis=2), axis=1) > INF
        return cmax, row_nan

    @triton.jit
    def _extract_next(cmax, ptr, rows, rmask, stride, n, IS16: tl.constexpr, MINK: tl.constexpr,
                      C: tl.constexpr, S: tl.constexpr):
        """MODE 2 step: pop the best key of the row and refresh its chunk's maximum by
        reloading the chunk (L1/L2 hit) and taking the best key below the popped one."""
        best = tl.max(cmax, axis=1)  # [BLOCK_T]
        chunk, key, m = _reload_chunk(best, ptr, rows, rmask, stride, n, IS16, MINK, S)
        key = tl.where(m & (key < best[:, None]), key, MINK)
        cmax = tl.where(tl.arange(0, C)[None, :] == chunk[:, None], tl.max(key, axis=1)[:, None], cmax)
        return best, cmax

    @triton.jit
    def _reload_chunk(best, ptr, rows, rmask, stride, n, IS16: tl.constexpr, MINK: tl.constexpr,
                      S: tl.constexpr):
        """The chunk of key ``best`` (per row), its ``[BLOCK_T, S]`` keys reloaded from ``ptr``
        (L1/L2 hits) and their mask."""
        chunk = _decode_col(best, IS16) // S
        col = chunk[:, None] * S + tl.arange(0, S)[None, :]  # [BLOCK_T, S]
        m = (rmask & (best > MINK))[:, None] & (col < n)
        v = tl.load(ptr + rows[:, None] * stride + col, mask=m, other=0.0)
        key, _mag = _keys_of(v, _col_lo(col, IS16), IS16)
        return chunk, key, m

    # T and k vary per call: no value specialisation (one compiled kernel per config)
    @triton.jit(do_not_specialize=["T", "k"])
    def _omni_fwd_kernel(
        x_ptr,
        y_ptr,
        w_ptr,
        ids_ptr,
        scr_ptr,
        pair_ptr,
        T,
        n,
        k,
        stride_x,
        stride_y,
        stride_w,
        stride_ids,
        IS16: tl.constexpr,
        IS_BF16: tl.constexpr,
        RENORM: tl.constexpr,
        BLOCK_T: tl.constexpr,
        NP: tl.constexpr,
        K: tl.constexpr,
        MODE: tl.constexpr,
        S: tl.constexpr,
        PRUNED: tl.constexpr,
        P: tl.constexpr,
    ):
        """One program: BLOCK_T tokens. ``scr_ptr``: per-token scratch of ``2K`` keys (the
        two per-axis lists, re-read by grid cell); ``pair_ptr``: ``P`` grid positions
        ``a*K + b`` with ``(a+1)(b+1) <= k`` (``-1`` pads)."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        rmask = rows < T
        rows = rows.to(tl.int64)
        if IS16:
            MINK: tl.constexpr = _MIN32
        else:
            MINK: tl.constexpr = _MIN64
        scr = scr_ptr + rows[:, None] * (2 * K)

        if MODE == 2:
            # iterative extraction: K pops from the chunk maxima, x and y interleaved
            C: tl.constexpr = NP // S
            xc, xnan = _chunk_maxima(x_ptr, rows, rmask, stride_x, n, IS16, IS_BF16, NP, S)
            yc, ynan = _chunk_maxima(y_ptr, rows, rmask, stride_y, n, IS16, IS_BF16, NP, S)
            kk = tl.arange(0, K)[None, :]
            if IS16:
                xk = tl.full([BLOCK_T, K], MINK, tl.int32)
            else:
                xk = tl.full([BLOCK_T, K], MINK, tl.int64)
            yk = xk
            for r in range(0, tl.minimum(k, n)):
                bx, xc = _extract_next(xc, x_ptr, rows, rmask, stride_x, n, IS16, MINK, C, S)
                by, yc = _extract_next(yc, y_ptr, rows, rmask, stride_y, n, IS16, MINK, C, S)
                xk = tl.where(kk == r, bx[:, None], xk)
                yk = tl.where(kk == r, by[:, None], yk)
        else:
            xk, xnan = _axis_topk(x_ptr, rows, rmask, stride_x, n, MODE, IS16, IS_BF16,
                                  BLOCK_T, NP, K, S)
            yk, ynan = _axis_topk(y_ptr, rows, rmask, stride_y, n, MODE, IS16, IS_BF16,
                                  BLOCK_T, NP, K, S)

        # top-K of the candidate grid; x_a + y_b in fp32
        if PRUNED:
            _pruned_grid_store(xk, yk, xnan, ynan, scr, pair_ptr, rows, rmask, n, k, w_ptr, stride_w,
                               ids_ptr, stride_ids, IS16, IS_BF16, RENORM, K, P)
        else:
            g = _grid_keys(xk[:, :, None], yk[:, None, :], n, IS16, IS_BF16, MINK)
            top = _topk_desc(tl.reshape(g, [BLOCK_T, K * K]), K)  # [BLOCK_T, K] desc
            _store_topk(top, k, K, xnan | ynan, rows, rmask, w_ptr, stride_w, ids_ptr, stride_ids,
                        RENORM)


# ----------------------------------------------------------------------------- launchers


def _launch_fwd(x, y, top_k, renormalize, w, ids, cfg: FwdConfig) -> None:
    if cfg.mode == MODE_LANE:
        return _launch_fwd_lane(x, y, top_k, renormalize, w, ids, cfg)
    T, n = x.shape
    NP, K = _dims(n, top_k)
    key_dtype = torch.int32 if x.element_size() == 2 else torch.int64
    if cfg.pruned:
        scratch = torch.empty((T, 2 * K), dtype=key_dtype, device=x.device)
    else:
        scratch = torch.empty((1,), dtype=key_dtype, device=x.device)
    if cfg.pruned:
        pairs, P = _pair_table(top_k, x.device)
    else:
        pairs, P = scratch, 1
    grid = (triton.cdiv(T, cfg.block_t),)
    _omni_fwd_kernel[grid](
        x,
        y,
        w,
        ids,
        scratch,
        pairs,
        T,
        n,
        top_k,
        x.stride(0),
        y.stride(0),
        w.stride(0),
        ids.stride(0),
        IS16=x.element_size() == 2,
        IS_BF16=x.dtype == torch.bfloat16,
        RENORM=bool(renormalize),
        BLOCK_T=cfg.block_t,
        NP=NP,
        K=K,
        MODE=cfg.mode,
        S=cfg.chunk,
        PRUNED=cfg.pruned,
        P=P,
        num_warps=cfg.num_warps,
    )


def omni_router_fwd_triton(
    x: torch.Tensor,
    y: torch.Tensor,
    top_k: int,
    renormalize: bool = False,
    ids_dtype: torch.dtype = torch.int64,
    config: Optional[FwdConfig] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Inputs must already be validated.

    Returns ``weights [T, top_k]`` (``x.dtype``) and ``ids [T, top_k]`` (``ids_dtype``).
    No host synchronisation; capturable in a CUDA graph once the kernel is compiled (and,
    with autotuning on, tuned) for the shape.
    """
    T, n = x.shape
    w = torch.empty((T, top_k), dtype=x.dtype, device=x.device)
    ids = torch.empty((T, top_k), dtype=ids_dtype, device=x.device)
    if T == 0:
        return w, ids
    x = _rows_contiguous(x)
    y = _rows_contiguous(y)
    if config is None:
        if _can_tune(x):
            key = (n, top_k, _t_bucket(T), x.dtype, bool(renormalize), ids_dtype, x.device)
            config = _FWD_TUNED.get(key)
            if config is None:
                cands = fwd_config_candidates(n, top_k, T, x.device)
                config = _pick(("fwd",) + key, cands,
                               lambda c: _launch_fwd(x, y, top_k, renormalize, w, ids, c))
                _FWD_TUNED[key] = config
        else:
            config = fwd_config(n, top_k, T, x.device)
    _launch_fwd(x, y, top_k, renormalize, w, ids, config)
    return w, ids
