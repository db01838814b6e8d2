"""The report side of ``benchmark/eval_routing_quality.py``: the markdown tables of a result
(``markdown``) and the plot of perplexity vs expert load (``plot``, one panel per model;
``benchmark/quality_session.sh`` reaches it as ``eval_routing_quality.plot``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Sequence, Tuple


# ----------------------------------------------------------------------------- tables, plot


def _f(v, fmt="{:.3f}"):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def _invariance_table(rows: Sequence[Dict]) -> List[str]:
    lines = ["| mode | prompts x trials | batch | max abs dlogprob | mean abs dlogprob | "
             "bitwise | prompt routing changed |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['prompts']} x {r['trials']} | {r['batch_seqs']} seqs "
                     f"(T={r['T']}) | {r['max_abs_dlogprob']:.3e} | "
                     f"{r['mean_abs_dlogprob']:.3e} | {'yes' if r['bitwise_identical'] else 'no'}"
                     f" | {r['routing_changed']:.2%} |")
    return lines


def markdown(result: Dict) -> str:
    lines = [f"# Routing quality: {result['model']}", "",
             f"Routing path: {result['routing_path']} (expert-choice backend: "
             f"{result['ec_backend']}).", ""]
    probe = result.get("router_probe")
    if probe:
        lines += ["Router probe (random logits, bf16 on a GPU; SGLang's TopK vs the dispatch "
                  "path): " + "; ".join(
                      f"{m}: ids identical on {p['ids_identical']:.1%} of {p['rows']} rows, "
                      f"max |dweight| {p['max_abs_dweight']:.1e}" for m, p in probe.items()),
                  ""]
    lines += [f"Held-out: {result['heldout']}", ""]
    cal = result.get("calibration")
    if cal:
        lines += [f"thr calibration: {cal['seqs']} training-split sequences ({cal['tokens']} "
                  f"tokens, one forward), {cal['iters']} update steps per layer; per-layer "
                  f"load max/mean on the calibration batch: top-k start "
                  f"{', '.join(f'{v:.2f}' for v in cal['load_max_mean_start'])} -> calibrated "
                  f"{', '.join(f'{v:.2f}' for v in cal['load_max_mean_calibrated'])} "
                  f"({cal['seconds']:.1f}s).", ""]
    lines += ["Load max/mean counts every output slot (the compute the experts do), averaged "
              "over (layer, forward); 'picked' counts only the slots the experts chose (EC), "
              "'fallback' is the share of slots filled by step 4 (token's best remaining "
              "experts).", "",
              "| batch T | composition | mode | ppl | ppl code | ppl prose | dppl vs TC | "
              "top-1 = TC | load max/mean | worst | picked max/mean | fallback |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['composition']} (T={r['T']}) | {r['shape']} | {r['mode']} | {_f(r['ppl'])} | "
            f"{_f(r['ppl_code'])} | {_f(r['ppl_prose'])} | {_f(r['dppl_pct'], '{:+.2f}%')} | "
            f"{_f(r['top1_agree_tc'], '{:.4f}')} | {_f(r['load_max_mean'])} | "
            f"{_f(r['load_max_mean_worst'])} | {_f(r.get('picked_load_max_mean'))} | "
            f"{_f(r.get('fallback_share'), '{:.1%}')} |")
    lines += ["", "Batch invariance (same prompt, random batch mates, full prefill):", ""]
    lines += _invariance_table(result["invariance"])
    bi = result.get("invariance_bi")
    if bi:
        r0 = bi[0]
        lines += ["", f"Batch invariance with SGLang's batch-invariant ops ({r0['ops']}: "
                  f"set_batch_invariant_mode(True); experts {r0['experts']}, attention "
                  f"{r0['attention']}, {r0['dtype']}, mm: {r0['mm_kernel']}; same prompts and "
                  "batch mates):", ""]
        lines += _invariance_table(bi)
    if result.get("timings"):
        lines += ["", f"Routing time per call ({result['timing_device']}, bf16 logits, "
                  f"E={result['E']}, k={result['k']}):", "",
                  "| T | method | us/call | timed as |", "|---|---|---|---|"]
        for r in result["timings"]:
            extra = (f" (ids = thr on {r['sglang_bias_ids_equal_thr']:.1%} of rows)"
                     if "correction_bias" in r["method"] and "sglang_bias_ids_equal_thr" in r
                     else "")
            lines.append(f"| {r['T']} | {r['method']}{extra} | {r['us']:.1f} | {r['timed']} |")
    if result.get("skipped"):
        lines += ["", f"Left out by the time cap: {', '.join(result['skipped'])}."]
    return "\n".join(lines) + "\n"


def plot(results: Sequence[Tuple[str, Dict]], path: Path, min_tokens: int = 256) -> None:
    """PNG: dppl vs token choice (%) against load max/mean, one point per (mode, composition
    with T >= min_tokens), one panel per evaluated model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 5), squeeze=False)
    markers = "osD^v<>p*"
    for ax, (label, res) in zip(axes[0], results):
        comps = sorted({r["composition"] for r in res["rows"] if r["T"] >= min_tokens},
                       key=lambda c: next(r["T"] for r in res["rows"] if r["composition"] == c))
        modes = list(dict.fromkeys(r["mode"] for r in res["rows"]))
        cmap = plt.get_cmap("tab10")
        for r in res["rows"]:
            if r["composition"] not in comps:
                continue
            ax.scatter(r["load_max_mean"], r["dppl_pct"],
                       color=cmap(modes.index(r["mode"]) % 10),
                       marker=markers[comps.index(r["composition"]) % len(markers)], s=45)
            if r["composition"] == comps[-1]:
                ax.annotate(r["mode"], (r["load_max_mean"], r["dppl_pct"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        for i, m in enumerate(modes):
            ax.scatter([], [], color=cmap(i % 10), label=m)
        for j, c in enumerate(comps):
            t = next(r["T"] for r in res["rows"] if r["composition"] == c)
            ax.scatter([], [], color="gray", marker=markers[j % len(markers)],
                       label=f"{c} (T={t})")
        ax.axhline(1.0, ls=":", color="gray", lw=0.8)
        ax.axvline(1.15, ls=":", color="gray", lw=0.8)
        ax.set_xlabel("expert load max/mean (all slots)")
        ax.set_ylabel("perplexity vs token choice (%)")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
