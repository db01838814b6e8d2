"""Plain-Python specification of compute-cost-aware EPLB (the test oracle).

One layer at a time, one item at a time, with Python lists. It states the algorithm that
:mod:`.compute_aware` vectorises:

1. Weight (per layer): ``alpha == 0`` -> the token counts as given; ``alpha == 1`` -> the
   costs as given; otherwise ``(1 - alpha) * t / sum(t) + alpha * c / sum(c)`` computed in
   float64 (a term whose sum is 0 contributes 0), then rounded to float32.
2. Hierarchical policy (when enabled and ``num_groups`` is a multiple of ``num_nodes``;
   otherwise the global policy = one group, one node): pack the expert groups onto the
   nodes by group weight, number the experts node by node ("middle" ids).
3. Per node: add replicas one at a time to the expert with the largest
   ``float32(weight / replicas)``; first expert on ties.
4. Per node: pack the replicas onto the node's GPUs, weight of a replica =
   ``float32(weight / replicas)``: visit replicas by decreasing weight; each goes to the
   lightest GPU (float64 running sum) that still has room, first GPU on ties.
5. Physical slots are numbered GPU by GPU, replicas in the order they were packed.

Two details are implementation-defined upstream and are taken from the same torch calls
so that results are bit-identical: the visiting order of items with equal weight
(``torch.sort(descending=True)``, not stable for rows longer than 16) and the float32
sum of a group's weights.
"""

from __future__ import annotations

import math
import struct
from typing import List, Optional, Sequence, Tuple

import torch

__all__ = ["blend_weights_reference", "compute_cost_aware_rebalance_reference"]


def _f32(x: float) -> float:
    """Round a Python float (double) to the nearest float32 value."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _sort_order(values: Sequence[float]) -> List[int]:
    """Visiting order: decreasing value, ties as ``torch.sort(descending=True)`` orders them."""
    return torch.tensor([list(values)], dtype=torch.float32).sort(-1, descending=True).indices[0].tolist()


def blend_weights_reference(
    token_weight: Sequence[Sequence[float]],
    compute_cost_weight: Optional[Sequence[Sequence[float]]],
    alpha: float,
) -> List[List[float]]:
    """Placement weight per layer (float32 values as Python floats)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    out = []
    for layer, tokens in enumerate(token_weight):
        if compute_cost_weight is None or alpha == 0:
            out.append([_f32(float(t)) for t in tokens])
            continue
        costs = compute_cost_weight[layer]
        if alpha == 1:
            out.append([_f32(float(c)) for c in costs])
            continue
        ts = math.fsum(float(t) for t in tokens)
        cs = math.fsum(float(c) for c in costs)
        row = []
        for t, c in zip(tokens, costs):
            tn = float(t) / ts if ts > 0 else 0.0
            cn = float(c) / cs if cs > 0 else 0.0
            row.append(_f32((1.0 - alpha) * tn + alpha * cn))
        out.append(row)
    return out


def _pack(weights: Sequence[float], num_packs: int) -> Tuple[List[int], List[int]]:
    """Greedy balanced packing of one row -> (pack of each item, rank within pack)."""
    n = len(weights)
    per_pack = n // num_packs
    if per_pack == 1:
        return list(range(n)), [0] * n
    pack_of = [-1] * n
    rank_of = [-1] * n
    load = [0.0] * num_packs
    count = [0] * num_packs
    for item in _sort_order(weights):
        best = -1
        for p in range(num_packs):
            if count[p] < per_pack and (best < 0 or load[p] < load[best]):
                best = p
        pack_of[item] = best
        rank_of[item] = count[best]
        load[best] += weights[item]
        count[best] += 1
    return pack_of, rank_of


def _replicate(weights: Sequence[float], num_phy: int) -> Tuple[List[int], List[int], List[int]]:
    """Replicas of one row -> (logical of each physical, replica rank, replicas per logical)."""
    n = len(weights)
    phy2log = list(range(n))
    rank = [0] * n
    cnt = [1] * n
    for _ in range(num_phy - n):
        best, best_v = 0, _f32(weights[0] / cnt[0])
        for e in range(1, n):
            v = _f32(weights[e] / cnt[e])
            if v > best_v:
                best, best_v = e, v
        phy2log.append(best)
        rank.append(cnt[best])
        cnt[best] += 1
    return phy2log, rank, cnt


def _place_layer(
    w: List[float], num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> Tuple[List[int], List[int], List[int]]:
    """One layer -> (phy2log, replica rank per physical slot, replicas per logical)."""
    num_log = len(w)
    group_size = num_log // num_groups
    groups_per_node = num_groups // num_nodes
    log_per_node = num_log // num_nodes
    phy_per_node = num_replicas // num_nodes
    gpus_per_node = num_gpus // num_nodes
    phy_per_gpu = num_replicas // num_gpus

    group_w = torch.tensor(w, dtype=torch.float32).view(num_groups, group_size).sum(-1).tolist()
    node_of_group, rank_of_group = _pack(group_w, num_nodes)
    mid_of = [0] * num_log  # logical -> middle id (node-major)
    for e in range(num_log):
        g = e // group_size
        mid_of[e] = (node_of_group[g] * groups_per_node + rank_of_group[g]) * group_size + e % group_size
    log_of_mid = [0] * num_log
    for e, m in enumerate(mid_of):
        log_of_mid[m] = e

    phy2log = [0] * num_replicas
    phyrank = [0] * num_replicas
    logcnt = [0] * num_log
    for node in range(num_nodes):
        mids = list(range(node * log_per_node, (node + 1) * log_per_node))
        node_w = [w[log_of_mid[m]] for m in mids]
        loc_phy2loc, loc_rank, loc_cnt = _replicate(node_w, phy_per_node)
        replica_w = [_f32(node_w[loc] / loc_cnt[loc]) for loc in loc_phy2loc]
        gpu_of, pos_of = _pack(replica_w, gpus_per_node)
        for p, loc in enumerate(loc_phy2loc):
            slot = node * phy_per_node + gpu_of[p] * phy_per_gpu + pos_of[p]
            phy2log[slot] = log_of_mid[mids[loc]]
            phyrank[slot] = loc_rank[p]
        for loc, c in enumerate(loc_cnt):
            logcnt[log_of_mid[mids[loc]]] = c
    return phy2log, phyrank, logcnt


def compute_cost_aware_rebalance_reference(
    token_weight: torch.Tensor,
    compute_cost_weight: Optional[torch.Tensor],
    num_replicas: int,
    num_groups: Optional[int],
    num_nodes: int,
    num_gpus: int,
    enable_hierarchical: bool,
    alpha: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference of :func:`..compute_aware.compute_cost_aware_rebalance_experts`
    (same arguments, same outputs)."""
    tokens = token_weight.tolist()
    costs = compute_cost_weight.tolist() if compute_cost_weight is not None else None
    weights = blend_weights_reference(tokens, costs, alpha)
    num_log = len(weights[0])
    hierarchical = (
        enable_hierarchical
        and num_groups is not None
        and num_log % num_groups == 0
        and num_groups % num_nodes == 0
    )
    if not hierarchical:
        num_groups, num_nodes = 1, 1
    p2l, p_rank, counts = [], [], []
    for w in weights:
        a, b, c = _place_layer(w, num_replicas, num_groups, num_nodes, num_gpus)
        p2l.append(a)
        p_rank.append(b)
        counts.append(c)
    max_cnt = max(max(c) for c in counts)
    l2p = []
    for layer in range(len(weights)):
        table = [[-1] * max_cnt for _ in range(num_log)]
        for slot, (e, r) in enumerate(zip(p2l[layer], p_rank[layer])):
            table[e][r] = slot
        l2p.append(table)
    return (
        torch.tensor(p2l, dtype=torch.int64),
        torch.tensor(l2p, dtype=torch.int64),
        torch.tensor(counts, dtype=torch.int64),
    )
