"""sglang-moe-routing: MoE routing features for SGLang.

Core subpackages (``expert_choice``, ``omni``, ``eplb``) import only torch, triton and
numpy. Only ``integration`` imports sglang; it is loaded by SGLang's plugin framework
through the ``sglang.srt.plugins`` entry point ``moe_routing``.
"""

__version__ = "0.1.0"
