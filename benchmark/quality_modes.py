"""The routing modes of ``benchmark/eval_routing_quality.py`` and how they reach the model:
``Mode`` / ``DEFAULT_MODES`` (``tc``, ``ec*``, ``hybrid``, ``thr``), ``RoutingState`` (what the
patched routers route with and record), ``SglangTopK`` (SGLang's own ``TopK`` layers with the
plugin's hooks: the ``sglang`` router path), ``route`` (one router's logits through SGLang's
``TopK`` or through our dispatch functions), ``patch_routers`` (every ``Qwen3MoeTopKRouter.forward``
of a transformers model replaced while inside), and ``routing_timings`` (routing time per call of each method, with
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


# the plugin's default min-tokens (auto, integration/expert_choice_flags.py) for the models
# trained here: max(32, 4 * E / k) = 32 at E = 32, k = 4
DEFAULT_MIN_TOKENS = 32
ROUTER_PATHS = ("auto", "sglang", "dispatch")
SGLANG_KINDS = ("tc", "ec")  # the mode kinds SGLang's TopK + the plugin serve (thr is ours)


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
                 biases: Optional[Dict[int, torch.Tensor]] = None, cal_iters: int = 300,
                 sglang: Optional["SglangTopK"] = None):
        self.mode = mode
        self.backend = backend
        self.sglang = sglang  # route tc / ec modes through SGLang's TopK (None: dispatch)
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


def one_rank_tp_group():
    """``get_parallel().override(tp_group=...)`` with the tensor-parallel group a 1-rank run has
    (world size 1, rank 0), for this process without SGLang's distributed init.

    SGLang's ``TopK.forward_cuda`` reads ``get_parallel().tp_group`` for
    ``use_symmetric_memory`` on its standard-output branch, which raises until distributed init
    writes the group (``forward_native``, the CPU path, does not read it). The value is group
    metadata only, as SGLang's own ``sglang/test/parallel_groups.py`` states groups for tests
    without distributed groups: ``use_symmetric_memory`` reads at most ``world_size`` and
    turns itself off at 1. SGLang's ``override`` checks it against the published ``tp_size``
    and restores the previous values on exit."""
    from sglang.srt.runtime_context import get_parallel

    return get_parallel().override(
        tp_group=types.SimpleNamespace(rank_in_group=0, world_size=1))


class SglangTopK:
    """The ``sglang`` router path: SGLang's own ``sglang.srt.layers.moe.topk.TopK``, one per MoE
    layer, built as SGLang's ``qwen3_moe`` model builds it (``top_k = num_experts_per_tok``,
    ``renormalize = norm_topk_prob``, ``use_grouped_topk=False``, ``layer_id``; default scoring
    ``softmax``, no correction bias, no routed scaling; output format STANDARD, what SGLang's
    triton MoE runner binds), with the plugin registered and its routing hooks applied
    (``plugin.install_feature_hooks(force=True)``, as a server with expert choice on) and
    SGLang's server args published in this process (the plugin's
    ``config.published_server_args``, as the demo and the integration tests do) and, on cuda,
    the 1-rank tensor-parallel group ``TopK.forward_cuda`` reads (``one_rank_tp_group``). Token choice is
    upstream's own ``select_experts`` (the plugin's section says expert choice is off); EC /
    hybrid modes set the section (capacity factor, min tokens, backend) so the plugin's hook
    routes inside ``TopK``. Use as a context manager; raises ``ImportError`` without sglang."""

    def __init__(self, device: torch.device):
        import sglang  # noqa: F401 - ImportError here: no sglang

        self.device = device
        self.version = getattr(sglang, "__version__", "?")
        self._stack = contextlib.ExitStack()
        self._layers: Dict[Tuple[int, int, bool], torch.nn.Module] = {}

    def __enter__(self) -> "SglangTopK":
        import logging
        import os
        import warnings

        os.environ.setdefault("SGLANG_LOGGING_LEVEL", "WARNING")
        warnings.filterwarnings("ignore", message="Only CUDA", category=UserWarning)
        from sglang.srt.plugins import load_plugins

        from sglang_moe_routing.integration import config, plugin

        load_plugins()  # our entry point; SGLang logs and skips a failing plugin, so:
        plugin.register()  # raises here (one line) when this sglang is not supported
        plugin.install_feature_hooks(force=True)
        self._stack.enter_context(config.published_server_args(
            "--log-level", "warning", "--device", self.device.type))
        self._stack.callback(config.set_sections, None)
        if self.device.type == "cuda":  # after publishing (it resets the context): LIFO undo
            self._stack.enter_context(one_rank_tp_group())
        logging.getLogger().setLevel(logging.WARNING)
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self._layers.clear()

    def layer(self, layer_idx: int, top_k: int, renormalize: bool) -> torch.nn.Module:
        key = (layer_idx, top_k, renormalize)
        if key not in self._layers:
            from sglang.srt.layers.moe.topk import TopK, TopKOutputFormat

            self._layers[key] = TopK(top_k=top_k, renormalize=renormalize,
                                     use_grouped_topk=False, layer_id=layer_idx,
                                     output_format=TopKOutputFormat.STANDARD)
        return self._layers[key]

    @staticmethod
    def set_mode(mode: Optional[Mode], backend: str = "auto") -> None:
        """The plugin's expert-choice section for ``mode`` (None: back to the published args)."""
        from sglang_moe_routing.integration import config
        from sglang_moe_routing.integration.expert_choice_flags import (
            SECTION,
            ExpertChoiceConfig,
        )

        if mode is None:
            config.set_sections(None)
            return
        ec = mode.kind == "ec"
        config.set_sections({SECTION: ExpertChoiceConfig(
            enabled=ec, capacity_factor=mode.capacity_factor if ec else 1.25,
            min_tokens=mode.min_tokens if ec else DEFAULT_MIN_TOKENS, backend=backend,
            source="cli" if ec else "default")})

    def route(self, router, hidden_states: torch.Tensor, logits: torch.Tensor
              ) -> Tuple[torch.Tensor, torch.Tensor]:
        out = self.layer(router._layer_idx, int(router.top_k),
                         bool(router.norm_topk_prob))(hidden_states, logits)
        return out.topk_weights, out.topk_ids


def probe_router_paths(sglang: SglangTopK, num_experts: int, top_k: int, renormalize: bool,
                       backend: str, device: torch.device, tokens: int = 256,
                       modes: Sequence[Mode] = DEFAULT_MODES, seed: int = 0) -> Dict[str, Dict]:
    """Random router logits ``[tokens, E]`` (bf16 on a GPU, as under the eval's autocast) through
    both paths for every mode the plugin serves: per mode, the share of rows whose expert ids
    are identical (same order) and the largest weight difference. Raises whatever SGLang's
    ``TopK`` raises (the eval then falls back to the dispatch path under ``auto``)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    logits = torch.randn(tokens, num_experts, generator=g).to(device, dtype)
    router = types.SimpleNamespace(_layer_idx=0, top_k=top_k, norm_topk_prob=renormalize)
    out = {}
    for mode in modes:
        if mode.kind not in SGLANG_KINDS:
            continue
        w_ref, i_ref = route(router, logits, RoutingState(mode, backend))
        sglang.set_mode(mode, backend)
        try:
            w, i = route(router, logits, RoutingState(mode, backend, sglang=sglang))
        finally:
            sglang.set_mode(None)
        out[mode.name] = dict(
            rows=tokens, ids_identical=(i.long() == i_ref.long()).all(-1).float().mean().item(),
            max_abs_dweight=(w.float() - w_ref.float()).abs().max().item())
    return out


def resolve_router_path(choice: str, device: torch.device) -> Tuple[str, Optional[SglangTopK], str]:
    """``(path, entered SglangTopK or None, note)`` for ``--router-path``: ``auto`` takes
    SGLang's ``TopK`` when ``import sglang`` works and the plugin sets up (else the dispatch
    path; the note says why); ``sglang`` exits with one line when either fails. The caller
    closes the returned ``SglangTopK`` (``__exit__``)."""
    if choice not in ROUTER_PATHS:
        raise SystemExit(f"error: --router-path must be one of {', '.join(ROUTER_PATHS)}, "
                         f"got {choice!r}")
    if choice == "dispatch":
        return "dispatch", None, "--router-path dispatch"
    try:
        sg = SglangTopK(device)
    except ImportError as exc:
        if choice == "sglang":
            raise SystemExit(f"error: --router-path sglang: sglang is not importable "
                             f"({type(exc).__name__}: {exc}); install sglang or use "
                             "--router-path dispatch") from None
        return "dispatch", None, f"--router-path auto: sglang not importable ({exc})"
    try:
        sg.__enter__()
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - plugin/sglang mismatch
        sg.__exit__(None, None, None)
        msg = " ".join(str(exc).split())[:300]
        if choice == "sglang":
            raise SystemExit(f"error: --router-path sglang: SGLang {sg.version}'s TopK with the "
                             f"plugin could not be set up ({type(exc).__name__}: {msg})") from None
        return "dispatch", None, f"--router-path auto: SGLang setup failed ({msg})"
    return "sglang", sg, f"--router-path {choice}"


def route(router, logits: torch.Tensor, state: RoutingState,
          hidden_states: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(weights fp32 [T,k], ids [T,k])`` for one router's logits under ``state.mode``: through
    SGLang's ``TopK`` when ``state.sglang`` is set and the mode is one the plugin serves, else
    through our functions."""
    mode = state.mode
    if state.sglang is not None and mode.kind in SGLANG_KINDS:
        return state.sglang.route(router, logits if hidden_states is None else hidden_states,
                                  logits)
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
    weights, ids = route(self, router_logits, state, hidden_states)
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
    """Route every Qwen3-MoE layer of ``model`` through ``route`` while inside (SGLang's
    ``TopK`` with the mode's plugin section set when ``state.sglang``, else our functions)."""
    rs = routers(model)
    for i, r in enumerate(rs):
        r._routing_state = state
        r._layer_idx = i
        r.forward = types.MethodType(_patched_router_forward, r)
    if state.sglang is not None:
        state.sglang.set_mode(state.mode, state.backend)
    try:
        yield state
    finally:
        if state.sglang is not None:
            state.sglang.set_mode(None)
        for r in rs:
            del r.forward  # back to the class's forward
            del r._routing_state
            del r._layer_idx


# ----------------------------------------------------------------------------- forward


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def forward_logprobs(model, x: torch.Tensor, chunk: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run ``x [B, L]`` ``chunk`` tokens at a time (KV cache); next-token log-probs of the
    targets ``[B, L-1]`` (fp32) and the argmax predictions ``[B, L-1]``."""
    from transformers import DynamicCache

    b, length = x.shape
    device = x.device
    with _autocast(device):
        if chunk >= length:
            logits = model(input_ids=x, use_cache=False, output_router_logits=False).logits
        else:
            cache = DynamicCache(config=model.config)
            parts = []
            for s in range(0, length, chunk):
                out = model(input_ids=x[:, s:s + chunk], past_key_values=cache, use_cache=True,
                            output_router_logits=False)
                parts.append(out.logits)
            logits = torch.cat(parts, 1)
    logits = logits[:, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, x[:, 1:, None]).squeeze(-1)
    return lp, logits.argmax(-1)


def mode_path(mode: Mode, sglang: Optional["SglangTopK"]) -> str:
    """The table's router-path column for ``mode``: SGLang's TopK where it routes that kind."""
    return "sglang TopK" if sglang is not None and mode.kind in SGLANG_KINDS else "dispatch"


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
