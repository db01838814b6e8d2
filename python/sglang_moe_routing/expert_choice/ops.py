"""Expert-choice routing as the ``torch.library`` custom op
``sglang_moe_routing::expert_choice_topk`` (the same pattern as ``omni/ops.py``).

``torch.compile`` treats the op as opaque: Dynamo does not trace the kernels' Python
wrappers (Triton launch code, the CUDA extension, the reference's ``torch.sort`` graph), it
records one call whose output shapes come from the fake implementation, and the real
implementation runs the backend function unchanged at run time. Use the faces in
``dispatch.py`` (``expert_choice_route(logits, spec, ...)``, ``expert_choice_topk(logits, k,
...)``): they validate the arguments and resolve ``backend="auto"`` (environment, GPU
availability, kernel limits, the once-per-shape warning) outside the op, then call it.

An op's arguments are tensors and scalars, not a dataclass: :func:`op_arguments` flattens a
``RoutingSpec`` (its fields in order, Python ``int`` as ``SymInt`` so symbolic sizes pass
through ``torch.compile``) and :func:`expert_choice_topk_impl` rebuilds it. Schema::

    sglang_moe_routing::expert_choice_topk(
        Tensor router_logits,
        <the RoutingSpec fields: SymInt top_k, float capacity_factor, bool renormalize,
         str scoring_func, SymInt? num_expert_group, SymInt? topk_group,
         Tensor? correction_bias, float? routed_scaling_factor,
         bool apply_routed_scaling_factor_on_output, SymInt min_tokens>,
        Tensor? num_token_non_padded, SymInt? num_token_non_padded_int, str backend)
      -> (Tensor topk_weights, Tensor topk_ids)

* ``num_token_non_padded`` (``T'``) is split in two optional arguments so that every backend
  sees exactly what it saw when called directly: a tensor (device or host, any integer
  dtype, 0-d or one element) goes in ``num_token_non_padded``, a Python int in
  ``num_token_non_padded_int``; at most one of them is set (both ``None`` = every row is
  valid). Turning an int into a tensor would change the kernels' path (device read instead
  of a host constant) and, on a GPU, need a host-to-device copy, which CUDA-graph capture
  rejects; under ``torch.compile`` a varying int is a SymInt (or a recompile), as any int.
* ``backend`` is already resolved: one of :data:`RESOLVED_BACKENDS`.

Returns ``(topk_weights float32 [T, k], topk_ids int32 [T, k])`` on the logits' device, as
``expert_choice_topk_reference`` does for every input dtype. No backend has a backward
kernel, so the op has no autograd formula; the faces call :func:`expert_choice_topk_impl`
directly when autograd must record (the reference's weights are differentiable).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Tuple, Union

import torch

from sglang_moe_routing.expert_choice.reference import expert_choice_topk_reference
from sglang_moe_routing.expert_choice.spec import RoutingSpec

OP_NAME = "sglang_moe_routing::expert_choice_topk"
RESOLVED_BACKENDS = ("cuda", "triton", "reference")
SCHEMA = (
    "(Tensor router_logits, SymInt top_k, float capacity_factor, bool renormalize, "
    "str scoring_func, SymInt? num_expert_group, SymInt? topk_group, Tensor? correction_bias, "
    "float? routed_scaling_factor, bool apply_routed_scaling_factor_on_output, "
    "SymInt min_tokens, Tensor? num_token_non_padded, SymInt? num_token_non_padded_int, "
    "str backend) -> (Tensor, Tensor)"
)
_NUM_SPEC_FIELDS = len(dataclasses.fields(RoutingSpec))

__all__ = ["OP_NAME", "RESOLVED_BACKENDS", "SCHEMA", "backend_function",
           "expert_choice_topk_impl", "expert_choice_topk_op", "op_arguments"]


def backend_function(backend: str) -> Callable[..., Tuple[torch.Tensor, torch.Tensor]]:
    """``fn(router_logits, spec, num_token_non_padded)`` of a resolved backend (the CUDA and
    Triton modules are imported on first use)."""
    if backend == "cuda":
        from sglang_moe_routing.expert_choice.cuda import expert_choice_topk_cuda

        return expert_choice_topk_cuda
    if backend == "triton":
        from sglang_moe_routing.expert_choice.triton_kernel import expert_choice_topk_triton

        return expert_choice_topk_triton
    if backend == "reference":
        return expert_choice_topk_reference
    raise ValueError(
        f"expert choice op: backend must be one of {RESOLVED_BACKENDS} (resolved), got {backend!r}"
    )


def expert_choice_topk_impl(router_logits: torch.Tensor, *args) -> Tuple[torch.Tensor, torch.Tensor]:
    """The op's real implementation (arguments as in :data:`SCHEMA`): rebuild the spec and
    call the resolved backend's function, unchanged. Also called directly (not through the
    op) when autograd must record the computation."""
    spec = RoutingSpec(*args[:_NUM_SPEC_FIELDS])
    ntnp_tensor, ntnp_int, backend = args[_NUM_SPEC_FIELDS:]
    ntnp = ntnp_tensor if ntnp_tensor is not None else ntnp_int
    return backend_function(backend)(router_logits, spec, ntnp)


expert_choice_topk_op = torch.library.custom_op(
    OP_NAME, expert_choice_topk_impl, mutates_args=(), schema=SCHEMA)


@expert_choice_topk_op.register_fake
def _expert_choice_topk_fake(router_logits, top_k, *_):
    num_tokens = router_logits.shape[0]
    weights = router_logits.new_empty((num_tokens, top_k), dtype=torch.float32)
    ids = router_logits.new_empty((num_tokens, top_k), dtype=torch.int32)
    return weights, ids


def _optional(cast, value):
    return None if value is None else cast(value)


def op_arguments(
    router_logits: torch.Tensor,
    spec: RoutingSpec,
    num_token_non_padded: Optional[Union[torch.Tensor, int]],
    backend: str,
) -> tuple:
    """The op's positional arguments: the spec's fields normalised to the schema's types,
    then ``num_token_non_padded`` as a tensor or an int (see the module docstring)."""
    if num_token_non_padded is None or isinstance(num_token_non_padded, torch.Tensor):
        ntnp_tensor, ntnp_int = num_token_non_padded, None
    elif isinstance(num_token_non_padded, torch.SymInt) or type(num_token_non_padded) is int:
        ntnp_tensor, ntnp_int = None, num_token_non_padded  # a SymInt stays symbolic
    else:
        ntnp_tensor, ntnp_int = None, int(num_token_non_padded)  # numpy ints, bools
    return (
        router_logits,
        int(spec.top_k),
        float(spec.capacity_factor),
        bool(spec.renormalize),
        spec.scoring_func,
        _optional(int, spec.num_expert_group),
        _optional(int, spec.topk_group),
        spec.correction_bias,
        _optional(float, spec.routed_scaling_factor),
        bool(spec.apply_routed_scaling_factor_on_output),
        int(spec.min_tokens),
        ntnp_tensor,
        ntnp_int,
        backend,
    )
