"""Resolving upstream SGLang symbols for the start-up self-checks of the feature modules."""

from __future__ import annotations

import importlib
from typing import Iterable, List


def missing(targets: Iterable[str]) -> List[str]:
    """The dotted names in ``targets`` that do not resolve: ``pkg.module.function`` or
    ``pkg.module.Class.attribute`` (a module attribute, else a class attribute)."""
    out = []
    for t in targets:
        mod, _, attr = t.rpartition(".")
        try:
            obj = importlib.import_module(mod)
        except ImportError:
            owner, _, cls = mod.rpartition(".")
            try:
                obj = getattr(importlib.import_module(owner), cls)
            except (ImportError, AttributeError):
                out.append(t)
                continue
        if not hasattr(obj, attr):
            out.append(t)
    return out
