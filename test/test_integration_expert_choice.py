"""Expert choice inside the real installed sglang: plugin discovery, flags, TopK layer."""

import argparse
import os
import pickle
import subprocess
import sys

import pytest
import torch

sglang = pytest.importorskip("sglang")

from sglang.srt.plugins import load_plugins  # noqa: E402
from sglang.srt.plugins.hook_registry import HookRegistry  # noqa: E402

from sglang_moe_routing.expert_choice import (  # noqa: E402
    RoutingSpec,
    expert_choice_topk_reference,
    token_choice_topk_reference,
)
from sglang_moe_routing.integration import config  # noqa: E402
from sglang_moe_routing.integration import expert_choice_hooks as ech  # noqa: E402
from sglang_moe_routing.integration import expert_choice_flags as ecf  # noqa: E402

from sgl_helpers import published_args  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def plugins_loaded():
    load_plugins()  # discovers our entry point; cold hooks only
    from sglang_moe_routing.integration import plugin

    plugin.install_feature_hooks(force=True)  # as a server with expert choice on
    yield


def test_plugin_discovered_through_entry_point():
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == "moe_routing"]
    assert eps and eps[0].value == "sglang_moe_routing.integration.plugin:register"
    assert "sglang.srt.layers.moe.topk.select_experts" in HookRegistry._patched
    from sglang.srt.layers.moe import topk

    assert topk.select_experts.__wrapped__ is not None  # our AROUND wrapper is installed


def test_flags_in_help():
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    text = parser.format_help()
    for flag in ("--enable-expert-choice", "--expert-capacity-factor", "--expert-choice-min-tokens"):
        assert flag in text


@pytest.mark.slow
def test_launch_server_help_lists_flags():
    out = subprocess.run(
        [sys.executable, "-m", "sglang.launch_server", "--help"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--enable-expert-choice" in out.stdout
    assert "--expert-capacity-factor" in out.stdout


def test_flags_reach_server_args_and_survive_pickling():
    from sglang.srt.server_args import prepare_server_args

    sa = prepare_server_args(
        ["--model-path", "dummy", "--enable-expert-choice", "--expert-capacity-factor", "2",
         "--expert-choice-min-tokens", "8"]
    )
    sec = config.sections_from_server_args(sa)["expert_choice"]
    assert sec.enabled and sec.capacity_factor == 2.0 and sec.min_tokens == 8
    assert sec.source == "cli"
    # scheduler subprocesses receive the record pickled
    sa2 = pickle.loads(pickle.dumps(sa))
    assert config.sections_from_server_args(sa2)["expert_choice"] == sec
    # defaults: off, 1.25, 32
    d = config.sections_from_server_args(prepare_server_args(["--model-path", "dummy"]))
    assert d["expert_choice"] == ecf.ExpertChoiceConfig(enabled=False)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--expert-capacity-factor", "0"], "must be a finite number > 0"),
        (["--expert-capacity-factor", "-1.5"], "must be a finite number > 0"),
        (["--expert-capacity-factor", "abc"], "must be a number"),
        (["--expert-capacity-factor", "inf"], "finite"),
        (["--expert-choice-min-tokens", "x"], "must be an integer"),
        (["--expert-choice-min-tokens", "-3"], ">= 0"),
    ],
)
def test_bad_values_fail_at_startup(argv, message):
    from sglang.srt.server_args import prepare_server_args

    with pytest.raises(ValueError, match=message):
        prepare_server_args(["--model-path", "dummy", "--enable-expert-choice", *argv])


def test_env_var_opt_in(monkeypatch):
    from sglang.srt.server_args import prepare_server_args

    monkeypatch.setenv("SGLANG_EXPERT_CHOICE", "1")
    monkeypatch.setenv("SGLANG_EXPERT_CAPACITY_FACTOR", "1.5")
    sec = config.sections_from_server_args(prepare_server_args(["--model-path", "dummy"]))[
        "expert_choice"
    ]
    assert sec.enabled and sec.source == "env" and sec.capacity_factor == 1.5
    monkeypatch.setenv("SGLANG_EXPERT_CAPACITY_FACTOR", "-2")
    with pytest.raises(ValueError, match="> 0"):
        prepare_server_args(["--model-path", "dummy"])


def _make_topk(**kw):
    from sglang.srt.layers.moe.topk import TopK, TopKOutputFormat

    return TopK(layer_id=kw.pop("layer_id", 0), output_format=TopKOutputFormat.STANDARD, **kw)


def _upstream_select_experts():
    from sglang.srt.layers.moe import topk

    return topk.select_experts.__wrapped__


def test_topk_layer_routes_expert_choice_when_enabled():
    torch.manual_seed(0)
    x = torch.randn(128, 16)
    x[:, :2] += 2.0
    h = torch.randn(128, 32)
    with published_args("--enable-expert-choice", "--expert-capacity-factor", "1.25"):
        layer = _make_topk(top_k=4, renormalize=True)
        out = layer(h, x)
        w_ref, ids_ref = expert_choice_topk_reference(x, RoutingSpec(4, 1.25, min_tokens=32))
        assert torch.equal(out.topk_ids, ids_ref)
        torch.testing.assert_close(out.topk_weights, w_ref)
        assert out.router_logits is x
        # small batches (T < min_tokens) keep standard routing
        out_small = layer(h[:8], x[:8])
        _, ids_tc = token_choice_topk_reference(x[:8], RoutingSpec(4))
        assert torch.equal(out_small.topk_ids.sort(-1).values, ids_tc.sort(-1).values)


@pytest.mark.parametrize("value, e, k, want", [
    (None, 128, 8, 64), ("auto", 64, 8, 32), ("AUTO", 256, 8, 128), (" auto ", 8, 2, 32),
    (None, 60, 4, 60), (None, 160, 6, 107), ("0", 256, 8, 0), ("48", 128, 8, 48)])
def test_min_tokens_auto_is_max_32_and_4_slots_per_expert(value, e, k, want):
    cfg = ecf.config_from_values(True, None, value, environ={})
    assert cfg.min_tokens_for(e, k) == want
    assert ("auto (max(32, 4 * E / top_k) per layer)" in cfg.describe()) == (
        value is None or value.strip().lower() == "auto")


def test_min_tokens_bad_value_names_the_flag_and_auto():
    with pytest.raises(ValueError, match=r"--expert-choice-min-tokens must be an integer or "
                                         r"auto, got 'sometimes'"):
        ecf.config_from_values(True, None, "sometimes", environ={})
    with pytest.raises(ValueError, match=r"SGLANG_EXPERT_CHOICE_MIN_TOKENS must be >= 0"):
        ecf.config_from_values(True, None, None, environ={"SGLANG_EXPERT_CHOICE_MIN_TOKENS": "-1"})
    env = ecf.config_from_values(True, None, None, environ={"SGLANG_EXPERT_CHOICE_MIN_TOKENS": "auto"})
    assert env.min_tokens is None


def test_topk_layer_auto_min_tokens_keeps_token_choice_below_4_slots_per_expert():
    """E = 128, k = 8: auto = 64. A 48-token batch routes exactly as upstream (token choice),
    a 64-token batch by expert choice; an explicit --expert-choice-min-tokens 32 routes both
    by expert choice."""
    torch.manual_seed(5)
    x = torch.randn(64, 128)
    x[:, :4] += 1.5
    h = torch.randn(64, 32)
    with published_args("--enable-expert-choice"):
        layer = _make_topk(top_k=8, renormalize=True)
        small, big = layer(h[:48], x[:48]), layer(h, x)
    layer.topk_config.torch_native = True
    ups = _upstream_select_experts()(hidden_states=h[:48], router_logits=x[:48],
                                     topk_config=layer.topk_config, layer_id=0)
    assert torch.equal(small.topk_ids, ups.topk_ids)
    assert torch.equal(small.topk_weights, ups.topk_weights)
    _, ids_ec = expert_choice_topk_reference(x, RoutingSpec(8, 1.25, min_tokens=64))
    assert torch.equal(big.topk_ids, ids_ec)
    _, ids_ec48 = expert_choice_topk_reference(x[:48], RoutingSpec(8, 1.25, min_tokens=32))
    assert not torch.equal(ids_ec48.sort(-1).values, ups.topk_ids.sort(-1).values)
    with published_args("--enable-expert-choice", "--expert-choice-min-tokens", "32"):
        layer32 = _make_topk(top_k=8, renormalize=True)
        assert torch.equal(layer32(h[:48], x[:48]).topk_ids, ids_ec48)


def test_topk_layer_off_is_identical_to_upstream():
    torch.manual_seed(1)
    x = torch.randn(96, 8)
    h = torch.randn(96, 32)
    with published_args():
        layer = _make_topk(top_k=2, renormalize=True)
        ours = layer(h, x)
        layer.topk_config.torch_native = True
        ups = _upstream_select_experts()(
            hidden_states=h, router_logits=x, topk_config=layer.topk_config, layer_id=0
        )
        assert torch.equal(ours.topk_ids, ups.topk_ids)
        assert torch.equal(ours.topk_weights, ups.topk_weights)
        # and that is token choice, not expert choice
        _, ids_ec = expert_choice_topk_reference(x, RoutingSpec(2, 1.25))
        assert not torch.equal(ours.topk_ids.sort(-1).values, ids_ec.sort(-1).values)


def test_deepseek_style_grouped_biased_sigmoid():
    torch.manual_seed(2)
    e, k = 64, 6
    bias = torch.randn(e) * 0.05
    x = torch.randn(200, e)
    h = torch.randn(200, 32)
    kw = dict(top_k=k, use_grouped_topk=True, num_expert_group=8, topk_group=3,
              renormalize=True, scoring_func="sigmoid", correction_bias=bias,
              routed_scaling_factor=2.5, apply_routed_scaling_factor_on_output=True)
    with published_args("--enable-expert-choice"):
        out = _make_topk(**kw)(h, x)
    w_ref, ids_ref = expert_choice_topk_reference(x, RoutingSpec(
        k, 1.25, scoring_func="sigmoid", num_expert_group=8, topk_group=3,
        correction_bias=bias, routed_scaling_factor=2.5,
        apply_routed_scaling_factor_on_output=True,
    ))
    assert torch.equal(out.topk_ids, ids_ref)
    torch.testing.assert_close(out.topk_weights, w_ref)
    torch.testing.assert_close(out.topk_weights.sum(-1), torch.full((200,), 2.5))


def test_padding_rows_masked_like_upstream():
    torch.manual_seed(3)
    x = torch.randn(64, 8)
    h = torch.randn(64, 32)
    n = torch.tensor(40)
    with published_args("--enable-expert-choice"):
        out = _make_topk(top_k=2)(h, x, num_token_non_padded=n)
    _, ids_ref = expert_choice_topk_reference(x[:40], RoutingSpec(2, 1.25))
    assert torch.equal(out.topk_ids[:40], ids_ref)
    assert (out.topk_ids[40:] == -1).all()  # upstream's padding mask ran


def test_eplb_logical_to_physical_and_recorder():
    from sglang.srt.eplb import expert_distribution
    from sglang.srt.eplb.expert_location_dispatch import ExpertLocationDispatchInfo

    torch.manual_seed(4)
    e = 8
    perm = torch.randperm(e).to(torch.int32)
    info = ExpertLocationDispatchInfo(
        ep_dispatch_algorithm="static",
        partial_logical_to_rank_dispatch_physical_map=perm,
        partial_logical_to_all_physical_map=perm.view(e, 1),
        partial_logical_to_all_physical_map_num_valid=torch.ones(e, dtype=torch.int32),
        num_physical_experts=e,
    )
    seen = []

    class Recorder:
        def on_select_experts(self, topk_ids):
            seen.append(topk_ids.clone())

    x = torch.randn(64, e)
    with published_args("--enable-expert-choice"):  # the recorder lives in the runtime context
        expert_distribution.set_global_expert_distribution_recorder(Recorder())
        out = _make_topk(top_k=2)(torch.randn(64, 4), x, expert_location_dispatch_info=info)
    _, ids_ref = expert_choice_topk_reference(x, RoutingSpec(2, 1.25, min_tokens=32))
    assert torch.equal(out.topk_ids, perm[ids_ref.long()])
    assert len(seen) == 1 and torch.equal(seen[0], out.topk_ids)


def test_model_config_opt_in(tmp_path):
    """``use_expert_choice: true`` in the HF config turns EC on (real ModelConfig)."""
    import json

    from sglang.srt.configs.model_config import ModelConfig

    cfg = {
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
        "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 16, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 1, "num_experts": 8,
        "num_experts_per_tok": 2, "vocab_size": 128, "max_position_embeddings": 64,
        "use_expert_choice": True, "expert_capacity_factor": 2.0, "torch_dtype": "float32",
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    old = ech._model_opt_in
    try:
        with published_args():
            assert not ech.active_config().enabled
            ModelConfig(model_path=str(tmp_path))
            active = ech.active_config()
            assert active.enabled and active.source == "model-config"
            assert active.capacity_factor == 2.0
    finally:
        ech._model_opt_in = old


class _Runner:
    is_draft_worker = False


def test_load_stats_logged_per_served_pass_and_capture_counts_dropped(caplog):
    """Counts are device buffers; the log line comes from the ModelRunner.forward hook, which
    runs for every served pass (graph replays included); capture/warm-up counts are dropped."""
    import logging

    torch.manual_seed(5)
    x = torch.randn(64, 8)
    x[:, 0] += 3
    ech.reset_expert_choice_load_stats()
    ech._stats.served = False
    with published_args("--enable-expert-choice", "--expert-choice-stats-interval", "2"):
        layer = _make_topk(top_k=2)
        layer(torch.randn(64, 4), x)  # a warm-up / capture pass: model.forward, not ModelRunner
        assert sum(ech.get_expert_choice_load_stats()[0]["tokens_per_expert"]) == 128
        logging.getLogger("sglang_moe_routing").addHandler(caplog.handler)
        served = lambda runner, n: layer(torch.randn(n, 4), x[:n])
        with caplog.at_level(logging.INFO, logger="sglang_moe_routing"):
            ech._around_model_runner_forward(served, _Runner(), 64)
            stats = ech.get_expert_choice_load_stats()  # warm-up counts were dropped
            assert stats[0]["tokens_per_expert"] == torch.bincount(
                expert_choice_topk_reference(x, RoutingSpec(2, 1.25))[1].flatten().long(), minlength=8
            ).tolist()
            assert not any("expert-choice load" in r.message for r in caplog.records)
            ech._around_model_runner_forward(served, _Runner(), 8)  # below min-tokens: TC, uncounted
        logging.getLogger("sglang_moe_routing").removeHandler(caplog.handler)
    lines = [r.message for r in caplog.records if "expert-choice load layer 0" in r.message]
    assert len(lines) == 1 and "last 2 forward passes" in lines[0] and "tokens=128 " in lines[0]
    assert sum(ech.get_expert_choice_load_stats()[0]["tokens_per_expert"]) == 0  # reset after the line


def test_stats_buffer_allocated_inside_capture_is_zeroed_before_serving(monkeypatch):
    collector = ech.LoadStatsCollector()
    monkeypatch.setattr(config, "capturing_cuda_graph", lambda: True)
    collector.add(0, torch.tensor([[0, 1]]), 4, None)  # torch.empty: no zero-fill kernel
    assert collector.dirty
    monkeypatch.setattr(config, "capturing_cuda_graph", lambda: False)
    collector.reset()
    assert not collector.dirty and collector.counts[0].tolist() == [0, 0, 0, 0]


def test_stats_hook_only_with_stats_interval():
    from sglang_moe_routing.integration import forward_pass

    with published_args("--enable-expert-choice"):
        ech._after_load_model(None, _Runner())
    assert ech._around_model_runner_forward not in forward_pass.wrappers() or ech._stats.served is not None
    with published_args("--enable-expert-choice", "--expert-choice-stats-interval", "5",
                        "--expert-choice-backend", "reference"):
        ech._after_load_model(None, _Runner())
    assert ech._around_model_runner_forward in forward_pass.wrappers()
    from sglang.srt.model_executor.model_runner import ModelRunner

    assert hasattr(ModelRunner.forward, "__wrapped__")


def test_two_features_share_the_forward_hook():
    """HookRegistry patches a target once: a second feature's own hook on ModelRunner.forward
    would be skipped silently. Both go through forward_pass and both run."""
    from sglang_moe_routing.integration import forward_pass

    seen = []

    def w1(call, runner, *a, **k):
        seen.append("w1")
        return call(runner, *a, **k)

    def w2(call, runner, *a, **k):
        seen.append("w2")
        return call(runner, *a, **k)

    forward_pass.add_wrapper(w1)
    forward_pass.add_wrapper(w2)
    try:
        out = forward_pass._around_forward(lambda r, v: v + 1, _Runner(), 1)
        assert out == 2 and seen == ["w1", "w2"]
    finally:
        forward_pass._wrappers.remove(w1)
        forward_pass._wrappers.remove(w2)


def _shared_topk_config(k, n_shared=1, **kw):
    import dataclasses

    from sglang.srt.configs.shared_experts import SharedExpertsConfig

    cfg = _make_topk(top_k=k, **kw).topk_config
    return dataclasses.replace(
        cfg, top_k=k + n_shared,
        shared_experts=SharedExpertsConfig(num_fused_shared_experts=n_shared))


@pytest.mark.parametrize("fused_scaling", [True, False])
def test_fused_shared_expert_slot_kept_routed_slots_expert_choice(fused_scaling):
    """DeepSeek V3/R1 with shared-expert fusion: EC routes the routed slots, the shared slot
    is the one upstream's router writes (id E, weight fused_shared_expert_weight)."""
    from sglang.srt.layers.moe import topk as sgl_topk

    torch.manual_seed(7)
    e, k, t = 32, 4, 96
    bias = torch.randn(e) * 0.05
    x, h = torch.randn(t, e), torch.randn(t, 16)
    kw = dict(use_grouped_topk=True, num_expert_group=4, topk_group=2, renormalize=True,
              scoring_func="sigmoid", correction_bias=bias, routed_scaling_factor=2.5,
              apply_routed_scaling_factor_on_output=fused_scaling)
    with published_args("--enable-expert-choice"):
        cfg = _shared_topk_config(k, **kw)
        out = sgl_topk.select_experts(hidden_states=h, router_logits=x, topk_config=cfg, layer_id=0)
        ups = _upstream_select_experts()(hidden_states=h, router_logits=x, topk_config=cfg, layer_id=0)
    w_ref, ids_ref = expert_choice_topk_reference(x, RoutingSpec(
        k, 1.25, scoring_func="sigmoid", num_expert_group=4, topk_group=2,
        correction_bias=bias, routed_scaling_factor=2.5,
        apply_routed_scaling_factor_on_output=fused_scaling))
    assert out.topk_ids.shape == (t, k + 1)
    assert torch.equal(out.topk_ids[:, :k], ids_ref)
    torch.testing.assert_close(out.topk_weights[:, :k], w_ref)
    # the shared column is exactly what upstream's router writes
    assert torch.equal(out.topk_ids[:, k], ups.topk_ids[:, k])
    torch.testing.assert_close(out.topk_weights[:, k], ups.topk_weights[:, k])
    assert (out.topk_ids[:, k] == e).all()


def test_fused_shared_slot_below_min_tokens_equals_upstream():
    from sglang.srt.layers.moe import topk as sgl_topk

    torch.manual_seed(8)
    e, k = 16, 2
    x, h = torch.randn(8, e), torch.randn(8, 16)
    kw = dict(use_grouped_topk=True, num_expert_group=4, topk_group=2, scoring_func="sigmoid",
              correction_bias=torch.randn(e) * 0.05, routed_scaling_factor=2.5)
    with published_args("--enable-expert-choice"):
        cfg = _shared_topk_config(k, **kw)
        out = sgl_topk.select_experts(hidden_states=h, router_logits=x, topk_config=cfg, layer_id=0)
        ups = _upstream_select_experts()(hidden_states=h, router_logits=x, topk_config=cfg, layer_id=0)
    assert torch.equal(out.topk_ids, ups.topk_ids)
    assert torch.equal(out.topk_weights, ups.topk_weights)


def test_select_experts_hook_passes_unknown_keywords_through():
    """A new upstream keyword must reach upstream untouched (EC off and EC fallback)."""
    seen = {}

    def original(*args, **kwargs):
        seen.update(kwargs)
        return "upstream"

    with published_args():
        cfg = _make_topk(top_k=2).topk_config
        assert ech._around_select_experts(original, torch.zeros(4, 8), torch.zeros(4, 8), cfg,
                                          layer_id=0, new_upstream_kw=1) == "upstream"
    assert seen["new_upstream_kw"] == 1
    seen.clear()
    with published_args("--enable-expert-choice"):  # 4 rows < min-tokens: upstream
        ech._around_select_experts(original, torch.zeros(4, 8), torch.zeros(4, 8), cfg,
                                   layer_id=0, new_upstream_kw=2)
    assert seen["new_upstream_kw"] == 2


def test_load_stats_buffers_are_reset_in_place():
    """A CUDA graph captured with a counter keeps writing to it: reset must not replace it."""
    collector = ech.LoadStatsCollector()
    ids = torch.tensor([[0, 1], [1, 2]], dtype=torch.int32)
    collector.add(3, ids, 4, None)
    buf = collector.counts[3]
    collector.add(3, ids, 4, None)
    assert buf.tolist() == [2, 4, 2, 0]
    collector.reset()
    assert collector.counts[3] is buf and buf.tolist() == [0, 0, 0, 0]
    collector.add(3, ids, 4, torch.tensor(1))  # padding row 1 ignored
    assert collector.summary()[3]["tokens_per_expert"] == [1, 1, 0, 0]


@pytest.mark.parametrize("extra, named", [
    (["--enable-dp-attention", "--dp-size", "2", "--tp", "2"], "--enable-dp-attention"),
    (["--attn-cp-size", "2", "--tp", "2"], "--attn-cp-size"),
    (["--enable-prefill-cp"], "--enable-prefill-cp"),
])
def test_expert_choice_refused_where_sglang_passes_no_real_token_count(tmp_path, extra, named):
    """Under attention DP / CP upstream gives select_experts num_token_non_padded=None for
    padded, gathered batches: EC would route padding rows. Refused at start-up, one line."""
    from sglang.srt.server_args import prepare_server_args

    from sglang_moe_routing.tools import models

    models.build("qwen3_moe", str(tmp_path), size="small", dtype=torch.float32)
    base = ["--model-path", str(tmp_path), "--device", "cpu", "--skip-tokenizer-init"]
    prepare_server_args(base + extra)  # upstream alone accepts the mode
    with pytest.raises(ValueError, match=f"expert-choice routing \\(cli\\) cannot run with {named}"):
        prepare_server_args(base + extra + ["--enable-expert-choice"])


def test_padding_rows_with_and_without_real_token_count():
    """With the count, padding rows never count (masked, excluded from capacity); the mode
    test above covers where upstream has no count. Without any count all rows are real."""
    torch.manual_seed(9)
    x = torch.randn(64, 8)
    h = torch.randn(64, 32)
    with published_args("--enable-expert-choice"):
        layer = _make_topk(top_k=2)
        padded = layer(h, x, num_token_non_padded=torch.tensor(33))
        alone = layer(h[:33], x[:33])
        whole = layer(h, x)
    assert torch.equal(padded.topk_ids[:33], alone.topk_ids)
    assert (padded.topk_ids[33:] == -1).all()
    _, ids_all = expert_choice_topk_reference(x, RoutingSpec(2, 1.25))
    assert torch.equal(whole.topk_ids, ids_all)


def test_draft_layers_route_with_token_choice():
    """Speculative decoding: the draft / MTP TopK layers keep token choice (their proposals
    must not depend on the batch); the target model's layers use expert choice."""
    torch.manual_seed(10)
    x, h = torch.randn(64, 8), torch.randn(64, 16)
    with published_args("--enable-expert-choice"):
        draft = _make_topk(top_k=2, is_draft=True)
        target = _make_topk(top_k=2, is_draft=False)
        out_d, out_t = draft(h, x), target(h, x)
        ups = _upstream_select_experts()(hidden_states=h, router_logits=x,
                                         topk_config=draft.topk_config, layer_id=0)
    assert torch.equal(out_d.topk_ids, ups.topk_ids)
    assert torch.equal(out_t.topk_ids, expert_choice_topk_reference(x, RoutingSpec(2, 1.25))[1])


def test_startup_lists_layers_that_do_not_route_with_expert_choice(caplog):
    import logging

    from sglang.srt.layers.moe.topk import TopKOutputFormat

    with published_args("--enable-expert-choice", "--expert-choice-backend", "reference"):
        layers = torch.nn.ModuleList([
            _make_topk(top_k=2, layer_id=0),
            _make_topk(top_k=2, layer_id=1, is_draft=True),
            _make_topk(top_k=2, layer_id=2, scoring_func="sqrtsoftplus"),
            _make_topk(top_k=2, layer_id=3),
        ])
        layers[3].topk_config.output_format = TopKOutputFormat.TRITON_KERNEL

        class Runner:
            is_draft_worker = False
            device = "cpu"
            model = layers

        logging.getLogger("sglang_moe_routing").addHandler(caplog.handler)
        try:
            with caplog.at_level(logging.INFO, logger="sglang_moe_routing"):
                ech._after_load_model(None, Runner())
        finally:
            logging.getLogger("sglang_moe_routing").removeHandler(caplog.handler)
    text = "\n".join(r.message for r in caplog.records)
    assert "expert choice routes 1 of 4 MoE (TopK) layers" in text
    assert "layer 1: draft / MTP layers" in text
    assert "layer 2: scoring_func='sqrtsoftplus'" in text
    assert "layer 3: MoE runner output format TRITON_KERNEL" in text
    assert "layer 0:" not in text


_OFF_PROBE = r'''
import json, sys
from sglang.srt.plugins import load_plugins
from sglang.srt.plugins.hook_registry import HookRegistry
load_plugins()
from sglang_moe_routing.integration import config, plugin
with config.published_server_args(*sys.argv[1:]):
    targets = plugin.install_feature_hooks()
from sglang.srt.layers.moe import topk
from sglang.srt.eplb import eplb_algorithms
print(json.dumps({"targets": targets, "patched": sorted(HookRegistry._patched),
                  "select_experts_wrapped": hasattr(topk.select_experts, "__wrapped__"),
                  "rebalance_wrapped": hasattr(eplb_algorithms.rebalance_experts, "__wrapped__")}))
'''


@pytest.mark.parametrize("argv, routing_hooked", [
    ([], False),
    (["--eplb-algorithm", "deepseek"], False),
    (["--enable-expert-choice"], True),
])
def test_features_off_install_no_routing_or_eplb_hook(argv, routing_hooked):
    """With every feature off the plugin hooks nothing on the routing/EPLB path (a fresh
    process: upstream select_experts and EPLB functions stay the originals)."""
    import json

    out = subprocess.run([sys.executable, "-c", _OFF_PROBE, *argv], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["select_experts_wrapped"] is routing_hooked
    assert not got["rebalance_wrapped"]
    feature_targets = [t for t in got["patched"] if "topk" in t or "eplb" in t
                       or "ModelRunner.forward" in t or "load_model" in t]
    assert bool(feature_targets) is routing_hooked, feature_targets


def test_self_check_names_feature_symbol_and_version(monkeypatch):
    """A missing upstream piece fails start-up with one line: feature, symbol, versions."""
    from sglang.srt.layers.moe import topk as sgl_topk

    from sglang_moe_routing.integration import plugin

    monkeypatch.delattr(sgl_topk, "fused_shared_expert_weight")
    with published_args("--enable-expert-choice"):
        with pytest.raises(RuntimeError) as exc:
            plugin.install_feature_hooks()
    msg = str(exc.value)
    assert "\n" not in msg
    assert "expert-choice routing: sglang.srt.layers.moe.topk.fused_shared_expert_weight" in msg
    assert plugin.SUPPORTED_SGLANG in msg and "found 0.5.23" in msg


@pytest.mark.parametrize("grouped", [True, False])
def test_routing_spec_built_from_topk_config_and_plugin_settings(grouped):
    """routing_spec: every TopKConfig field EC uses, plus the plugin's capacity factor and
    min tokens; group fields only when the layer uses grouped top-k (as upstream)."""
    from sglang.srt.layers.moe.topk import TopKConfig

    bias = torch.randn(16)
    tk = TopKConfig(top_k=4, use_grouped_topk=grouped, num_expert_group=4, topk_group=2,
                    renormalize=False, scoring_func="sigmoid", correction_bias=bias,
                    routed_scaling_factor=2.5, apply_routed_scaling_factor_on_output=True)
    cfg = ecf.ExpertChoiceConfig(enabled=True, capacity_factor=1.5, min_tokens=7)
    spec = ech.routing_spec(tk, cfg, 3, bias, 16)
    assert isinstance(spec, RoutingSpec)
    assert (spec.top_k, spec.capacity_factor, spec.min_tokens) == (3, 1.5, 7)
    auto = ech.routing_spec(tk, ecf.ExpertChoiceConfig(enabled=True), 3, bias, 160)
    assert auto.min_tokens == 214  # ceil(4 * 160 / 3)
    assert (spec.renormalize, spec.scoring_func) == (False, "sigmoid")
    assert (spec.num_expert_group, spec.topk_group) == ((4, 2) if grouped else (None, None))
    assert spec.correction_bias is bias
    assert spec.routed_scaling_factor == 2.5 and spec.apply_routed_scaling_factor_on_output


def test_gpu_server_models_keep_a_min_tokens_of_32_under_auto():
    """test_gpu_server.py's batch sizes (below-min requests, a 40-request decode batch above)
    assume its models' thresholds are 32 under the auto default."""
    from sglang_moe_routing.tools import models

    cfg = ecf.ExpertChoiceConfig(enabled=True)
    qwen, ds = models.QWEN3_SIZES["medium"], models.DEEPSEEK_V3
    assert cfg.min_tokens_for(qwen["num_experts"], qwen["num_experts_per_tok"]) == 32
    assert cfg.min_tokens_for(ds["n_routed_experts"], ds["num_experts_per_tok"]) == 32
