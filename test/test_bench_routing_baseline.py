"""The seeds' dense expert-choice algorithm that bench_routing.py times as the ">= 10x"
baseline computes expert choice: it agrees with our reference where the two contracts agree."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmark"))

from bench_routing import seeds_dense_expert_choice  # noqa: E402

from sglang_moe_routing.expert_choice import RoutingSpec  # noqa: E402
from sglang_moe_routing.expert_choice.reference import expert_choice_topk_reference  # noqa: E402


def test_seeds_dense_baseline_matches_reference_on_distinct_picks():
    torch.manual_seed(0)
    for t, e, k in ((64, 8, 2), (256, 64, 8), (1000, 16, 4)):
        x = torch.randn(t, e)
        w, ids = seeds_dense_expert_choice(x, k)
        w_ref, ids_ref = expert_choice_topk_reference(x, RoutingSpec(k, 1.25))
        # int64 as topk gives them: the seeds do no cast, so the timed baseline does none
        assert ids.shape == (t, k) and ids.dtype == torch.int64
        torch.testing.assert_close(w.sum(-1), torch.ones(t))
        # tokens whose k slots were all picked by experts: both give the same experts/weights
        picked = torch.zeros(t, e, dtype=torch.bool)
        p = torch.softmax(x, -1)
        c = min(t, max(1, -(-t * k * 5 // (e * 4))))
        picked.scatter_(0, torch.topk(p.t(), c, dim=1).indices.t(), True)
        full = picked.sum(1) >= k
        assert full.any()
        same = (ids.sort(-1).values == ids_ref.long().sort(-1).values).all(1)
        assert same[full].all()
