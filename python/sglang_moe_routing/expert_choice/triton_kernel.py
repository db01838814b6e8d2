"""Expert-choice routing in Triton: three kernels, no host sync, CUDA-graph capturable.

Same algorithm as the CUDA kernels (``sgl-kernel/csrc``), same contract as ``reference.py``:

1. ``_ec_score_kernel``  (row blocks): selection scores -> pick keys ``key(t, e)``
   (order-preserving uint32 of ``s + bias`` after group masking; 0 = not eligible: padding
   row, ``-inf`` or NaN), stored transposed ``keysT [E, T]``.
2. ``_ec_select_kernel`` (one program per expert): every token gets the distinct 64-bit
   composite ``key << 32 | (2**32 - 1 - t)``; the expert picks the composites >= its C-th
   largest one, found MSB-first 8 bits at a time with ``tl.histogram`` (a radix select, no
   sort). C is computed on the device from ``num_token_non_padded``.
3. ``_ec_route_kernel``  (row blocks): recompute the scores, mark the picks, take the row's
   top-k of ``(picked, score key, -expert id)``, gather and renormalise the weights.

Exactness. Ids must equal the reference bit for bit, so the scores reproduce PyTorch's CUDA
kernels operation for operation: softmax as ``softmax_warp_forward`` does it (row max,
``exp(x - max)``, per-lane sums in lane order then a butterfly over the lanes, IEEE division),
sigmoid as ``1 / (1 + exp(-x))``. On the GPU ``exp`` is libdevice's ``expf`` (not the fast
``ex2.approx`` path of ``tl.exp``) and libdevice runs without flush-to-zero where this Triton
has the ``enable_reflect_ftz`` option; no FMA contraction. Under ``TRITON_INTERPRET=1`` the
interpreter's numpy ``exp`` is used instead (CPU tests compare with the CPU reference).
"""

from __future__ import annotations

import os
import struct
from typing import Optional, Union

import torch
import triton
import triton.language as tl

from sglang_moe_routing.expert_choice.kernel_args import (
    check_kernel_args,
    kernel_inputs,
    prepare_num_valid,
)
from sglang_moe_routing.expert_choice.spec import RoutingSpec

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

if _INTERPRET:

    @triton.jit
    def _exp(x):
        return tl.exp(x)

else:
    from triton.language.extra.cuda import libdevice as _libdevice

    @triton.jit
    def _exp(x):
        return _libdevice.exp(x)


def _launch_options() -> dict:
    """Compiler options for exact float arithmetic (no FMA contraction, no FTZ)."""
    if _INTERPRET:
        return {}
    opts = {"enable_fp_fusion": False}
    try:
        from triton.backends.nvidia.compiler import CUDAOptions

        if "enable_reflect_ftz" in CUDAOptions.__dataclass_fields__:
            opts["enable_reflect_ftz"] = False
    except Exception:  # pragma: no cover - non-NVIDIA builds
        pass
    return opts


@triton.jit
def _order_key(f):
    """Monotone float32 -> uint32 (larger float, larger key); -0.0 folded onto +0.0."""
    u = f.to(tl.uint32, bitcast=True)
    u = tl.where(u == 0x80000000, 0, u)
    return tl.where((u & 0x80000000) != 0, u ^ 0xFFFFFFFF, u | 0x80000000)


@triton.jit
def _num_valid(T, ntnp_ptr, ntnp_host, HAS_NTNP: tl.constexpr):
    if HAS_NTNP:
        tv = tl.load(ntnp_ptr).to(tl.int64)
    else:
        tv = tl.cast(ntnp_host, tl.int64)  # an int arg equal to 1 arrives as a constexpr
    tv = tl.maximum(tv, 0)
    return tl.minimum(tv, T)


@triton.jit
def _row_scores(
    logits, stride_t, stride_e, rows, T, E, tv, bias_ptr, GS, NG, TG,
    WS: tl.constexpr, ITER: tl.constexpr, BLOCK_T: tl.constexpr,
    SCORING: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GROUPS: tl.constexpr, NGP: tl.constexpr,
    LOG_WS: tl.constexpr, GS_GE2: tl.constexpr,
):
    """Scores of a block of rows: (s [BT, P] fp32, row-order key [BT, P], pick key [BT, P]).

    Row-order key: order key of ``nan_to_num(select, nan=-inf)`` (0 for columns >= E).
    Pick key: order key of ``select`` if the row is valid and ``select > -inf``, else 0.
    """
    P: tl.constexpr = WS * ITER
    cols = tl.arange(0, P)
    rmask = rows < T
    cmask = cols < E
    row_off = rows.to(tl.int64) * stride_t
    m2 = rmask[:, None] & cmask[None, :]
    x = tl.load(
        logits + row_off[:, None] + cols[None, :].to(tl.int64) * stride_e,
        mask=m2, other=float("-inf"),
    ).to(tl.float32)
    if SCORING == 0:
        mx = tl.max(x, axis=1)
        # PyTorch's softmax_warp_forward: lane l sums its elements l, l + WS, ... in order,
        # then a butterfly over the WS lanes (pairs l, l ^ WS/2 first).
        lanes = tl.arange(0, WS)
        acc = tl.zeros([BLOCK_T, WS], tl.float32)
        for it in tl.static_range(ITER):
            c = it * WS + lanes
            xc = tl.load(
                logits + row_off[:, None] + c[None, :].to(tl.int64) * stride_e,
                mask=rmask[:, None] & (c < E)[None, :], other=float("-inf"),
            ).to(tl.float32)
            acc += _exp(xc - mx[:, None])
        for lvl in tl.static_range(LOG_WS):
            acc = tl.sum(tl.reshape(acc, [BLOCK_T, 2, WS >> (lvl + 1)]), axis=1)
        total = tl.reshape(acc, [BLOCK_T])
        s = tl.math.div_rn(_exp(x - mx[:, None]), total[:, None])
    else:
        s = tl.math.div_rn(tl.full([BLOCK_T, P], 1.0, tl.float32), 1.0 + _exp(-x))

    if HAS_BIAS:
        b = tl.load(bias_ptr + cols, mask=cmask, other=0.0)
        sel = s + b[None, :]
    else:
        sel = s

    if HAS_GROUPS:
        # Grouped top-k: group score = max (no bias) or sum of the two best biased scores;
        # NaN in a group ranks it as +inf; the TG best groups, ties -> lower group index.
        gidx = cols // GS
        garange = tl.arange(0, NGP)
        gk = tl.full([BLOCK_T, NGP], -1, tl.int64)
        for g in range(NG):
            inm = (gidx == g) & cmask
            isn = inm[None, :] & (sel != sel)
            has_nan = tl.max(isn.to(tl.int32), axis=1) > 0
            vals = tl.where(inm[None, :] & (sel == sel), sel, float("-inf"))
            a = tl.max(vals, axis=1)
            if HAS_BIAS:
                first = tl.min(tl.where(inm[None, :] & (vals == a[:, None]), cols[None, :], P), axis=1)
                b2 = tl.max(tl.where(cols[None, :] == first[:, None], float("-inf"), vals), axis=1)
                if GS_GE2:
                    score = a + b2
                else:
                    score = a
            else:
                score = a
            key = tl.where(has_nan, _order_key(tl.full([BLOCK_T], float("inf"), tl.float32)),
                           _order_key(score))
            comp = (key.to(tl.int64) << 16) | (0xFFFF - g)
            gk = tl.where(garange[None, :] == g, comp[:, None], gk)
        chosen = tl.zeros([BLOCK_T, NGP], tl.int32)
        for j in range(TG):
            best = tl.max(gk, axis=1)
            hit = gk == best[:, None]
            chosen = tl.where(hit, 1, chosen)
            gk = tl.where(hit, -1, gk)
        keep = tl.zeros([BLOCK_T, P], tl.int32)
        for g in range(NG):
            cg = tl.max(tl.where(garange[None, :] == g, chosen, 0), axis=1)
            keep = tl.where((gidx == g)[None, :], cg[:, None], keep)
        sel = tl.where(keep != 0, sel, float("-inf"))

    # torch.nan_to_num(sel, nan=-inf): NaN -> -inf, +inf -> FLT_MAX, -inf -> -FLT_MAX.
    flt_max = 3.4028234663852886e38
    qn = tl.where(sel != sel, float("-inf"),
                  tl.where(sel == float("inf"), flt_max,
                           tl.where(sel == float("-inf"), -flt_max, sel)))
    rkey = tl.where(cmask[None, :], _order_key(qn), 0)
    elig = m2 & (rows < tv)[:, None] & (sel > float("-inf"))
    pkey = tl.where(elig, _order_key(sel), 0)
    return s, rkey, pkey


@triton.jit
def _ec_score_kernel(
    logits, stride_t, stride_e, T, E, bias_ptr, ntnp_ptr, ntnp_host, keysT, GS, NG, TG,
    WS: tl.constexpr, ITER: tl.constexpr, BLOCK_T: tl.constexpr,
    SCORING: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GROUPS: tl.constexpr, NGP: tl.constexpr,
    HAS_NTNP: tl.constexpr, LOG_WS: tl.constexpr, GS_GE2: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    tv = _num_valid(T, ntnp_ptr, ntnp_host, HAS_NTNP)
    s, rkey, pkey = _row_scores(
        logits, stride_t, stride_e, rows, T, E, tv, bias_ptr, GS, NG, TG,
        WS, ITER, BLOCK_T, SCORING, HAS_BIAS, HAS_GROUPS, NGP, LOG_WS, GS_GE2,
    )
    P: tl.constexpr = WS * ITER
    cols = tl.arange(0, P)
    ptrs = keysT + cols[None, :].to(tl.int64) * T + rows[:, None]
    tl.store(ptrs, pkey.to(tl.int32, bitcast=True), mask=(rows < T)[:, None] & (cols < E)[None, :])


@triton.jit
def _ec_select_kernel(
    keysT, thr_ptr, T, ntnp_ptr, ntnp_host, cap_factor_bits, min_tokens,
    HAS_NTNP: tl.constexpr, BLOCK: tl.constexpr,
):
    e = tl.program_id(0)
    col = keysT + e.to(tl.int64) * T
    tv = _num_valid(T, ntnp_ptr, ntnp_host, HAS_NTNP)
    tvf = tv.to(tl.float64)
    # The double cf * k / E travels as its int64 bits (a float argument would be fp32).
    cap_factor = tl.cast(cap_factor_bits, tl.int64).to(tl.float64, bitcast=True)
    c = tl.math.ceil(tvf * cap_factor - 1e-9)  # launched without FMA contraction
    cap = tl.minimum(c, tvf).to(tl.int32)
    # Hybrid: T' < min_tokens -> C = T' (every expert takes every eligible token).
    cap = tl.where(tv < tl.cast(min_tokens, tl.int64), tv.to(tl.int32), cap)
    r = cap
    prefix = tl.full([], 0, tl.uint64)
    pmask = tl.full([], 0, tl.uint64)
    active = cap > 0
    bins = tl.arange(0, 256)
    for d in tl.static_range(8):
        if active:
            hist = tl.zeros([256], tl.int32)
            for start in range(0, T, BLOCK):
                t = start + tl.arange(0, BLOCK)
                tm = t < T
                k = tl.load(col + t, mask=tm, other=0).to(tl.uint32, bitcast=True)
                comp = (k.to(tl.uint64) << 32) | (4294967295 - t.to(tl.uint32)).to(tl.uint64)
                match = tm & ((comp & pmask) == prefix)
                digit = ((comp >> (56 - 8 * d)) & 255).to(tl.int32)
                hist += tl.histogram(digit, 256, mask=match)
            # Largest bin b with (count of matches in bins >= b) >= r.
            total = tl.sum(hist, axis=0)
            ge = total - tl.cumsum(hist, 0) + hist
            b = tl.max(tl.where(ge >= r, bins, -1), axis=0)
            cnt = tl.sum(tl.where(bins == b, hist, 0), axis=0)
            above = tl.sum(tl.where(bins == b, ge, 0), axis=0) - cnt
            r = r - above
            prefix = prefix | (b.to(tl.uint64) << (56 - 8 * d))
            pmask = pmask | (tl.full([], 255, tl.uint64) << (56 - 8 * d))
            active = r != cnt
    thr = tl.where(cap > 0, prefix, tl.full([], 0xFFFFFFFFFFFFFFFF, tl.uint64))
    tl.store(thr_ptr + e, thr.to(tl.int64, bitcast=True))


@triton.jit
def _ec_route_kernel(
    logits, stride_t, stride_e, T, E, bias_ptr, ntnp_ptr, ntnp_host, thr_ptr,
    out_w, out_ids, GS, NG, TG, K, scale,
    WS: tl.constexpr, ITER: tl.constexpr, BLOCK_T: tl.constexpr,
    SCORING: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GROUPS: tl.constexpr, NGP: tl.constexpr,
    HAS_NTNP: tl.constexpr, LOG_WS: tl.constexpr, GS_GE2: tl.constexpr, KP: tl.constexpr,
    RENORM: tl.constexpr, APPLY_SCALE: tl.constexpr, TOKEN_CHOICE: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    tv = _num_valid(T, ntnp_ptr, ntnp_host, HAS_NTNP)
    s, rkey, pkey = _row_scores(
        logits, stride_t, stride_e, rows, T, E, tv, bias_ptr, GS, NG, TG,
        WS, ITER, BLOCK_T, SCORING, HAS_BIAS, HAS_GROUPS, NGP, LOG_WS, GS_GE2,
    )
    P: tl.constexpr = WS * ITER
    cols = tl.arange(0, P)
    cmask = cols < E
    if TOKEN_CHOICE:
        picked = tl.zeros([BLOCK_T, P], tl.int64)
    else:
        thr = tl.load(thr_ptr + cols, mask=cmask, other=-1).to(tl.uint64, bitcast=True)
        comp = (pkey.to(tl.uint64) << 32) | (4294967295 - rows.to(tl.uint32)).to(tl.uint64)[:, None]
        picked = ((pkey != 0) & (comp >= thr[None, :])).to(tl.int64)
    # Row order: picked first, then score key, then lower expert id. All distinct.
    rc = (picked << 41) | (rkey.to(tl.int64) << 9) | (511 - cols).to(tl.int64)[None, :]
    rc = tl.where(cmask[None, :], rc, -1)
    kcols = tl.arange(0, KP)
    wts = tl.zeros([BLOCK_T, KP], tl.float32)
    ids = tl.zeros([BLOCK_T, KP], tl.int32)
    wsum = tl.zeros([BLOCK_T], tl.float32)
    for j in range(K):
        best = tl.max(rc, axis=1)
        hit = rc == best[:, None]
        w = tl.sum(tl.where(hit, s, 0.0), axis=1)
        eid = (511 - (best & 511)).to(tl.int32)
        rc = tl.where(hit, -1, rc)
        wts = tl.where(kcols[None, :] == j, w[:, None], wts)
        ids = tl.where(kcols[None, :] == j, eid[:, None], ids)
        wsum = wsum + w
    if RENORM:
        wts = tl.math.div_rn(wts, wsum[:, None])
    if APPLY_SCALE:
        wts = wts * scale
    omask = (rows < T)[:, None] & (kcols < K)[None, :]
    offs = rows.to(tl.int64)[:, None] * K + kcols[None, :]
    tl.store(out_w + offs, wts, mask=omask)
    tl.store(out_ids + offs, ids, mask=omask)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _layout(num_experts: int):
    p = _next_pow2(num_experts)
    ws = min(p, 32)
    return ws, p // ws, p


def _block_rows(p: int, num_tokens: int) -> int:
    bt = max(1, min(64, 2048 // p))
    return max(1, min(bt, _next_pow2(max(num_tokens, 1))))


def _group_size(num_experts: int, num_groups: int) -> int:
    """Experts per group; 1 without grouped top-k (``num_groups == 0``)."""
    return num_experts // num_groups if num_groups > 0 else 1


def expert_choice_topk_triton(
    router_logits: torch.Tensor,
    spec: RoutingSpec,
    num_token_non_padded: Optional[Union[torch.Tensor, int]] = None,
    *,
    return_intermediates: bool = False,
):
    """Expert-choice top-k with the Triton kernels; same arguments/output as the reference.

    ``return_intermediates=True`` also returns ``keysT [E, T]`` (int32 holding uint32 keys)
    and ``thr [E]`` (int64 holding uint64 thresholds).
    """
    check_kernel_args(router_logits, spec)
    ki = kernel_inputs(router_logits, spec)
    logits, bias, top_k = ki.logits, ki.bias, spec.top_k
    ng, tg = ki.num_groups, ki.topk_group
    num_tokens, num_experts = logits.shape
    gs = _group_size(num_experts, ng)
    device = logits.device
    out_w = torch.empty(num_tokens, top_k, dtype=torch.float32, device=device)
    out_ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=device)
    keys = torch.empty(num_experts, num_tokens, dtype=torch.int32, device=device)
    thr = torch.empty(num_experts, dtype=torch.int64, device=device)
    if num_tokens == 0:
        return (out_w, out_ids, keys, thr) if return_intermediates else (out_w, out_ids)
    n_dev, n_host = prepare_num_valid(num_token_non_padded, num_tokens, device)
    has_ntnp = n_dev is not None
    ntnp_arg = n_dev if has_ntnp else out_ids  # dummy pointer, never read
    ws, it, p = _layout(num_experts)
    bt = _block_rows(p, num_tokens)
    ngp = _next_pow2(max(ng, 1))
    bias_arg = bias if bias is not None else out_w  # dummy pointer, never read
    opts = _launch_options()
    scoring = ki.scoring
    grid_rows = (triton.cdiv(num_tokens, bt),)
    st, se = logits.stride()
    _ec_score_kernel[grid_rows](
        logits, st, se, num_tokens, num_experts, bias_arg, ntnp_arg, n_host, keys, gs, ng, tg,
        WS=ws, ITER=it, BLOCK_T=bt, SCORING=scoring, HAS_BIAS=bias is not None,
        HAS_GROUPS=ng > 0, NGP=ngp, HAS_NTNP=has_ntnp, LOG_WS=ws.bit_length() - 1, GS_GE2=gs >= 2, num_warps=4, **opts,
    )
    factor = spec.capacity_ratio(num_experts)  # same double arithmetic as the reference
    factor_bits = struct.unpack("<q", struct.pack("<d", float(factor)))[0]
    _ec_select_kernel[(num_experts,)](
        keys, thr, num_tokens, ntnp_arg, n_host, factor_bits, int(spec.min_tokens),
        HAS_NTNP=has_ntnp, BLOCK=4096 if num_tokens > 8192 else (1024 if num_tokens > 256 else 256),
        num_warps=8 if num_tokens > 8192 else 4, **opts,
    )
    _ec_route_kernel[grid_rows](
        logits, st, se, num_tokens, num_experts, bias_arg, ntnp_arg, n_host, thr,
        out_w, out_ids, gs, ng, tg, top_k, ki.scale,
        WS=ws, ITER=it, BLOCK_T=bt, SCORING=scoring, HAS_BIAS=bias is not None,
        HAS_GROUPS=ng > 0, NGP=ngp, HAS_NTNP=has_ntnp, LOG_WS=ws.bit_length() - 1, GS_GE2=gs >= 2,
        KP=_next_pow2(top_k),
        RENORM=bool(spec.renormalize),
        APPLY_SCALE=ki.apply_scale,
        TOKEN_CHOICE=False, num_warps=4, **opts,
    )
    if return_intermediates:
        return out_w, out_ids, keys, thr
    return out_w, out_ids


def token_choice_topk_triton(router_logits: torch.Tensor, spec: RoutingSpec):
    """Fused token-choice top-k (one launch, same scoring code as the EC kernels);
    ``spec.capacity_factor`` and ``spec.min_tokens`` are not used."""
    check_kernel_args(router_logits, spec, token_choice=True)
    ki = kernel_inputs(router_logits, spec)
    logits, bias, top_k = ki.logits, ki.bias, spec.top_k
    ng, tg = ki.num_groups, ki.topk_group
    num_tokens, num_experts = logits.shape
    gs = _group_size(num_experts, ng)
    device = logits.device
    out_w = torch.empty(num_tokens, top_k, dtype=torch.float32, device=device)
    out_ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=device)
    if num_tokens == 0:
        return out_w, out_ids
    ws, it, p = _layout(num_experts)
    bt = _block_rows(p, num_tokens)
    bias_arg = bias if bias is not None else out_w
    st, se = logits.stride()
    _ec_route_kernel[(triton.cdiv(num_tokens, bt),)](
        logits, st, se, num_tokens, num_experts, bias_arg, out_ids, num_tokens, out_ids,
        out_w, out_ids, gs, ng, tg, top_k, ki.scale,
        WS=ws, ITER=it, BLOCK_T=bt, SCORING=ki.scoring,
        HAS_BIAS=bias is not None, HAS_GROUPS=ng > 0, NGP=_next_pow2(max(ng, 1)), HAS_NTNP=False,
        LOG_WS=ws.bit_length() - 1, GS_GE2=gs >= 2, KP=_next_pow2(top_k), RENORM=bool(spec.renormalize),
        APPLY_SCALE=ki.apply_scale,
        TOKEN_CHOICE=True, num_warps=4, **_launch_options(),
    )
    return out_w, out_ids
