"""Expert-choice Triton kernel vs the reference, on CPU (``TRITON_INTERPRET=1``, small shapes).

The ids must match the reference exactly (same ordering rule inside a row, same tie-breaks)
and the weights to 1e-6. On a machine with a GPU these run on CUDA tensors instead.
Also covers the dispatch rules and the CUDA loader's CPU-side behaviour (no build here).
"""

from __future__ import annotations

import pytest
import torch

from sglang_moe_routing.expert_choice import RoutingSpec, dispatch
from sglang_moe_routing.expert_choice.reference import (
    compute_scores,
    expert_choice_topk_reference,
    mask_groups,
    token_choice_topk_reference,
)

triton = pytest.importorskip("triton")
from sglang_moe_routing.expert_choice.triton_kernel import (  # noqa: E402
    expert_choice_topk_triton,
    token_choice_topk_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _assert_same(out, ref, tag=""):
    w, ids = out
    w_ref, ids_ref = ref
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert ids.shape == ids_ref.shape and w.shape == w_ref.shape
    bad = (ids.cpu() != ids_ref.cpu()).any(dim=1).nonzero().flatten()
    assert bad.numel() == 0, (
        f"{tag}: {bad.numel()} rows differ, first {bad[:4].tolist()}: "
        f"got {ids.cpu()[bad[:4]].tolist()} want {ids_ref.cpu()[bad[:4]].tolist()}"
    )
    torch.testing.assert_close(w.cpu(), w_ref.cpu(), atol=1e-6, rtol=0, equal_nan=True)


def _run_both(logits, k, cf=1.25, num_token_non_padded=None, **kw):
    spec = RoutingSpec(k, cf, **kw)
    ref = expert_choice_topk_reference(logits, spec, num_token_non_padded)
    out = expert_choice_topk_triton(logits, spec, num_token_non_padded)
    tag = f"T={logits.shape[0]} E={logits.shape[1]} k={k} ntnp={num_token_non_padded} {kw}"
    _assert_same(out, ref, tag)
    return out, ref


@pytest.mark.parametrize(
    "T,E,k",
    [(1, 2, 1), (2, 3, 2), (7, 8, 2), (31, 6, 3), (48, 16, 4), (64, 60, 8), (40, 64, 16)],
)
def test_softmax_matches_reference(T, E, k):
    g = torch.Generator().manual_seed(T * 1000 + E)
    logits = torch.randn(T, E, generator=g).to(DEVICE)
    _run_both(logits, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(dtype):
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(37, 12, generator=g) * 2).to(dtype).to(DEVICE)
    _run_both(logits, 3)


def test_sigmoid_bias_groups_scaling():
    """DeepSeek-V3 style: sigmoid, correction bias, grouped top-k, routed scaling on output."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(50, 32, generator=g).to(DEVICE)
    bias = (torch.randn(32, generator=g) * 0.1).to(DEVICE)
    _run_both(
        logits, 6, scoring_func="sigmoid", correction_bias=bias, num_expert_group=8,
        topk_group=3, routed_scaling_factor=2.5, apply_routed_scaling_factor_on_output=True,
    )


def test_grouped_softmax_no_bias_no_renorm():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(45, 24, generator=g).to(DEVICE)
    _run_both(logits, 4, num_expert_group=6, topk_group=2, renormalize=False)


@pytest.mark.parametrize("ntnp", [0, 1, 17, torch.tensor(9), torch.tensor([23], dtype=torch.int32)])
def test_padding_rows(ntnp):
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(40, 8, generator=g).to(DEVICE)
    if isinstance(ntnp, torch.Tensor):
        ntnp = ntnp.to(DEVICE)
    (w, ids), _ = _run_both(logits, 2, num_token_non_padded=ntnp)
    # Padding rows get plain token choice of their own logits.
    n = int(ntnp) if not isinstance(ntnp, torch.Tensor) else int(ntnp.reshape(()).cpu())
    tc_w, tc_ids = token_choice_topk_reference(logits, RoutingSpec(2))
    assert torch.equal(ids[n:].cpu(), tc_ids[n:].cpu())
    # Valid rows do not depend on what the padding rows hold.
    logits2 = logits.clone()
    logits2[n:] = torch.randn(40 - n, 8, generator=g).to(DEVICE) * 5
    _, ids2 = expert_choice_topk_triton(logits2, RoutingSpec(2), ntnp)
    assert torch.equal(ids2[:n].cpu(), ids[:n].cpu())


def test_one_valid_token_is_token_choice():
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(1, 16, generator=g).to(DEVICE)
    w, ids = expert_choice_topk_triton(logits, RoutingSpec(4))
    tw, tids = token_choice_topk_reference(logits, RoutingSpec(4))
    assert torch.equal(ids.cpu(), tids.cpu())
    torch.testing.assert_close(w.cpu(), tw.cpu(), atol=1e-6, rtol=0)


def test_capacity_extremes():
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(30, 8, generator=g).to(DEVICE)
    _run_both(logits, 2, cf=100.0)  # C = T': every expert takes every token
    _run_both(logits, 2, cf=1e-3)  # C = 1


def test_ties_duplicate_rows_and_quantized_sigmoid():
    """Exact ties: equal tokens (lower index wins) and many equal sigmoid scores."""
    g = torch.Generator().manual_seed(10)
    base = torch.randn(6, 8, generator=g)
    logits = base.repeat(8, 1).to(DEVICE)  # 48 rows, each row appears 8 times
    _run_both(logits, 2)
    q = (torch.randint(-3, 4, (64, 8), generator=g).float() / 2).to(torch.bfloat16).to(DEVICE)
    _run_both(q, 3, scoring_func="sigmoid")
    _run_both(q, 3, scoring_func="sigmoid", num_expert_group=4, topk_group=2)


def test_nan_and_inf_logits():
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(24, 8, generator=g)
    logits[3] = float("nan")  # whole row NaN under softmax
    logits[5, 2] = float("-inf")
    logits[7, :] = float("-inf")
    logits = logits.to(DEVICE)
    _run_both(logits, 2)
    sig = torch.randn(24, 8, generator=g)
    sig[2, 1] = float("nan")
    sig[4, 3] = float("-inf")
    _run_both(sig.to(DEVICE), 3, scoring_func="sigmoid")


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(12)
    wide = torch.randn(33, 20, generator=g).to(DEVICE)
    _run_both(wide[:, 2:14], 3)  # column slice
    tall = torch.randn(10, 33, generator=g).to(DEVICE)
    _run_both(tall.t(), 2)  # transposed storage
    _run_both(wide[::2, :8], 2)  # row stride


def test_empty_batch():
    logits = torch.randn(0, 8, device=DEVICE)
    w, ids = expert_choice_topk_triton(logits, RoutingSpec(2))
    assert w.shape == (0, 2) and ids.shape == (0, 2)


def test_intermediate_keys_and_capacity():
    """keysT is the order key of the reference's selection score; each expert picks <= C."""
    g = torch.Generator().manual_seed(13)
    logits = torch.randn(40, 12, generator=g).to(DEVICE)
    bias = (torch.randn(12, generator=g) * 0.05).to(DEVICE)
    kw = dict(scoring_func="sigmoid", correction_bias=bias, num_expert_group=4, topk_group=2)
    w, ids, keys, thr = expert_choice_topk_triton(
        logits, RoutingSpec(3, **kw), return_intermediates=True)
    _, sel = compute_scores(logits, "sigmoid", bias)
    sel = mask_groups(sel, 4, 2, biased=True)
    bits = sel.cpu().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    neg = bits >= 2**31
    order = torch.where(neg, (~bits) & 0xFFFFFFFF, bits | 2**31)
    order = torch.where(sel.cpu() > float("-inf"), order, torch.zeros_like(order))
    got = (keys.cpu().to(torch.int64) & 0xFFFFFFFF).t()
    assert torch.equal(got == 0, order == 0)
    # Bit-exact on CUDA (same float ops as torch); the interpreter's numpy exp may differ
    # from torch's CPU exp by an ulp or two.
    ulps = 0 if DEVICE == "cuda" else 4
    assert int((got - order).abs().max()) <= ulps
    # Each expert's threshold admits exactly min(C, eligible) tokens.
    cap = int(torch.ceil(torch.tensor(40 * (1.25 * 3 / 12), dtype=torch.float64) - 1e-9))
    for e in range(12):
        t_u = int(thr.cpu()[e]) & 0xFFFFFFFFFFFFFFFF
        n_pick = sum(
            1 for t in range(40) if got[t, e] != 0 and ((int(got[t, e]) << 32) | (0xFFFFFFFF - t)) >= t_u
        )
        assert n_pick == min(cap, int((got[:, e] != 0).sum()))


def test_token_choice_kernel_matches_reference():
    g = torch.Generator().manual_seed(14)
    logits = torch.randn(20, 10, generator=g).to(DEVICE)
    out = token_choice_topk_triton(logits, RoutingSpec(3))
    _assert_same(out, token_choice_topk_reference(logits, RoutingSpec(3)), "token choice")


def test_bad_inputs_raise():
    logits = torch.randn(8, 4, device=DEVICE)
    with pytest.raises(ValueError, match="top_k"):
        expert_choice_topk_triton(logits, RoutingSpec(5))
    with pytest.raises(ValueError, match="capacity_factor"):
        expert_choice_topk_triton(logits, RoutingSpec(2, 0.0))
    with pytest.raises(ValueError, match="E <= 512"):
        expert_choice_topk_triton(torch.randn(2, 600, device=DEVICE), RoutingSpec(2))
    with pytest.raises(ValueError, match="integer"):
        expert_choice_topk_triton(logits, RoutingSpec(2), torch.tensor(3.0))


def test_dispatch_rules(monkeypatch):
    logits = torch.randn(16, 8)
    assert dispatch.resolve_backend(logits, 2) == "reference"  # CPU tensor
    assert dispatch.resolve_backend(logits, 2, "triton") == "triton"
    with pytest.raises(ValueError, match="backend"):
        dispatch.resolve_backend(logits, 2, "fast")
    monkeypatch.setenv("SGLANG_MOE_EC_BACKEND", "triton")
    assert dispatch.resolve_backend(logits, 2) == "triton"
    monkeypatch.delenv("SGLANG_MOE_EC_BACKEND")
    # Forced Triton on CPU runs the interpreter and matches the reference.
    if DEVICE == "cpu":
        out = dispatch.expert_choice_topk(logits, 2, backend="triton")
        _assert_same(out, expert_choice_topk_reference(logits, RoutingSpec(2)), "dispatch triton")
        out = dispatch.expert_choice_topk(logits, 2)
        _assert_same(out, expert_choice_topk_reference(logits, RoutingSpec(2)), "dispatch auto")


def test_cuda_loader_messages(monkeypatch):
    from sglang_moe_routing.expert_choice import cuda as ec_cuda

    src = ec_cuda.kernel_source_dir()
    assert (src / "ec_route.cu").is_file()
    with pytest.raises(ValueError, match="CUDA tensor"):
        ec_cuda.expert_choice_topk_cuda(torch.randn(4, 8), RoutingSpec(2))
    # No nvcc, no CUDA_HOME: a clear RuntimeError naming nvcc.
    import torch.utils.cpp_extension as cpp_ext

    monkeypatch.setattr(cpp_ext, "CUDA_HOME", None)
    monkeypatch.setattr(ec_cuda.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="nvcc"):
        ec_cuda._check_toolchain()
    monkeypatch.setattr(ec_cuda.torch.version, "cuda", None)
    with pytest.raises(RuntimeError, match="no CUDA support"):
        ec_cuda._check_toolchain()
    # The env var is the fallback for the source directory.
    monkeypatch.setenv("SGLANG_MOE_ROUTING_KERNEL_DIR", str(src))
    assert ec_cuda.kernel_source_dir() == src


def test_triton_backend_does_not_load_the_cuda_module():
    """The Triton wrapper shares its checks and input preparation with the CUDA one through
    kernel_args.py, not through the CUDA loader module."""
    import subprocess
    import sys

    code = ("import sys; import sglang_moe_routing.expert_choice.triton_kernel; "
            "print('sglang_moe_routing.expert_choice.cuda' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


@pytest.mark.parametrize("ntnp", [5, 30])
def test_min_tokens_hybrid(ntnp):
    """T' < min_tokens routes exactly as token choice (decided on the device)."""
    g = torch.Generator().manual_seed(15)
    logits = torch.randn(30, 8, generator=g).to(DEVICE)
    n = torch.tensor([ntnp]).to(DEVICE)
    (w, ids), _ = _run_both(logits, 2, min_tokens=16, num_token_non_padded=n)
    if ntnp < 16:
        _, tc_ids = token_choice_topk_reference(logits, RoutingSpec(2))
        assert torch.equal(ids.cpu(), tc_ids.cpu())
