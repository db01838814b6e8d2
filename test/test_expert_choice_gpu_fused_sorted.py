"""The one-launch kernel (ec_fused.cu) at the small T where ``cuda.choose_path`` runs it, vs
the reference and, bit for bit, vs the three-launch path (marked ``gpu``).

Phase 3 runs the sorted rounds for E > 32 (ec_fused.cu, default since 2026-11-30): ids
equal to the reference, weights within 1e-6 of it, ids and weight bits equal to the
three-launch path's (same float operations). Every case
is one the one-launch kernel takes (T <= 1024, its shared memory within the device's opt-in
limit: the profiler checks that `ec_fused_kernel` runs, with and without grouped top-k, so a
case cannot fall back to three launches unnoticed). Covers
E in {33, 64, 128, 200, 256, 384, 512} at T in {1, 9, 32, 77, 128} (and T = 300 / 1024 where
the shared memory holds them), softmax / sigmoid, correction bias + grouped top-k, a device
and a host ``num_token_non_padded``, exact ties, NaN / inf rows, k from 1 to 32, no
renormalisation + scaling, the three dtypes.
"""

from __future__ import annotations

import pytest
import torch

from ec_helpers import assert_matches_reference, cuda_kernel_names, describe

from sglang_moe_routing.expert_choice import RoutingSpec
from sglang_moe_routing.expert_choice.reference import expert_choice_topk_reference

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float32, torch.float16]


@pytest.fixture(scope="module", autouse=True)
def _needs_hopper():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the one-launch kernel needs thread-block clusters (Hopper or later)")


def _t_values(E: int):
    ts = [1, 9, 32, 77, 128]
    ts += [300] if E <= 256 else []
    ts += [1024] if E <= 64 else []
    return ts


def _cases(g, T, E):
    ng = next(n for n in (8, 4, 3, 2, 1) if E % n == 0)
    tg = max(1, ng // 2)  # about half the groups cut (all kept where they hold < k experts)
    tg = tg if tg * (E // ng) >= min(E, 8) else ng
    bias = torch.randn(E, device="cuda", generator=g) * 0.05
    return [
        ("softmax", min(E, 8), {}),
        ("sigmoid", min(E, 8), dict(scoring_func="sigmoid", renormalize=False)),
        ("grouped_bias_sigmoid", min(E, 8), dict(
            scoring_func="sigmoid", num_expert_group=ng,
            topk_group=tg, correction_bias=bias,
            routed_scaling_factor=2.5, apply_routed_scaling_factor_on_output=True)),
        ("grouped_softmax", min(E, 6), dict(num_expert_group=ng, topk_group=tg)),
        ("ntnp_device", min(E, 8), dict(num_token_non_padded=torch.tensor([T // 3], device="cuda"))),
        ("ntnp_host", min(E, 8), dict(num_token_non_padded=max(T - 5, 0))),
        ("ties", min(E, 8), {}),
        ("ties_sigmoid_k1", 1, dict(scoring_func="sigmoid")),
        ("k32_nan_inf_scaled", min(E, 32), dict(renormalize=False, routed_scaling_factor=2.5,
                                               apply_routed_scaling_factor_on_output=True)),
    ]


@pytest.mark.parametrize("E", [33, 64, 128, 200, 256, 384, 512])
def test_one_launch_small_t_reference_and_three_launch_bitwise(E):
    from sglang_moe_routing.expert_choice.cuda import expert_choice_topk_cuda

    g = torch.Generator(device="cuda").manual_seed(1000 + E)
    n = 0
    for T in _t_values(E):
        for i, (name, k, kw) in enumerate(_cases(g, T, E)):
            dtype = DTYPES[(i + T + E) % 3]
            logits = (torch.randn(T, E, device="cuda", generator=g) * 2).to(dtype)
            if name.startswith("ties"):  # exact ties in every row and every column
                logits = (torch.randint(-3, 4, (T, E), device="cuda", generator=g).float() / 2).to(dtype)
            if name.startswith("k32_nan_inf") and T >= 9:
                logits[1] = float("nan")
                logits[2, 3] = float("nan")
                logits[4, : E // 2] = float("-inf")
                logits[5] = float("-inf")
                logits[8, 4] = float("inf")
            ntnp = kw.get("num_token_non_padded")
            spec = RoutingSpec(k, 1.25, **{a: b for a, b in kw.items() if a != "num_token_non_padded"})
            what = f"{name}: " + describe(logits, k, kw)
            rw, rids = expert_choice_topk_reference(logits, spec, ntnp)
            ow, oids = expert_choice_topk_cuda(logits, spec, ntnp, path="one_launch")
            assert_matches_reference("cuda_one_launch", what, ow, oids, rw, rids)
            if name in ("softmax", "grouped_bias_sigmoid"):  # without and with groups
                names = cuda_kernel_names(
                    lambda: expert_choice_topk_cuda(logits, spec, ntnp, path="one_launch"))
                assert "ec_fused_kernel" in names, f"not run by the one-launch kernel: {what}"
            tw, tids = expert_choice_topk_cuda(logits, spec, ntnp, path="three_launch")
            assert torch.equal(oids, tids), f"one_launch vs three_launch ids: {what}"
            assert torch.equal(ow.view(torch.int32), tw.view(torch.int32)), (
                f"one_launch vs three_launch weight bits: {what}")
            n += 1
    assert n == len(_t_values(E)) * 9


def test_one_launch_same_logits_repeated_rows():
    """Rows repeated across the cluster's CTAs (each CTA scores and routes its own slice;
    the per-expert selection mixes all of them): equal rows, equal scores, the lower token
    wins the capacity cut; the routing must still equal the reference."""
    from sglang_moe_routing.expert_choice.cuda import expert_choice_topk_cuda

    g = torch.Generator(device="cuda").manual_seed(7)
    for E, T in [(64, 128), (256, 64), (384, 40), (512, 32)]:
        rows = torch.randn(4, E, device="cuda", generator=g).to(torch.bfloat16)
        logits = rows.repeat(T // 4, 1)
        spec = RoutingSpec(8, 1.25)
        rw, rids = expert_choice_topk_reference(logits, spec)
        ow, oids = expert_choice_topk_cuda(logits, spec, path="one_launch")
        assert_matches_reference("cuda_one_launch", describe(logits, 8, {}), ow, oids, rw, rids)
