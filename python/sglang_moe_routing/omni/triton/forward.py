"""Triton kernels of the Omni (Cartesian-product) router.

Forward, per token (one program handles ``BLOCK_T`` tokens):

1. **Per-axis top-k** of ``x`` and of ``y`` on packed integer keys. A key holds the
   logit's bits made order-preserving as a signed integer (high part) and
   ``MAXCOL - column`` (low part), so one integer ``max`` compares by value and breaks
   ties towards the lower column, and decoding a key gives back the exact value and its
   column. NaN is mapped to the largest key (``torch.topk`` ranks NaN first too).
   16-bit logits use int32 keys, fp32 logits int64 keys.

   * ``SPLIT=False`` (small ``n``, < 128): the whole row is one register tile; a bitonic
     top-k (``tl.topk``) selects ``K`` keys.
   * ``SPLIT=True`` (large ``n``, >= 128): the row is split into ``C = NP / S`` chunks
     of ``S`` columns; only the chunk maxima enter a bitonic top-k of ``C`` keys. The
     top-k elements of the row lie in the ``K`` chunks with the largest maxima (an
     element of any other chunk is beaten by ``K`` chunk maxima), so those ``K * S``
     elements are reloaded (L1/L2 hits) and a second top-k of ``K * S`` keys gives the
     answer. Work per token ~ ``n + K log^2 K`` instead of ``n log^2 K``.
   * MODE_LANE (``32 <= n <= 1024``, ``k <= 8``; an autotune candidate, not the default): 16
     lanes (threads) per row, each loading its 16-byte vectors up front and keeping its 4
     largest keys sorted in registers (an in-thread merge network); ``k`` pops over the
     lane heads (4-level shuffle max, no memory round trip). A row where one lane holds 4
     of its top k redoes the selection exactly (rare on random data).

2. **Candidate grid.** If ``(i, j)`` is in the top-k of ``x_i + y_j``, ``i`` is in the
   top-k of ``x`` and ``j`` in the top-k of ``y``. The ``K x K`` grid of fp32 sums of the
   two lists (int64 keys: score bits, then ``MAXID - id``) goes through one more bitonic
   top-k; the result is sorted by descending score.

3. softmax in fp32 over the ``k`` selected scores (optionally renormalised), stored in
   ``x.dtype``; ids ``i * n + j`` stored as int64 (or int32).

Backward (deterministic, no atomics): per token, recompute the selected scores from
``x``, ``y`` and the ids, ``ds = softmax backward``, sum ``ds`` over slots that share a
row index ``i`` (resp. column ``j``) in registers, write zeros to the token's ``dx``/``dy``
rows, a CTA barrier, then store each distinct index once.

``K`` is ``top_k`` rounded up to a power of two; entries past ``top_k`` are masked.
Limits of this backend: fp16/bf16/fp32, ``n <= 32768``, ``top_k <= 64``
(``omni_router(backend="auto")`` falls back to the torch path outside them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

try:  # triton is optional for the package; the torch paths work without it
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "MAX_N",
    "MAX_TOP_K",
    "FwdConfig",
    "BwdConfig",
    "triton_supported",
    "fwd_config",
    "fwd_config_lane",
    "MODE_LANE",
    "bwd_config",
    "fwd_config_candidates",
    "bwd_config_candidates",
    "omni_router_fwd_triton",
    "omni_router_bwd_triton",
]

MAX_N = 32768  # column index must fit 16 bits in the packed 16-bit keys
MAX_TOP_K = 64  # the K x K candidate grid lives in registers
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _next_pow2(v: int) -> int:
    return 1 if v <= 1 else 1 << (int(v) - 1).bit_length()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_supported(x: torch.Tensor, top_k: int) -> Optional[str]:
    """``None`` if the Triton backend can run on ``x``; else the reason it cannot."""
    if not HAS_TRITON:
        return "triton is not installed"
    if x.dtype not in _TRITON_DTYPES:
        return f"dtype {x.dtype} (the triton backend takes fp16, bf16 or fp32)"
    if x.shape[1] > MAX_N:
        return f"n={x.shape[1]} > {MAX_N}"
    if top_k > MAX_TOP_K:
        return f"top_k={top_k} > {MAX_TOP_K}"
    if not (x.is_cuda or _interpreting()):
        return f"device {x.device} (the triton backend needs CUDA tensors or TRITON_INTERPRET=1)"
    return None


# ----------------------------------------------------------------------------- configs

MODE_DENSE, MODE_CHUNK, MODE_ITER, MODE_LANE = 0, 1, 2, 3


@dataclass(frozen=True)
class FwdConfig:
    """Launch configuration of the forward kernel.

    ``mode``: per-axis top-k variant: 0 dense bitonic (small n); the split variants for
    large n, 1 chunk (bitonic over chunk maxima, then over the best chunks) and 2 iter
    (k pops from the chunk maxima with chunk reloads); ``chunk``: S, columns per chunk
    (modes 1, 2); ``pruned``: top-k over only the ``(a+1)(b+1) <= k`` grid cells (else
    all ``K x K``). Mode 3 (``MODE_LANE``, :func:`fwd_config_lane`): ``lanes`` threads
    per logit row, each keeping a sorted list of its ``lists`` largest keys in registers;
    pops over the lane heads (no memory round trip); x and y rows of ``block_t`` tokens
    per program (``num_warps = 2 * block_t * lanes / 32``).
    """

    block_t: int  # tokens per program
    num_warps: int
    mode: int = MODE_DENSE
    chunk: int = 2
    pruned: bool = True
    lanes: int = 16  # MODE_LANE: threads per logit row
    lists: int = 4  # MODE_LANE: sorted keys kept per lane (1..4)


@dataclass(frozen=True)
class BwdConfig:
    """Launch configuration of the backward kernel."""

    block_t: int
    num_warps: int
    block_n: int  # columns per zero-fill step


_NUM_SMS: Dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _NUM_SMS[idx]


def _dims(n: int, top_k: int) -> Tuple[int, int]:
    """``(NP, K)``: padded row width (power of two, >= K) and padded k."""
    K = _next_pow2(top_k)
    return max(_next_pow2(n), K), K


def grid_pairs(top_k: int) -> List[Tuple[int, int]]:
    """Grid cells ``(a, b)`` (ranks in the two per-axis lists) that can hold a top-k
    expert: ``(a + 1) * (b + 1) <= top_k`` (``a`` larger x's and ``b`` larger y's, plus
    the cell itself, would otherwise beat it ``>= top_k`` times)."""
    return [(a, b) for a in range(top_k) for b in range(top_k) if (a + 1) * (b + 1) <= top_k]


_PAIR_TABLES: Dict[tuple, torch.Tensor] = {}


def _pair_table(top_k: int, device: torch.device) -> Tuple[torch.Tensor, int]:
    """int32 table of ``a * K + b`` for the grid cells, padded with -1 to a power of two.
    Cached per device (created on the first call, i.e. before any graph capture)."""
    K = _next_pow2(top_k)
    pairs = grid_pairs(top_k)
    P = _next_pow2(len(pairs))
    key = (top_k, str(device))
    tab = _PAIR_TABLES.get(key)
    if tab is None:
        vals = [a * K + b for a, b in pairs] + [-1] * (P - len(pairs))
        tab = torch.tensor(vals, dtype=torch.int32, device=device)
        _PAIR_TABLES[key] = tab
    return tab, P


def _default_chunk(n: int, top_k: int, mode: int) -> int:
    """Chunk size S of the split variants.

    MODE_CHUNK: ``K * S`` candidates from the K best chunks should be at most ``NP / 2``.
    MODE_ITER: each pop costs ``C + S`` (max over chunk maxima, reload of one chunk),
    so ``S ~ sqrt(NP)``.
    """
    NP, K = _dims(n, top_k)
    if mode == MODE_ITER:
        return min(NP, max(2, 1 << ((NP.bit_length() - 1) // 2)))
    s = max(2, min(8, NP // (2 * K)))
    while s > 2 and NP // s < K:
        s //= 2
    return s


def _shrink_for_occupancy(block_t: int, T: int, sms: int) -> int:
    while block_t > 1 and triton.cdiv(max(T, 1), block_t) < 2 * sms:
        block_t //= 2
    return block_t


def _lane_fits(n: int, top_k: int, lanes: int = 16) -> bool:
    """Shapes MODE_LANE serves: rows of 2 to 64 elements per lane (unrolled in registers)
    and a ``k`` that ``L <= 4`` lists per lane cover without frequent fallbacks (K <= 8)."""
    NP, K = _dims(n, top_k)
    return K <= 8 and 2 * lanes <= NP <= 64 * lanes


def fwd_config_lane(
    n: int,
    top_k: int,
    T: int,
    device: torch.device,
    block_t: int = 1,
    lanes: int = 16,
    lists: int = 4,
) -> FwdConfig:
    """MODE_LANE configuration: ``block_t`` tokens per program, ``lanes`` threads per
    row (``2 * block_t * lanes / 32`` warps), ``lists`` sorted keys per lane.

    One token per one-warp program (``lanes=16``) keeps ~32 warps resident per SM at
    <= 64 registers; ``lists=4``: a row's pops fall back to the exact path only when one
    lane (16 of the row's columns) holds 4 of its top k."""
    NP, K = _dims(n, top_k)
    lanes = max(1, min(lanes, NP))
    if _interpreting():
        block_t = min(4, _next_pow2(max(T, 1)))
    num_warps = max(1, 2 * block_t * lanes // 32)
    return FwdConfig(block_t, num_warps, MODE_LANE, 2, True, lanes=lanes, lists=lists)


def fwd_config(n: int, top_k: int, T: int, device: torch.device) -> FwdConfig:
    """Heuristic forward configuration (used when autotuning is off).

    ``n < 128``: dense variant; ``n >= 128``: the split variant MODE_ITER (MODE_LANE, an
    autotune candidate for ``k <= 8``, measured within +-5 % of it in steady state at
    n=512, k=8; slower at n=128 and n=1024). Block sizes come from static SASS counts and
    steady-state device timings (``benchmark/NOTES_omni.md``): 2 tokens per one-warp
    program from n=512 up (more resident warps: 64 registers, 2048 programs at T=4096).
    """
    NP, K = _dims(n, top_k)
    mode = MODE_DENSE if n < 128 else MODE_ITER
    chunk = _default_chunk(n, top_k, mode)
    pruned = K >= 4
    P = _next_pow2(len(grid_pairs(top_k))) if pruned else K * K
    if _interpreting():
        return FwdConfig(min(16, _next_pow2(max(T, 1))), 4, mode, chunk, pruned)
    if mode == MODE_DENSE:
        block_t = max(1, min(16, 1024 // max(NP, P)))
        num_warps = max(1, min(4, block_t * max(NP, P) // 256))
    else:
        block_t = 4 if NP < 512 else 2
        num_warps = 1 if P <= 32 else (2 if P <= 128 else 4)
    block_t = _shrink_for_occupancy(block_t, T, _num_sms(device))
    return FwdConfig(block_t, num_warps, mode, chunk, pruned)


def fwd_config_candidates(n: int, top_k: int, T: int, device: torch.device) -> List[FwdConfig]:
    """Configurations the autotuner times: the heuristic one first, then a grid over
    tokens per program, warps and the per-axis variant (independent of T, so one set
    of compiled kernels serves every batch size)."""
    base = fwd_config(n, top_k, T, device)
    NP, K = _dims(n, top_k)
    pruned = base.pruned
    P = _next_pow2(len(grid_pairs(top_k))) if pruned else K * K
    nws = (1, 2) if P <= 32 else (1, 2, 4)
    out = [base]
    if n >= 128:
        s_it = _default_chunk(n, top_k, MODE_ITER)
        s_ch = _default_chunk(n, top_k, MODE_CHUNK)
        out += [FwdConfig(bt, nw, MODE_ITER, s_it, pruned) for bt in (1, 2, 4) for nw in nws]
        out += [FwdConfig(bt, 1, MODE_CHUNK, s_ch, pruned) for bt in (1, 2)]
        out += [FwdConfig(2, 1, MODE_ITER, s, pruned) for s in (s_it // 2, s_it * 2) if 2 <= s <= NP]
        if _lane_fits(n, top_k):
            out += [fwd_config_lane(n, top_k, T, device)]
    else:
        out += [FwdConfig(bt, nw, MODE_DENSE, 2, pruned) for bt in (4, 8, 16) for nw in (1, 2, 4)]
        s_it = _default_chunk(n, top_k, MODE_ITER)
        out += [FwdConfig(bt, 1, MODE_ITER, s_it, pruned) for bt in (4, 8)]
    seen, uniq = set(), []
    for c in out:
        if c not in seen and (c is base or _fits_registers(c, NP, P)):
            seen.add(c)
            uniq.append(c)
    return uniq


def _fits_registers(cfg: FwdConfig, NP: int, P: int) -> bool:
    """Keep candidates whose largest per-program tile stays within ~64 32-bit registers
    per thread (the int64 grid keys count twice): bigger ones spill and can take ptxas
    minutes to compile."""
    if cfg.mode == MODE_LANE:
        return True
    row = NP if cfg.mode == MODE_DENSE else NP // 2
    return cfg.block_t * max(row, 2 * P) <= 64 * 32 * cfg.num_warps


def bwd_config(n: int, top_k: int, T: int, device: torch.device) -> BwdConfig:
    """Heuristic backward configuration."""
    NP, K = _dims(n, top_k)
    block_n = min(NP, 1024)
    if _interpreting():
        return BwdConfig(block_t=min(16, _next_pow2(max(T, 1))), num_warps=4, block_n=block_n)
    block_t = max(1, min(16, 2048 // max(block_n, K * K)))
    num_warps = 2 if block_t * max(block_n, K * K) <= 2048 else 4
    block_t = _shrink_for_occupancy(block_t, T, _num_sms(device))
    return BwdConfig(block_t=block_t, num_warps=num_warps, block_n=block_n)


def bwd_config_candidates(n: int, top_k: int, T: int, device: torch.device) -> List[BwdConfig]:
    """Backward configurations the autotuner times (heuristic first; T-independent)."""
    base = bwd_config(n, top_k, T, device)
    out = [base] + [BwdConfig(bt, nw, base.block_n) for bt in (1, 2, 4, 8) for nw in (1, 2)]
    seen, uniq = set(), []
    for c in out:
        if c not in seen:
            seen.add(c)
            uniq.append(c)
    return uniq


# ----------------------------------------------------------------------------- kernels

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
        chunk = _decode_col(best, IS16) // S
        col = chunk[:, None] * S + tl.arange(0, S)[None, :]  # [BLOCK_T, S]
        m = (rmask & (best > MINK))[:, None] & (col < n)
        v = tl.load(ptr + rows[:, None] * stride + col, mask=m, other=0.0)
        key, _mag = _keys_of(v, _col_lo(col, IS16), IS16)
        key = tl.where(m & (key < best[:, None]), key, MINK)
        cmax = tl.where(tl.arange(0, C)[None, :] == chunk[:, None], tl.max(key, axis=1)[:, None], cmax)
        return best, cmax

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

    # T and k vary per call: no value specialisation (one compiled kernel per config)
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
            kk = tl.arange(0, K)[None, :]
            sel = scr
            tl.store(sel + kk, xk, mask=rmask[:, None])
            tl.store(sel + K + kk, yk, mask=rmask[:, None])
            tl.debug_barrier()
            ab = tl.load(pair_ptr + tl.arange(0, P))
            pm = (ab >= 0)[None, :] & rmask[:, None]
            a = tl.where(ab >= 0, ab // K, 0)[None, :]
            b = tl.where(ab >= 0, ab % K, 0)[None, :]
            xa = tl.load(sel + a, mask=pm, other=MINK)
            yb = tl.load(sel + K + b, mask=pm, other=MINK)
            top = _topk_desc(_grid_keys(xa, yb, n, IS16, IS_BF16, MINK), K)
        else:
            g = _grid_keys(xk[:, :, None], yk[:, None, :], n, IS16, IS_BF16, MINK)
            top = _topk_desc(tl.reshape(g, [BLOCK_T, K * K]), K)  # [BLOCK_T, K] desc

        _store_topk(top, k, K, xnan | ynan, rows, rmask, w_ptr, stride_w, ids_ptr, stride_ids, RENORM)

    # ------------------------------------------------------------------ MODE_LANE (3)
    # Sentinels of the lane variant: the type minimum (max/min with an unused list entry
    # folds away) and "this lane's list ran dry, the lane may hold more keys".
    _LMIN32 = tl.constexpr(-2147483648)
    _LEXH32 = tl.constexpr(-2147483647)
    _LMIN64 = tl.constexpr(-9223372036854775808)
    _LEXH64 = tl.constexpr(-9223372036854775807)

    @triton.jit
    def _lmerge2(a1, a2, am, b1, b2, bm):
        """Top 2 (sorted) of two sorted 2-lists, and the min channel: the r-th largest of
        the union is ``max over i + j = r of min(a_i, b_j)``."""
        return tl.maximum(a1, b1), tl.maximum(tl.minimum(a1, b1), tl.maximum(a2, b2)), tl.minimum(am, bm)

    @triton.jit
    def _lmerge3(a1, a2, a3, am, b1, b2, b3, bm):
        """Top 3 (sorted) of two sorted 3-lists (same rule), and the min channel."""
        c1 = tl.maximum(a1, b1)
        c2 = tl.maximum(tl.minimum(a1, b1), tl.maximum(a2, b2))
        c3 = tl.maximum(tl.maximum(a3, b3), tl.maximum(tl.minimum(a1, b2), tl.minimum(a2, b1)))
        return c1, c2, c3, tl.minimum(am, bm)

    @triton.jit
    def _lmerge4(a1, a2, a3, a4, am, b1, b2, b3, b4, bm):
        """Top 4 (sorted) of two sorted 4-lists (same rule), and the min channel."""
        c1 = tl.maximum(a1, b1)
        c2 = tl.maximum(tl.minimum(a1, b1), tl.maximum(a2, b2))
        c3 = tl.maximum(tl.maximum(a3, b3), tl.maximum(tl.minimum(a1, b2), tl.minimum(a2, b1)))
        c4 = tl.maximum(
            tl.maximum(a4, b4),
            tl.maximum(tl.minimum(a1, b3), tl.maximum(tl.minimum(a2, b2), tl.minimum(a3, b1))),
        )
        return c1, c2, c3, c4, tl.minimum(am, bm)

    @triton.jit
    def _lane_reduce(h1, h2, h3, h4, hm, axis: tl.constexpr, L: tl.constexpr):
        """Merge sorted ``L``-lists ``(h1 >= h2 >= ...)`` along ``axis`` (in-thread) into
        the sorted top ``L``; ``hm``: minimum channel. Entries past ``L`` pass through."""
        if L == 1:
            o1 = tl.max(h1, axis=axis)
            om = tl.min(hm, axis=axis)
            o2 = tl.max(h2, axis=axis)
            o3 = o2
            o4 = o2
        elif L == 2:
            o1, o2, om = tl.reduce((h1, h2, hm), axis, _lmerge2)
            o3 = tl.max(h3, axis=axis)
            o4 = o3
        elif L == 3:
            o1, o2, o3, om = tl.reduce((h1, h2, h3, hm), axis, _lmerge3)
            o4 = tl.max(h4, axis=axis)
        else:
            o1, o2, o3, o4, om = tl.reduce((h1, h2, h3, h4, hm), axis, _lmerge4)
        return o1, o2, o3, o4, om

    @triton.jit
    def _lane_load(x_ptr, v: tl.constexpr, pid, T, n, sx, sy, dxy, PACKED: tl.constexpr,
                   EVEN_N: tl.constexpr, BLOCK_T: tl.constexpr, R: tl.constexpr,
                   E: tl.constexpr):
        """Vector ``v`` of every lane: a ``[Q, R, E]`` tile of logits (``[Q, R, E/2]`` int32
        pairs if ``PACKED``) of the program's ``Q = 2 * BLOCK_T`` rows (x and y of each
        token interleaved; y is addressed as ``x_ptr + dxy``: a select of two pointers
        would lose the 16-byte vectors). Lane ``r`` of a row owns columns
        ``v * R * E + r * E + e``. 3-D tiles, so that the compiler puts the rows' lanes on
        the warp's threads and ``e`` in registers (a 4-D ``[V, Q, R, E]`` tile got ``V``
        across threads on triton 3.6)."""
        Q: tl.constexpr = 2 * BLOCK_T
        qq = tl.arange(0, Q)[:, None, None]
        rr = tl.arange(0, R)[None, :, None]
        tok = pid * BLOCK_T + qq // 2
        t64 = tok.to(tl.int64)
        roff = t64 * sx + (qq % 2).to(tl.int64) * (dxy + t64 * (sy - sx))
        tmask = tok < T
        if PACKED:
            E2: tl.constexpr = E // 2
            cp = v * (R * E2) + rr * E2 + tl.arange(0, E2)[None, None, :]  # int32 word index
            if EVEN_N:
                m = tmask
            else:
                m = tmask & (cp < n // 2)
            w = tl.load(x_ptr.to(tl.pointer_type(tl.int32)) + (roff + cp), mask=m, other=0)
        else:
            col = v * (R * E) + rr * E + tl.arange(0, E)[None, None, :]
            if EVEN_N:
                m = tmask
            else:
                m = tmask & (col < n)
            w = tl.load(x_ptr + (roff + col), mask=m, other=0.0)
        return w, m

    @triton.jit
    def _lane_keys(w, m, v: tl.constexpr, IS16: tl.constexpr, PACKED: tl.constexpr,
                   EVEN_N: tl.constexpr, R: tl.constexpr, G: tl.constexpr, E: tl.constexpr,
                   MINK: tl.constexpr, MAXK: tl.constexpr):
        """Keys ``[Q, R, E]`` of a tile from :func:`_lane_load`, and the same keys with masked
        elements at ``MAXK`` (for the NaN test by minimum).

        Key = order-preserving logit bits (high part) | ``HB | (G - 1 - j)`` (low part, ``j``
        = the element's index within its lane, ``HB`` a high bit that keeps every real key
        above the sentinels); the lane's bits are added to the few list entries later.
        ``PACKED``: both halves of an int32 pair flipped at once."""
        Q: tl.constexpr = w.shape[0]
        if PACKED:
            E2: tl.constexpr = E // 2
            w = w ^ (((w >> 15) & 0x10001) * 0x7FFF)  # flip both halves' magnitude if negative
            j = v * E + 2 * tl.arange(0, E2)[None, None, :]
            klo = (w << 16) | (0x8000 | (G - 1 - j))
            khi = (w & -65536) | (0x8000 | (G - 2 - j))
            key = tl.reshape(tl.join(klo, khi), [Q, R, E])
            if EVEN_N:
                kmin = key
            else:
                mm = tl.reshape(tl.join(m, m), [Q, R, E])
                key = tl.where(mm, key, MINK)
                kmin = tl.where(mm, key, MAXK)
        else:
            j = v * E + tl.arange(0, E)[None, None, :]
            if IS16:
                b = w.to(tl.int16, bitcast=True).to(tl.int32)
                key = ((b ^ ((b >> 15) & 0x7FFF)) << 16) | (0x8000 | (G - 1 - j))
            else:
                b = w.to(tl.int32, bitcast=True)
                o = b ^ ((b >> 31) & 0x7FFFFFFF)
                key = (o.to(tl.int64) << 32) | ((G - 1 - j).to(tl.int64) + 2147483648)
            if EVEN_N:
                kmin = key
            else:
                key = tl.where(m, key, MINK)
                kmin = tl.where(m, key, MAXK)
        return key, kmin

    @triton.jit
    def _lane_vec_lists(x_ptr, v: tl.constexpr, pid, T, n, sx, sy, dxy, IS16: tl.constexpr,
                        PACKED: tl.constexpr, EVEN_N: tl.constexpr, BLOCK_T: tl.constexpr,
                        R: tl.constexpr, G: tl.constexpr, E: tl.constexpr, L: tl.constexpr,
                        MINK: tl.constexpr, MAXK: tl.constexpr):
        """Sorted top-``L`` keys ``[Q, R]`` (and minimum) of each lane's vector ``v``."""
        w, m = _lane_load(x_ptr, v, pid, T, n, sx, sy, dxy, PACKED, EVEN_N, BLOCK_T, R, E)
        key, kmin = _lane_keys(w, m, v, IS16, PACKED, EVEN_N, R, G, E, MINK, MAXK)
        lo = tl.full(key.shape, MINK, key.dtype)
        return _lane_reduce(key, lo, lo, lo, kmin, 2, L)

    @triton.jit
    def _lane_merge(a1, a2, a3, a4, am, b1, b2, b3, b4, bm, L: tl.constexpr):
        """Elementwise merge of two sets of sorted ``L``-lists (see :func:`_lane_reduce`)."""
        if L == 1:
            return tl.maximum(a1, b1), a2, a3, a4, tl.minimum(am, bm)
        elif L == 2:
            c1, c2, cm = _lmerge2(a1, a2, am, b1, b2, bm)
            return c1, c2, a3, a4, cm
        elif L == 3:
            c1, c2, c3, cm = _lmerge3(a1, a2, a3, am, b1, b2, b3, bm)
            return c1, c2, c3, a4, cm
        else:
            return _lmerge4(a1, a2, a3, a4, am, b1, b2, b3, b4, bm)

    @triton.jit(do_not_specialize=["T", "k"])
    def _omni_fwd_lane_kernel(
        x_ptr,
        w_ptr,
        ids_ptr,
        scr_ptr,
        pair_ptr,
        T,
        n,
        k,
        stride_x,
        stride_y,
        dxy,
        stride_w,
        stride_ids,
        IS16: tl.constexpr,
        IS_BF16: tl.constexpr,
        RENORM: tl.constexpr,
        BLOCK_T: tl.constexpr,
        NP: tl.constexpr,
        K: tl.constexpr,
        R: tl.constexpr,
        E: tl.constexpr,
        L: tl.constexpr,
        P: tl.constexpr,
        PACKED: tl.constexpr,
        EVEN_N: tl.constexpr,
        LOGG: tl.constexpr,
        STAGE: tl.constexpr,
    ):
        """MODE_LANE forward: ``R`` lanes per logit row, all keys in registers.

        Rows: ``Q = 2 * BLOCK_T`` (x and y of each token); each lane owns ``G = NP / R``
        elements (16-byte vectors), all loaded up front. Per lane, an in-thread sorting
        network keeps its ``L`` largest keys (sorted) and the minimum key (NaN test). Then
        ``min(k, n)`` pops per row: the best lane head (a ``log2 R``-level shuffle max),
        that lane's list shifts up. A lane whose list runs dry while it may hold more keys
        (``EXH``) makes the row's pops unreliable if any later pop happened: such
        programs (rare for ``L=4``, ``R=16``, ``k<=8``: a lane must hold 4 of a row's top
        k) redo the per-axis top-k by exact pops over a reloaded tile. Finally the pruned
        grid of the two sorted lists, softmax and stores, as in the other modes.
        ``STAGE < 2``: timing-only ablations for ``bench_omni.py`` (0: stop after the lane
        lists, 1: before the grid); their outputs are not a routing.
        """
        pid = tl.program_id(0)
        Q: tl.constexpr = 2 * BLOCK_T
        G: tl.constexpr = NP // R
        if IS16:
            MINK: tl.constexpr = _LMIN32
            EXH: tl.constexpr = _LEXH32
            MAXK: tl.constexpr = 2147483647
            if IS_BF16:
                INF: tl.constexpr = 0x7F80
            else:
                INF: tl.constexpr = 0x7C00
            SH: tl.constexpr = 16
        else:
            MINK: tl.constexpr = _LMIN64
            EXH: tl.constexpr = _LEXH64
            MAXK: tl.constexpr = 9223372036854775807
            INF: tl.constexpr = 0x7F800000
            SH: tl.constexpr = 32
        V: tl.constexpr = G // E
        h1, h2, h3, h4, hm = _lane_vec_lists(x_ptr, 0, pid, T, n, stride_x, stride_y, dxy, IS16,
                                             PACKED, EVEN_N, BLOCK_T, R, G, E, L, MINK, MAXK)
        for v in tl.static_range(1, V):
            b1, b2, b3, b4, bm = _lane_vec_lists(x_ptr, v, pid, T, n, stride_x, stride_y, dxy, IS16,
                                                 PACKED, EVEN_N, BLOCK_T, R, G, E, L, MINK, MAXK)
            h1, h2, h3, h4, hm = _lane_merge(h1, h2, h3, h4, hm, b1, b2, b3, b4, bm, L)
        if STAGE == 0:  # ablation (timing only): lists, no pops / grid
            qs = tl.arange(0, Q)
            tq = pid * BLOCK_T + qs // 2
            tl.store(ids_ptr + tq.to(tl.int64) * stride_ids + (qs % 2),
                     (tl.max(h1, axis=1) + tl.min(hm, axis=1)).to(ids_ptr.dtype.element_ty), mask=tq < T)
            return
        # NaN: a key above +inf's or below -inf's (flipped: -INF - 1)
        nan_l = ((h1 >> SH) > INF) | ((hm >> SH) < -INF - 1)
        row_nan = tl.max(nan_l.to(tl.int32), axis=1)  # [Q]
        # make keys unique across the row's lanes: lane bits above the element bits
        lane = ((R - 1 - tl.arange(0, R)) * G)[None, :].to(h1.dtype)
        h1 = tl.where(h1 > MINK, h1 | lane, h1)
        h2 = tl.where(h2 > MINK, h2 | lane, h2)
        h3 = tl.where(h3 > MINK, h3 | lane, h3)
        h4 = tl.where(h4 > MINK, h4 | lane, h4)
        if L == 1:
            hl = h1
        elif L == 2:
            hl = h2
        elif L == 3:
            hl = h3
        else:
            hl = h4
        if L >= K:
            more = tl.full(h1.shape, MINK, h1.dtype)
        else:
            more = tl.where(hl > MINK, EXH, MINK)

        kk = tl.arange(0, K)[None, :]
        lst = tl.full([Q, K], MINK, h1.dtype)
        last = tl.zeros(h1.shape, tl.int32)
        npop = tl.minimum(k, n)
        for r in range(0, npop):
            best = tl.max(h1, axis=1)
            hit = h1 == best[:, None]  # keys are unique within a row: one lane
            if L == 1:
                h1 = tl.where(hit, more, h1)
            elif L == 2:
                h1 = tl.where(hit, h2, h1)
                h2 = tl.where(hit, more, h2)
            elif L == 3:
                h1 = tl.where(hit, h2, h1)
                h2 = tl.where(hit, h3, h2)
                h3 = tl.where(hit, more, h3)
            else:
                h1 = tl.where(hit, h2, h1)
                h2 = tl.where(hit, h3, h2)
                h3 = tl.where(hit, h4, h3)
                h4 = tl.where(hit, more, h4)
            lst = tl.where(kk == r, best[:, None], lst)
            last = hit.to(tl.int32)
        if L < K:
            # unreliable: a lane ran dry before the last pop (its next key is unknown), or
            # the marker itself was popped
            dry = tl.max(((h1 == EXH) & (last == 0)).to(tl.int32), axis=1)
            dry = dry | tl.max((lst == EXH).to(tl.int32), axis=1)
            if tl.max(dry, axis=0) > 0:  # program-uniform, rare
                # exact pops: the r-th key is the largest below the (r-1)-th (keys are
                # unique); the vectors are reloaded per pop (L1/L2 hits; rare path)
                lane3 = ((R - 1 - tl.arange(0, R)) * G)[None, :, None].to(h1.dtype)
                ex = tl.full([Q, K], MINK, h1.dtype)
                prev = tl.full([Q], MAXK, h1.dtype)
                for r in range(0, npop):
                    cur = tl.full([Q, R], MINK, h1.dtype)
                    for v in tl.static_range(V):
                        w, m = _lane_load(x_ptr, v, pid, T, n, stride_x, stride_y, dxy, PACKED,
                                          EVEN_N, BLOCK_T, R, E)
                        key, kmin = _lane_keys(w, m, v, IS16, PACKED, EVEN_N, R, G, E, MINK, MAXK)
                        key = tl.where(key > MINK, key | lane3, key)
                        key = tl.where((key < prev[:, None, None]) | (r == 0), key, MINK)
                        cur = tl.maximum(cur, tl.max(key, axis=2))
                    prev = tl.max(cur, axis=1)
                    ex = tl.where(kk == r, prev[:, None], ex)
                lst = tl.where(dry[:, None] > 0, ex, lst)

        # back to the standard key layout (value bits | MAXCOL - column) of _grid_keys
        if IS16:
            low = lst & 0xFFFF
        else:
            low = (lst & 0xFFFFFFFF).to(tl.int32)
        jj = (G - 1) - (low & (G - 1))
        rl = (R - 1) - ((low >> LOGG) & (R - 1))
        c = (jj // E) * (R * E) + rl * E + (jj % E)
        if IS16:
            std = (lst & -65536) | (65535 - c)
        else:
            std = (lst & -4294967296) | (2147483647 - c).to(tl.int64)
        if IS16:
            SMIN: tl.constexpr = _MIN32
        else:
            SMIN: tl.constexpr = _MIN64
        std = tl.where(lst > MINK, std, SMIN)

        if STAGE == 1:  # ablation (timing only): per-axis top-k, no grid
            qs = tl.arange(0, Q)[:, None]
            tq = pid * BLOCK_T + qs // 2
            tl.store(ids_ptr + tq.to(tl.int64) * stride_ids + (qs % 2) * (K // 2) + kk // 2,
                     (std + row_nan[:, None]).to(ids_ptr.dtype.element_ty), mask=(tq < T) & (kk < k))
            return
        # grid of the two sorted lists via a per-token scratch row [x list, y list] (a
        # register gather, tl.gather, cost ~300 more instructions per token on triton 3.6)
        qk = tl.arange(0, Q)[:, None]
        tl.store(scr_ptr + (pid * Q + qk).to(tl.int64) * K + kk, std)
        tl.debug_barrier()
        rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        rmask = rows < T
        r64 = rows.to(tl.int64)
        sel = scr_ptr + r64[:, None] * (2 * K)
        ab = tl.load(pair_ptr + tl.arange(0, P))
        pm = (ab >= 0)[None, :] & rmask[:, None]
        a = tl.where(ab >= 0, ab // K, 0)[None, :]
        b = tl.where(ab >= 0, ab % K, 0)[None, :]
        xa = tl.load(sel + a, mask=pm, other=SMIN)
        yb = tl.load(sel + K + b, mask=pm, other=SMIN)
        top = _topk_desc(_grid_keys(xa, yb, n, IS16, IS_BF16, SMIN), K)

        tok_nan = tl.max(tl.reshape(row_nan, [BLOCK_T, 2]), axis=1) > 0
        _store_topk(top, k, K, tok_nan, r64, rmask, w_ptr, stride_w, ids_ptr, stride_ids, RENORM)

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


# ----------------------------------------------------------------------------- tuning

_FWD_TUNED: Dict[tuple, FwdConfig] = {}
_BWD_TUNED: Dict[tuple, BwdConfig] = {}


def autotune_enabled() -> bool:
    """Autotuning is opt-in: ``SGLANG_MOE_OMNI_AUTOTUNE=1`` (never during graph capture)."""
    return os.environ.get("SGLANG_MOE_OMNI_AUTOTUNE", "0") == "1"


def _t_bucket(T: int) -> int:
    """Token-count bucket of the tuning cache: tuning once per bucket, not per T."""
    for b in (64, 512, 4096):
        if T <= b:
            return b
    return 1 << 30


def _can_tune(x: torch.Tensor) -> bool:
    return (
        autotune_enabled()
        and x.is_cuda
        and not _interpreting()
        and not torch.cuda.is_current_stream_capturing()
    )


TUNE_LOG: Dict[tuple, List[Tuple[object, float]]] = {}


def _bench_ms(fn) -> float:
    """Kernel time of ``fn`` from CUDA-graph replays (no Python launch overhead)."""
    from triton.testing import do_bench_cudagraph

    fn()  # compile outside the capture
    return float(do_bench_cudagraph(fn, rep=20, return_mode="median"))


def _pick(key, cands, launch) -> object:
    times = [_bench_ms(lambda c=c: launch(c)) for c in cands]
    TUNE_LOG[key] = list(zip(cands, times))
    return cands[min(range(len(cands)), key=times.__getitem__)]


# ----------------------------------------------------------------------------- launchers


def _launch_fwd_lane(x, y, top_k, renormalize, w, ids, cfg: FwdConfig, stage: int = 2) -> None:
    """MODE_LANE launch. y is addressed from x's pointer (``dxy`` elements away), so that
    one load of 16-byte vectors covers both rows; 16-bit logits go as int32 pairs when
    both tensors allow it (even ``n`` and strides, 4-byte aligned)."""
    T, n = x.shape
    NP, K = _dims(n, top_k)
    esz = x.element_size()
    R = max(1, min(cfg.lanes, NP))
    G = NP // R
    E = max(1, min(16 // esz, G))
    packed = (
        esz == 2 and E >= 2 and n % 2 == 0 and x.stride(0) % 2 == 0 and y.stride(0) % 2 == 0
        and x.data_ptr() % 4 == 0 and y.data_ptr() % 4 == 0
    )
    dxy = (y.data_ptr() - x.data_ptr()) // esz
    sx, sy = x.stride(0), y.stride(0)
    if packed:
        dxy, sx, sy = dxy // 2, sx // 2, sy // 2
    key_dtype = torch.int32 if esz == 2 else torch.int64
    nprog = triton.cdiv(T, cfg.block_t)
    scratch = torch.empty((nprog * cfg.block_t, 2 * K), dtype=key_dtype, device=x.device)
    pairs, P = _pair_table(top_k, x.device)
    _omni_fwd_lane_kernel[(nprog,)](
        x, w, ids, scratch, pairs, T, n, top_k, sx, sy, dxy, w.stride(0), ids.stride(0),
        IS16=esz == 2,
        IS_BF16=x.dtype == torch.bfloat16,
        RENORM=bool(renormalize),
        BLOCK_T=cfg.block_t,
        NP=NP,
        K=K,
        R=R,
        E=E,
        L=max(1, min(4, cfg.lists)),
        P=P,
        PACKED=packed,
        EVEN_N=n == NP,
        LOGG=G.bit_length() - 1,
        STAGE=stage,
        num_warps=cfg.num_warps,
    )


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


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels take a row stride but need unit column stride."""
    return t if t.stride(1) == 1 or t.shape[1] == 1 else t.contiguous()


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
