"""What every benchmark here shares: GPU timing, the correctness gate on speed-ups, tables, plots.

Benchmarks import this module (``sys.path`` holds ``benchmark/`` when one runs as a script;
tests add it), never each other, so there is no import circle between benchmarks.

Timing (CUDA; torch imported lazily so the CPU parts work without it being useful):

* ``time_graph(fn, inner)``: ``inner`` back-to-back calls captured in one CUDA graph, the
  graph replayed in a timed loop, median over ``repeats`` loops of time / calls (us). As a
  model's layers sit in one decode graph: launch overhead amortised, inputs stay in L2.
* ``graphed(fn)`` + ``time_flushed_ms(run)``: one call per graph, L2 flushed (a 256 MB write)
  before every replay, median of the replays (ms), as ``triton.testing`` times a kernel.
* ``time_graph_rotating(launch, input_sets, ...)``: per call inside one graph that cycles
  through input sets larger than the L2 (every call reads HBM) (us).
* ``queued_event_ms(fn)``: event time of ``fn`` queued behind a GPU sleep, so the events time
  the device and not the host's launches (ms).
* ``median_wall_ms(fn)``: host wall-clock median after a warm-up (CPU code).

The correctness gate (``Checks``): a benchmark records, per method and point, whether the
output matched the reference in the same run; ``Checks.ratio`` then prints a speed-up only
when every party passed, else ``n/a (correctness check failed: <who>)``, and
``Checks.exit_code()`` is non-zero when any check failed, so a wrong kernel never reads as a
fast one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable, Dict, Hashable, Iterable, List, Optional, Sequence, Tuple

NAN = float("nan")

# ----------------------------------------------------------------------------- timing (GPU)

_FLUSH = None
L2_FLUSH_BYTES = 256 * 1024 * 1024  # larger than any current GPU's L2


def flush_l2() -> None:
    """Evict the L2 by writing a buffer larger than it."""
    global _FLUSH
    import torch

    if _FLUSH is None:
        _FLUSH = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
    _FLUSH.zero_()


def warm_up_on_side_stream(fn: Callable[[], object], calls: int) -> None:
    """Run ``fn`` ``calls`` times on a side stream, as CUDA-graph capture wants (lazy
    initialisation and allocator pools done outside the capture), then synchronise."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(calls):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()


def time_graph(fn: Callable[[], object], inner: int = 20, min_ms: float = 10.0,
               repeats: int = 5) -> float:
    """Median device microseconds per call of ``fn``.

    ``inner`` back-to-back calls are captured in one CUDA graph (as a model's layers sit in
    one decode graph), so the graph-launch overhead is amortised and the number is the
    call's in-graph cost, launch gaps between its kernels included.
    """
    import torch

    warm_up_on_side_stream(fn, 3)
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


def graphed(fn: Callable[[], object]) -> Tuple[Callable[[], object], bool]:
    """Capture ``fn`` in a CUDA graph (after warm-up on a side stream); fall back to eager.
    Returns ``(run, captured)``."""
    import torch

    warm_up_on_side_stream(fn, 2)
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


def time_flushed_ms(fn: Callable[[], object], target_ms: float = 40.0, max_reps: int = 100) -> float:
    """Median GPU time of ``fn`` (events around each call, L2 flushed before each), in ms."""
    import torch

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
        flush_l2()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    ts = sorted(a.elapsed_time(b) for a, b in zip(starts, ends))
    return ts[len(ts) // 2]


def rotating_sets(set_bytes: int, l2_bytes: int, min_calls: int) -> Tuple[int, int]:
    """``(input sets, calls)`` for ``time_graph_rotating``: enough sets of ``set_bytes`` to
    exceed twice the L2 (at least 2), and a whole number of rounds of at least ``min_calls``."""
    sets = max(2, -(-2 * l2_bytes // max(1, set_bytes)))
    return sets, sets * max(1, -(-min_calls // sets))


def time_graph_rotating(launch: Callable, inputs: Sequence[tuple], calls: int,
                        reps: int = 15) -> float:
    """Microseconds per call of ``launch(*inputs[c % len(inputs)])`` inside one CUDA graph of
    ``calls`` calls (the replay's fixed cost paid once per graph); median of ``reps`` replays."""
    import torch

    def fn():
        with torch.no_grad():
            for c in range(calls):
                launch(*inputs[c % len(inputs)])

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
    return sorted(ts)[len(ts) // 2]


def gpu_sleep(ms: float = 50.0) -> None:
    """Keep the GPU busy for a while without the host waiting."""
    import torch

    if hasattr(torch.cuda, "_sleep"):
        torch.cuda._sleep(int(ms * 1e6))  # ~1 GHz cycles
    else:  # pragma: no cover
        x = torch.randn(4096, 4096, device="cuda")
        for _ in range(int(ms)):
            x = x @ x
            x /= x.norm()


def queued_event_ms(fn: Callable[[], object], reps: int = 5, busy_ms: float = 20.0) -> float:
    """Median event time of ``fn``'s launches, each rep queued behind a GPU sleep (host ahead),
    so the events time the device, not the host's launch work."""
    import torch

    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        gpu_sleep(busy_ms)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def count_kernels(fn: Callable[[], object]) -> Tuple[int, List[str]]:
    """GPU activities of one call of ``fn`` (after a warm-up call), from torch.profiler:
    ``(number of kernels + memsets + memcpys, their names)``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(names), names


def median_wall_ms(fn: Callable[[], object], repeats: int) -> float:
    """Host wall-clock median of ``repeats`` calls after one warm-up call, in ms."""
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2] * 1e3


def device_line() -> str:
    """``device: <GPU name or CPU>; torch <version>`` for a benchmark's first line."""
    import torch

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return f"device: {dev}; torch {torch.__version__}"


def resolve_device(name: str):
    """``--device``: ``auto`` = CUDA when available, else CPU; any other name as given."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ----------------------------------------------------------------------------- correctness gate


class Checks:
    """Correctness verdicts of one run, keyed by anything hashable (e.g. ``("ec_cuda", T, E, k)``).

    ``record(key, failure)``: ``failure`` is None when the output matched the reference,
    else a one-line reason. A key never recorded is a party that needs no check (the
    reference itself, a baseline defined by its own code). A key recorded twice keeps its
    first failure.
    """

    def __init__(self) -> None:
        self.verdicts: Dict[Hashable, Optional[str]] = {}

    def record(self, key: Hashable, failure: Optional[str]) -> Optional[str]:
        if self.verdicts.get(key) is None:
            self.verdicts[key] = failure
        return failure

    def run(self, key: Hashable, check: Callable[[], Optional[str]]) -> Optional[str]:
        """Record ``check()``'s verdict; an exception it raises is a failure."""
        try:
            failure = check()
        except Exception as exc:  # noqa: BLE001  (a crashing check is a failed one)
            failure = f"{type(exc).__name__}: {str(exc)[:200]}"
        return self.record(key, failure)

    def failed(self, *keys: Hashable) -> List[Hashable]:
        return [k for k in keys if self.verdicts.get(k) is not None]

    def ok(self, *keys: Hashable) -> bool:
        return not self.failed(*keys)

    def refusal(self, *keys: Hashable) -> Optional[str]:
        """``n/a (correctness check failed: ...)`` naming the failed parties (the first part
        of a tuple key: the method; the point is the table row's), or None."""
        bad = self.failed(*keys)
        if not bad:
            return None
        names = dict.fromkeys(str(k[0]) if isinstance(k, tuple) else str(k) for k in bad)
        return "n/a (correctness check failed: " + ", ".join(names) + ")"

    def ratio(self, num: Optional[float], den: Optional[float], *keys: Hashable,
              spec: str = ".2f", suffix: str = "") -> str:
        """``num / den`` formatted, unless a party in ``keys`` failed its check (then the
        refusal) or a value is missing / NaN / the denominator is 0 (then ``-``)."""
        refused = self.refusal(*keys)
        if refused:
            return refused
        if num is None or den is None or num != num or den != den or den == 0:
            return "-"
        return format(num / den, spec) + suffix

    @property
    def failures(self) -> Dict[Hashable, str]:
        return {k: v for k, v in self.verdicts.items() if v is not None}

    def summary(self) -> str:
        """One line per failed check (after a count of the checks run)."""
        fails = self.failures
        lines = [f"# correctness: {len(self.verdicts) - len(fails)}/{len(self.verdicts)} checks "
                 "passed against the reference in this run"]
        lines += [f"#   FAILED {_key_name(k)}: {v}" for k, v in fails.items()]
        return "\n".join(lines)

    def to_json(self) -> Dict[str, Optional[str]]:
        return {_key_name(k): v for k, v in self.verdicts.items()}

    def exit_code(self) -> int:
        """1 when any check failed (the run's speed-ups are not to be trusted), else 0."""
        return 1 if self.failures else 0


def _key_name(key: Hashable) -> str:
    if isinstance(key, tuple):
        return " ".join(str(p) for p in key)
    return str(key)


def compare_routing(w, ids, ref_w, ref_ids, atol: float = 1e-6) -> Optional[str]:
    """None when ``ids`` equal ``ref_ids`` exactly and ``w`` is within ``atol`` of ``ref_w``
    (NaN where the reference has NaN), else a one-line reason."""
    import torch

    if tuple(ids.shape) != tuple(ref_ids.shape) or tuple(w.shape) != tuple(ref_w.shape):
        return f"shape {tuple(ids.shape)}/{tuple(w.shape)}, want {tuple(ref_ids.shape)}"
    bad = (ids.long() != ref_ids.long()).any(dim=1).nonzero().flatten()
    if bad.numel():
        r = int(bad[0])
        return (f"{bad.numel()} of {ids.shape[0]} rows differ from the reference, e.g. row {r}: "
                f"{ids[r].tolist()} vs {ref_ids[r].tolist()}")
    w, ref_w = w.float(), ref_w.float()
    nan_diff = torch.isnan(w) != torch.isnan(ref_w)
    err = (w - ref_w).abs().nan_to_num(0.0)
    if bool(nan_diff.any()) or (err.numel() and float(err.max()) > atol):
        return f"weights differ from the reference: max |dw| {float(err.max()):.2e} > {atol:g}"
    return None


def compare_token_choice(w, ids, probs, ref_w, ref_ids, atol: float = 1e-5) -> Optional[str]:
    """Token-choice check allowing exact ties: an id differing from ``ref_ids`` must have the
    same probability (``probs`` [T, E]) as the reference's pick; no row repeats an expert;
    weights within ``atol``."""
    k = ids.shape[1]
    diff = ids.long() != ref_ids.long()
    tie = (probs.gather(1, ids.long()) - probs.gather(1, ref_ids.long())).abs() <= 1e-7
    untied = int((diff & ~tie).sum())
    srt = ids.long().sort(dim=1).values
    dup = int((srt[:, 1:] == srt[:, :-1]).any(dim=1).sum()) if k > 1 else 0
    werr = float((w.float() - ref_w.float()).abs().max()) if w.numel() else 0.0
    if untied or dup or werr > atol:
        return (f"{untied} untied ids differ from the reference, {dup} rows repeat an expert, "
                f"max |dw| {werr:.2e} (tolerance {atol:g})")
    return None


# ----------------------------------------------------------------------------- routing baselines


def torch_token_choice(logits, k: int):
    """Standard token choice in torch (softmax -> topk -> renormalise), as SGLang's
    ``fused_topk_torch_native`` does it: the torch yardstick of the routing benchmarks."""
    import torch

    w = torch.softmax(logits.float(), dim=-1)
    w, ids = torch.topk(w, k, dim=-1)
    w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return w, ids.to(torch.int32)


# ----------------------------------------------------------------------------- formatting


def fmt(v: Optional[float], spec: Optional[str] = None) -> str:
    """A number for a table: ``-`` when missing, ``n/a`` when NaN; ``spec`` or 1 decimal from
    10 up and 2 below."""
    if v is None:
        return "-"
    if v != v:
        return "n/a"
    if spec is not None:
        return format(v, spec)
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def spread(xs: Sequence[Optional[float]]) -> Optional[float]:
    """(max - min) / median of the values that are present (not None, not NaN); None with
    fewer than two."""
    xs = [x for x in xs if x is not None and x == x]
    if len(xs) < 2:
        return None
    return (max(xs) - min(xs)) / statistics.median(xs)


def pair_bounds(base: Sequence[float], cand: Sequence[float]
                ) -> Optional[Tuple[float, float]]:
    """``(worst, best)`` throughput ratios ``base time / candidate time`` over every pairing of
    one baseline run with one candidate run: worst = the fastest baseline run against the
    slowest candidate run, best = the other way round. A goal that the worst pairing meets
    (or the best pairing misses) holds for every pair of runs, whatever the noise floor
    estimate says. None with fewer than two runs on either side."""
    base = [x for x in base if x is not None and x == x]
    cand = [x for x in cand if x is not None and x == x]
    if len(base) < 2 or len(cand) < 2 or min(cand) <= 0:
        return None
    return min(base) / max(cand), max(base) / min(cand)


def pair_verdict(bounds: Optional[Tuple[float, float]], goal: float, name: str,
                 spec: str = ".2f") -> Optional[str]:
    """The verdict every pairing of runs agrees on (``bounds`` from :func:`pair_bounds`):
    "met (every run pair: ...)", "MISSED (every run pair: ...)", or None when the pairs
    disagree or there are too few runs."""
    if bounds is None:
        return None
    if bounds[0] >= goal:
        return f"met (every run pair: {name} >= {bounds[0]:{spec}})"
    if bounds[1] < goal:
        return f"MISSED (every run pair: {name} <= {bounds[1]:{spec}} < {goal})"
    return None


def md_table(header: Sequence[str], rows: Iterable[Sequence[object]],
             align: Optional[str] = None) -> str:
    """A markdown table; ``align`` is ``---`` (default) or ``---:`` for every column."""
    header = [str(h) for h in header]
    sep = align or "---"
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([sep] * len(header)) + "|"]
    for row in rows:
        row = [str(c) for c in row]
        if len(row) != len(header):
            raise ValueError(f"md_table: row has {len(row)} cells, header {len(header)}: {row}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def line_panels(panels: Sequence[dict], path, suptitle: str = "", ylabel: str = "",
                ncol_legend: int = 6, figsize_per_panel: Tuple[float, float] = (4.2, 4.0),
                sharey: bool = True, legend: str = "figure") -> None:
    """Log-log line plots, one panel per dict ``{"title", "xlabel", "lines": [(label, xs, ys,
    style, color)], "xbase": 2}`` (``style``: a matplotlib format string such as ``"o-"``); legend below the figure (``legend="figure"``) or in each
    panel (``"panel"``). Writes ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(figsize_per_panel[0] * n, figsize_per_panel[1]),
                             sharey=sharey)
    axes = list(axes) if n > 1 else [axes]
    for ax, p in zip(axes, panels):
        for label, xs, ys, style, color in p["lines"]:
            kw = {} if color is None else {"color": color}
            ax.plot(xs, ys, style, markersize=3, label=label, **kw)
        ax.set_xscale("log", base=p.get("xbase", 2))
        ax.set_yscale("log")
        ax.set_title(p.get("title", ""))
        ax.set_xlabel(p.get("xlabel", ""))
        ax.grid(True, which="both", alpha=0.3)
        if legend == "panel" and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[0].set_ylabel(ylabel)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    if legend == "figure":
        fig.legend(loc="lower center", ncol=ncol_legend, fontsize=7)
        fig.tight_layout(rect=(0, 0.1, 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- arguments


def base_parser(doc: Optional[str]) -> argparse.ArgumentParser:
    """The arguments every GPU benchmark takes: ``--out`` (default ``$OUT``, else
    ``benchmark/out``) and ``--quick``; the module docstring as the description."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or "benchmark/out",
                    help="output directory (default $OUT, else %(default)s)")
    ap.add_argument("--quick", action="store_true", help="fewer points")
    return ap


def int_list(text: str, flag: str = "value") -> List[int]:
    """``"1,8,32"`` -> ``[1, 8, 32]``; a clear error naming ``flag`` otherwise."""
    try:
        out = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError(f"{flag}: expected at least one integer, got {text!r}")
    return out


def choice_list(text: str, choices: Iterable[str], flag: str) -> List[str]:
    """``"a,b"`` -> ``["a", "b"]``, each one of ``choices``; a clear error naming ``flag``."""
    choices = list(choices)
    out = [x.strip() for x in str(text).split(",") if x.strip()]
    bad = [x for x in out if x not in choices]
    if bad or not out:
        raise argparse.ArgumentTypeError(
            f"{flag}: {', '.join(bad) or 'nothing'} not among {', '.join(choices)}")
    return out


def shape_list(text: str, width: int, flag: str = "--shapes") -> List[Tuple[int, ...]]:
    """``"512,8,4096;128,8,4096"`` -> ``[(512, 8, 4096), (128, 8, 4096)]``, each of ``width``
    positive integers; a clear error naming ``flag`` otherwise."""
    out = []
    for part in (p for p in str(text).split(";") if p.strip()):
        vals = int_list(part, flag)
        if len(vals) != width or min(vals) <= 0:
            raise argparse.ArgumentTypeError(
                f"{flag}: each shape is {width} positive integers separated by ',', got {part!r}")
        out.append(tuple(vals))
    return out
