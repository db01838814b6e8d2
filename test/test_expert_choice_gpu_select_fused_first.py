"""The experimental fused first digit of the select on a GPU (``sgl-kernel/csrc/ec_select.cu``,
``ec_select_kernel<..., FF = true>``, on with ``$SGLANG_MOE_EC_SELECT_FUSED_FIRST_DIGIT`` = 1):
a streamed column's min / max pass also builds the first digit's histogram at the radix
start of a sample (the CTA's first tile of keys), used when the whole column's start turns
out the same, discarded otherwise.

The digits are the same either way, so the thresholds must be the default kernel's bit for
bit. Each check runs the three-launch path with the variable unset and set to 1 and asserts
thresholds, ids and weights equal bit for bit, and both equal to the reference. Covered: the
shapes that stream (512-thread CTAs at E >= 132 and T > 4096, 1024-thread CTAs at E < 132 and
T > 16384), with the sample's start right (random logits) and wrong (a first tile narrower
than the column, or without eligible keys, or constant), constant columns (radix start at
the token bits), a device T' that pads the sample, the 8-element unroll combined, CUDA-graph
replay with PDL, which kernel runs, and the variable's validation.
"""

from __future__ import annotations

import re

import pytest
import torch

from ec_helpers import (check_bad_env_value, check_env_variant, check_env_variant_grid,
                        check_good_env_value, check_graph_replay, k_for_e, kernels_launched)

pytestmark = pytest.mark.gpu

VAR = "SGLANG_MOE_EC_SELECT_FUSED_FIRST_DIGIT"
SHAPES = [(4097, 256), (8192, 256), (8192, 384), (32768, 256), (70001, 384), (16385, 64),
          (32768, 128), (70001, 8), (65536, 131)]


@pytest.fixture(autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _one_cta(monkeypatch):
    """The fused first digit is for one CTA per expert: keep the cluster select off."""
    monkeypatch.setenv("SGLANG_MOE_EC_SELECT_CLUSTER", "0")


@pytest.mark.parametrize("T, E", SHAPES)
def test_grid(monkeypatch, T, E):
    check_env_variant_grid(monkeypatch, VAR, "1", T, E, seed=11 * E + T % 83)


@pytest.mark.parametrize("T, E", [(8192, 256), (32768, 64), (70001, 256)])
def test_sample_start_wrong(monkeypatch, T, E):
    """First tiles (the first 4096 rows cover every CTA shape's first tile) that predict a
    wrong radix start: a narrow band (keys share more top bits than the column's), no
    eligible key (NaN under sigmoid), one constant row repeated; then the rest random."""
    g = torch.Generator(device="cuda").manual_seed(T + E)
    x = torch.randn(T, E, device="cuda", generator=g) * 3
    narrow = x.clone()
    narrow[:4096] = torch.randn(4096, E, device="cuda", generator=g) * 0.01
    check_env_variant(monkeypatch, VAR, "1", narrow, k_for_e(E))
    check_env_variant(monkeypatch, VAR, "1", narrow.to(torch.bfloat16), k_for_e(E),
                      scoring_func="sigmoid")
    empty = x.clone()
    empty[:4096] = float("nan")
    check_env_variant(monkeypatch, VAR, "1", empty, k_for_e(E), scoring_func="sigmoid")
    const = x.clone()
    const[:4096] = torch.randn(1, E, device="cuda", generator=g)
    check_env_variant(monkeypatch, VAR, "1", const, k_for_e(E))


def test_constant_and_tied_columns(monkeypatch):
    g = torch.Generator(device="cuda").manual_seed(4)
    for T, E in ((8192, 256), (32768, 64), (70001, 384)):
        check_env_variant(monkeypatch, VAR, "1", torch.zeros(T, E, device="cuda"), k_for_e(E))
        quant = torch.round(torch.randn(T, E, device="cuda", generator=g) * 2) / 2
        check_env_variant(monkeypatch, VAR, "1", quant.to(torch.bfloat16), k_for_e(E))


def test_padded_sample(monkeypatch):
    """T' smaller than the first tile: the sample's keys past T' are ineligible (0)."""
    g = torch.Generator(device="cuda").manual_seed(8)
    for T, E, n in ((8192, 256, 1000), (32768, 64, 3000), (32768, 256, 0), (70001, 384, 70000)):
        x = torch.randn(T, E, device="cuda", generator=g)
        nt = torch.tensor([n], dtype=torch.int32, device="cuda")
        check_env_variant(monkeypatch, VAR, "1", x, k_for_e(E), num_token_non_padded=nt)


def test_with_unroll(monkeypatch):
    monkeypatch.setenv("SGLANG_MOE_EC_SELECT_UNROLL", "8")
    for T, E in ((8192, 256), (32768, 64), (70001, 384)):
        check_env_variant_grid(monkeypatch, VAR, "1", T, E, seed=T % 71 + E)


def test_kernel_runs(monkeypatch):
    """The variable switches the streaming shapes only (whole columns have nothing to fuse)."""
    def fused(T, E, env):
        names = kernels_launched(monkeypatch, VAR, env, T, E)
        return set(re.findall(r"ec_select_kernel<\d+, \d+, \d+, \d+, (\w+)>", names))

    assert fused(8192, 256, "1") == {"true"}
    assert fused(8192, 256, None) == {"false"}
    assert fused(32768, 64, "1") == {"true"}
    assert fused(16384, 64, "1") == {"false"}  # a whole column (<= 16384 candidate slots)
    assert fused(4096, 256, "1") == {"false"}


def test_cuda_graph_pdl_replay(monkeypatch):
    check_graph_replay(monkeypatch, VAR, "1", 32768, 256, [32768, 20000, 0, 4097, 32767])


@pytest.mark.parametrize("value", ["2", "true", "yes", " 1"])
def test_bad_value_raises(monkeypatch, value):
    check_bad_env_value(monkeypatch, VAR, value, 8192, 256)


@pytest.mark.parametrize("value", ["", "0", "1"])
def test_good_values_accepted(monkeypatch, value):
    check_good_env_value(monkeypatch, VAR, value, 8192, 256)
