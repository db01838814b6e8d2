"""Omni (Cartesian-product) router benchmark: naive torch, pruned torch, Triton kernels.

Times forward and forward+backward for n in {32..1024}, k in {8, 32}, T in {128, 4096,
16384} (bf16 logits), each call captured in a CUDA graph and replayed under
``triton.testing``-style timing: L2 flushed (256 MB write) before every replay, median
of the replays. Prints a table with ratios and the HBM floor
``bytes(read x, y + write weights, ids) / 3.0e12 B/s``, checks the goals at
n=512, T=4096, k=8, and writes ``bench_omni.png`` / ``.csv`` / ``.json`` to ``--out``.

  python3 benchmark/bench_omni.py --out /tmp/omni_bench            # everything
  python3 benchmark/bench_omni.py --quick                          # goal shape only
  python3 benchmark/bench_omni.py --autotune --precompile 14       # tuned configs
  python3 benchmark/bench_omni.py --lane-sweep                     # MODE_LANE configs only

``--quick`` (and ``--variants``) first prints a forward-variants table: the default
heuristic kernel vs MODE_ITER and MODE_LANE configs, each timed two ways, beside a no-op
graph replay, an empty kernel and memory yardstick kernels (read x, y, write outputs, no
selection) timed the same ways:

* ``flushed``: one kernel per CUDA graph, L2 flushed before each replay (includes the fixed
  cost of a graph replay, ~4.6 us on the H100);
* ``steady``: one CUDA graph of >= 96 calls over rotating input sets that total > 2x the L2
  (every call reads HBM), time / calls: what a model forward that runs the router in each
  layer sees. The goal check uses this one, beside the steady-state memory yardstick.

The goal block also counts the kernels one forward call launches (torch.profiler).

Our kernels run with the heuristic (default) configs; ``--autotune`` times every
candidate config per shape instead (``SGLANG_MOE_OMNI_AUTOTUNE=1``, CUDA-graph replay)
and prints the chosen configs and the heuristic's time at the end.
``--precompile N`` compiles every candidate kernel first in N worker processes (Triton
caches them on disk), which matters on a fresh machine.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from sglang_moe_routing.omni import (  # noqa: E402
    omni_router,
    omni_router_pruned_torch,
    omni_router_reference,
)
from sglang_moe_routing.omni import triton_kernels as tk  # noqa: E402

HBM_BYTES_PER_S = 3.0e12  # H100 SXM, measured device-to-device copy (KINDS.md)
NS = [32, 64, 128, 256, 512, 1024]
KS = [8, 32]
TS = [128, 4096, 16384]
GOAL = dict(n=512, T=4096, k=8)
NAIVE_FWD_MAX = 1 << 32  # T * n * n fp32 scores materialised (16 GiB)
NAIVE_FB_MAX = 1 << 31  # forward + backward holds ~3x that

IMPLS = {
    "naive": lambda x, y, k: omni_router_reference(x, y, k),
    "pruned": lambda x, y, k: omni_router_pruned_torch(x, y, k),
    "triton": lambda x, y, k: omni_router(x, y, k, backend="triton"),
}


# ----------------------------------------------------------------------------- timing

_FLUSH: Optional[torch.Tensor] = None


def _flush_l2() -> None:
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")
    _FLUSH.zero_()


def time_ms(fn: Callable[[], object], target_ms: float = 40.0, max_reps: int = 100) -> float:
    """Median GPU time of ``fn`` (events around each call, L2 flushed before each)."""
    fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    fn()
    e.record()
    torch.cuda.synchronize()
    est = max(s.elapsed_time(e), 1e-3)
    reps = int(max(3, min(max_reps, target_ms / est)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        _flush_l2()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    ts = sorted(a.elapsed_time(b) for a, b in zip(starts, ends))
    return ts[len(ts) // 2]


def graphed(fn: Callable[[], object]) -> Tuple[Callable[[], object], bool]:
    """Capture ``fn`` in a CUDA graph (after warm-up on a side stream); fall back to eager."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        torch.cuda.synchronize()
        return g.replay, True
    except Exception as exc:  # pragma: no cover - reported in the table
        print(f"  (graph capture failed, eager timing: {type(exc).__name__}: {exc})", flush=True)
        torch.cuda.synchronize()
        return fn, False


def steady_state_us(launch: Callable, T: int, n: int, k: int, l2_bytes: int,
                    min_calls: int = 96, reps: int = 15) -> float:
    """Time per call of ``launch(x, y, w, ids)`` inside one CUDA graph of many calls.

    The graph cycles through ``S`` input sets (``S * bytes(x, y) > 2 * L2``, so every call
    reads its logits from HBM, as a model's router does once per layer) for at least
    ``min_calls`` calls; the replay's fixed cost is paid once per graph. Median of
    ``reps`` replays, divided by the number of calls."""
    set_bytes = 2 * T * n * 2  # x and y, bf16
    sets = max(2, -(-2 * l2_bytes // set_bytes))
    calls = sets * max(1, -(-min_calls // sets))
    inputs = [make_inputs(T, n, seed=i) for i in range(sets)]
    w = torch.empty(T, k, dtype=torch.bfloat16, device="cuda")
    ids = torch.empty(T, k, dtype=torch.int64, device="cuda")

    def fn():
        with torch.no_grad():
            for c in range(calls):
                x, y = inputs[c % sets]
                launch(x, y, w, ids)

    run, _ = graphed(fn)
    run()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(reps):
        s.record()
        run()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e) * 1e3 / calls)
    del inputs
    torch.cuda.empty_cache()
    return sorted(ts)[len(ts) // 2]


def steady_state_fwd_us(impl_name: str, n: int, k: int, T: int, l2_bytes: int) -> float:
    """``steady_state_us`` of the public forward ``IMPLS[impl_name]`` (allocates outputs)."""
    impl = IMPLS[impl_name]
    return steady_state_us(lambda x, y, w, ids: impl(x, y, k), T, n, k, l2_bytes)


def count_kernels(fn: Callable[[], object]) -> Tuple[int, List[str]]:
    """GPU activities of one call of ``fn`` (after a warm-up call), from torch.profiler:
    ``(number of kernels + memsets + memcpys, their names)``."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(names), names


def make_inputs(T: int, n: int, seed: int = 0, requires_grad: bool = False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(T, n, device="cuda", generator=g).to(torch.bfloat16)
    y = torch.randn(T, n, device="cuda", generator=g).to(torch.bfloat16)
    if requires_grad:
        x.requires_grad_(True)
        y.requires_grad_(True)
    return x, y


def bench_impl(name: str, n: int, k: int, T: int, fwd_bwd: bool) -> Tuple[Optional[float], str]:
    if name == "naive":
        limit = NAIVE_FB_MAX if fwd_bwd else NAIVE_FWD_MAX
        if T * n * n > limit:
            return None, "skip (memory)"
    impl = IMPLS[name]
    x, y = make_inputs(T, n, requires_grad=fwd_bwd)
    if fwd_bwd:
        gw = torch.randn(T, k, device="cuda").to(torch.bfloat16)

        def fn():
            w, _ = impl(x, y, k)
            return torch.autograd.grad(w, (x, y), gw)

    else:

        def fn():
            with torch.no_grad():
                return impl(x, y, k)

    try:
        fn()  # compiles (and autotunes) outside any stream context or capture
        torch.cuda.synchronize()
        run, ok = graphed(fn)
        t = time_ms(run)
        return t, ("graph" if ok else "eager")
    except torch.cuda.OutOfMemoryError:
        return None, "OOM"
    finally:
        torch.cuda.empty_cache()


def hbm_floor_us(T: int, n: int, k: int, elt: int = 2, ids_bytes: int = 8) -> Tuple[float, float]:
    """(forward, backward) floors in us: each input read once, each output written once."""
    fwd = (2 * T * n * elt + T * k * (elt + ids_bytes)) / HBM_BYTES_PER_S * 1e6
    bwd = (T * k * (elt + ids_bytes) + 2 * T * k * elt + 2 * T * n * elt) / HBM_BYTES_PER_S * 1e6
    return fwd, bwd


def measured_copy_bandwidth() -> float:
    a = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    t = time_ms(lambda: b.copy_(a), target_ms=50)
    return 2 * a.numel() * 4 / (t * 1e-3)


# ----------------------------------------------------------------------------- precompile


def _precompile_one(spec) -> str:
    kind, n, k, cfg = spec
    x, y = make_inputs(32, n)  # T=32: same divisibility specialisation as 128/4096/16384
    try:
        if kind == "fwd":
            tk.omni_router_fwd_triton(x, y, k, False, torch.int64, config=cfg)
        else:
            w, ids = tk.omni_router_fwd_triton(x, y, k, False, torch.int64)
            tk.omni_router_bwd_triton(x, y, ids, torch.ones_like(w), False, config=cfg)
        torch.cuda.synchronize()
        return "ok"
    except Exception as exc:
        return f"{kind} n={n} k={k} {cfg}: {type(exc).__name__}: {exc}"


def precompile(specs, workers: int, timeout: float = 90.0) -> None:
    import multiprocessing as mp

    specs = list(dict.fromkeys(specs))
    t0 = time.time()
    ctx = mp.get_context("spawn")
    pool = ctx.Pool(workers)
    pending = pool.map_async(_precompile_one, specs, chunksize=1)
    pending.wait(timeout)
    if not pending.ready():  # a stuck compile must not eat the run: compile lazily instead
        pool.terminate()
        print(f"precompile: not done after {timeout:.0f}s, going on (kernels compile on first use)",
              flush=True)
        return
    pool.close()
    res = pending.get()
    bad = [r for r in res if r != "ok"]
    print(f"precompiled {len(specs)} kernels in {time.time() - t0:.1f}s with {workers} workers"
          + (f"; {len(bad)} failed:" if bad else ""), flush=True)
    for r in bad:
        print("  ", r)


def needed_specs(shapes, autotune: bool) -> List[tuple]:
    """Kernels the run will launch: the heuristic configs, or every autotune candidate."""
    dev = torch.device("cuda")
    specs = []
    for n, k, T in shapes:
        if autotune:
            specs += [("fwd", n, k, c) for c in tk.fwd_config_candidates(n, k, T, dev)]
            specs += [("bwd", n, k, c) for c in tk.bwd_config_candidates(n, k, T, dev)]
        else:
            specs += [("fwd", n, k, tk.fwd_config(n, k, T, dev)), ("bwd", n, k, tk.bwd_config(n, k, T, dev))]
    return specs


# ----------------------------------------------------------------------------- tuning report


def tuning_report(log, detail_shapes) -> Dict[str, list]:
    """Chosen config and the heuristic (first candidate) time per tuned shape; every
    candidate's time for ``detail_shapes``."""
    out = {}
    if not tk.TUNE_LOG:
        return out
    log("\nautotune (CUDA-graph replay, L2 warm), per shape: best config, best / heuristic time")
    for key, rows in tk.TUNE_LOG.items():
        kind, n, k, tb = key[0], key[1], key[2], key[3]
        best_cfg, best_t = min(rows, key=lambda r: r[1])
        heur_t = rows[0][1]
        log(f"  {kind} n={n:5d} k={k:3d} T<={tb if tb < 1 << 29 else 'inf'}: {best_t * 1e3:8.2f} us "
            f"(heuristic {heur_t * 1e3:8.2f} us, {heur_t / best_t:.2f}x)  {best_cfg}")
        out[f"{kind},{n},{k},{tb}"] = [(str(c), t * 1e3) for c, t in rows]
        if (n, k, tb) in detail_shapes:
            for c, t in rows:
                log(f"        {t * 1e3:8.2f} us  {c}")
    return out


# ----------------------------------------------------------------------------- forward variants

# MODE_LANE configs timed beside the default: (block_t, lanes, lists);
# test_omni_gpu.py checks the same list against the reference.
LANE_VARIANTS = [(1, 16, 4), (2, 16, 4), (1, 32, 4)]
# MODE_ITER configs timed beside the default: (block_t, num_warps)
ITER_VARIANTS = [(4, 1), (2, 1), (1, 1), (4, 2)]

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
        out["noop"] = time_ms(graphed(lambda: ids[:1, :1].zero_())[0]) * 1e3
    if _empty_kernel is None:
        return out
    emp = lambda *a: _empty_kernel[(1,)](ids)
    if flushed:
        out["empty_flushed"] = time_ms(graphed(emp)[0]) * 1e3
    out["empty_steady"] = steady_state_us(emp, 128, 64, k, 0, min_calls=200)
    best = None
    for bt, nw in YARD_CONFIGS:
        ly = yard_launcher(T, n, k, bt, nw)
        ly(x, y, w, ids)
        ss = steady_state_us(ly, T, n, k, l2)
        fl = time_ms(graphed(lambda: ly(x, y, w, ids))[0]) * 1e3 if flushed else None
        log(f"    yardstick bt={bt} nw={nw}: steady {ss:6.2f} us" + (f", flushed {fl:6.2f} us" if fl else ""))
        if best is None or ss < best[0]:
            best = (ss, fl, (bt, nw))
    out["yard_steady"], out["yard_flushed"], out["yard_cfg"] = best
    return out


def _variant_configs(n: int, k: int, T: int, dev) -> List[Tuple[str, object, int]]:
    """(name, FwdConfig, stage) of the default and the alternatives timed beside it."""
    NP, K = tk._dims(n, k)
    base = tk.fwd_config(n, k, T, dev)
    out = [("default " + _short(base), base, 2)]
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
    return out


def _short(cfg) -> str:
    names = {0: "dense", 1: "chunk", 2: "iter", 3: "lane"}
    s = f"{names.get(cfg.mode, cfg.mode)} bt={cfg.block_t} nw={cfg.num_warps}"
    if cfg.mode == tk.MODE_LANE:
        s += f" R={cfg.lanes} L={cfg.lists}"
    return s


def _launch_variant(cfg, stage: int, k: int) -> Callable:
    if cfg.mode == tk.MODE_LANE:
        return lambda x, y, w, ids: tk._launch_fwd_lane(x, y, k, False, w, ids, cfg, stage=stage)
    return lambda x, y, w, ids: tk._launch_fwd(x, y, k, False, w, ids, cfg)


def variants_table(log, shapes, l2: int, flushed: bool = True) -> List[dict]:
    """Forward only, preallocated outputs: the default config vs MODE_ITER and MODE_LANE
    configs (and two timing-only ablations of MODE_LANE), each in steady state and, if
    ``flushed``, one kernel per graph with the L2 flushed; beside the yardsticks."""
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
        log(f"    yardstick (best): steady {fmt(ys)} us = {ratio(ys, floor)} floor"
            + (f", flushed {fmt(yf)} us" if flushed else ""))
        log(f"    {'variant':<44} {'steady':>7} {'/floor':>6} {'/yard':>6}" + (f" {'flushed':>8}" if flushed else ""))
        x, y = make_inputs(T, n)
        w = torch.empty(T, k, dtype=x.dtype, device="cuda")
        ids = torch.empty(T, k, dtype=torch.int64, device="cuda")
        for name, cfg, stage in _variant_configs(n, k, T, x.device):
            try:
                lf = _launch_variant(cfg, stage, k)
                lf(x, y, w, ids)
                torch.cuda.synchronize()
                ss = steady_state_us(lf, T, n, k, l2)
                fl = time_ms(graphed(lambda: lf(x, y, w, ids))[0]) * 1e3 if flushed else None
            except Exception as exc:  # report and go on
                log(f"    {name}: {type(exc).__name__}: {str(exc)[:300]}")
                continue
            rows.append(dict(n=n, k=k, T=T, variant=name, steady_us=ss, flushed_us=fl, floor_us=floor,
                             yard_steady_us=ys, yard_flushed_us=yf, empty_steady_us=yd.get("empty_steady"),
                             noop_us=yd.get("noop")))
            log(f"    {name[:44]:<44} {ss:7.2f} {ss / floor:5.2f}x {ratio(ss, ys):>6}"
                + (f" {fmt(fl):>8}" if flushed else ""))
    return rows


# ----------------------------------------------------------------------------- main


def fmt(v: Optional[float]) -> str:
    return "-" if v is None else (f"{v:.1f}" if v >= 10 else f"{v:.2f}")


def ratio(a: Optional[float], b: Optional[float]) -> str:
    return "-" if a is None or b is None else f"{a / b:.1f}x"


def plot(results, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, mode in zip(axes, ("fwd", "fwdbwd")):
        for impl, style in (("naive", "o-"), ("pruned", "s-"), ("triton", "^-")):
            for k, dash in ((8, "-"), (32, "--")):
                pts = [(r["n"], r[f"{impl}_{mode}_us"]) for r in results
                       if r["T"] == 4096 and r["k"] == k and r[f"{impl}_{mode}_us"] is not None]
                if pts:
                    ax.plot(*zip(*pts), style[0] + dash, label=f"{impl} k={k}")
        pts = [(r["n"], r["floor_fwd_us"] if mode == "fwd" else r["floor_fwd_us"] + r["floor_bwd_us"])
               for r in results if r["T"] == 4096 and r["k"] == 8]
        ax.plot(*zip(*pts), "k:", label="HBM floor (k=8)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("n (experts = n^2)")
        ax.set_ylabel("time (us)")
        ax.set_title(f"Omni router {'forward' if mode == 'fwd' else 'forward + backward'}, T=4096, bf16")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--quick", action="store_true", help="goal shape only")
    ap.add_argument("--autotune", action="store_true",
                    help="autotune our kernels per shape (default: the heuristic configs)")
    ap.add_argument("--precompile", type=int, default=0, metavar="WORKERS",
                    help="compile all kernels first in this many processes")
    ap.add_argument("--max-seconds", type=float, default=1e9, help="stop measuring after this long")
    ap.add_argument("--impls", default="naive,pruned,triton")
    ap.add_argument("--variants", action="store_true",
                    help="time the forward variants (default vs MODE_ITER / MODE_LANE); on with --quick")
    ap.add_argument("--variants-goal-only", action="store_true", help="variants table at the goal shape only")
    ap.add_argument("--shapes", default="", help="variants shapes 'n,k,T;n,k,T' (default: a built-in list)")
    ap.add_argument("--lane-sweep", action="store_true",
                    help="only the variants table in steady state (no flushed timing), then exit")
    ap.add_argument("--ncu-launch", action="store_true",
                    help="for `ncu -k regex:_omni_fwd --launch-skip N --launch-count N`: compile the N "
                         "variants of the goal shape on T=32, then launch each once at the goal shape")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_omni.py needs a CUDA GPU")
        return 2
    os.makedirs(args.out, exist_ok=True)
    logf = open(os.path.join(args.out, "bench_omni.log"), "a")

    def log(msg: str = "") -> None:
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    if args.autotune:
        os.environ["SGLANG_MOE_OMNI_AUTOTUNE"] = "1"
    t_start = time.time()
    props = torch.cuda.get_device_properties(0)
    import triton

    log(f"device: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, "
        f"triton {triton.__version__}; tl.topk: {bool(tk._HAS_TL_TOPK)}; "
        f"autotune: {'on' if tk.autotune_enabled() else 'off (heuristic configs)'}")
    log(f"measured device-to-device copy: {measured_copy_bandwidth() / 1e12:.2f} TB/s "
        f"(floor below uses {HBM_BYTES_PER_S / 1e12:.1f} TB/s)")

    goal = (GOAL["n"], GOAL["k"], GOAL["T"])
    shapes = [goal] if args.quick else [goal] + [s for s in itertools.product(NS, KS, TS) if s != goal]
    if args.precompile and not (args.lane_sweep or args.ncu_launch):
        precompile(needed_specs(shapes, args.autotune), args.precompile)

    l2 = getattr(props, "L2_cache_size", 50 * 1024 * 1024)
    if args.ncu_launch:
        n, k, T = goal
        cfgs = [c for _, c, st in _variant_configs(n, k, T, torch.device("cuda")) if st == 2]
        for TT in (32, T):
            x, y = make_inputs(TT, n)
            w = torch.empty(TT, k, dtype=x.dtype, device="cuda")
            ids = torch.empty(TT, k, dtype=torch.int64, device="cuda")
            for c in cfgs:
                _launch_variant(c, 2, k)(x, y, w, ids)
            torch.cuda.synchronize()
        log(f"ncu launches: {[_short(c) for c in cfgs]}")
        return 0
    variants = []
    vshapes = [goal, (512, 8, 16384), (512, 8, 128), (1024, 8, 4096), (128, 8, 4096), (1024, 32, 4096)]
    if args.shapes:
        vshapes = [tuple(int(v) for v in sh.split(",")) for sh in args.shapes.split(";")]
    if args.lane_sweep or args.quick or args.variants:
        vsh = vshapes[:1] if (args.variants_goal_only or (args.quick and not args.variants)) else vshapes
        if args.precompile:
            dev = torch.device("cuda")
            precompile([("fwd", n, k, c) for n, k, T in vsh for _, c, st in _variant_configs(n, k, T, dev)
                        if st == 2], args.precompile)
    if args.lane_sweep:
        variants_table(log, vsh, l2, flushed=False)
        return 0
    if args.quick or args.variants:  # first: this table decides the default forward variant
        variants = variants_table(log, vsh, l2)

    impls = args.impls.split(",")
    results = []
    header = (f"{'n':>5} {'k':>3} {'T':>6} | {'naive fwd':>10} {'pruned fwd':>10} {'ours fwd':>9} "
              f"{'floor':>6} {'/floor':>6} {'vs naive':>8} {'vs prun':>8} | {'naive f+b':>10} "
              f"{'pruned f+b':>10} {'ours f+b':>9} {'ours bwd':>9} {'bwd/fwd':>7}")
    log("\ntimes in us (CUDA graph replay, L2 flushed, median); bf16 logits; ours = Triton"
        + (" (autotuned configs)" if args.autotune else " (heuristic configs)"))
    log(header)
    for n, k, T in shapes:
        if time.time() - t_start > args.max_seconds:
            log(f"(stopped: --max-seconds {args.max_seconds} reached)")
            break
        row = dict(n=n, k=k, T=T)
        for impl in IMPLS:
            for mode in ("fwd", "fwdbwd"):
                t, how = (None, "off") if impl not in impls else bench_impl(impl, n, k, T, mode == "fwdbwd")
                row[f"{impl}_{mode}_us"] = None if t is None else t * 1e3
                row[f"{impl}_{mode}_how"] = how
        f_fwd, f_bwd = hbm_floor_us(T, n, k)
        row["floor_fwd_us"], row["floor_bwd_us"] = f_fwd, f_bwd
        o_f, o_fb = row["triton_fwd_us"], row["triton_fwdbwd_us"]
        row["triton_bwd_us"] = None if o_f is None or o_fb is None else max(o_fb - o_f, 0.0)
        results.append(row)
        bwd_ratio = None if row["triton_bwd_us"] is None else row["triton_bwd_us"] / o_f
        log(f"{n:>5} {k:>3} {T:>6} | {fmt(row['naive_fwd_us']):>10} {fmt(row['pruned_fwd_us']):>10} "
            f"{fmt(o_f):>9} {fmt(f_fwd):>6} {ratio(o_f, f_fwd):>6} {ratio(row['naive_fwd_us'], o_f):>8} "
            f"{ratio(row['pruned_fwd_us'], o_f):>8} | {fmt(row['naive_fwdbwd_us']):>10} "
            f"{fmt(row['pruned_fwdbwd_us']):>10} {fmt(o_fb):>9} {fmt(row['triton_bwd_us']):>9} "
            f"{'-' if bwd_ratio is None else f'{bwd_ratio:.2f}':>7}")

    detail = {(512, 8, 4096), (1024, 8, 1 << 30), (64, 8, 4096), (512, 32, 4096), (1024, 8, 512)}
    sweeps = tuning_report(log, detail)

    g = next((r for r in results if (r["n"], r["k"], r["T"]) == goal), None)
    if g is not None and g["triton_fwd_us"] is not None:
        sp = None if g["naive_fwd_us"] is None else g["naive_fwd_us"] / g["triton_fwd_us"]
        fl = g["triton_fwd_us"] / g["floor_fwd_us"]
        br = None if g["triton_bwd_us"] is None else g["triton_bwd_us"] / g["triton_fwd_us"]
        log(f"\nGOALS at n={goal[0]}, k={goal[1]}, T={goal[2]} (bf16):")
        log(f"  forward vs naive torch: {'-' if sp is None else f'{sp:.0f}x'} (goal >= 100x) "
            f"{'PASS' if sp is not None and sp >= 100 else 'FAIL'}")
        log(f"  forward vs HBM floor {g['floor_fwd_us']:.2f} us, one kernel per graph + L2 flush "
            f"(includes a replay's fixed cost): {g['triton_fwd_us']:.2f} us = {fl:.2f}x "
            f"(goal <= 2x) {'PASS' if fl <= 2 else 'FAIL'}")
        log(f"  backward / forward: {'-' if br is None else f'{br:.2f}'} (goal <= 1.5) "
            f"{'PASS' if br is not None and br <= 1.5 else 'FAIL'}")
        try:
            ss = steady_state_fwd_us("triton", goal[0], goal[1], goal[2], l2)
            yd = yardsticks(lambda m: None, goal[2], goal[0], goal[1], l2, flushed=False)
            ys = yd.get("yard_steady")
            log(f"  forward, steady state (>= 96 calls per graph, rotating inputs > 2x L2): "
                f"{ss:.2f} us = {ss / g['floor_fwd_us']:.2f}x the floor "
                f"(goal <= 2x) {'PASS' if ss / g['floor_fwd_us'] <= 2 else 'FAIL'}")
            if ys is not None:
                log(f"  memory yardstick (read x, y + write outputs, no selection), steady state: "
                    f"{ys:.2f} us = {ys / g['floor_fwd_us']:.2f}x the floor; forward / yardstick = "
                    f"{ss / ys:.2f}; empty kernel in the same graph timing: {yd.get('empty_steady', 0):.2f} us")
            x, y = make_inputs(goal[2], goal[0])
            nk, names = count_kernels(lambda: omni_router(x, y, goal[1], backend="triton"))
            log(f"  GPU activities per forward call: {nk} ({', '.join(sorted(set(names)))})"
                + ("" if nk == 1 else "  <- more than one: launch overhead to remove"))
        except Exception as exc:  # pragma: no cover - reported, never hides the table above
            log(f"  steady-state forward timing failed: {type(exc).__name__}: {exc}")
    with open(os.path.join(args.out, "bench_omni.json"), "w") as f:
        json.dump(dict(device=props.name, results=results, sweeps=sweeps, variants=variants), f, indent=1)
    if results:
        with open(os.path.join(args.out, "bench_omni.csv"), "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(results[0].keys()))
            wr.writeheader()
            wr.writerows(results)
        try:
            plot(results, os.path.join(args.out, "bench_omni.png"))
        except Exception as exc:  # pragma: no cover
            log(f"plot failed: {exc}")
    log(f"total {time.time() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
