"""Demo: route a synthetic skewed batch through SGLang's real ``TopK`` layer, standard routing
vs expert choice, and print the per-expert load, its std and max/mean, and the expert
capacity C used (or that expert choice stayed off because T < min tokens).

    python -m sglang_moe_routing.demo [--tokens 64] [--experts 8] [--top-k 2] [--skew 1.0]
                                      [--capacity-factor 1.25] [--min-tokens N] [--deepseek]
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List

import warnings

os.environ.setdefault("SGLANG_LOGGING_LEVEL", "WARNING")
# sglang warns at import about quantization kernels a CPU machine lacks; not relevant here.
warnings.filterwarnings("ignore", message="Only CUDA", category=UserWarning)


def _parse(argv: List[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sglang_moe_routing.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=64, help="batch size T (default 64)")
    p.add_argument("--experts", type=int, default=8, help="number of experts E (default 8)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token k (default 2)")
    p.add_argument("--skew", type=float, default=1.0,
                   help="logit offset favouring experts 0 and 1 (default 1.0)")
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--min-tokens", type=int, default=None,
                   help="batches with fewer tokens keep standard routing "
                   "(--expert-choice-min-tokens; default: the plugin's, auto = max(32, 4*E/k))")
    p.add_argument("--deepseek", action="store_true",
                   help="DeepSeek-V3-style routing: sigmoid, correction bias, grouped top-k "
                   "(E=64, 8 groups, topk_group=4, k=8, T=512)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _bar(n: int, scale: float) -> str:
    return "#" * max(0, round(n * scale))


def main(argv: List[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    import logging

    import torch

    from sglang.srt.layers.moe.topk import TopK, TopKOutputFormat
    from sglang.srt.plugins import load_plugins

    from sglang_moe_routing.expert_choice import expert_load, routing_fidelity
    from sglang_moe_routing.expert_choice.reference import capacity
    from sglang_moe_routing.integration import config, expert_choice_hooks

    load_plugins()
    from sglang_moe_routing.integration import plugin

    plugin.install_feature_hooks(force=True)  # a server does this when the model runner starts
    logging.getLogger().setLevel(logging.WARNING)
    t, e, k = args.tokens, args.experts, args.top_k
    kw = dict(renormalize=True)
    if args.deepseek:
        t, e, k = max(t, 512), 64, 8
        kw.update(use_grouped_topk=True, num_expert_group=8, topk_group=4,
                  scoring_func="sigmoid", routed_scaling_factor=2.5,
                  correction_bias=torch.zeros(e))
    g = torch.Generator().manual_seed(args.seed)
    logits = torch.randn(t, e, generator=g)
    logits[:, 0] += args.skew
    logits[:, 1] += 0.8 * args.skew
    hidden = torch.randn(t, 16, generator=g)

    ec_flags = ["--enable-expert-choice", "--expert-capacity-factor", str(args.capacity_factor)]
    if args.min_tokens is not None:
        ec_flags += ["--expert-choice-min-tokens", str(args.min_tokens)]
    results = {}
    for name, flags in (("token choice", []), ("expert choice", ec_flags)):
        with config.published_server_args("--log-level", "warning", *flags):
            layer = TopK(top_k=k, layer_id=0, output_format=TopKOutputFormat.STANDARD, **kw)
            out = layer(hidden, logits)
            if flags:
                ec_cfg = expert_choice_hooks.active_config()
        results[name] = out
    scores = torch.sigmoid(logits) if args.deepseek else torch.softmax(logits, -1)

    print(f"Synthetic skewed batch: T={t} tokens, E={e} experts, top-{k}, skew={args.skew}, "
          f"capacity factor={args.capacity_factor}"
          + (" (DeepSeek-style grouped sigmoid routing)" if args.deepseek else ""))
    print("Routed through sglang.srt.layers.moe.topk.TopK (sglang "
          f"{__import__('sglang').__version__}) with the sglang-moe-routing plugin.")
    loads = {n: expert_load(o.topk_ids, e) for n, o in results.items()}
    cf = ec_cfg.capacity_factor
    min_tokens = ec_cfg.min_tokens_for(e, k)
    if t < min_tokens:
        print(f"Expert choice OFF for this batch: T={t} < min tokens={min_tokens} "
              "(--expert-choice-min-tokens), so both columns are standard routing.\n")
    else:
        cap = int(capacity(torch.tensor(t), e, k, cf))
        print(f"Expert capacity C = min(T, ceil(cf*T*k/E)) = min({t}, ceil({cf:g}*{t}*{k}/{e})) "
              f"= {cap} tokens per expert.")
        print("Fallback slots (a token that fewer than k experts picked takes its own top "
              "choices) can push an expert past C: busiest expert here = "
              f"{int(loads['expert choice'].max())} tokens.\n")
    scale = 40.0 / max(int(v.max()) for v in loads.values())
    show = range(e) if e <= 16 else range(16)
    print(f"{'expert':>6} | {'token choice':>12} | {'expert choice':>13}")
    for j in show:
        a, b = int(loads["token choice"][j]), int(loads["expert choice"][j])
        print(f"{j:>6} | {a:>12} | {b:>13}   TC {_bar(a, scale):<40} EC {_bar(b, scale)}")
    if e > 16:
        print(f"   ... ({e - 16} more experts)")
    print()
    for n, v in loads.items():
        v = v.float()
        print(f"{n:>13}: load std={v.std(unbiased=False):7.2f}  max/mean={v.max() / v.mean():5.2f}"
              f"  busiest expert={int(v.max())} tokens")
    fid = routing_fidelity(scores, results["expert choice"].topk_ids,
                           results["token choice"].topk_ids)
    same = (results["expert choice"].topk_ids.sort(-1).values
            == results["token choice"].topk_ids.sort(-1).values).all(-1).float().mean()
    print(f"\nQuality price: routing fidelity (token-choice score mass kept) mean={fid.mean():.3f} "
          f"min={fid.min():.3f}; tokens with unchanged experts: {same:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
