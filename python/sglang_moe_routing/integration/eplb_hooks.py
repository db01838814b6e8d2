"""SGLang integration of compute-cost-aware EPLB: the feature module the plugin loads, and
the hooks on SGLang's EPLB algorithm and ``EPLBManager``.

Flags (``add_cli_args``) -> validated section ``"eplb"`` (``parse_section``; both in
``eplb_flags.py``) -> hooks, registered by :func:`runtime_hooks` before the model runner
initialises and only those the enabled features need (none without a compute-aware
algorithm, profiling or ``--enable-eplb``):

* ``eplb_algorithms.compute_algorithm`` (AROUND): ``--eplb-algorithm compute_aware`` /
  ``compute_aware_hierarchical`` map to :class:`ComputeAwareEplbAlgorithm` members
  (upstream's ``EplbAlgorithm[...]`` lookup would raise ``KeyError``).
* ``eplb_algorithms.rebalance_experts`` (AROUND): those members run
  :func:`compute_cost_aware_rebalance_experts` with the profiled costs of the recorded
  window; every other algorithm goes to upstream untouched.
* ``EPLBManager._check_rebalance_needed`` (AROUND): with a compute-aware algorithm, merges
  the ranks' profiler statistics (one all-reduce, so every rank derives the same costs and
  placement) and applies ``--eplb-min-rebalancing-utilization-threshold`` to the
  compute-time balancedness of the current placement over the recorded window.
* ``EPLBManager._compute_expert_location_metadata`` (AROUND): logs token and compute-time
  balancedness of the placement before and after each rebalance (any algorithm).
* ``_ExpertDistributionRecorderReal.dump_record`` (AFTER): keeps the window's per-pass
  ``logical_count`` for the two hooks above.
* ``ModelRunner.maybe_init_expert_location_metadata`` (AFTER): with
  ``--enable-expert-compute-profiling``, starts the compute profiler and its forward-path
  hooks (``eplb_profiling_hooks.py``).
"""

from __future__ import annotations

import logging
from typing import Dict, Optional

import torch

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from sglang_moe_routing.eplb.compute_aware import (
    balancedness,
    compute_cost_aware_rebalance_experts,
    gpu_loads,
    replica_token_counts,
)
from sglang_moe_routing.eplb.profiler import (
    ExpertComputeProfiler,
    get_global_expert_compute_profiler,
)
# add_cli_args and parse_section: part of this feature module's interface to plugin.py
from sglang_moe_routing.integration.eplb_flags import (  # noqa: F401
    COMPUTE_AWARE_ALGORITHMS,
    ComputeAwareEplbAlgorithm,
    EplbComputeConfig,
    add_cli_args,
    parse_section,
    section,
)
from sglang_moe_routing.integration.eplb_profiling_hooks import after_init_expert_location

logger = logging.getLogger("sglang_moe_routing.eplb")

# --------------------------------------------------------------------------- shared state

# Per-pass logical counts of the last recorder dump, and the profiler merged over ranks for
# the rebalance in progress (set in _check_rebalance_needed on every rank).
_last_logical_count: Optional[torch.Tensor] = None
_round_profiler: Optional[ExpertComputeProfiler] = None


def _world_size() -> int:
    try:
        import torch.distributed as dist

        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    except Exception:
        return 1


def _merged_profiler(device: Optional[torch.device]) -> Optional[ExpertComputeProfiler]:
    """The local profiler summed over all ranks (collective: every rank must call this)."""
    prof = get_global_expert_compute_profiler()
    if prof is None:
        return None
    prof.poll()
    if _world_size() <= 1:
        return prof
    import torch.distributed as dist

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        dev = device
        if dev is None:
            dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        t = t.to(dev)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu()

    return prof.all_reduced(all_reduce)


def _costs_for_rebalance(tokens: torch.Tensor) -> Optional[torch.Tensor]:
    """Compute cost [L, E] of the window ``tokens`` [S, L, E], or None (tokens only)."""
    prof = _round_profiler
    if prof is None:
        local = get_global_expert_compute_profiler()
        if local is not None and _world_size() <= 1:
            local.poll()
            prof = local
        elif local is not None:
            logger.warning(
                "compute-aware EPLB: profiler statistics were not merged over ranks for this "
                "rebalance; using token counts so that all ranks agree"
            )
    if prof is None or not prof.has_fit():
        return None
    if tuple(tokens.shape[-2:]) != (prof.num_layers, prof.num_experts):
        logger.warning(
            "compute-aware EPLB: token counts %s do not match the profiler's [%d, %d]; using token counts",
            tuple(tokens.shape), prof.num_layers, prof.num_experts,
        )
        return None
    return prof.get_adjusted_expert_load(tokens).double().sum(0)


# --------------------------------------------------------------------------- algorithm hooks


def _around_compute_algorithm(original, raw_algorithm, *args, **kwargs):
    if raw_algorithm in COMPUTE_AWARE_ALGORITHMS:
        return ComputeAwareEplbAlgorithm(raw_algorithm)
    return original(raw_algorithm, *args, **kwargs)


def _around_rebalance_experts(
    original,
    tokens_per_expert,
    num_physical_experts,
    num_local_physical_experts,
    num_groups,
    num_nodes,
    algorithm,
    *args,
    **kwargs,
):
    if not isinstance(algorithm, ComputeAwareEplbAlgorithm):
        return original(
            tokens_per_expert, num_physical_experts, num_local_physical_experts, num_groups, num_nodes,
            algorithm, *args, **kwargs,
        )
    cfg = section() or EplbComputeConfig(algorithm=algorithm.value)
    tokens = torch.as_tensor(tokens_per_expert).detach().double().cpu()
    if tokens.dim() == 2:
        tokens = tokens.unsqueeze(0)
    cost = _costs_for_rebalance(tokens)
    out = compute_cost_aware_rebalance_experts(
        tokens.sum(0).float(),
        cost,
        num_replicas=num_physical_experts,
        num_groups=num_groups,
        num_nodes=num_nodes,
        num_gpus=num_physical_experts // num_local_physical_experts,
        enable_hierarchical=algorithm is ComputeAwareEplbAlgorithm.compute_aware_hierarchical,
        alpha=cfg.alpha if cost is not None else 0.0,
    )
    logger.info(
        "compute-aware EPLB: %s, alpha=%g, costs=%s",
        algorithm.value, cfg.alpha, "profiled" if cost is not None else "none (token counts)",
    )
    return out


# --------------------------------------------------------------------------- EPLBManager hooks


def _after_dump_record(result, *args, **kwargs):
    global _last_logical_count
    if isinstance(result, dict) and result.get("logical_count") is not None:
        _last_logical_count = result["logical_count"]
    return None


def placement_balancedness(
    token_count: torch.Tensor,
    physical_to_logical_map: torch.Tensor,
    num_gpus: int,
    profiler: Optional[ExpertComputeProfiler] = None,
) -> Dict[str, float]:
    """Mean over passes and layers of mean/max per GPU, in tokens and (with a fitted
    profiler) in modelled compute time.

    Parameters:
        token_count: [S, L, E] per-pass tokens per logical expert (passes with no tokens
            are skipped)
        physical_to_logical_map: [L, R]
        num_gpus: EP ranks
    """
    tc = token_count.detach().double().cpu()
    if tc.dim() == 2:
        tc = tc.unsqueeze(0)
    tc = tc[tc.flatten(1).sum(1) > 0]
    p2l = physical_to_logical_map.detach().long().cpu()
    if tc.shape[0] == 0:
        return {}
    logcnt = torch.zeros(tc.shape[1], tc.shape[2], dtype=torch.int64)
    logcnt.scatter_add_(1, p2l, torch.ones_like(p2l))
    if (logcnt == 0).any():
        logcnt = logcnt.clamp_min(1)  # an expert without replica: its tokens are dropped below
    per_slot = replica_token_counts(tc, p2l, logcnt)  # [S, L, R]
    out = {"tokens": float(balancedness(gpu_loads(per_slot, num_gpus)).mean())}
    shape_ok = profiler is not None and tuple(tc.shape[-2:]) == (profiler.num_layers, profiler.num_experts)
    if shape_ok and profiler.has_fit():
        per_expert = profiler.get_adjusted_expert_load((tc / logcnt).float()).double()  # cost of one replica
        slot_cost = per_expert.gather(-1, p2l.expand(tc.shape[0], -1, -1))
        out["compute"] = float(balancedness(gpu_loads(slot_cost, num_gpus)).mean())
    return out


def _around_check_rebalance_needed(original, self, average_utilization_rate_over_window, *args, **kwargs):
    global _round_profiler
    cfg = section()
    if cfg is None or not cfg.compute_aware:
        return original(self, average_utilization_rate_over_window, *args, **kwargs)
    lc = _last_logical_count
    _round_profiler = _merged_profiler(lc.device if isinstance(lc, torch.Tensor) else None)
    if cfg.min_rebalancing_utilization_threshold >= 1.0 or lc is None:
        return original(self, average_utilization_rate_over_window, *args, **kwargs)
    from sglang.srt.eplb.expert_location import get_global_expert_location_metadata

    md = get_global_expert_location_metadata()
    if md is None:
        return original(self, average_utilization_rate_over_window, *args, **kwargs)
    b = placement_balancedness(lc, md.physical_to_logical_map, md.ep_size, _round_profiler)
    util = b.get("compute", b.get("tokens"))
    if util is None:
        return original(self, average_utilization_rate_over_window, *args, **kwargs)
    thr = cfg.min_rebalancing_utilization_threshold
    if util > thr:
        logger.info(
            "[EPLBManager] Skipped ep rebalancing: %s balancedness of the current placement %.3f > "
            "minimum rebalance threshold %.2f",
            "compute-time" if "compute" in b else "token", util, thr,
        )
        _round_profiler = None
        return False
    return True


def _around_compute_expert_location_metadata(original, self, logical_count, *args, **kwargs):
    global _round_profiler
    try:
        from sglang.srt.eplb.expert_location import get_global_expert_location_metadata

        old = get_global_expert_location_metadata()
        new = original(self, logical_count, *args, **kwargs)
        try:
            _log_balancedness(logical_count, old, new)
        except Exception:  # logging must never break a rebalance
            logger.exception("compute-aware EPLB: balancedness logging failed")
        return new
    finally:
        _round_profiler = None


def _log_balancedness(logical_count, old, new) -> None:
    from sglang.srt.runtime_context import get_parallel

    try:
        if get_parallel().tp_rank != 0:
            return
    except Exception:
        pass
    if old is None or new is None or not isinstance(logical_count, torch.Tensor):
        return
    prof = _round_profiler or (get_global_expert_compute_profiler() if _world_size() <= 1 else None)
    before = placement_balancedness(logical_count, old.physical_to_logical_map, old.ep_size, prof)
    after = placement_balancedness(logical_count, new.physical_to_logical_map, new.ep_size, prof)
    fmt = lambda d: " ".join(f"{k}={v:.3f}" for k, v in d.items()) or "n/a"
    cfg = section()
    logger.info(
        "[EPLBManager] balancedness (mean/max per GPU over the recorded window) before: %s | after: %s "
        "(algorithm=%s)",
        fmt(before), fmt(after), cfg.algorithm if cfg else "?",
    )


# --------------------------------------------------------------------------- registration


ALG = "sglang.srt.eplb.eplb_algorithms"
MGR = "sglang.srt.eplb.eplb_manager.EPLBManager"
_RUNTIME = {
    # target: (hook, type, needed when)
    f"{ALG}.compute_algorithm": (_around_compute_algorithm, HookType.AROUND, "compute_aware"),
    f"{ALG}.rebalance_experts": (_around_rebalance_experts, HookType.AROUND, "compute_aware"),
    f"{MGR}._check_rebalance_needed": (_around_check_rebalance_needed, HookType.AROUND, "compute_aware"),
    f"{MGR}._compute_expert_location_metadata": (
        _around_compute_expert_location_metadata, HookType.AROUND, "eplb"),
    "sglang.srt.eplb.expert_distribution._ExpertDistributionRecorderReal.dump_record": (
        _after_dump_record, HookType.AFTER, "compute_aware"),
    "sglang.srt.model_executor.model_runner.ModelRunner.maybe_init_expert_location_metadata": (
        after_init_expert_location, HookType.AFTER, "profiling"),
}
_runtime_registered: set = set()


def register_hooks() -> None:
    """No cold-path hooks: everything comes from :func:`runtime_hooks` when a compute-aware
    feature is on (upstream EPLB runs untouched otherwise)."""


def _needs(cfg: Optional[EplbComputeConfig]) -> set:
    if cfg is None:
        return set()
    need = set()
    if cfg.compute_aware:
        need.add("compute_aware")
    if cfg.enable_profiling:
        need.add("profiling")
    if cfg.enable_eplb:
        need.add("eplb")  # balancedness lines before/after each rebalance (any algorithm)
    return need


def runtime_hooks(force: bool = False) -> list:
    """Register the hooks the enabled EPLB features need (all of them with ``force``);
    returns their targets."""
    need = {"compute_aware", "profiling", "eplb"} if force else _needs(section())
    targets = [t for t, (_, _, when) in _RUNTIME.items() if when in need]
    for t in targets:
        if t not in _runtime_registered:
            hook, kind, _ = _RUNTIME[t]
            HookRegistry.register(t, hook, kind)
            _runtime_registered.add(t)
    return targets


def self_check() -> list:
    need = _needs(section())
    if not need:
        return []
    from .upstream import missing

    targets = [t for t, (_, _, when) in _RUNTIME.items() if when in need]
    if "profiling" in need:
        targets.append("sglang.srt.layers.moe.fused_moe_triton.layer.FusedMoE.run_moe_core")
    return [f"compute-aware EPLB: {m}" for m in missing(targets)]
