"""Doge's dynamic mask attention (DMA) over SGLang's paged KV pool, in plain PyTorch.

Every key position ``j`` of kv-head ``g`` carries an additive score bias
``b[j, g] = exp(A[g] * softplus(dt_proj(v_j)))`` computed from the key's own value vector;
past ``keep_window_size`` keys each query keeps only the visible keys with the largest bias.
SGLang's fused attention backends have no per-key additive bias, so attention runs per
request against the KV pool (like SGLang's ``torch_native`` backend). The model around it,
and how it differs from transformers, is described in :mod:`.doge`.
"""

from __future__ import annotations

import logging
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from sglang.srt.layers.linear import QKVParallelLinear, RowParallelLinear
from sglang.srt.layers.layernorm import RMSNorm
from sglang.srt.layers.quantization.base_config import QuantizationConfig
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.layers.rotary_embedding import get_rope
from sglang.srt.mem_cache.memory_pool import KVWriteLoc
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode
from sglang.srt.model_executor.forward_context import (
    get_req_to_token_pool,
    get_token_to_kv_pool,
)
from sglang.srt.runtime_context import get_parallel
from sglang.srt.utils import add_prefix

logger = logging.getLogger("sglang_moe_routing")

_ROPE_FALLBACK_LOGGED = False

# Queries per attention chunk: bounds the [heads, chunk, keys] score buffer in long prefills.
_ATTN_QUERY_CHUNK = 1024


def check_single_rank(what: str) -> None:
    """``NotImplementedError`` unless tensor and pipeline parallel sizes are 1."""
    parallel = get_parallel()
    for name in ("tp_size", "pp_size"):
        size = getattr(parallel, name)
        if size != 1:
            raise NotImplementedError(
                f"Doge ({what}): {name}={size} is not supported by this model file; "
                "run it with --tp-size 1 --pp-size 1."
            )


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
        check_single_rank("attention")
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
