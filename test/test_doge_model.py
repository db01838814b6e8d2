"""The Doge model file (``models/doge.py``) against transformers' Doge, on CPU.

Our model runs through SGLang's real layers, KV pools (``ReqToTokenPool``,
``MHATokenToKVPool``), ``ForwardBatch`` and ``LogitsProcessor``, in a single-process gloo
"distributed" environment. The reference is transformers' ``DogeForCausalLM`` with the same
weights, loaded into ours through ``load_weights``.

transformers' ``DogeCDMoE`` mixes tokens (``router_gate(h).view(2, bsz * seq_len, n)``, see
docs/omni_router.md, "Model integration (Doge)"); it routes per token only when a forward
holds one token. The MoE references are therefore (a) transformers run token by token with
its KV cache (unmodified code, one token per forward) and (b) transformers' full-sequence
forward with ``DogeCDMoE.forward`` applied to one token at a time. The dense variant has no
such issue and is compared with transformers' full-sequence forward directly.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

pytest.importorskip("sglang")
pytest.importorskip("transformers.models.doge")

from transformers import DogeForCausalLM as HFDoge  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from sglang_moe_routing.integration import config  # noqa: E402
from sglang_moe_routing.integration import omni_hooks  # noqa: E402
from sglang_moe_routing.integration.omni_hooks import OmniConfig  # noqa: E402

from doge_helpers import (  # noqa: E402,F401 (sgl_env: a fixture)
    WINDOWED,
    SglRunner,
    assert_close,
    attention_paths,
    free_port,
    hf_cdmoe_per_token,
    hf_full_logits,
    hf_incremental_logits,
    make_hf,
    make_ours,
    sgl_env,
    tiny_config,
    tokens,
)

# numpy warns about NaN arithmetic in masked lanes of interpreted Triton kernels
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


# ----------------------------------------------------------------------------- weights


def test_load_weights_maps_every_checkpoint_tensor(sgl_env, tmp_path):
    cfg = tiny_config(num_experts=70, norm_topk_prob=True)  # n = floor(sqrt(70)) = 8
    hf = make_hf(cfg)
    hf.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    ours = make_ours(cfg)
    loaded = ours.load_weights(load_file(tmp_path / "model.safetensors").items())
    assert loaded == set(dict(ours.named_parameters()).keys())

    layer, hf_layer = ours.model.layers[1], hf.model.layers[1]
    attn, hf_attn = layer.self_attn, hf_layer.self_attn
    qkv = torch.cat([hf_attn.q_proj.weight, hf_attn.k_proj.weight, hf_attn.v_proj.weight])
    assert torch.equal(attn.qkv_proj.weight, qkv)
    assert torch.equal(attn.A, hf_attn.A) and torch.equal(attn.dt_proj.weight, hf_attn.dt_proj.weight)
    gate_up = torch.cat([hf_layer.mlp.gate_proj.weight, hf_layer.mlp.up_proj.weight])
    assert torch.equal(layer.mlp.gate_up_proj.weight, gate_up)
    assert torch.equal(layer.mlp.router_gate.weight, hf_layer.mlp.router_gate.weight)
    assert torch.equal(layer.mlp.down_embed.weight, hf_layer.mlp.down_embed.weight)
    assert layer.mlp.num_keys == 8 and layer.mlp.down_embed.weight.shape[0] == 70
    assert torch.equal(layer.post_attention_residual, hf_layer.post_attention_residual)
    assert torch.equal(ours.lm_head.weight, hf.lm_head.weight)

    with pytest.raises(ValueError, match="unexpected checkpoint tensor"):
        ours.load_weights([("model.layers.0.mlp.not_a_weight", torch.zeros(1))])


def test_tied_embeddings(sgl_env):
    cfg = tiny_config(tie_word_embeddings=True, is_moe=False)
    hf = make_hf(cfg)
    ours = make_ours(cfg, hf)
    assert ours.lm_head is ours.model.embed_tokens
    ids = tokens(9, seed=3)
    got = SglRunner(cfg).extend(ours, [(1, ids)])
    assert_close(got, hf_full_logits(hf, ids), "tied embeddings")


# ----------------------------------------------------------------------------- blocks


@pytest.mark.parametrize("num_experts,norm_topk", [(64, False), (70, True)])
def test_cdmoe_block_matches_transformers_per_token(sgl_env, num_experts, norm_topk):
    cfg = tiny_config(num_experts=num_experts, norm_topk_prob=norm_topk)
    hf = make_hf(cfg)
    ours = make_ours(cfg, hf)
    block, hf_block = ours.model.layers[0].mlp, hf.model.layers[0].mlp
    h = torch.randn(11, cfg.hidden_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = block(h)
        ref = torch.cat([hf_block(t.view(1, 1, -1))[0].view(1, -1) for t in h])
        # one token per call is transformers' per-token routing; check the ids too
        w, ids = block.route(h)
        logits = hf_block.router_gate(h[3].view(1, 1, -1)).view(2, 1, -1)
        n = block.num_keys
        scores = (logits[0, 0][:, None] + logits[1, 0][None, :]).reshape(-1)
        assert set(ids[3].tolist()) == set(scores.topk(cfg.num_experts_per_tok).indices.tolist())
        assert int(ids.max()) < n * n
    assert_close(got, ref, "CDMoE block")


def test_dense_mlp_block_matches_transformers(sgl_env):
    cfg = tiny_config(is_moe=False)
    hf = make_hf(cfg)
    ours = make_ours(cfg, hf)
    h = torch.randn(2, 7, cfg.hidden_size, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        got = ours.model.layers[0].mlp(h.reshape(14, -1)).reshape(2, 7, -1)
        ref = hf.model.layers[0].mlp(h)
    assert_close(got, ref, "dense MLP")


def test_sglang_rope_and_pytorch_fallback_agree(sgl_env, monkeypatch):
    """On this CPU host SGLang's RotaryEmbedding cannot be built (its constructor imports
    ``vllm._custom_ops`` unless ``SGLANG_USE_CPU_ENGINE=1``) and the model falls back to
    ``NeoxRotaryEmbedding``; both must agree where SGLang's can be built."""
    import sglang.srt.layers.rotary_embedding.base as rope_base
    from sglang.srt.layers.rotary_embedding import get_rope

    from sglang_moe_routing.models.doge_attention import NeoxRotaryEmbedding

    monkeypatch.setattr(rope_base, "_is_cpu", True)  # skip the GPU-kernel import, native path
    sgl = get_rope(16, rotary_dim=16, max_position=64, base=500.0, is_neox_style=True)
    ours = NeoxRotaryEmbedding(16, 500.0)
    pos = torch.tensor([0, 3, 17, 63, 5])
    q, k = torch.randn(5, 4 * 16), torch.randn(5, 2 * 16)
    q1, k1 = sgl.forward_native(pos, q.clone(), k.clone())
    q2, k2 = ours(pos, q.clone(), k.clone())
    assert_close(q2, q1, "rope q", atol=1e-5)
    assert_close(k2, k1, "rope k", atol=1e-5)


@pytest.mark.parametrize("bias_kind", ["zero", "random"])
def test_folded_bias_in_sglang_torch_native_equals_dynamic_mask_attention(sgl_env, bias_kind):
    """The folding ``q' = [q, 1, 0..]``, ``k' = [k, b / scaling, 0..]`` run by SGLang's own
    torch_native backend (qk head dim 32, v head dim 16, a cached prefix) equals Doge's
    dynamic-mask attention below the window; with zero bias both are plain causal attention."""
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode
    from sglang.srt.model_executor.forward_context import ForwardContext, forward_context

    from sglang_moe_routing.models.doge_attention import (
        dynamic_mask_attention,
        fold_keys,
        fold_queries,
        folded_head_dim,
    )

    cfg = tiny_config()
    runner = SglRunner(cfg)
    g = torch.Generator().manual_seed(9)
    H, G, D, L = 4, 2, 16, 13
    Dq, s = folded_head_dim(D), D**-0.5
    assert Dq == 32
    layer = RadixAttention(H, Dq, s, num_kv_heads=G, layer_id=0, v_head_dim=D)
    q, k, v = torch.randn(L, H, D, generator=g), torch.randn(L, G, D, generator=g), torch.randn(L, G, D, generator=g)
    bias = torch.zeros(L, G) if bias_kind == "zero" else 3 * torch.rand(L, G, generator=g)
    slots = runner._alloc(2, L)
    fb = ForwardBatch(
        forward_mode=ForwardMode.EXTEND, batch_size=1, input_ids=torch.zeros(L - 4, dtype=torch.long),
        req_pool_indices=torch.tensor([2]), seq_lens=torch.tensor([L]), out_cache_loc=slots[4:],
        seq_lens_sum=L, extend_seq_lens=torch.tensor([L - 4]), extend_prefix_lens=torch.tensor([4]),
        seq_lens_cpu=torch.tensor([L]), extend_seq_lens_cpu=[L - 4], extend_prefix_lens_cpu=[4],
    )
    runner.kv.set_kv_buffer(layer, slots[:4], fold_keys(k[:4], bias[:4], s, Dq), v[:4])  # cached prefix
    with forward_context(ForwardContext(attn_backend=runner.backend)):
        got = runner.backend.forward_extend(
            fold_queries(q[4:], Dq).reshape(L - 4, -1), fold_keys(k[4:], bias[4:], s, Dq), v[4:],
            layer, fb,
        ).view(L - 4, H, D)
    ref = dynamic_mask_attention(q[4:], k, v, bias, scaling=s, query_start=4, keep_window_size=L)
    assert_close(got, ref, f"folded torch_native vs dynamic-mask attention ({bias_kind} bias)", atol=1e-5)
    if bias_kind == "random":  # the bias matters: without it the result differs
        plain = dynamic_mask_attention(q[4:], k, v, torch.zeros(L, G), scaling=s, query_start=4,
                                       keep_window_size=L)
        assert (plain - ref).abs().max() > 1e-2


def test_folded_bias_in_sglang_triton_kernels_equals_dynamic_mask_attention():
    """SGLang's Triton attention kernels (the GPU backend's decode and extend kernels, here in
    the Triton interpreter) on folded q'/k' (qk head dim 32, v head dim 16, GQA, scattered KV
    slots, cached prefixes) equal Doge's dynamic-mask attention. The kernels only: the
    backend's metadata and CUDA graphs are exercised on a GPU (test_gpu_server.py)."""
    from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd
    from sglang.kernels.ops.attention.extend_attention import extend_attention_fwd

    from sglang_moe_routing.models.doge_attention import (
        dynamic_mask_attention,
        fold_keys,
        fold_queries,
        folded_head_dim,
    )

    g = torch.Generator().manual_seed(0)
    H, G, D = 4, 2, 16
    Dq, s = folded_head_dim(D), D**-0.5
    lens, pref = [5, 9, 3], [2, 4, 0]  # keys per request; cached prefix for the extend
    L = sum(lens)
    K, V = torch.randn(L, G, D, generator=g), torch.randn(L, G, D, generator=g)
    bias = 3 * torch.rand(L, G, generator=g)
    kbuf, vbuf = torch.zeros(L + 1, G, Dq), torch.zeros(L + 1, G, D)
    slots = torch.randperm(L, generator=g) + 1
    kbuf[slots], vbuf[slots] = fold_keys(K, bias, s, Dq), V
    starts = torch.tensor([0] + lens[:-1]).cumsum(0).tolist()
    spans = list(zip(starts, lens, pref))

    def ref(q, st, n, q_start):
        return dynamic_mask_attention(q, K[st:st + n], V[st:st + n], bias[st:st + n], scaling=s,
                                      query_start=q_start, keep_window_size=n)

    # decode: one new query per request over all its keys
    Q = torch.randn(len(lens), H, D, generator=g)
    o = torch.zeros(len(lens), H, D)
    splits = 2
    decode_attention_fwd(
        fold_queries(Q, Dq), kbuf, vbuf, o, torch.tensor([0] + lens).cumsum(0).int(),
        slots.int(), torch.zeros(len(lens), H, splits, D), torch.zeros(len(lens), H, splits),
        torch.full((len(lens),), splits, dtype=torch.int32), splits, s, 1.0, 1.0,
    )
    for i, (st, n, _) in enumerate(spans):
        assert_close(o[i], ref(Q[i:i + 1], st, n, n - 1)[0], f"triton decode, request {i}", atol=1e-5)
    # extend: new tokens after each cached prefix
    new = [n - p for n, p in zip(lens, pref)]
    qx = torch.randn(sum(new), H, D, generator=g)
    kx = torch.cat([fold_keys(K[st + p:st + n], bias[st + p:st + n], s, Dq) for st, n, p in spans])
    vx = torch.cat([V[st + p:st + n] for st, n, p in spans])
    ox = torch.zeros(sum(new), H, D)
    extend_attention_fwd(
        fold_queries(qx, Dq), kx, vx, ox, kbuf, vbuf, torch.tensor([0] + new).cumsum(0).int(),
        torch.tensor([0] + pref).cumsum(0).int(),
        torch.cat([slots[st:st + p] for st, _, p in spans]).int(),
        None, True, None, max(new), 1.0, 1.0, sm_scale=s,
    )
    q0 = 0
    for i, (st, n, p) in enumerate(spans):
        assert_close(ox[q0:q0 + n - p], ref(qx[q0:q0 + n - p], st, n, p), f"triton extend, request {i}",
                     atol=1e-5)
        q0 += n - p


def test_dynamic_mask_keep_window_and_ties():
    """Keys outside each query's top-``keep_window_size`` bias are dropped; equal biases at
    the cut keep the later key (so with a constant bias the window is the most recent keys)."""
    from sglang_moe_routing.models.doge_attention import dynamic_mask_attention

    g = torch.Generator().manual_seed(10)
    L, keep, D = 10, 4, 8
    q, k, v = torch.randn(L, 2, D, generator=g), torch.randn(L, 1, D, generator=g), torch.randn(L, 1, D, generator=g)
    bias = torch.randn(L, 1, generator=g)

    def naive(bias_row, i):  # query i attends to its top-`keep` visible keys by bias
        vis = torch.arange(i + 1)
        kept = vis if i + 1 <= keep else vis[bias_row[vis].topk(keep).indices]
        s = (q[i, :, None, :] * k[kept, 0][None]).sum(-1) * D**-0.5 + bias_row[kept][None]
        return torch.softmax(s, -1) @ v[kept, 0]

    got = dynamic_mask_attention(q, k, v, bias, scaling=D**-0.5, query_start=0, keep_window_size=keep)
    for i in range(L):
        assert_close(got[i], naive(bias[:, 0], i), f"query {i}", atol=1e-5)
    const = torch.full((L, 1), 0.5)
    got = dynamic_mask_attention(q, k, v, const, scaling=D**-0.5, query_start=0, keep_window_size=keep)
    for i in range(L):
        kept = torch.arange(max(0, i + 1 - keep), i + 1)  # the most recent `keep` keys
        s = (q[i, :, None, :] * k[kept, 0][None]).sum(-1) * D**-0.5
        assert_close(got[i], torch.softmax(s, -1) @ v[kept, 0], f"tie, query {i}", atol=1e-5)
    with pytest.raises(ValueError, match="must end the sequence"):
        dynamic_mask_attention(q[:3], k, v, bias, scaling=1.0, query_start=0, keep_window_size=keep)


# ----------------------------------------------------------------------------- whole model


@pytest.mark.parametrize("overrides", [{}, {"sliding_window": 4}, WINDOWED,
                                       {**WINDOWED, "sliding_window": 4}])
def test_dense_model_logits_match_transformers(sgl_env, overrides):
    """Dense Doge (no CDMoE): transformers' full-sequence forward is per token, so the
    comparison is direct; folded path, with SGLang's sliding window, and the per-request
    path with DMA's top-k window (and both windows)."""
    cfg = tiny_config(is_moe=False, **overrides)
    hf = make_hf(cfg, seed=1)
    ours = make_ours(cfg, hf)
    ids = tokens(12, seed=11)
    with attention_paths(ours) as paths:
        got = SglRunner(cfg).extend(ours, [(1, ids)])
    assert_close(got, hf_full_logits(hf, ids), f"dense Doge {overrides}")
    windowed = "keep_window_size" in overrides
    assert paths == {"folded": 0 if windowed else 2, "per_request": 2 if windowed else 0}


@pytest.mark.parametrize("overrides", [{}, WINDOWED], ids=["folded", "windowed"])
def test_moe_model_logits_match_transformers_single_sequence(sgl_env, overrides):
    cfg = tiny_config(**overrides)
    hf = make_hf(cfg, seed=2)
    ours = make_ours(cfg, hf)
    ids = tokens(12, seed=12)
    runner = SglRunner(cfg)
    with attention_paths(ours) as paths:
        got = runner.extend(ours, [(1, ids)])
    assert paths["per_request" if overrides else "folded"] == cfg.num_hidden_layers
    # (a) unmodified transformers, one token per forward (per-token routing)
    assert_close(got, hf_incremental_logits(hf, ids), "vs transformers token by token")
    # (b) transformers' full-sequence forward with its CDMoE applied per token
    with hf_cdmoe_per_token():
        assert_close(got, hf_full_logits(hf, ids), "vs transformers full forward, per-token CDMoE")
    # the LogitsProcessor path returns the last position's logits
    runner2 = SglRunner(cfg)
    last = runner2.extend(ours, [(1, ids)], full_logits=False)
    assert_close(last[0], got[-1], "LogitsProcessor next-token logits")


@pytest.mark.parametrize("overrides", [{}, WINDOWED], ids=["folded", "windowed"])
def test_batched_prefix_cached_and_decode_requests_are_independent(sgl_env, overrides):
    """Two requests batched together, a cached prefix extended, then batched decoding: each
    request's logits equal transformers' for that request alone."""
    cfg = tiny_config(**overrides)
    hf = make_hf(cfg, seed=3)
    ours = make_ours(cfg, hf)
    a, b = tokens(11, seed=21), tokens(9, seed=22)
    ref_a, ref_b = hf_incremental_logits(hf, a), hf_incremental_logits(hf, b)
    runner = SglRunner(cfg)
    step1 = runner.extend(ours, [(3, a[:8]), (5, b[:4])])  # prefill both
    assert_close(step1[:8], ref_a[:8], "A prefill in a batch")
    assert_close(step1[8:], ref_b[:4], "B prefill in a batch")
    step2 = runner.extend(ours, [(5, b[4:8])])  # B's first 4 tokens are a cached prefix
    assert_close(step2, ref_b[4:8], "B extend over a cached prefix")
    out = runner.decode(ours, [(3, a[8]), (5, b[8])])  # batched decode
    assert_close(out[0], ref_a[8], "A decode")
    assert_close(out[1], ref_b[8], "B decode")
    c = tokens(6, seed=23)
    out = runner.extend(ours, [(3, [a[9]]), (6, c)], mode="MIXED")  # decode A + prefill C
    assert_close(out[0], ref_a[9], "A decode in a mixed batch")
    assert_close(out[1:], hf_incremental_logits(hf, c), "C prefill in a mixed batch")
    out = runner.decode(ours, [(3, a[10])])
    assert_close(out[0], ref_a[10], "A decode after the mixed batch")
    with pytest.raises(NotImplementedError, match="TARGET_VERIFY"):
        runner.extend(ours, [(6, [1])], mode="TARGET_VERIFY")


def test_batch_of_requests_of_different_lengths_matches_transformers_per_request(sgl_env):
    """Five requests of different lengths (1 to 14 prompt tokens) prefilled in one batch, then
    decoded together for 4 steps, a sixth joining in a mixed batch: every request's logits
    equal transformers' for that request alone, all through the folded RadixAttention path."""
    cfg = tiny_config()
    hf = make_hf(cfg, seed=7)
    ours = make_ours(cfg, hf)
    lens = [1, 3, 7, 14, 5]
    seqs = {row: tokens(n + 5, seed=40 + row) for row, n in zip(range(1, 6), lens)}
    refs = {row: hf_incremental_logits(hf, ids) for row, ids in seqs.items()}
    runner = SglRunner(cfg)
    with attention_paths(ours) as paths:
        got = runner.extend(ours, [(row, seqs[row][:n]) for row, n in zip(seqs, lens)])
        start = 0
        for row, n in zip(seqs, lens):
            assert_close(got[start:start + n], refs[row][:n], f"request {row} prefill (len {n})")
            start += n
        for step in range(4):
            rows = list(seqs)
            out = runner.decode(ours, [(row, seqs[row][n + step]) for row, n in zip(rows, lens)])
            for i, (row, n) in enumerate(zip(rows, lens)):
                assert_close(out[i], refs[row][n + step], f"request {row} decode step {step}")
        late = tokens(9, seed=49)
        out = runner.extend(ours, [(6, late), (2, [seqs[2][lens[1] + 4]])], mode="MIXED")
        assert_close(out[:9], hf_incremental_logits(hf, late), "late request prefill in a mixed batch")
        assert_close(out[9], refs[2][lens[1] + 4], "request 2 decode in a mixed batch")
    assert paths == {"folded": 6 * cfg.num_hidden_layers, "per_request": 0}  # 6 forwards


def test_long_context_rule(sgl_env, monkeypatch):
    """Context length > keep_window_size: batches whose requests all fit the window run folded,
    a batch holding a longer request runs per request with transformers' top-k window, and a
    CUDA-graph capture fails with a clear error. Context length <= keep_window_size: never
    windowed, capture allowed."""
    cfg = tiny_config(**WINDOWED)  # keep 6, context length 256
    hf = make_hf(cfg, seed=8)
    ours = make_ours(cfg, hf)
    attn = ours.model.layers[0].self_attn
    assert attn.windowed and attn.context_len == 256
    a, b = tokens(10, seed=51), tokens(7, seed=52)
    ref_a, ref_b = hf_incremental_logits(hf, a), hf_incremental_logits(hf, b)
    runner = SglRunner(cfg)
    layers = cfg.num_hidden_layers
    with attention_paths(ours) as paths:
        got = runner.extend(ours, [(1, a[:4]), (2, b[:6])])  # 4 and 6 keys: within the window
        assert paths == {"folded": layers, "per_request": 0}
        assert_close(got[:4], ref_a[:4], "A within the window")
        assert_close(got[4:], ref_b[:6], "B within the window")
        got = runner.extend(ours, [(1, a[4:9]), (2, [b[6]])], mode="MIXED")  # A: 9 keys > 6
        assert paths == {"folded": layers, "per_request": layers}
        assert_close(got[:5], ref_a[4:9], "A past the window (top-k)")
        assert_close(got[5], ref_b[6], "B decode in a windowed batch")
        # the window changes the result: folded attention here would be wrong
        assert (ref_a[8] - hf_incremental_logits(make_hf(tiny_config(), seed=8), a)[8]).abs().max() > 1e-3
        monkeypatch.setattr(config, "capturing_cuda_graph", lambda: True)
        with pytest.raises(RuntimeError, match="--disable-cuda-graph or --context-length 6"):
            runner.decode(ours, [(1, a[9])])
    # the server's context length (SGLang writes it into the HF config) within the window
    cfg_short = tiny_config(**WINDOWED)
    cfg_short.context_len = 6
    short = make_ours(cfg_short, make_hf(cfg_short, seed=8))
    assert not short.model.layers[0].self_attn.windowed
    with attention_paths(short) as paths:  # "capturing" (patched above): folded, no error
        got = SglRunner(cfg_short).extend(short, [(1, a[:6])])
    assert paths == {"folded": layers, "per_request": 0}
    assert_close(got, ref_a[:6], "context length = keep_window_size")


def test_folded_attention_refuses_what_it_cannot_serve(sgl_env, monkeypatch):
    """Clear one-line errors: an unverified attention backend, a quantized KV cache, a KV
    pool whose key rows were not widened (the plugin's hook did not run)."""
    import types

    import sglang.srt.runtime_context as rc

    from sglang_moe_routing.models.doge_attention import check_folded_server_args

    def serve(**kw):  # the fields the check reads, as the scheduler's published record has
        fields = dict(attention_backend=None, prefill_attention_backend=None,
                      decode_attention_backend=None, kv_cache_dtype="auto")
        monkeypatch.setattr(rc, "get_server_args", lambda: types.SimpleNamespace(**{**fields, **kw}))

    cfg = tiny_config()
    for backend in (None, "torch_native", "triton"):
        serve(attention_backend=backend)
        check_folded_server_args()
    serve(attention_backend="flashinfer")
    with pytest.raises(ValueError, match="attention backend flashinfer .*--attention-backend triton"):
        make_ours(cfg)
    serve(attention_backend="triton", decode_attention_backend="fa3")
    with pytest.raises(ValueError, match="attention backend fa3"):
        check_folded_server_args()
    serve(kv_cache_dtype="fp8_e4m3")
    with pytest.raises(ValueError, match="--kv-cache-dtype fp8_e4m3"):
        check_folded_server_args()
    monkeypatch.undo()
    ours = make_ours(cfg, make_hf(cfg))
    with pytest.raises(RuntimeError, match="key rows are 16 wide, .* needs 32"):
        SglRunner(cfg, widen=False).extend(ours, [(1, tokens(3, seed=1))])


def test_transformers_cdmoe_mixes_tokens_and_ours_does_not(sgl_env):
    """Documents transformers' behaviour (docs: "Model integration (Doge)"): its CDMoE output
    for a token depends on other tokens of the forward (later ones, other sequences)."""
    cfg = tiny_config()
    hf = make_hf(cfg, seed=4)
    ours = make_ours(cfg, hf)
    hf_block, block = hf.model.layers[0].mlp, ours.model.layers[0].mlp
    g = torch.Generator().manual_seed(8)
    h = torch.randn(2, 5, cfg.hidden_size, generator=g)
    h2 = h.clone()
    h2[1] = torch.randn(5, cfg.hidden_size, generator=g)  # change only the second sequence
    with torch.no_grad():
        hf_1, hf_2 = hf_block(h)[0], hf_block(h2)[0]
        ours_1, ours_2 = block(h.reshape(10, -1)), block(h2.reshape(10, -1))
    assert not torch.allclose(hf_1[0], hf_2[0], atol=1e-4), (
        "transformers' DogeCDMoE no longer mixes sequences: update docs/omni_router.md"
    )
    assert torch.equal(ours_1[:5], ours_2[:5])
    # and transformers' own prefill disagrees with its own token-by-token decoding
    ids = tokens(12, seed=13)
    diff = (hf_full_logits(hf, ids) - hf_incremental_logits(hf, ids)).abs().max()
    assert diff > 1e-3


# ----------------------------------------------------------------------------- backend flag


def test_omni_cli_args_and_section():
    parser = argparse.ArgumentParser()
    omni_hooks.add_cli_args(parser.add_argument_group("x"))
    assert omni_hooks.parse_section(parser.parse_args([])) == {"omni": OmniConfig("auto")}
    for b in ("auto", "triton", "torch", "reference"):
        args = parser.parse_args(["--omni-router-backend", b])
        section = omni_hooks.parse_section(args)["omni"]
        assert section.backend == b and b in section.describe()
    with pytest.raises(SystemExit):
        parser.parse_args(["--omni-router-backend", "cuda"])
    with pytest.raises(ValueError, match="--omni-router-backend"):
        omni_hooks.parse_section(argparse.Namespace(omni_router_backend="cuda"))
    with pytest.raises(ValueError, match="--omni-router-backend"):
        OmniConfig("naive")
    with pytest.raises(Exception):
        OmniConfig("auto").backend = "torch"  # frozen


def test_model_reads_backend_from_section_and_backends_agree(sgl_env):
    cfg = tiny_config()
    hf = make_hf(cfg, seed=5)
    ids = tokens(10, seed=14)
    seen, logits = [], {}
    try:
        for backend in ("auto", "torch", "triton"):
            config.set_sections({"omni": OmniConfig(backend)} if backend != "auto" else None)
            ours = make_ours(cfg, hf)
            block = ours.model.layers[0].mlp
            assert block.backend == backend
            real = block._omni_router

            def spy(*a, _real=real, **kw):
                seen.append(kw["backend"])
                return _real(*a, **kw)

            block._omni_router = spy
            logits[backend] = SglRunner(cfg).extend(ours, [(1, ids)])
    finally:
        config.set_sections(None)
    assert seen[0] == "auto" and "torch" in seen and "triton" in seen
    assert_close(logits["torch"], logits["auto"], "torch vs auto")
    assert_close(logits["triton"], logits["torch"], "triton (interpreter) vs torch")


def test_model_logs_the_omni_backend_it_will_run_once_at_build(sgl_env, caplog):
    """The start-up line benchmark/bench_one_batch_doge.py checks: one per model, naming the
    resolved backend (auto -> torch on CPU tensors; triton runs here under TRITON_INTERPRET)."""
    import logging

    from sglang_moe_routing.models.doge import resolved_backend

    cfg = tiny_config(num_hidden_layers=3)
    want = {"auto": "torch", "torch": "torch", "reference": "reference", "triton": "triton"}
    try:
        for backend, resolved in want.items():
            config.set_sections({"omni": OmniConfig(backend)})
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="sglang_moe_routing"):
                make_ours(cfg)
            lines = [r.getMessage() for r in caplog.records if "Omni router" in r.getMessage()]
            assert lines == [f"sglang-moe-routing: Doge CDMoE: 3 of 3 layers route with the Omni "
                             f"router, backend={resolved} (--omni-router-backend {backend}; "
                             f"n=8, top_k=8)"]
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="sglang_moe_routing"):
            make_ours(tiny_config(is_moe=False))
        assert not [r for r in caplog.records if "Omni router" in r.getMessage()]
    finally:
        config.set_sections(None)
    w64 = torch.empty(2, 8, dtype=torch.float64)
    assert resolved_backend(w64, 8, 8, "torch") == "torch"
    assert resolved_backend(w64, 8, 8, "triton").startswith("triton (cannot run: omni_router: "
                                                             "backend='triton' cannot run here: dtype")


# ----------------------------------------------------------------------------- registration


def test_plugin_registers_doge_with_sglang(sgl_env, tmp_path):
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.models.registry import import_model_classes
    from sglang.srt.plugins import load_plugins
    from sglang.srt.plugins.hook_registry import HookRegistry
    from sglang.srt.server_args import prepare_server_args

    from sglang_moe_routing.models.doge import DogeForCausalLM

    load_plugins()
    assert omni_hooks.GET_MODEL_ARCHITECTURE in HookRegistry._patched
    # SGLang has no Doge of its own: without us it would fall back to transformers
    assert "DogeForCausalLM" not in import_model_classes("sglang.srt.models")
    assert import_model_classes(omni_hooks.MODEL_PACKAGE) == {"DogeForCausalLM": DogeForCausalLM}

    make_hf(tiny_config()).save_pretrained(tmp_path)
    from sglang.srt.model_loader import utils as loader_utils

    mc = ModelConfig(str(tmp_path))
    assert (mc.head_dim, mc.v_head_dim) == (16, 16)
    cls, arch = loader_utils.get_model_architecture(mc)
    assert cls is DogeForCausalLM and arch == "DogeForCausalLM"
    # the same hook sizes the KV pool's key rows for the folded bias; the model's head_dim stays
    assert (mc.head_dim, mc.v_head_dim, mc.hf_text_config.head_dim) == (32, 16, 16)
    loader_utils.get_model_architecture(mc)
    assert (mc.head_dim, mc.v_head_dim) == (32, 16)  # idempotent

    sa = prepare_server_args(["--model-path", "dummy", "--omni-router-backend", "torch"])
    assert config.sections_from_server_args(sa)["omni"] == OmniConfig("torch")
    parser = argparse.ArgumentParser()
    from sglang.srt.server_args import ServerArgs

    ServerArgs.add_cli_args(parser)
    assert "--omni-router-backend" in parser.format_help()


# ----------------------------------------------------------------------------- server


def _hf_greedy(hf: HFDoge, prompt, n_new):
    cache, out = DynamicCache(config=hf.config), []
    with torch.no_grad():
        logits = None
        for t in prompt:
            logits = hf(torch.tensor([[t]]), past_key_values=cache, use_cache=True).logits[0, -1]
        for _ in range(n_new):
            nxt = int(logits.argmax())
            out.append(nxt)
            logits = hf(torch.tensor([[nxt]]), past_key_values=cache, use_cache=True).logits[0, -1]
    return out


@pytest.mark.slow
def test_launch_server_on_cpu_generates_transformers_tokens(tmp_path):
    """``python -m sglang.launch_server`` with a tiny random Doge-MoE on CPU (torch_native
    attention; CPU graphs off, they are no CUDA graphs): our class serves it through the
    folded RadixAttention path (the plugin widens the KV pool's key rows) and greedy tokens
    of two batched requests equal transformers'."""
    cfg = tiny_config()  # keep_window_size = max_position_embeddings: never windowed
    hf = make_hf(cfg, seed=6)
    model_dir = tmp_path / "tiny_doge_moe"
    hf.save_pretrained(model_dir)
    prompts = [tokens(12, seed=31), tokens(5, seed=32)]
    expected = [_hf_greedy(hf, p, 10) for p in prompts]

    port = free_port()
    log_path = tmp_path / "server.log"
    env = {k: v for k, v in os.environ.items() if k != "SGLANG_USE_CPU_ENGINE"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_dir),
             "--device", "cpu", "--attention-backend", "torch_native", "--disable-cuda-graph",
             "--dtype", "float32", "--skip-tokenizer-init", "--max-total-tokens", "4096",
             "--host", "127.0.0.1", "--port", str(port), "--omni-router-backend", "torch"],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )
    try:
        deadline = time.time() + 400
        while True:
            assert proc.poll() is None, log_path.read_text()[-4000:]
            assert time.time() < deadline, "server did not come up:\n" + log_path.read_text()[-4000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except Exception:
                time.sleep(2)
        body = json.dumps({"input_ids": prompts,
                           "sampling_params": {"max_new_tokens": 10, "temperature": 0}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/generate", data=body,
                                     headers={"Content-Type": "application/json"})
        out = json.loads(urllib.request.urlopen(req, timeout=300).read())
        assert [o["output_ids"] for o in out] == expected
        text = log_path.read_text()
        assert "type=DogeForCausalLM" in text and "TransformersForCausalLM" not in text
        assert "omni router: backend=torch" in text
        assert "keep_window_size" not in text  # no windowed-attention warning
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
