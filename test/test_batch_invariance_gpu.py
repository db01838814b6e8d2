"""GPU (H200, sglang on PYTHONPATH): under SGLang's batch-invariant ops, as
``eval_routing_quality.py --batch-invariant-ops`` runs them (:func:`batch_invariant_ops_run`:
eager experts, one sdpa backend, fp32 weights with bf16 autocast), a tiny random Qwen3-MoE's
next-token log-probabilities of a prompt are bitwise identical across random batch mates under
token choice and under ``thr`` (per-token routing), while expert choice (cf 1.25) still changes
the prompt's routing with its batch mates. Routing through the dispatch path (no SGLang TopK).
Skips without CUDA or without ``sglang.srt.batch_invariant_ops``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from test_quality_router_path import _tiny_model  # noqa: E402

import eval_routing_quality as erq  # noqa: E402
import quality_modes as qm  # noqa: E402

pytestmark = pytest.mark.gpu


def test_token_choice_and_thr_bitwise_expert_choice_not():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    bio = pytest.importorskip("sglang.srt.batch_invariant_ops")
    dev = torch.device("cuda")
    model = _tiny_model(True).to(dev)
    model.set_experts_implementation("batched_mm")  # what the run must put back
    rng = np.random.default_rng(0)
    seqs = rng.integers(1, 96, (24, 64)).astype(np.int64)
    biases, _ = erq.calibrate_threshold(model, rng.integers(1, 96, (8, 64)), dev, "triton", 50)
    modes = [m for m in qm.DEFAULT_MODES if m.name in ("tc", "ec1.25", "thr")]
    bmm = torch.bmm
    probe = torch.from_numpy(seqs[:8]).to(dev)
    with erq.batch_invariant_ops_run(model, bio.set_batch_invariant_mode, probe) as settings:
        assert bio.is_batch_invariant_mode_enabled()
        assert model.config._experts_implementation == "eager"
        rows = {r["mode"]: r for r in erq.batch_invariance(
            model, modes, seqs, n_prompts=3, n_trials=4, batch=8, device=dev,
            backend="triton", seed=0, biases=biases)}
    print(settings, {m: (r["max_abs_dlogprob"], r["routing_changed"]) for m, r in rows.items()})
    assert settings["attention"].startswith("sdpa ") and settings["experts"] == "eager"
    assert settings["dtype"] == "float32 weights, bf16 autocast"
    for m in ("tc", "thr"):
        assert rows[m]["max_abs_dlogprob"] == 0.0 and rows[m]["bitwise_identical"], rows[m]
        assert rows[m]["routing_changed"] == 0.0, rows[m]
    assert rows["ec1.25"]["routing_changed"] > 0.0, rows["ec1.25"]
    # afterwards: the model's implementation, torch.bmm and aten's own kernels are back
    assert model.config._experts_implementation == "batched_mm"
    assert torch.bmm is bmm and not bio.is_batch_invariant_mode_enabled()
