"""End-to-end smoke test: ``python -m sglang.launch_server --enable-expert-choice`` on a tiny
random-weight Qwen3-MoE, tokens back from /generate.

On a CUDA machine the server runs as usual. Without CUDA it runs on the CPU with
``--device cpu --attention-backend torch_native --dtype float32`` (SGLang's torch-native paths,
not its CPU engine, which needs a CPU build of sgl-kernel that PyPI does not ship). Two things
keep other CPU set-ups from serving, both outside this project:

* SGLang's RoPE layer imports ``vllm._custom_ops.rotary_embedding`` on non-CUDA hosts at
  construction; it is never called on the torch-native path, so the test puts a stub ``vllm``
  on the server's PYTHONPATH whose function raises if it ever is called.
* Qwen2-MoE's shared-expert gate is a Triton kernel with no CPU driver, so Qwen3-MoE (no
  shared expert) is the model here.
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


def _tiny_model(path, dtype):
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=2,
        num_experts=8, num_experts_per_tok=2, vocab_size=256, max_position_embeddings=512,
        torch_dtype=str(dtype).replace("torch.", ""),
    )
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(cfg).to(dtype).save_pretrained(path)


@pytest.mark.slow
def test_launch_server_with_expert_choice_generates(tmp_path):
    import torch

    cuda = torch.cuda.is_available()
    if cuda and not _sgl_kernel_loads():
        pytest.skip("sgl_kernel cannot load on this machine (SGLang cannot serve here)")
    model = tmp_path / "tiny_qwen3_moe"
    _tiny_model(model, torch.bfloat16 if cuda else torch.float32)
    port = _free_port()
    env = {**os.environ}
    device_args = ["--mem-fraction-static", "0.3"]
    if not cuda:
        shim = tmp_path / "shim" / "vllm"
        shim.mkdir(parents=True)
        (shim / "__init__.py").write_text("")
        (shim / "_custom_ops.py").write_text(
            "def rotary_embedding(*a, **k):\n"
            "    raise NotImplementedError('test stub: must not be called on CPU')\n"
        )
        env["PYTHONPATH"] = os.pathsep.join(
            [str(tmp_path / "shim")] + [p for p in [env.get("PYTHONPATH")] if p]
        )
        device_args = ["--device", "cpu", "--attention-backend", "torch_native",
                       "--dtype", "float32"]
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model),
         "--skip-tokenizer-init", "--host", "127.0.0.1", "--port", str(port),
         "--enable-expert-choice", "--expert-choice-min-tokens", "1", *device_args],
        stdout=log, stderr=subprocess.STDOUT, env=env,
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
        else:
            pytest.fail("server did not become healthy in 600 s")
        body = json.dumps({"input_ids": list(range(1, 40)),
                           "sampling_params": {"max_new_tokens": 8, "temperature": 0}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/generate", data=body,
                                     headers={"Content-Type": "application/json"})
        out = json.loads(urllib.request.urlopen(req, timeout=120).read())
        assert len(out["output_ids"]) == 8
        text = (tmp_path / "server.log").read_text()
        assert "expert-choice routing: ON" in text
        assert "routes with expert choice" in text
        assert "expert-choice kernels ready" in text  # built before the first forward
    finally:
        proc.terminate()
        proc.wait(timeout=60)
