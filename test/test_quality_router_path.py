"""``--router-path`` of benchmark/eval_routing_quality.py (CPU).

The ``sglang`` path (SGLang's own ``TopK`` per MoE layer with our plugin's hooks) and the
``dispatch`` path (our ``expert_choice_topk`` / ``token_choice_topk_reference``) give identical
expert ids and weights (to 1e-6) on every router call of a Qwen3-MoE forward, for token choice,
EC cf 1.25 and the hybrid rule (both below and above its 32-token switch); the sglang path
really runs upstream's ``select_experts`` for token choice and the plugin's hook for EC; the
eval's report names the path and per-mode rows agree between the two paths; and
``--router-path sglang`` without sglang stops with one line. Set up for device cuda, SGLang's
``TopK.forward_cuda`` (run here on CPU tensors, EC modes: token choice there needs sgl_kernel)
finds the 1-rank tp_group it reads and equals ``expert_choice_topk`` exactly.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmark"))

import eval_routing_quality as erq  # noqa: E402
import quality_modes as qm  # noqa: E402
from sglang_moe_routing.expert_choice import expert_choice_topk  # noqa: E402

HYBRID = next(m for m in qm.DEFAULT_MODES if m.name.startswith("hybrid"))
MODES = [qm.DEFAULT_MODES[0], next(m for m in qm.DEFAULT_MODES if m.name == "ec1.25"), HYBRID]
CPU = torch.device("cpu")


def _tiny_model(norm_topk_prob: bool):
    """A random-weight transformers Qwen3-MoE with train_moe_lm.py's config keys, tiny."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(
        vocab_size=96, hidden_size=32, intermediate_size=32, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=norm_topk_prob,
        decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=256,
        tie_word_embeddings=False, use_sliding_window=False,
        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = Qwen3MoeForCausalLM(cfg).eval()
    model.set_experts_implementation("eager")
    return model


@pytest.fixture
def sglang_path():  # per test: the eval's own SglangTopK resets the published server args
    pytest.importorskip("sglang")
    path, sg, note = qm.resolve_router_path("sglang", CPU)
    assert path == "sglang" and sg is not None
    yield sg
    sg.__exit__(None, None, None)


def _routed(model, x, state, monkeypatch):
    """Every router call's ``(weights, ids)`` and the logits of one forward under ``state``."""
    calls = []
    real = qm.route

    def spy(router, logits, st, hidden_states=None):
        w, i = real(router, logits, st, hidden_states)
        calls.append((w.float().clone(), i.long().clone()))
        return w, i

    monkeypatch.setattr(qm, "route", spy)
    with torch.no_grad(), qm.patch_routers(model, state):
        logits = model(input_ids=x, output_router_logits=False).logits
    monkeypatch.setattr(qm, "route", real)
    return calls, logits


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_sglang_topk_equals_dispatch(sglang_path, monkeypatch, norm_topk_prob):
    from sglang.srt.layers.moe import topk as sgl_topk

    from sglang_moe_routing.integration import expert_choice_hooks as ech

    model = _tiny_model(norm_topk_prob)
    layers = model.config.num_hidden_layers
    hook_calls = []
    real_hook = ech.route_expert_choice
    monkeypatch.setattr(ech, "route_expert_choice",
                        lambda *a, **k: hook_calls.append(1) or real_hook(*a, **k))
    g = torch.Generator().manual_seed(1)
    ids_by = {}
    for shape in ((4, 16), (2, 8)):  # T=64 >= the hybrid's 32 tokens (EC), T=16 < 32 (TC)
        x = torch.randint(0, 96, shape, generator=g)
        for mode in MODES:
            ref, ref_logits = _routed(model, x, qm.RoutingState(mode), monkeypatch)
            hook_calls.clear()
            got, got_logits = _routed(model, x, qm.RoutingState(mode, sglang=sglang_path),
                                      monkeypatch)
            assert len(ref) == len(got) == layers
            for (rw, ri), (gw, gi) in zip(ref, got):
                assert gi.shape == (x.numel(), 2)
                assert torch.equal(gi, ri), (mode.name, x.numel())
                torch.testing.assert_close(gw, rw, rtol=0, atol=1e-6)
            torch.testing.assert_close(got_logits, ref_logits, rtol=0, atol=1e-5)
            # the sglang path ran the plugin's EC hook exactly when EC is in force
            ec_on = mode.kind == "ec" and x.numel() >= mode.min_tokens
            assert len(hook_calls) == (layers if ec_on else 0), (mode.name, x.numel())
            ids_by[(mode.name, x.numel())] = [i for _, i in got]
    # SGLang's own TopK layers (one per MoE layer, Qwen3-MoE's config) did the routing
    built = list(sglang_path._layers.values())
    assert all(isinstance(m, sgl_topk.TopK) for m in built)
    assert {m.layer_id for m in built} == set(range(layers))
    assert all(m.topk_config.renormalize == norm_topk_prob and m.topk_config.scoring_func
               == "softmax" and not m.topk_config.use_grouped_topk for m in built)
    # guards: EC really differs from TC at T=64; the hybrid is TC at T=16 and EC at T=64
    assert any(not torch.equal(a, b) for a, b in zip(ids_by[("ec1.25", 64)], ids_by[("tc", 64)]))
    assert all(torch.equal(a, b) for a, b in zip(ids_by[(HYBRID.name, 16)], ids_by[("tc", 16)]))
    assert all(torch.equal(a, b)
               for a, b in zip(ids_by[(HYBRID.name, 64)], ids_by[("ec1.25", 64)]))


@pytest.fixture
def sglang_cuda_path():
    """The eval's sglang path set up for device cuda (here on the CPU: TopK's layers are built
    and published as on the GPU; the tests call ``TopK.forward_cuda`` on CPU tensors)."""
    pytest.importorskip("sglang")
    path, sg, note = qm.resolve_router_path("sglang", torch.device("cuda"))
    assert path == "sglang" and sg is not None
    yield sg
    sg.__exit__(None, None, None)


def _forward_cuda_vs_dispatch(sg, mode, backend, renormalize, monkeypatch):
    """``TopK.forward_cuda`` of the sglang path (mode's section, ``backend``) and our
    ``expert_choice_topk`` on the same CPU logits ``[64, 8]``, k = 2; and the EC hook's calls."""
    from sglang_moe_routing.integration import expert_choice_hooks as ech

    hook_calls = []
    real_hook = ech.route_expert_choice
    monkeypatch.setattr(ech, "route_expert_choice",
                        lambda *a, **k: hook_calls.append(1) or real_hook(*a, **k))
    logits = torch.randn(64, 8, generator=torch.Generator().manual_seed(3))
    sg.set_mode(mode, backend)
    try:
        out = sg.layer(0, 2, renormalize).forward_cuda(logits, logits)
    finally:
        sg.set_mode(None)
    w_ref, i_ref = expert_choice_topk(
        logits, 2, mode.capacity_factor, renormalize=renormalize, scoring_func="softmax",
        min_tokens=mode.min_tokens, backend=backend)
    return (out.topk_weights, out.topk_ids), (w_ref, i_ref), len(hook_calls)


# Token choice (and the hybrid below its switch) is upstream's select_experts, whose CUDA branch
# calls sgl_kernel's topk_softmax: not runnable on the CPU, so only EC modes drive forward_cuda.
EC_MODES = [m for m in qm.DEFAULT_MODES if m.kind == "ec"]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_topk_forward_cuda_runs_and_equals_dispatch(sglang_cuda_path, monkeypatch, backend,
                                                    renormalize):
    """SGLang's TopK CUDA branch (standard output: ``use_symmetric_memory(tp_group)`` around
    ``select_experts``) routes through the plugin's hook, equal to our dispatch function."""
    assert {m.name for m in EC_MODES} >= {"ec1.0", "ec1.25", "ec2.0", HYBRID.name}
    ids = {}
    for mode in EC_MODES:
        (w, i), (w_ref, i_ref), hooked = _forward_cuda_vs_dispatch(
            sglang_cuda_path, mode, backend, renormalize, monkeypatch)
        assert hooked == 1, mode.name  # 64 tokens >= the hybrid's 32: EC in force
        assert i.shape == (64, 2) and torch.equal(i.long(), i_ref.long()), mode.name
        assert w.dtype == w_ref.dtype and torch.equal(w, w_ref), mode.name
        ids[mode.name] = i.long()
    assert not torch.equal(ids["ec1.0"], ids["ec2.0"])  # the section's capacity reached the hook


def test_tp_group_override_only_for_cuda_and_undone(sglang_path):
    """The 1-rank tp_group is stated inside SglangTopK(cuda) only and gone after exit; SglangTopK
    (cpu) (TopK.forward_native, no tp_group read) leaves it unwritten."""
    from sglang.srt.runtime_context import get_parallel

    unwritten = r"parallel name 'tp_group' has not been written"
    with pytest.raises(RuntimeError, match=unwritten):
        get_parallel().tp_group  # noqa: B018 - inside the cpu path (the fixture)
    with qm.SglangTopK(torch.device("cuda")):
        group = get_parallel().tp_group
        assert (group.world_size, group.rank_in_group) == (1, 0)
    with pytest.raises(RuntimeError, match=unwritten):
        get_parallel().tp_group  # noqa: B018


def test_forward_cuda_without_the_override_raises(sglang_cuda_path, monkeypatch):
    """Guard: the equality test above fails on the bug (no tp_group in this process)."""
    sglang_cuda_path.__exit__(None, None, None)
    monkeypatch.setattr(qm, "one_rank_tp_group", contextlib.nullcontext)
    with qm.SglangTopK(torch.device("cuda")) as sg:
        with pytest.raises(RuntimeError, match=r"parallel name 'tp_group' has not been written"):
            _forward_cuda_vs_dispatch(sg, EC_MODES[0], "reference", True, monkeypatch)


def _eval_inputs(tmp_path):
    """The tiny model, random token streams (train/val x code/prose), small eval settings."""
    rng = np.random.default_rng(0)
    streams = {s: {d: rng.integers(1, 96, 4096).astype(np.int64) for d in ("code", "prose")}
               for s in ("train", "val")}
    common = ["--ckpt", str(tmp_path), "--device", "cpu", "--seq-len", "32", "--eval-seqs", "4",
              "--compositions", "64:2x32,16:2x8", "--modes", "tc,ec1.25,hybrid,thr",
              "--inv-prompts", "1", "--inv-trials", "2", "--inv-batch", "2",
              "--cal-seqs", "2", "--cal-iters", "20", "--timing-tokens="]
    return _tiny_model(True), streams, common


def test_eval_report_names_the_path_and_rows_agree(sglang_path, tmp_path):
    model, streams, common = _eval_inputs(tmp_path)
    res = {}
    for path in ("dispatch", "sglang"):
        res[path] = erq.main(common + ["--out", str(tmp_path / path), "--router-path", path],
                             model=model, streams=streams)
    md = (tmp_path / "sglang" / "routing_quality.md").read_text()
    js = json.loads((tmp_path / "sglang" / "routing_quality.json").read_text())
    assert "Routing path: SGLang " in md and "own TopK" in js["routing_path"]
    assert "thr is not a plugin mode" in js["routing_path"]
    # the start-up probe: random logits through both paths, identical on CPU (fp32)
    assert set(js["router_probe"]) == {"tc", "ec1.0", "ec1.25", "ec1.5", "ec2.0", HYBRID.name}
    assert all(p["ids_identical"] == 1.0 and p["max_abs_dweight"] <= 1e-6
               for p in js["router_probe"].values())
    assert "Router probe" in md and res["dispatch"]["router_probe"] is None
    assert "our dispatch function" in res["dispatch"]["routing_path"]
    assert "--router-path dispatch" in res["dispatch"]["routing_path"]
    rows = {p: {(r["composition"], r["mode"]): r for r in res[p]["rows"]} for p in res}
    assert rows["sglang"].keys() == rows["dispatch"].keys() and len(rows["sglang"]) == 8
    for key, r in rows["sglang"].items():
        d = rows["dispatch"][key]
        assert r["router_path"] == ("dispatch" if r["mode"] == "thr" else "sglang TopK")
        assert d["router_path"] == "dispatch"
        assert r["ppl"] == pytest.approx(d["ppl"], rel=1e-6), key
        assert r["load_max_mean"] == d["load_max_mean"], key
        assert r["top1_agree_tc"] == d["top1_agree_tc"], key


def test_topk_failure_on_the_device(sglang_path, tmp_path, monkeypatch):
    """SGLang's TopK raising at the start-up probe: auto goes on with the dispatch path and
    says why; --router-path sglang stops with one line."""
    model, streams, common = _eval_inputs(tmp_path)
    common = [a if a != "64:2x32,16:2x8" else "64:2x32" for a in common]
    common[common.index("tc,ec1.25,hybrid,thr")] = "tc,ec1.25"

    def broken(self, *a, **k):
        raise RuntimeError("no kernel\nfor this device")

    monkeypatch.setattr(qm.SglangTopK, "route", broken)
    with pytest.raises(SystemExit, match=r"^error: --router-path sglang: SGLang's TopK failed "
                       r"on cpu \(RuntimeError: no kernel for this device\)$"):
        erq.main(common + ["--out", str(tmp_path / "s"), "--router-path", "sglang"],
                 model=model, streams=streams)
    res = erq.main(common + ["--out", str(tmp_path / "a"), "--router-path", "auto"],
                   model=model, streams=streams)
    assert "our dispatch function" in res["routing_path"]
    assert "SGLang's TopK failed on cpu (RuntimeError: no kernel" in res["routing_path"]
    assert res["router_probe"] is None and len(res["rows"]) == 2
    assert all(r["router_path"] == "dispatch" for r in res["rows"])


def test_auto_falls_back_and_sglang_fails_in_one_line_without_sglang(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "sglang", None)  # `import sglang` raises ImportError
    path, sg, note = qm.resolve_router_path("auto", CPU)
    assert (path, sg) == ("dispatch", None) and "sglang not importable" in note
    assert "[--router-path auto: sglang not importable" in erq.routing_path_text(path, sg, note)
    with pytest.raises(SystemExit, match=r"^error: --router-path sglang: sglang is not "
                       r"importable .*use --router-path dispatch$"):
        erq.main(["--ckpt", str(tmp_path / "absent"), "--router-path", "sglang",
                  "--device", "cpu"])
    # the command line: exit status 1, one line on stderr, nothing loaded first
    code = ("import runpy, sys; sys.modules['sglang'] = None; sys.argv = ['eval', '--ckpt', "
            f"{str(tmp_path / 'absent')!r}, '--router-path', 'sglang', '--device', 'cpu']; "
            "runpy.run_path('benchmark/eval_routing_quality.py', run_name='__main__')")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --router-path sglang: sglang is not "
                                                   "importable"), proc.stderr
