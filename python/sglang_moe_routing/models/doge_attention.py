"""Doge's dynamic mask attention (DMA) over SGLang's paged KV pool.

Every key position ``j`` of kv-head ``g`` carries an additive score bias
``b[j, g] = exp(A[g] * softplus(dt_proj(v_j)))`` computed from the key's own value vector;
transformers' scores are ``scaling * q_i . k_j + b[j]`` over the causal (and sliding-window)
visible keys, and past ``keep_window_size`` keys each query keeps only the visible keys with
the largest bias.

**Folded path (default; batched, paged, CUDA-graph capturable).** While no request is longer
than ``keep_window_size`` the bias depends on the key alone, so it folds into the dot
product: ``q' = [q, 1, 0...]`` and ``k' = [k, b / scaling, 0...]`` (qk head dim
:func:`folded_head_dim`, ``v`` unchanged), and SGLang's own ``RadixAttention`` with scale
``scaling`` computes ``scaling * q' . k' = scaling * q . k + b``, transformers' scores. The KV
pool stores ``k'`` (its key rows are widened by :func:`widen_kv_geometry`, a hook on the
model config), so the bias of every cached key is in the cache.

**Per-request path (long contexts only).** When the server's context length exceeds
``keep_window_size``, a batch holding a request longer than ``keep_window_size`` runs
:func:`dynamic_mask_attention` per request in PyTorch (top-k window, like SGLang's
``torch_native`` backend). It cannot run inside CUDA graphs: such servers need
``--disable-cuda-graph`` (a capture attempt fails with a clear error), or
``--context-length <= keep_window_size``. The model around it, and how it differs from
transformers, is described in :mod:`.doge`.
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

from sglang_moe_routing.integration import config as plugin_config

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

    Computed in ``dt_proj``'s dtype, as transformers does (``dt_proj`` output, ``A`` and the
    bias all in the model dtype), then returned as float32.

    Args:
        values: ``[L, kv_heads, head_dim]`` value vectors of ``L`` keys.
        dt_proj: the ``Linear(kv_heads * head_dim -> kv_heads)`` of the layer.
        A: ``[kv_heads]``.
    Returns:
        ``[L, kv_heads]`` float32 bias.
    """
    flat = values.reshape(values.shape[0], -1).to(dt_proj.weight.dtype)
    dt = F.linear(flat, dt_proj.weight, dt_proj.bias)
    return torch.exp(A.to(dt.dtype) * F.softplus(dt)).float()


# ----------------------------------------------------------------------------- folded bias

# Attention backends the folded path is known to run on (qk head dim != v head dim).
FOLDED_BACKENDS: Tuple[str, ...] = ("triton", "torch_native")


def folded_head_dim(head_dim: int) -> int:
    """qk head dim of the folded attention: ``head_dim + 1`` (the bias channel) rounded up to
    a multiple of 16 (128 -> 144, 64 -> 80, 16 -> 32)."""
    return (head_dim + 1 + 15) // 16 * 16


def fold_queries(q: torch.Tensor, qk_head_dim: int) -> torch.Tensor:
    """``[T, heads, D] -> [T, heads, qk_head_dim]``: ``[q, 1, 0...]``."""
    T, H, D = q.shape
    out = q.new_zeros((T, H, qk_head_dim))
    out[..., :D] = q
    out[..., D] = 1.0
    return out


def fold_keys(
    k: torch.Tensor, bias: torch.Tensor, scaling: float, qk_head_dim: int
) -> torch.Tensor:
    """``[T, kv_heads, D] -> [T, kv_heads, qk_head_dim]``: ``[k, bias / scaling, 0...]``, so that
    ``scaling * fold_queries(q) . fold_keys(k) == scaling * q . k + bias``.

    ``bias``: ``[T, kv_heads]`` from :func:`dynamic_mask_bias` (float32; divided in float32,
    then stored in ``k.dtype``, the KV cache's dtype)."""
    T, G, D = k.shape
    out = k.new_zeros((T, G, qk_head_dim))
    out[..., :D] = k
    out[..., D] = (bias.float() / scaling).to(k.dtype)
    return out


def widen_kv_geometry(model_config) -> None:
    """Give a Doge ``ModelConfig`` the KV geometry of the folded attention (idempotent).

    SGLang sizes the KV pool from ``model_config.head_dim`` / ``v_head_dim``; the folded keys
    are :func:`folded_head_dim` wide, the values keep the model's head dim. The HF config
    (which the model reads) keeps its ``head_dim``. Called by the plugin's hook on the model
    architecture lookup, before the model and its KV pool are built.
    """
    text = getattr(model_config, "hf_text_config", None) or model_config.hf_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    wide = folded_head_dim(int(head_dim))
    model_config.head_dim = wide
    model_config.v_head_dim = int(head_dim)
    if hasattr(model_config, "swa_head_dim"):
        model_config.swa_head_dim = wide
        model_config.swa_v_head_dim = int(head_dim)


def check_folded_server_args() -> None:
    """``ValueError`` for server settings the folded attention is not known to be exact on:
    an attention backend other than :data:`FOLDED_BACKENDS`, or a quantized KV cache (the
    bias channel would be quantized). No-op where no server args are published."""
    try:
        from sglang.srt.runtime_context import get_server_args

        sa = get_server_args()
    except Exception:  # noqa: BLE001 - no server (unit tests build layers directly)
        return
    if sa is None:
        return
    try:
        from sglang.srt.arg_groups.model_override_base import (
            attention_backends_of,
            resolved_view,
        )

        backends = attention_backends_of(resolved_view(sa))
    except Exception:  # noqa: BLE001 - older/newer layout: read the plain fields
        backends = (
            getattr(sa, "prefill_attention_backend", None) or getattr(sa, "attention_backend", None),
            getattr(sa, "decode_attention_backend", None) or getattr(sa, "attention_backend", None),
        )
    bad = sorted({b for b in backends if b and b not in FOLDED_BACKENDS})
    if bad:
        raise ValueError(
            f"Doge: attention backend {', '.join(bad)} is not supported; its dynamic-mask "
            f"attention runs on {' or '.join(FOLDED_BACKENDS)}: pass --attention-backend triton "
            "(GPU) or torch_native (CPU)"
        )
    kv_dtype = str(getattr(sa, "kv_cache_dtype", "auto") or "auto")
    if kv_dtype not in ("auto", "bfloat16", "float16", "float32", "bf16", "fp16"):
        raise ValueError(
            f"Doge: --kv-cache-dtype {kv_dtype} is not supported (the key cache holds the "
            "dynamic-mask bias); use --kv-cache-dtype auto"
        )


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
    _unsupported_mode(mode)


_SUPPORTED_MODES = ("EXTEND", "MIXED", "DECODE", "IDLE")


def _unsupported_mode(mode: ForwardMode) -> None:
    raise NotImplementedError(
        f"Doge dynamic-mask attention: forward mode {mode.name} is not supported "
        f"(supported: {', '.join(_SUPPORTED_MODES)}; speculative decoding is not)"
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
    """Doge's dynamic mask attention over SGLang's paged KV pool (folded bias, see the
    module docstring; per-request top-k window only for requests past ``keep_window_size``)."""

    def __init__(
        self,
        config,
        layer_id: int,
        quant_config: Optional[QuantizationConfig] = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        check_single_rank("attention")
        check_folded_server_args()
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or self.hidden_size // self.num_heads
        self.qk_head_dim = folded_head_dim(self.head_dim)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scaling = self.head_dim**-0.5
        self.keep_window_size = int(config.keep_window_size)
        if self.keep_window_size < 1:
            raise ValueError(f"Doge: keep_window_size must be >= 1, got {self.keep_window_size}")
        # SGLang's ModelConfig writes the server's context length into the HF config
        self.context_len = int(
            getattr(config, "context_len", None) or config.max_position_embeddings
        )
        # Can a request be longer than keep_window_size (top-k window, per-request path)?
        self.windowed = self.context_len > self.keep_window_size
        if self.windowed and layer_id == 0:
            logger.warning(
                "Doge: context length %d > keep_window_size %d: batches holding a request "
                "longer than %d tokens run attention per request in PyTorch, which CUDA graphs "
                "cannot capture (use --disable-cuda-graph, or --context-length %d)",
                self.context_len, self.keep_window_size, self.keep_window_size,
                self.keep_window_size,
            )
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
        # Folded keys [k, bias / scaling, 0...] (qk_head_dim), values as they are (head_dim).
        # transformers keeps keys k_pos > q_pos - sliding_window; SGLang's window counts
        # k_pos >= q_pos - sliding_window_size, hence the - 1 (as SGLang's models do).
        self.attn = RadixAttention(
            self.num_heads,
            self.qk_head_dim,
            self.scaling,
            num_kv_heads=self.num_kv_heads,
            layer_id=layer_id,
            v_head_dim=self.head_dim,
            sliding_window_size=self.sliding_window - 1 if self.sliding_window else -1,
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

    def needs_window(self, forward_batch: ForwardBatch) -> bool:
        """Whether a request of the batch is longer than ``keep_window_size`` (host sync)."""
        if not self.windowed:
            return False
        seq = forward_batch.seq_lens_cpu
        if seq is None:
            seq = forward_batch.seq_lens
        bs = forward_batch.batch_size
        return bool(seq[:bs].numel()) and int(seq[:bs].max()) > self.keep_window_size

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, forward_batch: ForwardBatch
    ) -> torch.Tensor:
        if self.windowed and plugin_config.capturing_cuda_graph():
            raise RuntimeError(
                f"Doge: the context length ({self.context_len}) exceeds keep_window_size "
                f"({self.keep_window_size}); requests past it need the per-request top-k "
                "attention, which CUDA graphs cannot capture: launch with --disable-cuda-graph "
                f"or --context-length {self.keep_window_size}"
            )
        if forward_batch.forward_mode.name not in _SUPPORTED_MODES:
            _unsupported_mode(forward_batch.forward_mode)
        q, k, v = self.project(positions, hidden_states)
        T = q.shape[0]
        if T == 0:
            output, _ = self.o_proj(q.reshape(0, self.q_size))
            return output
        bias = dynamic_mask_bias(v, self.dt_proj, self.A)
        k_folded = fold_keys(k, bias, self.scaling, self.qk_head_dim)
        if self.needs_window(forward_batch):
            out = self._forward_per_request(q, k_folded, v, forward_batch)
        else:
            self._check_pool_once()
            out = self.attn(
                fold_queries(q, self.qk_head_dim).reshape(T, -1),
                k_folded.reshape(T, -1),
                v.reshape(T, -1).contiguous(),
                forward_batch,
            )
        output, _ = self.o_proj(out.reshape(T, self.q_size))
        return output

    def _check_pool_once(self) -> None:
        """A clear error where the KV pool's key rows were not widened (the plugin's model
        config hook, :func:`widen_kv_geometry`, did not run)."""
        if getattr(self, "_pool_checked", False):
            return
        k_cache = get_token_to_kv_pool().get_key_buffer(self.attn.layer_id)
        if k_cache.shape[-1] != self.qk_head_dim:
            raise RuntimeError(
                f"Doge: the KV pool's key rows are {k_cache.shape[-1]} wide, the folded "
                f"dynamic-mask attention needs {self.qk_head_dim} (head_dim {self.head_dim} + "
                "the bias channel); serve Doge with the sglang-moe-routing plugin installed "
                "(its hook widens the key cache)"
            )
        self._pool_checked = True

    def _forward_per_request(
        self, q: torch.Tensor, k_folded: torch.Tensor, v: torch.Tensor, forward_batch: ForwardBatch
    ) -> torch.Tensor:
        """Top-k window attention, one request at a time against the KV pool."""
        pool = get_token_to_kv_pool()
        pool.set_kv_buffer(
            self.attn, KVWriteLoc.for_batch(forward_batch), k_folded.contiguous(), v.contiguous()
        )
        k_cache = pool.get_key_buffer(self.attn.layer_id)
        v_cache = pool.get_value_buffer(self.attn.layer_id)
        if k_cache.dim() != 3 or k_cache.shape[1:] != (self.num_kv_heads, self.qk_head_dim):
            raise NotImplementedError(
                f"Doge attention needs an NHD KV pool with key rows [slots, {self.num_kv_heads}, "
                f"{self.qk_head_dim}], got {tuple(k_cache.shape)}"
            )
        out = torch.empty_like(q)
        req_to_token = get_req_to_token_pool().req_to_token
        start = 0
        for req, prefix_len, new_len in _request_spans(forward_batch):
            stop = start + new_len
            L = prefix_len + new_len
            slots = req_to_token[req, :L].long()
            keys = k_cache[slots][..., : self.head_dim].to(q.dtype)
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
        return out
