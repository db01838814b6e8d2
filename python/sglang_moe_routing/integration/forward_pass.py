"""One AROUND hook on ``ModelRunner.forward``, shared by every feature that needs to act per
served forward pass (EC load statistics, the EPLB compute profiler).

SGLang's ``HookRegistry.apply_hooks`` patches a target once and skips it afterwards, so two
features that each registered their own ``ModelRunner.forward`` hook after start-up would
silently lose the second one. Features add a wrapper here instead; the hook is registered
and applied the first time one is added (never when no feature needs it), and a target
that something else patched first fails loudly instead of going silently unwrapped.

A wrapper is ``fn(call, model_runner, *args, **kwargs)`` and must call
``call(model_runner, *args, **kwargs)`` exactly once.

``ModelRunner.forward`` runs in Python for every served pass, CUDA-graph replays included;
graph capture and warm-up call the model's own ``forward`` and never come through here.
"""

from __future__ import annotations

import functools
from typing import Callable, List

TARGET = "sglang.srt.model_executor.model_runner.ModelRunner.forward"

_wrappers: List[Callable] = []
_installed = False


def add_wrapper(wrapper: Callable) -> None:
    """Run ``wrapper`` around every ``ModelRunner.forward`` (idempotent)."""
    if wrapper not in _wrappers:
        _wrappers.append(wrapper)
    _install()


def wrappers() -> List[Callable]:
    return list(_wrappers)


def _around_forward(original, model_runner, *args, **kwargs):
    call = original
    for w in reversed(_wrappers):
        call = functools.partial(w, call)
    return call(model_runner, *args, **kwargs)


def apply_late_hooks(targets) -> None:
    """Apply hooks registered after start-up and check that each target got patched
    (``apply_hooks`` skips a target patched before and only logs a failure)."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    HookRegistry.apply_hooks()
    missing = [t for t in targets if t not in HookRegistry._patched]
    if missing:
        raise RuntimeError(f"sglang-moe-routing: could not hook {', '.join(missing)} "
                           "(sglang 0.5.23 expected)")


def _install() -> None:
    global _installed
    if _installed:
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if TARGET in HookRegistry._patched:
        raise RuntimeError(
            f"sglang-moe-routing: {TARGET} was patched before the plugin could hook it; "
            "EC load statistics and the EPLB compute profiler need that hook (sglang 0.5.23)")
    HookRegistry.register(TARGET, _around_forward, HookType.AROUND)
    HookRegistry.apply_hooks()
    if TARGET not in HookRegistry._patched:
        raise RuntimeError(f"sglang-moe-routing: could not hook {TARGET} (sglang 0.5.23 expected)")
    _installed = True
