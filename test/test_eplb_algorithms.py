"""Compute-cost-aware EPLB placement: validity, reference parity, upstream parity at alpha=0,
and parity with the frozen pre-numpy implementation (``_reference_*`` below)."""

import contextlib
import random

import pytest
import torch

from sglang_moe_routing.eplb.compute_aware import (
    balanced_packing,
    balancedness,
    blend_weights,
    compute_cost_aware_rebalance_experts,
    gpu_loads,
    replica_token_counts,
)
from sglang_moe_routing.eplb.reference import (
    blend_weights_reference,
    compute_cost_aware_rebalance_reference,
)


def assert_valid(out, num_layers, num_logical, num_replicas):
    """Every logical expert has a replica, every slot is filled, the three maps agree."""
    phy2log, log2phy, logcnt = out
    assert phy2log.shape == (num_layers, num_replicas)
    assert logcnt.shape == (num_layers, num_logical)
    assert log2phy.shape[:2] == (num_layers, num_logical)
    assert log2phy.shape[2] == int(logcnt.max())
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == torch.int64
    assert ((phy2log >= 0) & (phy2log < num_logical)).all()
    assert (logcnt >= 1).all()
    assert (logcnt.sum(-1) == num_replicas).all()
    for l in range(num_layers):
        assert torch.equal(torch.bincount(phy2log[l], minlength=num_logical), logcnt[l])
    filled = torch.arange(log2phy.shape[2]) < logcnt.unsqueeze(-1)  # [L, E, X]
    assert (log2phy[~filled] == -1).all()
    assert ((log2phy[filled] >= 0) & (log2phy[filled] < num_replicas)).all()
    owner = phy2log.gather(1, log2phy.clamp_min(0).flatten(1)).view_as(log2phy)
    expert = torch.arange(num_logical).view(1, -1, 1).expand_as(log2phy)
    assert torch.equal(owner[filled], expert[filled])
    for l in range(num_layers):  # every slot listed exactly once
        assert torch.equal(log2phy[l][filled[l]].sort().values, torch.arange(num_replicas))


def _random_case(rng: random.Random):
    E = rng.choice([2, 4, 6, 8, 12, 16, 32, 64])
    gpus = rng.choice([1, 2, 3, 4, 8, 16])
    nodes = rng.choice([n for n in (1, 2, 4) if gpus % n == 0])
    groups = rng.choice([g for g in (1, 2, 3, 4, 8) if E % g == 0])
    R = -(-max(E, gpus) // gpus) * gpus + gpus * rng.randint(0, 2)
    L = rng.randint(1, 4)
    return E, gpus, nodes, groups, R, L, rng.random() < 0.6


def _weights(kind: str, L: int, E: int, g: torch.Generator) -> torch.Tensor:
    if kind == "float":
        return torch.rand(L, E, generator=g) * 1000
    if kind == "ties":  # small integer counts: many equal weights
        return torch.randint(0, 4, (L, E), generator=g).float()
    if kind == "zero":
        return torch.zeros(L, E)
    if kind == "hot":
        w = torch.zeros(L, E)
        w[:, torch.randint(0, E, (1,), generator=g)] = 1e6
        return w
    if kind == "zipf":
        return (1.0 / torch.arange(1, E + 1).float()).repeat(L, 1) * 1e5
    raise AssertionError(kind)


KINDS = ["float", "ties", "zero", "hot", "zipf"]


def test_alpha0_equals_upstream_deepseek_on_many_inputs():
    deepseek = pytest.importorskip("sglang.srt.eplb.eplb_algorithms.deepseek")
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    n = 0
    for i in range(400):
        E, gpus, nodes, groups, R, L, hier = _random_case(rng)
        if hier and groups % nodes != 0:
            hier = False  # upstream asserts there; our fallback is tested separately
        w = _weights(KINDS[i % len(KINDS)], L, E, g)
        cost = torch.rand(L, E, generator=g) * 50  # ignored at alpha = 0
        ours = compute_cost_aware_rebalance_experts(w, cost, R, groups, nodes, gpus, hier, 0.0)
        up = deepseek.rebalance_experts(w, R, groups, nodes, gpus, hier)
        for a, b in zip(ours, up):
            assert torch.equal(a, b), (E, gpus, nodes, groups, R, L, hier, KINDS[i % len(KINDS)])
        n += 1
    assert n == 400


@pytest.mark.parametrize("load", ["uniform", "heavy_tailed"])
def test_alpha0_equals_upstream_at_deepseek_v3_scale(load):
    deepseek = pytest.importorskip("sglang.srt.eplb.eplb_algorithms.deepseek")
    g = torch.Generator().manual_seed(1)
    if load == "uniform":
        w = torch.randint(0, 3000, (61, 256), generator=g).float()
    else:
        w = torch.rand(61, 256, generator=g).pow(3) * 1e5
    for hier in (False, True):
        ours = compute_cost_aware_rebalance_experts(w, None, 288, 8, 4, 32, hier, 0.0)
        up = deepseek.rebalance_experts(w, 288, 8, 4, 32, hier)
        assert all(torch.equal(a, b) for a, b in zip(ours, up))


def test_alpha1_equals_upstream_run_on_costs():
    deepseek = pytest.importorskip("sglang.srt.eplb.eplb_algorithms.deepseek")
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 100, (3, 32), generator=g).float()
    cost = torch.rand(3, 32, generator=g) * 7
    ours = compute_cost_aware_rebalance_experts(tokens, cost, 40, 4, 2, 8, True, 1.0)
    up = deepseek.rebalance_experts(cost, 40, 4, 2, 8, True)
    assert all(torch.equal(a, b) for a, b in zip(ours, up))


def test_matches_reference_for_any_alpha():
    rng = random.Random(3)
    g = torch.Generator().manual_seed(3)
    for i in range(250):
        E, gpus, nodes, groups, R, L, hier = _random_case(rng)
        alpha = rng.choice([0.0, 1.0, 0.5, 0.25, rng.random()])
        w = _weights(KINDS[i % len(KINDS)], L, E, g)
        cost = w * torch.rand(L, E, generator=g) * 3 if i % 3 else torch.rand(L, E, generator=g)
        fast = compute_cost_aware_rebalance_experts(w, cost, R, groups, nodes, gpus, hier, alpha)
        ref = compute_cost_aware_rebalance_reference(w, cost, R, groups, nodes, gpus, hier, alpha)
        for a, b in zip(fast, ref):
            assert torch.equal(a, b), (E, gpus, nodes, groups, R, L, hier, alpha, KINDS[i % len(KINDS)])
        assert_valid(fast, L, E, R)


def test_blend_weights_match_reference_and_formula():
    g = torch.Generator().manual_seed(4)
    t = torch.randint(0, 1000, (5, 16), generator=g).float()
    c = torch.rand(5, 16, generator=g) * 3
    c[2] = 0  # a layer without cost contributes only tokens
    for alpha in (0.0, 0.3, 0.5, 1.0):
        w = blend_weights(t, c, alpha)
        assert w.dtype == torch.float32
        assert w.tolist() == blend_weights_reference(t.tolist(), c.tolist(), alpha)
    w = blend_weights(t, c, 0.3)
    expect = 0.7 * t.double() / t.double().sum(-1, keepdim=True) + 0.3 * torch.nan_to_num(c.double() / c.double().sum(-1, keepdim=True))
    torch.testing.assert_close(w.double(), expect, rtol=1e-6, atol=1e-9)
    assert torch.equal(blend_weights(t, c, 0.0), t)
    assert torch.equal(blend_weights(t, c, 1.0), c)
    assert torch.equal(blend_weights(t, None, 0.7), t)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("hier", [False, True])
def test_valid_on_adversarial_loads(kind, hier):
    g = torch.Generator().manual_seed(5)
    for alpha in (0.0, 0.5, 1.0):
        w = _weights(kind, 3, 16, g)
        cost = _weights(kind, 3, 16, g)
        out = compute_cost_aware_rebalance_experts(w, cost, 24, 4, 2, 4, hier, alpha)
        assert_valid(out, 3, 16, 24)


def test_one_hot_expert_gets_the_redundant_slots():
    w = torch.zeros(1, 8)
    w[0, 5] = 1000.0
    phy2log, _, logcnt = compute_cost_aware_rebalance_experts(w, None, 16, None, 1, 4, False, 0.0)
    assert int(logcnt[0, 5]) == 9
    assert (logcnt[0, torch.arange(8) != 5] == 1).all()
    # its replicas are spread so that no GPU holds more than ceil(9 / 4) of them
    per_gpu = (phy2log[0].view(4, 4) == 5).sum(-1)
    assert int(per_gpu.max()) <= 3


@pytest.mark.parametrize("E,gpus,R", [(4, 8, 8), (2, 16, 16), (3, 6, 12)])
def test_more_gpus_than_experts(E, gpus, R):
    g = torch.Generator().manual_seed(6)
    w = torch.rand(2, E, generator=g)
    out = compute_cost_aware_rebalance_experts(w, w * 2, R, None, 1, gpus, False, 0.5)
    assert_valid(out, 2, E, R)


def test_groups_not_dividing_nodes_falls_back_to_global_policy():
    g = torch.Generator().manual_seed(7)
    w = torch.rand(2, 12, generator=g) * 100
    c = torch.rand(2, 12, generator=g)
    hier = compute_cost_aware_rebalance_experts(w, c, 16, 3, 2, 4, True, 0.5)  # 3 groups, 2 nodes
    flat = compute_cost_aware_rebalance_experts(w, c, 16, 3, 2, 4, False, 0.5)
    assert_valid(hier, 2, 12, 16)
    assert all(torch.equal(a, b) for a, b in zip(hier, flat))
    none = compute_cost_aware_rebalance_experts(w, c, 16, None, 2, 4, True, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(none, flat))


def test_hierarchical_keeps_groups_on_one_node():
    g = torch.Generator().manual_seed(8)
    w = torch.rand(2, 32, generator=g) * 100
    phy2log, _, _ = compute_cost_aware_rebalance_experts(w, w.flip(-1), 48, 8, 2, 8, True, 0.6)
    group_of = phy2log // 4  # 8 groups of 4 experts
    node_of_slot = torch.arange(48) // 24
    for l in range(2):
        for grp in range(8):
            nodes = node_of_slot[group_of[l] == grp].unique()
            assert nodes.numel() == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_replicas=12), "must be >= the number of logical experts"),
        (dict(num_replicas=18), "multiple of num_gpus"),
        (dict(num_gpus=4, num_nodes=3), "multiple of num_nodes"),
        (dict(alpha=1.5), r"alpha must be in \[0, 1\]"),
        (dict(alpha=float("nan")), "finite"),
        (dict(num_groups=5, enable_hierarchical=True), "multiple of num_groups"),
        (dict(num_gpus=0), "positive int"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    args = dict(
        token_weight=torch.rand(2, 16), compute_cost_weight=torch.rand(2, 16), num_replicas=24,
        num_groups=4, num_nodes=1, num_gpus=4, enable_hierarchical=False, alpha=0.5,
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        compute_cost_aware_rebalance_experts(**args)


@pytest.mark.parametrize(
    "tokens, cost, message",
    [
        (torch.tensor([[1.0, float("nan")]]), None, "NaN or infinite"),
        (torch.tensor([[1.0, -2.0]]), None, "negative"),
        (torch.rand(4), None, r"\[num_layers, num_logical_experts\]"),
        (torch.rand(2, 2), torch.rand(2, 3), "shape"),
        (torch.rand(2, 2), torch.tensor([[1.0, float("inf")], [0.0, 0.0]]), "NaN or infinite"),
        (torch.zeros(0, 4), None, "non-empty"),
    ],
)
def test_bad_weights_raise(tokens, cost, message):
    with pytest.raises(ValueError, match=message):
        compute_cost_aware_rebalance_experts(tokens, cost, 4, None, 1, 2, False, 0.5)


def test_balanced_packing_respects_capacity_and_balances():
    g = torch.Generator().manual_seed(9)
    w = torch.rand(5, 24, generator=g)
    pack, rank = balanced_packing(w, 6)
    for l in range(5):
        assert torch.equal(torch.bincount(pack[l], minlength=6), torch.full((6,), 4))
        for p in range(6):
            assert sorted(rank[l][pack[l] == p].tolist()) == [0, 1, 2, 3]
    loads = torch.zeros(5, 6).scatter_add_(1, pack, w)
    # greedy LPT: the spread between packs is at most the largest item
    assert ((loads.amax(-1) - loads.amin(-1)) <= w.amax(-1) + 1e-6).all()


def test_cost_aware_placement_balances_heterogeneous_compute():
    """Half the experts cost 3x per token: balancing on cost beats balancing on tokens
    under the cost model, in every layer."""
    g = torch.Generator().manual_seed(10)
    L, E, G, R = 6, 64, 8, 72
    tokens = torch.randint(100, 2000, (L, E), generator=g).float()
    slow = torch.stack([torch.randperm(E, generator=g) < E // 2 for _ in range(L)])
    cost = tokens * torch.where(slow, 3.0, 1.0)
    per_token = torch.where(slow, 3.0, 1.0).double()

    def time_balance(out):
        p2l, _, cnt = out
        slot_tokens = replica_token_counts(tokens, p2l, cnt)
        slot_time = slot_tokens * per_token.gather(1, p2l)
        return balancedness(gpu_loads(slot_time, G))

    ds = time_balance(compute_cost_aware_rebalance_experts(tokens, cost, R, None, 1, G, False, 0.0))
    ours = time_balance(compute_cost_aware_rebalance_experts(tokens, cost, R, None, 1, G, False, 1.0))
    assert (ours > ds).all()
    assert float(ours.mean()) > 0.97 and float(ds.mean()) < 0.9


def test_evaluation_helpers():
    p2l = torch.tensor([[0, 1, 0, 2]])
    cnt = torch.tensor([[2, 1, 1]])
    tok = torch.tensor([[[10.0, 4.0, 6.0]]])
    per_slot = replica_token_counts(tok, p2l, cnt)
    assert per_slot.tolist() == [[[5.0, 4.0, 5.0, 6.0]]]
    gl = gpu_loads(per_slot, 2)
    assert gl.tolist() == [[[9.0, 11.0]]]
    assert balancedness(gl).flatten().tolist() == pytest.approx([10.0 / 11.0])
    assert balancedness(torch.zeros(3, 4)).tolist() == [1.0, 1.0, 1.0]


def test_validity_checker_catches_broken_maps():
    out = compute_cost_aware_rebalance_experts(torch.rand(2, 8), None, 12, None, 1, 4, False, 0.0)
    assert_valid(out, 2, 8, 12)
    p2l, l2p, cnt = (t.clone() for t in out)
    p2l[0, 0] = (p2l[0, 0] + 1) % 8  # slot now claims another expert
    with pytest.raises(AssertionError):
        assert_valid((p2l, l2p, cnt), 2, 8, 12)
    p2l, l2p, cnt = (t.clone() for t in out)
    l2p[1, 0, 0] = l2p[1, 1, 0]  # a slot listed twice, another missing
    with pytest.raises(AssertionError):
        assert_valid((p2l, l2p, cnt), 2, 8, 12)


# --------------------------------------------------------------------------- frozen copy
#
# The implementation the numpy steps replaced: torch ops per greedy step. Kept verbatim (less
# validation) so that the faster code is checked against the exact outputs it replaced, on
# uniform and heavy-tailed loads.


def _reference_balanced_packing(weight, num_packs):
    import numpy as np

    num_rows, num_items = weight.shape
    per_pack = num_items // num_packs
    if per_pack == 1:
        pack_index = torch.arange(num_items, dtype=torch.int64).expand(weight.shape)
        return pack_index, torch.zeros_like(weight, dtype=torch.int64)
    order = weight.float().sort(-1, descending=True).indices.numpy()
    w = weight.double().numpy()
    rows = np.arange(num_rows)
    pack_weight = np.zeros((num_rows, num_packs), dtype=np.float64)
    pack_count = np.zeros((num_rows, num_packs), dtype=np.int64)
    pack_index = np.empty((num_rows, num_items), dtype=np.int64)
    rank_in_pack = np.empty((num_rows, num_items), dtype=np.int64)
    masked = np.empty_like(pack_weight)
    for j in range(num_items):
        item = order[:, j]
        np.copyto(masked, pack_weight)
        masked[pack_count >= per_pack] = np.inf
        pack = masked.argmin(axis=1)
        pack_index[rows, item] = pack
        rank_in_pack[rows, item] = pack_count[rows, pack]
        pack_weight[rows, pack] += w[rows, item]
        pack_count[rows, pack] += 1
    return torch.from_numpy(pack_index), torch.from_numpy(rank_in_pack)


def _reference_replicate_experts(weight, num_phy):
    num_rows, num_log = weight.shape
    phy2log = torch.arange(num_phy, dtype=torch.int64).repeat(num_rows, 1)
    rank = torch.zeros(num_rows, num_phy, dtype=torch.int64)
    logcnt = torch.ones(num_rows, num_log, dtype=torch.int64)
    rows = torch.arange(num_rows, dtype=torch.int64)
    for i in range(num_log, num_phy):
        best = (weight / logcnt).max(dim=-1).indices
        phy2log[:, i] = best
        rank[:, i] = logcnt[rows, best]
        logcnt[rows, best] += 1
    return phy2log, rank, logcnt


def _reference_inverse(perm):
    inv = torch.empty_like(perm)
    inv.scatter_(1, perm, torch.arange(perm.size(1), dtype=torch.int64).expand(perm.shape))
    return inv


def _reference_hierarchical(weight, num_physical_experts, num_groups, num_nodes, num_gpus):
    num_layers, num_logical = weight.shape
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    phy_per_gpu = num_physical_experts // num_gpus
    log_per_node = num_logical // num_nodes
    tokens_per_group = weight.unflatten(-1, (num_groups, group_size)).sum(-1)
    group_pack, group_rank = _reference_balanced_packing(tokens_per_group, num_nodes)
    log2mlog = (
        ((group_pack * groups_per_node + group_rank) * group_size).unsqueeze(-1)
        + torch.arange(group_size, dtype=torch.int64)
    ).flatten(-2)
    mlog2log = _reference_inverse(log2mlog)
    tokens_per_mlog = weight.gather(-1, mlog2log).view(-1, log_per_node)
    phy2mlog, phyrank, mlogcnt = _reference_replicate_experts(tokens_per_mlog, num_physical_experts // num_nodes)
    tokens_per_phy = (tokens_per_mlog / mlogcnt).gather(-1, phy2mlog)
    pack, rank_in_pack = _reference_balanced_packing(tokens_per_phy, num_gpus // num_nodes)
    phy2pphy = pack * phy_per_gpu + rank_in_pack
    pphy2phy = _reference_inverse(phy2pphy)
    pphy2mlog = phy2mlog.gather(-1, pphy2phy)
    pphy2mlog = (
        pphy2mlog.view(num_layers, num_nodes, -1)
        + torch.arange(0, num_logical, log_per_node, dtype=torch.int64).view(1, -1, 1)
    ).flatten(-2)
    pphy2log = mlog2log.gather(-1, pphy2mlog)
    pphyrank = phyrank.gather(-1, pphy2phy).view(num_layers, -1)
    logcnt = mlogcnt.view(num_layers, -1).gather(-1, log2mlog)
    return pphy2log, pphyrank, logcnt


def _reference(token_weight, compute_cost_weight, num_replicas, num_groups, num_nodes, num_gpus,
               enable_hierarchical, alpha):
    """``compute_cost_aware_rebalance_experts`` as it was (topology assumed valid)."""
    weight = blend_weights(token_weight, compute_cost_weight, alpha).float().cpu()
    num_layers, num_logical = weight.shape
    hier = (
        enable_hierarchical and num_groups is not None and num_groups % num_nodes == 0
    )
    if hier:
        phy2log, phyrank, logcnt = _reference_hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, phyrank, logcnt = _reference_hierarchical(weight, num_replicas, 1, 1, num_gpus)
    max_cnt = int(logcnt.max())
    log2phy = torch.full((num_layers, num_logical, max_cnt), -1, dtype=torch.int64)
    log2phy.view(num_layers, -1).scatter_(
        -1,
        phy2log * max_cnt + phyrank,
        torch.arange(num_replicas, dtype=torch.int64).expand(num_layers, -1),
    )
    return phy2log, log2phy, logcnt


@contextlib.contextmanager
def _one_torch_thread():
    # The frozen copy calls torch.max(dim) once per replica: on a busy machine each call
    # waits for OpenMP workers. One thread gives the same results without that wait.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _load(kind, L, E, g):
    if kind == "uniform":
        return torch.randint(0, 20000, (L, E), generator=g).float()
    if kind == "heavy_tailed":  # as real MoE traffic: a few hot experts, a long cold tail
        return torch.rand(L, E, generator=g).pow(3) * 1e5
    if kind == "heavy_tailed_int":  # heavy tail in whole tokens: ties among the cold experts
        return (torch.rand(L, E, generator=g).pow(4) * 3000).floor()
    if kind == "lognormal_sparse":  # lognormal popularity, a quarter of the experts idle
        w = torch.randn(L, E, generator=g).mul(1.5).exp() * 100
        return torch.where(torch.rand(L, E, generator=g) < 0.25, torch.zeros_like(w), w)
    raise AssertionError(kind)


LOADS = ["uniform", "heavy_tailed", "heavy_tailed_int", "lognormal_sparse"]


@pytest.mark.parametrize("kind", LOADS)
def test_matches_frozen_implementation_at_deepseek_v3_scale(kind):
    """61 layers x 256 experts -> 288 slots, 32 GPUs, 4 nodes, 8 groups: bit-identical to the
    implementation it replaced, both policies, alpha 0 / 0.5 / 1."""
    g = torch.Generator().manual_seed(11)
    for seed in range(2):
        tokens = _load(kind, 61, 256, g)
        cost = tokens * (1 + torch.rand(61, 256, generator=g))
        for hier in (False, True):
            for alpha in (0.0, 0.5, 1.0):
                new = compute_cost_aware_rebalance_experts(tokens, cost, 288, 8, 4, 32, hier, alpha)
                with _one_torch_thread():
                    old = _reference(tokens, cost, 288, 8, 4, 32, hier, alpha)
                for a, b in zip(new, old):
                    assert a.dtype == b.dtype and torch.equal(a, b), (kind, seed, hier, alpha)
                assert_valid(new, 61, 256, 288)


def test_matches_frozen_implementation_on_random_topologies():
    rng = random.Random(12)
    g = torch.Generator().manual_seed(12)
    kinds = LOADS + KINDS
    for i in range(300):
        E, gpus, nodes, groups, R, L, hier = _random_case(rng)
        alpha = rng.choice([0.0, 1.0, 0.5, rng.random()])
        kind = kinds[i % len(kinds)]
        w = _load(kind, L, E, g) if kind in LOADS else _weights(kind, L, E, g)
        cost = torch.rand(L, E, generator=g) * w.max().clamp_min(1)
        new = compute_cost_aware_rebalance_experts(w, cost, R, groups, nodes, gpus, hier, alpha)
        with _one_torch_thread():
            old = _reference(w, cost, R, groups, nodes, gpus, hier, alpha)
        for a, b in zip(new, old):
            assert torch.equal(a, b), (E, gpus, nodes, groups, R, L, hier, alpha, kind)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_public_steps_match_frozen_implementation(dtype):
    from sglang_moe_routing.eplb.compute_aware import replicate_experts

    g = torch.Generator().manual_seed(13)
    for kind in LOADS:
        w = _load(kind, 7, 48, g).to(dtype)
        for packs in (2, 4, 6, 48):
            for a, b in zip(balanced_packing(w, packs), _reference_balanced_packing(w, packs)):
                assert torch.equal(a, b), (kind, packs)
        for num_phy in (48, 50, 64, 96):
            with _one_torch_thread():
                ref = _reference_replicate_experts(w, num_phy)
            for a, b in zip(replicate_experts(w, num_phy), ref):
                assert torch.equal(a, b), (kind, num_phy)
