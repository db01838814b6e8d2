"""The grouped-GEMM kernel cost model of the expert compute profiler, and its fit.

A kernel launch that served token counts ``n_g`` on its expert slots takes::

    time(kernel) = c + sum over slots with n > 0 of (a + b * ceil(n / tile))

(``c``: launch and fixed work; ``a``: per active expert, e.g. weight loads; ``b``: per tile
of ``tile`` tokens, the padding a tiled GEMM pays). ``a`` is only identifiable when the
number of active experts per launch varies (decode); with every slot always active
(prefill) it is folded into ``c``, where it is the same for every GPU. ``tile`` is chosen among
``tile_sizes`` by least squares; ``tile = 1`` is the linear model ``a + b * n``. A kernel
that serves a single expert is the same model with one slot, so per-expert event pairs
(unfused backends) go through the same path: then ``a`` is the per-invocation time and
``c`` is folded into it. Experts of different precision or shape run in different kernels
and are told apart by ``expert_class`` (one fit per class and layer shape).

The fit works on normal equations (``X^T X``, ``X^T y``, ``y^T y`` per candidate tile), which
are sums over samples: :class:`~.profiler.ExpertComputeProfiler` accumulates them, and ranks
merge them with one all-reduce. Imports only torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Hashable, Optional, Sequence, Tuple

import torch

DEFAULT_TILE_SIZES: Tuple[int, ...] = (1, 16, 32, 64, 128)


@dataclass(frozen=True)
class KernelCostFit:
    """Fitted ``time = c + sum_active (a + b * ceil(n / tile))`` (milliseconds)."""

    a_ms: float
    b_ms: float
    c_ms: float
    tile: int
    samples: int
    rmse_ms: float
    source: str  # "layer-shape" | "class-pooled" | "all-pooled" | "default"

    def expert_time(self, n: torch.Tensor) -> torch.Tensor:
        n = n.double()
        tiles = n if self.tile == 1 else torch.ceil(n / self.tile)
        return self.a_ms * (n > 0) + self.b_ms * tiles


DEFAULT_FIT = KernelCostFit(0.0, 1.0, 0.0, 1, 0, float("nan"), "default")


def design_matrix(counts: torch.Tensor, tile_sizes: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Features of ``N`` kernel samples from their token counts per slot ``counts [N, G]``
    (float64): ``tiles [N, G, T]`` (``ceil(n / tile)`` per candidate tile; ``n`` for tile 1)
    and the rows ``X [N, T, 3]`` = (1, active slots, tiles summed over slots) of
    ``time = c + a * active + b * tiles``."""
    N = counts.shape[0]
    T = len(tile_sizes)
    tiles = torch.stack(
        [counts if t == 1 else torch.ceil(counts / t) for t in tile_sizes], -1
    )  # [N, G, T]
    n_active = (counts > 0).sum(1, dtype=torch.float64)
    X = torch.stack(
        [torch.ones(N, T, dtype=torch.float64), n_active[:, None].expand(N, T), tiles.sum(1)], -1
    )  # [N, T, 3]
    return tiles, X


def fit_normal_equations(
    xtx: torch.Tensor,
    xty: torch.Tensor,
    yty: torch.Tensor,
    n: torch.Tensor,
    source: str,
    tile_sizes: Sequence[int],
    min_samples: int,
) -> Optional[KernelCostFit]:
    """Non-negative (a, b) least squares from the normal equations of one pool of samples
    (``xtx [T, 3, 3]``, ``xty [T, 3]`` per candidate tile, ``yty``, ``n`` samples); ``None``
    below ``min_samples``.

    The model (which of ``a``, ``b`` and which tile) is chosen by the Bayesian
    information criterion, a non-linear tile counting as one more parameter: noise alone
    never turns a linear, per-token cost into a padded or per-expert one (which would
    perturb placements that should equal token-based ones).
    """
    n = float(n)
    if n < min_samples:
        return None
    yty = float(yty)
    sse_floor = 1e-13 * yty + 1e-300  # below this the SSE is cancellation noise
    best: Optional[Tuple[float, float, float, float, float, int]] = None
    for ti, tile in enumerate(tile_sizes):
        A, v = xtx[ti], xty[ti]
        mean_act = float(A[0, 1]) / n
        var_act = float(A[1, 1]) / n - mean_act * mean_act
        const_active = var_act <= 1e-9 * max(mean_act * mean_act, 1.0)
        subsets = [(0, 2), (0,)] if const_active else [(0, 1, 2), (0, 2), (0, 1), (0,)]
        for sub in subsets:
            idx = torch.tensor(sub)
            As = A[idx][:, idx]
            vs = v[idx]
            # Solve on unit-diagonal scaled equations; the tiny ridge only matters for
            # exactly collinear features (then any split of a and b fits equally well).
            d = torch.sqrt(torch.diagonal(As)).clamp_min(1e-300)
            An = As / (d[:, None] * d[None, :]) + 1e-12 * torch.eye(len(sub), dtype=torch.float64)
            try:
                theta = torch.linalg.solve(An, vs / d) / d
            except RuntimeError:
                continue
            coef = {0: 0.0, 1: 0.0, 2: 0.0}
            for k, j in enumerate(sub):
                coef[j] = float(theta[k])
            if coef[1] < 0 or coef[2] < 0:
                continue
            sse = yty - 2.0 * float(theta @ vs) + float(theta @ As @ theta)
            c0, a, b = coef[0], coef[1], coef[2]
            if const_active and abs(mean_act - 1.0) < 1e-6:
                # One expert per launch: the fixed time is the expert's per-invocation time.
                a, c0 = max(c0, 0.0), 0.0
            # Otherwise with a constant number of active slots per launch, ``a`` cannot be
            # told from ``c``; it is then the same on every GPU (same slot count), so it
            # stays in ``c`` and does not steer the placement.
            k = len(sub) + (1 if (tile != 1 and 2 in sub) else 0)
            bic = n * math.log(max(sse, sse_floor) / n) + k * math.log(n)
            if best is None or bic < best[0] - 1e-9:
                best = (bic, sse, a, b, c0, tile)
    if best is None:
        return None
    _, sse, a, b, c0, tile = best
    return KernelCostFit(a, b, c0, tile, int(n), math.sqrt(max(sse, 0.0) / n), source)


def fit_pooled(
    xtx: torch.Tensor,
    xty: torch.Tensor,
    yty: torch.Tensor,
    nsamp: torch.Tensor,
    pool_keys: Sequence[Hashable],
    tile_sizes: Sequence[int],
    min_samples: int,
) -> Dict[Tuple[int, int], KernelCostFit]:
    """Cost model per (layer, class) from per-(layer, class) normal equations
    (``xtx [L, C, T, 3, 3]``, ``xty [L, C, T, 3]``, ``yty [L, C]``, ``nsamp [L, C]``), with
    fallbacks for layers without enough data: the pool of layers with the same
    ``pool_keys`` entry (layer shape), then all layers of the class, then all samples, then
    the unit model (cost = tokens)."""

    def _fit(xtx_p, xty_p, yty_p, n_p, source):
        return fit_normal_equations(xtx_p, xty_p, yty_p, n_p, source, tile_sizes, min_samples)

    keys = {}
    pool_of_layer = torch.tensor([keys.setdefault(k, len(keys)) for k in pool_keys])
    P, C = len(keys), nsamp.shape[1]
    T = len(tile_sizes)
    zeros = lambda *s: torch.zeros(*s, dtype=torch.float64)
    pxtx, pxty, pyty, pn = zeros(P, C, T, 3, 3), zeros(P, C, T, 3), zeros(P, C), zeros(P, C)
    pxtx.index_add_(0, pool_of_layer, xtx)
    pxty.index_add_(0, pool_of_layer, xty)
    pyty.index_add_(0, pool_of_layer, yty)
    pn.index_add_(0, pool_of_layer, nsamp)

    class_fit = []
    for c in range(C):
        class_fit.append(
            _fit(pxtx[:, c].sum(0), pxty[:, c].sum(0), pyty[:, c].sum(), pn[:, c].sum(), "class-pooled")
        )
    all_fit = _fit(pxtx.sum((0, 1)), pxty.sum((0, 1)), pyty.sum(), pn.sum(), "all-pooled")
    pool_fit = {}
    out: Dict[Tuple[int, int], KernelCostFit] = {}
    for l in range(nsamp.shape[0]):
        p = int(pool_of_layer[l])
        for c in range(C):
            if (p, c) not in pool_fit:
                pool_fit[(p, c)] = _fit(pxtx[p, c], pxty[p, c], pyty[p, c], pn[p, c], "layer-shape")
            out[(l, c)] = pool_fit[(p, c)] or class_fit[c] or all_fit or DEFAULT_FIT
    return out
