"""The experimental thread-block-cluster select kernel on a GPU (``sgl-kernel/csrc/ec_select.cu``,
``ec_select_cluster_kernel``, on with ``$SGLANG_MOE_EC_SELECT_CLUSTER`` = 2 or 4 for T > 4096).

It must find each expert's threshold exactly as the one-CTA-per-expert kernel does. Each check
runs the three-launch path twice, with the variable unset (today's kernel) and set, and asserts
the thresholds, ids and weights of the two equal bit for bit, and both equal to the reference
(ids bit for bit, weights within 1e-6 as in ``test_expert_choice_gpu.py``). Covered: CS in {2, 4}
x E in {8, 64, 128, 256} (both CTA shapes: E * CS <= 128 and above) x T in {4097, 8192, 32768,
70001} x softmax / sigmoid x bias or not x T' unset or a device tensor; exact ties, columns
with few or no eligible tokens (cap >= eligible), T' = 0 (cap = 0), constant logits (one bin
of more tokens than the candidate slots; slices exactly as large as the slots), outputs from
NaN-filled memory, CUDA-graph replay with PDL, and the variable's validation.
"""

from __future__ import annotations

import pytest
import torch

from ec_helpers import assert_matches_reference, describe

from sglang_moe_routing.expert_choice import RoutingSpec
from sglang_moe_routing.expert_choice.reference import expert_choice_topk_reference

pytestmark = pytest.mark.gpu

VAR = "SGLANG_MOE_EC_SELECT_CLUSTER"
CLUSTER_SIZES = [2, 4]
E_VALUES = [8, 64, 128, 256]
T_VALUES = [4097, 8192, 32768, 70001]


@pytest.fixture(scope="module", autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


def _poison_allocator():
    """Fill free memory of PyTorch's caching allocator with NaN bytes, so that an output or
    threshold the kernels forget to write shows up."""
    big = [torch.full((n,), float("nan"), device="cuda") for n in (64 << 20, 8 << 20, 1 << 20)]
    small = [torch.full((n,), float("nan"), device="cuda") for n in (1 << 10, 1 << 14, 1 << 17) * 8]
    del big, small


def _run(monkeypatch, cs, logits, spec, ntnp, pdl=False):
    from sglang_moe_routing.expert_choice.cuda import expert_choice_topk_cuda

    if cs is None:
        monkeypatch.delenv(VAR, raising=False)
    else:
        monkeypatch.setenv(VAR, str(cs))
    _poison_allocator()
    w, ids, _, thr = expert_choice_topk_cuda(logits, spec, ntnp, pdl=pdl, path="three_launch",
                                             return_intermediates=True)
    return w, ids, thr


def _k(E: int) -> int:
    """k 8, but 2 at E = 8 (k 8 of 8 experts with cf >= 1 makes cap = T': no radix at all)."""
    return 2 if E == 8 else 8


def _bits(w: torch.Tensor) -> torch.Tensor:
    return w.contiguous().view(torch.int32)


def _check(monkeypatch, cs, logits, k, cf=1.25, num_token_non_padded=None, **kw):
    """Cluster kernel == default kernel (thr, ids, weights bitwise) == reference."""
    spec = RoutingSpec(k, cf, **kw)
    rw, rids = expert_choice_topk_reference(logits, spec, num_token_non_padded)
    dw, dids, dthr = _run(monkeypatch, None, logits, spec, num_token_non_padded)
    cw, cids, cthr = _run(monkeypatch, cs, logits, spec, num_token_non_padded)
    what = f"CS={cs} " + describe(logits, k, kw, cf) + (
        "" if num_token_non_padded is None else f" T'={int(num_token_non_padded.item())}")
    bad = (cthr != dthr).nonzero().flatten()[:4].tolist()
    assert not bad, (f"{what}: thresholds differ at experts {bad}: cluster "
                     f"{cthr[bad].tolist()} default {dthr[bad].tolist()}")
    assert_matches_reference("cluster", what, cw, cids, rw, rids)
    assert torch.equal(cids, dids), f"{what}: ids differ from the default kernel"
    assert torch.equal(_bits(cw), _bits(dw)), f"{what}: weights differ from the default kernel"
    return cthr


@pytest.mark.parametrize("T", T_VALUES)
@pytest.mark.parametrize("E", E_VALUES)
@pytest.mark.parametrize("cs", CLUSTER_SIZES)
def test_grid(monkeypatch, cs, E, T):
    g = torch.Generator(device="cuda").manual_seed(100 * E + T % 97 + cs)
    dtype = (torch.bfloat16, torch.float32, torch.float16)[(E + T) % 3]
    logits = (torch.randn(T, E, device="cuda", generator=g) * 2).to(dtype)
    bias = torch.randn(E, device="cuda", generator=g) * 0.1
    n_dev = torch.tensor([T - T // 5], dtype=torch.int32, device="cuda")
    for scoring in ("softmax", "sigmoid"):
        for b in (None, bias):
            for n in (None, n_dev):
                _check(monkeypatch, cs, logits, _k(E), num_token_non_padded=n,
                       scoring_func=scoring, correction_bias=b)


@pytest.mark.parametrize("cs", CLUSTER_SIZES)
def test_ties(monkeypatch, cs):
    """Quantised logits: the threshold falls inside a run of equal keys (~t decides)."""
    g = torch.Generator(device="cuda").manual_seed(9 + cs)
    for T, E in ((8192, 64), (32768, 8), (32768, 128), (70001, 256)):
        quant = torch.round(torch.randn(T, E, device="cuda", generator=g) * 2) / 2
        _check(monkeypatch, cs, quant.to(torch.bfloat16), _k(E))
        _check(monkeypatch, cs, quant, _k(E), scoring_func="sigmoid")


@pytest.mark.parametrize("cs", CLUSTER_SIZES)
def test_constant_logits(monkeypatch, cs):
    """Every key of a column equal: the radix runs over the token index only, starting from
    a prefix that holds all T tokens (more than the 16384 / 8192 candidate slots); at
    T = 32768, CS = 4, E >= 64 a CTA's slice is exactly the 8192 slots of the 512-thread
    shape, at T = 65536, CS = 4, E = 8 exactly the 16384 of the 1024-thread shape. The caps
    (T / 6.4 at k 8, E 64) are multiples of the 32-token bins at T = 65536: the early stop
    (whole bin taken). Then a constant row in 40000 of 65536 rows, random rows elsewhere:
    for the experts that rank that row high, the threshold lies in a key bin of 40000
    tokens."""
    for T in (32768, 65536, 70001):
        for E in (8, 64, 128):
            _check(monkeypatch, cs, torch.zeros(T, E, device="cuda"), _k(E))
            _check(monkeypatch, cs, torch.zeros(T, E, device="cuda"), _k(E), 1.0,
                   scoring_func="sigmoid")
    g = torch.Generator(device="cuda").manual_seed(3)
    for E in (8, 64, 128):
        x = torch.randn(65536, E, device="cuda", generator=g)
        x[:40000] = torch.randn(1, E, device="cuda", generator=g) * 2
        x = x[torch.randperm(65536, device="cuda", generator=g)]
        _check(monkeypatch, cs, x, _k(E))
        _check(monkeypatch, cs, x.to(torch.bfloat16), _k(E), scoring_func="sigmoid")


@pytest.mark.parametrize("cs", CLUSTER_SIZES)
def test_few_or_no_eligible(monkeypatch, cs):
    """cap >= eligible (threshold 1) and cap = 0 (threshold ~0), next to ordinary columns."""
    g = torch.Generator(device="cuda").manual_seed(21 + cs)
    T, E = 8192, 64
    logits = torch.randn(T, E, device="cuda", generator=g)
    logits[:, 3] = float("nan")  # sigmoid is per element: NaN -> never eligible
    logits[:, 5] = float("nan")
    logits[::100, 5] = 1.0  # 82 eligible tokens < cap = 1280
    logits[: T // 2, 7] = float("nan")  # half the column eligible
    thr = _check(monkeypatch, cs, logits, 8, scoring_func="sigmoid")
    assert thr[3].item() == 1 and thr[5].item() == 1, "cap >= eligible must give threshold 1"
    # Every expert may take every token (k * cf >= E): cap = T' = eligible.
    _check(monkeypatch, cs, torch.randn(T, 8, device="cuda", generator=g), 8, 1.25)
    # T' = 0: cap = 0, nothing is picked (ids fall back to token choice).
    zero = torch.tensor([0], dtype=torch.int64, device="cuda")
    thr = _check(monkeypatch, cs, torch.randn(T, E, device="cuda", generator=g), 8,
                 num_token_non_padded=zero)
    assert (thr == -1).all(), "cap = 0 must give threshold ~0"
    # T' small: few eligible per column, cap < eligible.
    few = torch.tensor([300], dtype=torch.int32, device="cuda")
    _check(monkeypatch, cs, torch.randn(T, E, device="cuda", generator=g), 8,
           num_token_non_padded=few)


@pytest.mark.parametrize("cs", CLUSTER_SIZES)
def test_cluster_kernel_runs(monkeypatch, cs):
    """The variable really selects the cluster kernel on Hopper (so the checks above compare
    two different kernels), only for T > 4096, and unset runs today's kernel."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("cluster kernel needs sm_90+")
    from sglang_moe_routing.expert_choice.cuda import expert_choice_topk_cuda

    def kernels(T, env):
        if env is None:
            monkeypatch.delenv(VAR, raising=False)
        else:
            monkeypatch.setenv(VAR, env)
        x = torch.randn(T, 64, device="cuda")
        expert_choice_topk_cuda(x, RoutingSpec(8, 1.25), path="three_launch")
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            expert_choice_topk_cuda(x, RoutingSpec(8, 1.25), path="three_launch")
            torch.cuda.synchronize()
        return " ".join(ev.key for ev in prof.key_averages())

    assert "ec_select_cluster_kernel" in kernels(8192, str(cs))
    assert "ec_select_cluster_kernel" not in kernels(4096, str(cs))
    assert "ec_select_cluster_kernel" not in kernels(8192, None)
    assert "ec_select_cluster_kernel" not in kernels(8192, "0")


@pytest.mark.parametrize("cs", CLUSTER_SIZES)
def test_cuda_graph_pdl_replay(monkeypatch, cs):
    """Captured with the variable set and PDL on, replayed with changing logits and T'."""
    from sglang_moe_routing.expert_choice.cuda import expert_choice_topk_cuda

    monkeypatch.setenv(VAR, str(cs))
    T, E, k = 32768, 64, 8
    g = torch.Generator(device="cuda").manual_seed(31)
    static = torch.randn(T, E, device="cuda", generator=g).to(torch.bfloat16)
    n_dev = torch.tensor([T], dtype=torch.int32, device="cuda")
    spec = RoutingSpec(k, 1.25)

    def run():
        return expert_choice_topk_cuda(static, spec, n_dev, pdl=True, path="three_launch")

    run()  # eager first: the kernel's shared-memory opt-in happens outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        w, ids = run()
    for n in [T, 20000, 0, 4097, T - 1]:
        static.copy_(torch.randn(T, E, device="cuda", generator=g).to(torch.bfloat16))
        n_dev.fill_(n)
        graph.replay()
        torch.cuda.synchronize()
        rw, rids = expert_choice_topk_reference(static, spec, n)
        assert_matches_reference("cluster graph", f"CS={cs} T'={n}", w, ids, rw, rids)


@pytest.mark.parametrize("value", ["1", "3", "8", "2x", "two", " 2"])
def test_bad_value_raises(monkeypatch, value):
    from sglang_moe_routing.expert_choice.cuda import expert_choice_topk_cuda

    monkeypatch.setenv(VAR, value)
    x = torch.randn(8192, 64, device="cuda")
    with pytest.raises(RuntimeError, match=VAR):
        expert_choice_topk_cuda(x, RoutingSpec(8, 1.25), path="three_launch")


@pytest.mark.parametrize("value", ["", "0", "2", "4"])
def test_good_values_accepted(monkeypatch, value):
    from sglang_moe_routing.expert_choice.cuda import expert_choice_topk_cuda

    monkeypatch.setenv(VAR, value)
    x = torch.randn(300, 64, device="cuda")  # T <= 4096: the variable changes nothing here
    w, ids = expert_choice_topk_cuda(x, RoutingSpec(8, 1.25), path="three_launch")
    rw, rids = expert_choice_topk_reference(x, RoutingSpec(8, 1.25))
    assert_matches_reference("cluster env", f"{VAR}={value!r}", w, ids, rw, rids)
