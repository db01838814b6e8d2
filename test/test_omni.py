"""Omni (Cartesian-product) router: reference, pruned torch path and Triton kernels.

Runs on CPU: the Triton kernels execute under ``TRITON_INTERPRET=1`` (set by conftest.py
when there is no CUDA), so shapes stay small. The full shape grid is in
``test_omni_gpu.py``. The helpers here are shared with that file.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from sglang_moe_routing.omni import (
    OmniRouterFunction,
    omni_router,
    omni_router_backward_reference,
    omni_router_pruned_torch,
    omni_router_reference,
    resolve_backend,
)
from sglang_moe_routing.omni import triton as tk

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    HAS_HYPOTHESIS = True
except Exception:  # pragma: no cover
    HAS_HYPOTHESIS = False

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# numpy warns about NaN arithmetic in masked (padding) lanes of interpreted kernels
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


# ----------------------------------------------------------------------------- helpers


def assert_compiled_matches_eager(f, x, y, **compile_kwargs):
    """``torch.compile(f, fullgraph=True)`` gives eager's ids, output and gradients."""
    cf = torch.compile(f, fullgraph=True, **compile_kwargs)
    out, ids = cf(x, y)
    gx, gy = torch.autograd.grad(out, (x, y))
    ref, rids = f(x, y)
    rx, ry = torch.autograd.grad(ref, (x, y))
    assert torch.equal(ids, rids)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gy, ry)


def make_logits(T, n, dtype, device="cpu", seed=0, scale=1.0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = (torch.randn(T, n, generator=g) * scale).to(dtype).to(device)
    y = (torch.randn(T, n, generator=g) * scale).to(dtype).to(device)
    return x, y


def naive_top_scores(x, y, m, rows_per_chunk=None):
    """Top-``m`` fp32 scores per row by brute force (chunked over rows to bound memory)."""
    T, n = x.shape
    if rows_per_chunk is None:
        rows_per_chunk = max(1, (1 << 27) // (n * n))
    out = []
    for r0 in range(0, T, rows_per_chunk):
        xs = x[r0 : r0 + rows_per_chunk].float()
        ys = y[r0 : r0 + rows_per_chunk].float()
        s = (xs[:, :, None] + ys[:, None, :]).reshape(xs.shape[0], n * n)
        out.append(torch.topk(s, m, dim=1, sorted=True).values)
    return torch.cat(out) if out else torch.empty(0, m, device=x.device)


def weight_tol(dtype):
    return {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]


def check_routing(x, y, k, w, ids, *, renormalize=False, ref_ids=None):
    """Assert ``(w, ids)`` is a correct Omni routing of ``x, y`` (ties allowed).

    * shapes, dtypes; ids in ``[0, n*n)`` and distinct per row;
    * the scores of the chosen ids, recomputed in fp32, sorted, equal the brute-force top-k
      scores exactly (same fp32 additions), and the output is sorted by descending score;
    * weights equal the fp32 softmax of those scores (tolerance by output dtype);
    * where the k-th and (k+1)-th best scores differ, ids equal ``ref_ids`` as sets.
    Rows holding a NaN are skipped here (see the NaN tests).
    """
    T, n = x.shape
    assert w.shape == (T, k) and ids.shape == (T, k)
    assert w.dtype == x.dtype
    if T == 0:
        return
    ids64 = ids.long()
    assert bool(((ids64 >= 0) & (ids64 < n * n)).all()), "ids out of range"
    srt = ids64.sort(dim=1).values
    assert bool((srt[:, 1:] != srt[:, :-1]).all()), "duplicate ids in a row"
    ok = ~(torch.isnan(x).any(1) | torch.isnan(y).any(1))
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    s = x.to(cdt).gather(1, ids64 // n) + y.to(cdt).gather(1, ids64 % n)
    m = min(k + 1, n * n)
    ref = naive_top_scores(x, y, m) if cdt == torch.float32 else None
    if ref is not None:
        got = s.sort(dim=1, descending=True).values
        bad = ok & ~(got == ref[:, :k]).all(1)
        assert not bool(bad.any()), f"selected scores differ from the top-k in rows {bad.nonzero()[:5].flatten().tolist()}"
    assert bool((s[ok, :-1] >= s[ok, 1:]).all()), "output not sorted by descending score"
    exp_w = torch.softmax(s, dim=1)
    if renormalize:
        exp_w = exp_w / exp_w.sum(1, keepdim=True)
    torch.testing.assert_close(
        w[ok].to(cdt), exp_w[ok], atol=weight_tol(x.dtype), rtol=weight_tol(x.dtype)
    )
    if ref_ids is not None and ref is not None and m > k:
        strict = ok & (ref[:, k - 1] > ref[:, k])
        a = ids64[strict].sort(1).values
        b = ref_ids.long()[strict].sort(1).values
        assert torch.equal(a, b), "ids differ from the reference where scores do not tie"


def tiny_config_fwd(mode, chunk=2, block_t=4, pruned=True):
    return tk.FwdConfig(block_t=block_t, num_warps=4, mode=mode, chunk=chunk, pruned=pruned)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("backend", ["reference", "torch", "triton", "auto"])
def test_errors(backend):
    x, y = make_logits(3, 4, torch.float32)
    with pytest.raises(ValueError, match="same shape"):
        omni_router(x, y[:, :3], 2, backend=backend)
    with pytest.raises(ValueError, match="2-D"):
        omni_router(x[0], y[0], 2, backend=backend)
    with pytest.raises(ValueError, match=r"top_k must be in \[1, n \* n\]"):
        omni_router(x, y, 17, backend=backend)
    with pytest.raises(ValueError, match="top_k must be in"):
        omni_router(x, y, 0, backend=backend)
    with pytest.raises(TypeError, match="floating-point"):
        omni_router(x.long(), y.long(), 2, backend=backend)
    with pytest.raises(TypeError, match="floating-point"):
        omni_router(x.bool(), y.bool(), 2, backend=backend)
    with pytest.raises(TypeError, match="share a dtype"):
        omni_router(x, y.half(), 2, backend=backend)
    with pytest.raises(TypeError, match="top_k must be an int"):
        omni_router(x, y, 2.0, backend=backend)
    with pytest.raises(TypeError, match="ids_dtype"):
        omni_router(x, y, 2, backend=backend, ids_dtype=torch.int16)
    with pytest.raises(ValueError, match=r"n \(the logits"):
        omni_router(x[:, :0], y[:, :0], 1, backend=backend)


def test_error_backend_name_and_triton_limits():
    x, y = make_logits(3, 4, torch.float32)
    with pytest.raises(ValueError, match="backend must be one of"):
        omni_router(x, y, 2, backend="cuda")
    with pytest.raises(ValueError, match="dtype torch.float64"):
        omni_router(x.double(), y.double(), 2, backend="triton")
    with pytest.raises(ValueError, match="top_k=65"):
        xx, yy = make_logits(2, 9, torch.float32)
        omni_router(xx, yy, 65, backend="triton")
    with pytest.raises(ValueError, match="triton backend unavailable"):
        OmniRouterFunction.apply(x.double(), y.double(), 2)
    # auto never fails on supported-by-torch inputs: fp64 and large k go to torch
    assert resolve_backend(x.double(), 2) == "torch"
    assert resolve_backend(x, 2) == "torch"  # CPU tensors: the pruned torch path


# ----------------------------------------------------------------------------- reference


def brute_force(x, y, k, renormalize=False):
    """Independent oracle: python loops over all (i, j) pairs, fp64."""
    T, n = x.shape
    ws, ids = [], []
    for t in range(T):
        pairs = sorted(
            ((float(x[t, i]) + float(y[t, j]), i * n + j) for i in range(n) for j in range(n)),
            key=lambda p: (-p[0], p[1]),
        )[:k]
        sc = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
        wt = torch.softmax(sc, 0)
        if renormalize:
            wt = wt / wt.sum()
        ws.append(wt)
        ids.append([p[1] for p in pairs])
    return torch.stack(ws), torch.tensor(ids)


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("T,n,k", [(1, 1, 1), (3, 2, 4), (5, 3, 2), (4, 5, 7), (2, 6, 36)])
def test_reference_matches_brute_force(T, n, k, renormalize):
    x, y = make_logits(T, n, torch.float64, seed=T * 100 + n)
    w, ids = omni_router_reference(x, y, k, renormalize=renormalize)
    bw, bids = brute_force(x, y, k, renormalize)
    assert ids.dtype == torch.int64 and w.dtype == torch.float64
    assert torch.equal(ids, bids)  # continuous fp64 data: no ties
    torch.testing.assert_close(w, bw, atol=1e-12, rtol=1e-12)


def transformers_doge_routing(x, y, k, norm_topk_prob):
    """transformers' DogeCDMoE routing formula (per-axis topk over all n keys, then topk
    of the full grid, softmax of the k scores in the logits' dtype)."""
    n = x.shape[1]
    (sx, sy), (ix, iy) = torch.stack([x, y]).topk(n, dim=-1)
    all_s = (sx.unsqueeze(-1) + sy.unsqueeze(-2)).flatten(-2)
    all_i = (ix.unsqueeze(-1) * n + iy.unsqueeze(-2)).flatten(-2)
    s, pos = all_s.topk(k, dim=-1)
    ids = all_i.gather(-1, pos)
    w = torch.softmax(s, dim=-1)
    if norm_topk_prob:
        w = w / w.sum(dim=-1, keepdim=True)
    return w, ids


@pytest.mark.parametrize("norm", [False, True])
def test_reference_matches_transformers_doge_semantics(norm):
    x, y = make_logits(9, 16, torch.float32, seed=5)
    w, ids = omni_router_reference(x, y, 8, renormalize=norm)
    tw, tids = transformers_doge_routing(x, y, 8, norm)
    assert torch.equal(ids, tids)
    torch.testing.assert_close(w, tw, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,))
@pytest.mark.parametrize("T,n,k", [(0, 5, 3), (1, 1, 1), (7, 8, 8), (6, 31, 17), (3, 64, 64), (5, 3, 9)])
def test_pruned_torch_equals_reference(T, n, k, dtype):
    x, y = make_logits(T, n, dtype, seed=n + k)
    for renorm in (False, True):
        w, ids = omni_router_pruned_torch(x, y, k, renormalize=renorm)
        rw, rids = omni_router_reference(x, y, k, renormalize=renorm)
        check_routing(x, y, k, w, ids, renormalize=renorm, ref_ids=rids)
        check_routing(x, y, k, rw, rids, renormalize=renorm)


if HAS_HYPOTHESIS:

    @settings(max_examples=40, deadline=None)
    @given(
        T=st.integers(0, 6),
        n=st.integers(1, 12),
        kfrac=st.floats(0.0, 1.0),
        dtype=st.sampled_from(DTYPES),
        seed=st.integers(0, 2**16),
        ties=st.booleans(),
    )
    def test_pruned_torch_property(T, n, kfrac, dtype, seed, ties):
        k = max(1, min(n * n, int(round(kfrac * n * n))))
        x, y = make_logits(T, n, dtype, seed=seed)
        if ties:  # few distinct values: many tied scores
            x, y = x.round(), y.round()
        w, ids = omni_router_pruned_torch(x, y, k)
        _, rids = omni_router_reference(x, y, k)
        check_routing(x, y, k, w, ids, ref_ids=rids)


def test_gradcheck_reference_and_pruned_fp64():
    x, y = make_logits(4, 5, torch.float64, seed=3)
    x.requires_grad_(True)
    y.requires_grad_(True)
    for fn in (omni_router_reference, omni_router_pruned_torch):
        for renorm in (False, True):
            assert torch.autograd.gradcheck(
                lambda a, b: fn(a, b, 6, renormalize=renorm)[0], (x, y), eps=1e-6, atol=1e-7
            )


def test_backward_reference_equals_autograd():
    x, y = make_logits(6, 7, torch.float64, seed=11)
    x.requires_grad_(True)
    y.requires_grad_(True)
    g = torch.randn(6, 5, dtype=torch.float64)
    for renorm in (False, True):
        w, ids = omni_router_reference(x, y, 5, renormalize=renorm)
        dx, dy = torch.autograd.grad(w, (x, y), g)
        bx, by = omni_router_backward_reference(x, y, ids, g, renormalize=renorm)
        torch.testing.assert_close(bx, dx, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(by, dy, atol=1e-12, rtol=1e-12)


# ----------------------------------------------------------------------------- triton
# CPU: interpreted (TRITON_INTERPRET=1 from conftest.py); with CUDA: compiled, on the GPU.
DEV = "cuda" if torch.cuda.is_available() else "cpu"

TRITON_CASES = [
    # (T, n, k, dtype, split): split = the heuristic picks a split variant (n >= 128)
    (0, 8, 4, torch.float32, False),
    (1, 4, 16, torch.float32, False),  # k == n*n, k > n
    (7, 8, 2, torch.bfloat16, False),
    (5, 31, 8, torch.float16, False),  # non-power-of-two n
    (7, 64, 1, torch.float32, False),
    (3, 64, 16, torch.bfloat16, False),
    (5, 128, 8, torch.float32, True),  # split variant
    (4, 200, 8, torch.bfloat16, True),  # split, non-power-of-two n
    (3, 256, 16, torch.float16, True),
    (2, 130, 3, torch.float32, True),  # split, k not a power of two
]


@pytest.mark.parametrize("T,n,k,dtype,split", TRITON_CASES)
def test_triton_forward_matches_reference(T, n, k, dtype, split):
    x, y = make_logits(T, n, dtype, device=DEV, seed=T + n + k)
    cfg = tk.fwd_config(n, k, T, x.device)
    assert (cfg.mode != tk.MODE_DENSE) == split
    w, ids = omni_router(x, y, k, backend="triton")
    rw, rids = omni_router_reference(x, y, k)
    check_routing(x, y, k, w, ids, ref_ids=rids)
    assert ids.dtype == torch.int64 and w.dtype == dtype


@pytest.mark.parametrize(
    "mode,n,k,chunk",
    [
        (tk.MODE_DENSE, 96, 8, 2),
        (tk.MODE_CHUNK, 128, 8, 8),
        (tk.MODE_CHUNK, 96, 16, 2),
        (tk.MODE_ITER, 128, 8, 16),
        (tk.MODE_ITER, 100, 16, 4),
        (tk.MODE_ITER, 7, 3, 2),
        (tk.MODE_ITER, 1, 1, 1),
    ],
)
def test_triton_variants_agree(mode, n, k, chunk):
    """Every per-axis variant, any chunk size, pruned or full grid, 1 or 4 tokens per
    program: the same exact answer as the reference."""
    x, y = make_logits(5, n, torch.float32, device=DEV, seed=n * k)
    rw, rids = omni_router_reference(x, y, k)
    for block_t, pruned in ((4, True), (1, False)):
        cfg = tiny_config_fwd(mode, chunk=chunk, block_t=block_t, pruned=pruned)
        w, ids = tk.omni_router_fwd_triton(x, y, k, False, torch.int64, config=cfg)
        assert torch.equal(ids, rids), cfg
        torch.testing.assert_close(w, rw, atol=1e-6, rtol=1e-6)


def test_triton_ties_and_renormalize():
    # all-equal logits: every score ties; any k distinct experts are right
    x = torch.zeros(3, 8, device=DEV)
    y = torch.zeros(3, 8, device=DEV)
    w, ids = omni_router(x, y, 8, backend="triton", renormalize=True)
    check_routing(x, y, 8, w, ids, renormalize=True)
    torch.testing.assert_close(w, torch.full((3, 8), 1 / 8, device=DEV))
    # integer-valued bf16 logits: many ties at the k-th place
    x, y = make_logits(6, 40, torch.bfloat16, device=DEV, seed=2, scale=3.0)
    x, y = x.round(), y.round()
    w, ids = omni_router(x, y, 8, backend="triton", renormalize=True)
    _, rids = omni_router_reference(x, y, 8)
    check_routing(x, y, 8, w, ids, renormalize=True, ref_ids=rids)
    torch.testing.assert_close(w.float().sum(1), torch.ones(6, device=DEV), atol=2e-2, rtol=0)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_nan_rows(backend):
    """A NaN in a row's x or y makes that row's weights NaN; other rows are exact."""
    x, y = make_logits(5, 12, torch.float32, device=DEV, seed=9)
    x[1, 3] = float("nan")
    y[3, 0] = float("nan")
    w, ids = omni_router(x, y, 4, backend=backend)
    assert bool(torch.isnan(w[1]).all()) and bool(torch.isnan(w[3]).all())
    assert bool(((ids >= 0) & (ids < 144)).all())
    for r in (1, 3):
        assert ids[r].unique().numel() == 4
    keep = [0, 2, 4]
    check_routing(x[keep], y[keep], 4, w[keep], ids[keep], ref_ids=omni_router_reference(x[keep], y[keep], 4)[1])


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_masked_minus_inf_logits_never_chosen(backend):
    x, y = make_logits(4, 16, torch.bfloat16, device=DEV, seed=4)
    x[:, 8:] = float("-inf")  # masked keys
    w, ids = omni_router(x, y, 8, backend=backend)
    assert bool(((ids // 16) < 8).all())
    assert bool(torch.isfinite(w.float()).all())


def test_triton_noncontiguous_and_int32_ids():
    logits = torch.randn(6, 2 * 24, device=DEV)  # x, y as column slices of one [T, 2n] tensor
    x, y = logits[:, :24], logits[:, 24:]
    w, ids = omni_router(x, y, 5, backend="triton", ids_dtype=torch.int32)
    assert ids.dtype == torch.int32
    _, rids = omni_router_reference(x, y, 5)
    check_routing(x, y, 5, w, ids, ref_ids=rids)
    xt = torch.randn(24, 6, device=DEV).t()  # column stride != 1: copied
    w2, ids2 = omni_router(xt, y, 5, backend="triton")
    check_routing(xt, y, 5, w2, ids2, ref_ids=omni_router_reference(xt, y, 5)[1])


GRAD_CASES = [
    # (T, n, k, renormalize)
    (5, 8, 6, False),
    (4, 31, 8, True),
    (3, 130, 8, False),  # split forward
    (2, 5, 16, True),  # k > n: repeated i and j in a row
]


@pytest.mark.parametrize("T,n,k,renorm", GRAD_CASES)
def test_triton_gradients_match_reference(T, n, k, renorm):
    x, y = make_logits(T, n, torch.float32, device=DEV, seed=7 * n + k)
    x.requires_grad_(True)
    y.requires_grad_(True)
    g = torch.randn(T, k, device=DEV)
    w, ids = omni_router(x, y, k, backend="triton", renormalize=renorm)
    dx, dy = torch.autograd.grad(w, (x, y), g)
    rw, rids = omni_router_reference(x, y, k, renormalize=renorm)
    assert torch.equal(ids, rids)
    rdx, rdy = torch.autograd.grad(rw, (x, y), g)
    torch.testing.assert_close(dx, rdx, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dy, rdy, atol=1e-5, rtol=1e-5)
    # the autograd.Function route gives the same numbers
    w2, _ = OmniRouterFunction.apply(x, y, k, renorm)
    fdx, fdy = torch.autograd.grad(w2, (x, y), g)
    assert torch.equal(fdx, dx) and torch.equal(fdy, dy)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_backward_16bit_matches_fixed_selection_reference(dtype):
    x, y = make_logits(6, 20, dtype, device=DEV, seed=13)
    g = torch.randn(6, 8, device=DEV).to(dtype)
    w, ids = omni_router(x, y, 8, backend="triton", renormalize=True)
    dx, dy = tk.omni_router_bwd_triton(x, y, ids, g, True)
    bx, by = omni_router_backward_reference(x, y, ids, g, renormalize=True)
    assert dx.dtype == dtype
    tol = weight_tol(dtype)
    torch.testing.assert_close(dx.float(), bx.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(dy.float(), by.float(), atol=tol, rtol=tol)


def test_triton_backward_writes_every_element():
    """Poisoned outputs: the kernel must overwrite all of dx/dy, and forward all of w/ids."""
    x, y = make_logits(5, 12, torch.float32, device=DEV, seed=1)
    k = 6
    cfg = tk.fwd_config(12, k, 5, x.device)
    w = torch.full((5, k), float("nan"), device=DEV)
    ids = torch.full((5, k), -7, dtype=torch.int64, device=DEV)
    tk._launch_fwd(x, y, k, False, w, ids, cfg)
    assert not bool(torch.isnan(w).any()) and bool((ids >= 0).all())
    g = torch.randn(5, k, device=DEV)
    dx = torch.full((5, 12), float("nan"), device=DEV)
    dy = torch.full((5, 12), float("nan"), device=DEV)
    tk._launch_bwd(x, y, ids, g, False, dx, dy, tk.bwd_config(12, k, 5, x.device))
    bx, by = omni_router_backward_reference(x, y, ids, g)
    torch.testing.assert_close(dx, bx, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dy, by, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_empty_batch_all_backends(backend):
    x = torch.zeros(0, 6, device=DEV, requires_grad=True)
    y = torch.zeros(0, 6, device=DEV, requires_grad=True)
    w, ids = omni_router(x, y, 4, backend=backend)
    assert w.shape == (0, 4) and ids.shape == (0, 4)
    dx, dy = torch.autograd.grad(w.sum(), (x, y), allow_unused=True)
    for d in (dx, dy):
        assert d is None or d.shape == (0, 6)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_backends_differentiable(backend):
    x, y = make_logits(3, 6, torch.float32, device=DEV, seed=21)
    x.requires_grad_(True)
    y.requires_grad_(True)
    w, _ = omni_router(x, y, 4, backend=backend)
    (w * torch.arange(4.0, device=DEV)).sum().backward()
    assert x.grad is not None and y.grad is not None
    assert float(x.grad.abs().sum()) > 0
    # each row's x-gradient sums to the row's sum of dL/dscore, which is 0 for a softmax
    torch.testing.assert_close(x.grad.sum(1), torch.zeros(3, device=DEV), atol=1e-6, rtol=0)


def test_torch_compile_custom_op():
    """The custom op traces under torch.compile (fullgraph) with forward and backward."""
    x, y = make_logits(4, 16, torch.float32, device=DEV, seed=17)
    x.requires_grad_(True)
    y.requires_grad_(True)

    def f(a, b):
        w, ids = omni_router(a, b, 4, backend="triton", renormalize=True)
        return (w * (ids % 3).to(w.dtype)).sum(), ids

    assert_compiled_matches_eager(f, x, y, backend="aot_eager")


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_opcheck(backend):
    """torch.library's own consistency checks (schema, fake impl, autograd registration)."""
    x, y = make_logits(3, 8, torch.float32, device=DEV, seed=23)
    x.requires_grad_(True)
    y.requires_grad_(True)
    torch.library.opcheck(
        torch.ops.sglang_moe_routing.omni_router.default,
        (x, y, 4, False, False, backend),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_op_torch_backends_equal_direct_calls_and_their_gradients(backend):
    """Every backend runs behind the op: without autograd the face goes through it, with
    autograd the face calls the torch function itself; the op's own backward (the
    fixed-selection reference) gives the same gradients up to rounding."""
    fn = omni_router_pruned_torch if backend == "torch" else omni_router_reference
    x, y = make_logits(6, 9, torch.float32, seed=29)
    for ids_dtype in (torch.int64, torch.int32):
        rw, rids = fn(x, y, 5, renormalize=True, ids_dtype=ids_dtype)
        with torch.no_grad():
            w, ids = omni_router(x, y, 5, renormalize=True, backend=backend, ids_dtype=ids_dtype)
        assert torch.equal(ids, rids) and torch.equal(w, rw) and ids.dtype == ids_dtype
    xg, yg = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    g = torch.randn(6, 5)
    w, _ = omni_router(xg, yg, 5, renormalize=True, backend=backend)
    dx, dy = torch.autograd.grad(w, (xg, yg), g)
    w_op, _ = torch.ops.sglang_moe_routing.omni_router(xg, yg, 5, True, False, backend)
    ox, oy = torch.autograd.grad(w_op, (xg, yg), g)
    torch.testing.assert_close(ox, dx, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(oy, dy, atol=1e-6, rtol=1e-6)


def test_torch_backend_compiles_as_one_op_call():
    """Without autograd, ``torch.compile(fullgraph=True)`` records one op call for the torch
    backend (its topk graph is not traced) and equals eager."""
    x, y = make_logits(7, 12, torch.float32, seed=31)
    graphs = []

    def backend(gm, _inputs):
        graphs.append(gm)
        return gm.forward

    def f(a, b):
        return omni_router(a, b, 6, backend="torch")

    torch._dynamo.reset()
    with torch.no_grad():
        w, ids = torch.compile(f, fullgraph=True, backend=backend)(x, y)
        rw, rids = f(x, y)
    assert torch.equal(ids, rids) and torch.equal(w, rw)
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert sum("sglang_moe_routing.omni_router" in t for t in targets) == 1, targets
    assert not any("topk" in t for t in targets), targets


def test_grid_pairs_cover_the_top_k():
    """The pruned cells (a+1)(b+1) <= k: exactly the cells that can hold a top-k
    expert for some input (brute force over rank pairs of random sorted lists)."""
    for k in (1, 2, 3, 8, 16, 32):
        cells = set(tk.grid_pairs(k))
        assert len(cells) >= k and all((a + 1) * (b + 1) <= k for a, b in cells)
        g = torch.Generator().manual_seed(k)
        for _ in range(200):
            xs = torch.randn(k, generator=g).sort(descending=True).values
            ys = torch.randn(k, generator=g).sort(descending=True).values
            s = (xs[:, None] + ys[None, :]).flatten()
            for p in torch.topk(s, k).indices.tolist():
                assert (p // k, p % k) in cells


def test_heuristic_configs_are_valid():
    cpu = torch.device("cpu")
    for n, k in itertools.product([1, 4, 31, 64, 127, 128, 129, 512, 1024, 4096], [1, 2, 3, 8, 16, 32, 64]):
        if k > n * n:
            continue
        NP, K = tk._dims(n, k)
        assert NP >= K and NP & (NP - 1) == 0 and K & (K - 1) == 0
        for cfg in tk.fwd_config_candidates(n, k, 4096, cpu):
            if cfg.mode != tk.MODE_DENSE:
                assert cfg.chunk & (cfg.chunk - 1) == 0 and NP % cfg.chunk == 0
            if cfg.mode == tk.MODE_CHUNK:
                assert NP // cfg.chunk >= K  # the chunk maxima hold K of them
        assert (tk.fwd_config(n, k, 4096, cpu).mode == tk.MODE_DENSE) == (n < 128)
    assert math.isfinite(tk._t_bucket(10**9))
