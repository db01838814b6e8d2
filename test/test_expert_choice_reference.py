"""Properties of the expert-choice reference (core: torch only, no sglang)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_moe_routing.expert_choice import (
    RoutingSpec,
    expert_choice_topk,
    expert_choice_topk_reference as ec,
    expert_load,
    routing_fidelity,
    token_choice_topk_reference as tc,
)
from sglang_moe_routing.expert_choice.reference import capacity, compute_scores


def _brute_force(logits, k, cf, t_valid, bias=None, scoring="softmax", renorm=True):
    """Loop implementation of the contract (steps 2-5), independent of the vectorised code."""
    s, sel = compute_scores(logits, scoring, bias)
    t, e = s.shape
    c = min(t_valid, math.ceil(cf * t_valid * k / e - 1e-9))
    picked = [[False] * e for _ in range(t)]
    for j in range(e):
        col = sorted(range(t_valid), key=lambda i: (-sel[i, j].item(), i))
        for i in col[:c]:
            picked[i][j] = True
    ids = []
    for i in range(t):
        order = sorted(range(e), key=lambda j: (not picked[i][j], -sel[i, j].item(), j))
        ids.append(order[:k])
    ids = torch.tensor(ids, dtype=torch.long)
    w = torch.gather(s, 1, ids)
    if renorm:
        w = w / w.sum(-1, keepdim=True)
    return w, ids


@settings(max_examples=60, deadline=None)
@given(
    t=st.integers(1, 40),
    e=st.integers(2, 12),
    data=st.data(),
)
def test_matches_brute_force(t, e, data):
    k = data.draw(st.integers(1, e))
    cf = data.draw(st.sampled_from([0.25, 1.0, 1.25, 2.0]))
    t_valid = data.draw(st.integers(0, t))
    scoring = data.draw(st.sampled_from(["softmax", "sigmoid"]))
    use_bias = data.draw(st.booleans())
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, e, generator=g)
    bias = torch.randn(e, generator=g) * 0.1 if use_bias else None
    w, ids = ec(logits, RoutingSpec(k, cf, scoring_func=scoring, correction_bias=bias),
                torch.tensor(t_valid))
    wr, idr = _brute_force(logits, k, cf, t_valid, bias, scoring)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(ids[:t_valid].long(), idr[:t_valid])
    torch.testing.assert_close(w[:t_valid], wr[:t_valid], rtol=1e-6, atol=1e-7)


@settings(max_examples=40, deadline=None)
@given(t=st.integers(1, 64), e=st.integers(2, 32), data=st.data())
def test_distinct_ids_and_capacity(t, e, data):
    k = data.draw(st.integers(1, min(e, 16)))
    cf = data.draw(st.floats(0.1, 3.0))
    logits = torch.randn(t, e, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 999))))
    w, ids = ec(logits, RoutingSpec(k, cf))
    # k distinct, in-range ids per row; no zero-weight slots
    assert ids.min() >= 0 and ids.max() < e
    assert all(len(set(r)) == k for r in ids.tolist())
    assert (w > 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(t))
    # capacity respected in the expert pick: the picked (non-fallback) part of each row
    s, sel = compute_scores(logits)
    cap = int(capacity(torch.tensor(t), e, k, cf))
    assert cap == min(t, math.ceil(cf * t * k / e - 1e-9))
    from sglang_moe_routing.expert_choice.reference import expert_pick_mask

    picked = expert_pick_mask(sel, torch.ones(t, dtype=torch.bool), torch.tensor(cap))
    assert int(picked.sum(0).max()) <= cap
    # every picked expert of a token within its k best picks is in its row, first
    for i in range(t):
        p = picked[i].nonzero().flatten().tolist()
        kept = sorted(p, key=lambda j: (-sel[i, j].item(), j))[:k]
        assert ids[i, : len(kept)].tolist() == kept


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("grouped", [False, True])
def test_single_token_is_token_choice(scoring, grouped):
    torch.manual_seed(1)
    kw = dict(scoring_func=scoring)
    if grouped:
        kw.update(num_expert_group=4, topk_group=2, correction_bias=torch.randn(16) * 0.1)
    for _ in range(20):
        x = torch.randn(1, 16)
        w1, i1 = ec(x, RoutingSpec(4, 1.25, **kw))
        w2, i2 = tc(x, RoutingSpec(4, **kw))
        assert torch.equal(i1, i2)
        torch.testing.assert_close(w1, w2)
        # and equals plain torch.topk on the selection score (no ties in random data)
        _, sel = compute_scores(x, scoring, kw.get("correction_bias"))
        if not grouped:
            assert set(i1[0].tolist()) == set(sel.topk(4).indices[0].tolist())


def test_padding_rows_change_nothing():
    torch.manual_seed(2)
    x = torch.randn(50, 8)
    w_a, i_a = ec(x[:30], RoutingSpec(2, 1.25))
    garbage = torch.randn(20, 8) * 100
    w_b, i_b = ec(torch.cat([x[:30], garbage]), RoutingSpec(2, 1.25), torch.tensor(30))
    assert torch.equal(i_a, i_b[:30])
    torch.testing.assert_close(w_a, w_b[:30])
    # padding rows are well formed (token choice of their own logits)
    assert torch.equal(i_b[30:], tc(garbage, RoutingSpec(2))[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(dtype):
    torch.manual_seed(3)
    x = torch.randn(64, 16).to(dtype)
    w, ids = ec(x, RoutingSpec(4, 1.25))
    w32, ids32 = ec(x.float(), RoutingSpec(4, 1.25))  # scores in fp32 from the same values
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    assert torch.equal(ids, ids32)
    torch.testing.assert_close(w, w32)


def test_non_contiguous_input():
    torch.manual_seed(4)
    x = torch.randn(16, 64)
    xt = x.t()  # [64, 16] non-contiguous
    assert not xt.is_contiguous()
    a = ec(xt, RoutingSpec(2, 1.0))
    b = ec(xt.contiguous(), RoutingSpec(2, 1.0))
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])


def test_grouped_topk_respects_groups():
    torch.manual_seed(5)
    e, g, tg = 32, 8, 3
    x = torch.randn(100, e)
    bias = torch.randn(e) * 0.1
    _, ids = ec(x, RoutingSpec(6, 1.25, scoring_func="sigmoid", num_expert_group=g, topk_group=tg,
                               correction_bias=bias))
    s = torch.sigmoid(x) + bias
    gs = s.view(100, g, e // g).topk(2, -1).values.sum(-1)
    allowed = gs.topk(tg, -1).indices
    for r in range(100):
        groups = set((ids[r].long() // (e // g)).tolist())
        assert groups <= set(allowed[r].tolist())


def test_routed_scaling_factor_and_no_renorm():
    torch.manual_seed(6)
    x = torch.randn(40, 8)
    w1, i1 = ec(x, RoutingSpec(2, 1.25, renormalize=False))
    s = torch.softmax(x, -1)
    torch.testing.assert_close(w1, torch.gather(s, 1, i1.long()))
    w2, i2 = ec(x, RoutingSpec(2, 1.25, routed_scaling_factor=2.5,
                               apply_routed_scaling_factor_on_output=True))
    w3, _ = ec(x, RoutingSpec(2, 1.25))
    torch.testing.assert_close(w2, w3 * 2.5)
    # the factor is not applied unless asked, as upstream
    w4, _ = ec(x, RoutingSpec(2, 1.25, routed_scaling_factor=2.5))
    torch.testing.assert_close(w4, w3)


def test_min_tokens_hybrid_is_exact_token_choice_on_device():
    torch.manual_seed(7)
    x = torch.randn(64, 8)
    n = torch.tensor(20)
    w, ids = ec(x, RoutingSpec(2, 1.25, min_tokens=32), n)
    wt, it = tc(x, RoutingSpec(2))
    assert torch.equal(ids[:20], it[:20])
    # at or above the threshold: expert choice (differs from token choice on this batch)
    _, ids_ec = ec(x, RoutingSpec(2, 1.25, min_tokens=32), torch.tensor(64))
    assert not torch.equal(ids_ec, it)


def test_skewed_batch_balances_load():
    """8 experts, top-2, skewed router: EC cuts the load std sharply."""
    torch.manual_seed(0)
    t, e, k = 256, 8, 2
    x = torch.randn(t, e)
    x[:, 0] += 2.0
    x[:, 1] += 1.5
    _, ids_tc = tc(x, RoutingSpec(k))
    _, ids_ec = ec(x, RoutingSpec(k, 1.25))
    std_tc = expert_load(ids_tc, e).float().std(unbiased=False)
    std_ec = expert_load(ids_ec, e).float().std(unbiased=False)
    assert std_ec < std_tc / 3, (std_tc, std_ec)
    # the price: fidelity < 1 on average, but every token keeps its own best expert share > 0
    fid = routing_fidelity(torch.softmax(x, -1), ids_ec, ids_tc)
    assert (fid <= 1 + 1e-6).all() and fid.mean() < 1


def test_bad_inputs():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="exceeds the number of experts"):
        ec(x, RoutingSpec(9))
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        ec(x, RoutingSpec(2, 0.0))
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        ec(x, RoutingSpec(2, -1.0))
    with pytest.raises(ValueError, match="finite"):
        ec(x, RoutingSpec(2, float("nan")))
    with pytest.raises(ValueError, match="floating point"):
        ec(torch.ones(4, 8, dtype=torch.int64), RoutingSpec(2))
    with pytest.raises(ValueError, match=r"must be \[T, E\]"):
        ec(torch.randn(8), RoutingSpec(2))
    with pytest.raises(ValueError, match="scoring_func"):
        ec(x, RoutingSpec(2, scoring_func="relu"))
    with pytest.raises(ValueError, match="divisible"):
        ec(x, RoutingSpec(2, num_expert_group=3, topk_group=1))
    with pytest.raises(ValueError, match="backend"):
        expert_choice_topk(x, 2, backend="nope")
    # T = 0: defined empty result
    w, ids = ec(torch.randn(0, 8), RoutingSpec(2))
    assert w.shape == (0, 2) and ids.shape == (0, 2) and ids.dtype == torch.int32


def test_nan_logits_defined_result():
    x = torch.randn(32, 8)
    x[3, 2] = float("nan")  # softmax row 3 becomes all-NaN
    w, ids = ec(x, RoutingSpec(2, 1.25))
    assert all(len(set(r)) == 2 for r in ids.tolist())
    assert ids.min() >= 0 and ids.max() < 8
    assert torch.isnan(w[3]).all()  # the NaN is carried, not hidden
    assert not torch.isnan(w[torch.arange(32) != 3]).any()
