"""Device time per forward pass inside SGLang's ``bench_one_batch`` (CUDA events, no host time).

one_batch times each prefill and decode step with ``time.perf_counter`` around a synchronised
call, so its numbers carry host jitter: the same decode graph can take half as long again in
one pass as in the next (docs/benchmarks.md, "Night runs"). Under CUDA-graph replay a routing
mode changes only device work (no Python hook runs in a replay), so the device time per step
is the precise measure of what it costs on the device. It is not a bound on the wall-clock
step: the host's share differs between processes (docs/benchmarks.md, "Late-night runs"), so
the host time of each forward call is recorded too (``host_ms``).

:func:`install` (in the one_batch child, before one_batch's CLI runs) wraps:

* ``latency_test_run_once``: one record per point (the first call is one_batch's warm-up);
* ``ModelRunner.forward``: CUDA events around each pass (``fwd_ms``: includes host gaps) and
  ``time.perf_counter`` around the call (``host_ms``: the host's work in it; a replay is
  asynchronous, so no device time is in it unless the call waits for the device) and
  ``time.thread_time`` (``cpu_ms``: the part the thread spent on a CPU; host time above it was
  spent descheduled, e.g. by other load on the machine, whose 1-minute load average each point
  records as ``loadavg``);
* the full and breakable CUDA-graph backends' ``replay``: events around each replay
  (``graph_ms``);
* inside those, each graph segment's ``replay`` (``torch.cuda.CUDAGraph`` and SGLang's
  ``DedupedCudaGraph``): ``seg_ms``, the sum over the segments. A decode step is one segment.
  A prefill of up to 8192 tokens replays a breakable graph: segments with attention run
  eagerly between them, so its ``graph_ms`` window also holds the host's launch gaps
  (the attention is the same in every routing mode and is left out of ``seg_ms``).

Each point becomes one JSON line in the file named by ``ONEBATCH_GPU_TIME_FILE``:
``{"point", "warmup", "batch_size", "prefill": [step], "decode": [step]}`` with
``step = {"graph_ms", "replays", "seg_ms", "segments", "fwd_ms", "host_ms", "cpu_ms"}``.
:func:`parse` turns the lines into per-batch-size medians of :func:`step_ms`, ``host_ms`` and
``cpu_ms`` (both phases) and the graph segments per step.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Dict, List, Optional, Sequence

ENV = "ONEBATCH_GPU_TIME_FILE"


def install(path: str) -> None:
    import torch
    import sglang.benchmark.one_batch as one_batch
    from sglang.srt.model_executor.model_runner import ModelRunner
    from sglang.srt.model_executor.runner_backend import (
        breakable_cuda_graph_backend as breakable, cuda_graph_dedup_mixin as dedup,
        full_cuda_graph_backend as full)

    state: Dict[str, Optional[dict]] = {"point": None, "pass": None, "replay": None}

    def event():
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def timed(orig, scope: str, key: str, opens: Optional[str] = None):
        """``orig`` timed into ``rec[key]`` while the record ``state[scope]`` is open (else
        untimed); during the call the record is also open as ``state[opens]``."""
        def replay(*args, **kwargs):
            rec = state[scope]
            if rec is None:
                return orig(*args, **kwargs)
            if opens:
                state[opens] = rec
            e0 = event()
            try:
                out = orig(*args, **kwargs)
            finally:
                if opens:
                    state[opens] = None
            rec[key].append((e0, event()))
            return out
        return replay

    # a backend's replay within a forward pass; its graph segments' replays within that
    for cls in (full.FullCudaGraphBackend, breakable.BreakableCudaGraphBackend):
        cls.replay = timed(cls.replay, "pass", "graph", opens="replay")
    for cls in (torch.cuda.CUDAGraph, dedup.DedupedCudaGraph):
        cls.replay = timed(cls.replay, "replay", "seg")

    orig_forward = ModelRunner.forward

    def forward(self, forward_batch, *args, **kwargs):
        point = state["point"]
        if point is None or state["pass"] is not None:
            return orig_forward(self, forward_batch, *args, **kwargs)
        rec = {"graph": [], "seg": [], "fwd": []}
        state["pass"] = rec
        t0, c0 = time.perf_counter(), time.thread_time()
        e0 = event()
        try:
            return orig_forward(self, forward_batch, *args, **kwargs)
        finally:
            rec["fwd"].append((e0, event()))
            rec["host_ms"] = (time.perf_counter() - t0) * 1e3
            rec["cpu_ms"] = (time.thread_time() - c0) * 1e3
            state["pass"] = None
            phase = "decode" if forward_batch.forward_mode.is_decode() else "prefill"
            point["steps"].append((phase, rec))

    ModelRunner.forward = forward

    orig_once = one_batch.latency_test_run_once
    count = [0]

    def run_once(run_name, model_runner, rank_print, reqs, batch_size, *args, **kwargs):
        point = {"steps": []}
        state["point"] = point
        try:
            return orig_once(run_name, model_runner, rank_print, reqs, batch_size, *args,
                             **kwargs)
        finally:
            state["point"] = None
            count[0] += 1
            try:  # the probes must never fail a run: one_batch's own numbers stand alone
                write_point(count[0] - 1, int(batch_size), point["steps"])
            except Exception as exc:  # noqa: BLE001
                print(f"ONEBATCH gpu_time: point {count[0] - 1} not recorded ({exc!r})",
                      flush=True)

    def write_point(index: int, batch_size: int, steps) -> None:
        torch.cuda.synchronize()
        line = {"point": index, "warmup": index == 0, "batch_size": batch_size,
                "prefill": [], "decode": []}
        for phase, rec in steps:
            line[phase].append({
                "graph_ms": sum(a.elapsed_time(b) for a, b in rec["graph"]),
                "replays": len(rec["graph"]),
                "seg_ms": sum(a.elapsed_time(b) for a, b in rec["seg"]),
                "segments": len(rec["seg"]),
                "fwd_ms": sum(a.elapsed_time(b) for a, b in rec["fwd"]),
                "host_ms": rec.get("host_ms"), "cpu_ms": rec.get("cpu_ms")})
        line["loadavg"] = os.getloadavg()[0]
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")

    one_batch.latency_test_run_once = run_once


def json_lines(text: str) -> List[dict]:
    """The JSON records of a JSONL text (blank lines skipped)."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def counted_passes(records: Sequence[dict], batch_sizes: Sequence[int],
                   passes: int) -> Dict[int, List[dict]]:
    """``{B: the records that count}``, in ``batch_sizes`` order: with ``passes`` >= 2 the
    passes after the first (one_batch warms up only the first batch size), else the first.
    A B with fewer than ``passes`` records is left out (the run did not finish it). Shared
    with ``one_batch_runner.parse_jsonl`` (one_batch's own result lines)."""
    recs: Dict[int, List[dict]] = {}
    for r in records:
        recs.setdefault(int(r["batch_size"]), []).append(r)
    return {b: (recs[b][1:passes] if passes >= 2 else recs[b][:1])
            for b in batch_sizes if len(recs.get(b, [])) >= passes}


def step_ms(step: dict) -> float:
    """A pass's device time: the sum of its graph segments where it replayed a graph (older
    records without segments: the replay window), else the eager forward's window (prefills
    above the captured sizes, device-bound)."""
    if step.get("segments"):
        return step["seg_ms"]
    return step["graph_ms"] if step["replays"] else step["fwd_ms"]


def step_segments(step: dict) -> Optional[int]:
    """A pass's CUDA-graph segment replays: 0 where no graph replayed; None for a record from
    before ``segments`` that replayed a graph."""
    if "segments" in step:
        return int(step["segments"])
    return None if step["replays"] else 0


def _max_segments(used: Sequence[dict], phase: str) -> Optional[int]:
    """The most segments of any ``phase`` step of the passes ``used`` (None where a step's
    count is unknown or there is no step)."""
    segs = [step_segments(s) for r in used for s in r[phase]]
    return None if not segs or None in segs else max(segs)


def parse(text: str, batch_sizes: Sequence[int], passes: int) -> Dict[int, dict]:
    """The child's lines -> ``{B: {"prefill_gpu", "decode_gpu", "prefill_host",
    "prefill_host_cpu", "decode_host", "decode_host_cpu", "prefill_segments",
    "decode_segments", "gpu_samples", "graph"}}`` (seconds, like one_batch's latencies): per
    pass the prefill's device time, host and on-CPU time (``host_ms``, ``cpu_ms``), each summed
    over its prefill steps, the median decode step and the median decode step's host and
    on-CPU time (host and on-CPU times None for records without them); the median over the
    passes after the first when ``passes`` >= 2 (as ``one_batch_runner.parse_jsonl``).
    ``<phase>_segments``: the most CUDA-graph segments any counted step of the phase replayed
    (0 where no graph replayed; None for records without segment counts). ``graph`` says
    whether every counted prefill / decode step replayed a CUDA graph. A B with fewer than
    ``passes`` points is left out."""
    out: Dict[int, dict] = {}
    records = [r for r in json_lines(text) if not r.get("warmup")]

    def median(xs):
        return statistics.median(xs) if xs else None

    def known(steps, key):
        return steps and all(s.get(key) is not None for s in steps)

    for b, used in counted_passes(records, batch_sizes, passes).items():
        pre = [sum(step_ms(s) for s in r["prefill"]) * 1e-3 for r in used if r["prefill"]]
        dec = [statistics.median(step_ms(s) for s in r["decode"]) * 1e-3
               for r in used if r["decode"]]
        host, cpu = ([statistics.median(s[key] for s in r["decode"]) * 1e-3
                      for r in used if known(r["decode"], key)]
                     for key in ("host_ms", "cpu_ms"))
        pre_host, pre_cpu = ([sum(s[key] for s in r["prefill"]) * 1e-3
                              for r in used if known(r["prefill"], key)]
                             for key in ("host_ms", "cpu_ms"))
        out[b] = {"prefill_gpu": median(pre), "decode_gpu": median(dec),
                  "prefill_host": median(pre_host), "prefill_host_cpu": median(pre_cpu),
                  "decode_host": median(host), "decode_host_cpu": median(cpu),
                  "prefill_segments": _max_segments(used, "prefill"),
                  "decode_segments": _max_segments(used, "decode"),
                  "gpu_samples": {"prefill": pre, "decode": dec},
                  "graph": {ph: all(s["replays"] for r in used for s in r[ph])
                            for ph in ("prefill", "decode")}}
    return out
