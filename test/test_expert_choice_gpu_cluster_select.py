"""The thread-block-cluster select on a GPU (``sgl-kernel/csrc/ec_select.cu``,
``ec_select_kernel<..., CS>`` with CS = 2 or 4 CTAs per expert: the default for E <= 384 at
T > 32768 and E <= 8 at T > 16384 on Hopper, forced or switched off with
``$SGLANG_MOE_EC_SELECT_CLUSTER``).

It must find each expert's threshold exactly as one CTA per expert does. Each check runs the
three-launch path twice, with the variable "0" (one CTA per expert) and set, and asserts the
thresholds, ids and weights of the two equal bit for bit, and both equal to the reference
(ids bit for bit, weights within 1e-6 as in ``test_expert_choice_gpu.py``). Covered: CS in {2, 4}
x E in {8, 32, 64, 128, 256} (both CTA shapes: E * CS <= 128 and above) x T in {4097, 8192,
32768, 70001} x softmax / sigmoid x bias or not x T' unset or a device tensor; exact ties,
columns with few or no eligible tokens (cap >= eligible), T' = 0 (cap = 0), constant logits
(one bin of more tokens than the candidate slots; slices exactly as large as the slots),
outputs from NaN-filled memory, CUDA-graph replay with PDL, which kernel each setting runs
(the rule by E and T when unset), and the variable's validation.
"""

from __future__ import annotations

import re

import pytest
import torch

from ec_helpers import (check_bad_env_value, check_env_variant, check_env_variant_grid,
                        check_good_env_value, check_graph_replay, k_for_e, kernels_launched)

pytestmark = pytest.mark.gpu

VAR = "SGLANG_MOE_EC_SELECT_CLUSTER"
CLUSTER_SIZES = [2, 4]
E_VALUES = [8, 32, 64, 128, 256, 384]
OFF = "0"  # the baseline: one CTA per expert
T_VALUES = [4097, 8192, 32768, 70001]


def _check(monkeypatch, cs, logits, k, cf=1.25, num_token_non_padded=None, **kw):
    """Cluster kernel == one CTA per expert (thr, ids, weights bitwise) == reference."""
    return check_env_variant(monkeypatch, VAR, str(cs), logits, k, cf, num_token_non_padded,
                             base=OFF, **kw)


@pytest.mark.parametrize("T", T_VALUES)
@pytest.mark.parametrize("E", E_VALUES)
@pytest.mark.parametrize("cs", CLUSTER_SIZES)
def test_grid(monkeypatch, cs, E, T):
    check_env_variant_grid(monkeypatch, VAR, str(cs), T, E, seed=100 * E + T % 97 + cs,
                           base=OFF)


@pytest.mark.parametrize("cs", CLUSTER_SIZES)
def test_ties(monkeypatch, cs):
    """Quantised logits: the threshold falls inside a run of equal keys (~t decides)."""
    g = torch.Generator(device="cuda").manual_seed(9 + cs)
    for T, E in ((8192, 64), (32768, 8), (32768, 128), (70001, 256)):
        quant = torch.round(torch.randn(T, E, device="cuda", generator=g) * 2) / 2
        _check(monkeypatch, cs, quant.to(torch.bfloat16), k_for_e(E))
        _check(monkeypatch, cs, quant, k_for_e(E), scoring_func="sigmoid")


@pytest.mark.parametrize("cs", CLUSTER_SIZES)
def test_constant_logits(monkeypatch, cs):
    """Every key of a column equal: the radix runs over the token index only, starting from
    a prefix that holds all T tokens (more than the 16384 candidate slots); at T = 32768 with
    one CTA per expert, and at T = 65536 with CS = 2, a column / slice is exactly the 32768
    keys the 1024-thread shape caches whole, at T = 70001 it is streamed. The caps
    (T / 6.4 at k 8, E 64) are multiples of the 32-token bins at T = 65536: the early stop
    (whole bin taken). Then a constant row in 40000 of 65536 rows, random rows elsewhere:
    for the experts that rank that row high, the threshold lies in a key bin of 40000
    tokens."""
    for T in (32768, 65536, 70001):
        for E in (8, 64, 128):
            _check(monkeypatch, cs, torch.zeros(T, E, device="cuda"), k_for_e(E))
            _check(monkeypatch, cs, torch.zeros(T, E, device="cuda"), k_for_e(E), 1.0,
                   scoring_func="sigmoid")
    g = torch.Generator(device="cuda").manual_seed(3)
    for E in (8, 64, 128):
        x = torch.randn(65536, E, device="cuda", generator=g)
        x[:40000] = torch.randn(1, E, device="cuda", generator=g) * 2
        x = x[torch.randperm(65536, device="cuda", generator=g)]
        _check(monkeypatch, cs, x, k_for_e(E))
        _check(monkeypatch, cs, x.to(torch.bfloat16), k_for_e(E), scoring_func="sigmoid")


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


def test_kernel_choice(monkeypatch):
    """Which select kernel runs (so the checks above compare two different kernels): when the
    variable is unset, 4 CTAs per expert for E <= 8 at T > 16384, 2 for E <= 384 at
    T > 32768, else one; the forced sizes (always 1024-thread CTAs, in several waves when
    E * CS > 128), only for T > 4096; 8 column elements in flight per thread above T = 4096, 4 at or below."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread-block clusters need sm_90+")

    def select(T, E, env):
        names = kernels_launched(monkeypatch, VAR, env, T, E)
        found = re.findall(r"ec_select_kernel<(\d+), (\d+), (\d+), (\d+)>", names)
        assert len(set(found)) == 1, names
        return tuple(int(v) for v in found[0])

    assert select(65536, 64, None) == (11, 1024, 8, 2)
    assert select(32769, 64, "") == (11, 1024, 8, 2)
    assert select(32768, 64, None) == (11, 1024, 8, 1)
    assert select(65536, 32, None) == (11, 1024, 8, 2)
    assert select(16385, 8, None) == (11, 1024, 8, 4)
    assert select(16384, 8, None) == (11, 1024, 8, 1)
    assert select(65536, 128, None) == (11, 1024, 8, 2)
    assert select(65536, 256, None) == (11, 1024, 8, 2)
    assert select(32769, 160, None) == (11, 1024, 8, 2)
    assert select(32768, 256, None) == (11, 512, 8, 1)
    assert select(65536, 384, None) == (11, 1024, 8, 2)
    assert select(65536, 385, None) == (11, 512, 8, 1)
    assert select(32768, 384, None) == (11, 512, 8, 1)
    assert select(8192, 64, None) == (11, 1024, 8, 1)
    assert select(65536, 64, "0") == (11, 1024, 8, 1)
    assert select(8192, 64, "2") == (11, 1024, 8, 2)
    assert select(8192, 64, "4") == (11, 1024, 8, 4)
    assert select(8192, 128, "2") == (11, 1024, 8, 2)
    assert select(65536, 256, "2") == (11, 1024, 8, 2)
    assert select(8192, 32, "4") == (11, 1024, 8, 4)
    for env in (None, "2", "4"):
        assert select(4096, 64, env) == (8, 256, 4, 1)


@pytest.mark.parametrize("cs", CLUSTER_SIZES)
def test_cuda_graph_pdl_replay(monkeypatch, cs):
    """Captured with the variable set and PDL on, replayed with changing logits and T'."""
    check_graph_replay(monkeypatch, VAR, str(cs), 32768, 64, [32768, 20000, 0, 4097, 32767])


@pytest.mark.parametrize("value", ["1", "3", "8", "2x", "two", " 2"])
def test_bad_value_raises(monkeypatch, value):
    check_bad_env_value(monkeypatch, VAR, value, 8192, 64)


@pytest.mark.parametrize("value", ["", "0", "2", "4"])
def test_good_values_accepted(monkeypatch, value):
    check_good_env_value(monkeypatch, VAR, value, 300, 64)  # T <= 4096: the variable is a no-op
