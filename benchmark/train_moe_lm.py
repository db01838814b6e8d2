"""Train a small Qwen3-MoE language model on a real offline corpus (issue 11, item 1).

Corpus (never synthetic tokens: the standard library's and the installed packages' sources
and docs, held-out split by file), byte-level BPE tokenizer, token streams and their
``--data-cache``: ``benchmark/moe_corpus.py``. Model: transformers ``Qwen3MoeForCausalLM``
trained with standard token-choice routing and the load-balancing aux loss
(``output_router_logits=True``, ``router_aux_loss_coef``), AdamW + warm-up + cosine, bf16
autocast on CUDA, batches of random windows of ``--seq-len`` tokens from the packed token
stream. Stops at ``--max-minutes`` wall-clock, at ``--max-steps``, or when the validation loss
has not improved by more than ``--min-rel-improvement`` (0.5%) over ``--patience``
evaluations.

Routing in training (``--routing``): ``tc`` (default) is the model's own token-choice router.
``ec`` routes every MoE block's tokens of the training batch (all ``batch * seq_len`` rows
of one forward) by expert choice at ``--ec-capacity-factor`` (default 1.25): the expert ids
come from our dispatch function ``expert_choice_topk`` (no gradient; the kernels' outputs are
not differentiable), the weights are the softmax scores at those ids, renormalised as
``norm_topk_prob`` says (exactly EC's step 5), computed in plain torch so the router gets
gradients. The aux loss stays as configured (transformers computes it from the router logits'
token-choice statistics). Validation losses during training use the same routing.

Writes to ``--out``: ``model/`` (config + safetensors), ``tokenizer.json``, ``train_log.json``
(config, corpus stats, every progress line). ``--eval`` then runs
``benchmark/eval_routing_quality.py`` on the held-out split in the same process (so a
checkpoint too large to bring back from the device never needs to travel).

    python benchmark/train_moe_lm.py --tiny --out /tmp/moe_tiny --eval          # CPU smoke
    python benchmark/train_moe_lm.py --out $OUT/moe --max-minutes 7 --eval      # GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import resolve_device  # noqa: E402
from moe_corpus import CODE, PROSE, fixed_windows, prepare_data  # noqa: E402


# ----------------------------------------------------------------------------- model


def model_config(args, vocab_size: int):
    from transformers import Qwen3MoeConfig

    head_dim = args.head_dim or max(16, args.hidden // args.heads)
    return Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.moe_intermediate * 2,  # unused: every layer is sparse
        moe_intermediate_size=args.moe_intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=head_dim,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=max(4096, args.seq_len),
        output_router_logits=True,
        router_aux_loss_coef=args.aux_coef,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        use_sliding_window=False,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )


def set_experts_impl(model, impl: str, device: torch.device) -> str:
    """``auto``: ``grouped_mm`` on CUDA when a forward+backward with it works, else eager."""
    if impl != "auto":
        model.set_experts_implementation(impl)
        return impl
    if device.type == "cuda":
        try:
            model.set_experts_implementation("grouped_mm")
            ids = torch.randint(1, model.config.vocab_size, (2, 64), device=device)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            model.zero_grad(set_to_none=True)
            return "grouped_mm"
        except Exception as exc:  # noqa: BLE001 - fall back, say why
            print(f"[train] grouped_mm experts unavailable ({exc!r}); eager experts", flush=True)
            model.zero_grad(set_to_none=True)
    model.set_experts_implementation("eager")
    return "eager"


def _ec_train_router_forward(self, hidden_states):
    """``Qwen3MoeTopKRouter.forward`` with expert-choice routing of all rows (training)."""
    from sglang_moe_routing.expert_choice import expert_choice_topk

    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, self.weight)
    with torch.no_grad():
        _, ids = expert_choice_topk(router_logits.detach(), self.top_k, self._ec_cf,
                                    renormalize=bool(self.norm_topk_prob),
                                    scoring_func="softmax")
    ids = ids.long()
    weights = torch.softmax(router_logits, dtype=torch.float, dim=-1).gather(1, ids)
    if self.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return router_logits, weights.to(router_logits.dtype), ids


class ExpertChoiceTraining:
    """Context manager: every ``Qwen3MoeTopKRouter`` of ``model`` routes by expert choice at
    ``capacity_factor`` (differentiable weights, see the module docstring) while inside."""

    def __init__(self, model, capacity_factor: float):
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

        if not (math.isfinite(capacity_factor) and capacity_factor > 0):
            raise ValueError(f"--ec-capacity-factor must be > 0, got {capacity_factor}")
        self.routers = [m for m in model.modules() if isinstance(m, Qwen3MoeTopKRouter)]
        self.cf = float(capacity_factor)

    def __enter__(self):
        import types

        for r in self.routers:
            r._ec_cf = self.cf
            r.forward = types.MethodType(_ec_train_router_forward, r)
        return self

    def __exit__(self, *exc):
        for r in self.routers:
            del r.forward
            del r._ec_cf
        return False


def sample_batch(stream: np.ndarray, batch: int, seq_len: int, rng: np.random.Generator,
                 device) -> torch.Tensor:
    starts = rng.integers(0, len(stream) - seq_len - 1, size=batch)
    x = np.stack([stream[s:s + seq_len] for s in starts])
    return torch.from_numpy(x.astype(np.int64)).to(device)


@torch.no_grad()
def val_loss(model, windows: torch.Tensor, batch: int, device) -> float:
    model.eval()
    tot, cnt = 0.0, 0
    for i in range(0, len(windows), batch):
        x = windows[i:i + batch].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=x, output_router_logits=False).logits
        lp = torch.log_softmax(logits[:, :-1].float(), -1)
        nll = -lp.gather(-1, x[:, 1:, None]).squeeze(-1)
        tot += nll.sum().item()
        cnt += nll.numel()
    model.train()
    return tot / cnt


# ----------------------------------------------------------------------------- main


TINY = dict(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, experts=8, top_k=2,
            moe_intermediate=32, vocab=1024, seq_len=128, batch=8, max_files=60,
            max_minutes=1.0, eval_every=10, val_windows=16, val_percent=10.0,
            warmup=5, max_code_mb=2.0, max_prose_mb=1.0, lr=3e-3)


SPEED_FROM = 20  # steps before it carry compile / autotune time, not the training speed


def horizon_step(warmup: int) -> int:
    """The step at which the cosine horizon is fixed: the end of the LR warm-up (the LR does
    not depend on the horizon before it), and at least 20 steps after ``SPEED_FROM``."""
    return max(warmup, SPEED_FROM + 20)


def cosine_horizon(step: int, budget_left_s: float, per_step_s: float, eval_s: float,
                   eval_every: int) -> int:
    """The step count that fits ``budget_left_s`` after ``step``: each step costs
    ``per_step_s`` plus its share of a validation (``eval_s`` every ``eval_every`` steps)."""
    per = per_step_s + eval_s / max(1, eval_every)
    return step + max(1, int(max(0.0, budget_left_s) / per))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (model/, tokenizer.json, logs)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke settings (~1 minute)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto|cpu|cuda")
    # corpus
    p.add_argument("--val-percent", type=float, default=2.0, help="held-out share of FILES")
    p.add_argument("--site-packages", action=argparse.BooleanOptionalAction, default=True,
                   help="installed packages' .md/.rst/.txt as prose (default on)")
    p.add_argument("--site-packages-code", action=argparse.BooleanOptionalAction, default=True,
                   help="installed packages' .py as code too (default on: the stdlib alone is "
                   "~10 MB of code)")
    p.add_argument("--max-files", type=int, default=0, help="0 = all")
    p.add_argument("--max-file-kb", type=int, default=512)
    p.add_argument("--max-code-mb", type=float, default=60.0)
    p.add_argument("--max-prose-mb", type=float, default=40.0)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--data-cache", default="",
                   help="folder caching the tokenizer + token streams (reused when the corpus "
                   "settings match)")
    # model
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=0, help="0 = hidden / heads")
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--moe-intermediate", type=int, default=256)
    p.add_argument("--aux-coef", type=float, default=0.01)
    p.add_argument("--experts-impl", default="auto", help="auto|eager|grouped_mm|batched_mm")
    p.add_argument("--routing", choices=("tc", "ec"), default="tc",
                   help="routing in training: tc (token choice) or ec (expert choice)")
    p.add_argument("--ec-capacity-factor", type=float, default=1.25,
                   help="capacity factor of --routing ec")
    # optimisation
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=32, help="sequences per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--max-steps", type=int, default=0,
                   help="cosine horizon and hard stop; 0 = estimated from --max-minutes")
    p.add_argument("--max-minutes", type=float, default=7.0, help="wall-clock training budget")
    p.add_argument("--stop-at", type=float, default=0.0,
                   help="unix time by which training must end (the loop stops --stop-reserve-s "
                   "earlier); 0 = none")
    p.add_argument("--stop-reserve-s", type=float, default=15.0)
    p.add_argument("--prepare-only", action="store_true",
                   help="build the corpus / tokenizer / token streams (--data-cache) and exit")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--val-windows", type=int, default=64)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--min-rel-improvement", type=float, default=0.005)
    p.add_argument("--log-every", type=int, default=10)
    # evaluation
    p.add_argument("--eval", action="store_true",
                   help="run eval_routing_quality on the held-out split after training")
    p.add_argument("--eval-args", default="",
                   help="extra arguments for eval_routing_quality (one string)")
    return p


def apply_tiny(args, argv) -> None:
    given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in argv if a.startswith("--")}
    for k, v in TINY.items():
        if k not in given:
            setattr(args, k, v)

def main(argv: Optional[List[str]] = None) -> Dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.tiny:
        apply_tiny(args, argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    t_start = time.time()
    lines: List[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)

    corpus, stats, tok, streams, ntok = prepare_data(args, out, log)
    if args.prepare_only:
        return dict(args=vars(args), corpus=stats, tokens=ntok, log=lines)
    train_stream = np.concatenate([streams["train"][CODE], streams["train"][PROSE]])
    val_stream = np.concatenate([streams["val"][CODE], streams["val"][PROSE]])
    val_win = torch.from_numpy(
        fixed_windows(val_stream, args.val_windows, args.seq_len).astype(np.int64))

    from transformers import Qwen3MoeForCausalLM

    cfg = model_config(args, tok.get_vocab_size())
    torch.manual_seed(args.seed)
    model = Qwen3MoeForCausalLM(cfg).to(device)
    impl = set_experts_impl(model, args.experts_impl, device)
    ec_ctx = ExpertChoiceTraining(model, args.ec_capacity_factor) \
        if args.routing == "ec" else contextlib.nullcontext()
    ec_ctx.__enter__()
    n_params = sum(p.numel() for p in model.parameters())
    n_active = n_params - sum(p.numel() for n, p in model.named_parameters() if ".experts." in n) \
        * (1 - args.top_k / args.experts)
    log(f"[model] Qwen3MoeForCausalLM layers={args.layers} hidden={args.hidden} "
        f"experts={args.experts} top_k={args.top_k} moe_inter={args.moe_intermediate} "
        f"params={n_params / 1e6:.1f}M active~{n_active / 1e6:.1f}M experts_impl={impl} "
        f"device={device} routing={args.routing}"
        + (f"(cf {args.ec_capacity_factor})" if args.routing == "ec" else ""))

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                            fused=device.type == "cuda")
    rng = np.random.default_rng(args.seed)
    budget_s = args.max_minutes * 60.0
    if args.stop_at:
        # the caller's absolute deadline, less what the final validation + save take
        budget_s = min(budget_s, args.stop_at - time.time() - args.stop_reserve_s)
        if budget_s <= 0:
            log(f"[train] --stop-at leaves no training time ({budget_s:.0f}s)")
    horizon = args.max_steps or 10 ** 9  # re-estimated from measured speed below

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        prog = min(1.0, (step - args.warmup) / max(1, horizon - args.warmup))
        return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5
                          * (1 + math.cos(math.pi * prog)))

    history: List[Dict] = []
    t_v0 = time.time()
    v0 = val_loss(model, val_win, args.batch, device)
    eval_s = time.time() - t_v0
    history.append(dict(step=0, val_loss=v0, elapsed_s=0.0))
    log(f"[train] step 0 val_loss {v0:.4f} (ppl {math.exp(v0):.1f})")
    best, since_best, stop_reason = v0, 0, "max_steps"
    step, tokens_seen = 0, 0
    t_train = time.time()
    t_window, tok_window = time.time(), 0
    t_speed = t_train  # reset at step SPEED_FROM
    model.train()
    while True:
        if args.max_steps and step >= args.max_steps:
            stop_reason = "max_steps"
            break
        if time.time() - t_train > budget_s:
            stop_reason = "wall_clock"
            break
        x = sample_batch(train_stream, args.batch, args.seq_len, rng, device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out_m = model(input_ids=x, labels=x)
        loss = out_m.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens_seen += x.numel()
        tok_window += x.numel()
        if step == SPEED_FROM:
            t_speed = time.time()
        if step == horizon_step(args.warmup) and not args.max_steps:
            # cosine horizon from the steady speed (steps SPEED_FROM.., after the first steps'
            # compiles) plus the validations still to come; fixed once, at the end of the LR
            # warm-up, so the schedule never jumps
            per_step = (time.time() - t_speed) / (step - SPEED_FROM)
            horizon = cosine_horizon(step, budget_s - (time.time() - t_train), per_step,
                                     eval_s, args.eval_every)
            log(f"[train] cosine horizon {horizon} steps ({per_step * 1e3:.0f} ms/step from step "
                f"{SPEED_FROM}, validation {eval_s:.1f}s every {args.eval_every} steps)")
        if step % args.log_every == 0:
            dt = time.time() - t_window
            aux = out_m.aux_loss.item() if getattr(out_m, "aux_loss", None) is not None else 0.0
            log(f"[train] step {step} loss {loss.item():.4f} aux {aux:.4f} lr {lr_at(step):.2e} "
                f"tok/s {tok_window / max(dt, 1e-9):.0f}")
            t_window, tok_window = time.time(), 0
        if step % args.eval_every == 0:
            v = val_loss(model, val_win, args.batch, device)
            history.append(dict(step=step, val_loss=v, train_loss=loss.item(),
                                elapsed_s=time.time() - t_train, tokens=tokens_seen))
            if v < best * (1 - args.min_rel_improvement):
                best, since_best = v, 0
            else:
                since_best += 1
            log(f"[train] step {step} val_loss {v:.4f} (ppl {math.exp(v):.2f}) best {best:.4f} "
                f"no-improvement evals {since_best}/{args.patience}")
            if since_best >= args.patience:
                stop_reason = "val_loss_flat"
                break
    if not history or history[-1]["step"] != step:
        v = val_loss(model, val_win, args.batch, device)
        history.append(dict(step=step, val_loss=v, elapsed_s=time.time() - t_train,
                            tokens=tokens_seen))
        log(f"[train] step {step} val_loss {v:.4f} (ppl {math.exp(v):.2f})")
    train_s = time.time() - t_train
    log(f"[train] stopped: {stop_reason} after {step} steps, {tokens_seen} tokens, "
        f"{train_s:.0f}s; val_loss {history[0]['val_loss']:.4f} -> {history[-1]['val_loss']:.4f}")

    ec_ctx.__exit__(None, None, None)  # the saved / evaluated model has its own router back
    model_dir = out / "model"
    model.save_pretrained(model_dir, safe_serialization=True)
    result = dict(
        args=vars(args), device=str(device), experts_impl=impl, corpus=stats, tokens=ntok,
        params=n_params, steps=step, tokens_seen=tokens_seen, train_seconds=train_s,
        stop_reason=stop_reason, val_history=history, log=lines,
        total_seconds=time.time() - t_start,
    )
    (out / "train_log.json").write_text(json.dumps(result, indent=1))
    log(f"[train] saved {model_dir} (safetensors), {out / 'tokenizer.json'}, "
        f"{out / 'train_log.json'}")

    if args.eval:
        import eval_routing_quality as erq

        eval_argv = ["--ckpt", str(out), "--device", str(device)] + args.eval_args.split()
        if args.tiny and "--tiny" not in eval_argv:
            eval_argv.append("--tiny")
        result["eval"] = erq.main(eval_argv, model=model, streams=streams)
    return result


if __name__ == "__main__":
    main()
