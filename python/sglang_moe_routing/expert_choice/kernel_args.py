"""What the CUDA and Triton wrappers share: the kernels' limits, their argument checks and
the preparation of their inputs from a ``RoutingSpec`` (torch only; neither loads a kernel).

``dispatch.py`` uses the limits to send out-of-range shapes to the reference.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import torch

from sglang_moe_routing.expert_choice.spec import RoutingSpec, validate_inputs

MAX_EXPERTS = 512
MAX_TOP_K = 32

__all__ = ["MAX_EXPERTS", "MAX_TOP_K", "KernelInputs", "check_kernel_args", "kernel_inputs",
           "prepare_num_valid"]


class KernelInputs(NamedTuple):
    """A spec and its logits in the form both kernels take."""

    logits: torch.Tensor  # fp32 / fp16 / bf16 (other floats go to fp32)
    bias: Optional[torch.Tensor]  # contiguous fp32 on the logits' device
    scale: float  # routed scaling factor (1.0 when there is none)
    apply_scale: bool
    scoring: int  # 0 = softmax, 1 = sigmoid
    num_groups: int  # 0 without grouped top-k
    topk_group: int


def kernel_inputs(router_logits: torch.Tensor, spec: RoutingSpec) -> KernelInputs:
    """Logits in a kernel dtype, the bias as contiguous fp32 on the logits' device, the
    output scale with whether to apply it, and the scoring and group settings as ints."""
    logits = router_logits
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        logits = logits.float()
    bias = None
    if spec.correction_bias is not None:
        bias = spec.correction_bias.to(device=logits.device, dtype=torch.float32).contiguous()
    rsf = spec.routed_scaling_factor
    return KernelInputs(
        logits, bias,
        float(rsf) if rsf is not None else 1.0,
        spec.output_scale() is not None,
        0 if spec.scoring_func == "softmax" else 1,
        int(spec.num_expert_group or 0),
        int(spec.topk_group or 0),
    )


def prepare_num_valid(
    num_token_non_padded: Optional[Union[torch.Tensor, int]], num_tokens: int, device: torch.device
) -> Tuple[Optional[torch.Tensor], int]:
    """``T'`` as (device scalar tensor or None, host int used when the tensor is None)."""
    if num_token_non_padded is None:
        return None, num_tokens
    if isinstance(num_token_non_padded, torch.Tensor):
        if num_token_non_padded.numel() != 1:
            raise ValueError(
                "expert choice: num_token_non_padded must hold one value, got shape "
                f"{tuple(num_token_non_padded.shape)}"
            )
        if num_token_non_padded.is_floating_point() or num_token_non_padded.is_complex():
            raise ValueError(
                "expert choice: num_token_non_padded must be an integer tensor, got "
                f"{num_token_non_padded.dtype}"
            )
        if num_token_non_padded.device.type == "cpu":
            # A host value: reading it does not touch the GPU.
            return None, max(0, min(int(num_token_non_padded.reshape(())), num_tokens))
        if num_token_non_padded.device != device:
            raise ValueError(
                "expert choice: num_token_non_padded is on "
                f"{num_token_non_padded.device}, logits on {device}"
            )
        n = num_token_non_padded.reshape(1)
        if n.dtype not in (torch.int32, torch.int64):
            n = n.to(torch.int64)
        return n, num_tokens
    return None, max(0, min(int(num_token_non_padded), num_tokens))


def check_kernel_args(router_logits: torch.Tensor, spec: RoutingSpec, *,
                      token_choice: bool = False) -> None:
    """The reference's checks plus the kernels' limits (``E <= 512``, ``k <= 32``,
    ``T * E < 2**31``)."""
    validate_inputs(router_logits, spec, token_choice=token_choice)
    num_tokens, num_experts = router_logits.shape
    if num_experts > MAX_EXPERTS:
        raise ValueError(
            f"expert choice kernels support E <= {MAX_EXPERTS}, got E={num_experts}; "
            "use backend='reference'"
        )
    if spec.top_k > MAX_TOP_K:
        raise ValueError(
            f"expert choice kernels support top_k <= {MAX_TOP_K}, got {spec.top_k}; "
            "use backend='reference'"
        )
    if num_tokens >= 2**31 // max(num_experts, 1):
        raise ValueError(f"expert choice kernels need T * E < 2**31, got T={num_tokens}")
