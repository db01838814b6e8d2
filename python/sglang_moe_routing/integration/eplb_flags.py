"""Flags of compute-cost-aware EPLB and their validated section ``"eplb"``, shared by the
algorithm hooks (``eplb_hooks.py``) and the profiling hooks (``eplb_profiling_hooks.py``).

``add_cli_args`` adds the flags to SGLang's parser (and our ``--eplb-algorithm`` values to
its choices); ``parse_section`` validates them into :class:`EplbComputeConfig`, which reaches
the scheduler processes with the ``ServerArgs`` record (see ``integration/config.py``) and is
read back with :func:`section`.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from enum import Enum
from typing import Any, Dict, Optional, Tuple

from sglang_moe_routing.eplb.cost_model import DEFAULT_TILE_SIZES
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


def section() -> Optional[EplbComputeConfig]:
    """The ``"eplb"`` section of this process (None before the flags were parsed)."""
    cfg = config.get_section(SECTION)
    return cfg if isinstance(cfg, EplbComputeConfig) else None
