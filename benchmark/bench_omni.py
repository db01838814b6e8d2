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
  python3 benchmark/bench_omni.py --packed --shapes '512,8,4096'   # packed bf16x2 variants

``--quick`` (and ``--variants``) first prints a forward-variants table (``omni_variants.py``):
the default heuristic kernel vs MODE_ITER and MODE_LANE configs, each timed ``flushed`` (one
kernel per graph, L2 flushed, includes a graph replay's fixed cost) and ``steady`` (per call
in one graph of >= 96 calls over rotating inputs > 2x the L2: what a model forward that runs
the router in each layer sees), beside memory-only yardstick kernels timed the same ways.
The goal check uses the steady timing, beside the steady-state memory yardstick.

Correctness in the same run: the forward output of ``pruned`` and ``triton`` (and of every
forward variant) is checked against the naive reference on the timed inputs before timing
(``omni_variants.check_forward``: same scores chosen, ties allowed; weights within the bf16
tolerance). A ratio or goal involving an implementation that failed prints
"n/a (correctness check failed: ...)", and the script exits with status 1. The backward is
timed, not checked here (test_omni_gpu.py checks it).

The goal block also counts the kernels one forward call launches (torch.profiler).

Our kernels run with the heuristic (default) configs; ``--autotune`` times every
candidate config per shape instead (``SGLANG_MOE_OMNI_AUTOTUNE=1``, CUDA-graph replay)
and prints the chosen configs and the heuristic's time at the end.
``--precompile N`` compiles every candidate kernel first in N worker processes (Triton
caches them on disk), which matters on a fresh machine.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import harness  # noqa: E402
from harness import Checks, count_kernels, fmt, graphed, time_flushed_ms  # noqa: E402
from omni_variants import (  # noqa: E402
    HBM_BYTES_PER_S,
    _launch_variant,
    _short,
    _variant_configs,
    check_forward,
    is_full,
    hbm_floor_us,
    make_inputs,
    steady_state_us,
    variants_table,
    yardsticks,
)

from sglang_moe_routing.omni import (  # noqa: E402
    omni_router,
    omni_router_pruned_torch,
    omni_router_reference,
)
from sglang_moe_routing.omni import triton as tk  # noqa: E402

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


def steady_state_fwd_us(impl_name: str, n: int, k: int, T: int, l2_bytes: int) -> float:
    """``steady_state_us`` of the public forward ``IMPLS[impl_name]`` (allocates outputs)."""
    impl = IMPLS[impl_name]
    return steady_state_us(lambda x, y, w, ids: impl(x, y, k), T, n, k, l2_bytes)


def bench_impl(name: str, n: int, k: int, T: int, fwd_bwd: bool,
               checks: Optional[Checks] = None) -> Tuple[Optional[float], str]:
    """(median ms, how) of ``IMPLS[name]`` at one shape; with ``checks``, the forward output
    (not ``naive``: it is the reference) is checked first under ``(name, n, k, T)``."""
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
        if checks is not None and name != "naive" and not fwd_bwd:
            def check():
                with torch.no_grad():
                    return check_forward(x, y, k, *impl(x, y, k))
            checks.run((name, n, k, T), check)
        run, ok = graphed(fn)
        t = time_flushed_ms(run)
        return t, ("graph" if ok else "eager")
    except torch.cuda.OutOfMemoryError:
        return None, "OOM"
    finally:
        torch.cuda.empty_cache()


def measured_copy_bandwidth() -> float:
    a = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    t = time_flushed_ms(lambda: b.copy_(a), target_ms=50)
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


# ----------------------------------------------------------------------------- main


def plot(results, path) -> None:
    panels = []
    for mode in ("fwd", "fwdbwd"):
        lines = []
        for impl, marker in (("naive", "o"), ("pruned", "s"), ("triton", "^")):
            for k, dash in ((8, "-"), (32, "--")):
                pts = [(r["n"], r[f"{impl}_{mode}_us"]) for r in results
                       if r["T"] == 4096 and r["k"] == k and r[f"{impl}_{mode}_us"] is not None]
                if pts:
                    lines.append((f"{impl} k={k}", *zip(*pts), marker + dash, None))
        pts = [(r["n"], r["floor_fwd_us"] if mode == "fwd" else r["floor_fwd_us"] + r["floor_bwd_us"])
               for r in results if r["T"] == 4096 and r["k"] == 8]
        if pts:
            lines.append(("HBM floor (k=8)", *zip(*pts), "k:", None))
        panels.append({"title": f"Omni router {'forward' if mode == 'fwd' else 'forward + backward'}, "
                                "T=4096, bf16", "xlabel": "n (experts = n^2)", "lines": lines})
    harness.line_panels(panels, path, ylabel="time (us)", figsize_per_panel=(6, 4.5),
                        sharey=False, legend="panel")
    print(f"wrote {path}")


def build_parser():
    ap = harness.base_parser(__doc__)
    ap.add_argument("--autotune", action="store_true",
                    help="autotune our kernels per shape (default: the heuristic configs)")
    ap.add_argument("--precompile", type=int, default=0, metavar="WORKERS",
                    help="compile all kernels first in this many processes")
    ap.add_argument("--max-seconds", type=float, default=1e9, help="stop measuring after this long")
    ap.add_argument("--impls", default="naive,pruned,triton",
                    type=lambda v: harness.choice_list(v, IMPLS, "--impls"))
    ap.add_argument("--variants", action="store_true",
                    help="time the forward variants (default vs MODE_ITER / MODE_LANE); on with --quick")
    ap.add_argument("--variants-goal-only", action="store_true", help="variants table at the goal shape only")
    ap.add_argument("--shapes", default=None, type=lambda v: harness.shape_list(v, 3, "--shapes"),
                    help="variants shapes 'n,k,T;n,k,T' (default: a built-in list)")
    ap.add_argument("--lane-sweep", action="store_true",
                    help="only the variants table in steady state (no flushed timing), then exit")
    ap.add_argument("--packed", action="store_true",
                    help="only the variants table in steady state, default config vs the packed "
                         "bf16x2 variants (omni/triton/forward_packed.py), then exit")
    ap.add_argument("--ncu-launch", action="store_true",
                    help="for `ncu -k regex:_omni_fwd --launch-skip N --launch-count N`: compile the N "
                         "variants of the goal shape on T=32, then launch each once at the goal shape")
    return ap


GOAL_SHAPE = (GOAL["n"], GOAL["k"], GOAL["T"])
VARIANT_SHAPES = [GOAL_SHAPE, (512, 8, 16384), (512, 8, 128), (1024, 8, 4096), (128, 8, 4096),
                  (1024, 32, 4096)]


def plan(args):
    """(grid shapes, variant shapes or None): what a run with ``args`` measures."""
    goal = GOAL_SHAPE
    shapes = [goal] if args.quick else [goal] + [s for s in itertools.product(NS, KS, TS) if s != goal]
    vshapes = args.shapes or VARIANT_SHAPES
    vsh = None
    if args.lane_sweep or args.packed or args.quick or args.variants:
        vsh = vshapes[:1] if (args.variants_goal_only or (args.quick and not args.variants)) else vshapes
    return shapes, vsh


def grid_row_text(row, checks: Checks) -> str:
    """One line of the grid table; the ratios go through ``checks``."""
    n, k, T = row["n"], row["k"], row["T"]
    o_f, o_fb, f_fwd = row["triton_fwd_us"], row["triton_fwdbwd_us"], row["floor_fwd_us"]
    ours, prun = ("triton", n, k, T), ("pruned", n, k, T)
    r1 = lambda a, b, *keys: checks.ratio(a, b, *keys, spec=".1f", suffix="x")  # noqa: E731
    bwd = checks.ratio(row["triton_bwd_us"], o_f, ours)
    return (f"{n:>5} {k:>3} {T:>6} | {fmt(row['naive_fwd_us']):>10} {fmt(row['pruned_fwd_us']):>10} "
            f"{fmt(o_f):>9} {fmt(f_fwd):>6} {r1(o_f, f_fwd, ours):>6} {r1(row['naive_fwd_us'], o_f, ours):>8} "
            f"{r1(row['pruned_fwd_us'], o_f, ours, prun):>8} | {fmt(row['naive_fwdbwd_us']):>10} "
            f"{fmt(row['pruned_fwdbwd_us']):>10} {fmt(o_fb):>9} {fmt(row['triton_bwd_us']):>9} {bwd:>7}")


def goal_lines(g, checks: Checks, steady=None) -> List[str]:
    """The GOALS block at the goal shape; ``steady`` = (forward us, yardstick us or None,
    empty kernel us) in steady state. Verdicts are refused when ours failed its check."""
    n, k, T = GOAL_SHAPE
    ours = ("triton", n, k, T)
    sp = None if g["naive_fwd_us"] is None else g["naive_fwd_us"] / g["triton_fwd_us"]
    fl = g["triton_fwd_us"] / g["floor_fwd_us"]
    br = None if g["triton_bwd_us"] is None else g["triton_bwd_us"] / g["triton_fwd_us"]
    refused = checks.refusal(ours)
    floor = g["floor_fwd_us"]

    def verdict(passed: bool) -> str:
        return "(not judged)" if refused else ("PASS" if passed else "FAIL")

    lines = [f"\nGOALS at n={n}, k={k}, T={T} (bf16):",
             f"  forward vs naive torch: {refused or ('-' if sp is None else f'{sp:.0f}x')} (goal >= 100x) "
             f"{verdict(sp is not None and sp >= 100)}",
             f"  forward vs HBM floor {g['floor_fwd_us']:.2f} us, one kernel per graph + L2 flush "
             f"(includes a replay's fixed cost): {g['triton_fwd_us']:.2f} us = {refused or f'{fl:.2f}x'} "
             f"(goal <= 2x) {verdict(fl <= 2)}",
             f"  backward / forward: {refused or ('-' if br is None else f'{br:.2f}')} (goal <= 1.5) "
             f"{verdict(br is not None and br <= 1.5)}"]
    if steady is not None:
        ss, ys, empty = steady
        lines.append(f"  forward, steady state (>= 96 calls per graph, rotating inputs > 2x L2): "
                     f"{ss:.2f} us = {refused or f'{ss / floor:.2f}x'} the floor "
                     f"(goal <= 2x) {verdict(ss / floor <= 2)}")
        if ys is not None:
            lines.append(f"  memory yardstick (read x, y + write outputs, no selection), steady state: "
                         f"{ys:.2f} us = {ys / g['floor_fwd_us']:.2f}x the floor; forward / yardstick = "
                         f"{checks.ratio(ss, ys, ours)}; empty kernel in the same graph timing: {empty:.2f} us")
    return lines


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
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

    goal = GOAL_SHAPE
    shapes, vsh = plan(args)
    checks = Checks()
    if args.precompile and not (args.lane_sweep or args.packed or args.ncu_launch):
        precompile(needed_specs(shapes, args.autotune), args.precompile)

    l2 = getattr(props, "L2_cache_size", 50 * 1024 * 1024)
    if args.ncu_launch:
        n, k, T = goal
        cfgs = [(c, st) for _, c, st in _variant_configs(n, k, T, torch.device("cuda")) if is_full(st)]
        for TT in (32, T):
            x, y = make_inputs(TT, n)
            w = torch.empty(TT, k, dtype=x.dtype, device="cuda")
            ids = torch.empty(TT, k, dtype=torch.int64, device="cuda")
            for c, st in cfgs:
                _launch_variant(c, st, k)(x, y, w, ids)
            torch.cuda.synchronize()
        log(f"ncu launches: {[_short(c) + (' packed' if st > 2 else '') for c, st in cfgs]}")
        return 0
    variants = []
    if vsh is not None and args.precompile:
        dev = torch.device("cuda")
        precompile([("fwd", n, k, c) for n, k, T in vsh for _, c, st in _variant_configs(n, k, T, dev)
                    if st == 2], args.precompile)
    if args.lane_sweep or args.packed:
        variants_table(log, vsh, l2, flushed=False, checks=checks, packed_only=args.packed)
        log(checks.summary())
        return checks.exit_code()
    if vsh is not None:  # first: this table decides the default forward variant
        variants = variants_table(log, vsh, l2, checks=checks)

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
                t, how = ((None, "off") if impl not in args.impls
                          else bench_impl(impl, n, k, T, mode == "fwdbwd", checks))
                row[f"{impl}_{mode}_us"] = None if t is None else t * 1e3
                row[f"{impl}_{mode}_how"] = how
            row[f"{impl}_check"] = checks.verdicts.get((impl, n, k, T), "not checked") or "ok"
        f_fwd, f_bwd = hbm_floor_us(T, n, k)
        row["floor_fwd_us"], row["floor_bwd_us"] = f_fwd, f_bwd
        o_f, o_fb = row["triton_fwd_us"], row["triton_fwdbwd_us"]
        row["triton_bwd_us"] = None if o_f is None or o_fb is None else max(o_fb - o_f, 0.0)
        results.append(row)
        log(grid_row_text(row, checks))

    detail = {(512, 8, 4096), (1024, 8, 1 << 30), (64, 8, 4096), (512, 32, 4096), (1024, 8, 512)}
    sweeps = tuning_report(log, detail)

    g = next((r for r in results if (r["n"], r["k"], r["T"]) == goal), None)
    if g is not None and g["triton_fwd_us"] is not None:
        try:
            ss = steady_state_fwd_us("triton", goal[0], goal[1], goal[2], l2)
            yd = yardsticks(lambda m: None, goal[2], goal[0], goal[1], l2, flushed=False)
            steady = (ss, yd.get("yard_steady"), yd.get("empty_steady", 0))
        except Exception as exc:  # pragma: no cover - reported, never hides the table above
            log(f"  steady-state forward timing failed: {type(exc).__name__}: {exc}")
            steady = None
        for line in goal_lines(g, checks, steady):
            log(line)
        try:
            x, y = make_inputs(goal[2], goal[0])
            nk, names = count_kernels(lambda: omni_router(x, y, goal[1], backend="triton"))
            log(f"  GPU activities per forward call: {nk} ({', '.join(sorted(set(names)))})"
                + ("" if nk == 1 else "  <- more than one: launch overhead to remove"))
        except Exception as exc:  # pragma: no cover - reported, never hides the table above
            log(f"  kernel count failed: {type(exc).__name__}: {exc}")
    log(checks.summary())
    with open(os.path.join(args.out, "bench_omni.json"), "w") as f:
        json.dump(dict(device=props.name, results=results, sweeps=sweeps, variants=variants,
                       checks=checks.to_json()), f, indent=1)
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
    if checks.exit_code():
        log("exit 1: a correctness check failed in this run; its speed-ups are not printed")
    return checks.exit_code()


if __name__ == "__main__":
    sys.exit(main())
