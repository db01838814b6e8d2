"""Random-weight MoE checkpoints for server tests and benchmarks (built with transformers).

``build(kind, path, **overrides)`` writes a Hugging Face checkpoint (config + safetensors, no
tokenizer: serve it with ``--skip-tokenizer-init``) and returns its config as a dict.

Kinds:
* ``qwen3_moe``: Qwen3-MoE (softmax top-k, no shared expert). ``size="small"`` is tiny
  (8 experts, top-2; seconds on a CPU), ``"medium"`` has 4 layers of 64 experts, top-8 (the
  GPU server tests), ``"big"`` is the 0.69 B-parameter model of the GPU recipe (8 layers); ``"a3b"`` is 4 layers
  of Qwen3-30B-A3B's shapes (128 experts of 768, top-8, hidden 2048; 2.6 B parameters, 5 GB).
* ``deepseek_v3``: DeepSeek-V3 layout at small scale: MLA attention, sigmoid scoring, grouped
  top-k (``n_group``/``topk_group``), ``e_score_correction_bias`` (randomised, so it matters),
  one shared expert, ``routed_scaling_factor``, the first layer dense.
* ``doge``: Doge with CDMoE (``num_experts = n * n`` product-key experts).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

import torch

QWEN3_SIZES: Dict[str, Dict[str, Any]] = {
    "small": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  num_hidden_layers=2, num_experts=8, num_experts_per_tok=2,
                  vocab_size=256, max_position_embeddings=512),
    "medium": dict(hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                   num_hidden_layers=4, num_experts=64, num_experts_per_tok=8,
                   vocab_size=8192, max_position_embeddings=4096),
    "big": dict(hidden_size=1024, intermediate_size=2048, moe_intermediate_size=384,
                num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                num_hidden_layers=8, num_experts=64, num_experts_per_tok=8,
                vocab_size=32000, max_position_embeddings=4096),
    # 4 layers with Qwen3-30B-A3B's own layer shapes: decode steps are GPU-bound (a B = 128
    # step reads ~1.2 GB of expert weights per layer), so host jitter stops dominating
    "a3b": dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                num_hidden_layers=4, num_experts=128, num_experts_per_tok=8,
                vocab_size=32000, max_position_embeddings=4096),
}

DEEPSEEK_V3: Dict[str, Any] = dict(
    vocab_size=4096, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
    num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4,
    num_key_value_heads=4, n_shared_experts=1, n_routed_experts=32, num_experts_per_tok=4,
    n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
    # MLA with DeepSeek's own head sizes (SGLang's MLA kernels are built for them)
    q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128, max_position_embeddings=2048, moe_layer_freq=1,
    # read by SGLang's deepseek_v2.py; transformers 5's DeepseekV3Config no longer sets them
    topk_method="noaux_tc", scoring_func="sigmoid",
    # YaRN as the real checkpoints (SGLang's CPU RoPE path requires a scaling config)
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                     "original_max_position_embeddings": 512, "beta_fast": 32, "beta_slow": 1,
                     "mscale": 1.0, "mscale_all_dim": 1.0},
)

DOGE: Dict[str, Any] = dict(
    vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=4, is_moe=True, num_experts=64 * 64,
    num_experts_per_tok=8, max_position_embeddings=2048, keep_window_size=2048,
    tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
)


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _save(model: torch.nn.Module, path: str, dtype: torch.dtype) -> Dict[str, Any]:
    model.to(dtype).save_pretrained(path)
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def qwen3_moe_model(size: str = "small", dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                    device: Optional[str] = None, **overrides) -> torch.nn.Module:
    """The random-weight ``Qwen3MoeForCausalLM`` that :func:`qwen3_moe` saves, in memory (built
    on ``device``, default the GPU when there is one: the weights depend on its generator)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    if size not in QWEN3_SIZES:
        raise ValueError(f"qwen3_moe size must be one of {list(QWEN3_SIZES)}, got {size!r}")
    kw = {**QWEN3_SIZES[size], **overrides}
    torch.manual_seed(seed)
    with torch.device(device or _device()):
        return Qwen3MoeForCausalLM(Qwen3MoeConfig(**kw, torch_dtype=str(dtype).split(".")[-1]))


def qwen3_moe(path: str, size: str = "small", dtype: torch.dtype = torch.bfloat16,
              seed: int = 0, **overrides) -> Dict[str, Any]:
    return _save(qwen3_moe_model(size, dtype, seed, **overrides), path, dtype)


def hot_expert_bias(num_layers: int, num_experts: int, fraction: float, bias: float,
                    seed: int) -> torch.Tensor:
    """[num_layers, num_experts] addend of ``e_score_correction_bias``: ``bias`` on a seeded
    random ``fraction`` of each layer's experts (those are chosen more often: a skewed load)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"hot_fraction must be in [0, 1], got {fraction!r}")
    out = torch.zeros(num_layers, num_experts)
    k = int(round(fraction * num_experts))
    for layer in range(num_layers):
        g = torch.Generator().manual_seed(seed * 7919 + layer)
        out[layer, torch.randperm(num_experts, generator=g)[:k]] = bias
    return out


def deepseek_v3(path: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                hot_fraction: float = 0.0, hot_bias: float = 0.0, **overrides) -> Dict[str, Any]:
    """``hot_fraction``/``hot_bias``: add ``hot_bias`` to the correction bias of a seeded subset
    of each MoE layer's experts (:func:`hot_expert_bias`), which makes them hot."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    kw = {**DEEPSEEK_V3, **overrides}
    torch.manual_seed(seed)
    cfg = DeepseekV3Config(**kw, torch_dtype=str(dtype).split(".")[-1])
    with torch.device(_device()):
        model = DeepseekV3ForCausalLM(cfg)
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("e_score_correction_bias"):  # zeros at init: make the bias matter
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif name.endswith("gate.weight") and p.dim() == 2 and p.shape[0] == kw["n_routed_experts"]:
                p.mul_(10.0)  # spread the router scores
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.05 * torch.randn(b.shape, generator=g))
    if hot_bias and hot_fraction:
        hot = hot_expert_bias(kw["num_hidden_layers"], kw["n_routed_experts"], hot_fraction, hot_bias, seed)
        with torch.no_grad():
            for name, t in list(model.named_parameters()) + list(model.named_buffers()):
                if name.endswith("e_score_correction_bias"):
                    layer = int(name.split("layers.")[1].split(".")[0])
                    t.add_(hot[layer].to(t.device, t.dtype))
    return _save(model, path, dtype)


def doge(path: str, n: int = 64, top_k: int = 8, dtype: torch.dtype = torch.bfloat16,
         seed: int = 0, **overrides) -> Dict[str, Any]:
    from transformers import DogeConfig, DogeForCausalLM

    kw = {**DOGE, "num_experts": n * n, "num_experts_per_tok": top_k, **overrides}
    kw.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(seed)
    with torch.device(_device()):
        model = DogeForCausalLM(DogeConfig(**kw))
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".A"):  # zero at init: the dynamic mask would be constant
                p.copy_(torch.randn(p.shape, generator=g).to(p.device))
    return _save(model, path, dtype)


BUILDERS = {"qwen3_moe": qwen3_moe, "deepseek_v3": deepseek_v3, "doge": doge}


def build(kind: str, path: str, **kwargs) -> Dict[str, Any]:
    """Write a random-weight checkpoint of ``kind`` to ``path`` (skipped if one is there)."""
    if kind not in BUILDERS:
        raise ValueError(f"model kind must be one of {list(BUILDERS)}, got {kind!r}")
    cfg_path = os.path.join(path, "config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            return json.load(f)
    return BUILDERS[kind](path, **kwargs)
