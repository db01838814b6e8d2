"""Inference-only Doge (``DogeForCausalLM``) for SGLang, routed with the Omni router.

Doge (transformers' ``models/doge``) differs from a Llama-style decoder in three places:

* **Dynamic mask attention (DMA).** Every key position ``j`` of kv-head ``g`` carries an
  additive score bias ``b[j, g] = exp(A[g] * softplus(dt_proj(v_j)))`` computed from the
  key's own value vector (all kv-heads flattened). When the key length exceeds
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
* The dynamic-mask bias is recomputed from the cached values (exact, batch-independent);
  the ``keep_window_size`` test uses each request's own key length, where transformers uses
  the padded key length of the whole batch.

Attention runs in plain PyTorch against SGLang's KV pool (per request, like SGLang's
``torch_native`` backend): SGLang's fused attention backends have no per-key additive bias.
It therefore does not run inside CUDA graphs (launch with ``--disable-cuda-graph``; a capture
attempt fails with a clear error). Supported: tensor parallel size 1, pipeline parallel
size 1, extend / mixed / decode / idle batches.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from sglang.srt.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from sglang.srt.layers.layernorm import RMSNorm
from sglang.srt.layers.logits_processor import LogitsProcessor
from sglang.srt.layers.quantization.base_config import QuantizationConfig
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.layers.rotary_embedding import get_rope
from sglang.srt.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from sglang.srt.mem_cache.memory_pool import KVWriteLoc
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode
from sglang.srt.model_executor.forward_context import (
    get_req_to_token_pool,
    get_token_to_kv_pool,
)
from sglang.srt.model_loader.weight_utils import default_weight_loader
from sglang.srt.runtime_context import get_parallel
from sglang.srt.utils import add_prefix

from sglang_moe_routing.integration import config as plugin_config

logger = logging.getLogger("sglang_moe_routing")

OMNI_SECTION = "omni"
DEFAULT_BACKEND = "auto"

_ROPE_FALLBACK_LOGGED = False

# Queries per attention chunk: bounds the [heads, chunk, keys] score buffer in long prefills.
_ATTN_QUERY_CHUNK = 1024

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


def _check_single_rank(what: str) -> None:
    parallel = get_parallel()
    for name in ("tp_size", "pp_size"):
        size = getattr(parallel, name)
        if size != 1:
            raise NotImplementedError(
                f"Doge ({what}): {name}={size} is not supported by this model file; "
                "run it with --tp-size 1 --pp-size 1."
            )


# ----------------------------------------------------------------------------- attention


def dynamic_mask_bias(values: torch.Tensor, dt_proj: nn.Module, A: torch.Tensor) -> torch.Tensor:
    """Doge's per-key score bias ``exp(A * softplus(dt_proj(v)))``.

    Args:
        values: ``[L, kv_heads, head_dim]`` value vectors of ``L`` keys.
        dt_proj: the ``Linear(kv_heads * head_dim -> kv_heads)`` of the layer.
        A: ``[kv_heads]``.
    Returns:
        ``[L, kv_heads]`` float32 bias.
    """
    flat = values.reshape(values.shape[0], -1).to(dt_proj.weight.dtype)
    dt = F.linear(flat, dt_proj.weight, dt_proj.bias).float()
    return torch.exp(A.float() * F.softplus(dt))


def dynamic_mask_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    *,
    scaling: float,
    query_start: int,
    keep_window_size: int,
    sliding_window: Optional[int] = None,
) -> torch.Tensor:
    """Attention of one request's new queries over all its keys, with Doge's dynamic mask.

    Query ``i`` sits at position ``query_start + i``; key ``j`` at position ``j``. Scores are
    ``scaling * q.k + bias[j]`` over the causal (and sliding-window) visible keys; when the
    key count ``L`` exceeds ``keep_window_size``, each query keeps only the
    ``keep_window_size`` visible keys with the largest bias (transformers' top-k). Equal
    biases at the cut (e.g. a repeated token in layer 0, whose value vector is the same, or
    ``A == 0``) keep the later key; transformers leaves that choice to ``torch.topk``.

    Args:
        q: ``[n, heads, head_dim]``; k, v: ``[L, kv_heads, head_dim]``;
        bias: ``[L, kv_heads]`` from :func:`dynamic_mask_bias`.
    Returns:
        ``[n, heads, head_dim]`` in ``q.dtype`` (computed in float32).
    """
    n, heads, head_dim = q.shape
    L, kv_heads, _ = k.shape
    if heads % kv_heads != 0:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    if query_start + n != L:
        raise ValueError(
            f"the new queries must end the sequence: query_start ({query_start}) + n ({n}) "
            f"!= keys ({L})"
        )
    rep = heads // kv_heads
    out = torch.empty_like(q)
    if n == 0:
        return out
    kf = k.float().permute(1, 0, 2)  # [G, L, D]
    vf = v.float().permute(1, 0, 2)  # [G, L, D]
    key_pos = torch.arange(L, device=q.device)
    bias_g = bias.float().t()  # [G, L]
    for start in range(0, n, _ATTN_QUERY_CHUNK):
        stop = min(n, start + _ATTN_QUERY_CHUNK)
        qc = q[start:stop].float().view(stop - start, kv_heads, rep, head_dim).permute(1, 2, 0, 3)
        q_pos = query_start + torch.arange(start, stop, device=q.device)
        visible = key_pos[None, :] <= q_pos[:, None]  # [c, L]
        if sliding_window is not None:
            visible &= key_pos[None, :] > q_pos[:, None] - sliding_window
        mask = bias_g[:, None, :].masked_fill(~visible[None], float("-inf"))  # [G, c, L]
        if L > keep_window_size:
            # top-k by bias; a stable sort over reversed keys breaks ties for the later key
            order = torch.sort(mask.flip(-1), dim=-1, descending=True, stable=True).indices
            keep_idx = (L - 1) - order[..., :keep_window_size]
            keep = torch.zeros_like(mask, dtype=torch.bool).scatter_(-1, keep_idx, True)
            mask = mask.masked_fill(~keep, float("-inf"))
        scores = torch.matmul(qc, kf[:, None].transpose(-1, -2)) * scaling  # [G, rep, c, L]
        probs = torch.softmax(scores + mask[:, None], dim=-1)
        oc = torch.matmul(probs, vf[:, None])  # [G, rep, c, D]
        out[start:stop] = oc.permute(2, 0, 1, 3).reshape(stop - start, heads, head_dim).to(q.dtype)
    return out


def _request_spans(forward_batch: ForwardBatch) -> List[Tuple[int, int, int]]:
    """``(req_pool_index, prefix_len, new_len)`` per request, in token order."""
    mode = forward_batch.forward_mode
    bs = forward_batch.batch_size
    pool_idx = (
        forward_batch.req_pool_indices_cpu
        if forward_batch.req_pool_indices_cpu is not None
        else forward_batch.req_pool_indices
    )
    pool_idx = [int(i) for i in pool_idx.tolist()][:bs]
    if mode == ForwardMode.DECODE:
        seq = forward_batch.seq_lens_cpu if forward_batch.seq_lens_cpu is not None else forward_batch.seq_lens
        return [(r, int(s) - 1, 1) for r, s in zip(pool_idx, seq.tolist()[:bs])]
    if mode in (ForwardMode.EXTEND, ForwardMode.MIXED):
        prefix = forward_batch.extend_prefix_lens_cpu
        new = forward_batch.extend_seq_lens_cpu
        if prefix is None or new is None:
            prefix = forward_batch.extend_prefix_lens.tolist()
            new = forward_batch.extend_seq_lens.tolist()
        return [(r, int(p), int(e)) for r, p, e in zip(pool_idx, prefix, new)]
    raise NotImplementedError(
        f"Doge dynamic-mask attention: forward mode {mode.name} is not supported "
        "(supported: EXTEND, MIXED, DECODE, IDLE; speculative decoding is not)"
    )


class NeoxRotaryEmbedding(nn.Module):
    """Plain-PyTorch default (unscaled) RoPE, neox style, ``forward(positions, q, k)`` like
    SGLang's ``RotaryEmbedding``. Used only where SGLang's cannot be built (see
    :func:`_rotary_embedding`)."""

    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(shape[0], -1, self.head_dim).float()
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
        return (x * cos + rotated * sin).reshape(shape)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, D]
        cos, sin = emb.cos(), emb.sin()
        return self._rotate(q, cos, sin).to(q.dtype), self._rotate(k, cos, sin).to(k.dtype)


def _rotary_embedding(config, head_dim: int) -> nn.Module:
    """SGLang's RoPE layer; on a host where SGLang cannot build it (its constructor imports
    a GPU kernel module, e.g. ``vllm._custom_ops`` on a CPU host without
    ``SGLANG_USE_CPU_ENGINE=1``) the plain-PyTorch default RoPE, which is exact for
    ``rope_type == "default"``."""
    rope_parameters = dict(getattr(config, "rope_parameters", None) or {})
    rope_theta = rope_parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
    scaling = None if rope_type == "default" else rope_parameters
    try:
        return get_rope(
            head_dim,
            rotary_dim=head_dim,
            max_position=config.max_position_embeddings,
            base=rope_theta,
            rope_scaling=scaling,
            is_neox_style=True,
        )
    except ImportError as e:
        if scaling is not None:
            raise
        global _ROPE_FALLBACK_LOGGED
        if not _ROPE_FALLBACK_LOGGED:
            _ROPE_FALLBACK_LOGGED = True
            logger.info("Doge: SGLang's RoPE kernel is unavailable here (%s); using PyTorch RoPE", e)
        return NeoxRotaryEmbedding(head_dim, rope_theta)


class DogeAttention(nn.Module):
    """Doge's dynamic mask attention over SGLang's paged KV pool."""

    def __init__(
        self,
        config,
        layer_id: int,
        quant_config: Optional[QuantizationConfig] = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        _check_single_rank("attention")
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or self.hidden_size // self.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scaling = self.head_dim**-0.5
        self.keep_window_size = int(config.keep_window_size)
        if self.keep_window_size < 1:
            raise ValueError(f"Doge: keep_window_size must be >= 1, got {self.keep_window_size}")
        sliding = getattr(config, "sliding_window", None)
        self.sliding_window = int(sliding) if sliding else None
        bias = bool(getattr(config, "attention_bias", False))

        self.qkv_proj = QKVParallelLinear(
            self.hidden_size,
            self.head_dim,
            self.num_heads,
            self.num_kv_heads,
            bias=bias,
            quant_config=quant_config,
            prefix=add_prefix("qkv_proj", prefix),
        )
        self.o_proj = RowParallelLinear(
            self.q_size,
            self.hidden_size,
            bias=bias,
            quant_config=quant_config,
            prefix=add_prefix("o_proj", prefix),
        )
        self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        # Dynamic mask parameters (names as in the HF checkpoint).
        self.A = nn.Parameter(torch.zeros(self.num_kv_heads))
        self.dt_proj = nn.Linear(self.kv_size, self.num_kv_heads, bias=bias)

        self.rotary_emb = _rotary_embedding(config, self.head_dim)
        # The KV pool's handle for this layer (layer id, head counts); never called.
        self.attn = RadixAttention(
            self.num_heads,
            self.head_dim,
            self.scaling,
            num_kv_heads=self.num_kv_heads,
            layer_id=layer_id,
            quant_config=quant_config,
            prefix=add_prefix("attn", prefix),
        )

    def project(
        self, positions: torch.Tensor, hidden_states: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``q [T, heads, D]``, ``k, v [T, kv_heads, D]`` with q/k RMSNorm and RoPE applied."""
        T = hidden_states.shape[0]
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.reshape(T, self.num_heads, self.head_dim)).reshape(T, self.q_size)
        k = self.k_norm(k.reshape(T, self.num_kv_heads, self.head_dim)).reshape(T, self.kv_size)
        q, k = self.rotary_emb(positions, q, k)
        return (
            q.reshape(T, self.num_heads, self.head_dim),
            k.reshape(T, self.num_kv_heads, self.head_dim),
            v.reshape(T, self.num_kv_heads, self.head_dim),
        )

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, forward_batch: ForwardBatch
    ) -> torch.Tensor:
        if hidden_states.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "Doge dynamic-mask attention runs per request in PyTorch and cannot be "
                "captured in a CUDA graph; launch the server with --disable-cuda-graph"
            )
        q, k, v = self.project(positions, hidden_states)
        out = torch.empty_like(q)
        if q.shape[0] > 0:
            pool = get_token_to_kv_pool()
            pool.set_kv_buffer(
                self.attn, KVWriteLoc.for_batch(forward_batch), k.contiguous(), v.contiguous()
            )
            k_cache = pool.get_key_buffer(self.attn.layer_id)
            v_cache = pool.get_value_buffer(self.attn.layer_id)
            if k_cache.dim() != 3 or k_cache.shape[1] != self.num_kv_heads:
                raise NotImplementedError(
                    f"Doge attention needs an NHD KV pool [slots, {self.num_kv_heads}, "
                    f"{self.head_dim}], got {tuple(k_cache.shape)}"
                )
            req_to_token = get_req_to_token_pool().req_to_token
            start = 0
            for req, prefix_len, new_len in _request_spans(forward_batch):
                stop = start + new_len
                L = prefix_len + new_len
                slots = req_to_token[req, :L].long()
                keys = k_cache[slots].to(q.dtype)
                values = v_cache[slots].to(q.dtype)
                bias = dynamic_mask_bias(values, self.dt_proj, self.A)
                out[start:stop] = dynamic_mask_attention(
                    q[start:stop],
                    keys,
                    values,
                    bias,
                    scaling=self.scaling,
                    query_start=prefix_len,
                    keep_window_size=self.keep_window_size,
                    sliding_window=self.sliding_window,
                )
                start = stop
            if start != q.shape[0]:
                raise RuntimeError(
                    f"Doge attention: the batch's requests cover {start} tokens, "
                    f"the batch has {q.shape[0]}"
                )
        output, _ = self.o_proj(out.reshape(-1, self.q_size))
        return output


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

        _check_single_rank("CDMoE")
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
