"""End-to-end smoke test: ``python -m sglang.launch_server --enable-expert-choice`` on a tiny
random-weight Qwen2-MoE, tokens back from /generate.

Needs a machine where SGLang can serve: sglang installed and ``sgl_kernel`` loadable (a CUDA
GPU; SGLang's CPU engine needs a CPU build of sgl-kernel, which PyPI does not ship, so on
CPU-only machines this test is skipped -- see docs/expert_choice.md).
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("sglang")


def _sgl_kernel_loads() -> bool:
    r = subprocess.run([sys.executable, "-c", "import sgl_kernel"], capture_output=True)
    return r.returncode == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_model(path):
    import torch
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, num_experts=8, num_experts_per_tok=2, vocab_size=256,
        max_position_embeddings=512, torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    Qwen2MoeForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)


@pytest.mark.gpu
@pytest.mark.slow
def test_launch_server_with_expert_choice_generates(tmp_path):
    if not _sgl_kernel_loads():
        pytest.skip("sgl_kernel cannot load on this machine (SGLang cannot serve here)")
    model = tmp_path / "tiny_qwen2_moe"
    _tiny_model(model)
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model),
         "--skip-tokenizer-init", "--host", "127.0.0.1", "--port", str(port),
         "--enable-expert-choice", "--expert-choice-min-tokens", "1",
         "--mem-fraction-static", "0.3"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ},
    )
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-4000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except Exception:
                time.sleep(3)
        body = json.dumps({"input_ids": list(range(1, 40)),
                           "sampling_params": {"max_new_tokens": 8, "temperature": 0}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/generate", data=body,
                                     headers={"Content-Type": "application/json"})
        out = json.loads(urllib.request.urlopen(req, timeout=120).read())
        assert len(out["output_ids"]) == 8
        text = (tmp_path / "server.log").read_text()
        assert "expert-choice routing: ON" in text
        assert "routes with expert choice" in text
    finally:
        proc.terminate()
        proc.wait(timeout=60)
