"""Shared pieces of the Doge model tests (``test_doge_model.py``): a single-rank SGLang
environment, tiny transformers Doge configs and models, a driver that runs our model through
SGLang's pools and ``ForwardBatch``, and transformers references. Imports sglang and
transformers' Doge: import it after ``pytest.importorskip`` of both."""

from __future__ import annotations

import contextlib
import socket
import types

import pytest
import torch
from transformers import DogeConfig
from transformers import DogeForCausalLM as HFDoge
from transformers import DynamicCache
from transformers.models.doge import modeling_doge

from sglang_moe_routing.integration import config


VOCAB = 128


# ----------------------------------------------------------------------------- environment


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sgl_env():
    """Published server args + single-rank gloo TP/PP groups, as a scheduler process has."""
    from sglang.srt.distributed import parallel_state as ps

    with config.published_server_args() as server_args:
        owns_world = not torch.distributed.is_initialized()
        ps.init_distributed_environment(
            world_size=1,
            rank=0,
            local_rank=0,
            distributed_init_method=f"tcp://127.0.0.1:{free_port()}",
            backend="gloo",
        )
        ps.initialize_model_parallel()
        try:
            yield server_args
        finally:
            ps.destroy_model_parallel()
            if owns_world:
                ps.destroy_distributed_environment()


# ----------------------------------------------------------------------------- models


def tiny_config(**overrides) -> DogeConfig:
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        is_moe=True,
        num_experts=64,
        num_experts_per_tok=8,
        max_position_embeddings=256,
        # = max_position_embeddings (as Doge's released configs): no request can pass the
        # window, attention runs folded in RadixAttention. WINDOWED turns the top-k on.
        keep_window_size=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=VOCAB - 1,
    )
    kw.update(overrides)
    return DogeConfig(**kw)


# sequences in the tests are longer than 6: transformers' top-k window is exercised and batches
# holding such a request run the per-request path
WINDOWED = dict(keep_window_size=6)


def make_hf(cfg: DogeConfig, seed: int = 0) -> HFDoge:
    """transformers' model with the parameters its init leaves trivial made non-trivial:
    ``A`` (zero: the dynamic mask would be a constant), residual scales and norms (ones)."""
    torch.manual_seed(seed)
    cfg._attn_implementation = "eager"
    model = HFDoge(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".A"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith("_residual") or name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif "router_gate" in name:
                p.mul_(20.0)  # well separated expert scores
    return model


def make_ours(cfg: DogeConfig, hf: HFDoge = None):
    from sglang_moe_routing.models.doge import DogeForCausalLM

    model = DogeForCausalLM(cfg).eval()
    if hf is not None:
        loaded = model.load_weights(hf.state_dict().items())
        assert loaded == set(dict(model.named_parameters()).keys())
    return model


# ----------------------------------------------------------------------------- SGLang batches


class SglRunner:
    """Drives our model through SGLang's pools and ForwardBatch, one request id per sequence."""

    def __init__(self, cfg: DogeConfig, num_slots: int = 512, max_len: int = 128, widen: bool = True):
        from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
        from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool

        from sglang_moe_routing.models.doge_attention import folded_head_dim

        head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.req_to_token = ReqToTokenPool(
            size=8, max_context_len=max_len, device="cpu", enable_memory_saver=False
        )
        self.kv = MHATokenToKVPool(
            size=num_slots,
            page_size=1,
            dtype=torch.float32,
            head_num=cfg.num_key_value_heads,
            # the key rows carry the bias channel (the plugin's hook widens them in a server)
            head_dim=folded_head_dim(head_dim) if widen else head_dim,
            v_head_dim=head_dim,
            layer_num=cfg.num_hidden_layers,
            device="cpu",
            enable_memory_saver=False,
        )
        runner = types.SimpleNamespace(
            device="cpu", req_to_token_pool=self.req_to_token, token_to_kv_pool=self.kv
        )
        self.backend = TorchNativeAttnBackend(runner)
        self.next_slot = 1  # slot 0 is SGLang's padding slot
        self.lens = {}  # request row -> tokens in cache
        # scatter slots over the pool so a request's keys are not contiguous
        self.slot_order = torch.randperm(num_slots - 1, generator=torch.Generator().manual_seed(7)) + 1

    def _alloc(self, row: int, n: int) -> torch.Tensor:
        slots = self.slot_order[self.next_slot - 1 : self.next_slot - 1 + n].long()
        self.next_slot += n
        start = self.lens.get(row, 0)
        self.req_to_token.req_to_token[row, start : start + n] = slots.int()
        self.lens[row] = start + n
        return slots

    def _run(self, model, fb, ids, positions, full_logits: bool):
        from sglang.srt.model_executor.forward_context import ForwardContext, forward_context

        with forward_context(ForwardContext(attn_backend=self.backend)), torch.no_grad():
            if full_logits:
                hidden = model.model(ids, positions, fb)
                return hidden @ model.lm_head.weight.t()
            return model(ids, positions, fb).next_token_logits

    def extend(self, model, reqs, full_logits: bool = True, mode: str = "EXTEND") -> torch.Tensor:
        """``reqs``: [(row, new token ids)]; returns logits of every new token, in order.
        ``mode="MIXED"`` is SGLang's chunked prefill + decode batch (decode rows: 1 token)."""
        from sglang.srt.model_executor.forward_batch_info import (
            CaptureHiddenMode,
            ForwardBatch,
            ForwardMode,
        )

        prefix = [self.lens.get(r, 0) for r, _ in reqs]
        new = [len(t) for _, t in reqs]
        slots = torch.cat([self._alloc(r, len(t)) for r, t in reqs])
        ids = torch.tensor([tok for _, t in reqs for tok in t], dtype=torch.long)
        positions = torch.cat([torch.arange(p, p + n) for p, n in zip(prefix, new)])
        seq = [p + n for p, n in zip(prefix, new)]
        starts = torch.tensor([0] + new[:-1]).cumsum(0)
        fb = ForwardBatch(
            forward_mode=getattr(ForwardMode, mode),
            batch_size=len(reqs),
            input_ids=ids,
            req_pool_indices=torch.tensor([r for r, _ in reqs]),
            seq_lens=torch.tensor(seq),
            seq_lens_cpu=torch.tensor(seq),
            out_cache_loc=slots,
            seq_lens_sum=sum(seq),
            positions=positions,
            extend_num_tokens=sum(new),
            extend_seq_lens=torch.tensor(new),
            extend_prefix_lens=torch.tensor(prefix),
            extend_start_loc=starts,
            extend_seq_lens_cpu=new,
            extend_prefix_lens_cpu=prefix,
            extend_logprob_start_lens_cpu=new,
            capture_hidden_mode=CaptureHiddenMode.NULL,
        )
        return self._run(model, fb, ids, positions, full_logits)

    def decode(self, model, reqs) -> torch.Tensor:
        """``reqs``: [(row, token id)]; returns ``[len(reqs), vocab]``."""
        from sglang.srt.model_executor.forward_batch_info import (
            CaptureHiddenMode,
            ForwardBatch,
            ForwardMode,
        )

        slots = torch.cat([self._alloc(r, 1) for r, _ in reqs])
        seq = [self.lens[r] for r, _ in reqs]
        ids = torch.tensor([t for _, t in reqs], dtype=torch.long)
        positions = torch.tensor(seq) - 1
        fb = ForwardBatch(
            forward_mode=ForwardMode.DECODE,
            batch_size=len(reqs),
            input_ids=ids,
            req_pool_indices=torch.tensor([r for r, _ in reqs]),
            seq_lens=torch.tensor(seq),
            seq_lens_cpu=torch.tensor(seq),
            out_cache_loc=slots,
            seq_lens_sum=sum(seq),
            positions=positions,
            capture_hidden_mode=CaptureHiddenMode.NULL,
        )
        return self._run(model, fb, ids, positions, full_logits=False)


@contextlib.contextmanager
def attention_paths(model):
    """Counts the layer calls of each attention path: ``{"folded", "per_request"}``."""
    counts = {"folded": 0, "per_request": 0}
    layers = [layer.self_attn for layer in model.model.layers]
    for a in layers:
        def folded(*x, _orig=a.attn.forward, **kw):
            counts["folded"] += 1
            return _orig(*x, **kw)

        def per_request(*x, _orig=a._forward_per_request, **kw):
            counts["per_request"] += 1
            return _orig(*x, **kw)

        a.attn.forward = folded
        a._forward_per_request = per_request
    try:
        yield counts
    finally:
        for a in layers:
            del a.attn.forward
            del a._forward_per_request


# ----------------------------------------------------------------------------- references


def hf_incremental_logits(hf: HFDoge, ids) -> torch.Tensor:
    """transformers, unmodified, one token per forward with its KV cache: ``[L, vocab]``."""
    cache = DynamicCache(config=hf.config)
    out = []
    with torch.no_grad():
        for t in ids:
            out.append(hf(torch.tensor([[t]]), past_key_values=cache, use_cache=True).logits[0, -1])
    return torch.stack(out)


def hf_full_logits(hf: HFDoge, ids) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


@contextlib.contextmanager
def hf_cdmoe_per_token():
    """transformers' own ``DogeCDMoE.forward`` applied to one token at a time."""
    original = modeling_doge.DogeCDMoE.forward

    def per_token(self, hidden_states, **kwargs):
        b, l, h = hidden_states.shape
        flat = hidden_states.reshape(b * l, 1, 1, h)
        outs = [original(self, tok, **kwargs)[0] for tok in flat]
        return torch.cat(outs).reshape(b, l, h), None

    modeling_doge.DogeCDMoE.forward = per_token
    try:
        yield
    finally:
        modeling_doge.DogeCDMoE.forward = original


def tokens(n: int, seed: int):
    """Distinct token ids: a repeated token has the same value vector in layer 0, hence the
    same dynamic-mask bias, and a tie at the ``keep_window_size`` cut, which transformers
    breaks arbitrarily (``torch.topk``; its prefill and decoding can disagree there)."""
    perm = torch.randperm(VOCAB - 2, generator=torch.Generator().manual_seed(seed)) + 1
    return perm[:n].tolist()


def assert_close(a, b, what, atol=2e-5, rtol=1e-4):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")
