"""Perplexity, top-1 agreement, expert load and batch invariance of each routing mode on a
trained Qwen3-MoE checkpoint (issue 11, items 2-3), on the held-out split of
``benchmark/train_moe_lm.py``.

Routing path: SGLang's ``TopK`` does not run in this (transformers) process, so each
``Qwen3MoeTopKRouter`` of the model has its ``forward`` replaced (:func:`patch_routers`) by one
that computes the same router logits (``F.linear(h, gate.weight)``) and routes them through
**our dispatch function** ``sglang_moe_routing.expert_choice.expert_choice_topk`` with exactly
the config SGLang's ``TopK`` passes for Qwen3-MoE: ``top_k = num_experts_per_tok``,
``scoring_func="softmax"``, ``renormalize = norm_topk_prob``, no grouping, no correction bias,
no routed scaling; plus the capacity factor and ``min_tokens`` of the mode. Token choice goes
through ``token_choice_topk_reference`` (same scoring and renormalisation; identical to
transformers' own top-k, checked bit for bit in ``test/test_train_moe_lm.py``). The weights are
cast to the router logits' dtype and the ids to int64, as transformers' router returns them.

Modes: ``tc`` (token choice), ``ec1.0``/``ec1.25``/``ec2.0`` (expert choice, ``min_tokens=0``),
``hybrid`` (``cf=1.25``, ``min_tokens=32``: the plugin's defaults).

A "batch" is the set of token rows one MoE layer routes together in one forward. A
composition ``T:BxC`` runs B held-out sequences of ``L`` tokens through the model C tokens at
a time with a KV cache (chunked prefill; ``C=1`` is decode, ``C=L`` a full prefill), so every
forward routes exactly ``T = B*C`` tokens; every composition sees the same sequences and the
same contexts, so perplexities compare across compositions. Pure compositions batch sequences
of one domain (code or prose); ``mixed`` ones interleave the two domains in every batch.
Perplexity is reported over all scored tokens and per domain; top-1 agreement is with token
choice at the same composition; load max/mean is per (layer, forward), averaged (and the worst).

Batch invariance: for a few fixed prompts, 10 batches that each hold the prompt (row 0) and
random other held-out sequences as batch mates (full prefill, ``--inv-batch`` sequences): max
and mean ``|delta logprob|`` of the prompt's next-token log-probabilities against the first
batch.

    python benchmark/eval_routing_quality.py --ckpt OUT_OF_TRAIN_MOE_LM [--out DIR]
    (or ``train_moe_lm.py --eval``, which runs this in the training process)
Writes ``routing_quality.md`` and ``routing_quality.json`` to ``--out`` (default: the ckpt).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
import types
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from sglang_moe_routing.expert_choice import expert_choice_topk, token_choice_topk_reference
from sglang_moe_routing.expert_choice.dispatch import resolve_backend

sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULT_MIN_TOKENS = 32  # the plugin's default (integration/expert_choice_hooks.py)
ROUTING_PATH = (
    "our dispatch function sglang_moe_routing.expert_choice.expert_choice_topk with the TopK "
    "config SGLang passes for Qwen3-MoE (scoring_func=softmax, renormalize=norm_topk_prob, "
    "top_k=num_experts_per_tok); token choice through token_choice_topk_reference (same "
    "scoring); SGLang's TopK itself is not in this process"
)


# ----------------------------------------------------------------------------- routing patch


@dataclass(frozen=True)
class Mode:
    name: str
    kind: str  # "tc" | "ec"
    capacity_factor: float = 1.25
    min_tokens: int = 0


DEFAULT_MODES = (
    Mode("tc", "tc"),
    Mode("ec1.0", "ec", 1.0, 0),
    Mode("ec1.25", "ec", 1.25, 0),
    Mode("ec2.0", "ec", 2.0, 0),
    Mode(f"hybrid(cf1.25,min{DEFAULT_MIN_TOKENS})", "ec", 1.25, DEFAULT_MIN_TOKENS),
)


class RoutingState:
    """What the patched routers route with, and what they record (per layer, per forward)."""

    def __init__(self, mode: Mode, backend: str = "auto"):
        self.mode = mode
        self.backend = backend
        self.counts: List[torch.Tensor] = []  # [E] int64 per (layer, forward)
        self.rows: set = set()  # T seen by the routers
        self.record = True

    def reset(self) -> None:
        self.counts, self.rows = [], set()

    def load_stats(self) -> Dict[str, float]:
        if not self.counts:
            return dict(load_max_mean=float("nan"), load_max_mean_worst=float("nan"))
        c = torch.stack(self.counts).float()
        r = c.max(-1).values / c.mean(-1)
        return dict(load_max_mean=r.mean().item(), load_max_mean_worst=r.max().item())


def route(router, logits: torch.Tensor, state: RoutingState) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(weights fp32 [T,k], ids int32 [T,k])`` for one router's logits under ``state.mode``."""
    mode = state.mode
    if mode.kind == "tc":
        return token_choice_topk_reference(
            logits, router.top_k, renormalize=bool(router.norm_topk_prob), scoring_func="softmax")
    return expert_choice_topk(
        logits, router.top_k, mode.capacity_factor, renormalize=bool(router.norm_topk_prob),
        scoring_func="softmax", min_tokens=mode.min_tokens, backend=state.backend)


def _patched_router_forward(self, hidden_states):
    """Drop-in for ``Qwen3MoeTopKRouter.forward``: same logits, routing through our functions."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, self.weight)
    state: RoutingState = self._routing_state
    weights, ids = route(self, router_logits, state)
    if state.record:
        state.counts.append(torch.bincount(ids.reshape(-1).long(), minlength=self.num_experts))
        state.rows.add(int(router_logits.shape[0]))
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
    for r in rs:
        r._routing_state = state
        r.forward = types.MethodType(_patched_router_forward, r)
    try:
        yield state
    finally:
        for r in rs:
            del r.forward  # back to the class's forward
            del r._routing_state


# ----------------------------------------------------------------------------- forwards


@dataclass(frozen=True)
class Composition:
    name: str
    seqs: int  # B
    chunk: int  # C tokens per sequence per forward
    mixed: bool = False

    @property
    def tokens(self) -> int:
        return self.seqs * self.chunk

    def describe(self, seq_len: int) -> str:
        kind = ("decode" if self.chunk == 1 else "full prefill" if self.chunk >= seq_len
                else "chunked prefill")
        dom = "code+prose mixed" if self.mixed else "one domain"
        return f"{self.seqs} seqs x {self.chunk} tok/forward ({kind}, {dom})"


def parse_compositions(spec: str) -> List[Composition]:
    """``"32:32x1,256:8x32,4096:8x512,mixed4096:8x512"`` (``mixed`` prefix interleaves)."""
    out = []
    for item in spec.split(","):
        name, shape = item.strip().split(":")
        b, c = (int(v) for v in shape.lower().split("x"))
        out.append(Composition(name, b, c, mixed=name.startswith("mixed")))
    return out


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


def batches_for(comp: Composition, code: np.ndarray, prose: np.ndarray
                ) -> List[Tuple[np.ndarray, np.ndarray]]:
    """``[(tokens [B, L], domain flags [B] (0 code, 1 prose))]`` covering every sequence once."""
    if comp.mixed:
        half = comp.seqs // 2
        n = min(len(code), len(prose)) // max(half, 1)
        out = []
        for i in range(n):
            c, p = code[i * half:(i + 1) * half], prose[i * half:(i + 1) * half]
            rows = np.empty((2 * half, code.shape[1]), dtype=code.dtype)
            rows[0::2], rows[1::2] = c, p
            out.append((rows, np.tile([0, 1], half)))
        return out
    out = []
    for flag, seqs in ((0, code), (1, prose)):
        for i in range(0, len(seqs) - comp.seqs + 1, comp.seqs):
            out.append((seqs[i:i + comp.seqs], np.full(comp.seqs, flag)))
    return out


@torch.no_grad()
def eval_composition(model, comp: Composition, modes: Sequence[Mode], code, prose, device,
                     backend: str) -> List[Dict]:
    batches = batches_for(comp, code, prose)
    if not batches:
        raise ValueError(f"composition {comp.name}: not enough held-out sequences")
    rows, tc_pred = [], None
    for mode in modes:
        state = RoutingState(mode, backend)
        t0 = time.time()
        nll = {0: 0.0, 1: 0.0}
        cnt = {0: 0, 1: 0}
        preds = []
        with patch_routers(model, state):
            for toks, flags in batches:
                x = torch.from_numpy(toks.astype(np.int64)).to(device)
                lp, pred = forward_logprobs(model, x, comp.chunk)
                for f in (0, 1):
                    sel = torch.from_numpy(flags == f).to(device)
                    if sel.any():
                        nll[f] += -lp[sel].sum().item()
                        cnt[f] += lp[sel].numel()
                preds.append(pred)
        if device.type == "cuda":
            torch.cuda.synchronize()
        pred = torch.cat([p.reshape(-1) for p in preds])
        if mode.kind == "tc":
            tc_pred = pred
        agree = (pred == tc_pred).float().mean().item() if tc_pred is not None else float("nan")
        tot = cnt[0] + cnt[1]
        row = dict(
            composition=comp.name, T=comp.tokens, shape=comp.describe(code.shape[1]),
            mode=mode.name, capacity_factor=mode.capacity_factor if mode.kind == "ec" else None,
            min_tokens=mode.min_tokens if mode.kind == "ec" else None,
            ppl=math.exp((nll[0] + nll[1]) / tot),
            ppl_code=math.exp(nll[0] / cnt[0]) if cnt[0] else None,
            ppl_prose=math.exp(nll[1] / cnt[1]) if cnt[1] else None,
            top1_agree_tc=agree, tokens_scored=tot, rows_per_forward=sorted(state.rows),
            seconds=time.time() - t0, **state.load_stats(),
        )
        rows.append(row)
    base = rows[0]["ppl"]
    for r in rows:
        r["dppl_pct"] = 100.0 * (r["ppl"] / base - 1.0)
    return rows


@torch.no_grad()
def batch_invariance(model, modes: Sequence[Mode], seqs: np.ndarray, n_prompts: int,
                     n_trials: int, batch: int, device, backend: str, seed: int) -> List[Dict]:
    """Per mode: max / mean |delta logprob| of fixed prompts' tokens across random batch mates."""
    rng = np.random.default_rng(seed)
    n = len(seqs)
    prompt_idx = np.linspace(0, n - 1, num=n_prompts).astype(np.int64)
    plans = []
    for p in prompt_idx:
        others = np.array([i for i in range(n) if i != p])
        plans.append([(p, rng.choice(others, size=batch - 1, replace=len(others) < batch - 1))
                      for _ in range(n_trials)])
    out = []
    for mode in modes:
        state = RoutingState(mode, backend)
        state.record = False
        deltas_max, deltas_sum, deltas_cnt = 0.0, 0.0, 0
        with patch_routers(model, state):
            for plan in plans:
                ref = None
                for p, mates in plan:
                    x = torch.from_numpy(
                        np.concatenate([seqs[p:p + 1], seqs[mates]]).astype(np.int64)).to(device)
                    lp, _ = forward_logprobs(model, x, x.shape[1])
                    lp = lp[0]
                    if ref is None:
                        ref = lp
                        continue
                    d = (lp - ref).abs()
                    deltas_max = max(deltas_max, d.max().item())
                    deltas_sum += d.sum().item()
                    deltas_cnt += d.numel()
        out.append(dict(mode=mode.name, prompts=int(n_prompts), trials=int(n_trials),
                        batch_seqs=int(batch), T=int(batch * seqs.shape[1]),
                        max_abs_dlogprob=deltas_max,
                        mean_abs_dlogprob=deltas_sum / max(deltas_cnt, 1)))
    return out


# ----------------------------------------------------------------------------- tables


def _f(v, fmt="{:.3f}"):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def markdown(result: Dict) -> str:
    lines = [f"# Routing quality: {result['model']}", "",
             f"Routing path: {result['routing_path']} (expert-choice backend: "
             f"{result['ec_backend']}).", "",
             f"Held-out: {result['heldout']}", "",
             "| batch T | composition | mode | ppl | ppl code | ppl prose | dppl vs TC | "
             "top-1 = TC | load max/mean | worst |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['composition']} (T={r['T']}) | {r['shape']} | {r['mode']} | {_f(r['ppl'])} | "
            f"{_f(r['ppl_code'])} | {_f(r['ppl_prose'])} | {_f(r['dppl_pct'], '{:+.2f}%')} | "
            f"{_f(r['top1_agree_tc'], '{:.4f}')} | {_f(r['load_max_mean'])} | "
            f"{_f(r['load_max_mean_worst'])} |")
    lines += ["", "Batch invariance (same prompt, random batch mates, full prefill):", "",
              "| mode | prompts x trials | batch | max abs dlogprob | mean abs dlogprob |",
              "|---|---|---|---|---|"]
    for r in result["invariance"]:
        lines.append(f"| {r['mode']} | {r['prompts']} x {r['trials']} | {r['batch_seqs']} seqs "
                     f"(T={r['T']}) | {r['max_abs_dlogprob']:.3e} | "
                     f"{r['mean_abs_dlogprob']:.3e} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


FULL_COMPOSITIONS = "32:32x1,256:8x32,4096:8x512,mixed4096:8x512"
TINY_COMPOSITIONS = "32:8x4,256:2x128,1024:8x128,mixed1024:8x128"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="train_moe_lm.py --out folder")
    p.add_argument("--out", default=None, help="where the table + JSON go (default: --ckpt)")
    p.add_argument("--tiny", action="store_true", help="small settings for the CPU smoke test")
    p.add_argument("--device", default="auto")
    p.add_argument("--compositions", default=None,
                   help=f"T:BxC list (default {FULL_COMPOSITIONS}; tiny {TINY_COMPOSITIONS})")
    p.add_argument("--eval-seqs", type=int, default=None,
                   help="held-out sequences per domain (default 32; tiny 8)")
    p.add_argument("--seq-len", type=int, default=0, help="0 = the training seq len")
    p.add_argument("--modes", default="all", help="comma list of mode names, or all")
    p.add_argument("--backend", default="auto", help="expert-choice backend (auto|cuda|triton|"
                   "reference)")
    p.add_argument("--inv-prompts", type=int, default=None, help="default 4 (tiny 2)")
    p.add_argument("--inv-trials", type=int, default=10)
    p.add_argument("--inv-batch", type=int, default=None, help="sequences per batch (def 8)")
    p.add_argument("--seed", type=int, default=0)
    return p


def heldout_sequences(stream: np.ndarray, n: int, seq_len: int) -> np.ndarray:
    import train_moe_lm as tml

    return tml.fixed_windows(stream, n, seq_len)


def load_for_eval(ckpt: Path, device: torch.device):
    import train_moe_lm as tml
    from transformers import Qwen3MoeForCausalLM

    log = json.loads((ckpt / "train_log.json").read_text())
    targs = argparse.Namespace(**log["args"])
    tok = tml.load_tokenizer(ckpt / "tokenizer.json")
    corpus = tml.collect_corpus(targs)
    streams = {"val": {d: tml.encode_docs(tok, v) for d, v in corpus["val"].items()}}
    model = Qwen3MoeForCausalLM.from_pretrained(ckpt / "model", dtype=torch.float32).to(device)
    impl = log.get("experts_impl", "eager")
    try:
        model.set_experts_implementation(impl)
    except Exception:  # noqa: BLE001
        model.set_experts_implementation("eager")
    return model, streams, targs


def main(argv: Optional[List[str]] = None, model=None, streams=None) -> Dict:
    args = build_parser().parse_args(argv)
    ckpt = Path(args.ckpt)
    out = Path(args.out or ckpt)
    out.mkdir(parents=True, exist_ok=True)
    import train_moe_lm as tml

    device = tml.resolve_device(args.device)
    targs = argparse.Namespace(**json.loads((ckpt / "train_log.json").read_text())["args"]) \
        if (ckpt / "train_log.json").exists() else None
    if model is None or streams is None:
        model, streams, targs = load_for_eval(ckpt, device)
    model.eval()
    seq_len = args.seq_len or (targs.seq_len if targs else 512)
    n_seqs = args.eval_seqs or (8 if args.tiny else 32)
    comps = parse_compositions(args.compositions or (TINY_COMPOSITIONS if args.tiny
                                                     else FULL_COMPOSITIONS))
    modes = [m for m in DEFAULT_MODES if args.modes == "all" or m.name in args.modes.split(",")]
    if modes[0].kind != "tc":
        modes = [DEFAULT_MODES[0]] + modes
    code = heldout_sequences(streams["val"]["code"], n_seqs, seq_len)
    prose = heldout_sequences(streams["val"]["prose"], n_seqs, seq_len)
    n = min(len(code), len(prose))
    code, prose = code[:n], prose[:n]
    cfg = model.config
    probe = torch.zeros(1, cfg.num_experts, device=device)
    ec_backend = resolve_backend(probe, cfg.num_experts_per_tok, args.backend)
    heldout = (f"{n} code + {n} prose sequences of {seq_len} tokens "
               f"({2 * n * (seq_len - 1)} scored tokens per composition); "
               f"E={cfg.num_experts}, k={cfg.num_experts_per_tok}, "
               f"norm_topk_prob={cfg.norm_topk_prob}, device={device}")
    print(f"[eval] routing path: {ROUTING_PATH}; EC backend {ec_backend}", flush=True)
    print(f"[eval] held-out: {heldout}", flush=True)
    t0 = time.time()
    rows = []
    for comp in comps:
        rs = eval_composition(model, comp, modes, code, prose, device, args.backend)
        for r in rs:
            print(f"[eval] {r['composition']:>10} T={r['T']:<5} {r['mode']:<22} ppl "
                  f"{r['ppl']:.3f} ({r['dppl_pct']:+.2f}%) top1=TC {r['top1_agree_tc']:.4f} "
                  f"load max/mean {r['load_max_mean']:.3f} rows/forward {r['rows_per_forward']} "
                  f"{r['seconds']:.1f}s", flush=True)
        rows += rs
    inv_seqs = np.concatenate([code, prose])
    inv = batch_invariance(model, modes, inv_seqs, args.inv_prompts or (2 if args.tiny else 4),
                           args.inv_trials, args.inv_batch or 8, device, args.backend, args.seed)
    for r in inv:
        print(f"[eval] invariance {r['mode']:<22} max |dlogprob| {r['max_abs_dlogprob']:.3e} "
              f"mean {r['mean_abs_dlogprob']:.3e}", flush=True)
    result = dict(model=f"Qwen3MoeForCausalLM from {ckpt}", routing_path=ROUTING_PATH,
                  ec_backend=ec_backend, heldout=heldout,
                  compositions=[asdict(c) for c in comps], modes=[asdict(m) for m in modes],
                  rows=rows, invariance=inv, seconds=time.time() - t0)
    md = markdown(result)
    (out / "routing_quality.md").write_text(md)
    (out / "routing_quality.json").write_text(json.dumps(result, indent=1))
    print(md, flush=True)
    print(f"[eval] wrote {out / 'routing_quality.md'} and {out / 'routing_quality.json'} "
          f"({result['seconds']:.0f}s)", flush=True)
    return result


if __name__ == "__main__":
    main()
