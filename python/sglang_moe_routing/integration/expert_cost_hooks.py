"""SGLang glue of the heterogeneous expert cost mechanism (``eplb/expert_cost.py``): a
benchmark knob, off by default, for measuring compute-aware EPLB on a real server.

Flags (section ``"expert_cost"``):

* ``--expert-cost-slow-factor F`` (int, default 1 = off): a seeded ``--expert-cost-slow-fraction``
  of each MoE layer's logical experts (seed ``--expert-cost-seed``) form a slow cost class
  that runs as its own fused-MoE launch, ``F`` times (``F - 1`` repeats discarded): a slow
  expert costs ``F`` times a fast one per token, wherever EPLB places it. Hook: AROUND
  ``UnquantizedFusedMoEMethod.apply`` (inside the compute profiler's ``run_moe_core``
  bracket); needs CUDA, bf16/fp16 weights and the Triton fused-MoE runner
  (``--moe-runner-backend triton``); any other case stops at the first MoE call with one line.
* ``--expert-moe-time-window N`` (default 0 = off; needs ``--enable-expert-compute-profiling``):
  every rank logs its measured MoE time per layer summed over each window of ``N`` profiled
  passes: ``expert-cost moe-time window=W passes=A-B rank=R layers=... ms=...``. The
  benchmark computes GPU balancedness from these lines.

With profiling on and either flag set, the process's compute profiler is replaced right after
the EPLB integration creates it (AFTER hook on the same ``maybe_init_expert_location_metadata``,
registered later so it runs later) by a :class:`ClassSplitProfiler` with the same settings
and 2 expert classes: each class launch is one profiler sample, so compute-aware EPLB fits
one cost model per class and sees the slow experts' cost.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from sglang_moe_routing.eplb.expert_cost import (
    ClassSplitProfiler,
    MoeTimeWindows,
    class_expert_ids,
    describe_mask,
    format_moe_time_line,
    run_cost_classes,
    slot_counts,
    slow_expert_mask,
)
from sglang_moe_routing.eplb.profiler import (
    get_global_expert_compute_profiler,
    set_global_expert_compute_profiler,
)
from sglang_moe_routing.integration import config

logger = logging.getLogger("sglang_moe_routing.expert_cost")

SECTION = "expert_cost"
APPLY = "sglang.srt.layers.quantization.unquant.UnquantizedFusedMoEMethod.apply"
INIT_LOCATION = "sglang.srt.model_executor.model_runner.ModelRunner.maybe_init_expert_location_metadata"


@dataclass(frozen=True)
class ExpertCostConfig:
    slow_factor: int = 1
    slow_fraction: float = 0.25
    seed: int = 0
    moe_time_window: int = 0
    profiling: bool = False

    @property
    def classes_on(self) -> bool:
        return self.slow_factor > 1

    def describe(self) -> str:
        parts = []
        if self.classes_on:
            parts.append(f"expert cost classes: {self.slow_fraction:g} of each layer's experts x"
                         f"{self.slow_factor} per token (seed {self.seed}; benchmark knob)")
        if self.moe_time_window:
            parts.append(f"MoE time logged every {self.moe_time_window} profiled passes")
        return "; ".join(parts) or "expert cost classes off"


def add_cli_args(group: Any) -> None:
    group.add_argument("--expert-cost-slow-factor", type=int, default=1,
                       help="Benchmark knob: a slow class of experts costs this many times a fast "
                       "one per token (its fused-MoE launch repeated); 1 = off.")
    group.add_argument("--expert-cost-slow-fraction", type=float, default=0.25,
                       help="Share of each MoE layer's logical experts in the slow class, in [0, 1].")
    group.add_argument("--expert-cost-seed", type=int, default=0,
                       help="Seed of the slow experts' choice (same on every rank).")
    group.add_argument("--expert-moe-time-window", type=int, default=0,
                       help="Log this GPU's measured MoE time per layer every N profiled passes "
                       "(needs --enable-expert-compute-profiling); 0 = off.")


def _get(args: argparse.Namespace, name: str, default: Any) -> Any:
    v = getattr(args, name, default)
    return default if v is None else v


def parse_section(args: argparse.Namespace) -> Dict[str, ExpertCostConfig]:
    errors: list = []
    factor = config.collect(errors, 1, lambda: config.parse_integer(
        "--expert-cost-slow-factor", _get(args, "expert_cost_slow_factor", 1), 1))
    fraction = config.collect(errors, 0.25, lambda: config.parse_number(
        "--expert-cost-slow-fraction", _get(args, "expert_cost_slow_fraction", 0.25), 0.0, 1.0))
    seed = config.collect(errors, 0, lambda: config.parse_integer(
        "--expert-cost-seed", _get(args, "expert_cost_seed", 0), 0))
    window = config.collect(errors, 0, lambda: config.parse_integer(
        "--expert-moe-time-window", _get(args, "expert_moe_time_window", 0), 0))
    profiling = bool(_get(args, "enable_expert_compute_profiling", False))
    if window and not profiling:
        errors.append("--expert-moe-time-window needs --enable-expert-compute-profiling "
                      "(it logs the profiled passes' MoE time)")
    if errors:
        raise ValueError("; ".join(errors))
    return {SECTION: ExpertCostConfig(factor, fraction, seed, window, profiling)}


def _section() -> Optional[ExpertCostConfig]:
    cfg = config.get_section(SECTION)
    return cfg if isinstance(cfg, ExpertCostConfig) else None


# --------------------------------------------------------------------------- profiler swap


def _rank() -> int:
    try:
        from sglang.srt.runtime_context import get_parallel

        return int(get_parallel().tp_rank)
    except Exception:  # noqa: BLE001
        return 0


def _after_init_location(result, model_runner, *args, **kwargs):
    cfg = _section()
    prof = get_global_expert_compute_profiler()
    if cfg is None or prof is None or isinstance(prof, ClassSplitProfiler):
        return None
    rank = _rank()

    def emit(w: int, first: int, last: int, per_layer: Dict[int, float]) -> None:
        logger.info("%s", format_moe_time_line(w, first, last, rank, per_layer))

    settings = {**prof.settings(), "num_classes": 2 if cfg.classes_on else 1}
    new = ClassSplitProfiler(
        prof.num_layers, prof.num_experts, **settings,
        moe_time=MoeTimeWindows(cfg.moe_time_window, emit) if cfg.moe_time_window else None)
    if cfg.classes_on:
        # every rank knows every expert's class (seeded): the merged statistics of a rebalance
        # copy the local classes, so they must not depend on which experts a rank holds
        mask = slow_expert_mask(new.num_layers, new.num_experts, cfg.slow_fraction, cfg.seed)
        for layer in range(new.num_layers):
            new.set_expert_classes(layer, mask[layer].long())
    set_global_expert_compute_profiler(new)
    logger.info("expert-cost: compute profiler with %d expert class(es)%s", new.num_classes,
                f", MoE time every {cfg.moe_time_window} profiled passes" if cfg.moe_time_window else "")
    return None


# --------------------------------------------------------------------------- cost classes

_slow_logical: Dict[Any, torch.Tensor] = {}  # (device, layer, E) -> [E] bool
_checked: set = set()


def _metadata():
    from sglang.srt.eplb.expert_location import get_global_expert_location_metadata

    return get_global_expert_location_metadata()


def _local_slots(layer: Any, device: torch.device, cfg: ExpertCostConfig):
    """(slow flag [S] bool, logical expert [G], routed slots G) of this GPU's slots of
    ``layer``, read from the current placement (device ops: CUDA-graph safe, and a rebalance,
    which updates the placement tensors in place, moves the cost with the expert)."""
    md = _metadata()
    S = int(layer.w13_weight.shape[0])
    lid = int(layer.layer_id)
    if md is None:  # no placement metadata: slot g is expert g
        E, G = S, S
        logical = torch.arange(S, device=device)
    else:
        E, G = md.num_logical_experts, md.num_local_physical_experts
        rank = int(getattr(layer, "moe_ep_rank", 0))
        logical = md.physical_to_logical_map[lid, rank * G:(rank + 1) * G].to(device).long()
    key = (str(device), lid, E)
    if key not in _slow_logical:
        mask = slow_expert_mask(lid + 1, E, cfg.slow_fraction, cfg.seed)
        _slow_logical[key] = mask[lid].to(device)
        if _rank() == 0:
            logger.info("expert-cost: slow experts (x%d per token): %s", cfg.slow_factor,
                        describe_mask(mask, [lid]))
    slow = _slow_logical[key].index_select(0, logical)
    if S > G:  # e.g. a fused shared expert: fast
        slow = torch.cat([slow, torch.zeros(S - G, dtype=torch.bool, device=device)])
    return slow, logical, G


def _check(method: Any, layer: Any, dispatch_output: Any) -> None:
    key = id(layer)
    if key in _checked:
        return
    backend = getattr(getattr(method, "runner", None), "runner_backend", None)
    problems = []
    if backend is None or not backend.is_triton():
        problems.append(f"the Triton fused-MoE runner (--moe-runner-backend triton), got {backend}")
    topk = getattr(dispatch_output, "topk_output", None)
    ids = getattr(topk, "topk_ids", None)
    if not isinstance(ids, torch.Tensor) or not ids.is_cuda:
        problems.append("CUDA top-k ids in a standard dispatch output")
    disp = getattr(layer, "dispatcher", None)
    if getattr(layer, "moe_ep_size", 1) > 1 and (getattr(disp, "local_expert_mapping", None) is None
                                                   or getattr(disp, "skip_local_expert_mapping", False)):
        problems.append("top-k ids mapped to local experts (standard dispatcher)")
    if problems:
        raise RuntimeError("sglang-moe-routing: --expert-cost-slow-factor needs " + "; ".join(problems))
    _checked.add(key)


def _around_apply(original, method, layer, dispatch_output, *args, **kwargs):
    cfg = _section()
    if cfg is None or not cfg.classes_on:
        return original(method, layer, dispatch_output, *args, **kwargs)
    _check(method, layer, dispatch_output)
    from sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe import fused_experts
    from sglang.srt.layers.moe.token_dispatcher.standard import StandardCombineInput

    x = dispatch_output.hidden_states
    topk = dispatch_output.topk_output
    # out of place (the real call writes into x), and -1 ids filtered also with one GPU
    rc = dataclasses.replace(layer.moe_runner_config, inplace=False, num_experts=None)
    b1, b2 = getattr(layer, "w13_weight_bias", None), getattr(layer, "w2_weight_bias", None)

    def run_experts(ids: torch.Tensor) -> torch.Tensor:
        return fused_experts(x, layer.w13_weight, layer.w2_weight, topk._replace(topk_ids=ids), rc,
                             b1=b1, b2=b2)

    slow, logical, G = _local_slots(layer, x.device, cfg)
    timer = None
    prof = get_global_expert_compute_profiler()
    if isinstance(prof, ClassSplitProfiler) and prof.in_layer_bracket and not config.capturing_cuda_graph():
        slot_class = slow[:G].long()

        def timer(cls: int, ids: torch.Tensor):
            return prof.class_kernel(int(layer.layer_id), cls, slot_counts(ids, G),
                                     class_expert_ids(logical, slot_class, cls))

    out = run_cost_classes(run_experts, topk.topk_ids, slow, cfg.slow_factor, timer)
    return StandardCombineInput(hidden_states=out)


# --------------------------------------------------------------------------- registration

_registered: set = set()


def register_hooks() -> None:
    """Nothing at load time: :func:`runtime_hooks` hooks only what the flags turn on."""


def _targets(cfg: Optional[ExpertCostConfig]) -> list:
    if cfg is None:
        return []
    t = []
    if cfg.classes_on:
        t.append(APPLY)
    if cfg.profiling and (cfg.classes_on or cfg.moe_time_window):
        t.append(INIT_LOCATION)
    return t


_HOOKS = {APPLY: (_around_apply, HookType.AROUND), INIT_LOCATION: (_after_init_location, HookType.AFTER)}


def runtime_hooks(force: bool = False) -> list:
    targets = list(_HOOKS) if force else _targets(_section())
    for t in targets:
        if t not in _registered:
            hook, kind = _HOOKS[t]
            HookRegistry.register(t, hook, kind)
            _registered.add(t)
    return targets


def self_check() -> list:
    from .upstream import missing

    return [f"expert cost classes: {m}" for m in missing(_targets(_section()))]
