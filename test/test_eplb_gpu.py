"""ExpertComputeProfiler with real CUDA events (core code only; no sglang)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmark"))

from harness import gpu_sleep, queued_event_ms  # noqa: E402

from sglang_moe_routing.eplb.profiler import ExpertComputeProfiler  # noqa: E402

pytestmark = pytest.mark.gpu


def _experts(num_experts, hidden, inter, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randn(hidden, inter, device="cuda", dtype=dtype, generator=g) / hidden**0.5 for _ in range(num_experts)]


def test_cuda_events_are_not_waited_for():
    prof = ExpertComputeProfiler(1, 4, warmup_steps=0)
    w = _experts(4, 256, 256, torch.bfloat16)
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    with prof.kernel(0, torch.ones(4, device="cuda", dtype=torch.int32)):  # warm the pinned-memory cache
        x @ w[0]
    torch.cuda.synchronize()
    assert prof.poll() == 1
    prof.reset_statistics()
    # made before the GPU is busy: a blocking host-to-device copy would wait for the sleep
    counts = torch.tensor([64, 0, 64, 64], device="cuda", dtype=torch.int32)
    torch.cuda.synchronize()
    prof.begin_step()
    gpu_sleep(200)
    with prof.kernel(0, counts):
        for e in (0, 2, 3):
            x @ w[e]
    prof.end_step()  # polls: the GPU is still sleeping, so nothing may be read yet
    assert prof.num_pending == 1
    assert prof.get_statistics_summary()["samples"] == 0
    torch.cuda.synchronize()
    assert prof.poll() == 1
    s = prof.get_statistics_summary()
    assert s["tokens"][0].tolist() == [64.0, 0.0, 64.0, 64.0]  # counts came back from the device


@pytest.mark.gpu_timing
def test_fitted_costs_track_real_kernel_times():
    """Two expert classes (hidden 1024 vs 2048 weights, run as separate launches): the fitted
    per-token cost of the bigger class is clearly larger, and predictions follow measurements.

    The events must time the kernels, not the host. As in a loaded server, the host is ahead of
    the device: every pass is queued behind a sleep, the token counts are on the device before
    the loop (a pageable ``.cuda()`` copy syncs the stream, and an event pair on an idle stream
    also times the host's launches, ``cudaMalloc``s and first-call cuBLAS set-up: milliseconds
    instead of microseconds), and one untimed run of the same loop warms cuBLAS, the caching
    allocator and the pinned-memory cache first.
    """
    torch.manual_seed(0)
    E, steps = 8, 43
    prof = ExpertComputeProfiler(1, E, warmup_steps=3, num_classes=2, tile_sizes=(1, 64, 128))
    prof.set_expert_classes(0, [0] * 4 + [1] * 4)
    w = {0: _experts(4, 1024, 1024, torch.bfloat16), 1: _experts(4, 2048, 2048, torch.bfloat16)}
    xs = {0: torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16),
          1: torch.randn(4096, 2048, device="cuda", dtype=torch.bfloat16)}
    counts = torch.randint(0, 4096, (steps, E))
    counts[torch.rand(steps, E) < 0.2] = 0
    counts_dev = counts.cuda()
    ids_dev = torch.arange(E, device="cuda").view(2, 4)

    def run(cls, c):
        for j in range(4):
            n = int(c[j])
            if n:
                xs[cls][:n] @ w[cls][j]

    def loop(p, busy):
        for step in range(steps):
            profiled = p.begin_step()
            if busy:
                torch.cuda.synchronize()  # bounds the queue; the sleep then keeps the device behind
                gpu_sleep(20)
            for cls in (0, 1):
                c = counts[step, 4 * cls : 4 * cls + 4]
                if profiled:  # as the MoE hook does: events only on profiled passes
                    c_dev = counts_dev[step, 4 * cls : 4 * cls + 4]  # a view: no copy, no sync
                    with p.kernel(0, c_dev, expert_ids=ids_dev[cls], expert_class=cls):
                        run(cls, c)
                else:
                    run(cls, c)
            p.end_step()
            if busy and profiled:
                assert p.num_pending == 2  # the device is still sleeping: nothing was waited for

    warm = ExpertComputeProfiler(1, E, warmup_steps=0, num_classes=2, max_pending=1 << 20)
    warm.end_step = lambda: None  # keep every sample pending: all pinned buffers live at once
    loop(warm, busy=False)
    torch.cuda.synchronize()
    warm.poll(block=True)
    del warm

    loop(prof, busy=True)
    torch.cuda.synchronize()
    prof.poll(block=True)
    s = prof.get_statistics_summary()
    models = prof.get_cost_model(0)
    assert models[0].samples == 40 and models[1].samples == 40  # warm-up passes skipped
    assert s["host_bound"] == 0, prof.format_summary()  # events timed queued kernels only
    per_tok = {c: models[c].b_ms / models[c].tile for c in (0, 1)}
    assert per_tok[1] > 2.0 * per_tok[0], models  # 4x the FLOPs per token

    # predictions follow measurements: 4 experts x 2048 tokens per class, timed on their own
    n = torch.full((4,), 2048.0)
    measured = {c: queued_event_ms(lambda c=c: run(c, n)) for c in (0, 1)}
    predicted = {c: models[c].c_ms + float(models[c].expert_time(n).sum()) for c in (0, 1)}
    for c in (0, 1):
        assert predicted[c] == pytest.approx(measured[c], rel=0.35), (predicted, measured, models)
    w_share = prof.get_expert_compute_weights(0, torch.full((E,), 2048.0))
    meas_share = (measured[1] - models[1].c_ms) / (measured[0] - models[0].c_ms + measured[1] - models[1].c_ms)
    assert float(w_share[4:].sum()) > 0.5
    assert float(w_share[4:].sum()) == pytest.approx(meas_share, abs=0.1), (w_share, measured, models)
