"""sglang-moe-routing: MoE routing features for SGLang.

Core subpackages (``expert_choice``, ``omni``, ``eplb``) import only torch, triton and
numpy. Three places import sglang: ``integration`` (flags and hooks, loaded by SGLang's
plugin framework through the ``sglang.srt.plugins`` entry point ``moe_routing``), ``models``
(SGLang model files) and ``demo``.
"""

__version__ = "0.1.0"
