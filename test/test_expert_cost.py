"""Heterogeneous expert cost classes (eplb/expert_cost.py) and their SGLang glue
(integration/expert_cost_hooks.py), on the CPU: the split keeps the MoE output, the slow class
does ``factor`` launches, the profiler learns one cost model per class from the class launches
(virtual-clock events: no timing in the test), compute-aware placement then balances GPU time
better than token-only placement, and the measured MoE-time windows / log lines."""

from __future__ import annotations

import argparse

import pytest
import torch

from sglang_moe_routing.eplb.compute_aware import (
    balancedness,
    compute_cost_aware_rebalance_experts,
    gpu_loads,
)
from sglang_moe_routing.eplb.expert_cost import (
    ClassSplitProfiler,
    MoeTimeWindows,
    class_expert_ids,
    format_moe_time_line,
    parse_moe_time_lines,
    run_cost_classes,
    slot_counts,
    slow_expert_mask,
    split_topk_ids,
    window_balancedness,
)


# ----------------------------------------------------------------------------- a reference MoE


def reference_moe(x, w1, w2, topk_weights, topk_ids):
    """Naive weighted expert sum (float64); entries with id -1 contribute nothing."""
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            if e < 0:
                continue
            h = w1[e].double() @ x[t].double()
            gate, up = h.chunk(2)
            out[t] += topk_weights[t, j].double() * (w2[e].double() @ (torch.nn.functional.silu(gate) * up))
    return out


def _moe_inputs(T=12, k=3, S=6, H=8, I=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    w1 = torch.randn(S, 2 * I, H, generator=g)
    w2 = torch.randn(S, H, I, generator=g)
    ids = torch.stack([torch.randperm(S, generator=g)[:k] for _ in range(T)])
    ids[0, 0] = -1  # not on this GPU
    ids[3, 1] = -1
    w = torch.rand(T, k, generator=g)
    return x, w1, w2, w, ids


# ----------------------------------------------------------------------------- slow set / split


def test_slow_mask_counts_and_per_layer_rows():
    m = slow_expert_mask(5, 32, 0.25, seed=3)
    assert m.sum(1).tolist() == [8] * 5
    assert torch.equal(slow_expert_mask(2, 32, 0.25, seed=3), m[:2])  # row l: seed and l only
    assert not torch.equal(m[0], m[1])
    assert not torch.equal(slow_expert_mask(1, 32, 0.25, seed=4)[0], m[0])
    assert slow_expert_mask(1, 10, 0.0, 0).sum() == 0 and slow_expert_mask(1, 10, 1.0, 0).all()
    with pytest.raises(ValueError, match="fraction"):
        slow_expert_mask(1, 8, 1.5, 0)


def test_split_puts_every_entry_in_exactly_one_class():
    ids = torch.tensor([[0, 3, -1], [5, 1, 2], [4, -1, 6]])  # 6 is >= S (e.g. fused shared)
    slow_slot = torch.tensor([False, True, False, True, False, True])
    fast, slow = split_topk_ids(ids, slow_slot)
    assert fast.tolist() == [[0, -1, -1], [-1, -1, 2], [4, -1, 6]]
    assert slow.tolist() == [[-1, 3, -1], [5, 1, -1], [-1, -1, -1]]
    both = torch.where(fast >= 0, fast, slow)
    assert torch.equal(both, ids)


def test_slot_counts_match_bincount():
    ids = torch.tensor([[0, 3, -1], [5, 1, 3], [4, -1, 9]])
    flat = ids.flatten()
    ref = torch.bincount(flat[(flat >= 0) & (flat < 6)], minlength=6)
    assert slot_counts(ids, 6).tolist() == ref.tolist()


def test_cost_classes_keep_the_output_and_repeat_the_slow_launch():
    x, w1, w2, w, ids = _moe_inputs()
    slow_slot = torch.tensor([True, False, False, True, False, False])
    calls, timed = [], []

    def run_experts(cids):
        calls.append(cids.clone())
        return reference_moe(x, w1, w2, w, cids)

    class Timer:
        def __init__(self, cls, cids):
            self.cls, self.cids = cls, cids

        def __enter__(self):
            timed.append((self.cls, len(calls)))

        def __exit__(self, *exc):
            timed.append((self.cls, len(calls)))

    out = run_cost_classes(run_experts, ids, slow_slot, factor=3, timer=Timer)
    torch.testing.assert_close(out, reference_moe(x, w1, w2, w, ids), rtol=1e-12, atol=1e-12)
    assert len(calls) == 1 + 3
    fast, slow = split_topk_ids(ids, slow_slot)
    assert torch.equal(calls[0], fast) and all(torch.equal(c, slow) for c in calls[1:])
    assert timed == [(0, 0), (0, 1), (1, 1), (1, 4)]  # class 0: 1 launch, class 1: 3 launches
    with pytest.raises(ValueError, match="factor"):
        run_cost_classes(run_experts, ids, slow_slot, factor=0)


# ----------------------------------------------------------------------------- profiler classes


class Clock:
    """Virtual time: events read it when recorded; tests advance it by modelled costs."""

    def __init__(self):
        self.t = 0.0

    def factory(self, enable_timing=True):
        clock = self

        class Ev:
            def __init__(self):
                self.v = None

            def record(self, stream=None):
                self.v = clock.t

            def query(self):
                return self.v is not None

            def synchronize(self):
                pass

            def elapsed_time(self, end):
                return end.v - self.v

        return Ev()


def _profiled_run(clock, prof, layer, counts, logical, slow_slot, factor, b_ms=0.01, c_ms=0.05):
    """One layer's expert computation as the integration runs it: the outer bracket, then one
    class launch each; fast launch time c + b*n, slow class factor x that."""
    G = counts.numel()
    slot_class = slow_slot.long()
    with prof.kernel(layer, counts, expert_ids=logical):
        for cls in (0, 1):
            n = torch.where(slot_class == cls, counts, torch.zeros_like(counts))
            with prof.class_kernel(layer, cls, n, class_expert_ids(logical, slot_class, cls)):
                clock.t += (c_ms + b_ms * float(n.sum())) * (factor if cls else 1)
    assert G == logical.numel()


def test_class_split_profiler_learns_the_slow_class_and_compute_aware_balances_time():
    torch.manual_seed(0)
    L, E, gpus, factor = 1, 16, 2, 3
    slow_logical = slow_expert_mask(L, E, 0.25, seed=1)[0]
    clock = Clock()
    prof = ClassSplitProfiler(L, E, warmup_steps=0, interval=1, tile_sizes=(1,), num_classes=2,
                              event_factory=clock.factory)
    G = E // gpus
    placement = torch.arange(E)  # trivial placement: GPU r holds experts [rG, (r+1)G)
    window = []
    for step in range(40):
        prof.begin_step()
        load = torch.poisson(torch.full((E,), 20.0)).long()
        window.append(load)
        for r in range(gpus):
            logical = placement[r * G:(r + 1) * G]
            _profiled_run(clock, prof, 0, load[logical], logical, slow_logical[logical], factor)
        prof.end_step()
    s = prof.get_statistics_summary()
    assert s["samples"] == 40 * gpus * 2  # class samples only: the outer brackets gave way
    fits = prof.get_cost_model(0)
    assert fits[0].b_ms == pytest.approx(0.01, rel=1e-6)
    assert fits[1].b_ms == pytest.approx(0.03, rel=1e-6)
    per_token = s["time_per_token_ms"][0]
    assert torch.allclose(per_token[slow_logical], torch.tensor(0.03, dtype=torch.float64), rtol=1e-6)
    assert torch.allclose(per_token[~slow_logical], torch.tensor(0.01, dtype=torch.float64), rtol=1e-6)

    # compute-aware placement on the learned costs vs token-only (deepseek) placement
    tokens = torch.stack(window).double()[:, None, :]  # [S, L, E]
    cost = prof.get_adjusted_expert_load(tokens.float()).double().sum(0)
    true_cost = tokens.sum(0) * torch.where(slow_logical, 3.0, 1.0)

    def time_balancedness(alpha):
        p2l, _, _ = compute_cost_aware_rebalance_experts(tokens.sum(0).float(), cost, E, None, 1, gpus,
                                                         False, alpha)
        return float(balancedness(gpu_loads(true_cost.gather(-1, p2l), gpus)).mean())

    assert time_balancedness(1.0) > time_balancedness(0.0)
    assert time_balancedness(1.0) > 0.99


def test_outer_bracket_is_recorded_when_no_class_launch_ran():
    clock = Clock()
    prof = ClassSplitProfiler(1, 4, warmup_steps=0, interval=1, event_factory=clock.factory)
    prof.begin_step()
    with prof.kernel(0, torch.tensor([1, 2, 0, 3])):
        clock.t += 1.0
    with prof.class_kernel(0, 0, torch.tensor([1, 0, 0, 0]), torch.arange(4)):  # outside: no sample
        clock.t += 1.0
    prof.end_step()
    assert prof.get_statistics_summary()["samples"] == 1


def test_moe_time_windows_wait_for_their_spans_and_line_up():
    clock = Clock()
    lines = []
    wins = MoeTimeWindows(2, lambda w, a, b, d: lines.append(format_moe_time_line(w, a, b, 1, d)))
    prof = ClassSplitProfiler(4, 4, warmup_steps=0, interval=1, event_factory=clock.factory, moe_time=wins)
    for step in range(5):
        prof.begin_step()
        for layer in (1, 3):
            with prof.kernel(layer, torch.tensor([1, 1, 1, 1])):
                clock.t += 0.5 * layer + step
        prof.end_step()
    # windows of 2 profiled passes: passes 0-1 and 2-3 done; pass 4 opens window 2
    assert lines == [
        "expert-cost moe-time window=0 passes=0-1 rank=1 layers=1,3 ms=2.0000,4.0000",
        "expert-cost moe-time window=1 passes=2-3 rank=1 layers=1,3 ms=6.0000,8.0000",
    ]
    # an unfinished span holds its window back
    pend = MoeTimeWindows(1, lambda *a: lines.append(a))
    ev_done, ev_open = clock.factory(), clock.factory()
    ev_done.record()
    pend.add(0, 0, ev_done, ev_open)
    assert pend.poll(1) == 0
    ev_open.record()
    assert pend.poll(1) == 1


def test_parse_moe_time_lines_and_window_balancedness():
    log = "\n".join([
        "[2026-11-29 10:00:00 TP0 EP0] " + format_moe_time_line(0, 0, 9, 0, {1: 2.0, 2: 4.0}),
        "[2026-11-29 10:00:00 TP1 EP1] " + format_moe_time_line(0, 0, 9, 1, {1: 1.0, 2: 4.0}),
        "[2026-11-29 10:00:01 TP0 EP0] " + format_moe_time_line(1, 10, 19, 0, {1: 3.0, 2: 3.0}),
        "unrelated line",
    ])
    w = parse_moe_time_lines(log)
    assert w == {0: {0: {1: 2.0, 2: 4.0}, 1: {1: 1.0, 2: 4.0}}, 1: {0: {1: 3.0, 2: 3.0}}}
    bal = window_balancedness(w, num_ranks=2)
    assert bal == {0: pytest.approx(((1.5 / 2.0) + 1.0) / 2)}  # window 1 lacks rank 1: skipped


# ----------------------------------------------------------------------------- SGLang glue


sglang = pytest.importorskip("sglang")


def _ns(**kw):
    base = dict(expert_cost_slow_factor=1, expert_cost_slow_fraction=0.25, expert_cost_seed=0,
                expert_moe_time_window=0, enable_expert_compute_profiling=False)
    base.update(kw)
    return argparse.Namespace(**base)


def test_flags_parse_and_fail_with_one_line_naming_the_flag():
    from sglang_moe_routing.integration import expert_cost_hooks as h

    p = argparse.ArgumentParser()
    h.add_cli_args(p)
    a = p.parse_args(["--expert-cost-slow-factor", "3", "--expert-cost-slow-fraction", "0.5",
                      "--expert-moe-time-window", "5"])
    a.enable_expert_compute_profiling = True
    cfg = h.parse_section(a)[h.SECTION]
    assert (cfg.slow_factor, cfg.slow_fraction, cfg.moe_time_window, cfg.classes_on) == (3, 0.5, 5, True)
    assert h._targets(cfg) == [h.APPLY, h.INIT_LOCATION]
    assert h._targets(h.parse_section(_ns())[h.SECTION]) == []  # default: nothing hooked
    with pytest.raises(ValueError, match="--expert-cost-slow-factor must be >= 1"):
        h.parse_section(_ns(expert_cost_slow_factor=0))
    with pytest.raises(ValueError, match=r"--expert-cost-slow-fraction must be in \[0, 1\]"):
        h.parse_section(_ns(expert_cost_slow_fraction=2))
    with pytest.raises(ValueError, match="--expert-moe-time-window needs --enable-expert-compute-profiling"):
        h.parse_section(_ns(expert_moe_time_window=3))


def test_plugin_lists_the_feature_and_its_flags():
    from sglang_moe_routing.integration import expert_cost_hooks, plugin

    assert expert_cost_hooks in plugin._feature_modules()
    sections = plugin.parse_sections(_ns(expert_cost_slow_factor=2))
    assert sections["expert_cost"].slow_factor == 2


class _Backend:
    def __init__(self, triton):
        self.triton = triton

    def is_triton(self):
        return self.triton

    def __repr__(self):
        return "TRITON" if self.triton else "FLASHINFER_CUTLASS"


def test_apply_hook_splits_into_class_launches_and_profiles_them(monkeypatch):
    """The AROUND hook on UnquantizedFusedMoEMethod.apply with SGLang's fused_experts replaced by
    the reference MoE: same output, 1 + factor launches, one profiler sample per class."""
    from collections import namedtuple

    from sglang.srt.layers.moe.moe_runner import base as runner_base
    from sglang.srt.layers.moe.moe_runner.triton_utils import fused_moe
    from sglang_moe_routing.integration import config
    from sglang_moe_routing.integration import expert_cost_hooks as h
    from sglang_moe_routing.eplb import profiler as profmod

    x, w1, w2, w, ids = _moe_inputs(S=8)
    launches = []

    def fake_fused_experts(hidden_states, w1_, w2_, topk_output, moe_runner_config, b1=None, b2=None):
        assert moe_runner_config.inplace is False and moe_runner_config.num_experts is None
        launches.append(topk_output.topk_ids.clone())
        return reference_moe(hidden_states, w1_, w2_, topk_output.topk_weights, topk_output.topk_ids)

    monkeypatch.setattr(fused_moe, "fused_experts", fake_fused_experts)
    monkeypatch.setattr(h, "_check", lambda *a: None)  # CUDA / Triton runner checks
    monkeypatch.setattr(h, "_metadata", lambda: None)  # one GPU, no placement: slot g = expert g
    monkeypatch.setattr(h, "_slow_logical", {})
    cfg = h.ExpertCostConfig(slow_factor=2, slow_fraction=0.5, seed=0, profiling=True)
    config.set_sections({h.SECTION: cfg})
    clock = Clock()
    prof = ClassSplitProfiler(4, 8, warmup_steps=0, interval=1, num_classes=2, event_factory=clock.factory)
    monkeypatch.setattr(profmod, "_GLOBAL_PROFILER", prof)
    try:
        Topk = namedtuple("Topk", "topk_weights topk_ids router_logits")
        Dispatch = namedtuple("Dispatch", "hidden_states topk_output")
        layer = argparse.Namespace(layer_id=2, w13_weight=w1, w2_weight=w2, moe_ep_rank=0,
                                   moe_runner_config=runner_base.MoeRunnerConfig(num_experts=8, num_local_experts=8))
        d = Dispatch(x, Topk(w, ids, None))
        method = argparse.Namespace(runner=argparse.Namespace(runner_backend=_Backend(True)))
        prof.begin_step()
        with prof.kernel(2, slot_counts(ids, 8), expert_ids=torch.arange(8)):  # eplb's bracket
            out = h._around_apply(lambda *a: pytest.fail("original called"), method, layer, d)
        prof.end_step()
    finally:
        config.set_sections(None)
    torch.testing.assert_close(out.hidden_states, reference_moe(x, w1, w2, w, ids), rtol=1e-12, atol=1e-12)
    slow_slot = slow_expert_mask(3, 8, 0.5, 0)[2]
    fast, slow = split_topk_ids(ids, slow_slot)
    assert len(launches) == 3 and torch.equal(launches[0], fast)
    assert all(torch.equal(l, slow) for l in launches[1:])
    s = prof.get_statistics_summary()
    assert s["samples"] == 2
    assert torch.equal(prof._expert_class[2].bool(), slow_slot)  # each expert in its launch's class


def test_apply_hook_refuses_other_runners_with_one_line():
    from sglang_moe_routing.integration import expert_cost_hooks as h

    method = argparse.Namespace(runner=argparse.Namespace(runner_backend=_Backend(False)))
    layer = argparse.Namespace(moe_ep_size=1)
    d = argparse.Namespace(topk_output=argparse.Namespace(topk_ids=torch.zeros(2, 2, dtype=torch.int32)))
    with pytest.raises(RuntimeError, match=r"--expert-cost-slow-factor needs the Triton fused-MoE runner "
                                           r"\(--moe-runner-backend triton\), got FLASHINFER_CUTLASS; CUDA"):
        h._check(method, layer, d)


def test_profiler_swap_sets_every_experts_class_on_every_rank(monkeypatch):
    """The merged profiler of a rebalance copies the local rank's classes: they are set for all
    logical experts at start-up from the seed, whatever experts the rank holds."""
    from sglang_moe_routing.eplb import profiler as profmod
    from sglang_moe_routing.eplb.profiler import ExpertComputeProfiler
    from sglang_moe_routing.integration import config
    from sglang_moe_routing.integration import expert_cost_hooks as h

    base = ExpertComputeProfiler(4, 16, warmup_steps=3, interval=5, tile_sizes=(1, 16))
    monkeypatch.setattr(profmod, "_GLOBAL_PROFILER", base)
    config.set_sections({h.SECTION: h.ExpertCostConfig(slow_factor=3, slow_fraction=0.25, seed=7,
                                                        moe_time_window=2, profiling=True)})
    try:
        h._after_init_location(None, object())
    finally:
        config.set_sections(None)
    new = profmod.get_global_expert_compute_profiler()
    assert isinstance(new, ClassSplitProfiler) and new.num_classes == 2 and new.moe_time.window == 2
    assert (new.warmup_steps, new.interval, new.tile_sizes) == (3, 5, (1, 16))
    assert torch.equal(new._expert_class.bool(), slow_expert_mask(4, 16, 0.25, 7))
    merged = new.all_reduced(lambda t: t)
    assert torch.equal(merged._expert_class, new._expert_class)
