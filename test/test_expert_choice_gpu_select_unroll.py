"""The experimental 8-element unroll of the block-wide select on a GPU
(``sgl-kernel/csrc/ec_select.cu``, ``ec_select_kernel<BITS, THREADS, 8, CS>``, on with
``$SGLANG_MOE_EC_SELECT_UNROLL`` = 8; the default loads 4 column elements per thread before
using them).

Only the number of loads in flight changes, so the thresholds must be the default kernel's
bit for bit. Each check runs the three-launch path with the variable unset and set to 8 and
asserts thresholds, ids and weights equal bit for bit, and both equal to the reference (ids
bit for bit, weights within 1e-6). Covered: every select shape (256-thread CTAs at T <= 4096,
1024-thread CTAs for few experts, 512-thread CTAs, clusters of 2 and 4 forced through
``$SGLANG_MOE_EC_SELECT_CLUSTER``), whole-column caches and streamed columns, columns whose
length is not a multiple of the 8 * THREADS tile, softmax / sigmoid, bias, a device T',
exact ties, constant columns, NaN-filled outputs, CUDA-graph replay with PDL, which kernel
runs, and the variable's validation.
"""

from __future__ import annotations

import re

import pytest
import torch

from ec_helpers import (check_bad_env_value, check_env_variant, check_env_variant_grid,
                        check_good_env_value, check_graph_replay, k_for_e, kernels_launched)

pytestmark = pytest.mark.gpu

VAR = "SGLANG_MOE_EC_SELECT_UNROLL"
E_VALUES = [8, 64, 128, 256, 384]
T_VALUES = [300, 1024, 4097, 8192, 32768, 70001]


@pytest.fixture(autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.mark.parametrize("T", T_VALUES)
@pytest.mark.parametrize("E", E_VALUES)
def test_grid(monkeypatch, E, T):
    check_env_variant_grid(monkeypatch, VAR, "8", T, E, seed=7 * E + T % 89)


@pytest.mark.parametrize("cs", ["2", "4"])
def test_clusters(monkeypatch, cs):
    """Forced clusters (both CTA shapes) with the unroll, against the same clusters without."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread-block clusters need sm_90+")
    monkeypatch.setenv("SGLANG_MOE_EC_SELECT_CLUSTER", cs)
    for T, E in ((8192, 8), (32768, 32), (70001, 64), (32768, 128)):
        check_env_variant_grid(monkeypatch, VAR, "8", T, E, seed=T % 101 + E)


def test_ties_and_constant_columns(monkeypatch):
    g = torch.Generator(device="cuda").manual_seed(5)
    for T, E in ((1024, 64), (8192, 64), (32768, 256), (70001, 8)):
        quant = torch.round(torch.randn(T, E, device="cuda", generator=g) * 2) / 2
        check_env_variant(monkeypatch, VAR, "8", quant.to(torch.bfloat16), k_for_e(E))
        check_env_variant(monkeypatch, VAR, "8", torch.zeros(T, E, device="cuda"), k_for_e(E))
        check_env_variant(monkeypatch, VAR, "8", torch.zeros(T, E, device="cuda"), k_for_e(E),
                          1.0, scoring_func="sigmoid")


def test_kernel_runs(monkeypatch):
    """The variable really switches the instantiation (so the checks compare two kernels)."""
    def unrolls(T, E, env):
        names = kernels_launched(monkeypatch, VAR, env, T, E)
        return {int(u) for u in re.findall(r"ec_select_kernel<\d+, \d+, (\d+), \d+(?:, \w+)?>",
                                            names)}

    assert unrolls(8192, 64, "8") == {8}
    assert unrolls(8192, 64, None) == {4}
    assert unrolls(2048, 256, "8") == {8}
    assert unrolls(65536, 256, "4") == {4}


def test_cuda_graph_pdl_replay(monkeypatch):
    check_graph_replay(monkeypatch, VAR, "8", 32768, 64, [32768, 20000, 0, 4097, 32767])


@pytest.mark.parametrize("value", ["2", "16", "0", "eight", " 8"])
def test_bad_value_raises(monkeypatch, value):
    check_bad_env_value(monkeypatch, VAR, value, 8192, 64)


@pytest.mark.parametrize("value", ["", "4", "8"])
def test_good_values_accepted(monkeypatch, value):
    check_good_env_value(monkeypatch, VAR, value, 8192, 64)
