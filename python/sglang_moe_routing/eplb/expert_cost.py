"""Heterogeneous expert cost: two expert cost classes run as two launches, plus the measured
MoE time per GPU. Torch only (the SGLang glue is ``integration/expert_cost_hooks.py``).

What it models
--------------
A deployment whose experts do not all cost the same per token, run the way such a deployment
runs them: the experts of a layer fall into two *cost classes* (e.g. most experts in FP8 or
4-bit and some kept in BF16 for accuracy), and each class runs as its own grouped-GEMM launch
over the tokens routed to its experts. Here both classes keep the checkpoint's weights and
dtype; the *slow* class's launch is repeated ``factor`` times (one pass gives the output, the
``factor - 1`` others are the same GEMMs over the same tokens, results discarded), so a slow
expert costs ``factor`` times a fast one per token on whatever GPU holds it, and the cost
moves with the expert when EPLB moves it (classes belong to *logical* experts).

It does not model lower precision itself (less memory traffic, other kernels and tile
configs), accuracy, or a per-expert fixed cost other than the second launch's own. Outputs:
``fast + slow`` partial outputs are summed (bf16), so tokens may differ from a server without
the mechanism by one rounding; runs with the same mechanism compute the same thing.

The slow set of every layer is a seeded random subset (``slow_expert_mask``); the same seed
gives the same set on every rank and in every run.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from sglang_moe_routing.eplb.profiler import ExpertComputeProfiler

__all__ = [
    "slow_expert_mask",
    "split_topk_ids",
    "slot_counts",
    "run_cost_classes",
    "MoeTimeWindows",
    "MOE_TIME_RE",
    "format_moe_time_line",
    "parse_moe_time_lines",
    "window_balancedness",
    "class_expert_ids",
    "ClassSplitProfiler",
]


def slow_expert_mask(num_layers: int, num_experts: int, fraction: float, seed: int) -> torch.Tensor:
    """[num_layers, num_experts] bool: ``round(fraction * num_experts)`` slow experts per
    layer, a seeded random subset per layer (row ``l`` depends on ``seed`` and ``l`` only)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"slow expert fraction must be in [0, 1], got {fraction!r}")
    k = int(round(fraction * num_experts))
    mask = torch.zeros(num_layers, num_experts, dtype=torch.bool)
    for layer in range(num_layers):
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + layer)
        mask[layer, torch.randperm(num_experts, generator=g)[:k]] = True
    return mask


def split_topk_ids(topk_ids: torch.Tensor, slow_slot: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split local top-k ids [T, k] (-1 = not on this GPU / dropped) into the fast-class and
    slow-class ids: each entry keeps its id in exactly one of the two, -1 in the other.
    ``slow_slot``: [S] bool per local slot; ids >= S count as fast (e.g. a fused shared
    expert). No host sync (CUDA-graph safe)."""
    valid = topk_ids >= 0
    S = slow_slot.numel()
    idx = topk_ids.clamp(0, S - 1).long()
    slow = valid & (topk_ids < S) & slow_slot.to(topk_ids.device)[idx]
    neg = torch.full_like(topk_ids, -1)
    return torch.where(slow | ~valid, neg, topk_ids), torch.where(slow, topk_ids, neg)


def slot_counts(topk_ids: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Tokens per local slot [num_slots] int32 (ids outside [0, num_slots) ignored), on the
    ids' device, without a host sync."""
    ids = topk_ids.flatten().long()
    valid = (ids >= 0) & (ids < num_slots)
    counts = torch.zeros(num_slots + 1, dtype=torch.int32, device=ids.device)
    counts.scatter_add_(0, torch.where(valid, ids, torch.full_like(ids, num_slots)),
                        torch.ones_like(ids, dtype=torch.int32))
    return counts[:num_slots]


Timer = Callable[[int, torch.Tensor], object]  # (class, class ids) -> context manager


def run_cost_classes(
    run_experts: Callable[[torch.Tensor], torch.Tensor],
    topk_ids: torch.Tensor,
    slow_slot: torch.Tensor,
    factor: int,
    timer: Optional[Timer] = None,
) -> torch.Tensor:
    """The MoE output as two launches: ``run_experts(fast ids)`` then ``factor`` launches of
    ``run_experts(slow ids)`` (the first one's output is used). ``run_experts(ids)`` must return
    the weighted expert sum over the entries of ``ids`` that are >= 0 (-1 entries contribute
    nothing), as SGLang's fused MoE with ``filter_expert`` does. ``timer(cls, ids)``, when
    given, returns a context manager around each class's launches (the profiler's samples)."""
    if factor < 1:
        raise ValueError(f"expert cost factor must be >= 1, got {factor!r}")
    fast_ids, slow_ids = split_topk_ids(topk_ids, slow_slot)
    with _ctx(timer, 0, fast_ids):
        out = run_experts(fast_ids)
    with _ctx(timer, 1, slow_ids):
        slow = run_experts(slow_ids)
        for _ in range(factor - 1):
            run_experts(slow_ids)  # the slow class's extra work (result unused)
    return out + slow


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _ctx(timer: Optional[Timer], cls: int, ids: torch.Tensor):
    return _Null() if timer is None else timer(cls, ids)


# --------------------------------------------------------------------------- measured MoE time


@dataclass
class _Span:
    index: int  # profiled pass index
    layer: int
    start: object
    end: object


class MoeTimeWindows:
    """Measured MoE time of this GPU per layer, summed over windows of ``window`` profiled
    passes; a window is emitted (``emit(window_index, first_pass, last_pass, {layer: ms})``)
    once all its spans' end events report done (``query()``, never a wait). Window ``w``
    covers profiled passes ``[w * window, (w + 1) * window)`` on every rank, so ranks'
    lines line up."""

    def __init__(self, window: int, emit: Callable[[int, int, int, Dict[int, float]], None]):
        if window < 1:
            raise ValueError(f"MoE time window must be >= 1 profiled passes, got {window!r}")
        self.window = window
        self.emit = emit
        self._spans: List[_Span] = []
        self._sums: Dict[int, Dict[int, float]] = {}
        self._next = 0  # next window to emit

    def add(self, index: int, layer: int, start: object, end: object) -> None:
        self._spans.append(_Span(index, layer, start, end))

    def poll(self, current_index: int) -> int:
        """Read finished spans; emit every window that ended before ``current_index`` (the
        number of profiled passes started so far) and has no span pending. Returns the
        number of windows emitted."""
        keep = []
        for s in self._spans:
            if s.end.query():
                w = s.index // self.window
                d = self._sums.setdefault(w, {})
                d[s.layer] = d.get(s.layer, 0.0) + float(s.start.elapsed_time(s.end))
            else:
                keep.append(s)
        self._spans = keep
        pending = {s.index // self.window for s in keep}
        n = 0
        while (self._next + 1) * self.window <= current_index and self._next not in pending:
            w = self._next
            self.emit(w, w * self.window, (w + 1) * self.window - 1, self._sums.pop(w, {}))
            self._next += 1
            n += 1
        return n


MOE_TIME_TAG = "expert-cost moe-time"
MOE_TIME_RE = re.compile(
    r"expert-cost moe-time window=(\d+) passes=(\d+)-(\d+) rank=(\d+) layers=([\d,]*) ms=([\d.,e+-]*)")


def format_moe_time_line(window: int, first: int, last: int, rank: int, per_layer: Dict[int, float]) -> str:
    layers = sorted(per_layer)
    return (f"{MOE_TIME_TAG} window={window} passes={first}-{last} rank={rank} "
            f"layers={','.join(map(str, layers))} ms={','.join(f'{per_layer[l]:.4f}' for l in layers)}")


def parse_moe_time_lines(text: str) -> Dict[int, Dict[int, Dict[int, float]]]:
    """{window: {rank: {layer: ms}}} from a server log (later duplicates win)."""
    out: Dict[int, Dict[int, Dict[int, float]]] = {}
    for m in MOE_TIME_RE.finditer(text):
        w, rank = int(m[1]), int(m[4])
        layers = [int(x) for x in m[5].split(",") if x]
        ms = [float(x) for x in m[6].split(",") if x]
        if len(layers) != len(ms):
            continue
        out.setdefault(w, {})[rank] = dict(zip(layers, ms))
    return out


def window_balancedness(windows: Dict[int, Dict[int, Dict[int, float]]], num_ranks: int) -> Dict[int, float]:
    """Per window: mean over MoE layers of (mean over GPUs / max over GPUs) of the window's
    MoE time. Windows missing a rank (or a layer on some rank) are skipped; a layer with
    no time on any rank is skipped."""
    out = {}
    for w, ranks in sorted(windows.items()):
        if sorted(ranks) != list(range(num_ranks)):
            continue
        layers = set.intersection(*(set(r) for r in ranks.values()))
        if any(len(r) != len(layers) for r in ranks.values()):
            continue
        vals = []
        for layer in sorted(layers):
            t = torch.tensor([ranks[r][layer] for r in range(num_ranks)], dtype=torch.float64)
            if float(t.max()) > 0:
                vals.append(float(t.mean() / t.max()))
        if vals:
            out[w] = sum(vals) / len(vals)
    return out


def class_expert_ids(logical: torch.Tensor, slot_class: torch.Tensor, cls: int) -> torch.Tensor:
    """Logical expert of each local slot, -1 where the slot is not of class ``cls`` (the
    profiler's unused-slot convention)."""
    return torch.where(slot_class == cls, logical, torch.full_like(logical, -1))


def describe_mask(mask: torch.Tensor, layers: Sequence[int]) -> str:
    return "; ".join(f"layer {l}: {mask[l].nonzero().flatten().tolist()}" for l in layers)


class ClassSplitProfiler(ExpertComputeProfiler):
    """An :class:`ExpertComputeProfiler` for layers that run their experts as several
    launches (cost classes), and that measures the MoE time of this GPU.

    The integration brackets each layer's whole expert computation with :meth:`kernel`
    (one sample over all local slots). Inside that bracket, :meth:`class_kernel` records one
    sample per class launch instead (expert ids of other classes -1, so every expert gets
    the class of the launch that runs it); when any was recorded the outer sample is not
    (its time would mix the classes). With ``moe_time`` the outer bracket's time (the
    layer's whole expert computation on this GPU) also goes to those windows.
    """

    def __init__(self, *args: Any, moe_time: Optional[MoeTimeWindows] = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.moe_time = moe_time
        self._outer_layer: Optional[int] = None
        self._inner = 0

    @property
    def in_layer_bracket(self) -> bool:
        return self._outer_layer is not None

    @contextmanager
    def kernel(self, layer: int, token_counts: torch.Tensor, expert_ids: Optional[torch.Tensor] = None,
               expert_class: int = 0) -> Iterator[None]:
        if self._outer_layer is not None:  # nested: a plain sample
            with super().kernel(layer, token_counts, expert_ids, expert_class):
                yield
            return
        start, end = self.new_event(True), self.new_event(True)
        start.record()
        self._outer_layer, self._inner = layer, 0
        try:
            yield
        finally:
            self._outer_layer = None
        end.record()
        if self.moe_time is not None:
            self.moe_time.add(self._profiled_steps - 1, layer, start, end)
        if self._inner == 0:
            self.record_kernel(layer, start, end, token_counts, expert_ids, expert_class)

    @contextmanager
    def class_kernel(self, layer: int, expert_class: int, token_counts: torch.Tensor,
                     expert_ids: torch.Tensor) -> Iterator[None]:
        """One class's launch(es) inside the layer bracket; nothing outside it."""
        if self._outer_layer is None:
            yield
            return
        start, end = self.new_event(True), self.new_event(True)
        start.record()
        yield
        end.record()
        self.record_kernel(layer, start, end, token_counts, expert_ids, expert_class)
        self._inner += 1

    def end_step(self) -> None:
        super().end_step()
        if self.moe_time is not None:
            self.moe_time.poll(self._profiled_steps)
