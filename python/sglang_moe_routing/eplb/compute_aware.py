"""Compute-cost-aware expert-parallel load balancing (vectorised over layers).

The placement is DeepSeek's EPLB (replicate the heaviest experts, then balanced packing of
replicas onto GPUs, optionally hierarchical: expert groups onto nodes first), run on a
blended weight per layer ``l`` and logical expert ``e``::

    w[l, e] = (1 - alpha) * tokens[l, e] / sum_e tokens[l, e]
              + alpha * cost[l, e] / sum_e cost[l, e]

where ``cost`` is the compute time an expert is expected to spend over the statistics
window (from :class:`~sglang_moe_routing.eplb.profiler.ExpertComputeProfiler`).
``alpha = 0`` feeds the token counts unchanged, so the result is bit-identical to
SGLang's ``deepseek`` / ``deepseek_hierarchical`` algorithm; ``alpha = 1`` feeds the
costs unchanged (upstream's algorithm run on costs).

Upstream packs with a Python loop per layer and per item. Here the greedy choices of all
layers are made together: one step per item (per replica when replicating), each step a
handful of numpy operations over ``[layers, packs]`` (no torch op inside the loops: see
"steps" below). The arithmetic (float32 division for replication, float64 pack sums,
the same ``torch.sort`` call for the visiting order, first index on ties) is the one
upstream performs, which is what makes ``alpha = 0`` exact, ties included.

The plain-Python specification of the same algorithm is :mod:`.reference`.
"""

from __future__ import annotations

import logging
import math
from typing import Optional, Tuple

import numpy as np
import torch

logger = logging.getLogger(__name__)
_warned: set = set()


def _warn_once(msg: str, *args) -> None:
    key = (msg,) + args
    if key not in _warned:
        _warned.add(key)
        logger.warning(msg, *args)

__all__ = [
    "blend_weights",
    "balanced_packing",
    "replicate_experts",
    "rebalance_experts_hierarchical",
    "rebalance_experts",
    "compute_cost_aware_rebalance_experts",
    "replica_token_counts",
    "gpu_loads",
    "balancedness",
]


# --------------------------------------------------------------------------- validation


def _check_weight(name: str, w: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(
            f"{name} must have shape [num_layers, num_logical_experts], got {tuple(w.shape)}"
        )
    if w.shape[0] == 0 or w.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(w.shape)}")
    if w.is_complex() or w.dtype == torch.bool:
        raise TypeError(f"{name} must be a real numeric tensor, got {w.dtype}")
    wf = w.detach().double()
    if not torch.isfinite(wf).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    if (wf < 0).any():
        raise ValueError(f"{name} contains negative values")


def _check_topology(
    num_logical: int,
    num_replicas: int,
    num_groups: Optional[int],
    num_nodes: int,
    num_gpus: int,
    enable_hierarchical: bool,
) -> bool:
    """Validate the topology; return whether the hierarchical policy is usable."""
    for name, v in (("num_replicas", num_replicas), ("num_nodes", num_nodes), ("num_gpus", num_gpus)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if num_replicas < num_logical:
        raise ValueError(
            f"num_replicas ({num_replicas}) must be >= the number of logical experts ({num_logical})"
        )
    if num_replicas % num_gpus != 0:
        raise ValueError(f"num_replicas ({num_replicas}) must be a multiple of num_gpus ({num_gpus})")
    if num_gpus % num_nodes != 0:
        raise ValueError(f"num_gpus ({num_gpus}) must be a multiple of num_nodes ({num_nodes})")
    if not enable_hierarchical:
        return False
    if num_groups is None:
        _warn_once("hierarchical EPLB needs num_groups; using the global (flat) policy")
        return False
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0:
        raise ValueError(f"num_groups must be a positive int or None, got {num_groups!r}")
    if num_logical % num_groups != 0:
        raise ValueError(
            f"num_logical_experts ({num_logical}) must be a multiple of num_groups ({num_groups})"
        )
    if num_groups % num_nodes != 0:
        # Upstream's ``auto`` makes the same choice; ``deepseek_hierarchical`` would assert.
        _warn_once(
            "hierarchical EPLB needs num_groups (%d) to be a multiple of num_nodes (%d); "
            "using the global (flat) policy",
            num_groups,
            num_nodes,
        )
        return False
    return True


# --------------------------------------------------------------------------- weights


def blend_weights(
    token_weight: torch.Tensor,
    compute_cost_weight: Optional[torch.Tensor],
    alpha: float,
) -> torch.Tensor:
    """Placement weight per layer and logical expert.

    Parameters:
        token_weight: [num_layers, num_logical_experts], tokens routed to each expert
        compute_cost_weight: [num_layers, num_logical_experts], expected compute time of
            each expert over the same window, or None (no cost known: tokens only)
        alpha: in [0, 1], share of the compute-cost term

    Returns:
        weight: [num_layers, num_logical_experts] float32. ``alpha == 0`` returns
        ``token_weight.float()`` and ``alpha == 1`` returns ``compute_cost_weight.float()``
        unchanged (no normalisation), so those two ends reproduce upstream exactly. In
        between, each term is normalised per layer (a layer whose sum is 0 contributes 0).
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number in [0, 1], got {alpha!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    _check_weight("token_weight", token_weight)
    if compute_cost_weight is None or alpha == 0:
        if compute_cost_weight is not None:
            _check_cost_shape(token_weight, compute_cost_weight)
        return token_weight.float().cpu()
    _check_cost_shape(token_weight, compute_cost_weight)
    if alpha == 1:
        return compute_cost_weight.float().cpu()
    t = token_weight.detach().double().cpu()
    c = compute_cost_weight.detach().double().cpu()
    ts = t.sum(-1, keepdim=True)
    cs = c.sum(-1, keepdim=True)
    tn = torch.where(ts > 0, t / ts.clamp_min(1e-300), torch.zeros_like(t))
    cn = torch.where(cs > 0, c / cs.clamp_min(1e-300), torch.zeros_like(c))
    return ((1.0 - alpha) * tn + alpha * cn).float()


def _check_cost_shape(token_weight: torch.Tensor, cost: torch.Tensor) -> None:
    _check_weight("compute_cost_weight", cost)
    if cost.shape != token_weight.shape:
        raise ValueError(
            f"compute_cost_weight shape {tuple(cost.shape)} != token_weight shape "
            f"{tuple(token_weight.shape)}"
        )


# --------------------------------------------------------------------------- steps
#
# The steps run on numpy arrays. Each greedy choice is one step of a Python loop over a few
# array operations on all rows at once, so the cost per step is the fixed overhead of those
# calls: they are kept few, and none of them is a torch op. Torch reductions over a dim
# (``max(dim)``, ``argmax``) open an OpenMP parallel region even on these small arrays; when
# the other cores are busy, every such call waits for a descheduled worker thread, which
# multiplies the placement time whatever the load distribution (measured: docs/benchmarks.md,
# appendix). Only two torch calls remain, both serial at these sizes and both needed for
# bit-identity with upstream: the visiting-order sort and the float32 sum of a group's weights.


def _visit_order(weight32: np.ndarray) -> np.ndarray:
    """Items by decreasing weight, ties as upstream's ``torch.sort(descending=True)`` orders
    them (not stable for rows longer than 16, so the same torch call is used)."""
    return torch.from_numpy(weight32).sort(-1, descending=True).indices.numpy()


def _inverse_np(perm: np.ndarray) -> np.ndarray:
    """Row-wise inverse of a permutation [X, n]."""
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.arange(perm.shape[1], dtype=np.int64)[None, :], axis=1)
    return inv


def _greedy_pack(weight64: np.ndarray, order: np.ndarray, num_packs: int) -> Tuple[np.ndarray, np.ndarray]:
    """Balanced packing of every row: visit the items in ``order``; each goes to the
    lightest pack (float64 running sum) that still has room, first such pack on ties.

    One step per item for all rows: ``key`` holds each pack's running sum, or +inf once the
    pack is full (a full pack's sum is never looked at again), so the choice is one argmin.
    Returns (pack_index, rank_in_pack), int64 [X, n].
    """
    num_rows, num_items = weight64.shape
    per_pack = num_items // num_packs
    # [n, X]: row j holds the j-th visited item's weight of every row (contiguous).
    visited = np.ascontiguousarray(np.take_along_axis(weight64, order, axis=1).T)
    key = np.zeros((num_rows, num_packs), dtype=np.float64)
    key_flat = key.reshape(-1)
    count = np.zeros(num_rows * num_packs, dtype=np.int64)
    base = np.arange(num_rows, dtype=np.int64) * num_packs
    pack_of_step = np.empty((num_items, num_rows), dtype=np.int64)
    rank_of_step = np.empty((num_items, num_rows), dtype=np.int64)
    inf = np.inf
    for j in range(num_items):
        pack = key.argmin(axis=1)
        pack_of_step[j] = pack
        idx = pack + base
        c = count[idx]
        rank_of_step[j] = c
        c += 1
        count[idx] = c
        s = key_flat[idx] + visited[j]
        s[c >= per_pack] = inf
        key_flat[idx] = s
    pack_index = np.empty((num_rows, num_items), dtype=np.int64)
    rank_in_pack = np.empty((num_rows, num_items), dtype=np.int64)
    np.put_along_axis(pack_index, order, pack_of_step.T, axis=1)
    np.put_along_axis(rank_in_pack, order, rank_of_step.T, axis=1)
    return pack_index, rank_in_pack


def _pack_rows(weight32: np.ndarray, num_packs: int) -> Tuple[np.ndarray, np.ndarray]:
    """:func:`balanced_packing` of float32 rows, on numpy arrays."""
    num_rows, num_items = weight32.shape
    if num_items // num_packs == 1:
        pack_index = np.broadcast_to(np.arange(num_items, dtype=np.int64), weight32.shape)
        return pack_index, np.zeros(weight32.shape, dtype=np.int64)
    return _greedy_pack(weight32.astype(np.float64), _visit_order(weight32), num_packs)


def _replicate(weight: np.ndarray, num_phy: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`replicate_experts` on numpy arrays; also returns ``weight / logcnt``.

    ``ratio`` holds ``weight / count`` (in ``weight``'s dtype, as torch divides a float
    tensor by an int64 one); a step changes one entry per row, so only that entry is
    recomputed. ``argmax`` returns the first index on ties, as ``torch.max(dim)`` does.
    """
    num_rows, num_log = weight.shape
    num_extra = num_phy - num_log
    count = np.ones((num_rows, num_log), dtype=np.int64)
    count_flat = count.reshape(-1)
    ratio = weight.copy()  # weight / 1
    ratio_flat = ratio.reshape(-1)
    weight_flat = np.ascontiguousarray(weight).reshape(-1)
    base = np.arange(num_rows, dtype=np.int64) * num_log
    best_of_step = np.empty((num_extra, num_rows), dtype=np.int64)
    rank_of_step = np.empty((num_extra, num_rows), dtype=np.int64)
    for i in range(num_extra):
        best = ratio.argmax(axis=1)
        best_of_step[i] = best
        idx = best + base
        c = count_flat[idx]
        rank_of_step[i] = c
        c += 1
        count_flat[idx] = c
        ratio_flat[idx] = weight_flat[idx] / c.astype(weight.dtype)
    phy2log = np.empty((num_rows, num_phy), dtype=np.int64)
    phy2log[:, :num_log] = np.arange(num_log, dtype=np.int64)
    phy2log[:, num_log:] = best_of_step.T
    rank = np.zeros((num_rows, num_phy), dtype=np.int64)
    rank[:, num_log:] = rank_of_step.T
    return phy2log, rank, count, ratio


def balanced_packing(weight: torch.Tensor, num_packs: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pack ``n`` weighted items of every row into ``num_packs`` packs of ``n / num_packs``.

    Greedy (longest processing time first): items are visited by decreasing weight and each
    goes to the lightest pack that still has room (first such pack on ties). All rows
    advance together.

    Parameters:
        weight: [X, n] item weights
        num_packs: number of packs, must divide n

    Returns:
        pack_index: [X, n] int64, pack of each item
        rank_in_pack: [X, n] int64, position of the item in its pack
    """
    num_rows, num_items = weight.shape
    if num_items % num_packs != 0:
        raise ValueError(f"{num_items} items cannot be split evenly into {num_packs} packs")
    per_pack = num_items // num_packs
    if per_pack == 1:
        pack_index = torch.arange(num_items, dtype=torch.int64).expand(weight.shape)
        return pack_index, torch.zeros_like(weight, dtype=torch.int64)
    weight = weight.detach().cpu()
    # visiting order from the float32 values (upstream's call), sums in float64
    order = _visit_order(weight.float().contiguous().numpy())
    pack_index, rank_in_pack = _greedy_pack(weight.double().numpy(), order, num_packs)
    return torch.from_numpy(pack_index), torch.from_numpy(rank_in_pack)


def replicate_experts(
    weight: torch.Tensor, num_phy: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Add ``num_phy - num_log`` replicas, one at a time, to the expert with the highest
    weight per replica (first index on ties).

    Parameters:
        weight: [X, num_log] float32 (float64 is divided in float64; other dtypes are
            converted to float32)
        num_phy: number of physical experts after replication

    Returns:
        phy2log: [X, num_phy] logical expert of each physical expert
        rank: [X, num_phy] replica rank of each physical expert
        logcnt: [X, num_log] number of replicas of each logical expert
    """
    num_rows, num_log = weight.shape
    if num_phy < num_log:
        raise ValueError(f"num_phy ({num_phy}) < num_log ({num_log})")
    weight = weight.detach().cpu()
    if weight.dtype not in (torch.float32, torch.float64):
        weight = weight.float()
    phy2log, rank, logcnt, _ = _replicate(weight.contiguous().numpy(), num_phy)
    return torch.from_numpy(phy2log), torch.from_numpy(rank), torch.from_numpy(logcnt)


def _rebalance_hierarchical_np(
    weight: torch.Tensor,
    num_physical_experts: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`rebalance_experts_hierarchical` on a float32 CPU tensor, numpy results."""
    num_layers, num_logical = weight.shape
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    phy_per_gpu = num_physical_experts // num_gpus
    log_per_node = num_logical // num_nodes
    w = weight.numpy()

    # 1. expert groups -> nodes (the group sums are torch's float32 sums, as upstream's)
    if num_groups == num_nodes:  # one group per node: group g on node g
        log2mlog = np.broadcast_to(np.arange(num_logical, dtype=np.int64), (num_layers, num_logical))
        mlog2log = log2mlog
        tokens_per_mlog = w.reshape(-1, log_per_node)
    else:
        tokens_per_group = weight.unflatten(-1, (num_groups, group_size)).sum(-1).numpy()
        group_pack, group_rank = _pack_rows(tokens_per_group, num_nodes)
        log2mlog = (
            ((group_pack * groups_per_node + group_rank) * group_size)[:, :, None]
            + np.arange(group_size, dtype=np.int64)
        ).reshape(num_layers, num_logical)
        mlog2log = _inverse_np(log2mlog)
        # 2. replicas within each node: [num_layers * num_nodes, log_per_node]
        tokens_per_mlog = np.take_along_axis(w, mlog2log, axis=1).reshape(-1, log_per_node)
    phy2mlog, phyrank, mlogcnt, per_replica = _replicate(
        tokens_per_mlog, num_physical_experts // num_nodes
    )

    # 3. replicas -> GPUs of the node (a replica weighs float32(weight / replicas))
    tokens_per_phy = np.take_along_axis(per_replica, phy2mlog, axis=1)
    pack, rank_in_pack = _pack_rows(tokens_per_phy, num_gpus // num_nodes)
    phy2pphy = pack * phy_per_gpu + rank_in_pack
    pphy2phy = _inverse_np(phy2pphy)

    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=1)
    pphy2mlog = (
        pphy2mlog.reshape(num_layers, num_nodes, -1)
        + np.arange(0, num_logical, log_per_node, dtype=np.int64)[None, :, None]
    ).reshape(num_layers, -1)
    pphy2log = np.take_along_axis(mlog2log, pphy2mlog, axis=1)
    pphyrank = np.take_along_axis(phyrank, pphy2phy, axis=1).reshape(num_layers, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(num_layers, -1), log2mlog, axis=1)
    return pphy2log, pphyrank, logcnt


def rebalance_experts_hierarchical(
    weight: torch.Tensor,
    num_physical_experts: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Groups onto nodes, replicas within nodes, replicas onto the node's GPUs.

    Parameters:
        weight: [num_layers, num_logical_experts] float32
        num_physical_experts, num_groups, num_nodes, num_gpus: topology (validated)

    Returns:
        phy2log: [num_layers, num_physical_experts]
        phyrank: [num_layers, num_physical_experts] replica rank
        logcnt: [num_layers, num_logical_experts]
    """
    out = _rebalance_hierarchical_np(
        weight.detach().float().cpu().contiguous(), num_physical_experts, num_groups, num_nodes, num_gpus
    )
    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in out)


def rebalance_experts(
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: Optional[int],
    num_nodes: int,
    num_gpus: int,
    enable_hierarchical: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek EPLB on an arbitrary non-negative weight (vectorised over layers).

    Parameters:
        weight: [num_layers, num_logical_experts]
        num_replicas: number of physical experts, a multiple of ``num_gpus``
        num_groups: number of expert groups (hierarchical policy only; may be None)
        num_nodes: number of nodes; ``num_gpus`` must be a multiple of it
        num_gpus: number of GPUs
        enable_hierarchical: groups onto nodes first. Falls back to the global policy
            (with a warning) when ``num_groups`` is None or not a multiple of ``num_nodes``.

    Returns:
        physical_to_logical_map: [num_layers, num_replicas] int64
        logical_to_physical_map: [num_layers, num_logical_experts, max_replicas] int64, -1 padded
        logical_count: [num_layers, num_logical_experts] int64
    """
    _check_weight("weight", weight)
    num_layers, num_logical = weight.shape
    hierarchical = _check_topology(
        num_logical, num_replicas, num_groups, num_nodes, num_gpus, enable_hierarchical
    )
    weight = weight.detach().float().cpu().contiguous()
    if hierarchical:
        phy2log, phyrank, logcnt = _rebalance_hierarchical_np(
            weight, num_replicas, num_groups, num_nodes, num_gpus
        )
    else:
        phy2log, phyrank, logcnt = _rebalance_hierarchical_np(weight, num_replicas, 1, 1, num_gpus)
    max_cnt = int(logcnt.max())
    log2phy = np.full((num_layers, num_logical * max_cnt), -1, dtype=np.int64)
    np.put_along_axis(
        log2phy,
        phy2log * max_cnt + phyrank,
        np.arange(num_replicas, dtype=np.int64)[None, :],
        axis=1,
    )
    return (
        torch.from_numpy(np.ascontiguousarray(phy2log)),
        torch.from_numpy(log2phy.reshape(num_layers, num_logical, max_cnt)),
        torch.from_numpy(np.ascontiguousarray(logcnt)),
    )


def compute_cost_aware_rebalance_experts(
    token_weight: torch.Tensor,
    compute_cost_weight: Optional[torch.Tensor],
    num_replicas: int,
    num_groups: Optional[int],
    num_nodes: int,
    num_gpus: int,
    enable_hierarchical: bool,
    alpha: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compute-cost-aware EPLB: DeepSeek's placement on :func:`blend_weights`.

    Parameters:
        token_weight: [num_layers, num_logical_experts], tokens per expert over the window
        compute_cost_weight: [num_layers, num_logical_experts], expected compute time per
            expert over the same window (any unit), or None (tokens only)
        num_replicas: number of physical experts (slots), a multiple of ``num_gpus``
        num_groups: expert groups (hierarchical policy), or None
        num_nodes: number of nodes
        num_gpus: number of GPUs (EP ranks)
        enable_hierarchical: use the hierarchical policy where the topology allows it
        alpha: in [0, 1]; 0 reproduces upstream ``deepseek`` exactly

    Returns:
        SGLang's triple (physical_to_logical_map [L, R], logical_to_physical_map
        [L, E, X] padded with -1, logical_count [L, E]), all int64 on the CPU.
    """
    weight = blend_weights(token_weight, compute_cost_weight, alpha)
    return rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus, enable_hierarchical)


# --------------------------------------------------------------------------- evaluation


def replica_token_counts(
    token_count: torch.Tensor, physical_to_logical_map: torch.Tensor, logical_count: torch.Tensor
) -> torch.Tensor:
    """Tokens each physical expert receives when an expert's tokens split evenly over its
    replicas.

    Parameters:
        token_count: [..., L, E]
        physical_to_logical_map: [L, R]
        logical_count: [L, E] replicas per logical expert

    Returns:
        [..., L, R] float64
    """
    per_replica = token_count.double() / logical_count.double().to(token_count.device)
    index = physical_to_logical_map.to(token_count.device).expand(*token_count.shape[:-1], -1)
    return per_replica.gather(-1, index)


def gpu_loads(per_physical: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Sum a per-physical-expert quantity [..., L, R] per GPU -> [..., L, num_gpus]
    (physical experts are laid out GPU-major, as in SGLang)."""
    *lead, r = per_physical.shape
    if r % num_gpus != 0:
        raise ValueError(f"{r} physical experts cannot be split over {num_gpus} GPUs")
    return per_physical.reshape(*lead, num_gpus, r // num_gpus).sum(-1)


def balancedness(gpu_load: torch.Tensor) -> torch.Tensor:
    """mean / max over GPUs of [..., num_gpus] -> [...]; 1.0 where every GPU is idle."""
    g = gpu_load.double()
    mx = g.amax(-1)
    return torch.where(mx > 0, g.mean(-1) / mx.clamp_min(1e-300), torch.ones_like(mx))
