"""The experimental longer warp-per-expert select on a GPU (``sgl-kernel/csrc/ec_select.cu``,
``ec_select_short_kernel<2, 1024 | 2048>``, on with ``$SGLANG_MOE_EC_SHORT_SELECT_MAX_T`` = 1024
or 2048 for 256 < T <= that value; the default takes the block-wide radix select there).

Each check runs the three-launch path with the variable unset and set and asserts thresholds,
ids and weights equal bit for bit, and both equal to the reference (``ec_helpers``). Covered:
E in {8, 64, 128, 256, 384} x T across (256, 2048] x softmax / sigmoid x bias or not x T' unset
or a device tensor; ties, constant logits, columns with few or no eligible tokens, T' = 0,
that the variable really selects the kernel, CUDA-graph replay with PDL, validation.
"""

from __future__ import annotations

import pytest
import torch

from ec_helpers import (check_env_variant, check_env_variant_grid, check_graph_replay, k_for_e,
                        kernels_launched)

from sglang_moe_routing.expert_choice import RoutingSpec

pytestmark = pytest.mark.gpu

VAR = "SGLANG_MOE_EC_SHORT_SELECT_MAX_T"
E_VALUES = [8, 64, 128, 256, 384]
# (value of the variable, T values it applies to)
CASES = [("1024", [257, 300, 512, 777, 1024]), ("2048", [1025, 1500, 2048])]


@pytest.mark.parametrize("E", E_VALUES)
@pytest.mark.parametrize("value,ts", CASES)
def test_grid(monkeypatch, value, ts, E):
    for T in ts:
        check_env_variant_grid(monkeypatch, VAR, value, T, E, seed=100 * E + T)


@pytest.mark.parametrize("value,T", [("1024", 1024), ("1024", 513), ("2048", 2048)])
def test_ties_and_constant_logits(monkeypatch, value, T):
    """Quantised logits (the threshold falls inside a run of equal keys: ~t decides) and
    constant ones (the radix runs over the token index only)."""
    g = torch.Generator(device="cuda").manual_seed(T)
    for E in (8, 64, 256):
        quant = torch.round(torch.randn(T, E, device="cuda", generator=g) * 2) / 2
        check_env_variant(monkeypatch, VAR, value, quant.to(torch.bfloat16), k_for_e(E))
        check_env_variant(monkeypatch, VAR, value, quant, k_for_e(E), scoring_func="sigmoid")
        check_env_variant(monkeypatch, VAR, value, torch.zeros(T, E, device="cuda"), k_for_e(E))


def test_few_or_no_eligible(monkeypatch):
    """cap >= eligible (threshold 1) and cap = 0 (threshold ~0), next to ordinary columns."""
    g = torch.Generator(device="cuda").manual_seed(21)
    T, E = 1024, 64
    logits = torch.randn(T, E, device="cuda", generator=g)
    logits[:, 3] = float("nan")  # sigmoid is per element: NaN -> never eligible
    logits[:, 5] = float("nan")
    logits[::100, 5] = 1.0  # 11 eligible tokens < cap = 160
    logits[: T // 2, 7] = float("nan")
    thr = check_env_variant(monkeypatch, VAR, "1024", logits, 8, scoring_func="sigmoid")
    assert thr[3].item() == 1 and thr[5].item() == 1, "cap >= eligible must give threshold 1"
    zero = torch.tensor([0], dtype=torch.int64, device="cuda")
    thr = check_env_variant(monkeypatch, VAR, "1024", torch.randn(T, E, device="cuda", generator=g),
                            8, num_token_non_padded=zero)
    assert (thr == -1).all(), "cap = 0 must give threshold ~0"


def test_variant_kernel_runs(monkeypatch):
    """The variable selects the warp-per-expert kernel only for 256 < T <= its value."""
    assert "ec_select_short_kernel<2, 1024>" in kernels_launched(monkeypatch, VAR, "1024", 1024)
    assert "ec_select_short_kernel<2, 2048>" in kernels_launched(monkeypatch, VAR, "2048", 1500)
    for value, T in ((None, 1024), ("256", 1024), ("1024", 1025), ("1024", 256)):
        assert "ec_select_short_kernel<2" not in kernels_launched(monkeypatch, VAR, value, T), \
            (value, T)


def test_cuda_graph_pdl_replay(monkeypatch):
    """Captured with the variable set and PDL on, replayed with changing logits and T'."""
    check_graph_replay(monkeypatch, VAR, "1024", 1024, 128, [1024, 700, 0, 257, 1023])


@pytest.mark.parametrize("value", ["512", "1", "abc", " 1024", "1024x"])
def test_bad_value_raises(monkeypatch, value):
    from sglang_moe_routing.expert_choice.cuda import expert_choice_topk_cuda

    monkeypatch.setenv(VAR, value)
    with pytest.raises(RuntimeError, match=VAR):
        expert_choice_topk_cuda(torch.randn(300, 64, device="cuda"), RoutingSpec(8, 1.25),
                                path="three_launch")
