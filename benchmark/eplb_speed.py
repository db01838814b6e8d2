"""EPLB placement speed: ours vs upstream SGLang ``deepseek`` (``eplb_sim.py --speed``).

Times the placement of 61 layers x 256 experts onto 288 slots (32 GPUs, 4 nodes) on a uniform
and a heavy-tailed token load, global and hierarchical policies, on the CPU (median of
``--repeats`` runs after a warm-up). Ours at alpha 0 must reproduce upstream's placement
exactly (checked in the same run where SGLang is importable); where it does not, the
speed-up is not printed. Also here: where the upstream algorithm is found (the simulator
uses it too).

    python benchmark/eplb_sim.py --speed [--repeats 21]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Checks, median_wall_ms  # noqa: E402

from sglang_moe_routing.eplb.compute_aware import compute_cost_aware_rebalance_experts  # noqa: E402


def upstream_deepseek() -> Optional[Callable]:
    try:
        from sglang.srt.eplb.eplb_algorithms.deepseek import rebalance_experts
    except Exception:
        return None
    return rebalance_experts


SPEED_GOAL_MS = 20.0


def speed_inputs(seed: int = 0) -> Dict[str, Tuple[str, torch.Tensor]]:
    """Token counts [61, 256] of the two load kinds timed by ``--speed``: name ->
    (description, tokens)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "uniform": ("randint(0, 20000)", torch.randint(0, 20000, (61, 256), generator=g).float()),
        "heavy-tailed": ("rand^3 * 1e5", torch.rand(61, 256, generator=g).pow(3) * 1e5),
    }


def describe_load(tokens: torch.Tensor) -> str:
    """Skew of a [L, E] load: max / mean expert and the top-8 experts' share of the tokens
    (medians over layers)."""
    t = tokens.double()
    peak = (t.amax(-1) / t.mean(-1)).median()
    top8 = (t.topk(8, dim=-1).values.sum(-1) / t.sum(-1)).median()
    return f"max/mean {float(peak):.2f}, top-8 share {100 * float(top8):.1f}%"


def speed(repeats: int, goal_ms: float = SPEED_GOAL_MS) -> List[Dict[str, object]]:
    """Time the placement of 61 layers x 256 experts onto 288 slots (32 GPUs, 4 nodes) on a
    uniform and a heavy-tailed load, ours vs upstream; print a table and the goal check
    (ours under ``goal_ms`` on both loads, both policies). Returns the table rows."""
    import numpy as np

    ds = upstream_deepseek()
    try:
        from sglang.srt.eplb.eplb_algorithms import deepseek_vec
    except Exception:
        deepseek_vec = None
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), numpy {np.__version__}, "
        f"{os.cpu_count()} CPUs, load average {load:.2f}; median of {repeats} runs after a warm-up"
    )
    print("ours: compute_cost_aware_rebalance_experts with costs = tokens * (1 + rand), alpha 0.5; "
          "ours a=0 and upstream: on the tokens")
    print("| load | policy | ours (ms) | ours a=0 (ms) | upstream deepseek (ms) | upstream deepseek_vec (ms) "
          "| deepseek / ours | a=0 output == deepseek |")
    print("|---|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(1)
    checks = Checks()
    rows: List[Dict[str, object]] = []
    for kind, (formula, tokens) in speed_inputs().items():
        cost = tokens * (1 + torch.rand(tokens.shape, generator=g))
        for hier in (False, True):
            ours = median_wall_ms(
                lambda: compute_cost_aware_rebalance_experts(tokens, cost, 288, 8, 4, 32, hier, 0.5), repeats
            )
            ours0 = median_wall_ms(
                lambda: compute_cost_aware_rebalance_experts(tokens, None, 288, 8, 4, 32, hier, 0.0), repeats
            )
            up = median_wall_ms(lambda: ds(tokens, 288, 8, 4, 32, hier), repeats) if ds else float("nan")
            vec = (
                median_wall_ms(lambda: deepseek_vec.rebalance_experts(tokens[None], 288, 9, 8, 4, hier), repeats)
                if deepseek_vec
                else float("nan")
            )
            if ds:
                same = all(
                    torch.equal(a, b)
                    for a, b in zip(
                        compute_cost_aware_rebalance_experts(tokens, None, 288, 8, 4, 32, hier, 0.0),
                        ds(tokens, 288, 8, 4, 32, hier),
                    )
                )
                same_s = "yes" if same else "NO"
            else:
                same, same_s = None, "n/a (no sglang)"
            policy = "hierarchical (8 groups, 4 nodes)" if hier else "global"
            if same is not None:
                checks.record(("ours", hier), None if same else "a=0 placement differs from upstream deepseek")
            load_s = f"{kind}: {formula} ({describe_load(tokens)})"
            print(f"| {load_s} | {policy} | {ours:.1f} | {ours0:.1f} | {up:.1f} | {vec:.1f} | "
                  f"{checks.ratio(up, ours, ('ours', hier), spec='.1f', suffix='x')} | {same_s} |")
            rows.append(dict(load=kind, formula=formula, policy=policy, hierarchical=hier, ours_ms=ours,
                             ours_alpha0_ms=ours0, deepseek_ms=up, deepseek_vec_ms=vec, alpha0_equals_deepseek=same))
    for hier in (False, True):
        mine = [r for r in rows if r["hierarchical"] == hier]
        worst = max(max(r["ours_ms"], r["ours_alpha0_ms"]) for r in mine)
        ok = worst < goal_ms
        print(
            f"goal [{mine[0]['policy']}]: ours < {goal_ms:g} ms on uniform and heavy-tailed loads: "
            + ", ".join(f"{r['load']} {r['ours_ms']:.1f} / {r['ours_alpha0_ms']:.1f} ms (a=0.5 / a=0)" for r in mine)
            + f": {checks.refusal(('ours', hier)) or ('PASS' if ok else 'FAIL')}"
        )
    return rows
