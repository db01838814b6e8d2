"""Packed integer keys of the Omni router's forward kernels, and the primitives both
forward kernels (``forward.py``, ``forward_lane.py``) share: top-k on keys, the candidate
grid's keys, and the softmax and store of the selected experts.

A key holds the logit's bits made order-preserving as a signed integer (high part) and
``MAXCOL - column`` (low part), so one integer ``max`` compares by value and breaks ties
towards the lower column, and decoding a key gives back the exact value and its column. NaN
is mapped to the largest key (``torch.topk`` ranks NaN first too). 16-bit logits use int32
keys, fp32 logits int64 keys. A candidate-grid key is int64: the fp32 score's bits, then
``MAXID - id``.
"""

from .config import HAS_TRITON, tl, triton

if HAS_TRITON:
    _HAS_TL_TOPK = tl.constexpr(hasattr(tl, "topk"))
    # "no key" sentinels, below every real key (the lowest real 16-bit key is -NaN's)
    _MIN32 = tl.constexpr(-2147483647)
    _MIN64 = tl.constexpr(-9223372036854775807)

    @triton.jit
    def _topk_desc(keys, K: tl.constexpr):
        """Top ``K`` of a ``[R, N]`` integer tensor along dim 1, sorted descending."""
        if K == 1:  # (tl.topk of triton 3.6 does not take k=1)
            out = tl.max(keys, axis=1)[:, None]
        elif _HAS_TL_TOPK:
            out = tl.topk(keys, K, dim=1)
        else:  # older triton: full bitonic sort, then keep the first K columns
            R: tl.constexpr = keys.shape[0]
            N: tl.constexpr = keys.shape[1]
            srt = tl.sort(keys, dim=1, descending=True)
            # sorted rows: chunk 0 dominates every later chunk element-wise
            out = tl.max(tl.reshape(srt, [R, N // K, K]), axis=1)
        return out

    @triton.jit
    def _keys_of(v, col_lo, IS16: tl.constexpr):
        """Packed order-preserving keys of logits ``v`` and their magnitude bits.

        ``col_lo = MAXCOL - column`` fills the low bits (ties: lower column first).
        The sign flip ``b ^ ((b >> 15) & 0x7FFF)`` makes the float order the signed
        integer order. NaN is detected separately from the magnitude bits.
        """
        if IS16:
            b = v.to(tl.int16, bitcast=True).to(tl.int32)
            key = ((b ^ ((b >> 15) & 0x7FFF)) << 16) | col_lo
            mag = b & 0x7FFF
        else:
            b = v.to(tl.int32, bitcast=True)
            o = b ^ ((b >> 31) & 0x7FFFFFFF)
            key = (o.to(tl.int64) << 32) | col_lo.to(tl.int64)
            mag = b & 0x7FFFFFFF
        return key, mag

    @triton.jit
    def _col_lo(col, IS16: tl.constexpr):
        if IS16:
            return 65535 - col
        else:
            return 2147483647 - col

    @triton.jit
    def _decode_col(key, IS16: tl.constexpr):
        if IS16:
            col = 65535 - (key & 65535)
        else:
            col = 2147483647 - (key & 2147483647).to(tl.int32)
        return col

    @triton.jit
    def _decode_val(key, IS16: tl.constexpr, IS_BF16: tl.constexpr):
        """Exact logit value (as fp32) of a packed key."""
        if IS16:
            o = key >> 16
            b = (o ^ ((o >> 15) & 0x7FFF)).to(tl.int16)
            if IS_BF16:
                v = b.to(tl.bfloat16, bitcast=True).to(tl.float32)
            else:
                v = b.to(tl.float16, bitcast=True).to(tl.float32)
        else:
            o = (key >> 32).to(tl.int32)
            v = (o ^ ((o >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
        return v

    @triton.jit
    def _grid_keys(xa, yb, n, IS16: tl.constexpr, IS_BF16: tl.constexpr, MINK: tl.constexpr):
        """int64 keys of the candidate experts (score x_a + y_b in fp32, id i*n + j)."""
        s = _decode_val(xa, IS16, IS_BF16) + _decode_val(yb, IS16, IS_BF16)
        gid = _decode_col(xa, IS16) * n + _decode_col(yb, IS16)
        sb = s.to(tl.int32, bitcast=True)
        so = sb ^ ((sb >> 31) & 0x7FFFFFFF)
        so = tl.where(s != s, 0x7FFFFFFE, so)
        g = (so.to(tl.int64) << 32) | (2147483647 - gid).to(tl.int64)
        return tl.where((xa > MINK) & (yb > MINK), g, _MIN64)


    @triton.jit
    def _store_topk(top, k, K: tl.constexpr, tok_nan, rows, rmask, w_ptr, stride_w, ids_ptr,
                    stride_ids, RENORM: tl.constexpr):
        """Decode the ``[BLOCK_T, K]`` best grid keys (descending; score bits high, ~id low),
        softmax over the first ``k``, optional renormalisation, NaN rows -> NaN weights, and
        store weights and ids of the rows in ``rmask``. Shared by both forward kernels."""
        slot = tl.arange(0, K)[None, :]
        valid = (top > _MIN64) & (slot < k)
        tb = (top >> 32).to(tl.int32)
        score = (tb ^ ((tb >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
        ids = 2147483647 - (top & 2147483647)  # int64
        score = tl.where(valid, score, float("-inf"))
        smax = tl.max(score, axis=1)
        e = tl.where(valid, tl.exp(score - smax[:, None]), 0.0)
        w = e / tl.sum(e, axis=1)[:, None]
        if RENORM:
            w = w / tl.sum(w, axis=1)[:, None]
        w = tl.where(tok_nan[:, None], float("nan"), w)
        om = rmask[:, None] & (slot < k)
        tl.store(w_ptr + rows[:, None] * stride_w + slot, w.to(w_ptr.dtype.element_ty), mask=om)
        tl.store(ids_ptr + rows[:, None] * stride_ids + slot, ids.to(ids_ptr.dtype.element_ty), mask=om)


    @triton.jit
    def _pruned_grid_store(xk, yk, xnan, ynan, scr, pair_ptr, rows, rmask, n, k, w_ptr, stride_w,
                           ids_ptr, stride_ids, IS16: tl.constexpr, IS_BF16: tl.constexpr,
                           RENORM: tl.constexpr, K: tl.constexpr, P: tl.constexpr):
        """Pruned candidate grid of two sorted ``[BLOCK_T, K]`` per-axis key lists (through the
        per-token scratch rows ``scr``: ``[x list, y list]``), then :func:`_store_topk`."""
        kk = tl.arange(0, K)[None, :]
        tl.store(scr + kk, xk, mask=rmask[:, None])
        tl.store(scr + K + kk, yk, mask=rmask[:, None])
        tl.debug_barrier()
        _scratch_grid_store(xnan, ynan, scr, pair_ptr, rows, rmask, n, k, w_ptr, stride_w, ids_ptr,
                            stride_ids, IS16, IS_BF16, RENORM, K, P)

    @triton.jit
    def _scratch_grid_store(xnan, ynan, scr, pair_ptr, rows, rmask, n, k, w_ptr, stride_w, ids_ptr,
                            stride_ids, IS16: tl.constexpr, IS_BF16: tl.constexpr,
                            RENORM: tl.constexpr, K: tl.constexpr, P: tl.constexpr):
        """The pruned grid read from per-token scratch rows ``scr`` that already hold the two
        sorted lists ``[x list, y list]`` (stored before a barrier), then :func:`_store_topk`
        (``xnan | ynan``: the tokens whose weights are NaN)."""
        if IS16:
            MINK: tl.constexpr = _MIN32
        else:
            MINK: tl.constexpr = _MIN64
        ab = tl.load(pair_ptr + tl.arange(0, P))
        pm = (ab >= 0)[None, :] & rmask[:, None]
        a = tl.where(ab >= 0, ab // K, 0)[None, :]
        b = tl.where(ab >= 0, ab % K, 0)[None, :]
        xa = tl.load(scr + a, mask=pm, other=MINK)
        yb = tl.load(scr + K + b, mask=pm, other=MINK)
        top = _topk_desc(_grid_keys(xa, yb, n, IS16, IS_BF16, MINK), K)
        _store_topk(top, k, K, xnan | ynan, rows, rmask, w_ptr, stride_w, ids_ptr, stride_ids, RENORM)
