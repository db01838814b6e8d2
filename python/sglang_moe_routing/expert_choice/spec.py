"""``RoutingSpec``: what one routing call needs besides the logits, in one frozen record.

Every implementation (``reference.py``, ``triton_kernel.py``, ``cuda.py``) and the dispatch
(``dispatch.py``, ``ops.py``) take a ``RoutingSpec`` instead of a long keyword list. In SGLang
it is built once per ``select_experts`` call from the layer's ``TopKConfig`` plus the plugin's
settings (``integration/expert_choice_hooks.py:routing_spec``); the keyword face
``expert_choice_topk(...)`` builds it from its keywords.

Per-batch data is not part of the spec: the logits and the valid-row count
``num_token_non_padded`` (a tensor that changes between CUDA-graph replays) are call
arguments, as is the backend choice.

``check_spec`` and ``validate_inputs`` raise one-line ``ValueError``s naming the bad field;
the kernels' own limits are in ``kernel_args.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

SCORING_FUNCS = ("softmax", "sigmoid")

__all__ = ["RoutingSpec", "SCORING_FUNCS", "check_spec", "validate_inputs"]


@dataclass(frozen=True, eq=False)
class RoutingSpec:
    """The routing of one MoE layer (field order = the op schema's order, ``ops.py``).

    Attributes:
        top_k: experts per token ``k``.
        capacity_factor: ``cf > 0``; capacity ``C = min(T', ceil(cf * T' * k / E))``.
        renormalize: divide the ``k`` weights by their sum.
        scoring_func: ``"softmax"`` or ``"sigmoid"``.
        num_expert_group, topk_group: grouped top-k (both or neither).
        correction_bias: ``[E]``, added to the scores for selection only.
        routed_scaling_factor: output scale, applied when
            ``apply_routed_scaling_factor_on_output`` (as upstream SGLang).
        min_tokens: hybrid threshold; ``T' < min_tokens`` routes exactly as token choice.

    ``eq=False``: a tensor field has no boolean equality; specs compare by identity.
    """

    top_k: int
    capacity_factor: float = 1.25
    renormalize: bool = True
    scoring_func: str = "softmax"
    num_expert_group: Optional[int] = None
    topk_group: Optional[int] = None
    correction_bias: Optional[torch.Tensor] = None
    routed_scaling_factor: Optional[float] = None
    apply_routed_scaling_factor_on_output: bool = False
    min_tokens: int = 0

    def capacity_ratio(self, num_experts: int) -> float:
        """``cf * k / E`` in double precision, the same arithmetic in every implementation."""
        return self.capacity_factor * self.top_k / num_experts

    def output_scale(self) -> Optional[float]:
        """The factor the weights are multiplied by, or ``None`` when they are not scaled."""
        if self.apply_routed_scaling_factor_on_output and self.routed_scaling_factor is not None:
            return self.routed_scaling_factor
        return None


def check_spec(spec: RoutingSpec, num_experts: int, *, token_choice: bool = False,
               check_capacity_factor: bool = True) -> None:
    """Raise ``ValueError`` for a spec no routing of ``num_experts`` experts can honour.

    ``token_choice=True`` skips the fields token choice does not use (capacity factor, min
    tokens); ``check_capacity_factor=False`` skips the capacity factor alone (while
    ``torch.compile`` traces it may be a SymFloat; the op checks it again at run time).
    """
    top_k = spec.top_k
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"expert choice: top_k must be a positive int, got {top_k!r}")
    if top_k > num_experts:
        raise ValueError(
            f"expert choice: top_k={top_k} exceeds the number of experts E={num_experts}"
        )
    if not token_choice and check_capacity_factor:
        cf = spec.capacity_factor
        if not isinstance(cf, (int, float)) or not math.isfinite(cf):
            raise ValueError(
                f"expert choice: capacity_factor must be a finite number, got {cf!r}"
            )
        if cf <= 0:
            raise ValueError(f"expert choice: capacity_factor must be > 0, got {cf}")
    if not token_choice and (not isinstance(spec.min_tokens, int) or spec.min_tokens < 0):
        raise ValueError(
            f"expert choice: min_tokens must be an int >= 0, got {spec.min_tokens!r}"
        )
    if spec.scoring_func not in SCORING_FUNCS:
        raise ValueError(
            f"expert choice: scoring_func must be one of {SCORING_FUNCS}, "
            f"got {spec.scoring_func!r}"
        )
    ng, tg = spec.num_expert_group, spec.topk_group
    if (ng is None) != (tg is None):
        raise ValueError(
            "expert choice: num_expert_group and topk_group must be given together"
        )
    if ng is not None:
        if ng < 1 or num_experts % ng != 0:
            raise ValueError(
                f"expert choice: E={num_experts} is not divisible into "
                f"num_expert_group={ng} groups"
            )
        if not 1 <= tg <= ng:
            raise ValueError(f"expert choice: topk_group={tg} must be in [1, {ng}]")
        if top_k > tg * (num_experts // ng):
            raise ValueError(
                f"expert choice: top_k={top_k} exceeds the experts in topk_group={tg} "
                f"groups of {num_experts // ng}"
            )


def validate_inputs(router_logits: torch.Tensor, spec: RoutingSpec, *, token_choice: bool = False,
                    check_capacity_factor: bool = True) -> None:
    """Tensor and spec checks every implementation shares (keywords as in ``check_spec``)."""
    if router_logits.dim() != 2:
        raise ValueError(
            f"expert choice: router_logits must be [T, E], got shape {tuple(router_logits.shape)}"
        )
    if not router_logits.is_floating_point():
        raise ValueError(
            f"expert choice: router_logits must be floating point, got {router_logits.dtype}"
        )
    num_experts = router_logits.shape[1]
    check_spec(spec, num_experts, token_choice=token_choice,
               check_capacity_factor=check_capacity_factor)
    bias = spec.correction_bias
    if bias is not None and bias.shape != (num_experts,):
        raise ValueError(
            f"expert choice: correction_bias must have shape [{num_experts}], "
            f"got {tuple(bias.shape)}"
        )
