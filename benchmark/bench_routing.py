"""Routing latency: token choice vs expert choice, every method in one run, CUDA-graph replay.

Methods (same GPU, same bf16 logits, each captured in its own CUDA graph and replayed):
  torch_tc      standard token choice in torch (softmax -> topk -> renormalise), as SGLang's
                ``fused_topk_torch_native`` does it
  sglang_tc     SGLang's fused ``topk_softmax`` JIT kernel: imported from SGLang when installed,
                else compiled from the sources staged in ``.sgl_yardstick/`` (``--sglang-dir``;
                stage them with ``python benchmark/sglang_yardstick.py --stage`` where SGLang
                is installed); the fused-kernel yardstick of the goal check when present
  fused_tc      our fused token-choice kernel (CUDA, one launch, same scoring code as the EC
                kernels): the fused-kernel yardstick when SGLang's is unavailable (its ratio is
                printed either way)
  ec_dense      the seeds' dense expert-choice algorithm exactly as the seeds write it, in plain
                torch (``seeds_dense_expert_choice`` below): the baseline of the ">= 10x" goal
  ec_ref        our sort-based reference (``reference.py``; exact contract, slower than the
                seeds' algorithm, so not the goal's baseline)
  ec_triton     our expert-choice Triton kernels
  ec_cuda       our expert-choice CUDA kernels (path chosen by shape, ``cuda.choose_path``)
  ec_cuda_one_launch / ec_cuda_three_launch / ec_cuda_stream
                the same with the path forced (``--no-paths`` to skip): the columns that
                decide ``choose_path``'s thresholds (stream: no key matrix, ec_stream.cu)

Timing: 20 back-to-back calls (5 at T > 8192) are captured in one CUDA graph, as a model's
layers sit in one decode graph; the graph is replayed in a timed loop and the median over 5
loops of (time / calls) is reported, so graph-launch overhead is amortised and each number is
the call's in-graph device cost including the gaps between its kernels. Inputs stay the same
buffer across calls (at T=32768, E=256 the 16 MB of bf16 logits fit in the 50 MB L2).

Correctness in the same run: before timing a point, every method's output is compared with
our reference (expert choice: ids equal, weights within 1e-6; token choice: ids equal up to
exact ties, weights within 1e-5). A ratio or goal involving a method that failed prints
"n/a (correctness check failed: ...)" instead of a number, and the script exits with status 1.
``ec_dense`` is not checked: it is the baseline, defined by its own code (its fallback may
repeat an expert within a token, which our contract forbids).

Prints a table (microseconds per call) with ratios,
checks the goals, and writes bench_routing.{json,md} and bench_routing.png to --out.

    python benchmark/bench_routing.py --out out/ [--quick] [--sglang-dir .sgl_yardstick]
    python benchmark/bench_routing.py --t-values 32768,8192 --e-values 64,128,256,384 --k-values 8
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from harness import Checks, md_table, time_graph, torch_token_choice  # noqa: E402

from sglang_moe_routing.expert_choice import RoutingSpec  # noqa: E402
from sglang_moe_routing.expert_choice.reference import (  # noqa: E402
    expert_choice_topk_reference,
    token_choice_topk_reference,
)

T_VALUES = [1, 32, 128, 1024, 8192, 32768]
E_VALUES = [8, 64, 128, 256, 384]
K_VALUES = [2, 8]
CF = 1.25
PATHS = ("one_launch", "three_launch", "stream")
# The ">= 10x vs the seeds' dense algorithm" goal as issue 12 states it: every T >= 8192,
# E in {64, 128, 256, 384}, k 8.
DENSE_GOAL = {"min_T": 8192, "E": (64, 128, 256, 384), "k": (8,)}


def seeds_dense_expert_choice(logits: torch.Tensor, k: int, cf: float = CF):
    """The seeds' algorithm exactly as written (a baseline, not our contract: its fallback may
    repeat an expert within a token): ``p = softmax(logits.float())``;
    ``C = min(T, max(1, ceil(T*k/E*cf)))``; ``es, et = topk(p.t(), C, dim=1)``; a zero
    ``[T, E]`` matrix scattered with ``es`` at ``et``; ``w, ids = topk(matrix, k, dim=1)``;
    where a weight is 0, the token's own ``topk(p, k)`` value and id instead; renormalised.
    Returns ``(w, ids)`` with ``ids`` int64 as ``topk`` gives them (no cast the seeds do not do)."""
    t, e = logits.shape
    p = torch.softmax(logits.float(), dim=-1)
    c = min(t, max(1, math.ceil(t * k / e * cf)))
    es, et = torch.topk(p.t(), c, dim=1)  # [E, C]
    matrix = torch.zeros(t, e, dtype=p.dtype, device=p.device)
    matrix.scatter_(0, et.t(), es.t())
    w, ids = torch.topk(matrix, k, dim=1)
    tw, tids = torch.topk(p, k, dim=1)
    empty = w == 0
    w = torch.where(empty, tw, w)
    ids = torch.where(empty, tids, ids)
    return w / w.sum(dim=-1, keepdim=True), ids


SGLANG_DIR = Path(os.environ.get("SGLANG_MOE_YARDSTICK_DIR", REPO / ".sgl_yardstick"))
_SGLANG_TC: dict = {}


def sglang_topk_softmax(sglang_dir=None):
    """SGLang's fused topk_softmax, else None (looked up once per directory).

    ``fn(topk_weights, topk_ids, gating_output, renormalize)``: from a full SGLang install
    when importable, else SGLang's JIT kernel compiled from the sources staged in
    ``sglang_dir`` (default ``.sgl_yardstick/``) by ``benchmark/sglang_yardstick.py``.
    """
    sglang_dir = Path(sglang_dir) if sglang_dir is not None else SGLANG_DIR
    if sglang_dir in _SGLANG_TC:
        return _SGLANG_TC[sglang_dir]
    fn = None
    for mod, name in (("sglang.kernels.ops.moe", "topk_softmax"), ("sgl_kernel", "topk_softmax")):
        try:
            m = __import__(mod, fromlist=[name])
            fn = getattr(m, name)
            print(f"# sglang_tc: {mod}.{name}")
            break
        except Exception:  # noqa: BLE001
            continue
    if fn is None and sglang_dir.is_dir():
        try:
            import sglang_yardstick

            fn = sglang_yardstick.load(sglang_dir)
        except Exception as exc:  # noqa: BLE001
            print(f"# sglang_tc: staged SGLang kernel failed to load: {exc}")
        if fn is not None:
            print(f"# sglang_tc: {fn.source}")
    if fn is None:
        print("# sglang_tc: SGLang's topk_softmax unavailable; yardstick = fused_tc (ours)")
    _SGLANG_TC[sglang_dir] = fn
    return fn


def build_methods(logits, k, skip, paths=PATHS, sglang_dir=None):
    """name -> fn() returning ``(weights, ids)``, one entry per column of the table."""
    from sglang_moe_routing.expert_choice import cuda as ec_cuda
    from sglang_moe_routing.expert_choice import triton_kernel as ec_triton

    # T' as a device tensor, as SGLang passes it under CUDA graphs.
    n_dev = torch.full((1,), logits.shape[0], dtype=torch.int32, device=logits.device)
    m = {}
    m["torch_tc"] = lambda: torch_token_choice(logits, k)
    sg = sglang_topk_softmax(sglang_dir)
    if sg is not None:
        tw = torch.empty(logits.shape[0], k, dtype=torch.float32, device=logits.device)
        ti = torch.empty(logits.shape[0], k, dtype=torch.int32, device=logits.device)
        m["sglang_tc"] = lambda: (sg(tw, ti, logits, True), tw, ti)[1:]
    m["fused_tc"] = lambda: ec_cuda.token_choice_topk_cuda(logits, RoutingSpec(k))
    m["ec_dense"] = lambda: seeds_dense_expert_choice(logits, k)
    if "ec_ref" not in skip:
        m["ec_ref"] = lambda: expert_choice_topk_reference(
            logits, RoutingSpec(k, CF), n_dev)
    m["ec_triton"] = lambda: ec_triton.expert_choice_topk_triton(
        logits, RoutingSpec(k, CF), n_dev)
    m["ec_cuda"] = lambda: ec_cuda.expert_choice_topk_cuda(
        logits, RoutingSpec(k, CF), n_dev)
    for path in paths:  # both CUDA paths forced (identical results)
        m[f"ec_cuda_{path}"] = (lambda path=path: ec_cuda.expert_choice_topk_cuda(
            logits, RoutingSpec(k, CF), n_dev, path=path))
    return m


# Methods checked against the token-choice reference (ids up to exact ties); every other
# ``ec_*`` method except these is checked against the expert-choice reference, exactly.
TOKEN_CHOICE = ("torch_tc", "sglang_tc", "fused_tc")
UNCHECKED = ("ec_ref", "ec_dense")  # the reference itself; the seeds' baseline (own contract)


def check_methods(checks: Checks, methods: dict, logits, k: int, point: tuple) -> dict:
    """Run each method once on ``logits`` and record its verdict against the reference under
    ``(name, *point)``. Returns the methods that ran (one raising here, e.g. a shape it does not
    support, is dropped from the point with a message, not counted as a wrong answer)."""
    ref = tc_ref = probs = None
    kept = {}
    for name, fn in methods.items():
        try:
            w, ids = fn()
        except Exception as exc:  # noqa: BLE001
            print(f"  {name} T={point[0]} E={point[1]} k={k} failed: {exc}")
            continue
        kept[name] = fn
        if name in UNCHECKED:
            continue
        if name in TOKEN_CHOICE:
            if tc_ref is None:
                tc_ref = token_choice_topk_reference(logits, RoutingSpec(k))
                probs = torch.softmax(logits.float(), dim=-1)
            checks.record((name, *point), harness.compare_token_choice(w, ids, probs, *tc_ref))
        else:
            if ref is None:
                ref = expert_choice_topk_reference(logits, RoutingSpec(k, CF))
            checks.record((name, *point), harness.compare_routing(w, ids, *ref, atol=1e-6))
    return kept


def profile_kernels(points, out_dir: Path):
    """Per-kernel device time of the CUDA EC path (torch.profiler, eager, 20 calls)."""
    from torch.profiler import ProfilerActivity, profile

    from sglang_moe_routing.expert_choice import cuda as ec_cuda

    lines = []
    for T, E, k in points:
        logits = torch.randn(T, E, device="cuda").to(torch.bfloat16)
        for _ in range(3):
            ec_cuda.expert_choice_topk_cuda(logits, RoutingSpec(k, CF))
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                ec_cuda.expert_choice_topk_cuda(logits, RoutingSpec(k, CF))
            torch.cuda.synchronize()
        for evt in prof.key_averages():
            if evt.device_type is not None and "ec_" in evt.key:
                dev_us = getattr(evt, "device_time", None) or getattr(evt, "cuda_time", 0.0)
                lines.append(f"T={T} E={E} k={k} {evt.key[:60]:60s} {dev_us:8.2f} us")
    text = "\n".join(lines)
    print("\n# per-kernel device time (eager, torch.profiler)\n" + text)
    (out_dir / "bench_kernels.txt").write_text(text + "\n")


PLOT_COLORS = {"torch_tc": "tab:blue", "sglang_tc": "tab:cyan", "fused_tc": "tab:green",
               "ec_dense": "tab:brown", "ec_ref": "tab:purple", "ec_triton": "tab:orange",
               "ec_cuda": "tab:red"}


def plot(results, out_png: Path, device: str = "GPU"):
    methods = [m for m in PLOT_COLORS if any(m in r["us"] for r in results)]
    panels = []
    es = sorted({r["E"] for r in results})
    for e in es:
        lines = []
        for m in methods:
            for k, style in ((8, "o-"), (2, "o:")):
                pts = sorted((r["T"], r["us"][m]) for r in results
                             if r["E"] == e and r["k"] == k and m in r["us"])
                if pts:
                    lines.append((f"{m} k={k}" if e == es[0] else None, [p[0] for p in pts],
                                  [p[1] for p in pts], style, PLOT_COLORS[m]))
        panels.append({"title": f"E={e}", "xlabel": "tokens T", "lines": lines})
    harness.line_panels(panels, out_png, ylabel="latency per call (us, CUDA graph replay)",
                        suptitle=f"Routing latency on {device} (bf16 logits; solid k=8, dotted k=2)")


def build_parser():
    ap = harness.base_parser(__doc__)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--no-paths", action="store_true",
                    help="do not time the two CUDA paths forced (only the shape-chosen one)")
    ap.add_argument("--sglang-dir", default=str(SGLANG_DIR),
                    help="staged SGLang topk_softmax sources (sglang_yardstick.py --stage), used "
                         "for sglang_tc when SGLang is not installed (default %(default)s)")
    ap.add_argument("--plot-only", metavar="JSON", help="redraw the PNG from a results file")
    ints = lambda flag: (lambda v: harness.int_list(v, flag))  # noqa: E731
    ap.add_argument("--t-values", type=ints("--t-values"), default=None,
                    help="T values, measured in the order given (default: the grid's)")
    ap.add_argument("--e-values", type=ints("--e-values"), default=None, help="E values (default: the grid's)")
    ap.add_argument("--k-values", type=ints("--k-values"), default=None,
                    help=f"k values (default: {','.join(map(str, K_VALUES))})")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="start no new point after this many seconds; the tables cover the points measured")
    ap.add_argument("--paths", default=None,
                    help="comma-separated CUDA paths to time forced (default: %s)" % ",".join(PATHS))
    ap.add_argument("--skip", default="", help="comma-separated methods not to time, e.g. ec_ref,ec_triton")
    return ap


def grid(quick: bool, t_values=None, e_values=None):
    """(T values, E values): the full grid, or with --quick T <= 8192 and E in 64, 256;
    explicit values (``--t-values`` / ``--e-values``) replace either list."""
    return (t_values or [t for t in T_VALUES if not quick or t <= 8192],
            e_values or [e for e in E_VALUES if not quick or e in (64, 256)])


def ec_runs_from(E: int, k: int) -> int:
    """The fewest tokens a batch needs for the plugin to route it with expert choice under the
    default ``--expert-choice-min-tokens auto`` (below it, token choice runs): issue 12's 2x goal
    counts only the points where expert choice actually runs."""
    from sglang_moe_routing.integration.expert_choice_flags import ExpertChoiceConfig

    return ExpertChoiceConfig().min_tokens_for(E, k)


def in_dense_goal(T: int, E: int, k: int) -> bool:
    return T >= DENSE_GOAL["min_T"] and E in DENSE_GOAL["E"] and k in DENSE_GOAL["k"]


def tables(results, checks: Checks, paths=PATHS):
    """(markdown text, goal summary) from the measured rows; every ratio and goal goes through
    ``checks`` (refused where a party failed its correctness check)."""
    nan = float("nan")
    have_sg = any("sglang_tc" in r["us"] for r in results)
    yard_name = "sglang_tc" if have_sg else "fused_tc"
    yard_label = "SGLang TC" if have_sg else "fused TC"
    print(f"# fused-TC yardstick of the goal check: {'sglang_tc' if have_sg else 'fused_tc (ours)'}")

    header = ["T", "E", "k", "torch TC", "SGLang TC", "fused TC", "EC dense (seeds)", "EC ref.py",
              "EC Triton", "EC CUDA", "CUDA/torchTC", "CUDA/sglangTC", "CUDA/fusedTC",
              "fusedTC/sglangTC", "dense/CUDA", "ref/CUDA", "Triton/torchTC", "ref/Triton"]
    rows = []
    goals = {"no_slower_than_torch_tc": [], "10x_vs_seeds_dense_T>=8192_E64-384_k8": [],
             "T128_E64_k8_under_8us": [], "within_1.2x_fused_tc": [],
             # issue 12: where expert choice runs (T >= the default min-tokens, ec_runs_from)
             # and at the largest batch
             "within_2x_fused_tc_32<=T<=1024": [], "within_3x_fused_tc_T=32768": []}
    if have_sg:
        goals["within_1.2x_fused_tc_ours"] = []  # informational: our kernel as yardstick
    for r in results:
        u = r["us"]
        pt = (r["T"], r["E"], r["k"])
        g = lambda n: u.get(n, nan)  # noqa: E731
        key = lambda n: (n, *pt)  # noqa: E731
        c, tt, ft, ref, tri = g("ec_cuda"), g("torch_tc"), g("fused_tc"), g("ec_ref"), g("ec_triton")
        st, dense = g("sglang_tc"), g("ec_dense")
        ratio = checks.ratio
        rows.append([*pt] + [harness.fmt(v, ".1f") for v in (tt, st, ft, dense, ref, tri, c)] + [
            ratio(c, tt, key("ec_cuda"), key("torch_tc")),
            ratio(c, st, key("ec_cuda"), key("sglang_tc")),
            ratio(c, ft, key("ec_cuda"), key("fused_tc")),
            ratio(ft, st, key("fused_tc"), key("sglang_tc")),
            ratio(dense, c, key("ec_cuda"), spec=".1f"),
            ratio(ref, c, key("ec_cuda"), spec=".1f"),
            ratio(tri, tt, key("ec_triton"), key("torch_tc")),
            ratio(ref, tri, key("ec_triton"), spec=".1f"),
        ])
        ok = checks.ok(key("ec_cuda"))
        goals["no_slower_than_torch_tc"].append(
            (*pt, ok and checks.ok(key("torch_tc")) and c <= tt))
        if in_dense_goal(*pt):
            goals["10x_vs_seeds_dense_T>=8192_E64-384_k8"].append((*pt, ok and dense >= 10 * c))
        if pt == (128, 64, 8):
            goals["T128_E64_k8_under_8us"].append((*pt, ok and c < 8.0))
        y = u.get(yard_name, nan)
        goals["within_1.2x_fused_tc"].append(
            (*pt, ok and checks.ok(key(yard_name)) and c <= 1.2 * y))
        fused_ok = ok and checks.ok(key(yard_name))
        if 32 <= pt[0] <= 1024 and pt[0] >= ec_runs_from(pt[1], pt[2]):
            goals["within_2x_fused_tc_32<=T<=1024"].append((*pt, fused_ok and c <= 2 * y))
        if pt[0] == 32768:
            goals["within_3x_fused_tc_T=32768"].append((*pt, fused_ok and c <= 3 * y))
        if have_sg:
            goals["within_1.2x_fused_tc_ours"].append(
                (*pt, ok and checks.ok(key("fused_tc")) and c <= 1.2 * ft))
    table = md_table(header, rows)
    print("\n" + table)

    # Path columns: which CUDA path should run at each point (cuda.choose_path).
    vnames = ["ec_cuda"] + [f"ec_cuda_{p}" for p in paths]
    vheader = ["T", "E", "k", yard_label] + vnames + ["best", f"best/{yard_label.replace(' ', '')}"]
    vheader += ["best/fusedTC"] if have_sg else []
    vrows = []
    vgoals = {n: [0, 0, 0] for n in vnames}  # (within 1.2x yardstick, <= default, points)
    for r in results:
        u = r["us"]
        pt = (r["T"], r["E"], r["k"])
        y, ft = u.get(yard_name, nan), u.get("fused_tc", nan)
        have = {n: u[n] for n in vnames if n in u}
        if not have:
            continue
        best = min(have, key=have.get)
        for n, v in have.items():
            vgoals[n][0] += checks.ok((n, *pt)) and v <= 1.2 * y
            vgoals[n][1] += checks.ok((n, *pt)) and v <= u.get("ec_cuda", float("inf")) * 1.02
            vgoals[n][2] += 1
        vrows.append([*pt, harness.fmt(y, ".1f")]
                     + [harness.fmt(u[n], ".1f") if n in u else "-" for n in vnames]
                     + [best.replace("ec_cuda_", "") if best != "ec_cuda" else "default",
                        checks.ratio(have[best], y, (best, *pt), (yard_name, *pt))]
                     + ([checks.ratio(have[best], ft, (best, *pt), ("fused_tc", *pt))]
                        if have_sg else []))
    vtable = md_table(vheader, vrows)
    print("\n# CUDA paths (us; default = cuda.choose_path by shape)\n" + vtable)
    for n, (w12, le, npts) in vgoals.items():
        print(f"{n}: within 1.2x {yard_label} at {w12}/{npts}; no slower than default (+2%) at {le}/{npts}")

    print("\n# goals (EC CUDA kernel; a point whose check failed counts as missed)")
    summary = {}
    for name, pts in goals.items():
        ok = sum(1 for *_, v in pts if v)
        fails = [f"T={t},E={e},k={k}" + (" (correctness check failed)" if not checks.ok(("ec_cuda", t, e, k)) else "")
                 for t, e, k, v in pts if not v]
        summary[name] = {"met": ok, "of": len(pts), "missed": fails}
        note = ""
        if name.startswith("within_") and not name.endswith("_ours"):
            summary[name]["yardstick"] = yard_name
            note = f" [yardstick: {yard_name}]"
        elif name == "within_1.2x_fused_tc_ours":
            summary[name]["yardstick"] = "fused_tc"
            note = " [informational: our fused TC as yardstick]"
        elif name.startswith("10x_vs_seeds_dense"):
            summary[name]["baseline"] = "ec_dense (seeds_dense_expert_choice)"
            note = " [baseline: ec_dense, the seeds' algorithm]"
        print(f"{name}{note}: {ok}/{len(pts)} met"
              + (f"; missed at {', '.join(fails[:12])}" if fails else ""))
    return table + "\n\n" + vtable, summary


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        data = json.loads(Path(args.plot_only).read_text())
        plot(data["results"], out_dir / "bench_routing.png", data.get("device", "GPU"))
        return 0
    if not torch.cuda.is_available():
        print("bench_routing.py needs a CUDA GPU (--plot-only works without one)")
        return 2
    torch.manual_seed(0)
    dev = torch.cuda.get_device_name()
    print(f"# {harness.device_line()}")
    paths = () if args.no_paths else (tuple(args.paths.split(",")) if args.paths else PATHS)
    skip = set(filter(None, args.skip.split(",")))
    t_values, e_values = grid(args.quick, args.t_values, args.e_values)
    results = []
    checks = Checks()
    t_start = time.time()
    skipped = 0
    for T in t_values:
        for E in e_values:
            for k in args.k_values or K_VALUES:
                if args.max_seconds is not None and time.time() - t_start > args.max_seconds:
                    skipped += 1
                    continue
                logits = torch.randn(T, E, device="cuda").to(torch.bfloat16)
                row = {"T": T, "E": E, "k": k, "us": {}}
                inner = 20 if T <= 8192 else 5
                methods = build_methods(logits, k, skip=skip, paths=paths,
                                        sglang_dir=args.sglang_dir)
                methods = {n: f for n, f in methods.items() if n not in skip}
                methods = check_methods(checks, methods, logits, k, (T, E, k))
                for name, fn in methods.items():
                    try:
                        row["us"][name] = time_graph(fn, inner=inner)
                    except Exception as exc:  # noqa: BLE001
                        print(f"  {name} T={T} E={E} k={k} failed: {exc}")
                results.append(row)
                us = row["us"]
                bad = [n for n in us if not checks.ok((n, T, E, k))]
                print(f"T={T:6d} E={E:4d} k={k}: " + "  ".join(f"{n}={v:8.2f}" for n, v in us.items())
                      + (f"  CHECK FAILED: {', '.join(bad)}" if bad else ""), flush=True)
    print(f"# measured in {time.time() - t_start:.0f} s"
          + (f"; {skipped} points not measured (--max-seconds {args.max_seconds:g})" if skipped else ""))
    print(checks.summary())

    table, summary = tables(results, checks, paths)
    (out_dir / "bench_routing.md").write_text(f"device: {dev}\n\n{table}\n")
    (out_dir / "bench_routing.json").write_text(json.dumps(
        {"device": dev, "torch": torch.__version__, "results": results, "goals": summary,
         "checks": checks.to_json()}, indent=1))
    try:
        plot(results, out_dir / "bench_routing.png", dev)
    except Exception as exc:  # noqa: BLE001
        print(f"plot failed: {exc}")
    if not args.no_profile:
        profile_kernels([(128, 64, 8), (8192, 256, 8), (32768, 256, 8)], out_dir)
    if checks.exit_code():
        print(checks.summary())
        print("# exit 1: a correctness check failed in this run; its speed-ups are not printed")
    return checks.exit_code()


if __name__ == "__main__":
    sys.exit(main())
