"""Compute-cost-aware expert-parallel load balancing (EPLB).

* :mod:`.compute_aware`: the placement (DeepSeek's EPLB on a token/compute-cost blend,
  vectorised over layers; ``alpha = 0`` is upstream ``deepseek`` bit for bit).
* :mod:`.reference`: the same algorithm as plain Python loops (specification, test oracle).
* :mod:`.profiler`: :class:`ExpertComputeProfiler`, per-expert compute costs from CUDA
  events and a fitted grouped-GEMM cost model.
* :mod:`.cost_model`: that cost model and its least-squares fit (:class:`KernelCostFit`);
  :mod:`.events`: the profiler's timing events.

Imports only torch and numpy; the SGLang wiring lives in
``sglang_moe_routing.integration`` (``eplb_flags``, ``eplb_hooks``, ``eplb_profiling_hooks``).
"""

from sglang_moe_routing.eplb.compute_aware import (
    balancedness,
    blend_weights,
    compute_cost_aware_rebalance_experts,
    gpu_loads,
    replica_token_counts,
)
from sglang_moe_routing.eplb.cost_model import DEFAULT_TILE_SIZES, KernelCostFit
from sglang_moe_routing.eplb.profiler import (
    ExpertComputeProfiler,
    get_global_expert_compute_profiler,
    set_global_expert_compute_profiler,
)
from sglang_moe_routing.eplb.reference import compute_cost_aware_rebalance_reference

__all__ = [
    "DEFAULT_TILE_SIZES",
    "ExpertComputeProfiler",
    "KernelCostFit",
    "balancedness",
    "blend_weights",
    "compute_cost_aware_rebalance_experts",
    "compute_cost_aware_rebalance_reference",
    "get_global_expert_compute_profiler",
    "gpu_loads",
    "replica_token_counts",
    "set_global_expert_compute_profiler",
]
