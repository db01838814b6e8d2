"""How many experts each MoE layer touches under token choice (TC) and expert choice (EC),
on the random-weight Qwen3-MoE of ``bench_one_batch_ec.py`` (CPU, no SGLang).

Question it answers: does EC's extra prefill device time at small batches (B = 1, 256
tokens) come from EC spreading the tokens over more experts than TC does (the fused MoE
kernel reads each active expert's weights, and runs one program row per 32-token block)?

Model: ``tools.models.qwen3_moe_model``, the model ``tools.models.qwen3_moe`` saves for the
benchmark, built on the CPU. The GPU benchmark builds it under ``torch.device("cuda")``, whose
generator differs, so these are weights from the same distribution, not the same weights
(``--device cuda`` builds them as the benchmark does, for the exact weights). Weights are rounded to
bf16 (the checkpoint's dtype) and the forward runs in fp32 (``--dtype`` to change).

Input ids: one_batch's generator replayed: ``np.random.seed(seed)``, the warm-up's
``randint(0, 10000, (B0, L))``, then one draw per (pass, batch size) in the benchmark's
order; ``--pass-index`` picks which pass's ids are used (the benchmark keeps passes >= 1).

Per run (``tc`` or ``ec``: every layer routed by that mode, so EC's later layers see EC's
hidden states) and layer: distinct experts hit, sum over experts of ceil(count / 32)
(BLOCK_SIZE_M of SGLang's H200 fused-MoE config at these M), max and mean tokens per
expert, experts with > 32 tokens. EC is ``expert_choice_topk`` (reference backend),
capacity factor 1.25, min_tokens 64, renormalize = the config's ``norm_topk_prob``.

    PYTHONPATH=python python benchmark/ec_expert_hits.py --batch-sizes 1 8
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch


def replay_ids(seed: int, bench_sizes, input_len: int, pass_index: int, want):
    """one_batch's ids: warm-up draw for bench_sizes[0], then passes x bench_sizes."""
    np.random.seed(seed)
    np.random.randint(0, 10000, (bench_sizes[0], input_len), dtype=np.int32)  # warm-up
    out = {}
    for p in range(pass_index + 1):
        for b in bench_sizes:
            ids = np.random.randint(0, 10000, (b, input_len), dtype=np.int32)
            if p == pass_index and b in want:
                out[b] = torch.from_numpy(ids.astype(np.int64))
    return out


def layer_stats(ids: torch.Tensor, num_experts: int, block: int) -> dict:
    counts = torch.bincount(ids.reshape(-1).long(), minlength=num_experts)
    return {"hit": int((counts > 0).sum()),
            "blocks": int(sum(math.ceil(c / block) for c in counts.tolist())),
            "max": int(counts.max()), "mean": float(counts.float().mean()),
            "over_block": int((counts > block).sum()),
            "min_nonzero": int(counts[counts > 0].min())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="a3b")
    ap.add_argument("--seed", type=int, default=0, help="model seed (tools.models default 0)")
    ap.add_argument("--ids-seed", type=int, default=0, help="bench_one_batch --seed")
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--bench-batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64, 128, 512],
                    help="the benchmark's --batch-sizes (order of the id draws)")
    ap.add_argument("--pass-index", type=int, default=1)
    ap.add_argument("--capacity-factor", type=float, default=1.25)
    ap.add_argument("--min-tokens", type=int, default=64)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cpu", help="where the model is built and run")
    ap.add_argument("--modes", nargs="+", default=["tc", "ec"])
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    from transformers.models.qwen3_moe import modeling_qwen3_moe as mq

    from sglang_moe_routing.expert_choice import dispatch
    from sglang_moe_routing.tools.models import QWEN3_SIZES, qwen3_moe_model

    if QWEN3_SIZES[a.size]["vocab_size"] < 10000:
        raise SystemExit(f"--size {a.size}: vocab_size < 10000, one_batch's ids (< 10000) do not fit")
    torch.set_grad_enabled(False)
    t0 = time.time()
    model = qwen3_moe_model(a.size, seed=a.seed, device=a.device)
    dtype = getattr(torch, a.dtype)
    for p in model.parameters():  # the checkpoint's bf16 values, computed in `dtype`
        p.data = p.data.to(torch.bfloat16).to(dtype)
    model.eval()
    cfg = model.config
    print(f"built in {time.time() - t0:.0f} s; norm_topk_prob={cfg.norm_topk_prob} "
          f"attn={cfg._attn_implementation}", flush=True)

    state = {"mode": "tc", "log": []}
    tc_forward = mq.Qwen3MoeTopKRouter.forward

    def router_forward(self, hidden_states):
        if state["mode"] == "tc":
            logits, w, ids = tc_forward(self, hidden_states)
        else:
            hs = hidden_states.reshape(-1, self.hidden_dim)
            logits = torch.nn.functional.linear(hs, self.weight)
            w, ids = dispatch.expert_choice_topk(
                logits, self.top_k, a.capacity_factor, backend="reference",
                renormalize=bool(self.norm_topk_prob), min_tokens=a.min_tokens)
            w, ids = w.to(logits.dtype), ids.long()
        state["log"].append(ids.clone())
        return logits, w, ids

    mq.Qwen3MoeTopKRouter.forward = router_forward
    inputs = {b: ids.to(a.device) for b, ids in replay_ids(
        a.ids_seed, a.bench_batch_sizes, a.input_len, a.pass_index, a.batch_sizes).items()}
    results = []
    for b in a.batch_sizes:
        for mode in a.modes:
            state.update(mode=mode, log=[])
            t1 = time.time()
            model.model(input_ids=inputs[b], use_cache=False)
            for layer, ids in enumerate(state["log"]):
                r = {"B": b, "T": b * a.input_len, "mode": mode, "layer": layer,
                     **layer_stats(ids.cpu(), cfg.num_experts, a.block)}
                results.append(r)
                print(json.dumps(r), flush=True)
            print(f"B={b} {mode}: {time.time() - t1:.0f} s", flush=True)
    print("\n| T | layer | mode | experts hit | blocks (ceil c/32) | max/mean | >32 |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['T']} | {r['layer']} | {r['mode'].upper()} | {r['hit']} | {r['blocks']} | "
              f"{r['max']}/{r['mean']:.0f} | {r['over_block']} |")
    for b in a.batch_sizes:
        for mode in a.modes:
            rs = [r for r in results if r["B"] == b and r["mode"] == mode]
            print(f"T={b * a.input_len} {mode.upper()}: experts hit summed over layers "
                  f"{sum(r['hit'] for r in rs)}, blocks {sum(r['blocks'] for r in rs)}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
