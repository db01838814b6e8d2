"""Compute-cost-aware EPLB inside the installed sglang: flags, algorithm dispatch,
EPLBManager hooks and the profiling hook on the MoE layer."""

import argparse
import logging
import pickle

import pytest
import torch

sglang = pytest.importorskip("sglang")

from sglang.srt.plugins.hook_registry import HookRegistry  # noqa: E402

from sglang_moe_routing.eplb.compute_aware import compute_cost_aware_rebalance_experts  # noqa: E402
from sglang_moe_routing.eplb.profiler import (  # noqa: E402
    ExpertComputeProfiler,
    get_global_expert_compute_profiler,
    set_global_expert_compute_profiler,
)
from sglang_moe_routing.integration import config, plugin  # noqa: E402
from sglang_moe_routing.integration import eplb_hooks as eh  # noqa: E402
from sglang_moe_routing.integration import eplb_profiling_hooks as eph  # noqa: E402

from sgl_helpers import published_args  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def hooks_applied():
    plugin.register()
    HookRegistry.apply_hooks()
    plugin.install_feature_hooks(force=True)  # as a server with the features on
    yield


@pytest.fixture
def profiler_slot():
    set_global_expert_compute_profiler(None)
    yield
    set_global_expert_compute_profiler(None)
    eh._round_profiler = None
    eh._last_logical_count = None


def _prepare(*argv):
    from sglang.srt.server_args import prepare_server_args

    return prepare_server_args(["--model-path", "dummy", *argv])


def test_flags_reach_server_args_and_survive_pickling():
    sa = _prepare(
        "--enable-eplb", "--eplb-algorithm", "compute_aware_hierarchical", "--enable-expert-compute-profiling",
        "--eplb-compute-cost-alpha", "0.6", "--expert-compute-profiling-warmup-steps", "3",
        "--expert-compute-profiling-interval", "7", "--expert-compute-profiling-tile-sizes", "1,64",
        "--eplb-min-rebalancing-utilization-threshold", "0.9",
    )
    assert sa.eplb_algorithm == "compute_aware_hierarchical"
    sec = config.sections_from_server_args(sa)["eplb"]
    assert sec == eh.EplbComputeConfig(
        algorithm="compute_aware_hierarchical", alpha=0.6, enable_profiling=True, warmup_steps=3, interval=7,
        tile_sizes=(1, 64), min_rebalancing_utilization_threshold=0.9, enable_eplb=True,
    )
    assert config.sections_from_server_args(pickle.loads(pickle.dumps(sa)))["eplb"] == sec
    text = sec.describe()
    assert "compute_aware_hierarchical" in text and "alpha=0.6" in text and "0.9" in text
    assert "\n" not in text
    d = config.sections_from_server_args(_prepare())["eplb"]
    assert d == eh.EplbComputeConfig()  # defaults: upstream algorithm, profiling off


def test_flags_in_help_and_algorithm_help_extended():
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    text = parser.format_help()
    for flag in (
        "--enable-expert-compute-profiling", "--eplb-compute-cost-alpha",
        "--expert-compute-profiling-warmup-steps", "--expert-compute-profiling-interval",
    ):
        assert flag in text
    (action,) = [a for a in parser._actions if a.dest == "eplb_algorithm"]
    assert "compute_aware_hierarchical" in action.help


def test_existing_choices_are_extended_in_place():
    parser = argparse.ArgumentParser()
    action = parser.add_argument("--eplb-algorithm", choices=["auto", "deepseek"], default="auto")
    group = parser.add_argument_group("plugin")
    eh.add_cli_args(group)
    assert action.choices == ["auto", "deepseek", "compute_aware", "compute_aware_hierarchical"]
    assert parser.parse_args(["--eplb-algorithm", "compute_aware"]).eplb_algorithm == "compute_aware"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--eplb-compute-cost-alpha", "1.5"], r"--eplb-compute-cost-alpha must be in \[0, 1\]"),
        (["--eplb-compute-cost-alpha", "-0.1"], r"must be in \[0, 1\]"),
        (["--eplb-compute-cost-alpha", "nan"], r"must be in \[0, 1\]"),
        (["--expert-compute-profiling-warmup-steps", "-1"], ">= 0"),
        (["--expert-compute-profiling-interval", "0"], ">= 1"),
        (["--expert-compute-profiling-tile-sizes", "16,0"], "positive integers"),
        (["--expert-compute-profiling-tile-sizes", "a"], "positive integers"),
        (["--eplb-min-rebalancing-utilization-threshold", "1.2"], r"must be in \[0, 1\]"),
        (["--eplb-algorithm", "compute-aware"], "unknown; choose from"),
    ],
)
def test_bad_values_fail_at_startup(argv, message):
    with pytest.raises(ValueError, match=message):
        _prepare("--eplb-algorithm", "compute_aware", *argv) if "--eplb-algorithm" not in argv else _prepare(*argv)


def test_non_numbers_rejected_by_the_parser():
    with pytest.raises(SystemExit):
        _prepare("--eplb-compute-cost-alpha", "abc")


def test_parse_section_errors_are_all_listed():
    ns = argparse.Namespace(eplb_compute_cost_alpha=2.0, expert_compute_profiling_interval=0)
    with pytest.raises(ValueError) as e:
        eh.parse_section(ns)
    assert "alpha" in str(e.value) and "interval" in str(e.value)


def test_hook_targets_exist_in_installed_sglang():
    for target in (
        "sglang.srt.eplb.eplb_algorithms.compute_algorithm",
        "sglang.srt.eplb.eplb_algorithms.rebalance_experts",
        "sglang.srt.eplb.eplb_manager.EPLBManager._check_rebalance_needed",
        "sglang.srt.eplb.eplb_manager.EPLBManager._compute_expert_location_metadata",
        "sglang.srt.eplb.expert_distribution._ExpertDistributionRecorderReal.dump_record",
        "sglang.srt.model_executor.model_runner.ModelRunner.maybe_init_expert_location_metadata",
    ):
        assert target in HookRegistry._patched, target
    # the targets the profiling hooks will patch exist too
    from sglang.srt.layers.moe.ep_moe.layer import DeepEPMoE
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE
    from sglang.srt.model_executor.model_runner import ModelRunner

    assert callable(FusedMoE.run_moe_core) and callable(DeepEPMoE.run_moe_core) and callable(ModelRunner.forward)


def test_compute_algorithm_dispatch():
    from sglang.srt.eplb import eplb_algorithms as ea

    assert ea.compute_algorithm(raw_algorithm="compute_aware", num_groups=8, num_nodes=2) is (
        eh.ComputeAwareEplbAlgorithm.compute_aware
    )
    assert ea.compute_algorithm(raw_algorithm="compute_aware_hierarchical", num_groups=8, num_nodes=2) is (
        eh.ComputeAwareEplbAlgorithm.compute_aware_hierarchical
    )
    assert ea.compute_algorithm(raw_algorithm="deepseek", num_groups=8, num_nodes=2) is ea.EplbAlgorithm.deepseek
    assert ea.compute_algorithm(raw_algorithm="auto", num_groups=8, num_nodes=2) is (
        ea.EplbAlgorithm.deepseek_hierarchical
    )


def _window(seed=0, S=6, L=3, E=16):
    g = torch.Generator().manual_seed(seed)
    return torch.poisson(torch.rand(S, L, E, generator=g) * 200, generator=g)


def test_rebalance_dispatch_upstream_untouched_and_ours_without_costs_equals_deepseek(profiler_slot):
    from sglang.srt.eplb import eplb_algorithms as ea
    from sglang.srt.eplb.eplb_algorithms import deepseek

    lc = _window()
    kw = dict(tokens_per_expert=lc, num_physical_experts=24, num_local_physical_experts=6, num_groups=4, num_nodes=2)
    up = ea.rebalance_experts(**kw, algorithm=ea.EplbAlgorithm.deepseek_hierarchical)
    direct = deepseek.rebalance_experts(lc.sum(0), 24, 4, 2, 4, True)
    assert all(torch.equal(a, b) for a, b in zip(up, direct))
    with published_args("--eplb-algorithm", "compute_aware_hierarchical", "--eplb-compute-cost-alpha", "0.8"):
        ours = ea.rebalance_experts(**kw, algorithm=eh.ComputeAwareEplbAlgorithm.compute_aware_hierarchical)
    assert all(torch.equal(a, b) for a, b in zip(ours, up))  # no profiler: token counts only


def _heterogeneous_profiler(L, E, seed=0):
    """A profiler fitted on kernels where odd experts cost 4x per token."""
    g = torch.Generator().manual_seed(seed)
    prof = ExpertComputeProfiler(L, E, warmup_steps=0, num_classes=2, tile_sizes=(1,))
    for l in range(L):
        prof.set_expert_classes(l, [e % 2 for e in range(E)])
        for _ in range(10):
            for cls, per_tok in ((0, 0.001), (1, 0.004)):
                ids = torch.arange(cls, E, 2)
                n = torch.poisson(torch.rand(len(ids), generator=g) * 100, generator=g)
                prof.add_kernel_timing(l, n, 0.01 + per_tok * float(n.sum()), expert_ids=ids, expert_class=cls)
    return prof


def test_rebalance_uses_profiled_costs(profiler_slot):
    from sglang.srt.eplb import eplb_algorithms as ea

    L, E = 3, 16
    lc = _window(1, L=L, E=E)
    prof = _heterogeneous_profiler(L, E)
    set_global_expert_compute_profiler(prof)
    with published_args("--eplb-algorithm", "compute_aware", "--enable-expert-compute-profiling",
                        "--eplb-compute-cost-alpha", "0.7"):
        from sglang.srt.runtime_context import get_exec

        raw = get_exec().moe.eplb_algorithm  # what init_by_eplb reads in a scheduler process
        alg = ea.compute_algorithm(raw_algorithm=raw, num_groups=None, num_nodes=1)
        ours = ea.rebalance_experts(
            tokens_per_expert=lc, num_physical_experts=24, num_local_physical_experts=6,
            num_groups=None, num_nodes=1, algorithm=alg,
        )
    cost = prof.get_adjusted_expert_load(lc).double().sum(0)
    expect = compute_cost_aware_rebalance_experts(lc.sum(0), cost, 24, None, 1, 4, False, 0.7)
    assert all(torch.equal(a, b) for a, b in zip(ours, expect))
    ds = ea.rebalance_experts(
        tokens_per_expert=lc, num_physical_experts=24, num_local_physical_experts=6,
        num_groups=None, num_nodes=1, algorithm=ea.EplbAlgorithm.deepseek,
    )
    assert not torch.equal(ours[0], ds[0])
    b_ours = eh.placement_balancedness(lc, ours[0], 4, prof)
    b_ds = eh.placement_balancedness(lc, ds[0], 4, prof)
    assert b_ours["compute"] > b_ds["compute"]


def _metadata(p2l, ep_size):
    from sglang.srt.eplb.expert_location import ExpertLocationMetadata

    L, R = p2l.shape
    E = int(p2l.max()) + 1
    cnt = torch.zeros(L, E, dtype=torch.int64).scatter_add_(1, p2l, torch.ones_like(p2l))
    l2p = torch.full((L, E, int(cnt.max())), -1, dtype=torch.int64)
    fill = torch.zeros(L, E, dtype=torch.int64)
    for l in range(L):
        for s, e in enumerate(p2l[l].tolist()):
            l2p[l, e, fill[l, e]] = s
            fill[l, e] += 1
    return ExpertLocationMetadata._init_raw(ep_size=ep_size, physical_to_logical_map=p2l,
                                            logical_to_all_physical_map=l2p, moe_ep_rank=0)


def _manager():
    from sglang.srt.eplb.eplb_manager import EPLBManager

    return EPLBManager.__new__(EPLBManager)  # the hooks under test need no collaborators


def test_min_rebalancing_utilization_threshold_uses_compute_balancedness(profiler_slot):
    from sglang.srt.eplb.expert_distribution import _ExpertDistributionRecorderReal
    from sglang.srt.eplb.expert_location import set_global_expert_location_metadata

    assert hasattr(_ExpertDistributionRecorderReal.dump_record, "__wrapped__")  # our AFTER hook
    L, E, G = 2, 8, 4
    trivial = (torch.arange(8) % E).repeat(L, 1)
    prof = _heterogeneous_profiler(L, E)
    set_global_expert_compute_profiler(prof)
    uniform = torch.full((5, L, E), 100.0)  # equal tokens; odd experts cost 4x
    args = ("--eplb-algorithm", "compute_aware", "--enable-expert-compute-profiling",
            "--eplb-min-rebalancing-utilization-threshold", "0.9")
    with published_args(*args):
        set_global_expert_location_metadata(_metadata(trivial, G), allow_overwrite=True)
        # trivial placement puts experts (0,1), (2,3), ... on each GPU: compute balanced
        eh._after_dump_record({"logical_count": uniform})
        assert _manager()._check_rebalance_needed(None) is False
        # a placement with the slow experts together: compute imbalanced -> rebalance
        paired = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7]).repeat(L, 1)
        set_global_expert_location_metadata(_metadata(paired, G), allow_overwrite=True)
        assert eh.placement_balancedness(uniform, paired, G)["tokens"] == pytest.approx(1.0)
        assert _manager()._check_rebalance_needed(None) is True
        assert eh._round_profiler is not None  # merged statistics kept for the rebalance
    with published_args("--eplb-algorithm", "deepseek", "--eplb-min-rebalancing-utilization-threshold", "0.9"):
        # upstream algorithm: upstream's check (token utilization from the recorder) applies
        assert _manager()._check_rebalance_needed(0.95) is False
        assert _manager()._check_rebalance_needed(0.5) is True


def test_balancedness_logged_before_and_after(profiler_slot, caplog):
    from sglang.srt.eplb.expert_location import set_global_expert_location_metadata

    L, E, G = 2, 8, 4
    prof = _heterogeneous_profiler(L, E)
    set_global_expert_compute_profiler(prof)
    paired = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7]).repeat(L, 1)
    trivial = torch.arange(8).repeat(L, 1)
    lc = torch.full((5, L, E), 100.0)
    with published_args("--eplb-algorithm", "compute_aware", "--enable-expert-compute-profiling"):
        set_global_expert_location_metadata(_metadata(paired, G), allow_overwrite=True)
        new = _metadata(trivial, G)
        logging.getLogger("sglang_moe_routing").addHandler(caplog.handler)
        try:
            with caplog.at_level(logging.INFO, logger="sglang_moe_routing.eplb"):
                out = eh._around_compute_expert_location_metadata(lambda self, lc_, **kw: new, _manager(), lc,
                                                                  broadcast_over_world=False)
        finally:
            logging.getLogger("sglang_moe_routing").removeHandler(caplog.handler)
    assert out is new
    msg = [r.getMessage() for r in caplog.records if "balancedness" in r.getMessage()]
    assert msg, caplog.text
    before, after = msg[-1].split("before:")[1].split("| after:")
    # slow experts (4x) paired on 2 of 4 GPUs: times 2, 2, 8, 8 -> mean/max = 5/8
    assert "compute=0.625" in before and "compute=1.000" in after
    assert "tokens=1.000" in before and "tokens=1.000" in after


def test_profiling_hooks_only_installed_when_enabled(profiler_slot):
    from sglang.srt.eplb.expert_location import set_global_expert_location_metadata
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE

    class Runner:
        is_draft_worker = False

    if not eph._profiling_hooks_installed:
        assert not hasattr(FusedMoE.run_moe_core, "__wrapped__")
    with published_args("--eplb-algorithm", "compute_aware"):  # profiling off
        set_global_expert_location_metadata(_metadata(torch.arange(8).repeat(3, 1), 4), allow_overwrite=True)
        eph.after_init_expert_location(None, Runner())
        assert get_global_expert_compute_profiler() is None
    with published_args("--enable-expert-compute-profiling", "--expert-compute-profiling-interval", "3"):
        set_global_expert_location_metadata(_metadata(torch.arange(8).repeat(3, 1), 4), allow_overwrite=True)
        eph.after_init_expert_location(None, Runner())
        prof = get_global_expert_compute_profiler()
        assert prof is not None and (prof.num_layers, prof.num_experts, prof.interval) == (3, 8, 3)
    assert eph._profiling_hooks_installed
    assert hasattr(FusedMoE.run_moe_core, "__wrapped__")
    from sglang.srt.model_executor.model_runner import ModelRunner

    assert hasattr(ModelRunner.forward, "__wrapped__")


class _FakeLayer:
    def __init__(self, layer_id, ep_rank=0, ep_size=1, mapped=True):
        self.layer_id = layer_id
        self.moe_ep_rank = ep_rank
        self.moe_ep_size = ep_size
        self.dispatcher = type("D", (), {"local_expert_mapping": torch.zeros(1) if mapped else None,
                                         "skip_local_expert_mapping": False, "use_aiter_moe_runner": False})()
        self.w13_weight = torch.zeros(4, 6, 3)


def _dispatch(topk_ids):
    from sglang.srt.layers.moe.token_dispatcher.standard import StandardDispatchOutput
    from sglang.srt.layers.moe.topk import StandardTopKOutput

    topk = StandardTopKOutput(topk_weights=torch.ones_like(topk_ids, dtype=torch.float32), topk_ids=topk_ids,
                              router_logits=torch.zeros(topk_ids.shape[0], 8))
    return StandardDispatchOutput(hidden_states=torch.zeros(topk_ids.shape[0], 3), hidden_states_scale=None,
                                  topk_output=topk)


def test_moe_core_hook_records_local_slot_counts(profiler_slot):
    from sglang.srt.eplb.expert_location import set_global_expert_location_metadata

    p2l = torch.tensor([[3, 1, 0, 2, 1, 4, 5, 6, 7, 0]]).repeat(2, 1)  # 10 slots, 2 GPUs
    prof = ExpertComputeProfiler(2, 8, warmup_steps=0)
    set_global_expert_compute_profiler(prof)
    calls = []

    def original(layer, dispatch_output):
        calls.append(layer.layer_id)
        return "out"

    with published_args():
        set_global_expert_location_metadata(_metadata(p2l, 2), allow_overwrite=True)
        ids = torch.tensor([[0, 1], [1, 4], [9, -1], [2, 2]])
        # not a profiled pass: straight through, nothing recorded
        assert eph._around_run_moe_core(original, _FakeLayer(1), _dispatch(ids)) == "out"
        assert prof.num_pending == 0
        prof.begin_step()
        # EP=2, rank 1, ids already local (dispatcher mapped them): local slots 0..4
        assert eph._around_run_moe_core(original, _FakeLayer(1, ep_rank=1, ep_size=2), _dispatch(ids)) == "out"
        # EP=2, rank 1, global ids: slots 5..9 -> local 0..4
        eph._around_run_moe_core(original, _FakeLayer(0, ep_rank=1, ep_size=2, mapped=False), _dispatch(ids + 0))
        prof.end_step()
    assert calls == [1, 1, 0]
    s = prof.get_statistics_summary()
    assert s["samples"] == 2
    # layer 1, local ids 0,1,1,4,2,2 -> slots of rank 1 = experts 4,5,6,7,0 -> e4:1 e5:2 e0:1 e6:2
    assert s["tokens"][1].tolist() == [1, 0, 0, 0, 1, 2, 2, 0]
    # layer 0, global ids 9 -> slot 9 = expert 0 (others belong to rank 0)
    assert s["tokens"][0].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]


def test_forward_hook_counts_passes(profiler_slot):
    prof = ExpertComputeProfiler(1, 2, warmup_steps=1, interval=2)
    set_global_expert_compute_profiler(prof)
    seen = []

    class Runner:
        is_draft_worker = False

    def original(self, batch):
        seen.append(prof.is_profiling_step)
        return batch

    for i in range(5):
        assert eph._around_model_runner_forward(original, Runner(), i) == i
    assert seen == [False, True, False, True, False]
    Runner.is_draft_worker = True
    eph._around_model_runner_forward(original, Runner(), 0)
    assert seen[-1] is False and prof.get_statistics_summary()["steps"] == 5


def test_moe_core_hook_deepep_counts_and_nested_calls_time_once(profiler_slot):
    from sglang.srt.eplb.expert_location import set_global_expert_location_metadata
    from sglang.srt.layers.moe.token_dispatcher.deepep import DeepEPLLDispatchOutput

    p2l = torch.tensor([[3, 1, 0, 2, 1, 4, 5, 6, 7, 0]])
    prof = ExpertComputeProfiler(1, 8, warmup_steps=0)
    set_global_expert_compute_profiler(prof)
    ll = DeepEPLLDispatchOutput(hidden_states=torch.zeros(2, 3), hidden_states_scale=None,
                                topk_ids=torch.zeros(2, 2, dtype=torch.int64), topk_weights=torch.ones(2, 2),
                                masked_m=torch.tensor([4, 0, 2, 7, 1], dtype=torch.int32), expected_m=4)
    layer = _FakeLayer(0, ep_rank=1, ep_size=2)

    def inner(layer_, d):
        return "inner"

    def outer(layer_, d):  # DeepEPMoE.run_moe_core -> super().run_moe_core (also hooked)
        return eph._around_run_moe_core(inner, layer_, d)

    with published_args():
        set_global_expert_location_metadata(_metadata(p2l, 2), allow_overwrite=True)
        prof.begin_step()
        assert eph._around_run_moe_core(outer, layer, ll) == "inner"
        prof.end_step()
    s = prof.get_statistics_summary()
    assert s["samples"] == 1
    # rank 1 slots hold experts 4, 5, 6, 7, 0 with 4, 0, 2, 7, 1 tokens
    assert s["tokens"][0].tolist() == [1, 0, 0, 0, 4, 0, 2, 7]


def test_profiled_pass_runs_eagerly_and_graph_runners_come_back(profiler_slot):
    """Graph replays never enter Python: a profiled pass hides the graph runners for one pass
    (SGLang then runs it eagerly, as for a batch larger than any captured graph)."""
    prof = ExpertComputeProfiler(1, 2, warmup_steps=0, interval=2)
    set_global_expert_compute_profiler(prof)
    decode, prefill = object(), object()

    class Runner:
        is_draft_worker = False
        decode_cuda_graph_runner = decode
        prefill_cuda_graph_runner = prefill

    runner, seen = Runner(), []

    def original(self):
        seen.append((self.decode_cuda_graph_runner, self.prefill_cuda_graph_runner))
        if len(seen) == 3:
            raise RuntimeError("forward failed")

    eph._around_model_runner_forward(original, runner)  # step 0: profiled
    eph._around_model_runner_forward(original, runner)  # step 1: not
    with pytest.raises(RuntimeError):
        eph._around_model_runner_forward(original, runner)  # step 2: profiled, raises
    assert seen == [(None, None), (decode, prefill), (None, None)]
    assert (runner.decode_cuda_graph_runner, runner.prefill_cuda_graph_runner) == (decode, prefill)

