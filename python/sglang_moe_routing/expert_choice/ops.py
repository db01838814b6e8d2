"""Expert-choice routing as the ``torch.library`` custom op
``sglang_moe_routing::expert_choice_topk``.

``torch.compile`` treats the op as opaque: Dynamo does not trace the kernels' Python
wrappers (Triton launch code, the CUDA extension, the reference's ``torch.sort`` graph), it
records one call whose output shapes come from the fake implementation, and the real
implementation runs the backend function unchanged at run time. Use
:func:`sglang_moe_routing.expert_choice.expert_choice_topk` (``dispatch.py``), the public face:
it validates the arguments, resolves ``backend="auto"`` (environment, GPU availability,
kernel limits, the once-per-shape warning) outside the op and then calls it.

Schema (inferred from the Python signature below; all arguments positional, Python ``int``
becomes ``SymInt`` so symbolic sizes pass through ``torch.compile``)::

    sglang_moe_routing::expert_choice_topk(
        Tensor router_logits, SymInt top_k, float capacity_factor, bool renormalize,
        str scoring_func, SymInt? num_expert_group, SymInt? topk_group,
        Tensor? correction_bias, float? routed_scaling_factor,
        bool apply_routed_scaling_factor_on_output, Tensor? num_token_non_padded,
        SymInt? num_token_non_padded_int, SymInt min_tokens, str backend)
      -> (Tensor topk_weights, Tensor topk_ids)

* ``None`` for ``num_expert_group`` / ``topk_group`` / ``correction_bias`` /
  ``routed_scaling_factor`` is passed as ``None`` (optional schema types, no sentinels).
* ``num_token_non_padded`` (``T'``) is split in two optional arguments so that every backend
  sees exactly what it saw when called directly: a tensor (device or host, any integer
  dtype, 0-d or one element) goes in ``num_token_non_padded``, a Python int in
  ``num_token_non_padded_int``; at most one of them is set (both ``None`` = every row is
  valid). Turning an int into a tensor would change the kernels' path (device read instead
  of a host constant) and, on a GPU, need a host-to-device copy, which CUDA-graph capture
  rejects; under ``torch.compile`` a varying int is a SymInt (or a recompile), as any int.
* ``backend`` is already resolved: ``"cuda"`` | ``"triton"`` | ``"reference"``.

Returns ``(topk_weights float32 [T, k], topk_ids int32 [T, k])`` on the logits' device, as
``expert_choice_topk_reference`` does for every input dtype. The op has no autograd formula
(the kernels' outputs are not differentiable); the face calls the backend directly, as
before, when a gradient is wanted (see ``dispatch.expert_choice_topk``).
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from sglang_moe_routing.expert_choice.reference import expert_choice_topk_reference

OP_NAME = "sglang_moe_routing::expert_choice_topk"
RESOLVED_BACKENDS = ("cuda", "triton", "reference")

__all__ = ["OP_NAME", "RESOLVED_BACKENDS", "expert_choice_topk_impl", "expert_choice_topk_op",
           "op_arguments"]


def expert_choice_topk_impl(
    router_logits: torch.Tensor,
    top_k: int,
    capacity_factor: float,
    renormalize: bool,
    scoring_func: str,
    num_expert_group: Optional[int],
    topk_group: Optional[int],
    correction_bias: Optional[torch.Tensor],
    routed_scaling_factor: Optional[float],
    apply_routed_scaling_factor_on_output: bool,
    num_token_non_padded: Optional[torch.Tensor],
    num_token_non_padded_int: Optional[int],
    min_tokens: int,
    backend: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The op's real implementation: call the resolved backend's function, unchanged. Also
    called directly (not through the op) when autograd must record the computation."""
    kwargs = dict(
        renormalize=renormalize, scoring_func=scoring_func,
        num_expert_group=num_expert_group, topk_group=topk_group,
        correction_bias=correction_bias, routed_scaling_factor=routed_scaling_factor,
        apply_routed_scaling_factor_on_output=apply_routed_scaling_factor_on_output,
        num_token_non_padded=(num_token_non_padded if num_token_non_padded is not None
                              else num_token_non_padded_int),
        min_tokens=min_tokens,
    )
    if backend == "cuda":
        from sglang_moe_routing.expert_choice.cuda import expert_choice_topk_cuda

        return expert_choice_topk_cuda(router_logits, top_k, capacity_factor, **kwargs)
    if backend == "triton":
        from sglang_moe_routing.expert_choice.triton_kernel import expert_choice_topk_triton

        return expert_choice_topk_triton(router_logits, top_k, capacity_factor, **kwargs)
    if backend == "reference":
        return expert_choice_topk_reference(router_logits, top_k, capacity_factor, **kwargs)
    raise ValueError(
        f"expert choice op: backend must be one of {RESOLVED_BACKENDS} (resolved), got {backend!r}"
    )


expert_choice_topk_op = torch.library.custom_op(OP_NAME, mutates_args=())(expert_choice_topk_impl)


def op_arguments(
    router_logits: torch.Tensor,
    top_k: int,
    capacity_factor: float,
    backend: str,
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
) -> tuple:
    """The op's positional arguments for ``expert_choice_topk``'s keyword arguments: an int
    ``num_token_non_padded`` travels as ``num_token_non_padded_int``, a tensor as
    ``num_token_non_padded``; Python scalars are normalised to the schema's types."""
    if num_token_non_padded is None or isinstance(num_token_non_padded, torch.Tensor):
        ntnp_tensor, ntnp_int = num_token_non_padded, None
    elif isinstance(num_token_non_padded, torch.SymInt) or type(num_token_non_padded) is int:
        ntnp_tensor, ntnp_int = None, num_token_non_padded  # a SymInt stays symbolic
    else:
        ntnp_tensor, ntnp_int = None, int(num_token_non_padded)  # numpy ints, bools
    return (
        router_logits,
        int(top_k),
        float(capacity_factor),
        bool(renormalize),
        scoring_func,
        None if num_expert_group is None else int(num_expert_group),
        None if topk_group is None else int(topk_group),
        correction_bias,
        None if routed_scaling_factor is None else float(routed_scaling_factor),
        bool(apply_routed_scaling_factor_on_output),
        ntnp_tensor,
        ntnp_int,
        int(min_tokens),
        backend,
    )


@expert_choice_topk_op.register_fake
def _expert_choice_topk_fake(
    router_logits, top_k, capacity_factor, renormalize, scoring_func, num_expert_group,
    topk_group, correction_bias, routed_scaling_factor, apply_routed_scaling_factor_on_output,
    num_token_non_padded, num_token_non_padded_int, min_tokens, backend,
):
    num_tokens = router_logits.shape[0]
    weights = router_logits.new_empty((num_tokens, top_k), dtype=torch.float32)
    ids = router_logits.new_empty((num_tokens, top_k), dtype=torch.int32)
    return weights, ids
