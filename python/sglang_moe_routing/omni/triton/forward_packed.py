"""MODE_ITER with packed bf16x2 / fp16x2 chunk maxima: a forward VARIANT of the Omni router
(``benchmark/omni_variants.py`` times it; never the default, not an autotune candidate).

What differs from MODE_ITER (``forward.py``), and only for 16-bit logits with an even ``n``
and 4-byte aligned rows (anything else launches MODE_ITER itself):

* **Set-up at two logits per instruction.** The rows are loaded as int32 words (two logits
  each), both halves are made order-preserving at once
  (``w ^ (((w >> 15) & 0x10001) * 0x7FFF)``), and the per-chunk maximum and minimum are
  reduced with ``max.s16x2`` / ``min.s16x2`` (PTX, sm_90; emulated with plain integer ops
  under ``TRITON_INTERPRET=1`` or with ``asm=False``). No column bits are built per element.
* **Positions only for popped entries.** The chunk maxima are *proxy* keys
  ``value << 16 | (MAXCOL - first column of the chunk)``. A proxy is >= the chunk's true
  best key (same value, a column no larger) and compares with any key of another chunk
  exactly as the true key does (the columns lie in disjoint ranges), so the max over the
  chunk entries still names the chunk that holds the row's best key. Each pop reloads that
  chunk (as MODE_ITER does), takes the exact popped key as the best key ``<=`` the entry,
  then the chunk's next key below it. The per-axis lists, and so the whole output, are
  those of MODE_ITER with the same chunk size, bit for bit.
* NaN rows: the per-chunk max / min of the flipped halves against those of +-inf.

The candidate grid, softmax and stores are MODE_ITER's (``keys.py``, ``forward.py``).
"""

from __future__ import annotations

import torch

from .config import (
    HAS_TRITON,
    MODE_ITER,
    MODE_LANE,
    FwdConfig,
    _default_chunk,
    _dims,
    _interpreting,
    _pair_table,
    tl,
    triton,
)

if HAS_TRITON:
    from .forward import _reload_chunk
    from .keys import _MIN32, _col_lo, _pruned_grid_store, _scratch_grid_store

    # both 16-bit halves at their minimum: a masked word, below every real (flipped) logit
    # or equal to the flipped -NaN 0xFFFF, which the column range check keeps valid
    _PKMIN = tl.constexpr(-2147450880)  # 0x80008000

    @triton.jit
    def _s16x2_max_asm(a, b):
        return tl.inline_asm_elementwise("max.s16x2 $0, $1, $2;", "=r,r,r", [a, b],
                                         dtype=tl.int32, is_pure=True, pack=1)

    @triton.jit
    def _s16x2_min_asm(a, b):
        return tl.inline_asm_elementwise("min.s16x2 $0, $1, $2;", "=r,r,r", [a, b],
                                         dtype=tl.int32, is_pure=True, pack=1)

    @triton.jit
    def _s16x2_max_emu(a, b):
        """``max.s16x2`` in plain integer ops (interpreter, or ``asm=False``)."""
        hi = tl.maximum(a >> 16, b >> 16)
        lo = tl.maximum((a << 16) >> 16, (b << 16) >> 16)
        return (hi << 16) | (lo & 0xFFFF)

    @triton.jit
    def _s16x2_min_emu(a, b):
        hi = tl.minimum(a >> 16, b >> 16)
        lo = tl.minimum((a << 16) >> 16, (b << 16) >> 16)
        return (hi << 16) | (lo & 0xFFFF)

    @triton.jit
    def _top2_combine(a1, a2, b1, b2):
        """Sorted top 2 of two sorted pairs."""
        return tl.maximum(a1, b1), tl.maximum(tl.minimum(a1, b1), tl.maximum(a2, b2))

    @triton.jit
    def _lowest_bit(m):
        """Index of the lowest set bit of a non-zero int32 / int64 (exponent of the float of
        the isolated bit, a power of two, so exact)."""
        if m.dtype == tl.int32:
            b = (m & -m).to(tl.uint32, bitcast=True).to(tl.float32)
        else:
            b = (m & -m).to(tl.uint64, bitcast=True).to(tl.float32)
        return (b.to(tl.int32, bitcast=True) >> 23) - 127

    @triton.jit
    def _halves_max(w):
        return tl.maximum(w >> 16, (w << 16) >> 16)

    @triton.jit
    def _halves_min(w):
        return tl.minimum(w >> 16, (w << 16) >> 16)

    @triton.jit
    def _flip2(w, ASM: tl.constexpr):
        """Both 16-bit halves of ``w`` made order-preserving (negative: magnitude bits
        flipped); PTX: a sign-replicating byte permute and one logic op."""
        if ASM:
            return tl.inline_asm_elementwise(
                "{ .reg .b32 s; prmt.b32 s, $1, 0, 0xBB99; and.b32 s, s, 0x7FFF7FFF; "
                "xor.b32 $0, $1, s; }", "=r,r", [w], dtype=tl.int32, is_pure=True, pack=1)
        else:
            return w ^ (((w >> 15) & 0x10001) * 0x7FFF)

    @triton.jit
    def _packed_chunk_maxima(ptr, rows, rmask, stride, n, IS_BF16: tl.constexpr,
                             NP: tl.constexpr, S: tl.constexpr, ASM: tl.constexpr):
        """``[BLOCK_T, NP/S]`` proxy chunk maxima (``value << 16 | 65535 - first column``) of
        a 16-bit logit row loaded as int32 words, and the rows' NaN flags."""
        if IS_BF16:
            INF: tl.constexpr = 0x7F80
        else:
            INF: tl.constexpr = 0x7C00
        C: tl.constexpr = NP // S
        S2: tl.constexpr = S // 2
        cc = tl.arange(0, C)
        wcol = cc[None, :, None] * S2 + tl.arange(0, S2)[None, None, :]
        m = rmask[:, None, None] & (wcol < n // 2)
        wptr = ptr.to(tl.pointer_type(tl.int32))
        w = tl.load(wptr + rows[:, None, None] * (stride // 2) + wcol, mask=m, other=0)
        f = _flip2(w, ASM)  # both halves order-preserving
        fmax = tl.where(m, f, _PKMIN)  # masked words: 0 for the min (neutral), min for the max
        if ASM:
            cm = tl.reduce(fmax, 2, _s16x2_max_asm)
            cn = tl.reduce(f, 2, _s16x2_min_asm)
        else:
            cm = tl.reduce(fmax, 2, _s16x2_max_emu)
            cn = tl.reduce(f, 2, _s16x2_min_emu)
        vmax = _halves_max(cm)  # [BLOCK_T, C]
        row_nan = (tl.max(vmax, axis=1) > INF) | (tl.min(_halves_min(cn), axis=1) < -INF - 1)
        first = cc[None, :] * S
        proxy = (vmax << 16) | _col_lo(first, True)
        return tl.where(rmask[:, None] & (first < n), proxy, _MIN32), row_nan

    @triton.jit
    def _extract_next_proxy(cmax, ptr, rows, rmask, stride, n, C: tl.constexpr, S: tl.constexpr):
        """A pop over proxy chunk maxima: the best entry names the chunk; the exact popped
        key is the chunk's best key ``<=`` the entry (the entry itself once it is exact), and
        the entry becomes the chunk's next key below the popped one."""
        best = tl.max(cmax, axis=1)  # [BLOCK_T]
        chunk, key, m = _reload_chunk(best, ptr, rows, rmask, stride, n, True, _MIN32, S)
        popped, nxt = tl.reduce((tl.where(m & (key <= best[:, None]), key, _MIN32),
                                 tl.full(key.shape, _MIN32, tl.int32)), 1, _top2_combine)
        cmax = tl.where(tl.arange(0, C)[None, :] == chunk[:, None], nxt[:, None], cmax)
        return popped, cmax

    @triton.jit
    def _packed_iter_lists(x_ptr, y_ptr, rows, rmask, stride_x, stride_y, n, k,
                           IS_BF16: tl.constexpr, BLOCK_T: tl.constexpr, NP: tl.constexpr,
                           K: tl.constexpr, S: tl.constexpr, ASM: tl.constexpr):
        """Sorted per-axis top-K keys ``[BLOCK_T, K]`` of x and y (MODE_ITER's, exactly) from
        packed proxy chunk maxima and pops; and the rows' NaN flags."""
        C: tl.constexpr = NP // S
        xc, xnan = _packed_chunk_maxima(x_ptr, rows, rmask, stride_x, n, IS_BF16, NP, S, ASM)
        yc, ynan = _packed_chunk_maxima(y_ptr, rows, rmask, stride_y, n, IS_BF16, NP, S, ASM)
        kk = tl.arange(0, K)[None, :]
        xk = tl.full([BLOCK_T, K], _MIN32, tl.int32)
        yk = xk
        for r in range(0, tl.minimum(k, n)):
            bx, xc = _extract_next_proxy(xc, x_ptr, rows, rmask, stride_x, n, C, S)
            by, yc = _extract_next_proxy(yc, y_ptr, rows, rmask, stride_y, n, C, S)
            xk = tl.where(kk == r, bx[:, None], xk)
            yk = tl.where(kk == r, by[:, None], yk)
        return xk, yk, xnan, ynan

    @triton.jit(do_not_specialize=["T", "k"])
    def _omni_fwd_packed_kernel(
        x_ptr, y_ptr, w_ptr, ids_ptr, scr_ptr, pair_ptr,
        T, n, k, stride_x, stride_y, stride_w, stride_ids,
        IS_BF16: tl.constexpr, RENORM: tl.constexpr, BLOCK_T: tl.constexpr, NP: tl.constexpr,
        K: tl.constexpr, S: tl.constexpr, P: tl.constexpr, ASM: tl.constexpr,
    ):
        """MODE_ITER (pruned grid) with packed proxy chunk maxima; 16-bit logits, even ``n``
        and strides. One program: ``BLOCK_T`` tokens; scratch and pair table as MODE_ITER."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        rmask = rows < T
        rows = rows.to(tl.int64)
        xk, yk, xnan, ynan = _packed_iter_lists(x_ptr, y_ptr, rows, rmask, stride_x, stride_y, n,
                                                k, IS_BF16, BLOCK_T, NP, K, S, ASM)
        _pruned_grid_store(xk, yk, xnan, ynan, scr_ptr + rows[:, None] * (2 * K), pair_ptr, rows,
                           rmask, n, k, w_ptr, stride_w, ids_ptr, stride_ids, True, IS_BF16,
                           RENORM, K, P)

    # ------------------------------------------------------------------ lane-packed variant
    # Lane sentinels: the type minimum (no key) and "this lane's list ran dry".
    _LMIN = tl.constexpr(-2147483648)
    _LEXH = tl.constexpr(-2147483647)

    @triton.jit
    def _mm(a, b, OP: tl.constexpr, IS_MAX: tl.constexpr):
        """max (``IS_MAX``) or min: OP 0 int32, 1 packed s16x2 (PTX), 2 packed emulated."""
        if OP == 0:
            if IS_MAX:
                out = tl.maximum(a, b)
            else:
                out = tl.minimum(a, b)
        elif IS_MAX:
            if OP == 1:
                out = _s16x2_max_asm(a, b)
            else:
                out = _s16x2_max_emu(a, b)
        elif OP == 1:
            out = _s16x2_min_asm(a, b)
        else:
            out = _s16x2_min_emu(a, b)
        return out

    @triton.jit
    def _ce(a, b, OP: tl.constexpr):
        """Compare-exchange ``(max, min)``."""
        return _mm(a, b, OP, True), _mm(a, b, OP, False)

    @triton.jit
    def _sort4(a, b, c, d, OP: tl.constexpr):
        """Sorting network (5 compare-exchanges), descending."""
        a, b = _ce(a, b, OP)
        c, d = _ce(c, d, OP)
        a, c = _ce(a, c, OP)
        b, d = _ce(b, d, OP)
        b, c = _ce(b, c, OP)
        return a, b, c, d

    @triton.jit
    def _merge4(a0, a1, a2, a3, b0, b1, b2, b3, OP: tl.constexpr):
        """Sorted top 4 of two sorted 4-lists: the elementwise max against the reversed
        second list is the top-4 multiset as a bitonic sequence; a 4-element bitonic sort."""
        c0 = _mm(a0, b3, OP, True)
        c1 = _mm(a1, b2, OP, True)
        c2 = _mm(a2, b1, OP, True)
        c3 = _mm(a3, b0, OP, True)
        c0, c2 = _ce(c0, c2, OP)
        c1, c3 = _ce(c1, c3, OP)
        c0, c1 = _ce(c0, c1, OP)
        c2, c3 = _ce(c2, c3, OP)
        return c0, c1, c2, c3

    @triton.jit
    def _lpk_word(base, c, nw, EVEN_N: tl.constexpr, ASM: tl.constexpr):
        """Word ``c`` ([Q, R] word indices) of each lane, both halves flipped to
        order-preserving; words past ``n``: both halves at their minimum (for the max
        lists) and 0 (neutral, for the min channel). Rows are clamped to valid tokens."""
        if EVEN_N:
            f = _flip2(tl.load(base + c), ASM)
            fmax = f
        else:
            m = c < nw
            f = _flip2(tl.load(base + c, mask=m, other=0), ASM)
            fmax = tl.where(m, f, _PKMIN)
        return fmax, f

    @triton.jit(do_not_specialize=["T", "k"])
    def _omni_fwd_lanepk_kernel(
        x_ptr, y_ptr, w_ptr, ids_ptr, scr_ptr, pair_ptr,
        T, n, k, stride_x, stride_y, sxw, syw, dxyw, stride_w, stride_ids,
        IS_BF16: tl.constexpr, RENORM: tl.constexpr, BLOCK_T: tl.constexpr, NP: tl.constexpr,
        K: tl.constexpr, S: tl.constexpr, P: tl.constexpr, ASM: tl.constexpr, PATH: tl.constexpr,
        EVEN_N: tl.constexpr,
    ):
        """Lane-packed forward: 16 lanes per logit row, lane ``r`` owning the contiguous
        columns ``[r*G, (r+1)*G)`` (``G = NP/16``); x and y rows of ``BLOCK_T`` tokens.

        1. Per lane, sorted top-4 *values* of its ``G`` logits at two per instruction
           (int32 words, both halves flipped, s16x2 sorting network and bitonic merges), then
           the two halves' lists merged; no column bits per element.
        2. ``min(k, n)`` pops over the lane heads ``value << 16 | 0x8000 | (15 - lane)``:
           equal values pop in lane order, which is column order (contiguous lanes).
        3. Columns for the popped entries only: each entry's lane words are reloaded
           (L1 hits) and the first column holding the value found (the second one for the
           second pop of an equal key).
        4. A program where a pop is unreliable (a lane ran dry, a value popped three times from
           one lane, a logit with the bit pattern 0xFFFF popped) takes the packed MODE_ITER
           path instead (program-uniform; ~3 % of two-token programs on random bf16 rows,
           estimated on CPU).
        Then MODE_ITER's grid, softmax and stores: bit-exact with MODE_ITER (chunk ``S``).
        ``PATH`` (tests): 0 as above, 1 never the fallback (wrong where it was needed), 2
        always the fallback.
        """
        pid = tl.program_id(0)
        Q: tl.constexpr = 2 * BLOCK_T
        R: tl.constexpr = 16
        G: tl.constexpr = NP // R
        W: tl.constexpr = G // 2
        V: tl.constexpr = W // 4
        if IS_BF16:
            INF: tl.constexpr = 0x7F80
        else:
            INF: tl.constexpr = 0x7C00
        if ASM:
            OP: tl.constexpr = 1
        else:
            OP: tl.constexpr = 2
        qq = tl.arange(0, Q)[:, None]
        rr = tl.arange(0, R)[None, :]
        tok = pid * BLOCK_T + qq // 2
        tmask = tok < T
        t64 = tl.minimum(tok, T - 1).to(tl.int64)  # rows past T read the last token, unstored
        # y rows are addressed from x's pointer (dxyw words away): one load covers both
        roff = t64 * sxw + (qq % 2).to(tl.int64) * (dxyw + t64 * (syw - sxw))
        base = x_ptr.to(tl.pointer_type(tl.int32)) + roff
        nw = n // 2
        wl = rr * W
        a0, f0 = _lpk_word(base, wl, nw, EVEN_N, ASM)
        a1, f1 = _lpk_word(base, wl + 1, nw, EVEN_N, ASM)
        a2, f2 = _lpk_word(base, wl + 2, nw, EVEN_N, ASM)
        a3, f3 = _lpk_word(base, wl + 3, nw, EVEN_N, ASM)
        l0, l1, l2, l3 = _sort4(a0, a1, a2, a3, OP)
        mnw = _mm(_mm(f0, f1, OP, False), _mm(f2, f3, OP, False), OP, False)
        for v in tl.static_range(1, V):
            a0, f0 = _lpk_word(base, wl + 4 * v, nw, EVEN_N, ASM)
            a1, f1 = _lpk_word(base, wl + 4 * v + 1, nw, EVEN_N, ASM)
            a2, f2 = _lpk_word(base, wl + 4 * v + 2, nw, EVEN_N, ASM)
            a3, f3 = _lpk_word(base, wl + 4 * v + 3, nw, EVEN_N, ASM)
            b0, b1, b2, b3 = _sort4(a0, a1, a2, a3, OP)
            l0, l1, l2, l3 = _merge4(l0, l1, l2, l3, b0, b1, b2, b3, OP)
            mnw = _mm(mnw, _mm(_mm(f0, f1, OP, False), _mm(f2, f3, OP, False), OP, False), OP, False)
        # the two halves' sorted lists (odd / even columns) -> the lane's sorted top-4 values
        m0, m1, m2, m3 = _merge4(l0 >> 16, l1 >> 16, l2 >> 16, l3 >> 16,
                                 (l0 << 16) >> 16, (l1 << 16) >> 16, (l2 << 16) >> 16,
                                 (l3 << 16) >> 16, 0)
        nan_l = (m0 > INF) | (_halves_min(mnw) < -INF - 1)
        row_nan = tl.max(nan_l.to(tl.int32), axis=1)  # [Q]
        lb = 0x8000 | (R - 1 - rr)
        h1 = tl.where(m0 > -32768, (m0 << 16) | lb, _LMIN)
        h2 = tl.where(m1 > -32768, (m1 << 16) | lb, _LMIN)
        h3 = tl.where(m2 > -32768, (m2 << 16) | lb, _LMIN)
        h4 = tl.where(m3 > -32768, (m3 << 16) | lb, _LMIN)
        more = tl.where(h4 > _LMIN, _LEXH, _LMIN)

        kk = tl.arange(0, K)[None, :]
        lst = tl.full([Q, K], _LMIN, tl.int32)
        occ = tl.zeros([Q, K], tl.int32)  # 1: the same key (value and lane) was popped just before
        last = tl.zeros([Q, R], tl.int32)
        dup = tl.zeros([Q], tl.int32)  # a key popped three times (a value 3x in one lane)
        rep = tl.zeros([Q], tl.int32)
        prev = tl.full([Q], _LMIN, tl.int32)
        npop = tl.minimum(k, n)
        for r in range(0, npop):
            best = tl.max(h1, axis=1)
            hit = h1 == best[:, None]  # lane bits: one lane (unless no real key is left)
            h1 = tl.where(hit, h2, h1)
            h2 = tl.where(hit, h3, h2)
            h3 = tl.where(hit, h4, h3)
            h4 = tl.where(hit, more, h4)
            lst = tl.where(kk == r, best[:, None], lst)
            same = (best == prev).to(tl.int32)
            occ = tl.where(kk == r, same[:, None], occ)
            dup = dup | (same & rep)
            rep = same
            prev = best
            last = hit.to(tl.int32)
        live = kk < npop
        bad = dup | tl.max(((h1 == _LEXH) & (last == 0)).to(tl.int32), axis=1)
        bad = bad | tl.max(((lst <= _LEXH) & live).to(tl.int32), axis=1)

        rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        rmask = rows < T
        r64 = rows.to(tl.int64)
        sel = scr_ptr + r64[:, None] * (2 * K)
        if PATH == 0:
            redo = tl.max(bad & tl.reshape(tmask.to(tl.int32), [Q]), axis=0) > 0
        else:
            redo = PATH == 2
        if redo:  # program-uniform, rare
            xk, yk, _xn, _yn = _packed_iter_lists(x_ptr, y_ptr, r64, rmask, stride_x, stride_y, n,
                                                  k, IS_BF16, BLOCK_T, NP, K, S, ASM)
            tl.store(sel + kk, xk, mask=rmask[:, None])
            tl.store(sel + K + kk, yk, mask=rmask[:, None])
        else:
            # columns of the popped entries: the first (second, for a repeated key) column of
            # the lane holding the value
            val = lst >> 16
            lane = (R - 1) - (lst & (R - 1))
            raw = (val ^ ((val >> 15) & 0x7FFF)) & 0xFFFF
            pat = (raw | (raw << 16))[:, :, None]
            ii = tl.arange(0, W)[None, None, :]
            c3 = lane[:, :, None] * W + ii  # [Q, K, W]
            if EVEN_N:  # every row is a valid token (clamped), every lane word exists
                wm = tl.full([1, 1, 1], True, tl.int1)
                d = tl.load(base[:, :, None] + c3) ^ pat
            else:
                wm = c3 < nw
                d = tl.load(base[:, :, None] + c3, mask=wm, other=0) ^ pat
            # bit j of `hits`: the lane's column j holds the value (disjoint bits: sum = or)
            if G <= 32:
                one = tl.full([1, 1, 1], 1, tl.int32)
            else:
                one = tl.full([1, 1, 1], 1, tl.int64)
            hits = tl.sum(tl.where(wm & ((d & 0xFFFF) == 0), one << (2 * ii), 0)
                          + tl.where(wm & ((d & -65536) == 0), one << (2 * ii + 1), 0), axis=2)
            hits = tl.where(occ > 0, hits & (hits - 1), hits)  # second pop of a key: next column
            col = lane * G + _lowest_bit(hits)
            std = tl.where(live, (val << 16) | (65535 - col), _MIN32)
            tl.store(scr_ptr + (pid * Q + qq).to(tl.int64) * K + kk, std, mask=tmask)
        tl.debug_barrier()
        tok_nan = tl.max(tl.reshape(row_nan, [BLOCK_T, 2]), axis=1) > 0
        _scratch_grid_store(tok_nan, tok_nan, sel, pair_ptr, r64, rmask, n, k, w_ptr, stride_w, ids_ptr,
                            stride_ids, True, IS_BF16, RENORM, K, P)


def packable(x: torch.Tensor, y: torch.Tensor) -> bool:
    """16-bit logits that load as int32 pairs: even ``n``, even row strides, 4-byte aligned."""
    return (
        x.element_size() == 2 and x.shape[1] % 2 == 0 and x.stride(0) % 2 == 0
        and y.stride(0) % 2 == 0 and x.data_ptr() % 4 == 0 and y.data_ptr() % 4 == 0
        and x.stride(1) == 1 and y.stride(1) == 1
    )


def packed_config(n: int, top_k: int, block_t: int = 2, num_warps: int = 1) -> FwdConfig:
    """MODE_ITER config (MODE_ITER chunk size) that :func:`launch_fwd_packed` runs packed."""
    if _interpreting():
        block_t = 4
    return FwdConfig(block_t, num_warps, MODE_ITER, _default_chunk(n, top_k, MODE_ITER), True)


def launch_fwd_packed(x, y, top_k, renormalize, w, ids, cfg: FwdConfig, asm: bool = True) -> bool:
    """Run the packed variant of MODE_ITER config ``cfg`` into ``w, ids``; ``asm``: the PTX
    ``max.s16x2`` / ``min.s16x2`` (sm_90; ignored under ``TRITON_INTERPRET=1``), else their
    integer emulation. Inputs it cannot load as int32 pairs (fp32, odd ``n``, odd strides)
    run MODE_ITER itself. Returns whether the packed kernel ran."""
    from .forward import _launch_fwd

    if cfg.mode != MODE_ITER or not cfg.pruned or cfg.chunk < 2 or not packable(x, y):
        _launch_fwd(x, y, top_k, renormalize, w, ids, cfg)
        return False
    T, n = x.shape
    if T == 0:
        return True
    NP, K = _dims(n, top_k)
    scratch = torch.empty((T, 2 * K), dtype=torch.int32, device=x.device)
    pairs, P = _pair_table(top_k, x.device)
    _omni_fwd_packed_kernel[(triton.cdiv(T, cfg.block_t),)](
        x, y, w, ids, scratch, pairs, T, n, top_k, x.stride(0), y.stride(0), w.stride(0),
        ids.stride(0), IS_BF16=x.dtype == torch.bfloat16, RENORM=bool(renormalize),
        BLOCK_T=cfg.block_t, NP=NP, K=K, S=cfg.chunk, P=P, ASM=bool(asm) and not _interpreting(),
        num_warps=cfg.num_warps,
    )
    return True


def omni_router_fwd_packed(x, y, top_k, renormalize=False, ids_dtype=torch.int64, config=None,
                           asm: bool = True):
    """Forward of the packed variant (validated inputs): ``(weights, ids)`` as
    :func:`omni_router_fwd_triton` gives for the same MODE_ITER config."""
    T, n = x.shape
    w = torch.empty((T, top_k), dtype=x.dtype, device=x.device)
    ids = torch.empty((T, top_k), dtype=ids_dtype, device=x.device)
    if T == 0:
        return w, ids
    cfg = config if config is not None else packed_config(n, top_k)
    launch_fwd_packed(x, y, top_k, renormalize, w, ids, cfg, asm=asm)
    return w, ids


def lanepk_fits(n: int, top_k: int) -> bool:
    """Shapes the lane-packed variant serves: ``128 <= NP <= 1024`` (4 to 32 words per
    lane), even ``n``, ``K <= 8`` (lists of 4 per lane)."""
    NP, K = _dims(n, top_k)
    return 128 <= NP <= 1024 and n % 2 == 0 and K <= 8


def lanepk_config(n: int, top_k: int, block_t: int = 2, num_warps: int = 1) -> FwdConfig:
    """Config of the lane-packed variant: ``block_t`` tokens per program on ``num_warps``
    warps (16 lanes per row, ``2 * block_t`` rows), MODE_ITER's chunk size for its exact
    fallback path."""
    return FwdConfig(block_t, num_warps, MODE_LANE, _default_chunk(n, top_k, MODE_ITER), True,
                     lanes=16, lists=4)


def launch_fwd_lanepk(x, y, top_k, renormalize, w, ids, cfg: FwdConfig, asm: bool = True,
                      path: int = 0) -> bool:
    """Run the lane-packed variant into ``w, ids``; outside its shapes (:func:`lanepk_fits`,
    :func:`packable`), run the packed MODE_ITER variant instead. Returns whether the
    lane-packed kernel ran."""
    T, n = x.shape
    if not (lanepk_fits(n, top_k) and packable(x, y)):
        launch_fwd_packed(x, y, top_k, renormalize, w, ids, packed_config(n, top_k), asm=asm)
        return False
    if T == 0:
        return True
    NP, K = _dims(n, top_k)
    if cfg.mode != MODE_LANE or cfg.lanes != 16 or cfg.lists != 4 or cfg.chunk < 2:
        raise ValueError(f"launch_fwd_lanepk: cfg must come from lanepk_config, got {cfg}")
    nprog = triton.cdiv(T, cfg.block_t)
    scratch = torch.empty((nprog * cfg.block_t, 2 * K), dtype=torch.int32, device=x.device)
    pairs, P = _pair_table(top_k, x.device)
    dxyw = (y.data_ptr() - x.data_ptr()) // 4
    _omni_fwd_lanepk_kernel[(nprog,)](
        x, y, w, ids, scratch, pairs, T, n, top_k, x.stride(0), y.stride(0), x.stride(0) // 2,
        y.stride(0) // 2, dxyw, w.stride(0), ids.stride(0), IS_BF16=x.dtype == torch.bfloat16,
        RENORM=bool(renormalize), BLOCK_T=cfg.block_t, NP=NP, K=K, S=cfg.chunk, P=P,
        ASM=bool(asm) and not _interpreting(), PATH=path, EVEN_N=n == NP, num_warps=cfg.num_warps,
    )
    return True
