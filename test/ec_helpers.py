"""Helpers the expert-choice GPU tests share: a kernel's ``(weights, ids)`` against the
reference's (ids bit for bit, weights within 1e-6, NaN where the reference has NaN), and the
checks of a kernel variant switched by an environment variable (bit for bit against the
baseline kernel, CUDA-graph replay, which kernels run, the variable's validation)."""

from __future__ import annotations

from typing import Callable, Optional

import pytest
import torch


def describe(logits: torch.Tensor, k: int, kw: dict, cf: Optional[float] = None) -> str:
    """``T=.. E=.. k=.. [cf=..] dtype {non-tensor kwargs}`` for failure messages."""
    cf_part = "" if cf is None else f" cf={cf}"
    return (f"T={logits.shape[0]} E={logits.shape[1]} k={k}{cf_part} {logits.dtype} "
            f"{ {a: b for a, b in kw.items() if not isinstance(b, torch.Tensor)} }")


def assert_matches_reference(name: str, what: str, w: torch.Tensor, ids: torch.Tensor,
                             ref_w: torch.Tensor, ref_ids: torch.Tensor,
                             detail: Callable[[], str] = lambda: "") -> None:
    """int32 ids equal to ``ref_ids`` row for row, float32 weights within 1e-6 of ``ref_w``;
    ``detail()`` (computed on failure only) is appended to the ids message."""
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert ids.shape == ref_ids.shape == w.shape
    bad = (ids != ref_ids).any(dim=1).nonzero().flatten()
    if bad.numel():
        rows = bad[:3].tolist()
        extra = detail()
        raise AssertionError(
            f"{name}: {what}: {bad.numel()} rows differ from the reference, e.g. rows {rows}: "
            f"got {ids[rows].tolist()} want {ref_ids[rows].tolist()}"
            + (f"; {extra}" if extra else ""))
    torch.testing.assert_close(w, ref_w, atol=1e-6, rtol=0, equal_nan=True,
                               msg=lambda m: f"{name}: {what}: {m}")


# ---------------------------------------------------------------------------------------------
# Experimental kernels switched on by an environment variable (read by the extension per call):
# the same three-launch call with the variable unset and set must agree bit for bit.


def poison_allocator() -> None:
    """Fill free memory of PyTorch's caching allocator with NaN bytes, so that an output or
    threshold a kernel forgets to write shows up."""
    big = [torch.full((n,), float("nan"), device="cuda") for n in (64 << 20, 8 << 20, 1 << 20)]
    small = [torch.full((n,), float("nan"), device="cuda") for n in (1 << 10, 1 << 14, 1 << 17) * 8]
    del big, small


def set_env(monkeypatch, var: str, value: Optional[str]) -> None:
    if value is None:
        monkeypatch.delenv(var, raising=False)
    else:
        monkeypatch.setenv(var, value)


def run_three_launch(monkeypatch, var: str, value: Optional[str], logits, spec, ntnp,
                     pdl: bool = False):
    """(weights, ids, thresholds) of the three-launch CUDA path with ``var`` = ``value``
    (None: unset), outputs from NaN-filled memory."""
    from sglang_moe_routing.expert_choice.cuda import expert_choice_topk_cuda

    set_env(monkeypatch, var, value)
    poison_allocator()
    w, ids, _, thr = expert_choice_topk_cuda(logits, spec, ntnp, pdl=pdl, path="three_launch",
                                             return_intermediates=True)
    return w, ids, thr


def check_env_variant(monkeypatch, var: str, value: str, logits, k: int, cf: float = 1.25,
                      num_token_non_padded=None, base: Optional[str] = None, **kw):
    """The variant (``var`` = ``value``) equals the baseline kernel (``var`` = ``base``; None:
    unset) in thresholds, ids and weights bit for bit, and the reference; returns the
    variant's thresholds."""
    from sglang_moe_routing.expert_choice import RoutingSpec
    from sglang_moe_routing.expert_choice.reference import expert_choice_topk_reference

    spec = RoutingSpec(k, cf, **kw)
    rw, rids = expert_choice_topk_reference(logits, spec, num_token_non_padded)
    dw, dids, dthr = run_three_launch(monkeypatch, var, base, logits, spec, num_token_non_padded)
    cw, cids, cthr = run_three_launch(monkeypatch, var, value, logits, spec, num_token_non_padded)
    what = f"{var}={value} " + describe(logits, k, kw, cf) + (
        "" if num_token_non_padded is None else f" T'={int(num_token_non_padded.item())}")
    bad = (cthr != dthr).nonzero().flatten()[:4].tolist()
    assert not bad, (f"{what}: thresholds differ at experts {bad}: variant "
                     f"{cthr[bad].tolist()} baseline {var}={base} {dthr[bad].tolist()}")
    assert_matches_reference("variant", what, cw, cids, rw, rids)
    assert torch.equal(cids, dids), f"{what}: ids differ from the baseline kernel"
    assert torch.equal(cw.contiguous().view(torch.int32), dw.contiguous().view(torch.int32)), \
        f"{what}: weights differ from the baseline kernel"
    return cthr


def cuda_kernel_names(fn) -> str:
    """Names of the CUDA kernels one call of ``fn`` runs (after an eager warm-up call)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return " ".join(ev.key for ev in prof.key_averages())


def kernels_launched(monkeypatch, var: str, value: Optional[str], T: int, E: int = 64) -> str:
    """Names of the CUDA kernels one three-launch call runs with ``var`` = ``value``."""
    from sglang_moe_routing.expert_choice import RoutingSpec
    from sglang_moe_routing.expert_choice.cuda import expert_choice_topk_cuda

    set_env(monkeypatch, var, value)
    x = torch.randn(T, E, device="cuda")
    return cuda_kernel_names(
        lambda: expert_choice_topk_cuda(x, RoutingSpec(8, 1.25), path="three_launch"))


def check_graph_replay(monkeypatch, var: str, value: str, T: int, E: int, ns, seed: int = 31):
    """Captured with ``var`` = ``value`` and PDL on (after an eager call, so one-time set-up
    such as a shared-memory opt-in happens outside the capture), replayed with new logits and
    each T' of ``ns``; every replay matches the reference."""
    from sglang_moe_routing.expert_choice import RoutingSpec
    from sglang_moe_routing.expert_choice.cuda import expert_choice_topk_cuda
    from sglang_moe_routing.expert_choice.reference import expert_choice_topk_reference

    monkeypatch.setenv(var, value)
    g = torch.Generator(device="cuda").manual_seed(seed)
    static = torch.randn(T, E, device="cuda", generator=g).to(torch.bfloat16)
    n_dev = torch.tensor([T], dtype=torch.int32, device="cuda")
    spec = RoutingSpec(8, 1.25)

    def run():
        return expert_choice_topk_cuda(static, spec, n_dev, pdl=True, path="three_launch")

    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        w, ids = run()
    for n in ns:
        static.copy_(torch.randn(T, E, device="cuda", generator=g).to(torch.bfloat16))
        n_dev.fill_(n)
        graph.replay()
        torch.cuda.synchronize()
        rw, rids = expert_choice_topk_reference(static, spec, n)
        assert_matches_reference("graph replay", f"{var}={value} T'={n}", w, ids, rw, rids)


def k_for_e(E: int) -> int:
    """k 8, but 2 at E = 8 (k 8 of 8 experts with cf >= 1 makes cap = T': no radix at all)."""
    return 2 if E == 8 else 8


def check_env_variant_grid(monkeypatch, var: str, value: str, T: int, E: int, seed: int,
                           base: Optional[str] = None) -> None:
    """check_env_variant on random logits of shape (T, E) (dtype by T + E) for softmax and
    sigmoid, without and with a correction bias, T' unset and T - T // 5 on the device."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    dtype = (torch.bfloat16, torch.float32, torch.float16)[(E + T) % 3]
    logits = (torch.randn(T, E, device="cuda", generator=g) * 2).to(dtype)
    bias = torch.randn(E, device="cuda", generator=g) * 0.1
    n_dev = torch.tensor([T - T // 5], dtype=torch.int32, device="cuda")
    for scoring in ("softmax", "sigmoid"):
        for b in (None, bias):
            for n in (None, n_dev):
                check_env_variant(monkeypatch, var, value, logits, k_for_e(E),
                                  num_token_non_padded=n, base=base, scoring_func=scoring,
                                  correction_bias=b)


def check_bad_env_value(monkeypatch, var: str, value: str, T: int, E: int) -> None:
    """With ``var`` = ``value`` the three-launch call raises an error that names ``var``."""
    from sglang_moe_routing.expert_choice import RoutingSpec
    from sglang_moe_routing.expert_choice.cuda import expert_choice_topk_cuda

    monkeypatch.setenv(var, value)
    x = torch.randn(T, E, device="cuda")
    with pytest.raises(RuntimeError, match=var):
        expert_choice_topk_cuda(x, RoutingSpec(8, 1.25), path="three_launch")


def check_good_env_value(monkeypatch, var: str, value: str, T: int, E: int) -> None:
    """With ``var`` = ``value`` the three-launch call runs and matches the reference."""
    from sglang_moe_routing.expert_choice import RoutingSpec
    from sglang_moe_routing.expert_choice.cuda import expert_choice_topk_cuda
    from sglang_moe_routing.expert_choice.reference import expert_choice_topk_reference

    monkeypatch.setenv(var, value)
    x = torch.randn(T, E, device="cuda")
    w, ids = expert_choice_topk_cuda(x, RoutingSpec(8, 1.25), path="three_launch")
    rw, rids = expert_choice_topk_reference(x, RoutingSpec(8, 1.25))
    assert_matches_reference(f"{var} env", f"{var}={value!r}", w, ids, rw, rids)
