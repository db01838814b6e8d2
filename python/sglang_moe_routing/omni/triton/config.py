"""Launch configuration of the Omni router's Triton kernels: the backend's limits, the
configurations of the forward and backward kernels (heuristics and the candidates an
autotuner times), the opt-in autotuner (``SGLANG_MOE_OMNI_AUTOTUNE=1``) and the small launch
helpers both launchers share.
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

    ``n < 128``: dense variant; ``n >= 128``: the split variant MODE_ITER. MODE_LANE stays an
    autotune candidate for ``k <= 8``: it is not faster than MODE_ITER across ``n`` (GPU
    timings: ``docs/benchmarks.md``, appendix). Block sizes follow static SASS counts and
    device timings (``benchmark/NOTES_omni.md``): 2 tokens per one-warp program from n=512 up
    (more resident warps: 64 registers, 2048 programs at T=4096).
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


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels take a row stride but need unit column stride."""
    return t if t.stride(1) == 1 or t.shape[1] == 1 else t.contiguous()


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
