"""Expert-choice CUDA and Triton kernels vs the reference on a GPU (marked ``gpu``).

Ids must equal the reference bit for bit and weights agree to 1e-6, over
T in {0, 1, 2, 31, 128, 1000, 8192, 65536} x E in {2, 3, 8, 60, 64, 128, 256, 384, 512},
the three input dtypes, non-contiguous inputs, grouped top-k + correction bias + sigmoid,
padding rows, exact ties, NaN/inf logits, and CUDA-graph capture and replay with a changing
``num_token_non_padded`` device tensor. On a mismatch the message says whether the
kernel's selection keys differ from the reference's (a scoring difference) or not (a
selection difference).
"""

from __future__ import annotations

import pytest
import torch

from ec_helpers import assert_matches_reference, describe

from sglang_moe_routing.expert_choice import RoutingSpec
from sglang_moe_routing.expert_choice.dispatch import expert_choice_topk, resolve_backend
from sglang_moe_routing.expert_choice.reference import (
    compute_scores,
    expert_choice_topk_reference,
    mask_groups,
    token_choice_topk_reference,
)

pytestmark = pytest.mark.gpu

BACKENDS = ["cuda", "triton"]
# "cuda" checks both paths of the CUDA kernels (see cuda.choose_path): the one-launch
# cluster kernel (T <= 1024; three launches above) and the three launches (one-warp select
# for T <= 256, block select above). Both must give the reference's answer.
CUDA_PATHS = ("one_launch", "three_launch")
T_VALUES = [0, 1, 2, 31, 128, 1000, 8192, 65536]
E_TO_K = {2: 1, 3: 2, 8: 2, 60: 4, 64: 8, 128: 8, 256: 8, 384: 12, 512: 16}
DTYPES = [torch.bfloat16, torch.float32, torch.float16]


def _ec(backend, logits, k, cf=1.25, num_token_non_padded=None, return_intermediates=False,
        **kw):
    spec = RoutingSpec(k, cf, **kw)
    if backend.startswith("cuda"):
        from sglang_moe_routing.expert_choice.cuda import expert_choice_topk_cuda

        path = backend[5:] if backend.startswith("cuda_") else None
        return expert_choice_topk_cuda(logits, spec, num_token_non_padded, path=path,
                                       return_intermediates=return_intermediates)
    from sglang_moe_routing.expert_choice.triton_kernel import expert_choice_topk_triton

    return expert_choice_topk_triton(logits, spec, num_token_non_padded,
                                     return_intermediates=return_intermediates)


def _tc(backend, logits, k, **kw):
    if backend == "cuda":
        from sglang_moe_routing.expert_choice.cuda import token_choice_topk_cuda

        return token_choice_topk_cuda(logits, RoutingSpec(k, **kw))
    from sglang_moe_routing.expert_choice.triton_kernel import token_choice_topk_triton

    return token_choice_topk_triton(logits, RoutingSpec(k, **kw))


def _order_keys(sel: torch.Tensor) -> torch.Tensor:
    """Order-preserving uint32 of fp32 (as int64), 0 where not eligible (-inf / NaN)."""
    bits = sel.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    bits = torch.where(bits == 0x80000000, torch.zeros_like(bits), bits)
    key = torch.where(bits >= 2**31, (~bits) & 0xFFFFFFFF, bits | 2**31)
    return torch.where(sel > float("-inf"), key, torch.zeros_like(key))


def _key_report(backend, logits, k, cf, kw) -> str:
    """Say whether the kernel's selection keys equal the reference's (diagnostic only)."""
    try:
        out = _ec(backend, logits, k, cf, **kw, return_intermediates=True)
    except Exception as exc:  # noqa: BLE001
        return f"(no intermediates: {exc})"
    keys = out[2]
    _, sel = compute_scores(logits, kw.get("scoring_func", "softmax"), kw.get("correction_bias"))
    if kw.get("num_expert_group") is not None:
        sel = mask_groups(sel, kw["num_expert_group"], kw["topk_group"],
                          biased=kw.get("correction_bias") is not None)
    t = logits.shape[0]
    n = kw.get("num_token_non_padded")
    n = t if n is None else int(torch.as_tensor(n).reshape(()).item())
    want = _order_keys(sel)
    want[min(max(n, 0), t):] = 0
    got = (keys.to(torch.int64) & 0xFFFFFFFF).t()
    diff = got != want
    return (f"selection keys differ at {int(diff.sum())} of {diff.numel()} entries"
            f" (max |d| = {int((got - want).abs().max()) if diff.any() else 0} ulp)")


def _reference(logits, k, cf=1.25, num_token_non_padded=None, **kw):
    return expert_choice_topk_reference(logits, RoutingSpec(k, cf, **kw), num_token_non_padded)


def _check(backend, logits, k, cf=1.25, **kw):
    """Compare ``backend`` (for "cuda": each path) with one reference computation."""
    ref_w, ref_ids = _reference(logits, k, cf, **kw)
    names = [f"cuda_{v}" for v in CUDA_PATHS] if backend == "cuda" else [backend]
    out = None
    for name in names:
        w, ids = _ec(name, logits, k, cf, **kw)
        assert_matches_reference(name, describe(logits, k, kw), w, ids, ref_w, ref_ids,
                                 lambda: _key_report(name, logits, k, cf, kw))
        out = out if out is not None else (w, ids)
    return out


@pytest.fixture(scope="module", autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("E", list(E_TO_K))
def test_shape_matrix(backend, E):
    k = E_TO_K[E]
    dtype = DTYPES[list(E_TO_K).index(E) % 3]
    g = torch.Generator(device="cuda").manual_seed(E)
    for T in T_VALUES:
        logits = (torch.randn(T, E, device="cuda", generator=g) * 2).to(dtype)
        _check(backend, logits, k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes(backend, dtype):
    g = torch.Generator(device="cuda").manual_seed(1)
    logits = (torch.randn(1000, 64, device="cuda", generator=g) * 3).to(dtype)
    _check(backend, logits, 8)
    _check(backend, logits, 8, scoring_func="sigmoid", renormalize=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_selection_keys_bit_exact(backend):
    """The kernels' selection scores are torch's, bit for bit (softmax and sigmoid + bias)."""
    g = torch.Generator(device="cuda").manual_seed(2)
    for E, kw in [
        (60, {}),
        (512, {}),
        (256, dict(scoring_func="sigmoid", num_expert_group=8, topk_group=4,
                   correction_bias=torch.randn(256, device="cuda", generator=g) * 0.01)),
    ]:
        logits = (torch.randn(777, E, device="cuda", generator=g) * 2).to(torch.bfloat16)
        report = _key_report(backend, logits, 8, 1.25, kw)
        assert report.startswith("selection keys differ at 0 of"), report


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [1, 128, 8192, 65536])
def test_deepseek_grouped_bias_sigmoid(backend, T):
    g = torch.Generator(device="cuda").manual_seed(T)
    logits = torch.randn(T, 256, device="cuda", generator=g).to(torch.bfloat16)
    bias = torch.randn(256, device="cuda", generator=g) * 0.05
    _check(backend, logits, 8, scoring_func="sigmoid", correction_bias=bias,
           num_expert_group=8, topk_group=4, routed_scaling_factor=2.5,
           apply_routed_scaling_factor_on_output=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_softmax_variants(backend):
    g = torch.Generator(device="cuda").manual_seed(3)
    logits = torch.randn(1000, 64, device="cuda", generator=g)
    _check(backend, logits, 6, num_expert_group=8, topk_group=3)
    _check(backend, logits, 6, num_expert_group=8, topk_group=3, renormalize=False,
           correction_bias=torch.randn(64, device="cuda", generator=g) * 0.02)
    logits = torch.randn(500, 384, device="cuda", generator=g).to(torch.bfloat16)
    _check(backend, logits, 8, num_expert_group=1, topk_group=1, scoring_func="sigmoid")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend):
    g = torch.Generator(device="cuda").manual_seed(4)
    wide = torch.randn(1000, 80, device="cuda", generator=g).to(torch.bfloat16)
    _check(backend, wide[:, 8:72], 8)  # column slice
    tall = torch.randn(64, 1000, device="cuda", generator=g)
    _check(backend, tall.t(), 8)  # transposed storage
    _check(backend, wide[::3, :60], 4)  # row stride, odd E


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_rows(backend):
    g = torch.Generator(device="cuda").manual_seed(5)
    logits = torch.randn(1000, 64, device="cuda", generator=g).to(torch.bfloat16)
    for n in [torch.tensor([700], device="cuda"), torch.tensor(1, dtype=torch.int32, device="cuda"), 0, 999]:
        w, ids = _check(backend, logits, 8, num_token_non_padded=n)
        nv = int(torch.as_tensor(n).reshape(()).item())
        tc_w, tc_ids = token_choice_topk_reference(logits, RoutingSpec(8))
        assert torch.equal(ids[nv:], tc_ids[nv:])
        other = logits.clone()
        other[nv:] = torch.randn_like(other[nv:], dtype=torch.float32).to(other.dtype) * 4
        _, ids2 = _ec(backend, other, 8, num_token_non_padded=n)
        assert torch.equal(ids2[:nv], ids[:nv])


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_ties(backend):
    g = torch.Generator(device="cuda").manual_seed(6)
    q = (torch.randint(-6, 7, (8192, 64), device="cuda", generator=g).float() / 4).to(torch.bfloat16)
    _check(backend, q, 8, scoring_func="sigmoid")  # massive ties: lower token/expert index wins
    rows = torch.randn(64, 128, device="cuda", generator=g)
    _check(backend, rows.repeat(64, 1), 8)  # 4096 tokens, each repeated 64 times


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_inf(backend):
    g = torch.Generator(device="cuda").manual_seed(7)
    logits = torch.randn(300, 64, device="cuda", generator=g)
    logits[5] = float("nan")
    logits[9, 3] = float("nan")
    logits[11, :10] = float("-inf")
    logits[13] = float("-inf")
    logits[17, 4] = float("inf")
    _check(backend, logits, 8)
    _check(backend, logits, 8, scoring_func="sigmoid", num_expert_group=8, topk_group=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_capacity_extremes(backend):
    g = torch.Generator(device="cuda").manual_seed(8)
    logits = torch.randn(1000, 64, device="cuda", generator=g)
    _check(backend, logits, 8, cf=100.0)
    _check(backend, logits, 8, cf=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_min_tokens_hybrid(backend):
    """T' < min_tokens: capacity T', i.e. exactly token choice (decided on the device)."""
    g = torch.Generator(device="cuda").manual_seed(12)
    logits = torch.randn(512, 64, device="cuda", generator=g).to(torch.bfloat16)
    for n in (20, 400):
        n_dev = torch.tensor([n], device="cuda")
        w, ids = _check(backend, logits, 8, min_tokens=32, num_token_non_padded=n_dev)
        if n < 32:
            _, tc_ids = token_choice_topk_reference(logits, RoutingSpec(8))
            assert torch.equal(ids, tc_ids)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_choice_yardstick(backend):
    g = torch.Generator(device="cuda").manual_seed(9)
    logits = torch.randn(2000, 256, device="cuda", generator=g).to(torch.bfloat16)
    w, ids = _tc(backend, logits, 8)
    rw, rids = token_choice_topk_reference(logits, RoutingSpec(8))
    assert torch.equal(ids, rids)
    torch.testing.assert_close(w, rw, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_host_sync(backend):
    g = torch.Generator(device="cuda").manual_seed(10)
    logits = torch.randn(512, 64, device="cuda", generator=g).to(torch.bfloat16)
    n = torch.tensor([300], device="cuda")
    _ec(backend, logits, 8, num_token_non_padded=n)  # warm-up (build / compile)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _ec(backend, logits, 8, num_token_non_padded=n)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("min_tokens", [0, 32])
@pytest.mark.parametrize(
    "backend",
    BACKENDS + ["auto", "cuda_one_launch", "cuda_three_launch", "cuda_stream"],
)
def test_cuda_graph_replay_changing_num_valid(backend, min_tokens):
    """One captured graph replayed with T' crossing min_tokens (hybrid switch on the device)."""
    T, E, k = 256, 64, 8
    g = torch.Generator(device="cuda").manual_seed(11)
    static = torch.randn(T, E, device="cuda", generator=g).to(torch.bfloat16)
    n_dev = torch.tensor([T], dtype=torch.int32, device="cuda")

    def run():
        if backend == "auto":
            return expert_choice_topk(static, k, num_token_non_padded=n_dev, min_tokens=min_tokens)
        return _ec(backend, static, k, num_token_non_padded=n_dev, min_tokens=min_tokens)

    if backend == "auto":
        assert resolve_backend(static, k) == "cuda"
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        w, ids = run()
    for n in [T, 100, 1, 0, 37, 255, 31, 32, 20, T]:
        static.copy_(torch.randn(T, E, device="cuda", generator=g).to(torch.bfloat16))
        n_dev.fill_(n)
        graph.replay()
        torch.cuda.synchronize()
        rw, rids = expert_choice_topk_reference(static, RoutingSpec(k, min_tokens=min_tokens), n)
        assert torch.equal(ids, rids), f"replay with T'={n}, min_tokens={min_tokens}"
        torch.testing.assert_close(w, rw, atol=1e-6, rtol=0)


def test_one_launch_limits():
    """The one-launch kernel at its edges: T = 1024 and just above (three launches then),
    T at the short/block select boundary of the three-launch path (256/257), every E at a
    T where each CTA holds a single row or none, grouped sigmoid + bias at the largest E
    whose shared memory still fits, and a keysT diagnostic equal to the three-launch path's."""
    from sglang_moe_routing.expert_choice.cuda import expert_choice_topk_cuda

    g = torch.Generator(device="cuda").manual_seed(13)
    cases = [(1024, 8, 2, {}), (1025, 8, 2, {}), (256, 64, 8, {}), (257, 64, 8, {}),
             (9, 512, 16, {}), (5, 3, 2, {}),
             (17, 256, 8, dict(scoring_func="sigmoid", num_expert_group=8, topk_group=4))]
    for T, E, k, kw in cases:
        logits = (torch.randn(T, E, device="cuda", generator=g) * 2).to(torch.bfloat16)
        kw = dict(kw)
        if "num_expert_group" in kw:
            kw["correction_bias"] = torch.randn(E, device="cuda", generator=g) * 0.05
        rw, rids = expert_choice_topk_reference(logits, RoutingSpec(k, 1.25, **kw))
        keys_by_path = {}
        for path in ("one_launch", "three_launch"):
            w, ids, keys, _ = expert_choice_topk_cuda(logits, RoutingSpec(k, 1.25, **kw),
                                                      path=path, return_intermediates=True)
            assert torch.equal(ids, rids), (T, E, k, path)
            torch.testing.assert_close(w, rw, atol=1e-6, rtol=0)
            keys_by_path[path] = keys
        assert torch.equal(keys_by_path["one_launch"], keys_by_path["three_launch"]), (T, E, k)


@pytest.mark.parametrize("E", [33, 60, 72, 100, 128, 200, 256, 300, 383, 384, 512])
def test_route_three_launch_bitwise_one_launch(E):
    """The three-launch route kernel (E > 32: per-lane sorted composites, ec_route.cu
    route_row_sorted; 257..384 experts with 12 register slots per lane instead of 16) gives
    the one-launch kernel's ids and weights bit for bit (that kernel keeps ec_device.cuh
    route_row and 16 slots), and the reference's ids: softmax / sigmoid, bias + grouped top-k,
    no renormalisation + scaling, T' < T, exact ties, NaN / inf rows, k from 1 to 32,
    bf16 / fp16 / fp32. Token choice (no pick) against the reference too."""
    from sglang_moe_routing.expert_choice.cuda import expert_choice_topk_cuda, token_choice_topk_cuda

    g = torch.Generator(device="cuda").manual_seed(100 + E)
    T = 300 if E <= 256 else 128  # the one-launch kernel's shared memory holds these (H100/H200)
    ng = next(n for n in (8, 4, 3, 2, 1) if E % n == 0)
    cases = [
        (min(E, 8), {}),
        (1, {}),
        (min(E, 32), dict(renormalize=False, routed_scaling_factor=2.5,
                          apply_routed_scaling_factor_on_output=True)),
        (min(E, 8), dict(scoring_func="sigmoid", num_expert_group=ng, topk_group=max(1, ng // 2),
                         correction_bias=torch.randn(E, device="cuda", generator=g) * 0.05)),
        (min(E, 8), dict(num_token_non_padded=torch.tensor([T // 3], device="cuda"))),
    ]
    for i, (k, kw) in enumerate(cases):
        dtype = DTYPES[(i + E) % 3]
        logits = (torch.randn(T, E, device="cuda", generator=g) * 2).to(dtype)
        if i == 1:  # exact ties in every row
            logits = (torch.randint(-3, 4, (T, E), device="cuda", generator=g).float() / 2).to(dtype)
        if i == 2:
            logits[5] = float("nan")
            logits[9, 3] = float("nan")
            logits[11, : E // 2] = float("-inf")
            logits[13] = float("-inf")
            logits[17, 4] = float("inf")
        if "num_expert_group" in kw and kw["topk_group"] * (E // ng) < k:
            kw["topk_group"] = ng
        spec = RoutingSpec(k, 1.25, **{a: b for a, b in kw.items() if a != "num_token_non_padded"})
        ntnp = kw.get("num_token_non_padded")
        what = describe(logits, k, kw)
        rw, rids = expert_choice_topk_reference(logits, spec, ntnp)
        ow, oids = expert_choice_topk_cuda(logits, spec, ntnp, path="one_launch")
        tw, tids = expert_choice_topk_cuda(logits, spec, ntnp, path="three_launch")
        assert_matches_reference("cuda_three_launch", what, tw, tids, rw, rids)
        assert torch.equal(tids, oids), f"three_launch vs one_launch ids: {what}"
        assert torch.equal(tw.view(torch.int32), ow.view(torch.int32)), (
            f"three_launch vs one_launch weights: {what}")
    spec = RoutingSpec(min(E, 8))
    logits = (torch.randn(2000, E, device="cuda", generator=g) * 2).to(torch.bfloat16)
    w, ids = token_choice_topk_cuda(logits, spec)
    rw, rids = token_choice_topk_reference(logits, spec)
    assert torch.equal(ids, rids), f"token choice E={E}"
    torch.testing.assert_close(w, rw, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- custom op / torch.compile
# GPU twins of test/test_expert_choice_op.py: the op ``sglang_moe_routing::expert_choice_topk``
# with the cuda and triton backends, eager vs torch.compile(fullgraph=True), and a CUDA-graph
# capture of the compiled function (as SGLang does with --enable-torch-compile).

_OP_CASES = [
    # (name, T, E, k, cf, kwargs builder)
    ("plain", 300, 64, 8, 1.25, lambda g, T, E: {}),
    ("grouped_bias_sigmoid", 200, 256, 8, 1.25, lambda g, T, E: dict(
        scoring_func="sigmoid", num_expert_group=8, topk_group=4,
        correction_bias=torch.randn(E, device="cuda", generator=g) * 0.05,
        routed_scaling_factor=2.5, apply_routed_scaling_factor_on_output=True)),
    ("ntnp_device_hybrid", 96, 128, 8, 1.25, lambda g, T, E: dict(
        num_token_non_padded=torch.tensor([T - 40], device="cuda"), min_tokens=64)),
    ("ntnp_int", 96, 60, 4, 2.0, lambda g, T, E: dict(num_token_non_padded=T - 9)),
    ("ntnp_host_tensor", 50, 8, 2, 1.0, lambda g, T, E: dict(
        num_token_non_padded=torch.tensor(31), renormalize=False)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", _OP_CASES, ids=[c[0] for c in _OP_CASES])
def test_op_opcheck_gpu(backend, case):
    from sglang_moe_routing.expert_choice.ops import expert_choice_topk_op, op_arguments

    name, T, E, k, cf, make = case
    g = torch.Generator(device="cuda").manual_seed(T + E)
    logits = (torch.randn(T, E, device="cuda", generator=g) * 2).to(torch.bfloat16)
    kw = make(g, T, E)
    ntnp = kw.pop("num_token_non_padded", None)
    spec = RoutingSpec(k, cf, **kw)
    args = op_arguments(logits, spec, ntnp, backend)
    torch.library.opcheck(expert_choice_topk_op, args)
    w, ids = expert_choice_topk_op(*args)
    rw, rids = expert_choice_topk_reference(logits, spec, ntnp)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    assert torch.equal(ids, rids), (backend, name)
    torch.testing.assert_close(w, rw, atol=1e-6, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", _OP_CASES, ids=[c[0] for c in _OP_CASES])
def test_compile_fullgraph_equals_eager_gpu(backend, case):
    name, T, E, k, cf, make = case
    g = torch.Generator(device="cuda").manual_seed(T * 3 + E)
    logits = (torch.randn(T, E, device="cuda", generator=g) * 2).to(torch.bfloat16)
    kw = make(g, T, E)
    torch._dynamo.reset()

    def fn(x):
        w, ids = expert_choice_topk(x, k, cf, backend=backend, **kw)
        return w, ids

    compiled = torch.compile(fn, fullgraph=True)
    cw, cids = compiled(logits)
    ew, eids = fn(logits)
    assert cw.dtype == torch.float32 and cids.dtype == torch.int32
    assert torch.equal(cids, eids), (backend, name)
    assert torch.equal(cw, ew), (backend, name)  # same kernel, same inputs: bit for bit
    rw, rids = _reference(logits, k, cf, **kw)
    assert torch.equal(cids, rids), (backend, name)
    torch.testing.assert_close(cw, rw, atol=1e-6, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
@pytest.mark.parametrize("dynamic", [None, True])
def test_compile_fullgraph_changing_inputs_gpu(backend, dynamic):
    """One compiled function over changing T, T' (device tensor and int) and capacity factor."""
    from sglang_moe_routing.expert_choice import dispatch

    if backend == "auto":
        dispatch.prepare_backends()  # the availability probe must not happen inside a trace
    torch._dynamo.reset()
    E, k = 256, 8

    def fn(x, bias, ntnp, cf, min_tokens):
        w, ids = expert_choice_topk(
            x, k, cf, scoring_func="sigmoid", num_expert_group=8, topk_group=4,
            correction_bias=bias, routed_scaling_factor=2.5,
            apply_routed_scaling_factor_on_output=True, num_token_non_padded=ntnp,
            min_tokens=min_tokens, backend=backend)
        return w * 1.0, ids

    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic)
    g = torch.Generator(device="cuda").manual_seed(21)
    cases = [(300, torch.tensor([280], device="cuda"), 1.25, 0),
             (300, torch.tensor([20], device="cuda"), 1.25, 32),
             (1000, torch.tensor([1000], device="cuda"), 1.5, 0),
             (1000, 900, 1.5, 0), (64, 9, 2.0, 32), (17, None, 1.25, 0)]
    for T, ntnp, cf, mt in cases:
        x = torch.randn(T, E, device="cuda", generator=g).to(torch.bfloat16)
        bias = torch.randn(E, device="cuda", generator=g) * 0.05
        cw, cids = compiled(x, bias, ntnp, cf, mt)
        ew, eids = fn(x, bias, ntnp, cf, mt)
        assert torch.equal(cids, eids) and torch.equal(cw, ew), (backend, T, cf, mt)
        rw, rids = expert_choice_topk_reference(x, RoutingSpec(
            k, cf, scoring_func="sigmoid", num_expert_group=8, topk_group=4,
            correction_bias=bias, routed_scaling_factor=2.5,
            apply_routed_scaling_factor_on_output=True, min_tokens=mt), ntnp)
        assert torch.equal(cids, rids), (backend, T, cf, mt)
        torch.testing.assert_close(cw, rw, atol=1e-6, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_op_in_cuda_graph_gpu(backend):
    """torch.compile(fullgraph) output captured in a CUDA graph, replayed with a changing T'
    (the device tensor) across min_tokens: equals the reference each time."""
    T, E, k, min_tokens = 256, 64, 8, 32
    g = torch.Generator(device="cuda").manual_seed(23)
    static = torch.randn(T, E, device="cuda", generator=g).to(torch.bfloat16)
    n_dev = torch.tensor([T], dtype=torch.int32, device="cuda")
    torch._dynamo.reset()

    def fn(x, n):
        return expert_choice_topk(x, k, num_token_non_padded=n, min_tokens=min_tokens,
                                  backend=backend)

    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            compiled(static, n_dev)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        w, ids = compiled(static, n_dev)
    for n in [T, 100, 1, 0, 37, 255, 31, 32, 20, T]:
        static.copy_(torch.randn(T, E, device="cuda", generator=g).to(torch.bfloat16))
        n_dev.fill_(n)
        graph.replay()
        torch.cuda.synchronize()
        rw, rids = expert_choice_topk_reference(
            static, RoutingSpec(k, min_tokens=min_tokens), n_dev)
        assert torch.equal(ids, rids), f"{backend}: replay with T'={n}"
        torch.testing.assert_close(w, rw, atol=1e-6, rtol=0)


@pytest.mark.gpu
def test_out_of_range_auto_on_gpu_warns_once_and_compiles(caplog, monkeypatch):
    """E > 512 on CUDA with backend="auto": the reference runs (same result), one warning per
    (E, k) from the eager face, none from inside a fullgraph trace (which must not break)."""
    import logging

    from sglang_moe_routing.expert_choice import dispatch

    monkeypatch.delenv("SGLANG_MOE_EC_BACKEND", raising=False)
    dispatch._warned_outside_range.discard((1024, 8))
    g = torch.Generator(device="cuda").manual_seed(24)
    x = torch.randn(40, 1024, device="cuda", generator=g)
    pkg_logger = logging.getLogger("sglang_moe_routing")
    pkg_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="sglang_moe_routing"):
            torch._dynamo.reset()
            compiled = torch.compile(lambda t: expert_choice_topk(t, 8), fullgraph=True)
            cw, cids = compiled(x)
            for _ in range(3):
                w, ids = expert_choice_topk(x, 8)
    finally:
        pkg_logger.removeHandler(caplog.handler)
    rw, rids = expert_choice_topk_reference(x, RoutingSpec(8))
    assert torch.equal(ids, rids) and torch.equal(w, rw)
    assert torch.equal(cids, rids) and torch.equal(cw, rw)
    msgs = {id(r): r.getMessage() for r in caplog.records}.values()
    msgs = [m for m in msgs if "outside the CUDA/Triton kernels' range" in m]
    assert len(msgs) == 1 and "E=1024, k=8" in msgs[0], msgs
