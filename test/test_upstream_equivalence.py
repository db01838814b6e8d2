"""Where expert choice must be exactly token choice, it equals upstream SGLang's own routing.

``T' = 1`` valid row (capacity ``C = 1``: every expert takes the one token, which then keeps
its ``k`` best experts) and ``T' < min_tokens`` (the hybrid rule) must route exactly as
upstream's ``select_experts`` with expert choice off: same experts per token, same weights,
padding rows (index >= T') masked with id -1 as upstream masks them. Two paths give it:

* ``T >= min_tokens`` rows with ``T' < min_tokens`` valid: the hook runs expert choice and
  the kernel's device-side rule (capacity = T') makes it token choice (no host sync);
* ``T < min_tokens`` rows: the hook's host shortcut calls upstream directly.

Compared through ``sglang.srt.layers.moe.topk.select_experts`` with the plugin's hooks
applied and expert choice enabled by the real CLI flags, against the unwrapped upstream
function, for softmax and sigmoid scoring, DeepSeek-style grouped top-k with a correction
bias and routed scaling, renormalize on and off.
"""

import inspect

import pytest
import torch

sglang = pytest.importorskip("sglang")

from sglang.srt.plugins import load_plugins  # noqa: E402

from sglang_moe_routing.integration import expert_choice_hooks as ech  # noqa: E402

from sgl_helpers import published_args  # noqa: E402

E = 64
BIAS = torch.linspace(-0.05, 0.05, E)[torch.randperm(E, generator=torch.Generator().manual_seed(7))]

ROUTINGS = {
    "softmax-renorm": dict(top_k=4, renormalize=True),
    "softmax-no-renorm": dict(top_k=4, renormalize=False),
    "sigmoid-bias-renorm": dict(top_k=6, renormalize=True, scoring_func="sigmoid",
                                correction_bias=BIAS),
    "softmax-grouped-no-renorm": dict(top_k=6, renormalize=False, use_grouped_topk=True,
                                      num_expert_group=8, topk_group=3),
    "deepseek-renorm": dict(top_k=8, renormalize=True, use_grouped_topk=True,
                            num_expert_group=8, topk_group=4, scoring_func="sigmoid",
                            correction_bias=BIAS, routed_scaling_factor=2.5,
                            apply_routed_scaling_factor_on_output=True),
    "deepseek-no-renorm": dict(top_k=8, renormalize=False, use_grouped_topk=True,
                               num_expert_group=8, topk_group=4, scoring_func="sigmoid",
                               correction_bias=BIAS, routed_scaling_factor=2.5),
}

# (rows T, valid rows T' (None = all), extra flags, whether the EC kernel runs (device rule)
# or the hook's host shortcut hands the call to upstream)
# The default min-tokens is auto, max(32, ceil(4 * E / k)): 64, 43 and 32 here (k = 4, 6, 8).
CASES = {
    "T'=1, T>=min_tokens (device rule)": (80, 1, [], True),
    "T'=1, min_tokens=0 (capacity 1)": (48, 1, ["--expert-choice-min-tokens", "0"], True),
    "T=1, min_tokens=0 (capacity 1)": (1, None, ["--expert-choice-min-tokens", "0"], True),
    "T'<min_tokens<=T (device rule)": (80, 20, [], True),
    "T'<min_tokens<=T, custom min (device rule)": (40, 9, ["--expert-choice-min-tokens", "10"], True),
    "T'=1, T<min_tokens (host shortcut)": (16, 1, [], False),
    "T<min_tokens (host shortcut)": (16, None, [], False),
}


@pytest.fixture(scope="module", autouse=True)
def plugins_loaded():
    load_plugins()
    from sglang_moe_routing.integration import plugin

    plugin.install_feature_hooks(force=True)  # as a server with expert choice on
    yield


@pytest.fixture
def ec_calls(monkeypatch):
    calls = []
    real = ech.route_expert_choice

    def spy(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(ech, "route_expert_choice", spy)
    return calls


def _route(rows, valid, routing, extra_flags, seed):
    from sglang.srt.layers.moe import topk
    from sglang.srt.layers.moe.topk import TopK, TopKOutputFormat

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, E, generator=g) * 2
    logits[:, :4] += 1.5  # skewed, as real routers are
    hidden = torch.randn(rows, 16, generator=g)
    n = None if valid is None else torch.tensor(valid, dtype=torch.int32)
    kwargs = dict(layer_id=0, num_token_non_padded=n)
    with published_args("--enable-expert-choice", *extra_flags) as server_args:
        assert ech.active_config().enabled
        layer = TopK(layer_id=0, output_format=TopKOutputFormat.STANDARD, **routing)
        cfg = layer.topk_config
        # upstream's plain-torch router (its other non-grouped routers are GPU kernels)
        cfg.torch_native = not routing.get("use_grouped_topk", False)
        ours = topk.select_experts(hidden, logits.clone(), cfg, **kwargs)
        upstream = inspect.unwrap(topk.select_experts)
        assert upstream is not topk.select_experts  # the plugin's hook is installed
        ups = upstream(hidden, logits.clone(), cfg, **kwargs)
    del server_args
    return ours, ups


def _assert_same_routing(ours, ups, rows, valid):
    valid = rows if valid is None else valid
    ids_o, ids_u = ours.topk_ids.long(), ups.topk_ids.long()
    w_o, w_u = ours.topk_weights.float(), ups.topk_weights.float()
    assert ids_o.shape == ids_u.shape and w_o.shape == w_u.shape
    # valid rows: the same experts (upstream's order within a row is unspecified), and the
    # same weight for each expert
    so, io = ids_o[:valid].sort(-1)
    su, iu = ids_u[:valid].sort(-1)
    assert torch.equal(so, su)
    assert (so >= 0).all()
    torch.testing.assert_close(w_o[:valid].gather(1, io), w_u[:valid].gather(1, iu),
                               atol=1e-6, rtol=0)
    # padding rows: upstream's mask writes id -1 (on CPU and CUDA) and keeps the weights its
    # router computed for the padding logits; expert choice gives the same
    assert (ids_u[valid:] == -1).all()
    assert (ids_o[valid:] == -1).all()
    torch.testing.assert_close(w_o[valid:].sort(-1).values, w_u[valid:].sort(-1).values,
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("routing", list(ROUTINGS), ids=list(ROUTINGS))
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_expert_choice_equals_upstream_token_choice(routing, case, ec_calls):
    rows, valid, flags, device_rule = CASES[case]
    for seed in range(3):
        ours, ups = _route(rows, valid, ROUTINGS[routing], flags, seed)
        _assert_same_routing(ours, ups, rows, valid)
    # the path claimed was the one taken
    assert len(ec_calls) == (3 if device_rule else 0)


def test_expert_choice_differs_from_upstream_above_min_tokens(ec_calls):
    """Control: with T' >= min_tokens the same comparison fails (EC really routes)."""
    ours, ups = _route(80, 72, ROUTINGS["softmax-renorm"], [], 0)  # auto min-tokens: 64
    assert len(ec_calls) == 1
    with pytest.raises(AssertionError):
        _assert_same_routing(ours, ups, 80, 72)
    assert (ours.topk_ids[72:] == -1).all() and (ups.topk_ids[72:] == -1).all()
