"""The ``sglang_moe_routing::expert_choice_topk`` custom op and its Python face, on CPU.

* ``torch.library.opcheck`` of the op (reference backend): schema, fake tensors, AOT dispatch;
* ``torch.compile(fullgraph=True)`` of ``expert_choice_topk(..., backend="reference")``
  equals eager exactly (static and dynamic shapes, changing ``num_token_non_padded``);
* fake-tensor / meta shapes and dtypes;
* the once-per-(E, k) warning for CUDA inputs outside the kernels' range (resolution helper
  with a stand-in object whose ``is_cuda`` is True: no GPU here);
* grad-requiring logits bypass the op and stay differentiable, as before.

The GPU variants (compile with the cuda and triton backends) are in
``test_expert_choice_gpu.py``.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from sglang_moe_routing.expert_choice import RoutingSpec, dispatch, expert_choice_topk
from sglang_moe_routing.expert_choice.ops import OP_NAME, expert_choice_topk_op, op_arguments
from sglang_moe_routing.expert_choice.reference import expert_choice_topk_reference

# (T, E, k, cf, face kwargs); a "bias" / "ntnp" value is built per case by _build.
CONFIGS = [
    ("plain", 40, 16, 4, 1.25, {}),
    ("no_renorm_fp16", 33, 8, 2, 1.0, dict(renormalize=False, dtype=torch.float16)),
    ("grouped_bias_sigmoid", 48, 32, 4, 1.25, dict(
        scoring_func="sigmoid", num_expert_group=8, topk_group=4, bias=True,
        routed_scaling_factor=2.5, apply_routed_scaling_factor_on_output=True)),
    ("grouped_softmax_bf16", 24, 16, 3, 2.0, dict(
        num_expert_group=4, topk_group=2, dtype=torch.bfloat16)),
    ("ntnp_tensor_hybrid", 40, 16, 4, 1.25, dict(ntnp="tensor0d", min_tokens=64)),
    ("ntnp_tensor_int32_1elem", 40, 16, 4, 1.25, dict(ntnp="tensor1", scoring_func="sigmoid")),
    ("ntnp_int", 40, 16, 4, 1.25, dict(ntnp="int")),
    ("ntnp_int_zero", 40, 16, 4, 1.25, dict(ntnp="zero")),
    ("empty", 0, 16, 4, 1.25, {}),
    ("scaling_not_applied", 20, 8, 2, 1.5, dict(routed_scaling_factor=2.5)),
]


def _build(T, E, cf, kw, seed=0):
    """Logits and the face's keyword arguments for one config."""
    kw = dict(kw)
    g = torch.Generator().manual_seed(seed)
    dtype = kw.pop("dtype", torch.float32)
    logits = (torch.randn(T, E, generator=g) * 2).to(dtype)
    if kw.pop("bias", False):
        kw["correction_bias"] = torch.randn(E, generator=g) * 0.1
    ntnp = kw.pop("ntnp", None)
    if ntnp == "tensor0d":
        kw["num_token_non_padded"] = torch.tensor(T - 7)
    elif ntnp == "tensor1":
        kw["num_token_non_padded"] = torch.tensor([T // 2], dtype=torch.int32)
    elif ntnp == "int":
        kw["num_token_non_padded"] = T - 5
    elif ntnp == "zero":
        kw["num_token_non_padded"] = 0
    return logits, kw


def _spec(k, cf, kw):
    """``(RoutingSpec, num_token_non_padded)`` for the face's keyword arguments."""
    kw = dict(kw)
    ntnp = kw.pop("num_token_non_padded", None)
    return RoutingSpec(k, cf, **kw), ntnp


def _reference(logits, k, cf, kw):
    return expert_choice_topk_reference(logits, *_spec(k, cf, kw))


def _op_args(logits, k, cf, kw, backend="reference"):
    """The op's positional arguments for the face's keyword arguments."""
    spec, ntnp = _spec(k, cf, kw)
    return op_arguments(logits, spec, ntnp, backend)


def _assert_identical(out, ref):
    w, ids = out
    rw, rids = ref
    assert w.dtype == rw.dtype == torch.float32 and ids.dtype == rids.dtype == torch.int32
    assert w.shape == rw.shape and ids.shape == rids.shape
    assert torch.equal(ids, rids)
    assert torch.equal(w, rw)  # bit for bit (no NaNs in these inputs)


def test_op_is_registered_with_the_documented_schema():
    op = torch.ops.sglang_moe_routing.expert_choice_topk
    schema = str(op.default._schema)
    assert schema.startswith(OP_NAME + "(")
    for part in ("Tensor router_logits", "SymInt top_k", "float capacity_factor",
                 "str scoring_func", "SymInt? num_expert_group", "SymInt? topk_group",
                 "Tensor? correction_bias", "float? routed_scaling_factor",
                 "Tensor? num_token_non_padded", "SymInt? num_token_non_padded_int",
                 "SymInt min_tokens", "str backend", "-> (Tensor, Tensor)"):
        assert part in schema, (part, schema)
    # The op's arguments are the logits, the RoutingSpec's fields in order, T', the backend:
    # a field added to the spec without the schema (or the other way round) fails here.
    names = [a.name for a in op.default._schema.arguments]
    fields = [f.name for f in dataclasses.fields(RoutingSpec)]
    assert names == ["router_logits", *fields, "num_token_non_padded",
                     "num_token_non_padded_int", "backend"]


@pytest.mark.parametrize("name, T, E, k, cf, kw", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_opcheck_reference(name, T, E, k, cf, kw):
    logits, kw = _build(T, E, cf, kw)
    args = _op_args(logits, k, cf, kw)
    torch.library.opcheck(expert_choice_topk_op, args)
    ref = _reference(logits, k, cf, kw)
    _assert_identical(expert_choice_topk_op(*args), ref)


@pytest.mark.parametrize("name, T, E, k, cf, kw", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_face_equals_reference(name, T, E, k, cf, kw):
    logits, kw = _build(T, E, cf, kw, seed=1)
    ref = _reference(logits, k, cf, kw)
    _assert_identical(expert_choice_topk(logits, k, cf, **kw), ref)
    _assert_identical(expert_choice_topk(logits, k, cf, backend="reference", **kw), ref)


@pytest.mark.parametrize("name, T, E, k, cf, kw", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_compile_fullgraph_equals_eager(name, T, E, k, cf, kw):
    torch._dynamo.reset()
    logits, kw = _build(T, E, cf, kw, seed=2)

    def fn(x):
        w, ids = expert_choice_topk(x, k, cf, backend="reference", **kw)
        return w, ids

    compiled = torch.compile(fn, fullgraph=True)
    _assert_identical(compiled(logits), fn(logits))
    _assert_identical(compiled(logits), _reference(logits, k, cf, kw))


@pytest.mark.parametrize("dynamic", [None, True, False])
def test_compile_fullgraph_changing_inputs(dynamic):
    """Changing T, T' (tensor and int), capacity factor and bias under one compiled function;
    the float/int arguments may arrive as SymFloat/SymInt (dynamic=True)."""
    torch._dynamo.reset()

    def fn(x, bias, ntnp, cf, min_tokens):
        w, ids = expert_choice_topk(
            x, 4, cf, scoring_func="sigmoid", num_expert_group=4, topk_group=2,
            correction_bias=bias, routed_scaling_factor=2.5,
            apply_routed_scaling_factor_on_output=True, num_token_non_padded=ntnp,
            min_tokens=min_tokens, backend="reference")
        return w * 1.0, ids  # something traced around the op

    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic)
    g = torch.Generator().manual_seed(3)
    cases = [(40, torch.tensor(33), 1.25, 0), (40, torch.tensor(12), 1.25, 16),
             (56, torch.tensor(56), 1.5, 0), (56, 20, 1.5, 0), (56, 9, 2.0, 16),
             (8, None, 1.25, 0)]
    for T, ntnp, cf, mt in cases:
        x = torch.randn(T, 16, generator=g)
        bias = torch.randn(16, generator=g) * 0.1
        _assert_identical(compiled(x, bias, ntnp, cf, mt), fn(x, bias, ntnp, cf, mt))


def test_compile_fullgraph_auto_backend_on_cpu(monkeypatch):
    """``backend="auto"`` reads SGLANG_MOE_EC_BACKEND in the traced face without a graph break."""
    monkeypatch.delenv("SGLANG_MOE_EC_BACKEND", raising=False)
    torch._dynamo.reset()

    def fn(x, n):
        return expert_choice_topk(x, 2, num_token_non_padded=n, min_tokens=4)

    compiled = torch.compile(fn, fullgraph=True)
    x = torch.randn(30, 8)
    n = torch.tensor(25)
    ref = expert_choice_topk_reference(x, RoutingSpec(2, min_tokens=4), n)
    _assert_identical(compiled(x, n), ref)


def test_compiled_graph_holds_one_op_call():
    """Dynamo records the routing as a single call of the custom op."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def fn(x):
        return expert_choice_topk(x, 4, 1.25, backend="reference")

    torch.compile(fn, fullgraph=True, backend=backend)(torch.randn(20, 16))
    assert len(graphs) == 1
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert sum("sglang_moe_routing.expert_choice_topk" in t for t in targets) == 1, targets
    assert not any("sort" in t for t in targets), targets  # the reference is not traced


def test_fake_tensor_shapes():
    with FakeTensorMode():
        logits = torch.empty(37, 64, dtype=torch.bfloat16)
        bias = torch.empty(64)
        n = torch.empty((), dtype=torch.int64)
        w, ids = expert_choice_topk_op(
            logits, 6, 1.25, True, "sigmoid", 8, 4, bias, 2.5, True, 16, n, None, "cuda")
        assert w.shape == (37, 6) and w.dtype == torch.float32
        assert ids.shape == (37, 6) and ids.dtype == torch.int32
        assert w.device == logits.device == ids.device


def test_meta_tensors_through_the_face():
    logits = torch.empty(11, 32, device="meta")
    n = torch.empty((), dtype=torch.int64, device="meta")
    w, ids = expert_choice_topk(logits, 3, 1.25, num_token_non_padded=n)
    assert w.device.type == ids.device.type == "meta"
    assert w.shape == ids.shape == (11, 3)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    # fake dtypes match the real ones for every input dtype
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        x = torch.randn(9, 8).to(dtype)
        rw, rids = expert_choice_topk_reference(x, RoutingSpec(2))
        mw, mids = expert_choice_topk(x.to("meta"), 2)
        assert (mw.dtype, mids.dtype) == (rw.dtype, rids.dtype)
        assert mw.shape == rw.shape and mids.shape == rids.shape


def test_face_still_validates_eagerly():
    x = torch.randn(8, 4)
    with pytest.raises(ValueError, match="top_k"):
        expert_choice_topk(x, 5)
    with pytest.raises(ValueError, match="capacity_factor"):
        expert_choice_topk(x, 2, float("nan"))
    with pytest.raises(ValueError, match="router_logits must be"):
        expert_choice_topk(torch.randn(8), 2)
    with pytest.raises(ValueError, match="backend"):
        expert_choice_topk(x, 2, backend="fast")
    with pytest.raises(ValueError, match="backend"):
        expert_choice_topk_op(x, 2, 1.25, True, "softmax", None, None, None, None, False,
                              0, None, None, "auto")  # the op takes a resolved backend only


def test_grad_requiring_logits_bypass_the_op_and_stay_differentiable():
    x = torch.randn(24, 8, requires_grad=True)
    w, ids = expert_choice_topk(x, 2, 1.25, num_token_non_padded=20)
    xr = x.detach().clone().requires_grad_()
    rw, rids = expert_choice_topk_reference(xr, RoutingSpec(2, 1.25), 20)
    _assert_identical((w.detach(), ids), (rw.detach(), rids))
    assert w.requires_grad
    gw = torch.randn_like(w)
    (w * gw).sum().backward()
    (rw * gw).sum().backward()
    assert torch.equal(x.grad, xr.grad)
    with torch.no_grad():  # no graph wanted: through the op
        w2, _ = expert_choice_topk(x, 2, 1.25, num_token_non_padded=20)
    assert not w2.requires_grad and torch.equal(w2, rw.detach())


# ----------------------------------------------------------------------------- out-of-range warning


class _CudaLike:
    """Only what ``resolve_backend`` reads from the logits: ``is_cuda``, ``dim()``, ``shape``."""

    is_cuda = True

    def __init__(self, num_tokens, num_experts):
        self.shape = torch.Size([num_tokens, num_experts])

    def dim(self):
        return 2


@pytest.fixture
def range_log(monkeypatch, caplog):
    monkeypatch.setattr(dispatch, "_warned_outside_range", set())
    monkeypatch.delenv("SGLANG_MOE_EC_BACKEND", raising=False)
    pkg_logger = logging.getLogger("sglang_moe_routing")
    pkg_logger.addHandler(caplog.handler)  # in case the plugin stopped propagation
    try:
        with caplog.at_level(logging.WARNING, logger="sglang_moe_routing"):
            yield caplog
    finally:
        pkg_logger.removeHandler(caplog.handler)


def _range_records(caplog):
    # A record reaches the capture handler twice when the logger also propagates: dedupe.
    unique = {id(r): r for r in caplog.records}.values()
    return [r for r in unique if "outside the CUDA/Triton kernels' range" in r.getMessage()]


def _range_messages(caplog):
    return [r.getMessage() for r in _range_records(caplog)]


def test_out_of_range_cuda_inputs_warn_once_per_shape(range_log, monkeypatch):
    def no_probe():
        raise AssertionError("the kernels' availability must not be probed out of range")

    monkeypatch.setattr(dispatch, "_cuda_backend_available", no_probe)
    monkeypatch.setattr(dispatch, "_triton_backend_available", no_probe)
    big_e = _CudaLike(64, 1024)
    for _ in range(3):
        assert dispatch.resolve_backend(big_e, 8) == "reference"
    assert dispatch.resolve_backend(_CudaLike(7, 1024), 8) == "reference"  # other T, same (E, k)
    msgs = _range_messages(range_log)
    assert len(msgs) == 1, msgs
    assert msgs[0] == (
        "sglang-moe-routing: expert choice with E=1024, k=8 is outside the CUDA/Triton kernels' "
        "range (E <= 512, k <= 32): the PyTorch reference runs instead (several times slower; "
        "see docs/benchmarks.md)"
    )
    assert all(r.name == "sglang_moe_routing" and r.levelno == logging.WARNING
               for r in _range_records(range_log))

    # k > 32 with E in range: a new shape, one more warning naming it
    for _ in range(2):
        assert dispatch.resolve_backend(_CudaLike(16, 256), 40) == "reference"
    msgs = _range_messages(range_log)
    assert len(msgs) == 2 and "E=256, k=40" in msgs[1]


def test_no_range_warning_when_not_auto_or_not_cuda(range_log):
    cpu = torch.randn(4, 1024)
    assert dispatch.resolve_backend(cpu, 8) == "reference"  # CPU: the reference is the plan
    assert dispatch.resolve_backend(_CudaLike(4, 1024), 8, "reference") == "reference"
    # forced: the kernel raises its own clear error
    assert dispatch.resolve_backend(_CudaLike(4, 1024), 8, "triton") == "triton"
    w, ids = expert_choice_topk(cpu, 8)
    assert w.shape == (4, 8)
    assert _range_messages(range_log) == []


def test_range_warning_is_skipped_inside_a_compile_trace(range_log):
    """Logging would break a fullgraph trace: skipped while tracing (and not marked as said)."""
    torch._dynamo.reset()

    def fn(x):
        dispatch._warn_outside_kernel_range(1024, 8)
        return x * 2

    out = torch.compile(fn, fullgraph=True)(torch.ones(3))
    assert torch.equal(out, torch.full((3,), 2.0))
    assert _range_messages(range_log) == []
    assert dispatch._warned_outside_range == set()
    dispatch._warn_outside_kernel_range(1024, 8)  # eager: said once
    dispatch._warn_outside_kernel_range(1024, 8)
    assert len(_range_messages(range_log)) == 1
