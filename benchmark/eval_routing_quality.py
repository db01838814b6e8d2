"""Perplexity, top-1 agreement, expert load and batch invariance of each routing mode on a
trained Qwen3-MoE checkpoint (issue 11, items 2-3), on the held-out split of
``benchmark/train_moe_lm.py``.

Routing path (``--router-path``, default ``auto``: ``sglang`` when ``import sglang`` works, else
``dispatch``; the report's "Routing path" line says which ran). ``sglang``: each
``Qwen3MoeTopKRouter`` of the (transformers) model has its ``forward`` replaced
(:func:`patch_routers`) by one that computes the same router logits (``F.linear(h,
gate.weight)``) and routes them through **SGLang's own** ``sglang.srt.layers.moe.topk.TopK``, one
per layer, built as SGLang's ``qwen3_moe`` builds it (``top_k = num_experts_per_tok``,
``renormalize = norm_topk_prob``, no grouping, softmax scoring, no correction bias, no routed
scaling), with our plugin's hooks installed and its expert-choice section set per mode
(``quality_modes.SglangTopK``): token choice is upstream's ``select_experts``, EC and hybrid
modes are the plugin's hook inside ``TopK``. ``dispatch``: the same logits through **our
dispatch function** ``sglang_moe_routing.expert_choice.expert_choice_topk`` with exactly that
config plus the capacity factor and ``min_tokens`` of the mode; token choice through
``token_choice_topk_reference`` (same scoring and renormalisation; identical to transformers'
own top-k, checked bit for bit in ``test/test_train_moe_lm.py``). The two paths give identical
ids and weights (``test/test_quality_router_path.py``). ``thr`` is not a plugin mode: it takes
``threshold_topk`` on either path. The weights are cast to the router logits' dtype and the
ids to int64, as transformers' router returns them.

Modes: ``tc`` (token choice), ``ec1.0``/``ec1.25``/``ec1.5``/``ec2.0`` (expert choice,
``min_tokens=0``), ``hybrid`` (``cf=1.25``, ``min_tokens=32``: the plugin's defaults), ``thr``
(per-expert selection biases, ``expert_choice/threshold.py``: ``ids = topk(softmax + b, k)``,
weights from the unbiased softmax, renormalised as the config says; each token routes alone).
``thr``'s biases are calibrated per layer on a calibration slice of the TRAINING split (one
full-prefill forward, :func:`calibrate_threshold`), then frozen for the held-out evaluation.
For EC modes the table also gives the share of fallback slots (a token picked by fewer than k
experts gets its best remaining experts, uncapped) and the load of the picked slots alone;
the load column counts every slot, fallback included (that is the compute).

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
batch, and the share of the prompt's (layer, token) expert sets that changed.

``--batch-invariant-ops`` (CUDA only): after that, the same measurement again for ``tc``,
``thr`` and ``ec1.25`` (those in ``--modes``) inside SGLang's
``sglang.srt.batch_invariant_ops.set_batch_invariant_mode(True)`` (what SGLang's
``--enable-deterministic-inference`` uses: aten mm/addmm/bmm/_log_softmax/mean.dim/rms_norm on
the CUDA key replaced by persistent Triton kernels, or DeepGEMM's deterministic bf16 GEMM where
SGLang enables it), with the model's experts switched to ``eager`` (one ``F.linear`` per expert,
i.e. aten mm; ``torch._grouped_mm`` is not replaced) and ONE sdpa backend forced (the first of
flash, efficient, math that runs the model), both restored afterwards
(:func:`batch_invariant_ops_run`). Dtype as in every forward here: fp32 weights, bf16 autocast
on CUDA (the persistent kernels take bf16 and fp32). Rows go to ``invariance_bi``.

Routing time per call (``--timing-tokens``): token choice in torch, ``thr`` (eager and
``torch.compile``), our EC dispatch (cf 1.25, backend auto) and SGLang's fused
``topk_softmax`` (plain and with the ``thr`` bias as its ``correction_bias``) when an installed
``sgl_kernel``/``sglang`` or ``--sglang-dir`` provides it; CUDA-graph replay on a GPU.

``--max-seconds`` caps the wall clock: stages reached after it are left out (listed under
``skipped``). Order: thr calibration, prefill compositions, batch invariance (then its
``--batch-invariant-ops`` pass), routing timings, decode compositions (the slowest) last.
Results are written after every stage.

    python benchmark/eval_routing_quality.py --ckpt OUT_OF_TRAIN_MOE_LM [--out DIR]
    (or ``train_moe_lm.py --eval``, which runs this in the training process)
Writes ``routing_quality.md``, ``routing_quality.json`` and ``routing_quality.png`` (dppl vs
load max/mean, one point per mode and composition) to ``--out`` (default: the ckpt).

Files: the routing modes, the router patch, the forward and the routing timings are in
``benchmark/quality_modes.py``, the batch-invariance measurement (and its
``--batch-invariant-ops`` pass) in ``benchmark/quality_invariance.py``, the tables and the plot
in ``benchmark/quality_report.py``; this file holds the compositions, the thr calibration, the
stages and the CLI.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from sglang_moe_routing.expert_choice.dispatch import resolve_backend

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import resolve_device  # noqa: E402
from moe_corpus import (  # noqa: E402
    collect_corpus,
    encode_docs,
    fixed_windows,
    load_tokenizer,
)
from quality_modes import (  # noqa: E402
    DEFAULT_MODES,
    Mode,
    ROUTER_PATHS,
    RoutingState,
    SglangTopK,
    forward_logprobs,
    mode_path,
    patch_routers,
    probe_router_paths,
    resolve_router_path,
    routers,  # noqa: F401 - callers reach it as eval_routing_quality.routers
    routing_timings,
)
from quality_invariance import (  # noqa: E402
    BI_MODES,
    batch_invariance,
    batch_invariant_ops_run,  # noqa: F401 - callers reach it as eval_routing_quality.*
    invariance_plan,
    load_batch_invariant_ops,
    print_invariance,
    run_invariance_bi,
)
from quality_report import markdown, plot  # noqa: E402

ROUTING_PATH = (
    "our dispatch function sglang_moe_routing.expert_choice.expert_choice_topk with the TopK "
    "config SGLang passes for Qwen3-MoE (scoring_func=softmax, renormalize=norm_topk_prob, "
    "top_k=num_experts_per_tok); token choice through token_choice_topk_reference (same "
    "scoring); SGLang's TopK itself is not in this process"
)


def routing_path_text(path: str, sglang: Optional[SglangTopK], note: str) -> str:
    """The report's "Routing path" line for the path ``resolve_router_path`` chose."""
    if sglang is None:
        return f"{ROUTING_PATH} [{note}]"
    return (f"SGLang {sglang.version}'s own TopK (sglang.srt.layers.moe.topk.TopK, one per MoE "
            "layer, built as SGLang's qwen3_moe builds it: top_k=num_experts_per_tok, "
            "renormalize=norm_topk_prob, use_grouped_topk=False, softmax scoring; STANDARD "
            "output) with the sglang-moe-routing plugin's hooks installed: tc = upstream's "
            "select_experts, ec*/hybrid = the plugin's expert-choice hook inside TopK (section "
            "set per mode: capacity factor, min tokens, backend); thr is not a plugin mode and "
            f"routes through our threshold_topk (dispatch path) [{note}]")


# ----------------------------------------------------------------------------- forwards


@dataclass(frozen=True)
class Composition:
    name: str
    seqs: int  # B
    chunk: int  # C tokens per sequence per forward
    mixed: bool = False
    seq_len: int = 0  # 0 = the held-out sequences' length; else their first seq_len tokens

    @property
    def tokens(self) -> int:
        return self.seqs * self.chunk

    def describe(self, seq_len: int) -> str:
        kind = ("decode" if self.chunk == 1 else "full prefill" if self.chunk >= seq_len
                else "chunked prefill")
        dom = "code+prose mixed" if self.mixed else "one domain"
        return f"{self.seqs} seqs x {self.chunk} tok/forward ({kind}, {dom})"


def parse_compositions(spec: str) -> List[Composition]:
    """``"256:8x32,4096:8x512,mixed4096:8x512,32:32x1/128"`` (``mixed`` prefix interleaves
    the two domains; ``/L`` scores only the sequences' first L tokens, to keep decode short)."""
    out = []
    for item in spec.split(","):
        try:
            name, shape = item.strip().split(":")
            shape, _, trunc = shape.partition("/")
            b, c = (int(v) for v in shape.lower().split("x"))
            out.append(Composition(name, b, c, mixed=name.startswith("mixed"),
                                   seq_len=int(trunc) if trunc else 0))
        except ValueError:
            raise ValueError(f"--compositions: bad item {item!r} (want NAME:BxC or NAME:BxC/L)")
    return out


def batches_for(comp: Composition, code: np.ndarray, prose: np.ndarray
                ) -> List[Tuple[np.ndarray, np.ndarray]]:
    """``[(tokens [B, L], domain flags [B] (0 code, 1 prose))]`` covering every sequence once."""
    if comp.seq_len:
        code, prose = code[:, :comp.seq_len], prose[:, :comp.seq_len]
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
                     backend: str, biases: Optional[Dict[int, torch.Tensor]] = None,
                     deadline: float = float("inf"), sglang: Optional[SglangTopK] = None
                     ) -> List[Dict]:
    """One row per mode (token choice first: the agreement baseline); modes reached after
    ``deadline`` (time.time()) are left out."""
    batches = batches_for(comp, code, prose)
    if not batches:
        raise ValueError(f"composition {comp.name}: not enough held-out sequences")
    rows, tc_pred = [], None
    for mode in modes:
        if time.time() > deadline and rows:
            print(f"[eval] time cap: {comp.name} {mode.name} skipped", flush=True)
            continue
        state = RoutingState(mode, backend, biases, sglang=sglang)
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
            composition=comp.name, T=comp.tokens,
            shape=comp.describe(comp.seq_len or code.shape[1]),
            mode=mode.name, capacity_factor=mode.capacity_factor if mode.kind == "ec" else None,
            min_tokens=mode.min_tokens if mode.kind == "ec" else None,
            kind=mode.kind, router_path=mode_path(mode, sglang),
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


# ----------------------------------------------------------------------------- threshold mode


@torch.no_grad()
def calibrate_threshold(model, cal_seqs: np.ndarray, device, backend: str, iters: int
                        ) -> Tuple[Dict[int, torch.Tensor], Dict]:
    """Per-layer selection biases for the ``thr`` mode from ONE full-prefill forward of the
    calibration sequences (training split): each layer calibrates on the router logits it
    sees, produced by the earlier layers' calibrated routing (``RoutingState.calibrating``)."""
    state = RoutingState(Mode("thr", "thr"), backend, cal_iters=iters)
    state.calibrating = True
    t0 = time.time()
    with patch_routers(model, state):
        x = torch.from_numpy(cal_seqs.astype(np.int64)).to(device)
        forward_logprobs(model, x, x.shape[1])
    if device.type == "cuda":
        torch.cuda.synchronize()
    info = dict(seqs=int(len(cal_seqs)), tokens=int(cal_seqs.size), iters=iters,
                seconds=time.time() - t0,
                load_max_mean_start=[state.cal_info[i]["start"] for i in sorted(state.cal_info)],
                load_max_mean_calibrated=[state.cal_info[i]["best"]
                                          for i in sorted(state.cal_info)])
    return state.biases, info


# ----------------------------------------------------------------------------- main


FULL_COMPOSITIONS = "256:8x32,4096:8x512,mixed4096:8x512,32:32x1/128"
TINY_COMPOSITIONS = "256:2x128,1024:8x128,mixed1024:8x128,32:8x4"
FULL_TIMING_TOKENS = "32,256,4096"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="train_moe_lm.py --out folder")
    p.add_argument("--out", default=None, help="where the table + JSON go (default: --ckpt)")
    p.add_argument("--label", default="", help="model label for the tables and the plot")
    p.add_argument("--tiny", action="store_true", help="small settings for the CPU smoke test")
    p.add_argument("--device", default="auto")
    p.add_argument("--compositions", default=None,
                   help=f"T:BxC[/L] list (default {FULL_COMPOSITIONS}; tiny {TINY_COMPOSITIONS})")
    p.add_argument("--eval-seqs", type=int, default=None,
                   help="held-out sequences per domain (default 32; tiny 8)")
    p.add_argument("--seq-len", type=int, default=0, help="0 = the training seq len")
    p.add_argument("--modes", default="all",
                   help="comma list of mode names (hybrid = the hybrid mode), or all")
    p.add_argument("--router-path", default="auto", choices=ROUTER_PATHS,
                   help="sglang: route tc/ec/hybrid through SGLang's own TopK with the plugin; "
                   "dispatch: through our dispatch function; auto (default): sglang when "
                   "`import sglang` works, else dispatch")
    p.add_argument("--backend", default="auto", help="expert-choice backend (auto|cuda|triton|"
                   "reference)")
    p.add_argument("--cal-seqs", type=int, default=None,
                   help="thr calibration: training-split sequences (default 32; tiny 4)")
    p.add_argument("--cal-iters", type=int, default=300, help="thr calibration update steps")
    p.add_argument("--inv-prompts", type=int, default=None, help="default 4 (tiny 2)")
    p.add_argument("--inv-trials", type=int, default=10)
    p.add_argument("--inv-batch", type=int, default=None, help="sequences per batch (def 8)")
    p.add_argument("--timing-tokens", default=None,
                   help=f"routing-time T list (default {FULL_TIMING_TOKENS}; tiny 32); "
                   "'' = no timing")
    p.add_argument("--timing-compile", action="store_true",
                   help="also time threshold_topk under torch.compile (GPU; compiles take time)")
    p.add_argument("--sglang-dir", default=None,
                   help="staged SGLang topk_softmax sources (benchmark/sglang_yardstick.py); "
                   "default: only an installed sgl_kernel/sglang is tried")
    p.add_argument("--max-seconds", type=float, default=0.0,
                   help="wall-clock cap: stages reached later are left out (0 = none)")
    p.add_argument("--batch-invariant-ops", action="store_true",
                   help="CUDA + sglang: after the batch-invariance check, run it again for tc, "
                   "thr and ec1.25 inside SGLang's set_batch_invariant_mode(True) (its "
                   "batch-invariant mm/addmm/bmm/log_softmax/mean/rms_norm kernels), with eager "
                   "experts and one sdpa backend; rows in the JSON's invariance_bi")
    p.add_argument("--seed", type=int, default=0)
    return p


def heldout_sequences(stream: np.ndarray, n: int, seq_len: int) -> np.ndarray:
    return fixed_windows(stream, n, seq_len)


def load_for_eval(ckpt: Path, device: torch.device):
    """Model, ``{"val": streams, "train": streams}``, training args. Streams come from the
    training run's ``--data-cache`` when it is there, else the corpus is rebuilt (the training
    streams then from a deterministic subset of the training documents: every n-th, about
    500 per domain; only the calibration slice needs them)."""
    from transformers import Qwen3MoeForCausalLM

    log = json.loads((ckpt / "train_log.json").read_text())
    targs = argparse.Namespace(**log["args"])
    cache = Path(getattr(targs, "data_cache", "") or "/nonexistent") / "streams.npz"
    if cache.is_file():  # the training run's --data-cache (same corpus settings)
        with np.load(cache) as z:
            streams = {s: {d: z[f"{s}_{d}"] for d in ("code", "prose")} for s in ("train", "val")}
    else:
        tok = load_tokenizer(ckpt / "tokenizer.json")
        corpus = collect_corpus(targs)
        streams = {"val": {d: encode_docs(tok, v) for d, v in corpus["val"].items()},
                   "train": {d: encode_docs(tok, v[::max(1, len(v) // 500)])
                             for d, v in corpus["train"].items()}}
    model = Qwen3MoeForCausalLM.from_pretrained(ckpt / "model", dtype=torch.float32).to(device)
    impl = log.get("experts_impl", "eager")
    try:
        model.set_experts_implementation(impl)
    except Exception:  # noqa: BLE001
        model.set_experts_implementation("eager")
    return model, streams, targs


def main(argv: Optional[List[str]] = None, model=None, streams=None) -> Dict:
    args = build_parser().parse_args(argv)
    t0 = time.time()
    device = resolve_device(args.device)
    bi_ops = load_batch_invariant_ops(device) if args.batch_invariant_ops else None
    path, sglang, note = resolve_router_path(args.router_path, device)  # before the model loads
    try:
        return run_eval(args, device, sglang, routing_path_text(path, sglang, note), t0,
                        model, streams, bi_ops)
    finally:
        if sglang is not None:
            sglang.__exit__(None, None, None)


def run_eval(args: argparse.Namespace, device: torch.device, sglang: Optional[SglangTopK],
             routing_path: str, t0: float, model=None, streams=None, bi_ops=None) -> Dict:
    """The stages of :func:`main` (``sglang``: the entered router path, or None; ``bi_ops``:
    SGLang's ``set_batch_invariant_mode`` for ``--batch-invariant-ops``, or None)."""
    ckpt = Path(args.ckpt)
    out = Path(args.out or ckpt)
    out.mkdir(parents=True, exist_ok=True)
    deadline = t0 + args.max_seconds if args.max_seconds > 0 else float("inf")
    log = json.loads((ckpt / "train_log.json").read_text()) \
        if (ckpt / "train_log.json").exists() else {}
    targs = argparse.Namespace(**log["args"]) if log else None
    if model is None or streams is None:
        model, streams, targs = load_for_eval(ckpt, device)
    model.eval()
    seq_len = args.seq_len or (targs.seq_len if targs else 512)
    n_seqs = args.eval_seqs or (8 if args.tiny else 32)
    comps = parse_compositions(args.compositions or (TINY_COMPOSITIONS if args.tiny
                                                     else FULL_COMPOSITIONS))
    wanted = set(args.modes.split(","))
    modes = [m for m in DEFAULT_MODES
             if args.modes == "all" or m.name in wanted or m.name.split("(")[0] in wanted]
    if args.modes != "all" and len(modes) < len(wanted):
        known = ", ".join(m.name.split("(")[0] for m in DEFAULT_MODES)
        raise ValueError(f"--modes {args.modes!r}: known modes are {known} (or all)")
    if not modes or modes[0].kind != "tc":
        modes = [DEFAULT_MODES[0]] + modes
    code = heldout_sequences(streams["val"]["code"], n_seqs, seq_len)
    prose = heldout_sequences(streams["val"]["prose"], n_seqs, seq_len)
    n = min(len(code), len(prose))
    code, prose = code[:n], prose[:n]
    cfg = model.config
    probe = torch.zeros(1, cfg.num_experts, device=device)
    ec_backend = resolve_backend(probe, cfg.num_experts_per_tok, args.backend)
    router_probe = None
    if sglang is not None:  # SGLang's TopK on this device, against the dispatch path
        try:
            router_probe = probe_router_paths(sglang, cfg.num_experts, cfg.num_experts_per_tok,
                                              bool(cfg.norm_topk_prob), args.backend, device)
        except Exception as exc:  # noqa: BLE001 - auto: fall back; sglang: stop, one line
            msg = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            if args.router_path == "sglang":
                raise SystemExit(f"error: --router-path sglang: SGLang's TopK failed on "
                                 f"{device} ({msg})") from None
            sglang.__exit__(None, None, None)
            sglang = None
            routing_path = routing_path_text(
                "dispatch", None, f"--router-path auto: SGLang's TopK failed on {device} ({msg})")
        else:
            print(f"[eval] router probe (sglang TopK vs dispatch, random logits): "
                  f"{router_probe}", flush=True)
    routing_kind = (log.get("args") or {}).get("routing", "tc")
    label = args.label or (f"{routing_kind.upper()}-trained Qwen3-MoE" + (
        f" (cf {log['args'].get('ec_capacity_factor')})" if routing_kind == "ec" else ""))
    heldout = (f"{n} code + {n} prose sequences of {seq_len} tokens "
               f"({2 * n * (seq_len - 1)} scored tokens per composition); "
               f"E={cfg.num_experts}, k={cfg.num_experts_per_tok}, "
               f"norm_topk_prob={cfg.norm_topk_prob}, device={device}")
    print(f"[eval] {label}; routing path: {routing_path}; EC backend {ec_backend}", flush=True)
    print(f"[eval] held-out: {heldout}", flush=True)
    result = dict(model=f"{label} (Qwen3MoeForCausalLM from {ckpt})", label=label,
                  trained_with=routing_kind, routing_path=routing_path, ec_backend=ec_backend,
                  router_probe=router_probe,
                  heldout=heldout, E=cfg.num_experts, k=cfg.num_experts_per_tok,
                  compositions=[asdict(c) for c in comps], modes=[asdict(m) for m in modes],
                  rows=[], invariance=[], timings=[], timing_device=str(device), skipped=[],
                  training={k: log[k] for k in ("steps", "tokens_seen", "train_seconds",
                                                "stop_reason", "val_history", "device",
                                                "experts_impl", "params", "tokens", "corpus")
                            if k in log})

    def write() -> None:
        result["seconds"] = time.time() - t0
        (out / "routing_quality.md").write_text(markdown(result))
        (out / "routing_quality.json").write_text(json.dumps(result, indent=1))

    biases: Dict[int, torch.Tensor] = {}
    if any(m.kind == "thr" for m in modes):
        cal_n = args.cal_seqs or (4 if args.tiny else 32)
        cal = np.concatenate([
            heldout_sequences(streams["train"]["code"], (cal_n + 1) // 2, seq_len),
            heldout_sequences(streams["train"]["prose"], cal_n // 2, seq_len)])
        biases, cal_info = calibrate_threshold(model, cal, device, args.backend, args.cal_iters)
        result["calibration"] = cal_info
        result["thr_biases"] = {str(i): b.tolist() for i, b in sorted(biases.items())}
        print(f"[eval] thr calibrated on {cal_info['tokens']} training tokens: load max/mean "
              f"{cal_info['load_max_mean_start']} -> {cal_info['load_max_mean_calibrated']} "
              f"({cal_info['seconds']:.1f}s)", flush=True)
    def run_comp(comp: Composition) -> None:
        if time.time() > deadline:
            result["skipped"].append(f"composition {comp.name}")
            print(f"[eval] time cap: composition {comp.name} skipped", flush=True)
            return
        try:
            rs = eval_composition(model, comp, modes, code, prose, device, args.backend, biases,
                                  deadline, sglang)
        except Exception as exc:  # noqa: BLE001 - one failed composition: keep the others
            result["skipped"].append(f"composition {comp.name} ({exc})")
            print(f"[eval] composition {comp.name} failed: {exc!r}", flush=True)
            return
        result["skipped"] += [f"{comp.name}/{m.name}" for m in modes
                              if m.name not in {r["mode"] for r in rs}]
        for r in rs:
            print(f"[eval] {r['composition']:>10} T={r['T']:<5} {r['mode']:<22} ppl "
                  f"{r['ppl']:.3f} ({r['dppl_pct']:+.2f}%) top1=TC {r['top1_agree_tc']:.4f} "
                  f"load max/mean {r['load_max_mean']:.3f} rows/forward {r['rows_per_forward']} "
                  f"{r['seconds']:.1f}s", flush=True)
        result["rows"] += rs
        write()

    # decode compositions (one token per sequence per forward) are the slowest: they run
    # after the batch-invariance check, so a time cap drops them first
    for comp in comps:
        if comp.chunk > 1:
            run_comp(comp)
    inv_seqs = np.concatenate([code, prose])
    result["invariance"] = batch_invariance(
        model, modes, inv_seqs, *invariance_plan(args), device, args.backend, args.seed, biases,
        deadline, sglang)
    result["skipped"] += [f"invariance/{m.name}" for m in modes
                          if m.name not in {r["mode"] for r in result["invariance"]}]
    print_invariance("invariance", result["invariance"])
    write()
    if bi_ops is not None:
        run_invariance_bi(result, model, bi_ops, [m for m in modes if m.name in BI_MODES],
                          inv_seqs, args, device, biases, deadline, sglang)
        write()
    timing_tokens = args.timing_tokens if args.timing_tokens is not None else (
        "32" if args.tiny else FULL_TIMING_TOKENS)
    if timing_tokens and time.time() > deadline:
        result["skipped"].append("routing timings")
    elif timing_tokens:
        bias0 = biases.get(0, torch.zeros(cfg.num_experts))
        result["timings"] = routing_timings(
            cfg.num_experts, cfg.num_experts_per_tok, bias0, device, args.backend,
            [int(t) for t in timing_tokens.split(",")], args.sglang_dir, args.seed,
            compile_thr=args.timing_compile)
        for r in result["timings"]:
            print(f"[eval] time T={r['T']:<5} {r['method']:<45} {r['us']:8.1f} us "
                  f"({r['timed']})", flush=True)
    write()
    for comp in comps:
        if comp.chunk == 1:
            run_comp(comp)
    write()
    try:
        plot([(label, result)], out / "routing_quality.png")
    except Exception as exc:  # noqa: BLE001 - the tables matter more than the picture
        print(f"[eval] plot failed: {exc!r}", flush=True)
    md = markdown(result)
    print(md, flush=True)
    print(f"[eval] wrote {out / 'routing_quality.md'}, .json, .png "
          f"({result['seconds']:.0f}s)", flush=True)
    return result


if __name__ == "__main__":
    main()
