"""Inference-only Doge (``DogeForCausalLM``) for SGLang, routed with the Omni router.

Doge (transformers' ``models/doge``) differs from a Llama-style decoder in three places:

* **Dynamic mask attention (DMA)**, in ``doge_attention.py``. Every key position ``j`` of
  kv-head ``g`` carries an additive score bias ``b[j, g] = exp(A[g] * softplus(dt_proj(v_j)))``
  computed from the key's own value vector (all kv-heads flattened). When the key length exceeds
  ``keep_window_size``, each query keeps only the ``keep_window_size`` visible keys with the
  largest bias. Causal (and optional sliding-window) masking applies as usual.
* **CDMoE.** A dense shared MLP plus ``num_experts = n * n`` rank-one "retrieval" experts:
  ``router_gate`` gives two logit vectors ``x, y: [T, n]`` per token, expert ``(i, j)`` (id
  ``i * n + j``) scores ``x_i + y_j``, the top ``k`` are softmaxed, and expert ``e`` adds
  ``w_e * act(down_embed[e] . h) * up_embed[e]``. Routing uses
  ``sglang_moe_routing.omni.omni_router`` (no ``n * n`` materialisation), backend from
  ``--omni-router-backend``.
* **Scaled residuals.** ``h = input_residual * h + attn(norm(h))`` and
  ``h = post_attention_residual * h + mlp(norm(h))`` with learned per-channel scales.

Differences from transformers (see docs, section "Model integration (Doge)"):

* transformers' ``DogeCDMoE`` splits the router logits with
  ``router_gate(h).view(2, bsz * seq_len, n)``, a reshape of the whole ``[T, 2n]`` buffer:
  for ``T > 1`` token ``t``'s ``x`` comes from token ``t // 2`` and its ``y`` from token
  ``(T + t) // 2`` (other tokens, later ones and other sequences of the batch included). It
  equals the per-token split ``x = logits[:, :n], y = logits[:, n:]`` only when
  ``bsz * seq_len == 1`` (every cached decoding step with batch size 1). This model always
  routes per token with that split, so a token's output never depends on its batch.
* The ``keep_window_size`` test uses each request's own key length, where transformers
  uses the padded key length of the whole batch.

Attention (``doge_attention.py``) runs in SGLang's own batched, paged ``RadixAttention``
with the dynamic-mask bias folded into the dot product (``q' = [q, 1]``, ``k' = [k, b /
scaling]``; exact while no request is longer than ``keep_window_size``), so it runs inside
CUDA graphs. It needs the plugin (its model-config hook widens the key cache rows) and
``--attention-backend triton`` (GPU) or ``torch_native`` (CPU). Only when the server's
context length exceeds ``keep_window_size`` can a batch need transformers' top-k window; such
batches run per request in PyTorch, and such servers need ``--disable-cuda-graph`` (a capture
attempt fails with a clear error) or ``--context-length <= keep_window_size``. Supported:
tensor parallel size 1, pipeline parallel size 1, extend / mixed / decode / idle batches.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Dict, Iterable, Optional, Sequence, Set, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from sglang.srt.layers.linear import (
    MergedColumnParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from sglang.srt.layers.layernorm import RMSNorm
from sglang.srt.layers.logits_processor import LogitsProcessor
from sglang.srt.layers.quantization.base_config import QuantizationConfig
from sglang.srt.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from sglang.srt.model_executor.forward_batch_info import ForwardBatch
from sglang.srt.model_loader.weight_utils import default_weight_loader
from sglang.srt.utils import add_prefix

from sglang_moe_routing.integration import config as plugin_config
from sglang_moe_routing.models.doge_attention import DogeAttention, check_single_rank

logger = logging.getLogger("sglang_moe_routing")

OMNI_SECTION = "omni"
DEFAULT_BACKEND = "auto"


_ACTIVATIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
    "gelu_new": lambda t: F.gelu(t, approximate="tanh"),
    "gelu_pytorch_tanh": lambda t: F.gelu(t, approximate="tanh"),
}


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"Doge: unsupported hidden_act {name!r}; supported: {sorted(_ACTIVATIONS)}"
        ) from None


def omni_backend() -> str:
    """The Omni router backend chosen by ``--omni-router-backend`` (``auto`` by default)."""
    section = plugin_config.get_section(OMNI_SECTION)
    return getattr(section, "backend", DEFAULT_BACKEND) if section is not None else DEFAULT_BACKEND


def resolved_backend(weight: torch.Tensor, num_keys: int, top_k: int, backend: str) -> str:
    """The backend ``omni_router`` will run for router logits of ``weight``'s dtype and device
    (``auto`` resolved), or ``"<backend> (cannot run: <reason>)"``."""
    from sglang_moe_routing.omni import resolve_backend

    probe = torch.empty((0, num_keys), dtype=weight.dtype, device=weight.device)
    try:
        return resolve_backend(probe, top_k, backend)
    except ValueError as exc:
        return f"{backend} (cannot run: {exc})"


# ----------------------------------------------------------------------------- MLP / CDMoE


class DogeMLP(nn.Module):
    """Gated MLP ``down(act(gate(h)) * up(h))``; also CDMoE's shared expert."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        hidden_act: str,
        bias: bool = False,
        quant_config: Optional[QuantizationConfig] = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size,
            [intermediate_size] * 2,
            bias=bias,
            quant_config=quant_config,
            prefix=add_prefix("gate_up_proj", prefix),
        )
        self.down_proj = RowParallelLinear(
            intermediate_size,
            hidden_size,
            bias=bias,
            quant_config=quant_config,
            prefix=add_prefix("down_proj", prefix),
        )
        self.act_fn = _activation(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        gate, up = gate_up.chunk(2, dim=-1)
        out, _ = self.down_proj(self.act_fn(gate) * up)
        return out


class DogeCDMoE(DogeMLP):
    """Cross-domain MoE: shared gated MLP + ``n * n`` rank-one experts routed by Omni.

    Checkpoint names: shared expert ``gate_proj``/``up_proj`` (stacked into
    ``gate_up_proj``) and ``down_proj`` (inherited from :class:`DogeMLP`), ``router_gate`` (``[2n, hidden]``: rows ``0..n-1`` give ``x``, rows
    ``n..2n-1`` give ``y``), ``down_embed`` and ``up_embed`` (``[num_experts, hidden]``).
    """

    def __init__(
        self,
        config,
        quant_config: Optional[QuantizationConfig] = None,
        prefix: str = "",
    ) -> None:
        super().__init__(
            config.hidden_size,
            config.intermediate_size,
            config.hidden_act,
            bias=bool(getattr(config, "mlp_bias", False)),
            quant_config=quant_config,
            prefix=prefix,
        )
        from sglang_moe_routing.omni import omni_router  # resolved once, at build time

        check_single_rank("CDMoE")
        self.hidden_size = config.hidden_size
        self.num_experts = int(config.num_experts)
        self.num_keys = math.isqrt(self.num_experts)
        self.top_k = int(config.num_experts_per_tok)
        self.norm_topk_prob = bool(getattr(config, "norm_topk_prob", False))
        if self.num_keys < 1:
            raise ValueError(f"Doge CDMoE: num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_keys * self.num_keys:
            raise ValueError(
                f"Doge CDMoE: num_experts_per_tok={self.top_k} must be in "
                f"[1, {self.num_keys}**2] (num_experts={self.num_experts})"
            )
        self.router_gate = ReplicatedLinear(
            self.hidden_size,
            2 * self.num_keys,
            bias=False,
            quant_config=None,
            prefix=add_prefix("router_gate", prefix),
        )
        self.down_embed = nn.Embedding(self.num_experts, self.hidden_size)
        self.up_embed = nn.Embedding(self.num_experts, self.hidden_size)
        self._omni_router = omni_router
        self.backend = omni_backend()

    def route(self, hidden_states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-token Omni routing: ``weights [T, k]`` (float), ``ids [T, k]`` (i * n + j)."""
        logits, _ = self.router_gate(hidden_states)
        x, y = logits[:, : self.num_keys], logits[:, self.num_keys :]
        return self._omni_router(
            x, y, self.top_k, renormalize=self.norm_topk_prob, backend=self.backend
        )

    def routed_experts(
        self, hidden_states: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
    ) -> torch.Tensor:
        """``sum_e w_e * act(down_embed[e] . h) * up_embed[e]``; ``[T, hidden]``."""
        down = F.embedding(ids, self.down_embed.weight)  # [T, k, H]
        up = F.embedding(ids, self.up_embed.weight)  # [T, k, H]
        act = self.act_fn(torch.einsum("tkh,th->tk", down, hidden_states))
        coeff = act * weights.to(act.dtype)
        return torch.einsum("tk,tkh->th", coeff, up)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(hidden_states)
        shared = super().forward(hidden_states)
        return shared + self.routed_experts(hidden_states, weights, ids)


# ----------------------------------------------------------------------------- decoder


class DogeDecoderLayer(nn.Module):
    def __init__(
        self,
        config,
        layer_id: int,
        quant_config: Optional[QuantizationConfig] = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = DogeAttention(
            config, layer_id, quant_config=quant_config, prefix=add_prefix("self_attn", prefix)
        )
        self.input_residual = nn.Parameter(torch.ones(config.hidden_size))
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if getattr(config, "is_moe", False):
            self.mlp = DogeCDMoE(config, quant_config=quant_config, prefix=add_prefix("mlp", prefix))
        else:
            self.mlp = DogeMLP(
                config.hidden_size,
                config.intermediate_size,
                config.hidden_act,
                bias=bool(getattr(config, "mlp_bias", False)),
                quant_config=quant_config,
                prefix=add_prefix("mlp", prefix),
            )
        self.post_attention_residual = nn.Parameter(torch.ones(config.hidden_size))

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, forward_batch: ForwardBatch
    ) -> torch.Tensor:
        residual = hidden_states
        h = self.self_attn(positions, self.input_layernorm(hidden_states), forward_batch)
        hidden_states = self.input_residual * residual + h
        residual = hidden_states
        h = self.mlp(self.post_attention_layernorm(hidden_states))
        return self.post_attention_residual * residual + h


class DogeModel(nn.Module):
    def __init__(
        self, config, quant_config: Optional[QuantizationConfig] = None, prefix: str = ""
    ) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, prefix=add_prefix("embed_tokens", prefix)
        )
        self.layers = nn.ModuleList(
            DogeDecoderLayer(
                config, i, quant_config=quant_config, prefix=add_prefix(f"layers.{i}", prefix)
            )
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.start_layer, self.end_layer = 0, config.num_hidden_layers
        moe = [layer.mlp for layer in self.layers if isinstance(layer.mlp, DogeCDMoE)]
        if moe:  # one start-up line naming the router each CDMoE layer will run (all alike)
            m = moe[0]
            logger.info(
                "sglang-moe-routing: Doge CDMoE: %d of %d layers route with the Omni router, "
                "backend=%s (--omni-router-backend %s; n=%d, top_k=%d)",
                len(moe), len(self.layers),
                resolved_backend(m.router_gate.weight, m.num_keys, m.top_k, m.backend),
                m.backend, m.num_keys, m.top_k,
            )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        forward_batch: ForwardBatch,
        input_embeds: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        h = self.embed_tokens(input_ids) if input_embeds is None else input_embeds
        for layer in self.layers:
            h = layer(positions, h, forward_batch)
        return self.norm(h)


# The checkpoint names stacked into one SGLang parameter: (param, checkpoint, shard id).
STACKED_PARAMS: Sequence[Tuple[str, str, object]] = (
    (".qkv_proj.", ".q_proj.", "q"),
    (".qkv_proj.", ".k_proj.", "k"),
    (".qkv_proj.", ".v_proj.", "v"),
    (".gate_up_proj.", ".gate_proj.", 0),
    (".gate_up_proj.", ".up_proj.", 1),
)


class DogeForCausalLM(nn.Module):
    """SGLang ``DogeForCausalLM`` (dense MLP or CDMoE, per ``config.is_moe``)."""

    def __init__(
        self, config, quant_config: Optional[QuantizationConfig] = None, prefix: str = ""
    ) -> None:
        super().__init__()
        self.config = config
        self.quant_config = quant_config
        self.model = DogeModel(config, quant_config=quant_config, prefix=add_prefix("model", prefix))
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head = self.model.embed_tokens
        else:
            self.lm_head = ParallelLMHead(
                config.vocab_size,
                config.hidden_size,
                quant_config=quant_config,
                prefix=add_prefix("lm_head", prefix),
            )
        self.logits_processor = LogitsProcessor(config)
        self._is_moe = bool(getattr(config, "is_moe", False))

    @property
    def start_layer(self) -> int:
        return self.model.start_layer

    @property
    def end_layer(self) -> int:
        return self.model.end_layer

    def get_attention_sliding_window_size(self) -> Optional[int]:
        """SGLang's window (keys ``k_pos >= q_pos - size``) for transformers' ``sliding_window``
        (keys ``k_pos > q_pos - sliding_window``); ``None`` without one."""
        sliding = getattr(self.config, "sliding_window", None)
        return int(sliding) - 1 if sliding else None

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        forward_batch: ForwardBatch,
        input_embeds: Optional[torch.Tensor] = None,
        get_embedding: bool = False,
    ):
        hidden_states = self.model(input_ids, positions, forward_batch, input_embeds)
        return self.logits_processor(input_ids, hidden_states, self.lm_head, forward_batch)

    def load_weights(self, weights: Iterable[Tuple[str, torch.Tensor]]) -> Set[str]:
        """Load a transformers ``DogeForCausalLM`` checkpoint; returns the parameters set.

        Raises ``ValueError`` for a checkpoint tensor with no destination (a config and
        checkpoint that disagree would otherwise serve silently wrong outputs).
        """
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: Set[str] = set()
        tied = bool(getattr(self.config, "tie_word_embeddings", False))
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name or "rotary_emb.original_inv_freq" in name:
                continue
            if tied and name.startswith("lm_head."):
                continue
            for param_name, ckpt_name, shard_id in STACKED_PARAMS:
                if ckpt_name not in name:
                    continue
                target = name.replace(ckpt_name, param_name)
                if target not in params:
                    raise ValueError(f"Doge: checkpoint tensor {name!r} has no parameter {target!r}")
                param = params[target]
                param.weight_loader(param, tensor, shard_id)
                loaded.add(target)
                break
            else:
                target = name
                if target not in params:
                    raise ValueError(f"Doge: unexpected checkpoint tensor {name!r}")
                param = params[target]
                loader = getattr(param, "weight_loader", default_weight_loader)
                loader(param, tensor)
                loaded.add(target)
        return loaded


EntryClass = [DogeForCausalLM]
