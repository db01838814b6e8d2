"""Per-expert compute-cost profiler for compute-cost-aware EPLB.

What is measured
----------------
A *kernel sample* is one launch of expert computation: the layer, the token count of every
expert slot the launch served, and its GPU time. SGLang's fused MoE runs all local experts
of a layer in one launch, so a sample's time is a sum over experts and per-expert times
cannot be read off an event pair. The profiler keeps the samples' normal equations and fits
the grouped-GEMM cost model of :mod:`.cost_model` per layer shape and expert class::

    time(kernel) = c + sum over slots with n > 0 of (a + b * ceil(n / tile))

The expert's cost over a window of per-step token counts ``n_s`` is then
``sum_s (a [n_s > 0] + b * ceil(n_s / tile))``: :meth:`get_adjusted_expert_load`.

Timing without stalls
---------------------
:meth:`kernel` records a CUDA event pair around the launch and queues the token counts
for an asynchronous device-to-host copy followed by a third event; :meth:`poll` (called
at the end of each forward pass) reads only samples whose copy event reports done through
``query()``. Nothing synchronises the device. Profiling runs on ``1`` forward pass in
``interval`` after ``warmup_steps`` passes. Samples pending for too long (more than
``max_pending``) are dropped and counted, never waited for. Samples whose region may include
host time are counted as ``host_bound`` (what an event pair measures: :mod:`.events`).

Statistics are additive tensors (normal equations and per-expert sums), so ranks merge them
with one all-reduce (:meth:`all_reduced`) and every rank then derives identical costs.
"""

from __future__ import annotations

from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Hashable, Iterator, List, Optional, Sequence, Tuple

import torch

from sglang_moe_routing.eplb.cost_model import (
    DEFAULT_TILE_SIZES,
    KernelCostFit,
    design_matrix,
    fit_pooled,
)
from sglang_moe_routing.eplb.events import default_event_factory, device_reached, to_host_async

__all__ = [
    "ExpertComputeProfiler",
    "get_global_expert_compute_profiler",
    "set_global_expert_compute_profiler",
]

@dataclass
class _Pending:
    layer: int
    expert_class: int
    start: Any
    end: Any
    ready: Any
    counts: torch.Tensor
    expert_ids: Optional[torch.Tensor]
    host_bound: bool = False


def _check_int(name: str, v: Any, lo: int, hi: Optional[int] = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {v!r}")
    if v < lo or (hi is not None and v >= hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi})"
        raise ValueError(f"{name} must be {rng}, got {v}")
    return v


class ExpertComputeProfiler:
    """Collects kernel timings and token counts; fits per-expert compute costs.

    Parameters:
        num_layers: layers of the expert-location metadata (layer ids index this)
        num_experts: logical experts per layer
        warmup_steps: forward passes ignored at the start (JIT, autotuning, caches)
        interval: profile one forward pass in ``interval`` (after the warm-up)
        tile_sizes: candidate GEMM tile sizes (tokens), 1 = linear model
        num_classes: expert classes (e.g. precisions); each gets its own fit
        min_samples: kernel samples a fit needs before it is used
        max_pending: samples awaiting their events before the oldest are dropped
        event_factory: ``f(enable_timing) -> event`` (default: CUDA events when CUDA is
            available, else :class:`.events.HostEvent`)
    """

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        *,
        warmup_steps: int = 10,
        interval: int = 1,
        tile_sizes: Sequence[int] = DEFAULT_TILE_SIZES,
        num_classes: int = 1,
        min_samples: int = 8,
        max_pending: int = 65536,
        event_factory: Optional[Callable[[bool], Any]] = None,
    ):
        self.num_layers = _check_int("num_layers", num_layers, 1)
        self.num_experts = _check_int("num_experts", num_experts, 1)
        self.warmup_steps = _check_int("warmup_steps", warmup_steps, 0)
        self.interval = _check_int("interval", interval, 1)
        self.num_classes = _check_int("num_classes", num_classes, 1)
        self.min_samples = _check_int("min_samples", min_samples, 1)
        self.max_pending = _check_int("max_pending", max_pending, 1)
        tiles = tuple(tile_sizes)
        if not tiles:
            raise ValueError("tile_sizes must not be empty")
        for t in tiles:
            _check_int("tile size", t, 1)
        if len(set(tiles)) != len(tiles):
            raise ValueError(f"tile_sizes has duplicates: {tiles}")
        self.tile_sizes = tiles
        self._event_factory = event_factory or default_event_factory

        L, E, C, T = self.num_layers, self.num_experts, self.num_classes, len(tiles)
        f64 = torch.float64
        self._xtx = torch.zeros(L, C, T, 3, 3, dtype=f64)
        self._xty = torch.zeros(L, C, T, 3, dtype=f64)
        self._yty = torch.zeros(L, C, dtype=f64)
        self._nsamp = torch.zeros(L, C, dtype=f64)
        self._tokens = torch.zeros(L, E, dtype=f64)
        self._invocations = torch.zeros(L, E, dtype=f64)
        self._tile_sum = torch.zeros(L, E, T, dtype=f64)
        self._expert_class = torch.zeros(L, E, dtype=torch.int64)
        self._pool_keys: List[Hashable] = [("layer", l) for l in range(L)]

        self._pending: Deque[_Pending] = deque()
        self._dropped = 0
        self._host_bound = 0
        self._step = 0
        self._profiled_steps = 0
        self._active = False
        self._fit_cache: Optional[Dict[Tuple[int, int], KernelCostFit]] = None

    # ------------------------------------------------------------------ configuration

    def set_layer_shape_key(self, layer: int, key: Hashable) -> None:
        """Layers with equal keys (same expert shapes and dtype) share one fit."""
        _check_int("layer", layer, 0, self.num_layers)
        self._pool_keys[layer] = ("shape", key)
        self._fit_cache = None

    def set_expert_classes(self, layer: int, classes: Sequence[int]) -> None:
        """Class of every logical expert of ``layer`` (e.g. 0 = bf16, 1 = fp8)."""
        _check_int("layer", layer, 0, self.num_layers)
        c = torch.as_tensor(classes, dtype=torch.int64).flatten()
        if c.numel() != self.num_experts:
            raise ValueError(f"expected {self.num_experts} classes, got {c.numel()}")
        if (c < 0).any() or (c >= self.num_classes).any():
            raise ValueError(f"expert classes must be in [0, {self.num_classes})")
        self._expert_class[layer] = c
        self._fit_cache = None

    # ------------------------------------------------------------------ step control

    def begin_step(self) -> bool:
        """Start a forward pass; returns whether it is profiled."""
        s = self._step - self.warmup_steps
        self._active = s >= 0 and s % self.interval == 0
        if self._active:
            self._profiled_steps += 1
        return self._active

    def end_step(self) -> None:
        """End a forward pass: advance the counter and read finished samples."""
        self._active = False
        self._step += 1
        self.poll()

    @property
    def is_profiling_step(self) -> bool:
        return self._active

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------------ recording

    def new_event(self, enable_timing: bool = True) -> Any:
        return self._event_factory(enable_timing)

    @contextmanager
    def kernel(
        self,
        layer: int,
        token_counts: torch.Tensor,
        expert_ids: Optional[torch.Tensor] = None,
        expert_class: int = 0,
    ) -> Iterator[None]:
        """Time the launch inside the block (events only; read later by :meth:`poll`).

        ``token_counts[g]`` tokens went to slot ``g``, which serves logical expert
        ``expert_ids[g]`` (default: slot g is expert g). Tensors may live on the GPU.
        """
        start = self.new_event(True)
        end = self.new_event(True)
        start.record()
        yield
        end.record()
        self.record_kernel(layer, start, end, token_counts, expert_ids, expert_class)

    def record_kernel(
        self,
        layer: int,
        start_event: Any,
        end_event: Any,
        token_counts: torch.Tensor,
        expert_ids: Optional[torch.Tensor] = None,
        expert_class: int = 0,
    ) -> None:
        """Queue a sample whose time is ``start_event.elapsed_time(end_event)``.

        Call it right after recording ``end_event``: the sample is marked host-bound when the
        device has already passed ``start_event`` (see the module docstring). The token counts
        (and ids) are copied to host memory asynchronously; a third event marks the copy done.
        Nothing here waits for the device.
        """
        _check_int("layer", layer, 0, self.num_layers)
        _check_int("expert_class", expert_class, 0, self.num_classes)
        if token_counts.dim() != 1:
            raise ValueError(f"token_counts must be 1-D, got shape {tuple(token_counts.shape)}")
        if expert_ids is None and token_counts.numel() != self.num_experts:
            raise ValueError(
                f"without expert_ids, token_counts must have num_experts={self.num_experts} "
                f"entries, got {token_counts.numel()}"
            )
        if expert_ids is not None and expert_ids.shape != token_counts.shape:
            raise ValueError(
                f"expert_ids shape {tuple(expert_ids.shape)} != token_counts shape "
                f"{tuple(token_counts.shape)}"
            )
        host_bound = device_reached(start_event)
        counts_host = to_host_async(token_counts)
        ids_host = to_host_async(expert_ids) if expert_ids is not None else None
        ready = self.new_event(False)
        ready.record()
        self._pending.append(
            _Pending(layer, expert_class, start_event, end_event, ready, counts_host, ids_host, host_bound)
        )
        while len(self._pending) > self.max_pending:
            self._pending.popleft()
            self._dropped += 1

    def poll(self, block: bool = False) -> int:
        """Read queued samples whose events are complete (all of them when ``block``).
        Returns the number of samples read."""
        batches: Dict[int, List[Tuple[int, int, float, torch.Tensor, torch.Tensor]]] = {}
        n = 0
        while self._pending:
            rec = self._pending[0]
            if not rec.ready.query():
                if not block:
                    break
                rec.ready.synchronize()
            ms = float(rec.start.elapsed_time(rec.end))
            self._pending.popleft()
            self._host_bound += int(rec.host_bound)
            ids = rec.expert_ids if rec.expert_ids is not None else torch.arange(self.num_experts)
            g = rec.counts.numel()
            batches.setdefault(g, []).append((rec.layer, rec.expert_class, ms, rec.counts, ids))
            n += 1
        for rows in batches.values():
            self.add_kernel_timings(
                layers=torch.tensor([r[0] for r in rows], dtype=torch.int64),
                token_counts=torch.stack([r[3] for r in rows]),
                times_ms=torch.tensor([r[2] for r in rows], dtype=torch.float64),
                expert_ids=torch.stack([r[4] for r in rows]),
                expert_classes=torch.tensor([r[1] for r in rows], dtype=torch.int64),
            )
        return n

    def add_kernel_timing(
        self,
        layer: int,
        token_counts: torch.Tensor,
        time_ms: float,
        expert_ids: Optional[torch.Tensor] = None,
        expert_class: int = 0,
    ) -> None:
        """Add one measured sample directly (host clock, replayed traces, simulation)."""
        _check_int("layer", layer, 0, self.num_layers)
        _check_int("expert_class", expert_class, 0, self.num_classes)
        counts = torch.as_tensor(token_counts).reshape(1, -1)
        ids = None if expert_ids is None else torch.as_tensor(expert_ids).reshape(1, -1)
        self.add_kernel_timings(
            torch.tensor([layer]),
            counts,
            torch.tensor([float(time_ms)], dtype=torch.float64),
            ids,
            torch.tensor([expert_class]),
        )

    def add_kernel_timings(
        self,
        layers: torch.Tensor,
        token_counts: torch.Tensor,
        times_ms: torch.Tensor,
        expert_ids: Optional[torch.Tensor] = None,
        expert_classes: Optional[torch.Tensor] = None,
    ) -> None:
        """Add ``N`` samples at once.

        Parameters:
            layers: [N] layer of each sample
            token_counts: [N, G] tokens per slot (>= 0)
            times_ms: [N] kernel time
            expert_ids: [N, G] logical expert of each slot, -1 = unused slot (count must be
                0); None: G == num_experts and slot g is expert g
            expert_classes: [N] class of each sample (default 0)
        """
        layers = torch.as_tensor(layers, dtype=torch.int64).flatten().cpu()
        counts = torch.as_tensor(token_counts).cpu().double()
        times = torch.as_tensor(times_ms).cpu().double().flatten()
        N = layers.numel()
        if counts.dim() != 2 or counts.shape[0] != N or times.numel() != N:
            raise ValueError(
                f"expected layers [N], token_counts [N, G], times_ms [N]; got "
                f"{tuple(layers.shape)}, {tuple(counts.shape)}, {tuple(times.shape)}"
            )
        if N == 0:
            return
        G = counts.shape[1]
        if expert_ids is None:
            if G != self.num_experts:
                raise ValueError(
                    f"without expert_ids, token_counts must have {self.num_experts} columns, got {G}"
                )
            ids = torch.arange(G, dtype=torch.int64).expand(N, G)
        else:
            ids = torch.as_tensor(expert_ids).cpu().to(torch.int64)
            if ids.shape != counts.shape:
                raise ValueError(
                    f"expert_ids shape {tuple(ids.shape)} != token_counts shape {tuple(counts.shape)}"
                )
        classes = (
            torch.zeros(N, dtype=torch.int64)
            if expert_classes is None
            else torch.as_tensor(expert_classes, dtype=torch.int64).flatten().cpu()
        )
        if classes.numel() != N:
            raise ValueError(f"expert_classes must have {N} entries, got {classes.numel()}")
        if (layers < 0).any() or (layers >= self.num_layers).any():
            raise ValueError(f"layer ids must be in [0, {self.num_layers})")
        if (classes < 0).any() or (classes >= self.num_classes).any():
            raise ValueError(f"expert classes must be in [0, {self.num_classes})")
        if (ids >= self.num_experts).any() or (ids < -1).any():
            raise ValueError(f"expert ids must be in [0, {self.num_experts}) or -1 (unused slot)")
        if not torch.isfinite(counts).all() or (counts < 0).any():
            raise ValueError("token counts must be finite and >= 0")
        if not torch.isfinite(times).all() or (times < 0).any():
            raise ValueError("kernel times must be finite and >= 0")
        unused = ids < 0
        if (counts[unused] != 0).any():
            raise ValueError("slots with expert id -1 must have a token count of 0")

        T = len(self.tile_sizes)
        tiles, X = design_matrix(counts, self.tile_sizes)  # [N, G, T], [N, T, 3]
        idx = layers * self.num_classes + classes
        LC = self.num_layers * self.num_classes
        self._xtx.view(LC, T, 3, 3).index_add_(0, idx, X[..., :, None] * X[..., None, :])
        self._xty.view(LC, T, 3).index_add_(0, idx, X * times[:, None, None])
        self._yty.view(LC).index_add_(0, idx, times * times)
        self._nsamp.view(LC).index_add_(0, idx, torch.ones(N, dtype=torch.float64))

        used = ~unused
        flat = (layers[:, None] * self.num_experts + ids.clamp_min(0))[used]
        self._tokens.view(-1).index_add_(0, flat, counts[used])
        self._invocations.view(-1).index_add_(0, flat, (counts[used] > 0).double())
        self._tile_sum.view(-1, T).index_add_(0, flat, tiles[used])
        self._expert_class.view(-1)[flat] = classes[:, None].expand(N, G)[used]
        self._fit_cache = None

    # ------------------------------------------------------------------ fitting

    def fits(self) -> Dict[Tuple[int, int], KernelCostFit]:
        """Cost model per (layer, class), with fallbacks for layers without enough data:
        the layer-shape pool, then all layers of the class, then all samples, then the
        unit model (cost = tokens); see :func:`.cost_model.fit_pooled`."""
        if self._fit_cache is None:
            self._fit_cache = fit_pooled(
                self._xtx, self._xty, self._yty, self._nsamp, self._pool_keys, self.tile_sizes, self.min_samples
            )
        return self._fit_cache

    def has_fit(self) -> bool:
        """Whether at least one (layer shape, class) has ``min_samples`` samples."""
        return float(self._nsamp.sum()) >= self.min_samples

    def cost_params(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per (layer, expert) model parameters ``a``, ``b``, ``tile``: [L, E] float64."""
        fits = self.fits()
        L, C = self.num_layers, self.num_classes
        def table(field: str) -> torch.Tensor:
            return torch.tensor(
                [[float(getattr(fits[(l, c)], field)) for c in range(C)] for l in range(L)], dtype=torch.float64
            )

        a, b, t = table("a_ms"), table("b_ms"), table("tile")
        cls = self._expert_class
        return a.gather(1, cls), b.gather(1, cls), t.gather(1, cls)

    def get_cost_model(self, layer: int) -> Dict[int, KernelCostFit]:
        """Fitted model of each expert class of ``layer``."""
        _check_int("layer", layer, 0, self.num_layers)
        fits = self.fits()
        return {c: fits[(layer, c)] for c in range(self.num_classes)}

    # ------------------------------------------------------------------ outputs

    def get_adjusted_expert_load(self, token_count: torch.Tensor) -> torch.Tensor:
        """Expected compute time (ms) of each expert for the given token counts.

        Parameters:
            token_count: [..., num_layers, num_experts], tokens per expert *per forward
                pass* (e.g. the recorder's per-pass ``logical_count`` buffer); fractional
                counts (an expert's tokens split over replicas) are allowed. Padding is
                charged per entry, so a sum over passes passed as one entry under-counts it.

        Returns:
            [..., num_layers, num_experts] float32 on the input's device. Before any fit
            the unit model applies and the result equals ``token_count``.
        """
        if token_count.dim() < 2 or tuple(token_count.shape[-2:]) != (self.num_layers, self.num_experts):
            raise ValueError(
                f"token_count must have shape [..., {self.num_layers}, {self.num_experts}], "
                f"got {tuple(token_count.shape)}"
            )
        n = token_count.detach().double().cpu()
        if not torch.isfinite(n).all() or (n < 0).any():
            raise ValueError("token_count must be finite and >= 0")
        a, b, tile = self.cost_params()
        tiles = torch.where(tile == 1, n, torch.ceil(n / tile))
        cost = a * (n > 0) + b * tiles
        return cost.float().to(token_count.device)

    def get_expert_compute_weights(
        self, layer: int, token_count: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Share of ``layer``'s expert compute time spent in each expert (sums to 1).

        Parameters:
            layer: layer id
            token_count: [E] or [S, E] per-pass token counts; default: the passes profiled
                so far (their per-expert invocation and tile counts)

        Returns:
            [E] float32; uniform when nothing is known.
        """
        _check_int("layer", layer, 0, self.num_layers)
        E = self.num_experts
        if token_count is None:
            t = self._recorded_expert_time()[layer]
        else:
            tc = token_count.reshape(-1, E).double().cpu()
            full = torch.zeros(tc.shape[0], self.num_layers, E, dtype=torch.float64)
            full[:, layer] = tc
            t = self.get_adjusted_expert_load(full)[:, layer].double().sum(0)
        s = float(t.sum())
        if s <= 0:
            return torch.full((E,), 1.0 / E)
        return (t / s).float()

    def _recorded_expert_time(self) -> torch.Tensor:
        """Modelled time of every expert over the profiled passes: [L, E] float64."""
        a, b, tile = self.cost_params()
        tiles = self._tokens.clone()  # tile 1 (linear) counts tokens
        for ti, t in enumerate(self.tile_sizes):
            mask = tile == t
            tiles[mask] = self._tile_sum[..., ti][mask]
        return a * self._invocations + b * tiles

    def get_statistics_summary(self) -> Dict[str, Any]:
        """Counters, fitted models and per-expert time per token / per invocation."""
        fits = self.fits()
        t_expert = self._recorded_expert_time()
        nan = torch.full_like(t_expert, float("nan"))
        return {
            "steps": self._step,
            "profiled_steps": self._profiled_steps,
            "samples": int(self._nsamp.sum()),
            "pending": len(self._pending),
            "dropped": self._dropped,
            "host_bound": self._host_bound,
            "fits": {
                l: {c: fits[(l, c)] for c in range(self.num_classes)} for l in range(self.num_layers)
            },
            "tokens": self._tokens.clone(),
            "invocations": self._invocations.clone(),
            "time_ms": t_expert,
            "time_per_token_ms": torch.where(
                self._tokens > 0, t_expert / self._tokens.clamp_min(1e-300), nan
            ),
            "time_per_invocation_ms": torch.where(
                self._invocations > 0, t_expert / self._invocations.clamp_min(1e-300), nan
            ),
        }

    def format_summary(self) -> str:
        s = self.get_statistics_summary()
        fitted = [f for d in s["fits"].values() for f in d.values() if f.source != "default"]
        head = (
            f"steps={s['steps']} profiled={s['profiled_steps']} samples={s['samples']} "
            f"pending={s['pending']} dropped={s['dropped']} host_bound={s['host_bound']}"
        )
        if not fitted:
            return head + " (no fit yet: costs = token counts)"
        f = fitted[0]
        return head + (
            f" model[layer0]: a={f.a_ms * 1e3:.2f}us/expert b={f.b_ms * 1e3:.3f}us/tile "
            f"tile={f.tile} c={f.c_ms * 1e3:.2f}us rmse={f.rmse_ms * 1e3:.2f}us ({f.source})"
        )

    def reset_statistics(self) -> None:
        """Forget all samples (pending ones too); keeps configuration and step counter."""
        for t in self._stats():
            t.zero_()
        self._pending.clear()
        self._dropped = 0
        self._host_bound = 0
        self._profiled_steps = 0
        self._fit_cache = None

    # ------------------------------------------------------------------ merging ranks

    def _stats(self) -> Tuple[torch.Tensor, ...]:
        return (self._xtx, self._xty, self._yty, self._nsamp, self._tokens, self._invocations, self._tile_sum)

    def statistics_tensor(self) -> torch.Tensor:
        """All additive statistics, flattened (float64), for an all-reduce SUM."""
        return torch.cat([t.flatten() for t in self._stats()])

    def settings(self) -> Dict[str, Any]:
        """The constructor's keyword arguments this profiler was built with (for a copy with
        the same configuration: ``Cls(p.num_layers, p.num_experts, **p.settings())``)."""
        return dict(warmup_steps=self.warmup_steps, interval=self.interval,
                    tile_sizes=self.tile_sizes, num_classes=self.num_classes,
                    min_samples=self.min_samples, max_pending=self.max_pending,
                    event_factory=self._event_factory)

    def all_reduced(self, all_reduce: Callable[[torch.Tensor], torch.Tensor]) -> "ExpertComputeProfiler":
        """A copy whose statistics are ``all_reduce(self.statistics_tensor())`` (e.g. a SUM
        over ranks). Configuration, classes and layer-shape keys are copied."""
        other = ExpertComputeProfiler(self.num_layers, self.num_experts, **self.settings())
        other._expert_class = self._expert_class.clone()
        other._pool_keys = list(self._pool_keys)
        flat = all_reduce(self.statistics_tensor().clone()).double().cpu()
        off = 0
        for t in other._stats():
            k = t.numel()
            t.copy_(flat[off : off + k].view_as(t))
            off += k
        if off != flat.numel():
            raise ValueError(f"statistics size mismatch: {flat.numel()} != {off}")
        return other


_GLOBAL_PROFILER: Optional[ExpertComputeProfiler] = None


def get_global_expert_compute_profiler() -> Optional[ExpertComputeProfiler]:
    """The process-wide profiler (None when profiling is off)."""
    return _GLOBAL_PROFILER


def set_global_expert_compute_profiler(profiler: Optional[ExpertComputeProfiler]) -> None:
    global _GLOBAL_PROFILER
    _GLOBAL_PROFILER = profiler
