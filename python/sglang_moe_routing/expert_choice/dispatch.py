"""Pick the fastest available expert-choice implementation for the input's device.

CUDA tensors: the CUDA C++ kernel (``sgl-kernel``) when it builds, else the Triton kernel,
else the reference. CPU tensors: the reference. ``backend`` forces one.
Placeholder until the fused kernels land: every backend resolves to the reference.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from sglang_moe_routing.expert_choice.reference import expert_choice_topk_reference

BACKENDS = ("auto", "cuda", "triton", "reference")


def expert_choice_topk(
    router_logits: torch.Tensor,
    top_k: int,
    capacity_factor: float = 1.25,
    *,
    renormalize: bool = True,
    scoring_func: str = "softmax",
    num_expert_group: Optional[int] = None,
    topk_group: Optional[int] = None,
    correction_bias: Optional[torch.Tensor] = None,
    routed_scaling_factor: Optional[float] = None,
    apply_routed_scaling_factor_on_output: bool = False,
    num_token_non_padded: Optional[Union[torch.Tensor, int]] = None,
    min_tokens: int = 0,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Expert-choice top-k; same arguments and output as ``expert_choice_topk_reference``."""
    if backend not in BACKENDS:
        raise ValueError(f"expert choice: backend must be one of {BACKENDS}, got {backend!r}")
    return expert_choice_topk_reference(
        router_logits, top_k, capacity_factor,
        renormalize=renormalize, scoring_func=scoring_func,
        num_expert_group=num_expert_group, topk_group=topk_group,
        correction_bias=correction_bias, routed_scaling_factor=routed_scaling_factor,
        apply_routed_scaling_factor_on_output=apply_routed_scaling_factor_on_output,
        num_token_non_padded=num_token_non_padded, min_tokens=min_tokens,
    )
