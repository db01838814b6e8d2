"""benchmark/train_moe_lm.py + benchmark/eval_routing_quality.py on CPU (--tiny settings).

One short training run (module-scoped) on the real stdlib corpus, then: the outputs exist, the
validation loss is finite and went down from step 0, the patched router (our routing
functions) reproduces transformers' own token-choice logits EXACTLY, the hybrid rule with
``min_tokens > T`` is exactly token choice, every batch composition routes exactly T rows per
forward, and the eval produces its table rows.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

BENCH = Path(__file__).resolve().parents[1] / "benchmark"
sys.path.insert(0, str(BENCH))

import eval_routing_quality as erq  # noqa: E402
import train_moe_lm as tml  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe_tiny")
    result = tml.main(["--tiny", "--out", str(out), "--device", "cpu", "--max-steps", "60",
                       "--eval-every", "20", "--patience", "100"])
    return out, result


def _model(out: Path):
    from transformers import Qwen3MoeForCausalLM

    m = Qwen3MoeForCausalLM.from_pretrained(out / "model", dtype=torch.float32).eval()
    m.set_experts_implementation("eager")
    return m


def _val_batch(out: Path, result, n: int = 4, seq: int = 64) -> torch.Tensor:
    tok = tml.load_tokenizer(out / "tokenizer.json")
    stream = tml.encode_docs(tok, tml.collect_corpus(
        __import__("argparse").Namespace(**result["args"]))["val"]["code"])
    return torch.from_numpy(tml.fixed_windows(stream, n, seq).astype(np.int64))


def test_training_outputs(trained):
    out, result = trained
    assert (out / "model" / "model.safetensors").is_file()
    assert (out / "model" / "config.json").is_file()
    assert (out / "tokenizer.json").is_file()
    log = json.loads((out / "train_log.json").read_text())
    hist = log["val_history"]
    assert hist[0]["step"] == 0 and hist[-1]["step"] == 60
    assert all(math.isfinite(h["val_loss"]) for h in hist)
    assert hist[-1]["val_loss"] < hist[0]["val_loss"] - 0.5
    # held-out split is by file and disjoint from training
    corpus = tml.collect_corpus(__import__("argparse").Namespace(**log["args"]))
    train_files = {d.rel for dom in corpus["train"].values() for d in dom}
    val_files = {d.rel for dom in corpus["val"].values() for d in dom}
    assert val_files and not (train_files & val_files)
    assert corpus["train"]["prose"] and corpus["val"]["code"]


def test_patched_token_choice_is_exactly_transformers(trained):
    out, result = trained
    model = _model(out)
    x = _val_batch(out, result)
    with torch.no_grad():
        ref = model(input_ids=x, output_router_logits=False).logits
        with erq.patch_routers(model, erq.RoutingState(erq.Mode("tc", "tc"))) as st:
            got = model(input_ids=x, output_router_logits=False).logits
        assert st.rows == {x.numel()}
        assert len(st.counts) == model.config.num_hidden_layers
        # the patch is gone afterwards
        again = model(input_ids=x, output_router_logits=False).logits
    assert torch.equal(got, ref)
    assert torch.equal(again, ref)
    # hybrid with min_tokens > T: exactly token choice, through the EC dispatch function
    hybrid = erq.Mode("hybrid-big", "ec", 1.0, x.numel() + 1)
    with torch.no_grad(), erq.patch_routers(model, erq.RoutingState(hybrid)):
        got_h = model(input_ids=x, output_router_logits=False).logits
    assert torch.equal(got_h, ref)
    # real expert choice (min_tokens 0) does change the logits
    with torch.no_grad(), erq.patch_routers(model, erq.RoutingState(erq.Mode("ec", "ec", 1.0))):
        got_ec = model(input_ids=x, output_router_logits=False).logits
    assert not torch.equal(got_ec, ref)


def test_chunked_compositions_route_exactly_T(trained):
    out, result = trained
    model = _model(out)
    x = _val_batch(out, result, n=4, seq=32)
    full, _ = erq.forward_logprobs(model, x, 32)
    st = erq.RoutingState(erq.Mode("tc", "tc"))
    with erq.patch_routers(model, st):
        chunked, _ = erq.forward_logprobs(model, x, 8)
    assert st.rows == {4 * 8}
    assert len(st.counts) == model.config.num_hidden_layers * 4
    torch.testing.assert_close(chunked, full, atol=1e-4, rtol=1e-4)


def test_eval_table(trained, tmp_path):
    out, result = trained
    comps = "32:4x8,256:2x128,mixed256:2x128"
    res = erq.main(["--ckpt", str(out), "--out", str(tmp_path), "--tiny", "--device", "cpu",
                    "--compositions", comps, "--eval-seqs", "4", "--inv-trials", "3"])
    md = (tmp_path / "routing_quality.md").read_text()
    js = json.loads((tmp_path / "routing_quality.json").read_text())
    assert "our dispatch function" in md and "our dispatch function" in js["routing_path"]
    modes = [m.name for m in erq.DEFAULT_MODES]
    assert [(r["composition"], r["mode"]) for r in res["rows"]] == [
        (c, m) for c in ("32", "256", "mixed256") for m in modes]
    for r in res["rows"]:
        assert r["rows_per_forward"] == [r["T"]]
        assert math.isfinite(r["ppl"]) and r["load_max_mean"] >= 1.0
        assert r["ppl_code"] is not None and r["ppl_prose"] is not None
        assert f"| {r['mode']} |" in md
        if r["mode"] == "tc":
            assert r["top1_agree_tc"] == 1.0 and r["dppl_pct"] == 0.0
    # the mixed composition puts both domains in every batch; pure ones one domain
    assert "code+prose mixed" in md
    tc_ppl = {r["composition"]: r["ppl"] for r in res["rows"] if r["mode"] == "tc"}
    assert max(tc_ppl.values()) / min(tc_ppl.values()) - 1 < 1e-3  # TC: batch-independent
    inv = {r["mode"]: r for r in res["invariance"]}
    assert inv["tc"]["max_abs_dlogprob"] < 1e-4
    assert set(inv) == set(modes)
    # hybrid at T >= 32 is expert choice at cf 1.25
    by = {(r["composition"], r["mode"]): r for r in res["rows"]}
    hyb = erq.DEFAULT_MODES[-1].name
    assert by[("256", hyb)]["ppl"] == by[("256", "ec1.25")]["ppl"]
