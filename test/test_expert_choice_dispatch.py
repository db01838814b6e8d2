"""CPU checks of the expert-choice dispatch rules (no GPU needed)."""

import pytest
import torch

from sglang_moe_routing.expert_choice import cuda as ec_cuda
from sglang_moe_routing.expert_choice import expert_choice_topk, expert_choice_topk_reference


@pytest.mark.parametrize(
    "t, e, expected",
    [
        (1, 256, ec_cuda.SMALL_PROBLEM_VARIANT),
        (32, 256, ec_cuda.SMALL_PROBLEM_VARIANT),
        (128, 64, ec_cuda.SMALL_PROBLEM_VARIANT),
        (128, 256, ec_cuda.LARGE_PROBLEM_VARIANT),  # T * E > 8192
        (1024, 8, ec_cuda.LARGE_PROBLEM_VARIANT),  # T > 128
        (32768, 256, ec_cuda.LARGE_PROBLEM_VARIANT),
    ],
)
def test_cuda_variant_by_shape(monkeypatch, t, e, expected):
    monkeypatch.delenv("SGLANG_MOE_EC_VARIANT", raising=False)
    assert ec_cuda._variant_default(t, e) == expected


def test_cuda_variant_env_override(monkeypatch):
    monkeypatch.setenv("SGLANG_MOE_EC_VARIANT", "15")
    assert ec_cuda._variant_default(1, 64) == 15


def test_cpu_tensors_use_the_reference():
    x = torch.randn(40, 16)
    a = expert_choice_topk(x, 4, 1.25, num_token_non_padded=torch.tensor(33), min_tokens=8)
    b = expert_choice_topk_reference(x, 4, 1.25, num_token_non_padded=torch.tensor(33), min_tokens=8)
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])


def test_prepare_backends_without_cuda_is_reference(monkeypatch):
    from sglang_moe_routing.expert_choice import dispatch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dispatch.prepare_backends() == "reference"
