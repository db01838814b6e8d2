"""The CUDA kernels' streaming path (``path="stream"``, ``sgl-kernel/csrc/ec_stream.cu``) on a GPU.

The stream path finds each expert's threshold from histograms of the selection keys built
while streaming the logits (no ``[E, T]`` key matrix). Checked here against the reference
(ids bit for bit, weights within 1e-6 as in ``test_expert_choice_gpu.py``) and against the
three-launch path (ids and weights bit for bit: both end in the same route kernel), over
T (1, below the capacity, not a multiple of any block size, up to 20001) x E in
{8, 64, 128, 256, 384, 512} x k in {1, 2, 8}, cf 1.0 / 1.25 / 2.0, bf16 / fp16 / fp32,
exact ties (quantised logits, constant columns) with the candidate buffer large and forced
down to 1 slot (``$SGLANG_MOE_EC_STREAM_CAP``: the overflow fallback that recomputes keys),
grouped top-k + sigmoid + correction bias, padding rows, min_tokens, NaN / inf logits,
outputs allocated from NaN-filled memory, and no host synchronisation. CUDA-graph replay
with a changing T' is ``test_expert_choice_gpu.py::test_cuda_graph_replay_changing_num_valid``
(its ``cuda_stream`` case).
"""

from __future__ import annotations

import pytest
import torch

from ec_helpers import assert_matches_reference, describe

from sglang_moe_routing.expert_choice import RoutingSpec
from sglang_moe_routing.expert_choice.reference import expert_choice_topk_reference

pytestmark = pytest.mark.gpu

E_VALUES = [8, 64, 128, 256, 384, 512]
K_VALUES = [1, 2, 8]
T_VALUES = [1, 5, 100, 1000, 4097, 8192, 20001]
CFS = [1.0, 1.25, 2.0]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture(scope="module", autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


def _cuda(path, logits, k, cf, num_token_non_padded=None, **kw):
    from sglang_moe_routing.expert_choice.cuda import expert_choice_topk_cuda

    return expert_choice_topk_cuda(logits, RoutingSpec(k, cf, **kw), num_token_non_padded,
                                   path=path)


def _bits(w: torch.Tensor) -> torch.Tensor:
    return w.contiguous().view(torch.int32)


def _check(logits, k, cf=1.25, **kw):
    """Stream path == reference (ids exact, weights 1e-6) and == three launches (bitwise)."""
    ntnp = kw.pop("num_token_non_padded", None)
    rw, rids = expert_choice_topk_reference(logits, RoutingSpec(k, cf, **kw), ntnp)
    kw["num_token_non_padded"] = ntnp
    sw, sids = _cuda("stream", logits, k, cf, **kw)
    tw, tids = _cuda("three_launch", logits, k, cf, **kw)
    what = describe(logits, k, kw, cf)
    assert_matches_reference("stream", what, sw, sids, rw, rids)
    assert torch.equal(sids, tids), f"stream vs three_launch ids: {what}"
    assert torch.equal(_bits(sw), _bits(tw)), f"stream vs three_launch weights: {what}"
    return sw, sids


@pytest.mark.parametrize("k", K_VALUES)
@pytest.mark.parametrize("E", E_VALUES)
def test_grid_against_reference(E, k):
    if k > E:
        pytest.skip("k > E")
    g = torch.Generator(device="cuda").manual_seed(1000 * E + k)
    for i, T in enumerate(T_VALUES):
        cf = CFS[(i + E + k) % 3]
        dtype = DTYPES[(i + k) % 3]
        logits = (torch.randn(T, E, device="cuda", generator=g) * 2).to(dtype)
        _check(logits, k, cf)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cf", CFS)
def test_capacity_factors_and_dtypes(cf, dtype):
    g = torch.Generator(device="cuda").manual_seed(7)
    for T, E in ((8192, 256), (9001, 64), (3000, 8)):
        logits = torch.randn(T, E, device="cuda", generator=g).to(dtype)
        _check(logits, 8, cf)


def test_capacity_above_tokens():
    """k * cf > E: C = T' (every expert may take every token)."""
    g = torch.Generator(device="cuda").manual_seed(8)
    for T in (1, 3, 777, 8192):
        _check(torch.randn(T, 8, device="cuda", generator=g), 8, 2.0)


@pytest.mark.parametrize("cap", [None, "1", "7"])
def test_ties(monkeypatch, cap):
    """Many equal keys: the threshold falls inside a run of ties, broken by token index.

    ``cap`` shrinks the candidate slots per expert so that the threshold bin overflows and
    the fallback (keys recomputed from the logits, radix over key and token index) runs.
    """
    if cap is None:
        monkeypatch.delenv("SGLANG_MOE_EC_STREAM_CAP", raising=False)
    else:
        monkeypatch.setenv("SGLANG_MOE_EC_STREAM_CAP", cap)
    g = torch.Generator(device="cuda").manual_seed(9)
    for T, E, k in ((1000, 64, 8), (8192, 256, 8), (20001, 8, 2)):
        quant = torch.round(torch.randn(T, E, device="cuda", generator=g) * 2) / 2
        _check(quant.to(torch.bfloat16), k)
        row = torch.randn(1, E, device="cuda", generator=g)
        _check(row.expand(T, E).contiguous(), k)  # every column constant: all ties
        _check(torch.zeros(T, E, device="cuda"), k, 1.25, scoring_func="sigmoid")


def test_overflow_on_random_logits(monkeypatch):
    """Random logits with a small candidate buffer: the fallback on a typical bin."""
    monkeypatch.setenv("SGLANG_MOE_EC_STREAM_CAP", "16")
    g = torch.Generator(device="cuda").manual_seed(10)
    for T, E, k, dtype in ((5000, 128, 8, torch.bfloat16), (8192, 384, 8, torch.float32)):
        _check(torch.randn(T, E, device="cuda", generator=g).to(dtype), k)


@pytest.mark.parametrize("cap", [None, "4"])
def test_grouped_biased(monkeypatch, cap):
    if cap is None:
        monkeypatch.delenv("SGLANG_MOE_EC_STREAM_CAP", raising=False)
    else:
        monkeypatch.setenv("SGLANG_MOE_EC_STREAM_CAP", cap)
    g = torch.Generator(device="cuda").manual_seed(11)
    for T in (1000, 8192):
        logits = torch.randn(T, 256, device="cuda", generator=g).to(torch.bfloat16)
        bias = torch.randn(256, device="cuda", generator=g) * 0.1
        # DeepSeek-V3 style: sigmoid, correction bias, 8 groups / 4 kept, scaled output.
        _check(logits, 8, 1.25, scoring_func="sigmoid", correction_bias=bias,
               num_expert_group=8, topk_group=4, routed_scaling_factor=2.5,
               apply_routed_scaling_factor_on_output=True)
        _check(logits, 8, 1.25, scoring_func="sigmoid", correction_bias=bias, renormalize=False)
        _check(logits[:, :64].contiguous(), 6, 1.25, num_expert_group=8, topk_group=3)
        _check(logits.t().contiguous().t(), 4, 2.0, num_expert_group=4, topk_group=2)  # strides (1, T)
    big = torch.randn(4097, 512, device="cuda", generator=g)
    _check(big, 8, 1.25, scoring_func="sigmoid", correction_bias=torch.randn(512, device="cuda") * 0.1,
           num_expert_group=16, topk_group=4)


def test_padding_rows_and_min_tokens():
    g = torch.Generator(device="cuda").manual_seed(12)
    logits = torch.randn(9000, 128, device="cuda", generator=g).to(torch.bfloat16)
    for n in (9000, 7000, 1, 0):
        nd = torch.tensor([n], dtype=torch.int64, device="cuda")
        _check(logits, 8, num_token_non_padded=nd)
        _check(logits, 8, num_token_non_padded=n, min_tokens=8000)  # n < 8000: token choice


def test_nan_inf_logits():
    g = torch.Generator(device="cuda").manual_seed(13)
    logits = torch.randn(8192, 64, device="cuda", generator=g)
    logits[5, :] = float("nan")
    logits[17, 3] = float("nan")
    logits[100:140, 9] = float("inf")
    logits[200:300, 11] = float("-inf")
    logits[300, :] = float("-inf")
    _check(logits, 8)
    _check(logits, 8, scoring_func="sigmoid", renormalize=False)


def _poison_allocator():
    """Fill free memory of PyTorch's caching allocator with NaN bytes (large and small pools),
    so that an output or workspace entry the kernels forget to write shows up."""
    big = [torch.full((n,), float("nan"), device="cuda") for n in (64 << 20, 8 << 20, 1 << 20)]
    small = [torch.full((n,), float("nan"), device="cuda") for n in (1 << 10, 1 << 14, 1 << 17) * 8]
    del big, small


def test_nan_poisoned_memory():
    g = torch.Generator(device="cuda").manual_seed(14)
    for T, E, k in ((8192, 256, 8), (20001, 64, 2), (777, 512, 8)):
        logits = torch.randn(T, E, device="cuda", generator=g).to(torch.bfloat16)
        _poison_allocator()
        w, ids = _check(logits, k)
        assert torch.isfinite(w).all() and ((ids >= 0) & (ids < E)).all()


def test_no_host_sync():
    g = torch.Generator(device="cuda").manual_seed(16)
    logits = torch.randn(8192, 128, device="cuda", generator=g).to(torch.bfloat16)
    n = torch.tensor([6000], device="cuda")
    _cuda("stream", logits, 8, 1.25, num_token_non_padded=n)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _cuda("stream", logits, 8, 1.25, num_token_non_padded=n)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_stream_path_writes_no_key_matrix(monkeypatch):
    """The stream path returns no [E, T] key matrix (it never writes one); three launches do.
    (``auto`` takes the stream path only once ``STREAM_MIN_T`` is set from GPU measurements.)"""
    from sglang_moe_routing.expert_choice import cuda as ec_cuda

    monkeypatch.setenv("SGLANG_MOE_EC_PATH", "stream")
    T = 8192
    logits = torch.randn(T, 64, device="cuda")
    _, _, keys, thr = ec_cuda.expert_choice_topk_cuda(logits, RoutingSpec(8),
                                                      return_intermediates=True)
    assert keys.numel() == 0 and thr.shape == (64,)
    _, _, keys3, _ = ec_cuda.expert_choice_topk_cuda(logits, RoutingSpec(8), path="three_launch",
                                                      return_intermediates=True)
    assert keys3.shape == (64, T)
