"""Expert-choice routing: experts pick their top-capacity tokens.

``spec.py`` holds ``RoutingSpec``, what a call needs besides the logits. ``reference.py`` is
the contract (plain PyTorch, CPU path). ``expert_choice_route(logits, spec, ...)`` and its
keyword face ``expert_choice_topk(logits, k, ...)`` dispatch to the fastest available
implementation (CUDA C++ > Triton > reference) for the input's device, through the
``torch.library`` custom op ``torch.ops.sglang_moe_routing.expert_choice_topk`` (``ops.py``;
opaque to ``torch.compile``, ``fullgraph=True`` works).
"""

from sglang_moe_routing.expert_choice.spec import RoutingSpec
from sglang_moe_routing.expert_choice.reference import (
    expert_choice_topk_reference,
    token_choice_topk_reference,
)
from sglang_moe_routing.expert_choice.stats import ExpertLoadStats, expert_load, routing_fidelity
from sglang_moe_routing.expert_choice.dispatch import expert_choice_route, expert_choice_topk
from sglang_moe_routing.expert_choice.ops import expert_choice_topk_op

__all__ = [
    "RoutingSpec",
    "expert_choice_route",
    "expert_choice_topk",
    "expert_choice_topk_op",
    "expert_choice_topk_reference",
    "token_choice_topk_reference",
    "ExpertLoadStats",
    "expert_load",
    "routing_fidelity",
]
