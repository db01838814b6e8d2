"""Balanced, batch-invariant routing: per-expert selection biases ("threshold" mode).

Each token routes alone, as token choice does, but selects its experts by a biased score::

    s      = softmax(logits)            (or sigmoid)       [T, E] fp32
    ids    = topk(s + b, k)                                [T, k]
    w      = s[ids]  (renormalised when ``renormalize``)   [T, k]

with one bias ``b_e`` per expert (DeepSeek-V3's correction bias / auxiliary-loss-free
balancing; expert-threshold routing, arXiv 2603.11535, tracks per-expert thresholds the same
way). ``b`` is calibrated offline on a calibration set so that every expert gets about the
same share of the ``T * k`` slots; at serving time it is a constant, so a token's experts
and weights depend on its own logits only: the output is bitwise independent of its batch
mates (no cross-row op anywhere).

Output format is SGLang's TopK output, exactly as token choice and expert choice return it:
``(topk_weights float32 [T, k], topk_ids int32 [T, k])``.

* :func:`threshold_topk` -- the one-pass routing function (softmax/sigmoid, add, top-k,
  gather, renormalise; no sort, no host sync, CUDA-graph capturable).
* :func:`threshold_topk_reference` -- the spec: token-choice routing with ``b`` as the
  selection-only correction bias (``token_choice_topk_reference``; deterministic ties).
* :func:`ec_threshold_bias` -- a starting bias from expert-choice statistics: minus each
  expert's EC acceptance threshold (the ``C``-th best score it would pick, ``C = cf*T*k/E``).
* :func:`update_bias` -- one auxiliary-loss-free step ``b_e += lr * (mean - load_e) / mean``
  (clamped to ``[-lr, lr]``).
* :func:`calibrate_bias` -- EC-threshold start + ``iters`` update steps with a decaying step
  size on fixed calibration logits; returns the bias with the lowest max/mean load seen.

Torch only (no sglang import).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch

from sglang_moe_routing.expert_choice.reference import compute_scores, token_choice_topk_reference
from sglang_moe_routing.expert_choice.spec import RoutingSpec, check_spec

__all__ = [
    "threshold_topk",
    "threshold_topk_reference",
    "ec_threshold_bias",
    "update_bias",
    "calibrate_bias",
    "load_max_over_mean",
]


def _check(router_logits: torch.Tensor, top_k: int, bias: Optional[torch.Tensor],
           scoring_func: str) -> None:
    if router_logits.dim() != 2 or not router_logits.is_floating_point():
        raise ValueError(
            f"threshold routing: router_logits must be a float [T, E] tensor, got "
            f"{router_logits.dtype} {tuple(router_logits.shape)}"
        )
    t, e = router_logits.shape
    check_spec(RoutingSpec(top_k, scoring_func=scoring_func), e, token_choice=True)
    if bias is not None and tuple(bias.shape) != (e,):
        raise ValueError(
            f"threshold routing: bias must have shape [{e}], got {tuple(bias.shape)}"
        )


def threshold_topk(
    router_logits: torch.Tensor,
    top_k: int,
    bias: Optional[torch.Tensor],
    *,
    renormalize: bool = True,
    scoring_func: str = "softmax",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One-pass biased top-k: ``ids = topk(s + bias, k)``, ``w = s[ids]`` (renormalised).

    Args:
        router_logits: ``[T, E]`` bf16/fp16/fp32.
        top_k: experts per token.
        bias: ``[E]`` selection bias (any float dtype; used as fp32), or ``None`` (= token
            choice).
    Returns:
        ``(topk_weights [T, k] float32, topk_ids [T, k] int32)``; ids best first by biased
        score. Every op is row-wise, so each row's result is independent of the other rows.
    """
    _check(router_logits, top_k, bias, scoring_func)
    weight_scores, select_scores = compute_scores(router_logits, scoring_func, bias)
    ids = torch.topk(select_scores, top_k, dim=-1, sorted=True).indices
    w = torch.gather(weight_scores, 1, ids)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return w, ids.to(torch.int32)


def threshold_topk_reference(
    router_logits: torch.Tensor,
    top_k: int,
    bias: Optional[torch.Tensor],
    *,
    renormalize: bool = True,
    scoring_func: str = "softmax",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The spec: token choice with ``bias`` as selection-only correction bias (stable ties:
    equal biased scores go to the lower expert id)."""
    _check(router_logits, top_k, bias, scoring_func)
    return token_choice_topk_reference(router_logits, RoutingSpec(
        top_k, renormalize=renormalize, scoring_func=scoring_func,
        correction_bias=None if bias is None else bias.float(),
    ))


def load_max_over_mean(topk_ids: torch.Tensor, num_experts: int) -> float:
    """max/mean of the tokens-per-expert counts of one routing (all ``T * k`` slots)."""
    counts = torch.bincount(topk_ids.reshape(-1).long(), minlength=num_experts).float()
    return (counts.max() / counts.mean()).item()


def ec_threshold_bias(
    router_logits: torch.Tensor,
    top_k: int,
    capacity_factor: float = 1.0,
    *,
    scoring_func: str = "softmax",
) -> torch.Tensor:
    """Minus each expert's expert-choice acceptance threshold on these logits.

    ``tau_e`` = the ``C``-th largest score of expert ``e`` over the ``T`` rows,
    ``C = min(T, ceil(cf * T * k / E))`` (the capacity expert choice would use). With
    ``b = -tau`` a token prefers the experts whose EC threshold it clears by the most.
    Returns ``[E]`` fp32.
    """
    _check(router_logits, top_k, None, scoring_func)
    if not (isinstance(capacity_factor, (int, float)) and math.isfinite(capacity_factor)
            and capacity_factor > 0):
        raise ValueError(
            f"threshold routing: capacity_factor must be a finite number > 0, got "
            f"{capacity_factor!r}"
        )
    t, e = router_logits.shape
    if t == 0:
        raise ValueError("threshold routing: calibration needs at least one row of logits")
    scores, _ = compute_scores(router_logits, scoring_func)
    cap = max(1, min(t, math.ceil(capacity_factor * t * top_k / e - 1e-9)))
    tau = torch.topk(scores, cap, dim=0, sorted=True).values[-1]
    return -tau


def update_bias(bias: torch.Tensor, topk_ids: torch.Tensor, num_experts: int,
                lr: float) -> torch.Tensor:
    """One auxiliary-loss-free balancing step (returns a new tensor).

    ``b_e += lr * clamp((mean - load_e) / mean, -1, 1)``: overloaded experts' biases go
    down, underloaded ones up, by at most ``lr``.
    """
    load = torch.bincount(topk_ids.reshape(-1).long(), minlength=num_experts).float()
    mean = load.mean().clamp_min(1e-9)
    return bias + lr * ((mean - load) / mean).clamp(-1.0, 1.0)


def calibrate_bias(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    iters: int = 300,
    lr: Optional[float] = None,
    final_lr_ratio: float = 0.01,
    init: str = "ec",
    capacity_factor: float = 1.0,
    scoring_func: str = "softmax",
    history: Optional[List[Dict[str, float]]] = None,
) -> torch.Tensor:
    """Per-expert selection bias that balances ``threshold_topk`` on calibration logits.

    Start: ``init="ec"`` -> :func:`ec_threshold_bias` (recorded expert-choice statistics),
    ``"zero"`` -> 0. Then ``iters`` :func:`update_bias` steps with a step size decaying
    geometrically from ``lr`` to ``lr * final_lr_ratio`` (default ``lr``: the mean gap
    between a token's k-th and (k+1)-th score, at least 1e-4). Returns the bias (``[E]``
    fp32, on the logits' device) whose routing had the lowest max/mean load. When
    ``history`` is a list, ``{"iter", "load_max_mean"}`` is appended per step.
    """
    _check(router_logits, top_k, None, scoring_func)
    if init not in ("ec", "zero"):
        raise ValueError(f"threshold routing: init must be 'ec' or 'zero', got {init!r}")
    if not isinstance(iters, int) or iters < 0:
        raise ValueError(f"threshold routing: iters must be an int >= 0, got {iters!r}")
    t, e = router_logits.shape
    if t == 0:
        raise ValueError("threshold routing: calibration needs at least one row of logits")
    logits = router_logits.float()
    scores, _ = compute_scores(logits, scoring_func)
    if lr is None:
        kk = min(top_k + 1, e)
        top = torch.topk(scores, kk, dim=-1).values
        gap = (top[:, top_k - 1] - top[:, kk - 1]).mean().item() if kk > top_k else 0.0
        lr = max(gap, 1e-4)
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"threshold routing: lr must be a finite number > 0, got {lr!r}")
    bias = (ec_threshold_bias(logits, top_k, capacity_factor, scoring_func=scoring_func)
            if init == "ec" else torch.zeros(e, device=logits.device))
    decay = final_lr_ratio ** (1.0 / max(iters - 1, 1))
    best, best_bias = float("inf"), bias
    step = lr
    for i in range(iters + 1):
        ids = torch.topk(scores + bias, top_k, dim=-1).indices
        mm = load_max_over_mean(ids, e)
        if history is not None:
            history.append({"iter": i, "load_max_mean": mm})
        if mm < best:
            best, best_bias = mm, bias
        if i == iters:
            break
        bias = update_bias(bias, ids, e, step)
        step *= decay
    return best_bias.float()
