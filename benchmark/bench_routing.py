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

Prints a table (microseconds per call) with ratios,
checks the goals, and writes bench_routing.{json,md} and bench_routing.png to --out.

    python benchmark/bench_routing.py --out out/ [--quick] [--sglang-dir .sgl_yardstick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))

from sglang_moe_routing.expert_choice.reference import expert_choice_topk_reference  # noqa: E402

T_VALUES = [1, 32, 128, 1024, 8192, 32768]
E_VALUES = [8, 64, 128, 256]
K_VALUES = [2, 8]
CF = 1.25
PATHS = ("one_launch", "three_launch", "stream")


def seeds_dense_expert_choice(logits: torch.Tensor, k: int, cf: float = CF):
    """The seeds' algorithm as written (a baseline, not our contract: its fallback may repeat
    an expert within a token): ``p = softmax(logits)``; ``C = min(T, max(1, ceil(T*k/E*cf)))``;
    each expert's top-C tokens scattered into a zero ``[T, E]`` matrix; each token's top-k of
    that matrix, a zero weight replaced by the token's own top-k value and id; renormalised."""
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
    return w / w.sum(dim=-1, keepdim=True), ids.to(torch.int32)


def torch_token_choice(logits: torch.Tensor, k: int):
    w = torch.softmax(logits.float(), dim=-1)
    w, ids = torch.topk(w, k, dim=-1)
    w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return w, ids.to(torch.int32)


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
        sys.path.insert(0, str(Path(__file__).resolve().parent))
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


def time_graph(fn, inner: int = 20, min_ms: float = 10.0, repeats: int = 5) -> float:
    """Median device microseconds per call of ``fn``.

    ``inner`` back-to-back calls are captured in one CUDA graph (as a model's layers sit in
    one decode graph), so the graph-launch overhead is amortised and the number is the
    call's in-graph cost, launch gaps between its kernels included.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    stop.record()
    stop.synchronize()
    per = start.elapsed_time(stop)
    iters = max(3, min(500, int(min_ms / max(per, 1e-4))))
    samples = []
    for _ in range(repeats):
        start.record()
        for _ in range(iters):
            graph.replay()
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop) * 1000.0 / (iters * inner))
    del graph
    return statistics.median(samples)


def build_methods(logits, k, skip, paths=PATHS, sglang_dir=None):
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
        m["sglang_tc"] = lambda: sg(tw, ti, logits, True)
    m["fused_tc"] = lambda: ec_cuda.token_choice_topk_cuda(logits, k)
    m["ec_dense"] = lambda: seeds_dense_expert_choice(logits, k)
    if "ec_ref" not in skip:
        m["ec_ref"] = lambda: expert_choice_topk_reference(
            logits, k, CF, num_token_non_padded=n_dev)
    m["ec_triton"] = lambda: ec_triton.expert_choice_topk_triton(
        logits, k, CF, num_token_non_padded=n_dev)
    m["ec_cuda"] = lambda: ec_cuda.expert_choice_topk_cuda(
        logits, k, CF, num_token_non_padded=n_dev)
    for path in paths:  # both CUDA paths forced (identical results)
        m[f"ec_cuda_{path}"] = (lambda path=path: ec_cuda.expert_choice_topk_cuda(
            logits, k, CF, num_token_non_padded=n_dev, path=path))
    return m


def profile_kernels(points, out_dir: Path):
    """Per-kernel device time of the CUDA EC path (torch.profiler, eager, 20 calls)."""
    from torch.profiler import ProfilerActivity, profile

    from sglang_moe_routing.expert_choice import cuda as ec_cuda

    lines = []
    for T, E, k in points:
        logits = torch.randn(T, E, device="cuda").to(torch.bfloat16)
        for _ in range(3):
            ec_cuda.expert_choice_topk_cuda(logits, k, CF)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                ec_cuda.expert_choice_topk_cuda(logits, k, CF)
            torch.cuda.synchronize()
        for evt in prof.key_averages():
            if evt.device_type is not None and "ec_" in evt.key:
                dev_us = getattr(evt, "device_time", None) or getattr(evt, "cuda_time", 0.0)
                lines.append(f"T={T} E={E} k={k} {evt.key[:60]:60s} {dev_us:8.2f} us")
    text = "\n".join(lines)
    print("\n# per-kernel device time (eager, torch.profiler)\n" + text)
    (out_dir / "bench_kernels.txt").write_text(text + "\n")


def plot(results, out_png: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in ("torch_tc", "sglang_tc", "fused_tc", "ec_dense", "ec_ref", "ec_triton",
                           "ec_cuda")
               if any(m in r["us"] for r in results)]
    colors = {"torch_tc": "tab:blue", "sglang_tc": "tab:cyan", "fused_tc": "tab:green",
              "ec_dense": "tab:brown", "ec_ref": "tab:purple", "ec_triton": "tab:orange",
              "ec_cuda": "tab:red"}
    es = sorted({r["E"] for r in results})
    fig, axes = plt.subplots(1, len(es), figsize=(4.2 * len(es), 4), sharey=True)
    axes = axes if len(es) > 1 else [axes]
    for ax, e in zip(axes, es):
        for m in methods:
            for k, style in ((8, "-"), (2, ":")):
                pts = sorted((r["T"], r["us"][m]) for r in results
                             if r["E"] == e and r["k"] == k and m in r["us"])
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o",
                            markersize=3, color=colors.get(m),
                            label=f"{m} k={k}" if e == es[0] else None)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"E={e}")
        ax.set_xlabel("tokens T")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("latency per call (us, CUDA graph replay)")
    fig.suptitle("Routing latency on H100 (bf16 logits; solid k=8, dotted k=2)", fontsize=10)
    fig.legend(loc="lower center", ncol=6, fontsize=7)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(out_png, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmark/out")
    ap.add_argument("--quick", action="store_true", help="fewer points (T<=8192, E in 64, 256)")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--no-paths", action="store_true",
                    help="do not time the two CUDA paths forced (only the shape-chosen one)")
    ap.add_argument("--sglang-dir", default=str(SGLANG_DIR),
                    help="staged SGLang topk_softmax sources (sglang_yardstick.py --stage), used "
                         "for sglang_tc when SGLang is not installed (default %(default)s)")
    ap.add_argument("--plot-only", metavar="JSON", help="redraw the PNG from a results file")
    ap.add_argument("--t-values", help="comma-separated T values (default: the full grid)")
    ap.add_argument("--e-values", help="comma-separated E values (default: the full grid)")
    ap.add_argument("--k-values", help="comma-separated k values (default: 2,8)")
    ap.add_argument("--paths", help="comma-separated CUDA paths to time forced (default: all)")
    ap.add_argument("--skip", default="", help="comma-separated methods not to time, e.g. ec_ref,ec_triton")
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        plot(json.loads(Path(args.plot_only).read_text())["results"], out_dir / "bench_routing.png")
        return
    torch.manual_seed(0)
    dev = torch.cuda.get_device_name()
    print(f"# device: {dev}; torch {torch.__version__}")
    ints = lambda v: [int(x) for x in v.split(",")]  # noqa: E731
    paths = () if args.no_paths else (tuple(args.paths.split(",")) if args.paths else PATHS)
    t_values = ints(args.t_values) if args.t_values else [t for t in T_VALUES if not args.quick or t <= 8192]
    e_values = ints(args.e_values) if args.e_values else [e for e in E_VALUES if not args.quick or e in (64, 256)]
    k_values = ints(args.k_values) if args.k_values else K_VALUES
    skip = set(filter(None, args.skip.split(",")))
    results = []
    t_start = time.time()
    for T in t_values:
        for E in e_values:
            for k in k_values:
                logits = torch.randn(T, E, device="cuda").to(torch.bfloat16)
                row = {"T": T, "E": E, "k": k, "us": {}}
                inner = 20 if T <= 8192 else 5
                methods = build_methods(logits, k, skip=skip, paths=paths,
                                        sglang_dir=args.sglang_dir)
                for name, fn in methods.items():
                    if name in skip:
                        continue
                    try:
                        row["us"][name] = time_graph(fn, inner=inner)
                    except Exception as exc:  # noqa: BLE001
                        print(f"  {name} T={T} E={E} k={k} failed: {exc}")
                results.append(row)
                us = row["us"]
                print(f"T={T:6d} E={E:4d} k={k}: " + "  ".join(f"{n}={v:8.2f}" for n, v in us.items()),
                      flush=True)
    print(f"# measured in {time.time() - t_start:.0f} s")

    # Ratio table and goal checks. The fused token-choice yardstick of the 1.2x goal is
    # SGLang's topk_softmax (sglang_tc) where it was measured, else our fused_tc; the ratio
    # to fused_tc is printed either way.
    nan = float("nan")
    have_sg = any("sglang_tc" in r["us"] for r in results)
    yard_label = "SGLang TC" if have_sg else "fused TC"
    print(f"# fused-TC yardstick of the goal check: {'sglang_tc' if have_sg else 'fused_tc (ours)'}")

    def yard(u):
        return u.get("sglang_tc", u.get("fused_tc", nan))

    hdr = ("| T | E | k | torch TC | SGLang TC | fused TC | EC dense (seeds) | EC ref.py | EC Triton "
           "| EC CUDA | CUDA/torchTC | CUDA/sglangTC | CUDA/fusedTC | fusedTC/sglangTC | dense/CUDA "
           "| ref/CUDA | Triton/torchTC | ref/Triton |")
    lines = [hdr, "|" + "---|" * 18]
    goals = {"no_slower_than_torch_tc": [], "10x_vs_seeds_dense_T>=8192": [],
             "T128_E64_k8_under_8us": [], "within_1.2x_fused_tc": []}
    if have_sg:
        goals["within_1.2x_fused_tc_ours"] = []  # informational: our kernel as yardstick
    for r in results:
        u = r["us"]
        g = lambda n: u.get(n, nan)  # noqa: E731
        c, tt, ft, ref, tri = g("ec_cuda"), g("torch_tc"), g("fused_tc"), g("ec_ref"), g("ec_triton")
        st, dense = g("sglang_tc"), g("ec_dense")
        lines.append(
            f"| {r['T']} | {r['E']} | {r['k']} | {tt:.1f} | {st:.1f} | {ft:.1f} | {dense:.1f} | "
            f"{ref:.1f} | {tri:.1f} | {c:.1f} | {c / tt:.2f} | {c / st:.2f} | {c / ft:.2f} | "
            f"{ft / st:.2f} | {dense / c:.1f} | {ref / c:.1f} | {tri / tt:.2f} | {ref / tri:.1f} |"
        )
        goals["no_slower_than_torch_tc"].append((r["T"], r["E"], r["k"], c <= tt))
        if r["T"] >= 8192:
            goals["10x_vs_seeds_dense_T>=8192"].append((r["T"], r["E"], r["k"], dense >= 10 * c))
        if (r["T"], r["E"], r["k"]) == (128, 64, 8):
            goals["T128_E64_k8_under_8us"].append((128, 64, 8, c < 8.0))
        goals["within_1.2x_fused_tc"].append((r["T"], r["E"], r["k"], c <= 1.2 * yard(u)))
        if have_sg:
            goals["within_1.2x_fused_tc_ours"].append((r["T"], r["E"], r["k"], c <= 1.2 * ft))
    table = "\n".join(lines)
    print("\n" + table)

    # Path columns: which CUDA path should run at each point (cuda.choose_path).
    vnames = ["ec_cuda"] + [f"ec_cuda_{p}" for p in paths]
    vlines = [f"| T | E | k | {yard_label} | " + " | ".join(vnames) + f" | best | best/{yard_label.replace(' ', '')} |"
              + (" best/fusedTC |" if have_sg else ""),
              "|" + "---|" * (len(vnames) + 6 + have_sg)]
    vgoals = {n: [0, 0, 0] for n in vnames}  # (within 1.2x yardstick, <= default, points)
    for r in results:
        u = r["us"]
        y, ft = yard(u), u.get("fused_tc", nan)
        have = {n: u[n] for n in vnames if n in u}
        if not have:
            continue
        best = min(have, key=have.get)
        for n, v in have.items():
            vgoals[n][0] += v <= 1.2 * y
            vgoals[n][1] += v <= u.get("ec_cuda", float("inf")) * 1.02
            vgoals[n][2] += 1
        vlines.append(f"| {r['T']} | {r['E']} | {r['k']} | {y:.1f} | "
                      + " | ".join(f"{u[n]:.1f}" if n in u else "-" for n in vnames)
                      + f" | {best.replace('ec_cuda_', '') if best != 'ec_cuda' else 'default'}"
                      + f" | {have[best] / y:.2f} |" + (f" {have[best] / ft:.2f} |" if have_sg else ""))
    vtable = "\n".join(vlines)
    print("\n# CUDA paths (us; default = cuda.choose_path by shape)\n" + vtable)
    for n, (w12, le, npts) in vgoals.items():
        print(f"{n}: within 1.2x {yard_label} at {w12}/{npts}; no slower than default (+2%) at {le}/{npts}")
    table = table + "\n\n" + vtable
    print("\n# goals (EC CUDA kernel)")
    summary = {}
    for name, checks in goals.items():
        ok = sum(1 for *_, v in checks if v)
        fails = [f"T={t},E={e},k={k}" for t, e, k, v in checks if not v]
        summary[name] = {"met": ok, "of": len(checks), "missed": fails}
        note = ""
        if name == "within_1.2x_fused_tc":
            summary[name]["yardstick"] = "sglang_tc" if have_sg else "fused_tc"
            note = f" [yardstick: {summary[name]['yardstick']}]"
        elif name == "within_1.2x_fused_tc_ours":
            summary[name]["yardstick"] = "fused_tc"
            note = " [informational: our fused TC as yardstick]"
        print(f"{name}{note}: {ok}/{len(checks)} met"
              + (f"; missed at {', '.join(fails[:12])}" if fails else ""))
    (out_dir / "bench_routing.md").write_text(f"device: {dev}\n\n{table}\n")
    (out_dir / "bench_routing.json").write_text(json.dumps(
        {"device": dev, "torch": torch.__version__, "results": results, "goals": summary}, indent=1))
    try:
        plot(results, out_dir / "bench_routing.png")
    except Exception as exc:  # noqa: BLE001
        print(f"plot failed: {exc}")
    if not args.no_profile:
        profile_kernels([(128, 64, 8), (8192, 256, 8), (32768, 256, 8)], out_dir)


if __name__ == "__main__":
    main()
