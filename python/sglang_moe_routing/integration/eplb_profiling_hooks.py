"""Compute profiling of the MoE expert kernels for compute-cost-aware EPLB
(``--enable-expert-compute-profiling``).

* ``ModelRunner.maybe_init_expert_location_metadata`` (AFTER, registered by
  ``eplb_hooks.runtime_hooks`` when profiling is on): creates the process's
  :class:`ExpertComputeProfiler` and only then registers the two forward-path hooks below,
  so with profiling off the forward path carries no extra wrapper.
* A ``ModelRunner.forward`` wrapper (through ``forward_pass``, shared with EC load
  statistics) counts passes and runs the profiled ones eagerly, outside CUDA graphs.
* ``FusedMoE.run_moe_core`` and ``DeepEPMoE.run_moe_core`` (AROUND) time the expert kernels
  of a profiled pass with CUDA events and the tokens of each local expert slot.

The fitted costs are read by the algorithm hooks in ``eplb_hooks.py``.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Optional, Tuple

import torch

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from sglang_moe_routing.eplb.profiler import (
    ExpertComputeProfiler,
    get_global_expert_compute_profiler,
    set_global_expert_compute_profiler,
)
from sglang_moe_routing.integration import config
from sglang_moe_routing.integration.eplb_flags import section

logger = logging.getLogger("sglang_moe_routing.eplb")

_profiling_hooks_installed = False


def after_init_expert_location(result, self, *args, **kwargs):
    """AFTER ``ModelRunner.maybe_init_expert_location_metadata``: start the profiler."""
    cfg = section()
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
