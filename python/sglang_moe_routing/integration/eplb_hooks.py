"""SGLang integration of compute-cost-aware EPLB.

Flags (``add_cli_args``) -> validated section ``"eplb"`` (``parse_section``) -> hooks,
registered by :func:`runtime_hooks` before the model runner initialises and only those the
enabled features need (none without a compute-aware algorithm, profiling or ``--enable-eplb``):

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
  ``--enable-expert-compute-profiling``, creates the process's
  :class:`ExpertComputeProfiler` and only then registers the two profiling hooks
  (a ``ModelRunner.forward`` wrapper through ``forward_pass`` that counts passes and runs the
  profiled ones eagerly, outside CUDA graphs; ``FusedMoE.run_moe_core`` and
  ``DeepEPMoE.run_moe_core`` to time the expert kernels), so with profiling off the forward
  path carries no extra wrapper.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from dataclasses import dataclass
from enum import Enum
from typing import Any, Dict, Optional, Tuple

import torch

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from sglang_moe_routing.eplb.compute_aware import (
    balancedness,
    compute_cost_aware_rebalance_experts,
    gpu_loads,
    replica_token_counts,
)
from sglang_moe_routing.eplb.profiler import (
    DEFAULT_TILE_SIZES,
    ExpertComputeProfiler,
    get_global_expert_compute_profiler,
    set_global_expert_compute_profiler,
)
from sglang_moe_routing.integration import config

logger = logging.getLogger("sglang_moe_routing.eplb")

SECTION = "eplb"
DEFAULT_ALPHA = 0.5
DEFAULT_WARMUP_STEPS = 10
DEFAULT_INTERVAL = 10


class ComputeAwareEplbAlgorithm(Enum):
    """Our algorithms, returned by the hooked ``compute_algorithm``."""

    compute_aware = "compute_aware"
    compute_aware_hierarchical = "compute_aware_hierarchical"


COMPUTE_AWARE_ALGORITHMS = tuple(a.value for a in ComputeAwareEplbAlgorithm)


def _upstream_algorithm_names() -> Tuple[str, ...]:
    try:
        from sglang.srt.eplb.eplb_algorithms import EplbAlgorithm
    except Exception:  # pragma: no cover - layout changed
        return ()
    return tuple(a.name for a in EplbAlgorithm)


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class EplbComputeConfig:
    """Validated settings of compute-cost-aware EPLB (section ``"eplb"``)."""

    algorithm: str = "auto"
    alpha: float = DEFAULT_ALPHA
    enable_profiling: bool = False
    warmup_steps: int = DEFAULT_WARMUP_STEPS
    interval: int = DEFAULT_INTERVAL
    tile_sizes: Tuple[int, ...] = DEFAULT_TILE_SIZES
    min_rebalancing_utilization_threshold: float = 1.0
    enable_eplb: bool = False

    @property
    def compute_aware(self) -> bool:
        return self.algorithm in COMPUTE_AWARE_ALGORITHMS

    def describe(self) -> str:
        prof = (
            f"profiling on (warmup {self.warmup_steps} passes, 1 pass in {self.interval}, "
            f"tiles {'/'.join(map(str, self.tile_sizes))})"
            if self.enable_profiling
            else "profiling off"
        )
        if self.compute_aware:
            costs = (
                "profiled costs" if self.enable_profiling else "no costs: token counts only, same as deepseek"
            )
            head = f"eplb: algorithm={self.algorithm} alpha={self.alpha:g} ({costs})"
        else:
            head = f"eplb: algorithm={self.algorithm} (upstream)"
        thr = self.min_rebalancing_utilization_threshold
        tail = f", rebalance only below utilization {thr:g}" if thr < 1.0 else ""
        return f"{head}, {prof}{tail}" + ("" if self.enable_eplb else ", --enable-eplb off")


def add_cli_args(group: Any) -> None:
    """Add the flags to SGLang's parser and accept our ``--eplb-algorithm`` values."""
    names = ", ".join(COMPUTE_AWARE_ALGORITHMS)
    for action in getattr(group, "_actions", []):
        if getattr(action, "dest", None) != "eplb_algorithm":
            continue
        if action.choices is not None:
            action.choices = list(action.choices) + [
                a for a in COMPUTE_AWARE_ALGORITHMS if a not in action.choices
            ]
        if action.help and "compute_aware" not in action.help:
            action.help = f"{action.help} (sglang-moe-routing adds: {names})"
        break
    group.add_argument(
        "--enable-expert-compute-profiling",
        action="store_true",
        help="Time the MoE expert kernels with CUDA events (no host sync) and fit a per-expert "
        "compute cost model that --eplb-algorithm compute_aware uses.",
    )
    group.add_argument(
        "--eplb-compute-cost-alpha",
        type=float,
        default=DEFAULT_ALPHA,
        help="Share of profiled compute cost in the EPLB placement weight, in [0, 1]: "
        "0 = token counts only (upstream deepseek), 1 = compute time only.",
    )
    group.add_argument(
        "--expert-compute-profiling-warmup-steps",
        type=int,
        default=DEFAULT_WARMUP_STEPS,
        help="Forward passes to skip before profiling expert kernels (>= 0).",
    )
    group.add_argument(
        "--expert-compute-profiling-interval",
        type=int,
        default=DEFAULT_INTERVAL,
        help="Profile one forward pass in this many (>= 1).",
    )
    group.add_argument(
        "--expert-compute-profiling-tile-sizes",
        type=str,
        default=",".join(map(str, DEFAULT_TILE_SIZES)),
        help="Candidate token tile sizes of the fitted cost model a + b*ceil(tokens/tile) "
        "(comma-separated positive ints; 1 = linear).",
    )


def _get(args: argparse.Namespace, name: str, default: Any) -> Any:
    v = getattr(args, name, default)
    return default if v is None else v


def parse_section(args: argparse.Namespace) -> Dict[str, EplbComputeConfig]:
    """Validate the flags; raises ``ValueError`` listing every problem."""
    errors = []
    algorithm = str(_get(args, "eplb_algorithm", "auto"))
    known = ("auto",) + _upstream_algorithm_names() + COMPUTE_AWARE_ALGORITHMS
    if algorithm not in known:
        errors.append(f"--eplb-algorithm {algorithm!r} is unknown; choose from {', '.join(known)}")

    def number(flag: str, name: str, default: float, lo: float, hi: float) -> float:
        return config.collect(errors, default, lambda: config.parse_number(flag, _get(args, name, default), lo, hi))

    def integer(flag: str, name: str, default: int, lo: int) -> int:
        return config.collect(errors, default, lambda: config.parse_integer(flag, _get(args, name, default), lo))

    alpha = number("--eplb-compute-cost-alpha", "eplb_compute_cost_alpha", DEFAULT_ALPHA, 0.0, 1.0)
    threshold = number(
        "--eplb-min-rebalancing-utilization-threshold",
        "eplb_min_rebalancing_utilization_threshold",
        1.0,
        0.0,
        1.0,
    )
    warmup = integer(
        "--expert-compute-profiling-warmup-steps", "expert_compute_profiling_warmup_steps", DEFAULT_WARMUP_STEPS, 0
    )
    interval = integer(
        "--expert-compute-profiling-interval", "expert_compute_profiling_interval", DEFAULT_INTERVAL, 1
    )
    raw_tiles = _get(args, "expert_compute_profiling_tile_sizes", ",".join(map(str, DEFAULT_TILE_SIZES)))
    tiles: Tuple[int, ...] = DEFAULT_TILE_SIZES
    try:
        parts = raw_tiles if isinstance(raw_tiles, (list, tuple)) else str(raw_tiles).split(",")
        tiles = tuple(int(str(p).strip()) for p in parts if str(p).strip())
        if not tiles or any(t < 1 for t in tiles) or len(set(tiles)) != len(tiles):
            raise ValueError
    except ValueError:
        errors.append(
            "--expert-compute-profiling-tile-sizes must be distinct positive integers separated by "
            f"commas, got {raw_tiles!r}"
        )
        tiles = DEFAULT_TILE_SIZES
    if errors:
        raise ValueError("; ".join(errors))

    cfg = EplbComputeConfig(
        algorithm=algorithm,
        alpha=alpha,
        enable_profiling=bool(_get(args, "enable_expert_compute_profiling", False)),
        warmup_steps=warmup,
        interval=interval,
        tile_sizes=tiles,
        min_rebalancing_utilization_threshold=threshold,
        enable_eplb=bool(_get(args, "enable_eplb", False)),
    )
    if cfg.compute_aware and not cfg.enable_profiling:
        logger.warning(
            "--eplb-algorithm %s without --enable-expert-compute-profiling: no compute costs are "
            "measured, placements equal upstream deepseek",
            algorithm,
        )
    if (
        threshold < 1.0
        and not cfg.compute_aware
        and str(_get(args, "expert_balancedness_report_mode", "off")) == "off"
    ):
        logger.warning(
            "--eplb-min-rebalancing-utilization-threshold %g has no effect in upstream EPLB while "
            "--expert-balancedness-report-mode is off (SGLang measures utilization only then)",
            threshold,
        )
    return {SECTION: cfg}


def _section() -> Optional[EplbComputeConfig]:
    cfg = config.get_section(SECTION)
    return cfg if isinstance(cfg, EplbComputeConfig) else None


# --------------------------------------------------------------------------- shared state

# Per-pass logical counts of the last recorder dump, and the profiler merged over ranks for
# the rebalance in progress (set in _check_rebalance_needed on every rank).
_last_logical_count: Optional[torch.Tensor] = None
_round_profiler: Optional[ExpertComputeProfiler] = None
_profiling_hooks_installed = False


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
    cfg = _section() or EplbComputeConfig(algorithm=algorithm.value)
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
    cfg = _section()
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
    cfg = _section()
    logger.info(
        "[EPLBManager] balancedness (mean/max per GPU over the recorded window) before: %s | after: %s "
        "(algorithm=%s)",
        fmt(before), fmt(after), cfg.algorithm if cfg else "?",
    )


# --------------------------------------------------------------------------- profiling hooks


def _after_init_expert_location(result, self, *args, **kwargs):
    cfg = _section()
    if cfg is None or not cfg.enable_profiling or getattr(self, "is_draft_worker", False):
        return None
    from sglang.srt.eplb.expert_location import get_global_expert_location_metadata

    md = get_global_expert_location_metadata()
    if md is None:
        logger.warning(
            "--enable-expert-compute-profiling: this model has no expert location metadata; not profiling"
        )
        return None
    prof = ExpertComputeProfiler(
        md.num_layers,
        md.num_logical_experts,
        warmup_steps=cfg.warmup_steps,
        interval=cfg.interval,
        tile_sizes=cfg.tile_sizes,
    )
    set_global_expert_compute_profiler(prof)
    install_profiling_hooks()
    logger.info(
        "expert compute profiling: %d layers x %d experts, warmup %d passes, 1 pass in %d "
        "(profiled passes run eagerly, outside CUDA graphs, so their expert kernels can be timed)",
        md.num_layers, md.num_logical_experts, cfg.warmup_steps, cfg.interval,
    )
    return None


def install_profiling_hooks() -> None:
    """Register and apply the forward-path hooks (only done when profiling is enabled)."""
    global _profiling_hooks_installed
    if _profiling_hooks_installed:
        return
    _profiling_hooks_installed = True
    targets = (
        "sglang.srt.layers.moe.fused_moe_triton.layer.FusedMoE.run_moe_core",
        "sglang.srt.layers.moe.ep_moe.layer.DeepEPMoE.run_moe_core",
    )
    for target in targets:
        HookRegistry.register(target, _around_run_moe_core, HookType.AROUND)
    from sglang_moe_routing.integration import forward_pass

    forward_pass.apply_late_hooks(targets)
    forward_pass.add_wrapper(_around_model_runner_forward)


_GRAPH_RUNNERS = ("decode_cuda_graph_runner", "prefill_cuda_graph_runner")


@contextlib.contextmanager
def eager_forward(model_runner: Any):
    """Run this forward pass eagerly: CUDA-graph replays never enter Python, so the expert
    kernels of a profiled pass could not be timed. The graphs stay captured; the runner
    attributes are hidden for one pass, as when a batch is larger than any captured graph."""
    saved = {a: getattr(model_runner, a, None) for a in _GRAPH_RUNNERS}
    try:
        for a, v in saved.items():
            if v is not None:
                setattr(model_runner, a, None)
        yield
    finally:
        for a, v in saved.items():
            if v is not None:
                setattr(model_runner, a, v)


def _around_model_runner_forward(original, self, *args, **kwargs):
    prof = get_global_expert_compute_profiler()
    if prof is None or getattr(self, "is_draft_worker", False):
        return original(self, *args, **kwargs)
    profiled = prof.begin_step()
    try:
        if profiled:
            with eager_forward(self):
                return original(self, *args, **kwargs)
        return original(self, *args, **kwargs)
    finally:
        prof.end_step()
        n = prof.get_statistics_summary()["profiled_steps"] if profiled else 0
        if n in (1, 10) or (n and n % 100 == 0):
            logger.info("expert compute profiling after %d profiled passes: %s", n,
                        prof.format_summary())


def local_slot_counts(layer: Any, dispatch_output: Any) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """Tokens per local routed expert slot of ``layer`` and the logical expert of each slot,
    both on the device, without a host sync; None when the dispatch format is not understood.
    """
    from sglang.srt.eplb.expert_location import get_global_expert_location_metadata

    md = get_global_expert_location_metadata()
    if md is None:
        return None
    G = md.num_local_physical_experts
    rank = int(getattr(layer, "moe_ep_rank", 0))
    phys = torch.arange(rank * G, (rank + 1) * G, device=md.physical_to_logical_map.device)
    logical = md.physical_to_logical_map[layer.layer_id].index_select(0, phys)
    masked_m = getattr(dispatch_output, "masked_m", None)  # DeepEP low latency: tokens per local expert
    if isinstance(masked_m, torch.Tensor) and masked_m.dim() == 1 and masked_m.numel() >= G:
        return masked_m[:G].to(torch.int32), logical.to(masked_m.device)
    recv = getattr(dispatch_output, "num_recv_tokens_per_expert", None)  # DeepEP normal (host list)
    if isinstance(recv, (list, tuple)) and len(recv) >= G:
        return torch.tensor(list(recv[:G]), dtype=torch.int32), logical.cpu()
    topk_output = getattr(dispatch_output, "topk_output", None)
    if topk_output is not None:
        topk_ids = getattr(topk_output, "topk_ids", None)
        disp = getattr(layer, "dispatcher", None)
        ids_are_local = getattr(layer, "moe_ep_size", 1) == 1 or (
            getattr(disp, "local_expert_mapping", None) is not None
            and not getattr(disp, "skip_local_expert_mapping", False)
            and not getattr(disp, "use_aiter_moe_runner", False)
        )
    else:  # DeepEP-style outputs carry ids local to the rank
        topk_ids = getattr(dispatch_output, "topk_ids", None)
        ids_are_local = True
    if not isinstance(topk_ids, torch.Tensor):
        return None
    ids = topk_ids.flatten().long()
    if not ids_are_local:
        ids = ids - rank * G
    valid = (ids >= 0) & (ids < G)
    counts = torch.zeros(G + 1, dtype=torch.int32, device=ids.device)
    slot = torch.where(valid, ids, torch.full_like(ids, G))  # invalid ids go to a spill bin
    counts.scatter_add_(0, slot, torch.ones_like(ids, dtype=torch.int32))
    return counts[:G], logical.to(ids.device)


_in_moe_core = False  # DeepEPMoE.run_moe_core may call FusedMoE.run_moe_core: time once


def _around_run_moe_core(original, self, dispatch_output, *args, **kwargs):
    global _in_moe_core
    prof = get_global_expert_compute_profiler()
    if prof is None or not prof.is_profiling_step or _in_moe_core or config.capturing_cuda_graph():
        return original(self, dispatch_output, *args, **kwargs)
    layer_id = getattr(self, "layer_id", None)
    rec = None
    if isinstance(layer_id, int) and 0 <= layer_id < prof.num_layers:
        rec = local_slot_counts(self, dispatch_output)
    if rec is None:
        return original(self, dispatch_output, *args, **kwargs)
    w = getattr(self, "w13_weight", None)
    if isinstance(w, torch.Tensor):
        prof.set_layer_shape_key(layer_id, (tuple(w.shape), str(w.dtype)))
    counts, logical = rec
    _in_moe_core = True
    try:
        with prof.kernel(layer_id, counts, expert_ids=logical):
            return original(self, dispatch_output, *args, **kwargs)
    finally:
        _in_moe_core = False


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
        _after_init_expert_location, HookType.AFTER, "profiling"),
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
    need = {"compute_aware", "profiling", "eplb"} if force else _needs(_section())
    targets = [t for t, (_, _, when) in _RUNTIME.items() if when in need]
    for t in targets:
        if t not in _runtime_registered:
            hook, kind, _ = _RUNTIME[t]
            HookRegistry.register(t, hook, kind)
            _runtime_registered.add(t)
    return targets


def self_check() -> list:
    need = _needs(_section())
    if not need:
        return []
    import importlib

    missing = []
    for t in (t for t, (_, _, when) in _RUNTIME.items() if when in need):
        mod, _, attr = t.rpartition(".")
        owner = mod
        try:
            obj = importlib.import_module(mod)
        except ImportError:
            owner, _, cls = mod.rpartition(".")
            try:
                obj = getattr(importlib.import_module(owner), cls)
            except (ImportError, AttributeError):
                missing.append(t)
                continue
        if not hasattr(obj, attr):
            missing.append(t)
    if "profiling" in need:
        for t in ("sglang.srt.layers.moe.fused_moe_triton.layer.FusedMoE.run_moe_core",):
            mod, cls, attr = t.rsplit(".", 2)
            try:
                if not hasattr(getattr(importlib.import_module(mod), cls), attr):
                    missing.append(t)
            except (ImportError, AttributeError):
                missing.append(t)
    return [f"compute-aware EPLB: {m}" for m in missing]
