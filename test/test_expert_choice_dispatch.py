"""CPU checks of the expert-choice dispatch rules (no GPU needed)."""

import pytest
import torch

from sglang_moe_routing.expert_choice import cuda as ec_cuda
from sglang_moe_routing.expert_choice import (
    RoutingSpec,
    expert_choice_topk,
    expert_choice_topk_reference,
)


@pytest.mark.parametrize(
    "t, e, expected",
    [
        (1, 256, "one_launch"),
        (32, 256, "one_launch"),
        (128, 64, "one_launch"),
        (128, 128, "one_launch"),  # T * E = 16384
        (128, 256, "three_launch"),  # T * E > 16384
        (1, 257, "three_launch"),  # E > 256 (slower in one launch on the H200)
        (32, 384, "three_launch"),
        (129, 8, "three_launch"),  # T > 128
        (8191, 256, "three_launch"),
        (8192, 8, "three_launch"),  # the stream path is opt-in until measured on a GPU
        (32768, 256, "three_launch"),
    ],
)
def test_cuda_path_by_shape(monkeypatch, t, e, expected):
    monkeypatch.delenv("SGLANG_MOE_EC_PATH", raising=False)
    assert ec_cuda.choose_path(t, e) == expected


def test_cuda_path_override(monkeypatch):
    monkeypatch.setenv("SGLANG_MOE_EC_PATH", "three_launch")
    assert ec_cuda.choose_path(1, 64) == "three_launch"
    assert ec_cuda.choose_path(1, 64, "one_launch") == "one_launch"  # the argument wins
    assert ec_cuda.choose_path(32768, 64, "three_launch") == "three_launch"
    monkeypatch.setenv("SGLANG_MOE_EC_PATH", "stream")
    assert ec_cuda.choose_path(1, 64) == "stream"
    monkeypatch.setenv("SGLANG_MOE_EC_PATH", "fast")
    with pytest.raises(ValueError, match="path must be one of"):
        ec_cuda.choose_path(1, 64)


def test_cpu_tensors_use_the_reference():
    x = torch.randn(40, 16)
    a = expert_choice_topk(x, 4, 1.25, num_token_non_padded=torch.tensor(33), min_tokens=8)
    b = expert_choice_topk_reference(x, RoutingSpec(4, 1.25, min_tokens=8), torch.tensor(33))
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])


def test_prepare_backends_without_cuda_is_reference(monkeypatch):
    from sglang_moe_routing.expert_choice import dispatch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dispatch.prepare_backends() == "reference"
