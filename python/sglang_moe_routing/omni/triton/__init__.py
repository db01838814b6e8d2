"""Triton kernels of the Omni (Cartesian-product) router (the next commit splits them by job)."""

from .forward import *  # noqa: F401,F403
from .forward import (  # noqa: F401 (used by tests and benchmark/bench_omni.py)
    _FWD_TUNED,
    TUNE_LOG,
    _default_chunk,
    _dims,
    _lane_fits,
    _launch_bwd,
    _launch_fwd,
    _launch_fwd_lane,
    _t_bucket,
    autotune_enabled,
    grid_pairs,
    MODE_CHUNK,
    MODE_DENSE,
    MODE_ITER,
)

try:
    from .forward import _HAS_TL_TOPK  # noqa: F401
except ImportError:  # without triton
    pass
