"""Triton kernels of the Omni (Cartesian-product) router, one module per job:

* ``config.py``: the backend's limits, launch configurations of both kernels (heuristics,
  autotune candidates, the opt-in autotuner) and shared launch helpers.
* ``keys.py``: packed order-preserving integer keys and the top-k, candidate-grid and
  softmax-store primitives both forward kernels use.
* ``forward.py``: the forward kernel (per-axis top-k variants dense, chunk, iter) and the
  forward entry point :func:`omni_router_fwd_triton`.
* ``forward_lane.py``: the MODE_LANE forward kernel (16 lanes per row, keys in registers).
* ``backward.py``: the deterministic backward kernel and :func:`omni_router_bwd_triton`.

``K`` is ``top_k`` rounded up to a power of two; entries past ``top_k`` are masked.
Limits of this backend: fp16/bf16/fp32, ``n <= 32768``, ``top_k <= 64``
(``omni_router(backend="auto")`` falls back to the torch path outside them).

Besides the public names, this namespace carries the private helpers that tests and
``benchmark/bench_omni.py`` use to launch, tune and time single configurations.
"""

from .backward import _launch_bwd, omni_router_bwd_triton
from .config import (  # noqa: F401 (private names: see the module docstring)
    _FWD_TUNED,
    HAS_TRITON,
    MAX_N,
    MAX_TOP_K,
    MODE_CHUNK,
    MODE_DENSE,
    MODE_ITER,
    MODE_LANE,
    TUNE_LOG,
    BwdConfig,
    FwdConfig,
    _default_chunk,
    _dims,
    _lane_fits,
    _t_bucket,
    autotune_enabled,
    bwd_config,
    bwd_config_candidates,
    fwd_config,
    fwd_config_candidates,
    fwd_config_lane,
    grid_pairs,
    triton_supported,
)
from .forward import _launch_fwd, omni_router_fwd_triton
from .forward_lane import _launch_fwd_lane  # noqa: F401

if HAS_TRITON:
    from .keys import _HAS_TL_TOPK  # noqa: F401

__all__ = [
    "HAS_TRITON",
    "MAX_N",
    "MAX_TOP_K",
    "FwdConfig",
    "BwdConfig",
    "triton_supported",
    "fwd_config",
    "fwd_config_lane",
    "MODE_LANE",
    "bwd_config",
    "fwd_config_candidates",
    "bwd_config_candidates",
    "omni_router_fwd_triton",
    "omni_router_bwd_triton",
]
