"""``eval_routing_quality.py --batch-invariant-ops`` on the CPU: the flag's one-line errors
(no CUDA, no sglang), and the plumbing of the second batch-invariance pass with a fake
``set_batch_invariant_mode`` built like SGLang's (a generator context manager without
``try/finally`` that leaves ``torch.bmm`` patched): the pass runs inside it, with eager experts
and one sdpa backend, for tc / ec1.25 / thr only; the experts implementation, ``torch.bmm``
and the mode come back afterwards, also when the pass fails; the report gets its section.
And SGLang's real context manager and kernels, Triton-interpreted on the CPU (emulation:
registered on the CPU key); the measurement on the GPU is ``test/test_batch_invariance_gpu.py``.
"""

from __future__ import annotations

import contextlib
import json
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from test_quality_router_path import CPU, _eval_inputs, _tiny_model  # noqa: E402

import eval_routing_quality as erq  # noqa: E402
import quality_modes as qm  # noqa: E402
import quality_invariance as qi  # noqa: E402


class FakeBiOps:
    """Stands in for SGLang's ``set_batch_invariant_mode``: same shape (no try/finally around
    its yield, ``torch.bmm`` replaced on enable and not put back by the context manager)."""

    def __init__(self):
        self.active = False
        self.entered = 0

    @contextlib.contextmanager
    def __call__(self, enabled=True):
        assert enabled is True
        self.entered += 1
        self.active = True
        torch.bmm = lambda *a, **k: pytest.fail("torch.bmm left patched")
        yield
        self.active = False  # skipped when the body raises, as in SGLang


@pytest.fixture
def bmm_guard():
    bmm = torch.bmm
    yield bmm
    torch.bmm = bmm


def test_cpu_device_fails_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: --batch-invariant-ops needs a CUDA device "
                       r"\(SGLang's batch-invariant ops are Triton kernels on the CUDA dispatch "
                       r"key\); the eval runs on cpu$"):
        erq.main(["--ckpt", str(tmp_path / "absent"), "--device", "cpu",
                  "--batch-invariant-ops"])


def test_without_sglang_fails_in_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "sglang.srt.batch_invariant_ops", None)
    with pytest.raises(SystemExit) as err:
        erq.load_batch_invariant_ops(torch.device("cuda"))
    msg = str(err.value)
    assert msg.startswith("error: --batch-invariant-ops: sglang.srt.batch_invariant_ops is not "
                          "importable (ModuleNotFoundError") and "\n" not in msg


def _spy(monkeypatch, model, fake, fail=False):
    """Records (inside the fake mode?, experts implementation, sdpa backends) per forward."""
    calls = []
    real = erq.forward_logprobs

    def spy(m, x, chunk):
        flash = torch.backends.cuda.flash_sdp_enabled()
        calls.append((fake.active, model.config._experts_implementation,
                      (flash, torch.backends.cuda.mem_efficient_sdp_enabled(),
                       torch.backends.cuda.math_sdp_enabled())))
        if fail and fake.active:
            raise RuntimeError("kernel\nbroke")
        return real(m, x, chunk)

    monkeypatch.setattr(erq, "forward_logprobs", spy)
    monkeypatch.setattr(qi, "forward_logprobs", spy)  # the invariance passes' forwards
    return calls


def test_second_pass_runs_inside_the_mode_and_restores(tmp_path, monkeypatch, capsys, bmm_guard):
    model, streams, common = _eval_inputs(tmp_path)
    model.set_experts_implementation("batched_mm")
    fake = FakeBiOps()
    monkeypatch.setattr(erq, "load_batch_invariant_ops", lambda device: fake)
    calls = _spy(monkeypatch, model, fake)
    res = erq.main(common + ["--out", str(tmp_path / "o"), "--router-path", "dispatch",
                             "--batch-invariant-ops"], model=model, streams=streams)
    # tc, ec1.25 and thr of tc,ec1.25,hybrid,thr; hybrid only in the normal pass
    assert [r["mode"] for r in res["invariance"]] == ["tc", "ec1.25", qm.DEFAULT_MODES[5].name,
                                                       "thr"]
    bi = res["invariance_bi"]
    assert [r["mode"] for r in bi] == ["tc", "ec1.25", "thr"]
    for r in bi:
        assert r["ops"] == "sglang batch-invariant" and r["experts"] == "eager"
        assert r["attention"] == "sdpa FLASH_ATTENTION only" and r["dtype"] == "float32"
        assert r["prompts"] == 1 and r["trials"] == 2 and r["batch_seqs"] == 2
    assert not any(s.startswith("invariance_bi") for s in res["skipped"])
    inside = [c for c in calls if c[0]]
    # one sdpa probe forward, then 3 modes x 1 prompt x 2 trials
    assert len(inside) == 1 + 3 * 2 and fake.entered == 1
    assert all(c[1] == "eager" and c[2] == (True, False, False) for c in inside)
    outside = [c for c in calls if not c[0]]
    assert outside and all(c[1] == "batched_mm" and c[2] == (True, True, True) for c in outside)
    # afterwards: the implementation, torch.bmm and the mode are back
    assert model.config._experts_implementation == "batched_mm"
    assert torch.bmm is bmm_guard and not fake.active
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    out = capsys.readouterr().out
    assert "[eval] invariance(bi-ops) tc " in out and "[eval] invariance(bi-ops) hybrid" not in out
    md = (tmp_path / "o" / "routing_quality.md").read_text()
    assert ("Batch invariance with SGLang's batch-invariant ops (sglang batch-invariant: "
            "set_batch_invariant_mode(True); experts eager, attention sdpa FLASH_ATTENTION only, "
            "float32") in md
    section = md.split("Batch invariance with SGLang's")[1]
    assert [ln.split(" | ")[0] for ln in section.splitlines() if ln.startswith("| ") and
            "seqs" in ln] == ["| tc", "| ec1.25", "| thr"]
    js = json.loads((tmp_path / "o" / "routing_quality.json").read_text())
    assert [r["mode"] for r in js["invariance_bi"]] == ["tc", "ec1.25", "thr"]


def test_without_the_flag_nothing_changes(tmp_path, monkeypatch):
    model, streams, common = _eval_inputs(tmp_path)
    monkeypatch.setattr(erq, "load_batch_invariant_ops",
                        lambda device: pytest.fail("loaded without the flag"))
    common[common.index("tc,ec1.25,hybrid,thr")] = "tc"
    res = erq.main(common + ["--out", str(tmp_path / "o"), "--router-path", "dispatch",
                             "--compositions", "64:2x32"], model=model, streams=streams)
    assert "invariance_bi" not in res
    assert "batch-invariant ops" not in (tmp_path / "o" / "routing_quality.md").read_text()


def test_failure_inside_the_mode_is_skipped_and_cleaned_up(tmp_path, monkeypatch, bmm_guard):
    model, streams, common = _eval_inputs(tmp_path)
    model.set_experts_implementation("batched_mm")
    fake = FakeBiOps()
    _spy(monkeypatch, model, fake, fail=True)
    seqs = np.random.default_rng(0).integers(1, 96, (4, 32))
    result = {"skipped": []}
    args = erq.build_parser().parse_args(["--ckpt", "x", "--inv-prompts", "1", "--inv-trials",
                                          "2", "--inv-batch", "2"])
    modes = [m for m in qm.DEFAULT_MODES if m.name in erq.BI_MODES]
    erq.run_invariance_bi(result, model, fake, modes, seqs, args, CPU, {}, float("inf"), None)
    assert result["invariance_bi"] == []
    why = ("(RuntimeError: no sdpa backend runs the model (FLASH_ATTENTION: kernel broke; "
           "EFFICIENT_ATTENTION: kernel broke; MATH: kernel broke))")
    assert result["skipped"] == [f"invariance_bi/{m} {why}" for m in ("tc", "ec1.25", "thr")]
    assert not fake.active and torch.bmm is bmm_guard
    assert model.config._experts_implementation == "batched_mm"
    # the time cap: nothing enters the mode, every mode is listed
    result = {"skipped": []}
    erq.run_invariance_bi(result, model, fake, modes, seqs, args, CPU, {}, 0.0, None)
    assert result["skipped"] == ["invariance_bi/tc", "invariance_bi/ec1.25", "invariance_bi/thr"]
    assert fake.entered == 1


def test_sglang_ops_interpreted_on_cpu(monkeypatch, bmm_guard):
    """SGLang's own ``set_batch_invariant_mode`` and Triton kernels (interpreted, registered on
    the CPU key for this test; its ``mean_dim`` kernel refuses CPU tensors and is replaced by a
    plain sum) through :func:`batch_invariant_ops_run`: token choice is bitwise invariant, EC
    cf 1.25 changes the prompt's routing; afterwards aten's CPU kernels, ``torch.bmm`` (which
    SGLang's context manager leaves patched) and the experts implementation are back."""
    if torch.cuda.is_available():
        pytest.skip("CPU-only emulation (test/test_batch_invariance_gpu.py runs the real one)")
    bio = pytest.importorskip("sglang.srt.batch_invariant_ops.batch_invariant_ops")
    monkeypatch.setattr(bio, "get_dispatch_device_backend", lambda: "CPU")
    monkeypatch.setattr(bio, "get_device_core_count", lambda *a: 4)
    monkeypatch.setattr(bio, "mean_dim", lambda x, d, keepdim=False:
                        x.sum(d, keepdim=keepdim) / x.shape[d])
    mm_calls = []
    real_mm = bio.matmul_persistent
    monkeypatch.setattr(bio, "matmul_persistent",
                        lambda *a, **k: mm_calls.append(a[0].shape) or real_mm(*a, **k))
    model = _tiny_model(True)
    model.set_experts_implementation("batched_mm")
    seqs = np.random.default_rng(0).integers(1, 96, (12, 32)).astype(np.int64)
    modes = [m for m in qm.DEFAULT_MODES if m.name in ("tc", "ec1.25")]
    probe = torch.from_numpy(seqs[:4])
    with erq.batch_invariant_ops_run(model, bio.set_batch_invariant_mode, probe) as settings:
        assert bio.is_batch_invariant_mode_enabled() and torch.bmm is not bmm_guard
        rows = {r["mode"]: r for r in erq.batch_invariance(
            model, modes, seqs, 2, 3, 4, CPU, "reference", 0)}
    assert settings["mm_kernel"] == "Triton persistent matmul" and settings["experts"] == "eager"
    # every linear went through SGLang's kernel, per expert with varying row counts
    assert len(mm_calls) > 50 and len({s[0] for s in mm_calls}) > 3
    assert rows["tc"]["max_abs_dlogprob"] == 0.0 and rows["tc"]["routing_changed"] == 0.0
    assert rows["ec1.25"]["routing_changed"] > 0.0
    assert not bio.is_batch_invariant_mode_enabled() and torch.bmm is bmm_guard
    assert model.config._experts_implementation == "batched_mm"
    n = len(mm_calls)
    model(input_ids=probe[:1])
    assert len(mm_calls) == n  # aten's own mm again
