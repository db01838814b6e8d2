"""Omni forward variants against memory-only yardsticks, and what bench_omni.py shares.

The table ``bench_omni.py --quick`` / ``--variants`` / ``--lane-sweep`` prints: the default
heuristic forward config vs MODE_ITER and MODE_LANE configs (and two timing-only ablations
of MODE_LANE), each timed two ways beside a no-op graph replay, an empty kernel and memory
yardstick kernels (read x, y, write outputs, no selection) timed the same ways:

* ``flushed``: one kernel per CUDA graph, L2 flushed before each replay (includes the fixed
  cost of a graph replay, which the empty kernel shows);
* ``steady``: one CUDA graph of >= 96 calls over rotating input sets that total > 2x the L2
  (every call reads HBM), time / calls: what a model forward that runs the router in each
  layer sees.

Every variant's output is checked against the reference in the same run; its ratios are
refused (``harness.Checks``) when the check fails. Also here, used by bench_omni.py: the
inputs, the HBM floor, the steady-state timing and the forward check.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import harness  # noqa: E402
from harness import Checks, fmt, graphed, time_flushed_ms  # noqa: E402

from sglang_moe_routing.omni import omni_router_reference  # noqa: E402
from sglang_moe_routing.omni import triton as tk  # noqa: E402
from sglang_moe_routing.omni.triton import forward_packed as tkp  # noqa: E402

# The HBM bandwidth the floor assumes (bytes/s); bench_omni.py also prints the device-to-device
# copy bandwidth it measures, so a run on another GPU shows how far this is off.
HBM_BYTES_PER_S = 3.0e12


def make_inputs(T: int, n: int, seed: int = 0, requires_grad: bool = False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(T, n, device="cuda", generator=g).to(torch.bfloat16)
    y = torch.randn(T, n, device="cuda", generator=g).to(torch.bfloat16)
    if requires_grad:
        x.requires_grad_(True)
        y.requires_grad_(True)
    return x, y


def hbm_floor_us(T: int, n: int, k: int, elt: int = 2, ids_bytes: int = 8) -> Tuple[float, float]:
    """(forward, backward) floors in us: each input read once, each output written once."""
    fwd = (2 * T * n * elt + T * k * (elt + ids_bytes)) / HBM_BYTES_PER_S * 1e6
    bwd = (T * k * (elt + ids_bytes) + 2 * T * k * elt + 2 * T * n * elt) / HBM_BYTES_PER_S * 1e6
    return fwd, bwd


def steady_state_us(launch: Callable, T: int, n: int, k: int, l2_bytes: int,
                    min_calls: int = 96, reps: int = 15) -> float:
    """Time per call of ``launch(x, y, w, ids)`` inside one CUDA graph of many calls.

    The graph cycles through ``S`` input sets (``S * bytes(x, y) > 2 * L2``, so every call
    reads its logits from HBM, as a model's router does once per layer) for at least
    ``min_calls`` calls; the replay's fixed cost is paid once per graph. Median of
    ``reps`` replays, divided by the number of calls."""
    sets, calls = harness.rotating_sets(2 * T * n * 2, l2_bytes, min_calls)  # x and y, bf16
    w = torch.empty(T, k, dtype=torch.bfloat16, device="cuda")
    ids = torch.empty(T, k, dtype=torch.int64, device="cuda")
    inputs = [(*make_inputs(T, n, seed=i), w, ids) for i in range(sets)]
    try:
        return harness.time_graph_rotating(launch, inputs, calls, reps=reps)
    finally:
        del inputs
        torch.cuda.empty_cache()


WEIGHT_TOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def check_forward(x, y, k: int, w, ids) -> Optional[str]:
    """None when ``(w, ids)`` is a correct Omni forward of ``x, y`` (ties allowed), else a
    one-line reason: ids distinct and in range per row; the fp32 scores of the chosen ids,
    sorted, equal the reference's exactly; weights within the dtype's tolerance of the
    reference's (both sorted by descending score). The reference runs over row chunks, so
    n = 1024 fits in memory."""
    T, n = x.shape
    ids = ids.long()
    if tuple(ids.shape) != (T, k) or tuple(w.shape) != (T, k):
        return f"shape {tuple(ids.shape)}/{tuple(w.shape)}, want {(T, k)}"
    if T == 0:
        return None
    if not bool(((ids >= 0) & (ids < n * n)).all()):
        return "ids out of range"
    srt = ids.sort(dim=1).values
    if k > 1 and not bool((srt[:, 1:] != srt[:, :-1]).all()):
        return "an expert repeated within a token"
    rows = max(1, (1 << 27) // (n * n))
    worst_w = 0.0
    for r in range(0, T, rows):
        xs, ys = x[r:r + rows], y[r:r + rows]
        rw, rids = omni_router_reference(xs, ys, k)
        got = ids[r:r + rows]
        s = xs.float().gather(1, got // n) + ys.float().gather(1, got % n)
        rs = xs.float().gather(1, rids // n) + ys.float().gather(1, rids % n)
        bad = (s.sort(dim=1, descending=True).values != rs).any(dim=1).nonzero().flatten()
        if bad.numel():
            return f"{bad.numel()} rows pick other scores than the reference (first: row {r + int(bad[0])})"
        worst_w = max(worst_w, float((w[r:r + rows].float() - rw.float()).abs().max()))
    tol = WEIGHT_TOL.get(x.dtype, 8e-3)
    if worst_w > tol:
        return f"weights differ from the reference: max |dw| {worst_w:.2e} > {tol:g}"
    return None


# MODE_LANE configs timed beside the default: (block_t, lanes, lists);
# test_omni_gpu.py checks the same list against the reference.
LANE_VARIANTS = [(1, 16, 4), (2, 16, 4), (1, 32, 4)]
# MODE_ITER configs timed beside the default: (block_t, num_warps)
ITER_VARIANTS = [(4, 1), (2, 1), (1, 1), (4, 2)]
# Packed bf16x2 variant of MODE_ITER (omni/triton/forward_packed.py): (block_t, num_warps, asm);
# test_omni_packed.py checks the same list against the reference on the GPU.
PACKED_VARIANTS = [(2, 1, True), (4, 1, True), (1, 1, True), (2, 1, False)]
# Lane-packed variant (same file; 128 <= NP <= 1024, k <= 8): (block_t, num_warps, asm)
LANEPK_VARIANTS = [(2, 1, True), (1, 1, True), (4, 2, True), (4, 1, True), (2, 1, False)]
# Stage codes of _variant_configs: < 2 timing-only ablations; 2 a config of the kernels the
# router dispatches to; then the packed variants (PTX s16x2 / emulated s16x2).
STAGE_FULL, STAGE_PACKED_ASM, STAGE_PACKED_EMU, STAGE_LANEPK_ASM, STAGE_LANEPK_EMU = 2, 4, 5, 6, 7
PACKED_STAGES = (STAGE_PACKED_ASM, STAGE_PACKED_EMU, STAGE_LANEPK_ASM, STAGE_LANEPK_EMU)


def is_full(stage: int) -> bool:
    """A variant whose output is a routing (checked against the reference), not an ablation."""
    return stage >= STAGE_FULL

try:
    import triton
    import triton.language as tl

    @triton.jit
    def _yardstick_kernel(x_ptr, y_ptr, w_ptr, ids_ptr, T, n, stride, K: tl.constexpr,
                          BLOCK_T: tl.constexpr, NP: tl.constexpr):
        """Memory yardstick: read x and y once, write [T, K] weights and ids once (row max,
        no selection): the best time any forward can reach under the same timing."""
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, NP)
        m = (rows < T)[:, None] & (cols < n)[None, :]
        off = rows.to(tl.int64)[:, None] * stride + cols[None, :]
        v = tl.max(tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32), axis=1)
        v += tl.max(tl.load(y_ptr + off, mask=m, other=0.0).to(tl.float32), axis=1)
        kk = tl.arange(0, K)[None, :]
        om = (rows < T)[:, None] & (kk < K)
        o = rows.to(tl.int64)[:, None] * K + kk
        tl.store(w_ptr + o, (v[:, None] + kk).to(w_ptr.dtype.element_ty), mask=om)
        tl.store(ids_ptr + o, (v[:, None] + kk).to(tl.int64), mask=om)

    @triton.jit
    def _empty_kernel(p_ptr):
        """One program storing one int64: the cost of a kernel that does nothing."""
        tl.store(p_ptr, 1)
except Exception:  # pragma: no cover
    _yardstick_kernel = None
    _empty_kernel = None

# yardstick launch shapes (tokens per program, warps); the table reports the fastest
YARD_CONFIGS = [(8, 4), (1, 1), (2, 2)]


def yard_launcher(T: int, n: int, k: int, bt: int, nw: int) -> Callable:
    NP = max(16, triton.next_power_of_2(n))
    grid = (triton.cdiv(T, bt),)
    return lambda x, y, w, ids: _yardstick_kernel[grid](x, y, w, ids, T, n, x.stride(0), K=k,
                                                         BLOCK_T=bt, NP=NP, num_warps=nw)


def yardsticks(log, T: int, n: int, k: int, l2: int, flushed: bool = True) -> dict:
    """Empty kernel, no-op graph and memory yardsticks (best of YARD_CONFIGS), in both
    timings. Keys: noop, empty_flushed, empty_steady, yard_flushed, yard_steady, yard_cfg."""
    out = {}
    x, y = make_inputs(T, n)
    w = torch.empty(T, k, dtype=x.dtype, device="cuda")
    ids = torch.empty(T, k, dtype=torch.int64, device="cuda")
    if flushed:
        out["noop"] = time_flushed_ms(graphed(lambda: ids[:1, :1].zero_())[0]) * 1e3
    if _empty_kernel is None:
        return out
    emp = lambda *a: _empty_kernel[(1,)](ids)
    if flushed:
        out["empty_flushed"] = time_flushed_ms(graphed(emp)[0]) * 1e3
    out["empty_steady"] = steady_state_us(emp, 128, 64, k, 0, min_calls=200)
    best = None
    for bt, nw in YARD_CONFIGS:
        ly = yard_launcher(T, n, k, bt, nw)
        ly(x, y, w, ids)
        ss = steady_state_us(ly, T, n, k, l2)
        fl = time_flushed_ms(graphed(lambda: ly(x, y, w, ids))[0]) * 1e3 if flushed else None
        log(f"    yardstick bt={bt} nw={nw}: steady {ss:6.2f} us" + (f", flushed {fl:6.2f} us" if fl else ""))
        if best is None or ss < best[0]:
            best = (ss, fl, (bt, nw))
    out["yard_steady"], out["yard_flushed"], out["yard_cfg"] = best
    return out


def _packed_configs(n: int, k: int, spot: bool = False) -> List[Tuple[str, object, int]]:
    """(name, FwdConfig, stage) of the packed variants (PACKED_VARIANTS, LANEPK_VARIANTS) that
    run packed at this shape (16-bit logits assumed: the tables time bf16); ``spot``: only the
    first launch shape of each."""
    if n < 2 or n % 2:
        return []
    out = []
    for bt, nw, asm in PACKED_VARIANTS[:1] if spot else PACKED_VARIANTS:
        c = tkp.packed_config(n, k, block_t=bt, num_warps=nw)
        out.append((f"packed-iter bt={bt} nw={nw} " + ("s16x2" if asm else "emulated"), c,
                    STAGE_PACKED_ASM if asm else STAGE_PACKED_EMU))
    if tkp.lanepk_fits(n, k):
        for bt, nw, asm in LANEPK_VARIANTS[:1] if spot else LANEPK_VARIANTS:
            c = tkp.lanepk_config(n, k, block_t=bt, num_warps=nw)
            out.append((f"lane-packed bt={bt} nw={nw} " + ("s16x2" if asm else "emulated"), c,
                        STAGE_LANEPK_ASM if asm else STAGE_LANEPK_EMU))
    return out


def _variant_configs(n: int, k: int, T: int, dev, packed_only: bool = False) -> List[Tuple[str, object, int]]:
    """(name, FwdConfig, stage) of the default and the alternatives timed beside it;
    ``packed_only``: the default and the packed variants only (all launch shapes at the goal
    shape n=512, k=8, T=4096, the first of each elsewhere)."""
    NP, K = tk._dims(n, k)
    base = tk.fwd_config(n, k, T, dev)
    out = [("default " + _short(base), base, 2)]
    if packed_only:
        return out + _packed_configs(n, k, spot=(n, k, T) != (512, 8, 4096))
    if n >= 128:
        s_it = tk._default_chunk(n, k, tk.MODE_ITER)
        for bt, nw in ITER_VARIANTS:
            c = tk.FwdConfig(bt, nw, tk.MODE_ITER, s_it, K >= 4)
            if c != base:
                out.append((f"iter bt={bt} nw={nw}" + (" (old default)" if (bt, nw, NP) == (4, 1, 512) else ""), c, 2))
    if tk._lane_fits(n, k):
        for bt, lanes, lists in LANE_VARIANTS:
            c = tk.fwd_config_lane(n, k, T, dev, block_t=bt, lanes=lanes, lists=lists)
            if c != base:
                out.append((f"lane bt={bt} R={lanes} L={lists}", c, 2))
        c = tk.fwd_config_lane(n, k, T, dev)
        out.append(("  ablation: lane, no grid (stage 1)", c, 1))
        out.append(("  ablation: lane, keys+max only (stage 0)", c, 0))
    return out + _packed_configs(n, k)


def _short(cfg) -> str:
    names = {0: "dense", 1: "chunk", 2: "iter", 3: "lane"}
    s = f"{names.get(cfg.mode, cfg.mode)} bt={cfg.block_t} nw={cfg.num_warps}"
    if cfg.mode == tk.MODE_LANE:
        s += f" R={cfg.lanes} L={cfg.lists}"
    return s


def _launch_variant(cfg, stage: int, k: int) -> Callable:
    if stage in (STAGE_PACKED_ASM, STAGE_PACKED_EMU):
        asm = stage == STAGE_PACKED_ASM
        return lambda x, y, w, ids: tkp.launch_fwd_packed(x, y, k, False, w, ids, cfg, asm=asm)
    if stage in (STAGE_LANEPK_ASM, STAGE_LANEPK_EMU):
        asm = stage == STAGE_LANEPK_ASM
        return lambda x, y, w, ids: tkp.launch_fwd_lanepk(x, y, k, False, w, ids, cfg, asm=asm)
    if cfg.mode == tk.MODE_LANE:
        return lambda x, y, w, ids: tk._launch_fwd_lane(x, y, k, False, w, ids, cfg, stage=stage)
    return lambda x, y, w, ids: tk._launch_fwd(x, y, k, False, w, ids, cfg)


def check_same_as_iter(cfg, stage: int, x, y, k: int, w, ids) -> Optional[str]:
    """Packed variants: None when ``(w, ids)`` equal, bit for bit, the output of MODE_ITER
    with the same chunk size (same ids in the same order, same weights); else a reason."""
    if stage not in PACKED_STAGES:
        return None
    w2, ids2 = torch.full_like(w, float("nan")), torch.full_like(ids, -1)
    tk._launch_fwd(x, y, k, False, w2, ids2, tkp.packed_config(x.shape[1], k))
    if not torch.equal(ids, ids2):
        return f"ids differ from MODE_ITER's in {int((ids != ids2).any(1).sum())} rows"
    if not torch.equal(w.view(torch.int16), w2.view(torch.int16)):
        return "weights differ from MODE_ITER's bits"
    return None


def variants_table(log, shapes, l2: int, flushed: bool = True,
                   checks: Optional[Checks] = None, packed_only: bool = False) -> List[dict]:
    """Forward only, preallocated outputs: the default config vs MODE_ITER and MODE_LANE
    configs (and two timing-only ablations of MODE_LANE), each in steady state and, if
    ``flushed``, one kernel per graph with the L2 flushed; beside the yardsticks. Each full
    variant's output is checked against the reference first (recorded in ``checks`` under
    ``(variant, n, k, T)``); the ablations stop early by design and are not checked."""
    checks = checks if checks is not None else Checks()
    rows = []
    log("\nforward variants, bf16 (us). steady = per call in a graph of >= 96 calls over "
        "rotating inputs > 2x L2; flushed = one kernel per graph, L2 flushed; "
        "floor = HBM bytes / 3.0 TB/s; yard = best memory-only kernel (same timing)")
    for n, k, T in shapes:
        floor = hbm_floor_us(T, n, k)[0]
        log(f"  n={n} k={k} T={T}: floor {floor:.2f} us")
        yd = yardsticks(log, T, n, k, l2, flushed)
        log(f"    empty kernel: steady {yd.get('empty_steady', float('nan')):.2f} us"
            + (f", flushed {yd['empty_flushed']:.2f} us; no-op graph flushed {yd['noop']:.2f} us"
               if flushed and 'empty_flushed' in yd else ""))
        ys, yf = yd.get("yard_steady"), yd.get("yard_flushed")
        log(f"    yardstick (best): steady {fmt(ys)} us = {checks.ratio(ys, floor, spec='.1f', suffix='x')} floor"
            + (f", flushed {fmt(yf)} us" if flushed else ""))
        log(f"    {'variant':<44} {'steady':>7} {'/floor':>6} {'/yard':>6}" + (f" {'flushed':>8}" if flushed else "")
            + "  check")
        x, y = make_inputs(T, n)
        w = torch.empty(T, k, dtype=x.dtype, device="cuda")
        ids = torch.empty(T, k, dtype=torch.int64, device="cuda")
        for name, cfg, stage in _variant_configs(n, k, T, x.device, packed_only):
            try:
                lf = _launch_variant(cfg, stage, k)
                lf(x, y, w, ids)
                torch.cuda.synchronize()
                key = (name, n, k, T)
                if is_full(stage):
                    w.fill_(float("nan"))  # poisoned: an unwritten element fails the check
                    ids.fill_(-1)
                    lf(x, y, w, ids)
                    torch.cuda.synchronize()
                    checks.run(key, lambda: check_forward(x, y, k, w, ids)
                               or check_same_as_iter(cfg, stage, x, y, k, w, ids))
                ss = steady_state_us(lf, T, n, k, l2)
                fl = time_flushed_ms(graphed(lambda: lf(x, y, w, ids))[0]) * 1e3 if flushed else None
            except Exception as exc:  # report and go on
                log(f"    {name}: {type(exc).__name__}: {str(exc)[:300]}")
                continue
            rows.append(dict(n=n, k=k, T=T, variant=name, steady_us=ss, flushed_us=fl, floor_us=floor,
                             yard_steady_us=ys, yard_flushed_us=yf, empty_steady_us=yd.get("empty_steady"),
                             noop_us=yd.get("noop")))
            rows[-1]["check"] = checks.verdicts.get(key, "not checked (ablation)") or "ok"
            refused = checks.refusal(key)
            log(f"    {name[:44]:<44} {ss:7.2f} "
                + (f"{refused}" if refused else
                   f"{ss / floor:5.2f}x {checks.ratio(ss, ys, spec='.2f', suffix='x'):>6}")
                + (f" {fmt(fl):>8}" if flushed else "")
                + ("  ok" if is_full(stage) and not refused else "  -" if not is_full(stage) else ""))
    return rows
