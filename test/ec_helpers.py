"""The one assertion the expert-choice GPU tests share: a kernel's ``(weights, ids)`` against
the reference's (ids bit for bit, weights within 1e-6, NaN where the reference has NaN)."""

from __future__ import annotations

from typing import Callable, Optional

import torch


def describe(logits: torch.Tensor, k: int, kw: dict, cf: Optional[float] = None) -> str:
    """``T=.. E=.. k=.. [cf=..] dtype {non-tensor kwargs}`` for failure messages."""
    cf_part = "" if cf is None else f" cf={cf}"
    return (f"T={logits.shape[0]} E={logits.shape[1]} k={k}{cf_part} {logits.dtype} "
            f"{ {a: b for a, b in kw.items() if not isinstance(b, torch.Tensor)} }")


def assert_matches_reference(name: str, what: str, w: torch.Tensor, ids: torch.Tensor,
                             ref_w: torch.Tensor, ref_ids: torch.Tensor,
                             detail: Callable[[], str] = lambda: "") -> None:
    """int32 ids equal to ``ref_ids`` row for row, float32 weights within 1e-6 of ``ref_w``;
    ``detail()`` (computed on failure only) is appended to the ids message."""
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert ids.shape == ref_ids.shape == w.shape
    bad = (ids != ref_ids).any(dim=1).nonzero().flatten()
    if bad.numel():
        rows = bad[:3].tolist()
        extra = detail()
        raise AssertionError(
            f"{name}: {what}: {bad.numel()} rows differ from the reference, e.g. rows {rows}: "
            f"got {ids[rows].tolist()} want {ref_ids[rows].tolist()}"
            + (f"; {extra}" if extra else ""))
    torch.testing.assert_close(w, ref_w, atol=1e-6, rtol=0, equal_nan=True,
                               msg=lambda m: f"{name}: {what}: {m}")
