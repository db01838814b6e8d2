"""Omni router Triton kernels on a CUDA GPU: the full shape grid, gradients, every
autotune candidate, CUDA graphs, torch.compile, determinism. Skipped without CUDA.

Run: ``python3 -m pytest test/test_omni_gpu.py -n 8`` (xdist spreads the compiles).
"""

from __future__ import annotations

import pytest
import torch

from sglang_moe_routing.omni import (
    OmniRouterFunction,
    omni_router,
    omni_router_backward_reference,
    omni_router_reference,
)
from sglang_moe_routing.omni import triton as tk
from test_omni import assert_compiled_matches_eager, check_routing, make_logits, weight_tol

pytestmark = pytest.mark.gpu

NS = [4, 8, 31, 64, 128, 256, 1024]
KS = [1, 2, 8, 16, 32, 64]
TS = [0, 1, 7, 4096]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def reference_ids_chunked(x, y, k):
    """Reference ids, computed over row chunks so n=1024, T=4096 fits in memory."""
    T, n = x.shape
    rows = max(1, (1 << 27) // (n * n))
    out = [omni_router_reference(x[r : r + rows], y[r : r + rows], k)[1] for r in range(0, T, rows)]
    return torch.cat(out) if out else torch.empty(0, k, dtype=torch.int64, device=x.device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("n", NS)
def test_forward_grid(n, k, dtype):
    """forward == reference for every T in TS (ids as sets where scores tie)."""
    if k > n * n:
        pytest.skip("k > n*n is an error (tested on CPU)")
    for T in TS:
        x, y = make_logits(T, n, dtype, device="cuda", seed=n * 131 + k * 7 + T)
        for renorm in (False, True):
            w, ids = omni_router(x, y, k, backend="triton", renormalize=renorm)
            rids = reference_ids_chunked(x, y, k)
            check_routing(x, y, k, w, ids, renormalize=renorm, ref_ids=rids)


@pytest.mark.parametrize("k", [1, 8, 64])
@pytest.mark.parametrize("n", [8, 31, 256, 1024])
def test_gradients_fp32_equal_reference(n, k):
    if k > n * n:
        pytest.skip()
    T = 300 if n <= 256 else 64
    x, y = make_logits(T, n, torch.float32, device="cuda", seed=n + k)
    x.requires_grad_(True)
    y.requires_grad_(True)
    g = torch.randn(T, k, device="cuda")
    for renorm in (False, True):
        w, ids = omni_router(x, y, k, backend="triton", renormalize=renorm)
        dx, dy = torch.autograd.grad(w, (x, y), g)
        rw, rids = omni_router_reference(x, y, k, renormalize=renorm)
        rdx, rdy = torch.autograd.grad(rw, (x, y), g)
        same = (ids.sort(1).values == rids.sort(1).values).all(1)  # rows without boundary ties
        assert float(same.float().mean()) > 0.95
        torch.testing.assert_close(dx[same], rdx[same], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dy[same], rdy[same], atol=1e-5, rtol=1e-5)
        # every row, given the kernel's own selection
        bx, by = omni_router_backward_reference(x, y, ids, g, renormalize=renorm)
        torch.testing.assert_close(dx, bx, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dy, by, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n,k", [(31, 8), (512, 8), (1024, 32), (64, 64)])
def test_gradients_16bit_fixed_selection(n, k, dtype):
    x, y = make_logits(1000, n, dtype, device="cuda", seed=n)
    g = torch.randn(1000, k, device="cuda").to(dtype)
    w, ids = omni_router(x, y, k, backend="triton", renormalize=True)
    dx, dy = tk.omni_router_bwd_triton(x, y, ids, g, True)
    bx, by = omni_router_backward_reference(x, y, ids, g, renormalize=True)
    tol = weight_tol(dtype)
    torch.testing.assert_close(dx.float(), bx.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(dy.float(), by.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("n,k,T", [(32, 8, 4096), (128, 8, 4096), (512, 8, 4096), (1024, 32, 999), (256, 16, 100)])
def test_every_candidate_config_is_correct(n, k, T):
    """All autotune candidates (and both per-axis variants) give the same exact result;
    outputs are poisoned first, so unwritten elements show."""
    x, y = make_logits(T, n, torch.bfloat16, device="cuda", seed=T + n)
    rids = reference_ids_chunked(x, y, k)
    for cfg in tk.fwd_config_candidates(n, k, T, x.device):
        w = torch.full((T, k), float("nan"), device="cuda", dtype=x.dtype)
        ids = torch.full((T, k), -1, device="cuda", dtype=torch.int64)
        tk._launch_fwd(x, y, k, False, w, ids, cfg)
        check_routing(x, y, k, w, ids, ref_ids=rids)
    g = torch.randn(T, k, device="cuda").to(x.dtype)
    bx, by = omni_router_backward_reference(x, y, ids, g)
    for cfg in tk.bwd_config_candidates(n, k, T, x.device):
        dx = torch.full((T, n), float("nan"), device="cuda", dtype=x.dtype)
        dy = torch.full((T, n), float("nan"), device="cuda", dtype=x.dtype)
        tk._launch_bwd(x, y, ids, g, False, dx, dy, cfg)
        torch.testing.assert_close(dx.float(), bx.float(), atol=8e-3, rtol=8e-3)
        torch.testing.assert_close(dy.float(), by.float(), atol=8e-3, rtol=8e-3)


def test_backward_deterministic():
    x, y = make_logits(4096, 64, torch.float32, device="cuda", seed=3)
    g = torch.randn(4096, 32, device="cuda")
    _, ids = omni_router(x, y, 32, backend="triton")  # k > n/2: many shared i, j per row
    outs = [tk.omni_router_bwd_triton(x, y, ids, g, False) for _ in range(3)]
    for dx, dy in outs[1:]:
        assert torch.equal(dx, outs[0][0]) and torch.equal(dy, outs[0][1])


def test_cuda_graph_capture_and_replay():
    T, n, k = 512, 512, 8
    x, y = make_logits(T, n, torch.bfloat16, device="cuda", seed=1)
    x.requires_grad_(True)
    y.requires_grad_(True)
    g = torch.randn(T, k, device="cuda").to(torch.bfloat16)
    # warm up (compiles) on a side stream, as torch.cuda.graph requires
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            w, ids = omni_router(x, y, k, backend="triton")
            torch.autograd.grad(w, (x, y), g)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        w, ids = omni_router(x, y, k, backend="triton")
        dx, dy = torch.autograd.grad(w, (x, y), g)
    for seed in (5, 6):
        nx, ny = make_logits(T, n, torch.bfloat16, device="cuda", seed=seed)
        with torch.no_grad():
            x.copy_(nx)
            y.copy_(ny)
        graph.replay()
        torch.cuda.synchronize()
        ew, eids = omni_router(x.detach(), y.detach(), k, backend="triton")
        assert torch.equal(ids, eids) and torch.equal(w, ew)
        ex, ey = tk.omni_router_bwd_triton(x.detach(), y.detach(), eids, g, False)
        assert torch.equal(dx, ex) and torch.equal(dy, ey)


def test_torch_compile_inductor():
    x, y = make_logits(256, 128, torch.bfloat16, device="cuda", seed=2)
    x.requires_grad_(True)
    y.requires_grad_(True)

    def f(a, b):
        w, ids = omni_router(a * 2.0, b, 8, backend="triton")
        return (w.float() * (ids % 5).float()).sum(), ids

    assert_compiled_matches_eager(f, x, y)


def test_function_and_op_agree_noncontiguous_and_nan():
    logits = torch.randn(777, 2 * 300, device="cuda")
    logits[5, 7] = float("nan")
    x, y = logits[:, :300], logits[:, 300:]
    w1, i1 = OmniRouterFunction.apply(x, y, 8, True)
    w2, i2 = omni_router(x, y, 8, backend="triton", renormalize=True)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(w1, w2, atol=0, rtol=0, equal_nan=True)
    assert bool(torch.isnan(w2[5]).all())
    keep = torch.ones(777, dtype=torch.bool, device="cuda")
    keep[5] = False
    check_routing(x[keep], y[keep], 8, w2[keep], i2[keep], renormalize=True,
                  ref_ids=omni_router_reference(x[keep], y[keep], 8)[1])


def test_autotune_path(monkeypatch):
    monkeypatch.setenv("SGLANG_MOE_OMNI_AUTOTUNE", "1")
    x, y = make_logits(2048, 256, torch.bfloat16, device="cuda", seed=8)
    w, ids = omni_router(x, y, 8, backend="triton")
    check_routing(x, y, 8, w, ids, ref_ids=reference_ids_chunked(x, y, 8))
    assert any(key[0] == 256 for key in tk._FWD_TUNED)


def test_auto_backend_is_triton_on_cuda():
    from sglang_moe_routing.omni import resolve_backend

    x = torch.randn(4, 16, device="cuda")
    assert resolve_backend(x, 4) == "triton"
    assert resolve_backend(x.double(), 4) == "torch"
    assert resolve_backend(x, 65) == "torch"


LANE_CONFIGS = [(1, 16, 4), (2, 16, 4), (1, 32, 4)]  # omni_variants.py LANE_VARIANTS


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("n", [128, 512, 1024])
def test_lane_variant_grid(n, k, dtype):
    """MODE_LANE == reference for T in TS, poisoned outputs; every LANE_CONFIGS entry and
    lists=1 (every program takes the exact fallback) at n=512 bf16."""
    for T in TS:
        x, y = make_logits(T, n, dtype, device="cuda", seed=n * 17 + k + T)
        rids = reference_ids_chunked(x, y, k)
        full = (n, dtype) == (512, torch.bfloat16)
        for bt, lanes, lists in LANE_CONFIGS + [(1, 16, 1)] if full else LANE_CONFIGS[:1]:
            cfg = tk.fwd_config_lane(n, k, T, x.device, block_t=bt, lanes=lanes, lists=lists)
            w = torch.full((T, k), float("nan"), device="cuda", dtype=dtype)
            ids = torch.full((T, k), -1, device="cuda", dtype=torch.int64)
            tk._launch_fwd(x, y, k, True, w, ids, cfg)
            check_routing(x, y, k, w, ids, renormalize=True, ref_ids=rids)


def test_lane_graph_exhaustion_nan_and_slices():
    """MODE_LANE at n=512, k=8 in a CUDA graph: rows built to exhaust a lane's list (exact
    fallback) and NaN rows mixed with random rows; then x, y as column slices of one
    tensor (packed and unpacked loads)."""
    T, n, k = 4096, 512, 8
    cfg = tk.fwd_config_lane(n, k, T, torch.device("cuda"))
    fwd = lambda a, b: tk.omni_router_fwd_triton(a, b, k, False, torch.int64, config=cfg)
    x, y = make_logits(T, n, torch.bfloat16, device="cuda", seed=77)
    x[::97, 64:72] = 8.0 + torch.arange(8, device="cuda", dtype=torch.bfloat16)
    w, ids = fwd(x, y)
    check_routing(x, y, k, w, ids, ref_ids=reference_ids_chunked(x, y, k))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        gw, gids = fwd(x, y)
    nx, ny = make_logits(T, n, torch.bfloat16, device="cuda", seed=78)
    nx[3, 5] = float("nan")
    ny[9, 500] = -float("nan")
    x.copy_(nx)
    y.copy_(ny)
    g.replay()
    torch.cuda.synchronize()
    assert bool(torch.isnan(gw[3]).all() and torch.isnan(gw[9]).all())
    keep = torch.ones(T, dtype=torch.bool, device="cuda")
    keep[3] = keep[9] = False
    check_routing(x[keep], y[keep], k, gw[keep], gids[keep], ref_ids=reference_ids_chunked(x[keep], y[keep], k))
    logits = torch.randn(T, 2 * n + 1, device="cuda").to(torch.bfloat16)
    for xs, ys in ((logits[:, :n], logits[:, n:2 * n]), (logits[:, n + 1:], logits[:, :n])):
        w, ids = fwd(xs, ys)
        check_routing(xs, ys, k, w, ids, ref_ids=reference_ids_chunked(xs, ys, k))
