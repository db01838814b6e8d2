"""Balance vs quality of expert-choice routing, on CPU (no sglang needed).

For a tiny random-weight Qwen2-MoE block from transformers (the token-choice model) and batches
of increasing router skew, route with token choice and with expert choice at several capacity
factors, and print per setting: expert-load std and max/mean (balance), routing fidelity (share
of the token-choice score mass kept), share of tokens whose expert set changed, and the relative
change of the block's output (quality price). Writes ``ec_quality.png``: balance gain vs
fidelity, one curve per skew.

    python benchmark/ec_quality.py [--tokens 512] [--out docs/img]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sglang_moe_routing.expert_choice import (
    RoutingSpec,
    expert_choice_topk_reference,
    expert_load,
    routing_fidelity,
    token_choice_topk_reference,
)

E, K, H, I_MOE = 8, 2, 32, 16


def make_block(seed: int = 0):
    from transformers.models.qwen2_moe.configuration_qwen2_moe import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    cfg = Qwen2MoeConfig(hidden_size=H, moe_intermediate_size=I_MOE,
                         shared_expert_intermediate_size=24, num_experts=E,
                         num_experts_per_tok=K, norm_topk_prob=True, hidden_act="silu")
    torch.manual_seed(seed)
    block = Qwen2MoeSparseMoeBlock(cfg).float().eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
        block.gate.weight.mul_(0.25)
    return block


@torch.no_grad()
def routed_output(block, h, weights, ids):
    shared = torch.sigmoid(block.shared_expert_gate(h)) * block.shared_expert(h)
    return block.experts(h, ids.long(), weights.to(h.dtype)) + shared


@torch.no_grad()
def evaluate(block, tokens: int, skew: float, cfs, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, H, generator=g)
    # the router's own logits, plus an offset favouring experts 0 and 1 (a popular-expert skew)
    logits = torch.nn.functional.linear(h, block.gate.weight)
    logits = logits + skew * torch.tensor([1.0, 0.8] + [0.0] * (E - 2))
    scores = torch.softmax(logits, -1)
    w_tc, ids_tc = token_choice_topk_reference(logits, RoutingSpec(K))
    out_tc = routed_output(block, h, w_tc, ids_tc)
    load_tc = expert_load(ids_tc, E).float()
    rows = [dict(cf="token choice", std=load_tc.std(unbiased=False).item(),
                 max_mean=(load_tc.max() / load_tc.mean()).item(), fidelity=1.0,
                 changed=0.0, rel_out=0.0)]
    for cf in cfs:
        w, ids = expert_choice_topk_reference(logits, RoutingSpec(K, cf))
        load = expert_load(ids, E).float()
        out = routed_output(block, h, w, ids)
        changed = (ids.sort(-1).values != ids_tc.sort(-1).values).any(-1).float().mean().item()
        rows.append(dict(
            cf=cf, std=load.std(unbiased=False).item(),
            max_mean=(load.max() / load.mean()).item(),
            fidelity=routing_fidelity(scores, ids, ids_tc).mean().item(), changed=changed,
            rel_out=((out - out_tc).norm() / out_tc.norm()).item(),
        ))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--skews", default="0,0.5,1,2")
    ap.add_argument("--cfs", default="1.0,1.25,1.5,2.0,4.0")
    ap.add_argument("--out", default="benchmark/out")
    args = ap.parse_args()
    skews = [float(s) for s in args.skews.split(",")]
    cfs = [float(c) for c in args.cfs.split(",")]
    block = make_block()
    print(f"Qwen2-MoE block (random weights, E={E}, top-{K}), T={args.tokens} tokens\n")
    print("| skew | routing | load std | max/mean | fidelity | tokens changed | rel. output change |")
    print("|---|---|---|---|---|---|---|")
    results = {}
    for skew in skews:
        rows = evaluate(block, args.tokens, skew, cfs)
        results[skew] = rows
        for r in rows:
            name = r["cf"] if isinstance(r["cf"], str) else f"EC cf={r['cf']}"
            print(f"| {skew} | {name} | {r['std']:.1f} | {r['max_mean']:.2f} | "
                  f"{r['fidelity']:.3f} | {r['changed']:.1%} | {r['rel_out']:.3f} |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for skew, rows in results.items():
        tc_std = rows[0]["std"]
        xs = [r["fidelity"] for r in rows[1:]]
        ys = [tc_std / max(r["std"], 1e-9) for r in rows[1:]]
        ax.plot(xs, ys, marker="o", label=f"skew {skew}")
        for r, x, y in zip(rows[1:], xs, ys):
            ax.annotate(f"cf {r['cf']}", (x, y), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xlabel("routing fidelity (token-choice score mass kept)")
    ax.set_ylabel("load std reduction (token choice / expert choice)")
    ax.set_title(f"Expert choice: balance vs fidelity (E={E}, k={K}, T={args.tokens})")
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out / "ec_quality.png", dpi=120)
    print(f"\nwrote {out / 'ec_quality.png'}")


if __name__ == "__main__":
    main()
