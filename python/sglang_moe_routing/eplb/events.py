"""Timing events of the expert compute profiler: what an event pair measures, a host-clock
stand-in for machines without a GPU, and the non-blocking reads the profiler relies on.

The time between two events is the device's timeline between them: kernel time *plus any
time the device sat idle waiting for the host* to enqueue the next launch. When the host is
ahead of the device (the usual case in a loaded server) the region's launches are all queued
before the device reaches the start event and the time is pure kernel time. When the stream
was drained just before the region (a host sync: ``.item()``, a pageable ``.cuda()`` copy,
``torch.cuda.synchronize()``), the time also counts the host's work inside the region: Python
and launch overhead, caching-allocator ``cudaMalloc``, first-call cuBLAS heuristics and lazy
kernel loading (milliseconds). Right after the end event is recorded,
``ExpertComputeProfiler.record_kernel`` asks the start event (:func:`device_reached`:
``query()``, no wait) whether the device has already passed it; such samples are counted as
``host_bound`` in ``get_statistics_summary``. They are still fitted: a constant launch
overhead only moves ``c``, but many host-bound samples mean the fitted costs follow the host,
not the kernels.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import torch


class HostEvent:
    """Stand-in for ``torch.cuda.Event`` on machines without a GPU (host clock)."""

    def __init__(self, enable_timing: bool = True):
        self._t: Optional[float] = None

    def record(self, stream: Any = None) -> None:
        self._t = time.perf_counter()

    def query(self) -> bool:
        return self._t is not None

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: "HostEvent") -> float:
        if self._t is None or end._t is None:
            raise RuntimeError("elapsed_time on an event that was not recorded")
        return (end._t - self._t) * 1e3


def default_event_factory(enable_timing: bool) -> Any:
    """A CUDA event when CUDA is available, else a :class:`HostEvent`."""
    if torch.cuda.is_available():
        return torch.cuda.Event(enable_timing=enable_timing)
    return HostEvent(enable_timing)


def device_reached(start_event: Any) -> bool:
    """Whether the device has already passed ``start_event`` (non-blocking ``query()``).
    Host-clock events measure host time by construction and are never flagged."""
    if isinstance(start_event, HostEvent):
        return False
    return bool(start_event.query())


def to_host_async(t: torch.Tensor) -> torch.Tensor:
    """A host copy of ``t``: pinned and non-blocking for a CUDA tensor (no device wait)."""
    if t.is_cuda:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host
    return t.detach().clone()
