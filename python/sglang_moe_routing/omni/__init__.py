"""Omni (Cartesian-product) router: ``n * n`` experts chosen by two logit vectors.

Expert ``(i, j)`` of a token has id ``i * n + j`` and score ``x[i] + y[j]``; the router
keeps the ``top_k`` best and weights them by a softmax over the selected scores
(transformers' ``DogeCDMoE`` semantics). Exact candidate pruning makes the cost per token
``O(n + k^2)`` instead of ``O(n^2)``.

``dispatch.py`` is the face (``omni_router``); ``ops.py`` the custom op
``torch.ops.sglang_moe_routing.omni_router`` behind it; ``reference.py`` the contract.
Imports only torch and (optionally) triton.

>>> from sglang_moe_routing.omni import omni_router
>>> w, ids = omni_router(x, y, top_k=8)               # doctest: +SKIP
"""

from .dispatch import BACKENDS, omni_router, resolve_backend
from .ops import OmniRouterFunction
from .reference import (
    omni_router_backward_reference,
    omni_router_pruned_torch,
    omni_router_reference,
    validate_omni_inputs,
)

__all__ = [
    "BACKENDS",
    "OmniRouterFunction",
    "omni_router",
    "omni_router_backward_reference",
    "omni_router_pruned_torch",
    "omni_router_reference",
    "resolve_backend",
    "validate_omni_inputs",
]
