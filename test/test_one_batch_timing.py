"""benchmark/one_batch_timing.py: the parsing of the device-time lines (warm-up dropped, first
pass discarded, graph replays preferred over the forward's events), and that its probes attach
to the names installed sglang 0.5.23 has (the events themselves need CUDA: the GPU run)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmark"
sys.path.insert(0, str(BENCH))

import one_batch_timing as obt  # noqa: E402


def _line(point, b, prefill, decode, warmup=False):
    return json.dumps({"point": point, "warmup": warmup, "batch_size": b,
                       "prefill": [prefill], "decode": decode})


def _step(graph_ms, fwd_ms, replays=1):
    """A record as older runs wrote it (no segment times)."""
    return {"graph_ms": graph_ms if replays else 0.0, "replays": replays, "fwd_ms": fwd_ms}


def test_step_ms_prefers_segments_then_the_replay_window_then_the_forward():
    assert obt.step_ms({"graph_ms": 2.0, "replays": 1, "seg_ms": 1.5, "segments": 5,
                        "fwd_ms": 3.0}) == 1.5
    assert obt.step_ms({"graph_ms": 2.0, "replays": 1, "seg_ms": 0.0, "segments": 0,
                        "fwd_ms": 3.0}) == 2.0
    assert obt.step_ms(_step(0, 3.0, replays=0)) == 3.0


def test_parse_drops_warmup_and_first_pass_and_prefers_graph_time():
    lines = [
        _line(0, 1, _step(99, 99), [_step(99, 99)] * 3, warmup=True),
        # pass 1 (discarded)
        _line(1, 1, _step(9, 10), [_step(7, 8)] * 3),
        _line(2, 32, _step(0, 20, replays=0), [_step(8, 9)] * 3),
        # pass 2
        _line(3, 1, _step(3, 4), [_step(1.0, 2.0), _step(1.2, 2.0), _step(5.0, 6.0)]),
        _line(4, 32, _step(0, 20, replays=0), [_step(2.0, 3.0)] * 3),
        # pass 3
        _line(5, 1, _step(3.2, 4), [_step(1.1, 2.0)] * 3),
        _line(6, 32, _step(0, 22, replays=0), [_step(2.2, 3.0)] * 3),
    ]
    got = obt.parse("\n".join(lines) + "\n", [1, 32], passes=3)
    assert got[1]["prefill_gpu"] == pytest.approx(3.1e-3)  # median of 3.0, 3.2 (graph time)
    assert got[1]["gpu_samples"]["decode"] == pytest.approx([1.2e-3, 1.1e-3])  # step medians
    assert got[1]["decode_gpu"] == pytest.approx(1.15e-3)
    assert got[32]["prefill_gpu"] == pytest.approx(21e-3)  # eager: the forward's events
    assert got[1]["graph"] == {"prefill": True, "decode": True}
    assert got[1]["decode_host"] is None  # records from before host_ms
    assert got[1]["prefill_host"] is None and got[1]["prefill_host_cpu"] is None
    # records from before segment counts: unknown where a graph replayed, 0 where none did
    assert got[1]["prefill_segments"] is None and got[1]["decode_segments"] is None
    assert got[32]["prefill_segments"] == 0
    assert got[32]["graph"] == {"prefill": False, "decode": True}
    # a batch size short of its passes is left out
    assert set(obt.parse("\n".join(lines[:6]) + "\n", [1, 32], passes=3)) == {1}


def test_parse_takes_the_median_host_time_of_the_decode_steps():
    def dec(host):
        return [dict(_step(1.0, 2.0), host_ms=h) for h in host]
    lines = [_line(0, 4, _step(9, 9), dec([9, 9]), warmup=True),
             _line(1, 4, _step(3, 4), dec([5.0, 5.0])),           # pass 1, discarded
             _line(2, 4, _step(3, 4), dec([0.4, 0.6, 0.5])),      # pass 2: 0.5
             _line(3, 4, _step(3, 4), dec([0.7, 0.7, 0.8]))]      # pass 3: 0.7
    got = obt.parse("\n".join(lines) + "\n", [4], passes=3)
    assert got[4]["decode_host"] == pytest.approx(0.6e-3)


def test_parse_sums_the_prefill_steps_host_time_and_counts_graph_segments():
    def step(host, cpu, segments, replays=1):
        return {"graph_ms": 1.0, "replays": replays, "seg_ms": 0.5 * segments,
                "segments": segments, "fwd_ms": 2.0, "host_ms": host, "cpu_ms": cpu}

    def line(point, prefill, decode, warmup=False):
        return json.dumps({"point": point, "warmup": warmup, "batch_size": 8,
                           "prefill": prefill, "decode": decode})
    lines = [line(0, [step(50, 50, 9)], [step(9, 9, 9)], warmup=True),
             line(1, [step(40, 40, 9)], [step(9, 9, 9)]),                # pass 1, discarded
             # pass 2: a prefill of two forward calls (2.0 + 0.8 ms), one eager
             line(2, [step(2.0, 1.2, 5), step(0.8, 0.6, 0, replays=0)],
                  [step(0.3, 0.2, 1), step(0.5, 0.3, 1), step(0.4, 0.25, 1)]),
             line(3, [step(3.0, 2.0, 6)], [step(0.6, 0.4, 1)] * 3),      # pass 3
             line(4, [step(2.5, 1.5, 5)], [step(0.8, 0.5, 1)] * 3)]      # pass 4
    got = obt.parse("\n".join(lines) + "\n", [8], passes=4)[8]
    assert got["prefill_host"] == pytest.approx(2.8e-3)      # median of 2.8, 3.0, 2.5
    assert got["prefill_host_cpu"] == pytest.approx(1.8e-3)  # median of 1.8, 2.0, 1.5
    assert got["decode_host"] == pytest.approx(0.6e-3)       # median of 0.4, 0.6, 0.8
    assert got["decode_host_cpu"] == pytest.approx(0.4e-3)   # median of 0.25, 0.4, 0.5
    assert got["prefill_segments"] == 6  # the most of any counted step (not the warm-up's 9)
    assert got["decode_segments"] == 1
    assert got["prefill_gpu"] == pytest.approx(3.0e-3)       # 2.5 + 2, 3.0, 2.5 -> 3.0
    assert got["graph"] == {"prefill": False, "decode": True}
    # a pass whose prefill lacks host_ms is not counted; with none left: None
    old = [line(i, [dict(step(1.0, 1.0, 5), host_ms=None)], [step(0.5, 0.5, 1)])
           for i in range(1, 3)]
    got = obt.parse("\n".join(old) + "\n", [8], passes=2)[8]
    assert got["prefill_host"] is None and got["decode_host"] == pytest.approx(0.5e-3)
    # an eager decode (no graph) has 0 segments
    eager = [line(i, [step(1.0, 1.0, 0, replays=0)], [step(0.5, 0.5, 0, replays=0)])
             for i in range(1, 3)]
    got = obt.parse("\n".join(eager) + "\n", [8], passes=2)[8]
    assert got["prefill_segments"] == got["decode_segments"] == 0


def test_probes_attach_to_sglang_names():
    pytest.importorskip("sglang")
    code = f"""
import sys; sys.path.insert(0, {str(BENCH)!r})
import one_batch_timing, sglang.benchmark.one_batch as ob
from sglang.srt.model_executor.model_runner import ModelRunner
from sglang.srt.model_executor.runner_backend import full_cuda_graph_backend as f, breakable_cuda_graph_backend as b
import torch
from sglang.srt.model_executor.runner_backend import cuda_graph_dedup_mixin as d
names = lambda: (ob.latency_test_run_once, ModelRunner.forward, f.FullCudaGraphBackend.replay,
                 b.BreakableCudaGraphBackend.replay, torch.cuda.CUDAGraph.replay,
                 d.DedupedCudaGraph.replay)
before = names()
one_batch_timing.install("/nonexistent")
after = names()
assert all(x is not y for x, y in zip(before, after)), after
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


FAKE_FLOW = r'''
import json, sys, time, types
sys.path.insert(0, BENCH)
import torch
import sglang.benchmark.one_batch as ob
from sglang.srt.model_executor.model_runner import ModelRunner
from sglang.srt.model_executor.runner_backend import (
    breakable_cuda_graph_backend as bcg, cuda_graph_dedup_mixin as dd, full_cuda_graph_backend as fcg)

class Event:  # CPU stand-in for torch.cuda.Event: milliseconds between records
    def __init__(self, enable_timing=False):
        self.t = None
    def record(self):
        self.t = time.perf_counter()
    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3
torch.cuda.Event = Event
torch.cuda.synchronize = lambda *a, **k: None

def work(ms):
    t = time.perf_counter() + ms / 1e3
    while time.perf_counter() < t:
        pass

# SGLang's call chain, faked below the wrappers: forward -> backend replay -> segment replays
# (a breakable prefill graph: 3 segments with eager "attention" between them; decode: one graph)
torch.cuda.CUDAGraph.replay = lambda self: work(2)
dd.DedupedCudaGraph.replay = lambda self, stream=None: work(2)
def bcg_replay(self, *a, **k):
    for i in range(3):
        torch.cuda.CUDAGraph.replay(object())
        if i < 2:
            work(5)  # the eager attention between segments
bcg.BreakableCudaGraphBackend.replay = bcg_replay
fcg.FullCudaGraphBackend.replay = lambda self, *a, **k: dd.DedupedCudaGraph.replay(object())
def forward(self, fb, *a, **k):
    work(1)  # host preparation
    if fb.forward_mode.is_decode():
        return fcg.FullCudaGraphBackend.replay(object())
    return bcg.BreakableCudaGraphBackend.replay(object())
ModelRunner.forward = forward
def batch(decode):
    return types.SimpleNamespace(forward_mode=types.SimpleNamespace(is_decode=lambda: decode))
def run_once(run_name, model_runner, rank_print, reqs, batch_size, *a, **k):
    ModelRunner.forward(None, batch(False))
    for _ in range(2):
        ModelRunner.forward(None, batch(True))
    return {"batch_size": batch_size}
ob.latency_test_run_once = run_once

import one_batch_timing
one_batch_timing.install(PATH)
assert ob.latency_test_run_once(None, None, print, [], 4) == {"batch_size": 4}
ob.latency_test_run_once(None, None, print, [], 8)
ModelRunner.forward(None, batch(True))  # outside a point: not recorded, still runs
print("ok")
'''


def test_probes_nest_as_sglang_calls_them(tmp_path):
    """The wrappers on SGLang's real names, driven by fakes of the call chain (no CUDA): one
    record per point, segments counted only inside a replay, eager work between segments left
    out of seg_ms but inside the replay window, host preparation inside fwd_ms only."""
    pytest.importorskip("sglang")
    path = tmp_path / "t.gpu.jsonl"
    code = f"BENCH = {str(BENCH)!r}\nPATH = {str(path)!r}\n" + FAKE_FLOW
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(x["point"], x["warmup"], x["batch_size"]) for x in lines] == [(0, True, 4), (1, False, 8)]
    for x in lines:
        (pre,), dec = x["prefill"], x["decode"]
        assert (pre["replays"], pre["segments"]) == (1, 3) and len(dec) == 2
        assert 6 <= pre["seg_ms"] < 9  # three 2 ms segments, not the 10 ms of attention
        assert pre["graph_ms"] >= pre["seg_ms"] + 10 and pre["fwd_ms"] >= pre["graph_ms"] + 1
        for d in dec:
            assert (d["replays"], d["segments"]) == (1, 1) and 2 <= d["seg_ms"] < 3.5
            assert d["fwd_ms"] >= d["graph_ms"] + 1
            # host time of the call: on these synchronous fakes, the whole forward (1 ms of
            # preparation + the 2 ms "replay"), as the CPU stand-in events also measure it
            assert 3 <= d["host_ms"] and abs(d["host_ms"] - d["fwd_ms"]) < 1
            assert 0 < d["cpu_ms"] <= d["host_ms"] + 0.5  # busy-waiting fakes: on a CPU
        assert x["loadavg"] >= 0
    got = obt.parse(path.read_text(), [8], passes=1)
    assert 6e-3 <= got[8]["prefill_gpu"] < 9e-3 and 2e-3 <= got[8]["decode_gpu"] < 3.5e-3
    assert 3e-3 <= got[8]["decode_host"] < 5e-3 and 0 < got[8]["decode_host_cpu"] < 5e-3
    # the prefill's host time holds the eager work between its segments (10 ms here)
    assert got[8]["prefill_host"] >= 17e-3 and 0 < got[8]["prefill_host_cpu"]
    assert (got[8]["prefill_segments"], got[8]["decode_segments"]) == (3, 1)
