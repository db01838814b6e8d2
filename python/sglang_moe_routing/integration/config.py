"""Process-wide plugin configuration.

Every feature owns one section (a frozen dataclass). The sections are parsed from the CLI
in the launcher process, validated there (bad values fail at start-up), and attached to
the ``ServerArgs`` record as the bookkeeping attribute ``_moe_routing`` (a dict of
sections). ``ServerArgs.__reduce__`` pickles its ``__dict__``, so the sections reach the
scheduler subprocesses with the record; there ``get_section`` finds them through
``sglang.srt.runtime_context.get_server_args()``.

Tests and the demo can bypass the record with ``set_sections``.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Callable, Dict, Iterator, List, Optional, TypeVar

import torch

_T = TypeVar("_T")

SERVER_ARGS_ATTR = "_moe_routing"

_lock = threading.Lock()
_override: Optional[Dict[str, Any]] = None
_cache: Optional[Dict[str, Any]] = None
_cache_key: Optional[int] = None


def set_sections(sections: Optional[Dict[str, Any]]) -> None:
    """Force the active sections for this process (``None`` goes back to the record)."""
    global _override, _cache, _cache_key
    with _lock:
        _override = dict(sections) if sections is not None else None
        _cache, _cache_key = None, None


def attach_to_server_args(server_args: Any, sections: Dict[str, Any]) -> None:
    """Store ``sections`` on a ServerArgs record (a bookkeeping attribute, pickled)."""
    server_args.__dict__[SERVER_ARGS_ATTR] = dict(sections)


def sections_from_server_args(server_args: Any) -> Optional[Dict[str, Any]]:
    d = getattr(server_args, "__dict__", {})
    return d.get(SERVER_ARGS_ATTR)


def _published_server_args() -> Any:
    try:
        from sglang.srt.runtime_context import get_server_args
    except Exception:  # pragma: no cover - sglang missing or very different
        return None
    try:
        return get_server_args()
    except Exception:
        return None


def get_sections() -> Dict[str, Any]:
    """All sections in effect in this process ({} when nothing was configured)."""
    global _cache, _cache_key
    if _override is not None:
        return _override
    sa = _published_server_args()
    key = id(sa) if sa is not None else None
    if _cache is not None and _cache_key == key:
        return _cache
    found = sections_from_server_args(sa) if sa is not None else None
    with _lock:
        _cache = dict(found) if found else {}
        _cache_key = key
    return _cache


def get_section(name: str, default: Any = None) -> Any:
    return get_sections().get(name, default)


@contextlib.contextmanager
def published_server_args(*argv: str, model_path: str = "dummy") -> Iterator[Any]:
    """Parse ``argv`` with SGLang's real parser (plugin flags included) and publish the record
    as this process's server args, as a scheduler process does; reset on exit.

    For the demo and tests that run SGLang layers outside a server (CPU device).
    """
    from sglang.srt.runtime_context import SpawnRanks, publish, reset_context
    from sglang.srt.server_args import prepare_server_args

    server_args = prepare_server_args(["--model-path", model_path, "--device", "cpu", *argv])
    reset_context()
    publish(server_args, role="test", ranks=SpawnRanks(world_rank=0, dp_rank=None))
    set_sections(None)
    try:
        yield server_args
    finally:
        reset_context()
        set_sections(None)


# ----------------------------------------------------------------------------- flag values
# One set of rules for every numeric flag of the plugin (CLI, environment, HF config).


def parse_number(name: str, value: Any, lo: float, hi: float = math.inf, *, lo_open: bool = False) -> float:
    """A finite float in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``); ``ValueError`` naming ``name``."""
    try:
        if isinstance(value, bool):
            raise ValueError
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    in_range = (out > lo if lo_open else out >= lo) and out <= hi
    if not math.isfinite(out) or not in_range:
        if hi == math.inf:
            want = f"a finite number {'>' if lo_open else '>='} {lo:g}"
        else:
            want = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise ValueError(f"{name} must be {want}, got {value!r}")
    return out


def parse_integer(name: str, value: Any, minimum: int) -> int:
    """An int ``>= minimum``; accepts 3, "3", 3.0 and "3.0", rejects booleans and fractions."""
    try:
        if isinstance(value, bool):
            raise ValueError
        x = float(str(value).strip())
        if not math.isfinite(x) or x != int(x):
            raise ValueError
        out = int(x)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if out < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return out


def collect(errors: List[str], default: _T, parse: Callable[[], _T]) -> _T:
    """``parse()``, or ``default`` with its ``ValueError`` appended to ``errors`` (so that a
    start-up check can report every bad flag at once)."""
    try:
        return parse()
    except ValueError as exc:
        errors.append(str(exc))
        return default


def capturing_cuda_graph() -> bool:
    """True while the current CUDA stream is capturing a graph (no host syncs allowed)."""
    try:
        return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    except Exception:  # noqa: BLE001 - a broken CUDA setup is "not capturing"
        return False
