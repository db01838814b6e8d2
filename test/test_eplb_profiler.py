"""ExpertComputeProfiler: statistics and fitted cost models on synthetic event timings."""

import math
from contextlib import nullcontext

import pytest
import torch

from sglang_moe_routing.eplb.events import HostEvent
from sglang_moe_routing.eplb.profiler import (
    ExpertComputeProfiler,
    get_global_expert_compute_profiler,
    set_global_expert_compute_profiler,
)


class FakeEvent:
    """A CUDA-event stand-in whose completion and timestamp the test controls."""

    log = []

    def __init__(self, enable_timing=True):
        self.t = None
        self.done = False
        self.synced = False

    def record(self, stream=None):
        FakeEvent.log.append(self)

    def query(self):
        return self.done

    def synchronize(self):
        # stream order: everything recorded before this event has completed too
        self.synced = True
        for ev in FakeEvent.log[: FakeEvent.log.index(self) + 1]:
            ev.done = True

    def elapsed_time(self, end):
        assert self.done and end.done, "read before completion"
        return end.t - self.t


def kernel_time(counts, a, b, c, tile):
    n = counts.double()
    tiles = n if tile == 1 else torch.ceil(n / tile)
    return c + float(((n > 0) * (a + b * tiles)).sum())


def test_fit_recovers_fused_kernel_model_with_varying_active_experts():
    g = torch.Generator().manual_seed(0)
    prof = ExpertComputeProfiler(2, 16, warmup_steps=0)
    for _ in range(60):
        for layer in range(2):
            counts = torch.poisson(torch.rand(16, generator=g) * 90, generator=g)
            counts[torch.rand(16, generator=g) < 0.3] = 0  # some experts idle
            prof.add_kernel_timing(layer, counts, kernel_time(counts, 0.010, 0.004, 0.020, 32))
    f = prof.get_cost_model(0)[0]
    assert f.tile == 32 and f.source == "layer-shape" and f.samples == 60
    assert f.a_ms == pytest.approx(0.010, rel=1e-6)
    assert f.b_ms == pytest.approx(0.004, rel=1e-6)
    assert f.c_ms == pytest.approx(0.020, rel=1e-6)
    assert f.rmse_ms < 1e-6  # exact data; what is left is cancellation in the normal equations
    n = torch.tensor([[0.0, 1.0, 32.0, 33.0] + [0.0] * 12, [5.0] * 16])
    got = prof.get_adjusted_expert_load(n)
    assert got.shape == n.shape and got.dtype == torch.float32
    assert got[0, :4].tolist() == pytest.approx([0.0, 0.014, 0.014, 0.018], rel=1e-5)


def test_fit_linear_and_per_expert_kernels():
    """One expert per launch: the fixed time is the per-invocation time of the expert."""
    g = torch.Generator().manual_seed(1)
    prof = ExpertComputeProfiler(1, 4, warmup_steps=0, tile_sizes=(1, 64))
    for _ in range(40):
        for e in range(4):
            n = float(torch.randint(1, 500, (1,), generator=g))
            prof.add_kernel_timing(0, torch.tensor([n]), 0.05 + 0.001 * n, expert_ids=torch.tensor([e]))
    f = prof.get_cost_model(0)[0]
    assert f.tile == 1 and f.c_ms == 0.0
    assert f.a_ms == pytest.approx(0.05, rel=1e-6) and f.b_ms == pytest.approx(0.001, rel=1e-6)
    s = prof.get_statistics_summary()
    inv, tok = s["invocations"][0], s["tokens"][0]
    assert inv.tolist() == [40.0] * 4
    expect = 0.05 * inv + 0.001 * tok
    torch.testing.assert_close(s["time_ms"][0], expect)
    torch.testing.assert_close(s["time_per_token_ms"][0], expect / tok)
    torch.testing.assert_close(s["time_per_invocation_ms"][0], expect / inv)


def test_prefill_all_active_folds_per_expert_time_into_launch_time():
    g = torch.Generator().manual_seed(2)
    prof = ExpertComputeProfiler(1, 8, warmup_steps=0, tile_sizes=(1, 16, 64))
    for _ in range(30):
        counts = torch.randint(100, 3000, (8,), generator=g).double()
        prof.add_kernel_timing(0, counts, kernel_time(counts, 0.002, 0.003, 0.01, 64))
    f = prof.get_cost_model(0)[0]
    assert f.tile == 64 and f.a_ms == 0.0
    assert f.b_ms == pytest.approx(0.003, rel=1e-6)
    assert f.c_ms == pytest.approx(0.01 + 8 * 0.002, rel=1e-6)


def test_noisy_timings_fit_within_tolerance():
    g = torch.Generator().manual_seed(3)
    prof = ExpertComputeProfiler(1, 32, warmup_steps=0)
    for _ in range(400):
        counts = torch.poisson(torch.rand(32, generator=g) * 40, generator=g)
        t = kernel_time(counts, 0.004, 0.002, 0.01, 16) * (1 + 0.02 * float(torch.randn(1, generator=g)))
        prof.add_kernel_timing(0, counts, t)
    f = prof.get_cost_model(0)[0]
    assert f.tile == 16
    assert f.b_ms == pytest.approx(0.002, rel=0.05)
    assert f.a_ms == pytest.approx(0.004, rel=0.15)


def test_classes_get_separate_models_and_weights():
    prof = ExpertComputeProfiler(1, 8, warmup_steps=0, num_classes=2, tile_sizes=(1,))
    g = torch.Generator().manual_seed(4)
    for _ in range(20):
        for cls, per_tok in ((0, 0.001), (1, 0.003)):
            ids = torch.arange(4) + 4 * cls
            n = torch.randint(10, 100, (4,), generator=g).double()
            prof.add_kernel_timing(0, n, 0.005 + per_tok * float(n.sum()), expert_ids=ids, expert_class=cls)
    models = prof.get_cost_model(0)
    assert models[0].b_ms == pytest.approx(0.001, rel=1e-6)
    assert models[1].b_ms == pytest.approx(0.003, rel=1e-6)
    load = prof.get_adjusted_expert_load(torch.full((1, 8), 10.0))
    assert load[0].tolist() == pytest.approx([0.01] * 4 + [0.03] * 4, rel=1e-5)
    w = prof.get_expert_compute_weights(0, torch.full((8,), 10.0))
    assert float(w.sum()) == pytest.approx(1.0)
    assert w.tolist() == pytest.approx([1 / 16] * 4 + [3 / 16] * 4, rel=1e-5)
    w_hist = prof.get_expert_compute_weights(0)  # from the recorded passes
    assert float(w_hist.sum()) == pytest.approx(1.0)
    assert float(w_hist[4:].sum()) > 2.5 * float(w_hist[:4].sum())


def test_unfitted_profiler_costs_are_token_counts():
    prof = ExpertComputeProfiler(2, 4, min_samples=5)
    n = torch.tensor([[[1.0, 2.0, 0.0, 7.5], [3.0, 0.0, 0.0, 1.0]]])
    assert not prof.has_fit()
    assert torch.equal(prof.get_adjusted_expert_load(n), n)
    assert prof.get_expert_compute_weights(1).tolist() == [0.25] * 4
    for _ in range(4):
        prof.add_kernel_timing(0, torch.ones(4), 1.0)
    assert not prof.has_fit()  # 4 < min_samples
    prof.add_kernel_timing(1, torch.ones(4), 1.0)
    assert prof.has_fit()
    # layer 1 has one sample only: it borrows the pooled fit
    assert prof.get_cost_model(1)[0].source in ("class-pooled", "all-pooled")


def test_events_are_read_only_when_complete_and_never_waited_for():
    FakeEvent.log = []
    prof = ExpertComputeProfiler(2, 4, warmup_steps=0, event_factory=FakeEvent)
    assert prof.begin_step()
    with prof.kernel(1, torch.tensor([3, 0, 5, 1])):
        pass
    start, end, ready = FakeEvent.log
    start.t, end.t = 10.0, 10.25
    assert prof.poll() == 0 and prof.num_pending == 1  # copy event not done: nothing read
    assert not ready.synced  # ... and nothing waited for it
    start.done = end.done = ready.done = True
    prof.end_step()  # end of pass polls
    assert prof.num_pending == 0
    s = prof.get_statistics_summary()
    assert s["samples"] == 1
    assert s["tokens"][1].tolist() == [3.0, 0.0, 5.0, 1.0]
    assert s["invocations"][1].tolist() == [1.0, 0.0, 1.0, 1.0]
    # the normal equations hold y = 0.25 for x = [1, active=3, tokens=9]
    assert float(prof._xty[1, 0, 0, 0]) == pytest.approx(0.25)
    assert float(prof._xty[1, 0, 0, 2]) == pytest.approx(9 * 0.25)


def test_poll_block_synchronizes_and_keeps_order():
    FakeEvent.log = []
    prof = ExpertComputeProfiler(1, 2, warmup_steps=0, event_factory=FakeEvent)
    prof.begin_step()
    for k in range(3):
        with prof.kernel(0, torch.tensor([k + 1, 0])):
            pass
    for i, ev in enumerate(FakeEvent.log):
        ev.t = float(i)
    # the second sample completes first: in-order reading stops at the first pending one
    FakeEvent.log[3].done = FakeEvent.log[4].done = FakeEvent.log[5].done = True
    assert prof.poll() == 0
    assert prof.poll(block=True) == 3
    assert FakeEvent.log[2].synced and FakeEvent.log[8].synced
    assert prof.get_statistics_summary()["tokens"][0].tolist() == [6.0, 0.0]


def test_warmup_and_interval_select_passes():
    prof = ExpertComputeProfiler(1, 2, warmup_steps=3, interval=4)
    picked = []
    for step in range(16):
        picked.append(prof.begin_step())
        assert prof.is_profiling_step == picked[-1]
        prof.end_step()
        assert not prof.is_profiling_step
    assert [i for i, p in enumerate(picked) if p] == [3, 7, 11, 15]
    assert prof.get_statistics_summary()["profiled_steps"] == 4


def test_max_pending_drops_oldest_instead_of_waiting():
    FakeEvent.log = []
    prof = ExpertComputeProfiler(1, 2, warmup_steps=0, max_pending=2, event_factory=FakeEvent)
    for _ in range(5):
        with prof.kernel(0, torch.tensor([1, 1])):
            pass
    assert prof.num_pending == 2
    assert prof.get_statistics_summary()["dropped"] == 3
    assert not any(e.synced for e in FakeEvent.log)


def test_host_event_path_measures_real_time():
    prof = ExpertComputeProfiler(1, 2, warmup_steps=0, event_factory=HostEvent)
    with prof.kernel(0, torch.tensor([4, 0])):
        sum(range(20000))
    assert prof.poll() == 1
    y = float(prof._xty[0, 0, 0, 0])
    assert 0 < y < 1000


def test_reset_statistics():
    prof = ExpertComputeProfiler(1, 2, min_samples=1)
    prof.add_kernel_timing(0, torch.tensor([1.0, 2.0]), 0.5)
    assert prof.has_fit()
    prof.reset_statistics()
    assert not prof.has_fit()
    s = prof.get_statistics_summary()
    assert s["samples"] == 0 and float(s["tokens"].sum()) == 0.0


def test_all_reduced_statistics_equal_pooled_samples():
    g = torch.Generator().manual_seed(5)
    samples = [(l, torch.poisson(torch.rand(8, generator=g) * 50, generator=g)) for l in (0, 1) for _ in range(20)]
    ranks = [ExpertComputeProfiler(2, 8, min_samples=4) for _ in range(2)]
    pooled = ExpertComputeProfiler(2, 8, min_samples=4)
    for i, (l, n) in enumerate(samples):
        t = kernel_time(n, 0.003, 0.001, 0.01, 16) * (1 + 0.05 * math.sin(i))
        ranks[i % 2].add_kernel_timing(l, n, t)
        pooled.add_kernel_timing(l, n, t)
    merged = ranks[0].all_reduced(lambda t: t + ranks[1].statistics_tensor())
    for l in (0, 1):
        a, b = merged.get_cost_model(l)[0], pooled.get_cost_model(l)[0]
        assert (a.tile, a.samples, a.source) == (b.tile, b.samples, b.source)
        assert (a.a_ms, a.b_ms, a.c_ms) == pytest.approx((b.a_ms, b.b_ms, b.c_ms), rel=1e-9)
    torch.testing.assert_close(merged.cost_params()[1], pooled.cost_params()[1])
    assert ranks[0].get_statistics_summary()["samples"] == 20  # the local copy is unchanged


def test_layer_shape_keys_pool_layers():
    prof = ExpertComputeProfiler(3, 4, min_samples=10)
    prof.set_layer_shape_key(0, "A")
    prof.set_layer_shape_key(1, "A")
    for i in range(6):
        for l in (0, 1):
            n = torch.tensor([float(i + 1), 2.0, 0.0, 5.0])
            prof.add_kernel_timing(l, n, 0.002 * float(n.sum()) + 0.01)
    f0, f1 = prof.get_cost_model(0)[0], prof.get_cost_model(1)[0]
    assert f0 == f1 and f0.source == "layer-shape" and f0.samples == 12


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda p: p.add_kernel_timing(5, torch.ones(4), 1.0), r"layer must be in \[0, 2\)"),
        (lambda p: p.add_kernel_timing(0, torch.tensor([1.0, -1, 0, 0]), 1.0), ">= 0"),
        (lambda p: p.add_kernel_timing(0, torch.ones(4), float("nan")), "finite"),
        (lambda p: p.add_kernel_timing(0, torch.ones(3), 1.0), "4 columns"),
        (lambda p: p.add_kernel_timing(0, torch.ones(2), 1.0, expert_ids=torch.tensor([0, 9])), "expert ids"),
        (lambda p: p.add_kernel_timing(0, torch.ones(2), 1.0, expert_ids=torch.tensor([0, -1])), "count of 0"),
        (lambda p: p.add_kernel_timing(0, torch.ones(4), 1.0, expert_class=1), "expert_class"),
        (lambda p: p.get_adjusted_expert_load(torch.ones(3, 4)), r"\[\.\.\., 2, 4\]"),
        (lambda p: p.get_adjusted_expert_load(torch.full((2, 4), -1.0)), ">= 0"),
        (lambda p: p.set_expert_classes(0, [0, 0, 0, 3]), "classes"),
        (lambda p: p.record_kernel(0, None, None, torch.ones(3)), "num_experts=4"),
    ],
)
def test_bad_inputs_raise(call, message):
    prof = ExpertComputeProfiler(2, 4)
    with pytest.raises((ValueError, TypeError), match=message):
        call(prof)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(interval=0), "interval"),
        (dict(tile_sizes=()), "tile_sizes"),
        (dict(tile_sizes=(16, 16)), "duplicates"),
        (dict(tile_sizes=(0,)), "tile size"),
    ],
)
def test_bad_configuration_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ExpertComputeProfiler(2, 4, **kwargs)


def test_global_accessor():
    assert get_global_expert_compute_profiler() is None
    p = ExpertComputeProfiler(1, 2)
    set_global_expert_compute_profiler(p)
    try:
        assert get_global_expert_compute_profiler() is p
    finally:
        set_global_expert_compute_profiler(None)


def test_noise_does_not_turn_linear_costs_into_padded_ones():
    """Homogeneous per-token cost measured with noise: the selected model stays linear
    without a per-expert term, so costs are exactly proportional to tokens."""
    g = torch.Generator().manual_seed(6)
    prof = ExpertComputeProfiler(1, 32, warmup_steps=0)
    for _ in range(300):
        counts = torch.poisson(torch.rand(32, generator=g) * 60, generator=g)
        t = (0.005 + 0.0002 * float(counts.sum())) * (1 + 0.03 * float(torch.randn(1, generator=g)))
        prof.add_kernel_timing(0, counts, t)
    f = prof.get_cost_model(0)[0]
    assert f.tile == 1 and f.a_ms == 0.0, f
    tokens = torch.poisson(torch.full((50, 1, 32), 20.0), generator=g)
    cost = prof.get_adjusted_expert_load(tokens).double()
    ratio = cost[tokens > 0] / tokens[tokens > 0]
    assert float(ratio.max() - ratio.min()) <= 1e-6 * float(ratio.mean())


class _Timeline:
    """A host clock and one device stream (ms): launches start when both the host has issued
    them and the stream is free; ``sync`` makes the host wait for the stream."""

    def __init__(self):
        self.host = 0.0
        self.stream = 0.0

    def launch(self, device_ms, host_ms):
        self.host += host_ms
        self.stream = max(self.stream, self.host) + device_ms

    def sync(self):
        self.host = max(self.host, self.stream)

    def event_class(self):
        tl = self

        class TimelineEvent:
            def __init__(self, enable_timing=True):
                self.t = None

            def record(self, stream=None):
                tl.host += 0.002
                self.t = tl.stream = max(tl.stream, tl.host)

            def query(self):
                return self.t is not None and self.t <= tl.host

            def synchronize(self):
                tl.host = max(tl.host, self.t)

            def elapsed_time(self, end):
                assert self.query() and end.query(), "read before completion"
                return end.t - self.t

        return TimelineEvent


@pytest.mark.parametrize("host_ahead", [True, False])
def test_pipeline_on_device_timeline_and_host_bound_regions(host_ahead):
    """The GPU test's loop on a simulated stream: per-pass records -> poll -> fit. With the
    host ahead of the device the events time kernels only and the fit is exact; with the
    stream drained before each region (a host sync) the events also time the host's launches
    and stalls, every sample is flagged host-bound, and the per-token cost is lost."""
    tl = _Timeline()
    g = torch.Generator().manual_seed(0)
    E, per_tok = 8, {0: 4e-6, 1: 16e-6}  # ms per token; 3 us per launch on the device
    prof = ExpertComputeProfiler(
        1, E, warmup_steps=3, num_classes=2, tile_sizes=(1, 64, 128), event_factory=tl.event_class()
    )
    prof.set_expert_classes(0, [0] * 4 + [1] * 4)
    for step in range(43):
        profiled = prof.begin_step()
        if host_ahead:
            tl.launch(25.0, 0.01)  # earlier work keeps the device busy
        counts = torch.randint(0, 4096, (E,), generator=g)
        counts[torch.rand(E, generator=g) < 0.2] = 0
        for cls in (0, 1):
            ids = torch.arange(4) + 4 * cls
            if not host_ahead:
                tl.sync()
            with prof.kernel(0, counts[ids], expert_ids=ids, expert_class=cls) if profiled else nullcontext():
                for j, n in enumerate(counts[ids].tolist()):
                    if n:  # launch overhead, and now and then a first-call stall of milliseconds
                        tl.launch(0.003 + per_tok[cls] * n, 0.015 + (5.0 if (step + j) % 7 == 0 else 0.0))
        prof.end_step()
        if host_ahead and profiled:
            assert prof.num_pending > 0  # the device is behind: nothing waited for
    tl.sync()
    prof.poll(block=True)
    s = prof.get_statistics_summary()
    m = prof.get_cost_model(0)
    assert m[0].samples == m[1].samples == 40
    if host_ahead:
        assert s["host_bound"] == 0
        for c in (0, 1):
            assert m[c].tile == 1
            assert m[c].b_ms == pytest.approx(per_tok[c], rel=1e-6)
            assert m[c].a_ms == pytest.approx(0.003, rel=1e-6)
    else:
        assert s["host_bound"] == 80
        assert m[1].b_ms / m[1].tile < 2.0 * m[0].b_ms / m[0].tile + 1e-9  # the GPU test's failure
    assert ("host_bound=%d" % s["host_bound"]) in prof.format_summary()
