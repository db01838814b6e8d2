"""The routing modes of ``benchmark/eval_routing_quality.py`` and how they reach the model:
``Mode`` / ``DEFAULT_MODES`` (``tc``, ``ec*``, ``hybrid``, ``thr``), ``RoutingState`` (what the
patched routers route with and record), ``route`` (one router's logits through our dispatch
functions), ``patch_routers`` (every ``Qwen3MoeTopKRouter.forward`` of a transformers model
replaced while inside), and ``routing_timings`` (routing time per call of each method, with
SGLang's ``topk_softmax`` when it is available). The eval's module docstring says what each
mode computes and why the routing path matches SGLang's ``TopK`` for Qwen3-MoE.
"""

from __future__ import annotations

import contextlib
import time
import types
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from sglang_moe_routing.expert_choice import (
    RoutingSpec,
    expert_choice_topk,
    token_choice_topk_reference,
)
from sglang_moe_routing.expert_choice.dispatch import resolve_backend
from sglang_moe_routing.expert_choice.reference import (
    capacity,
    compute_scores,
    expert_pick_mask,
    num_valid_tokens,
)
from sglang_moe_routing.expert_choice.threshold import calibrate_bias, threshold_topk


DEFAULT_MIN_TOKENS = 32  # the plugin's default (integration/expert_choice_hooks.py)


# ----------------------------------------------------------------------------- routing patch


@dataclass(frozen=True)
class Mode:
    name: str
    kind: str  # "tc" | "ec" | "thr" (per-expert selection biases, calibrated)
    capacity_factor: float = 1.25
    min_tokens: int = 0


DEFAULT_MODES = (
    Mode("tc", "tc"),
    Mode("ec1.0", "ec", 1.0, 0),
    Mode("ec1.25", "ec", 1.25, 0),
    Mode("ec1.5", "ec", 1.5, 0),
    Mode("ec2.0", "ec", 2.0, 0),
    Mode(f"hybrid(cf1.25,min{DEFAULT_MIN_TOKENS})", "ec", 1.25, DEFAULT_MIN_TOKENS),
    Mode("thr", "thr"),
)


class RoutingState:
    """What the patched routers route with, and what they record (per layer, per forward).

    ``biases``: ``{layer index: [E] fp32}`` for ``thr`` modes; while ``calibrating`` a layer
    without a bias calibrates one on the logits it sees (``calibrate_bias``) and routes with
    it, so later layers calibrate on the hidden states the earlier layers' routing produces.
    For ``ec`` modes the routers also record which output slots the experts picked (the rest
    are fallback slots, step 4 of the contract). ``capture_rows``: the ids of the first that
    many rows are kept per forward (``captured``; the batch-invariance prompt).
    """

    def __init__(self, mode: Mode, backend: str = "auto",
                 biases: Optional[Dict[int, torch.Tensor]] = None, cal_iters: int = 300):
        self.mode = mode
        self.backend = backend
        self.biases: Dict[int, torch.Tensor] = dict(biases or {})
        self.calibrating = False
        self.cal_iters = cal_iters
        self.cal_info: Dict[int, Dict[str, float]] = {}
        self.counts: List[torch.Tensor] = []  # [E] int64 per (layer, forward)
        self.picked_counts: List[torch.Tensor] = []  # [E] int64, picked slots only (ec)
        self.fallback: List[torch.Tensor] = []  # 0-d int64: fallback slots (ec)
        self.rows: set = set()  # T seen by the routers
        self.record = True
        self.capture_rows = 0
        self.captured: List[torch.Tensor] = []

    def reset(self) -> None:
        self.counts, self.rows = [], set()

    def load_stats(self) -> Dict[str, float]:
        if not self.counts:
            return dict(load_max_mean=float("nan"), load_max_mean_worst=float("nan"))
        c = torch.stack(self.counts).float()
        r = c.max(-1).values / c.mean(-1)
        out = dict(load_max_mean=r.mean().item(), load_max_mean_worst=r.max().item())
        if self.picked_counts:
            pc = torch.stack(self.picked_counts).float()
            out["picked_load_max_mean"] = (pc.max(-1).values / c.mean(-1)).mean().item()
            out["fallback_share"] = (torch.stack(self.fallback).sum() / c.sum()).item()
        return out


def route(router, logits: torch.Tensor, state: RoutingState) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(weights fp32 [T,k], ids int32 [T,k])`` for one router's logits under ``state.mode``."""
    mode = state.mode
    if mode.kind == "tc":
        return token_choice_topk_reference(logits, RoutingSpec(
            router.top_k, renormalize=bool(router.norm_topk_prob), scoring_func="softmax"))
    if mode.kind == "thr":
        layer = router._layer_idx
        if layer not in state.biases:
            if not state.calibrating:
                raise ValueError(f"threshold mode {mode.name}: layer {layer} has no calibrated "
                                 "bias (run calibrate_threshold first)")
            hist: List[Dict[str, float]] = []
            state.biases[layer] = calibrate_bias(logits, router.top_k, iters=state.cal_iters,
                                                 history=hist)
            state.cal_info[layer] = dict(start=hist[0]["load_max_mean"],
                                         best=min(h["load_max_mean"] for h in hist))
        return threshold_topk(logits, router.top_k, state.biases[layer],
                              renormalize=bool(router.norm_topk_prob), scoring_func="softmax")
    return expert_choice_topk(
        logits, router.top_k, mode.capacity_factor, renormalize=bool(router.norm_topk_prob),
        scoring_func="softmax", min_tokens=mode.min_tokens, backend=state.backend)


def picked_slots(logits: torch.Tensor, ids: torch.Tensor, mode: Mode) -> torch.Tensor:
    """``[T, k]`` bool: the expert in that slot picked the token (expert-choice step 3);
    False = a fallback slot (step 4). Recomputed with the reference's steps."""
    t, e = logits.shape
    _, select = compute_scores(logits, "softmax")
    cap = capacity(num_valid_tokens(t, None, logits.device), e, ids.shape[1],
                   mode.capacity_factor, mode.min_tokens)
    valid = torch.ones(t, dtype=torch.bool, device=logits.device)
    return expert_pick_mask(select, valid, cap).gather(1, ids.long())


def _patched_router_forward(self, hidden_states):
    """Drop-in for ``Qwen3MoeTopKRouter.forward``: same logits, routing through our functions."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, self.weight)
    state: RoutingState = self._routing_state
    weights, ids = route(self, router_logits, state)
    if state.record:
        state.counts.append(torch.bincount(ids.reshape(-1).long(), minlength=self.num_experts))
        state.rows.add(int(router_logits.shape[0]))
        if state.mode.kind == "ec":
            pk = picked_slots(router_logits, ids, state.mode)
            state.picked_counts.append(
                torch.bincount(ids[pk].long(), minlength=self.num_experts))
            state.fallback.append((~pk).sum())
    if state.capture_rows:
        state.captured.append(ids[:state.capture_rows].sort(-1).values)
    return router_logits, weights.to(router_logits.dtype), ids.long()


def routers(model) -> List[torch.nn.Module]:
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    found = [m for m in model.modules() if isinstance(m, Qwen3MoeTopKRouter)]
    if not found:
        raise ValueError("no Qwen3MoeTopKRouter in the model")
    return found


@contextlib.contextmanager
def patch_routers(model, state: RoutingState) -> Iterator[RoutingState]:
    """Route every Qwen3-MoE layer of ``model`` through our functions while inside."""
    rs = routers(model)
    for i, r in enumerate(rs):
        r._routing_state = state
        r._layer_idx = i
        r.forward = types.MethodType(_patched_router_forward, r)
    try:
        yield state
    finally:
        for r in rs:
            del r.forward  # back to the class's forward
            del r._routing_state
            del r._layer_idx


# ----------------------------------------------------------------------------- routing time


def _time_cpu(fn, iters: int = 20) -> float:
    fn()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    return float(np.median(samples))


def _time_cuda(fn) -> Tuple[float, str]:
    """Microseconds per call: CUDA-graph replay (bench_routing.time_graph), else eager."""
    import bench_routing

    try:
        return bench_routing.time_graph(fn), "cuda graph"
    except Exception:  # noqa: BLE001 - not capturable: time it eagerly
        torch.cuda.synchronize()
        for _ in range(5):
            fn()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(100):
            fn()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) * 1000.0 / 100, "eager"


def _torch_topk(x: torch.Tensor, top_k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token choice as transformers' Qwen3-MoE router computes it (softmax, top-k, renorm)."""
    v, i = torch.topk(torch.softmax(x, dtype=torch.float, dim=-1), top_k, dim=-1)
    return v / v.sum(-1, keepdim=True), i


def routing_timings(num_experts: int, top_k: int, bias: torch.Tensor, device, backend: str,
                    tokens: Sequence[int], sglang_dir: Optional[str], seed: int = 0,
                    compile_thr: bool = False) -> List[Dict]:
    """Routing time per call (bf16 logits ``[T, E]``) of token choice (torch), the ``thr``
    mode (eager, and ``torch.compile`` with ``compile_thr``), expert choice (dispatch, cf 1.25)
    and, when available, SGLang's fused ``topk_softmax`` without and with the ``thr`` bias as
    its ``correction_bias``. SGLang's kernel adds that bias to the LOGITS before the softmax
    (its weights come from the biased softmax), which is not ``thr``'s rule (bias added to
    the softmax scores for selection only): the row records on how many rows its ids still
    equal ``threshold_topk``'s."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    bias = bias.to(device).float()
    sg = None
    if device.type == "cuda":
        try:
            import bench_routing

            sg = bench_routing.sglang_topk_softmax(sglang_dir or "/nonexistent-sglang-dir")
        except Exception as exc:  # noqa: BLE001
            print(f"[eval] SGLang topk_softmax unavailable ({exc!r})", flush=True)
    compiled = None
    if device.type == "cuda" and compile_thr:
        try:
            compiled = torch.compile(threshold_topk)
        except Exception as exc:  # noqa: BLE001
            print(f"[eval] torch.compile unavailable ({exc!r})", flush=True)
    out = []
    for t in tokens:
        x = torch.randn(t, num_experts, generator=g).to(device, torch.bfloat16)
        fns = {
            "tc: torch softmax+topk (transformers' router)": lambda: _torch_topk(x, top_k),
            "thr: threshold_topk (eager)": lambda: threshold_topk(x, top_k, bias),
            f"ec1.25: expert_choice_topk ({resolve_backend(x, top_k, backend)})":
                lambda: expert_choice_topk(x, top_k, 1.25, backend=backend),
        }
        if compiled is not None:
            fns["thr: threshold_topk (torch.compile)"] = lambda: compiled(x, top_k, bias)
        notes = {}
        if sg is not None:
            tw = torch.empty(t, top_k, dtype=torch.float32, device=device)
            ti = torch.empty(t, top_k, dtype=torch.int32, device=device)
            fns["tc: SGLang topk_softmax"] = lambda: sg(tw, ti, x, True)
            try:
                sg(tw, ti, x, True, 0.0, bias)
                _, ref_ids = threshold_topk(x, top_k, bias)
                same = (ti.sort(-1).values == ref_ids.sort(-1).values).all(-1).float().mean()
                notes["sglang_bias_ids_equal_thr"] = same.item()
                fns["SGLang topk_softmax + correction_bias (bias on logits)"] = \
                    lambda: sg(tw, ti, x, True, 0.0, bias)
            except Exception as exc:  # noqa: BLE001
                notes["sglang_bias_error"] = repr(exc)[:200]
        for name, fn in fns.items():
            try:
                us, how = _time_cuda(fn) if device.type == "cuda" else (_time_cpu(fn), "cpu")
            except Exception as exc:  # noqa: BLE001
                print(f"[eval] timing {name} T={t} failed: {exc!r}", flush=True)
                continue
            out.append(dict(T=t, method=name, us=us, timed=how, **notes))
    return out
