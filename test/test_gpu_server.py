"""SGLang serving on a CUDA GPU, end to end: real ``launch_server`` processes with CUDA graphs
on (SGLang 0.5.23's default: breakable prefill graphs, full decode graphs) and random-weight
models built here.

Run on a CUDA machine with sglang installed (the README's "pytest suite on a CUDA box"):

    python -m pytest -q -m server test/test_gpu_server.py

All servers of the module start together (their ~30 s imports and graph captures overlap; each
gets a capped KV pool) and are shared by the tests. ``GPU_SERVER_LOG_DIR=dir`` keeps their
logs (written there directly); ``GPU_SERVER_START_S`` caps each server's start (default
600 s); ``GPU_SERVER_ONLY=ds_,doge_`` starts only the servers whose names start so (the tests
of the others skip). The EPLB server needs two GPUs: SGLang 0.5.23 refuses ``--enable-eplb`` with
``ep_size == 1`` (``test_eplb_on_one_gpu_is_refused_by_sglang``).
"""

from __future__ import annotations

import importlib.util
import os
import random
import re
from pathlib import Path

import pytest

from sglang_moe_routing.tools import models
from sglang_moe_routing.tools.server import Server, start_all

pytestmark = [pytest.mark.gpu, pytest.mark.server, pytest.mark.slow]

if importlib.util.find_spec("sglang") is None:  # pragma: no cover - CUDA box without sglang
    pytest.skip("sglang is not installed", allow_module_level=True)

QWEN_K = models.QWEN3_SIZES["medium"]["num_experts_per_tok"]
QWEN_LAYERS = models.QWEN3_SIZES["medium"]["num_hidden_layers"]
DS_LAYERS = models.DEEPSEEK_V3["num_hidden_layers"]
DS_FIRST_MOE = models.DEEPSEEK_V3["first_k_dense_replace"]
# a decode batch above --expert-choice-min-tokens (auto: 32 for 64 experts, top-8; DeepSeek's
# 32 experts, top-4: 32): EC inside the bs-40 graph
BIG_BATCH = 40
COMMON = ["--max-total-tokens", "65536", "--max-running-requests", "64",
          "--cuda-graph-max-bs-decode", "64", "--decode-log-interval", "1"]
EC = ["--enable-expert-choice", "--expert-choice-stats-interval", "1"]
STATS = re.compile(r"expert-choice load layer (\d+) \(last (\d+) forward passes\): tokens=(\d+) "
                   r"std=[\d.]+ max/mean=([\d.]+|nan)")


def _gpus() -> int:
    import torch

    return torch.cuda.device_count()


def _prompts(n: int, length: int, seed: int, vocab: int = 4000):
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(length)] for _ in range(n)]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_server")
    paths = {k: str(root / k) for k in ("qwen", "ds", "doge")}
    models.build("qwen3_moe", paths["qwen"], size="medium")
    models.build("deepseek_v3", paths["ds"])
    models.build("doge", paths["doge"], n=64, top_k=8)
    # GPU_SERVER_LOG_DIR: logs written there directly (kept even when the run is killed)
    keep = os.environ.get("GPU_SERVER_LOG_DIR")
    logs = Path(keep) if keep else root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    spec = {
        "qwen_base": (paths["qwen"], COMMON),
        "qwen_ec": (paths["qwen"], COMMON + EC),
        # the compute profiler on one GPU (EPLB itself needs two): samples under CUDA graphs
        "qwen_prof": (paths["qwen"], COMMON + [
            "--enable-expert-compute-profiling", "--expert-compute-profiling-warmup-steps", "2",
            "--expert-compute-profiling-interval", "2"]),
        "ds_base": (paths["ds"], COMMON + ["--disable-shared-experts-fusion"]),
        "ds_ec": (paths["ds"], COMMON + EC + ["--disable-shared-experts-fusion"]),
        "ds_ec_fused": (paths["ds"], COMMON + EC + ["--enforce-shared-experts-fusion"]),
    }
    for b in ("triton", "torch", "reference"):
        spec[f"doge_{b}"] = (paths["doge"], COMMON + ["--omni-router-backend", b])  # CUDA graphs on
    # the control for Doge's folded attention inside CUDA graphs: the same server without them
    spec["doge_eager"] = (paths["doge"], COMMON + ["--omni-router-backend", "triton",
                                                   "--disable-cuda-graph"])
    if _gpus() >= 2:
        spec["eplb"] = (paths["ds"], COMMON + [
            "--tp", "2", "--ep-size", "2", "--disable-shared-experts-fusion", "--enable-eplb",
            "--eplb-algorithm", "compute_aware", "--enable-expert-compute-profiling",
            "--expert-compute-profiling-warmup-steps", "2", "--expert-compute-profiling-interval", "2",
            "--eplb-rebalance-num-iterations", "24"])
    only = os.environ.get("GPU_SERVER_ONLY")  # e.g. "ds_,doge_": start only these servers
    if only:
        spec = {n: v for n, v in spec.items() if any(n.startswith(p) for p in only.split(","))}
    start_s = float(os.environ.get("GPU_SERVER_START_S", "600"))  # per server, to healthy
    servers = {name: Server(m, args, log_path=str(logs / f"{name}.log"), mem_fraction=0.3,
                            timeout_s=start_s)
               for name, (m, args) in spec.items()}
    errors = start_all(list(servers.values()))
    try:
        yield Fleet(servers, {n: e for n, e in zip(servers, errors) if e})
    finally:
        for s in servers.values():
            s.stop()


class Fleet:
    """The module's servers; a test asking for one that failed to start fails with its log
    tail (the other servers' tests still run)."""

    def __init__(self, servers, errors):
        self.servers, self.errors = servers, errors

    def __contains__(self, name):
        return name in self.servers

    def __getitem__(self, name):
        if name not in self.servers:
            pytest.skip(f"server {name} not started (GPU_SERVER_ONLY)")
        if name in self.errors:
            pytest.fail(f"server {name} did not start: {self.errors[name][-3000:]}")
        return self.servers[name]


def _after(text: str, mark: int) -> str:
    return text[mark:]


# ----------------------------------------------------------------------------- Qwen3-MoE


def test_qwen_expert_choice_active_in_every_layer(fleet):
    log = fleet["qwen_ec"].log()
    assert "expert-choice routing: ON" in log
    assert "expert-choice kernels ready (backend=cuda)" in log
    for layer in range(QWEN_LAYERS):
        assert f"layer {layer} routes with expert choice" in log, layer
    assert "expert choice skipped" not in log


def test_qwen_below_min_tokens_same_tokens_as_token_choice(fleet):
    """T' < --expert-choice-min-tokens routes as token choice: greedy tokens equal exactly."""
    single = _prompts(1, 24, seed=1)[0]
    batch = _prompts(4, 5, seed=2)  # 20 prefill tokens, decode batch 4: both below 32
    for srv in ("qwen_base", "qwen_ec"):
        assert fleet[srv].alive()
    base = [fleet["qwen_base"].generate(single, 16), fleet["qwen_base"].generate(batch, 12)]
    ec = [fleet["qwen_ec"].generate(single, 16), fleet["qwen_ec"].generate(batch, 12)]
    assert ec == base


def test_qwen_above_min_tokens_answers_and_stats_come_from_graph_replays(fleet):
    srv = fleet["qwen_ec"]
    before = srv.log()
    # Capture and warm-up passes never reach the statistics (nothing logged before traffic
    # above min-tokens; the server's own warm-up request is 3 tokens).
    assert not STATS.search(before)
    out = srv.generate(_prompts(BIG_BATCH, 16, seed=3), 8)
    assert len(out) == BIG_BATCH and all(len(o) == 8 for o in out)
    assert srv.alive()
    new = _after(srv.log(), len(before))
    decode_graph = [ln for ln in new.splitlines()
                    if f"#running-req: {BIG_BATCH}," in ln and "graph: True" in ln]
    assert decode_graph, "no decode pass of the batch ran from a CUDA graph"
    stats = [(int(m[1]), int(m[2]), int(m[3])) for m in STATS.finditer(new)]
    assert {s[0] for s in stats} == set(range(QWEN_LAYERS))
    assert all(tokens % QWEN_K == 0 and n == 1 for _, n, tokens in stats)
    decode_lines = [s for s in stats if s[0] == 0 and s[2] == BIG_BATCH * QWEN_K]
    # 7 decode steps with all 40 requests running, each replayed from the bs-40 graph
    assert len(decode_lines) >= len(decode_graph) >= 1
    assert sum(s[2] for s in stats if s[0] == 0) <= BIG_BATCH * (16 + 7) * QWEN_K


def test_compute_profiler_gets_samples_with_cuda_graphs_on(fleet):
    """Graph replays run no Python: profiled passes (1 in 2 here) run eagerly, the others
    replay their graphs; the profiler's kernel samples grow with served traffic."""
    srv = fleet["qwen_prof"]
    assert "profiled passes run eagerly" in srv.log()
    for i in range(3):
        srv.generate(_prompts(8, 16, seed=20 + i), 8)
    log = srv.log()
    lines = re.findall(r"after (\d+) profiled passes: steps=(\d+) profiled=\d+ samples=(\d+)", log)
    assert lines, log[-3000:]
    n, steps, samples = map(int, lines[-1])
    assert n >= 10 and samples >= n * QWEN_LAYERS  # one sample per MoE layer per profiled pass
    graph_decodes = [ln for ln in log.splitlines() if "Decode batch" in ln and "graph: True" in ln]
    assert graph_decodes, "no decode pass replayed a CUDA graph"


# ----------------------------------------------------------------------------- DeepSeek V3


@pytest.mark.parametrize("name", ["ds_ec", "ds_ec_fused"])
def test_deepseek_expert_choice_every_moe_layer(fleet, name):
    log = fleet[name].log()
    for layer in range(DS_FIRST_MOE, DS_LAYERS):
        assert f"layer {layer} routes with expert choice" in log, (name, layer)
    assert ("+ 1 fused shared" in log) == (name == "ds_ec_fused")
    assert "expert choice skipped" not in log


def test_deepseek_below_min_tokens_same_tokens_as_token_choice(fleet):
    prompts = _prompts(3, 6, seed=4)
    assert fleet["ds_ec"].generate(prompts, 12) == fleet["ds_base"].generate(prompts, 12)


def test_deepseek_fused_shared_expert_routes_like_unfused(fleet):
    """Above min-tokens both EC servers route the same tokens to the same routed experts;
    fusion only moves the shared expert into the MoE kernel (bf16 sums may differ)."""
    prompts = _prompts(BIG_BATCH, 16, seed=5)
    fused = fleet["ds_ec_fused"].generate(prompts, 4)
    unfused = fleet["ds_ec"].generate(prompts, 4)
    assert all(len(o) == 4 for o in fused + unfused)
    first_equal = sum(a[0] == b[0] for a, b in zip(fused, unfused))
    assert first_equal >= BIG_BATCH - 4, first_equal
    for name in ("ds_ec", "ds_ec_fused"):
        assert STATS.search(fleet[name].log()), name
        assert fleet[name].alive()


# ----------------------------------------------------------------------------- Doge / Omni


def test_doge_omni_backends_answer_with_the_same_tokens(fleet):
    prompts = _prompts(4, 16, seed=6)
    outs = {b: fleet[f"doge_{b}"].generate(prompts, 16) for b in ("triton", "torch", "reference")}
    assert all(len(o) == 16 for seqs in outs.values() for o in seqs)
    for b in ("torch", "reference"):
        same = sum(x == y for x, y in zip(outs["triton"], outs[b]))
        assert same >= 3, (b, same)  # bf16 score ties may pick different experts


def test_doge_runs_inside_cuda_graphs_with_the_tokens_of_eager_mode(fleet):
    """Doge's folded dynamic-mask attention (RadixAttention, triton) is captured in the decode
    graphs, and a batch of prompts of different lengths (1 to 40 tokens) decodes the same
    greedy tokens with graphs as without."""
    log = fleet["doge_triton"].log()
    assert "Capture target decode CUDA graph end" in log, log[-3000:]
    assert "Capture target decode CUDA graph end" not in fleet["doge_eager"].log()
    rng = random.Random(9)
    prompts = [[rng.randrange(2, 4000) for _ in range(n)] for n in (1, 5, 17, 40, 3, 26)]
    graphs = fleet["doge_triton"].generate(prompts, 24)
    eager = fleet["doge_eager"].generate(prompts, 24)
    same = sum(x == y for x, y in zip(graphs, eager))
    assert same >= len(prompts) - 1, (same, graphs, eager)  # bf16 ties aside


# ----------------------------------------------------------------------------- EPLB


def test_eplb_on_one_gpu_is_refused_by_sglang(tmp_path):
    """No EPLB configuration starts on one GPU: SGLang 0.5.23 asserts ep_size > 1 with
    --enable-eplb (arg_groups/parallel_hook.py), with or without redundant experts."""
    if _gpus() >= 2:
        pytest.skip("more than one GPU: the EPLB server test below runs instead")
    models.build("qwen3_moe", str(tmp_path), size="small")
    srv = Server(str(tmp_path), ["--enable-eplb", "--ep-num-redundant-experts", "4",
                                 "--eplb-algorithm", "compute_aware",
                                 "--enable-expert-compute-profiling"], timeout_s=300)
    with pytest.raises(Exception, match="exited"):
        srv.start()
    assert "ep_size > 1" in srv.log() or "AssertionError" in srv.log(), srv.log()[-3000:]


def test_eplb_compute_aware_rebalances_under_cuda_graphs(fleet):
    if "eplb" not in fleet:
        pytest.skip("EPLB needs >= 2 GPUs: SGLang 0.5.23 asserts ep_size > 1 with --enable-eplb")
    srv = fleet["eplb"]
    probe = _prompts(8, 12, seed=7)
    first = srv.generate(probe, 6)
    for i in range(6):  # > 24 forward passes: at least one rebalance
        srv.generate(_prompts(BIG_BATCH, 24, seed=100 + i), 6)
    after = srv.generate(probe, 6)
    log = srv.log()
    assert "expert compute profiling:" in log
    assert re.search(r"compute-aware EPLB: compute_aware, alpha=0.5, costs=profiled", log), \
        "no rebalance used profiled costs"
    assert "balancedness (mean/max per GPU" in log
    assert srv.alive()
    # placement changes where experts live, not what they compute: same first tokens
    assert sum(a[0] == b[0] for a, b in zip(first, after)) >= 7
