"""Probe: the EC CUDA kernels' in-graph time per call, and each kernel's share (torch.profiler,
eager calls).

Why (issue 9): one_batch's B = 1 prefill (256 tokens) cost ~0.1 ms more per layer under EC
than TC; this probe showed the routing kernels take ~10 us there (the rest is the fused MoE
reading more experts' weights: benchmark/ec_expert_hits.py). Issue 12: where each shape's
time goes (score / select / route).

Usage (GPU): python3 benchmark/probe_ec_small_t.py [--graph-t 64,256,2048] [--e 128]
             [--profile 256x128,8192x256]
$SGLANG_MOE_EC_SELECT_CLUSTER (0 / 2 / 4 CTAs per expert in the select for T > 4096;
ec_select.cu) is read by the extension at each call, so setting it before this script times
that kernel.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, "benchmark")
import harness  # noqa: E402
from sglang_moe_routing.expert_choice import cuda as ecc  # noqa: E402
from sglang_moe_routing.expert_choice.spec import RoutingSpec  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--graph-t", default="64,128,192,256,288,512,1024,2048,4096")
p.add_argument("--e", type=int, default=128)
p.add_argument("--k", type=int, default=8)
p.add_argument("--profile", default="256x128")
a = p.parse_args()
g = torch.Generator(device="cuda").manual_seed(0)
spec = RoutingSpec(top_k=a.k, capacity_factor=1.25, min_tokens=0)

print(f"SGLANG_MOE_EC_SELECT_CLUSTER={os.environ.get('SGLANG_MOE_EC_SELECT_CLUSTER', '')!r}")
print(f"E={a.e} k={a.k}: T path pdl n_valid us (CUDA graph, 20 calls per graph)")
for T in [int(t) for t in a.graph_t.split(",") if t]:
    x = torch.randn(T, a.e, device="cuda", dtype=torch.bfloat16, generator=g)
    n = torch.tensor([T], device="cuda", dtype=torch.int32)
    for pdl in (True, False):
        for nv in (None, n):
            us = harness.time_graph(lambda: ecc.expert_choice_topk_cuda(x, spec, nv, pdl=pdl))
            print(T, ecc.choose_path(T, a.e), pdl, "tensor" if nv is not None else "none",
                  f"{us:.1f}", flush=True)
for shape in [s for s in a.profile.split(",") if s]:
    T, E = (int(v) for v in shape.split("x"))
    x = torch.randn(T, E, device="cuda", dtype=torch.bfloat16, generator=g)
    n = torch.tensor([T], device="cuda", dtype=torch.int32)
    for _ in range(3):
        ecc.expert_choice_topk_cuda(x, spec, n)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            ecc.expert_choice_topk_cuda(x, spec, n)
        torch.cuda.synchronize()
    print(f"--- T={T} E={E} k={a.k} path={ecc.choose_path(T, E)}: per-kernel us (10 eager calls)")
    for ev in sorted(prof.key_averages(), key=lambda e: -e.device_time_total):
        if ev.device_time_total > 0:
            print(f"  {ev.key[:70]:<70} {ev.device_time_total / ev.count:8.2f} us x{ev.count}")
