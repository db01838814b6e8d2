"""Start ``python -m sglang.launch_server`` in a subprocess and talk to it (``/generate``).

Used by the GPU server tests (``test/test_gpu_server.py``) and the serving benchmark
(``benchmark/bench_serving.py``). Requests send ``input_ids`` (checkpoints built by
``tools.models`` have no tokenizer; the server runs with ``--skip-tokenizer-init``).

    with Server(model_dir, ["--enable-expert-choice"], log_path="ec.log") as srv:
        out = srv.generate([[1, 2, 3]], max_new_tokens=8)   # -> [[ids...]]
        print(srv.log())

On a CUDA machine the server gets ``--attention-backend triton`` (the backend the GPU recipe
covers) unless the caller passes one; CUDA graphs stay on (SGLang's default). Without CUDA it
runs on the CPU with SGLang's torch-native paths (see ``test/test_server_smoke.py``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any, Dict, List, Optional, Sequence, Union

Ids = List[int]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def _cpu_shim(root: str) -> str:
    """A stub ``vllm._custom_ops`` (SGLang's RoPE imports it on non-CUDA hosts, never calls it)."""
    d = os.path.join(root, "vllm")
    os.makedirs(d, exist_ok=True)
    open(os.path.join(d, "__init__.py"), "w").close()
    with open(os.path.join(d, "_custom_ops.py"), "w") as f:
        f.write("def rotary_embedding(*a, **k):\n"
                "    raise NotImplementedError('stub: must not be called on CPU')\n")
    return root


class ServerError(RuntimeError):
    pass


class Server:
    """One ``launch_server`` process (its own process group, killed on exit)."""

    def __init__(self, model_path: str, args: Sequence[str] = (), *, log_path: Optional[str] = None,
                 env: Optional[Dict[str, str]] = None, timeout_s: float = 600,
                 mem_fraction: float = 0.3, plugin: bool = True,
                 wait_gpu_free: bool = False) -> None:
        self.model_path = str(model_path)
        self.args = list(args)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.timeout_s = timeout_s
        self.log_path = log_path or tempfile.mktemp(prefix="sglang_server_", suffix=".log")
        self.env = {**os.environ, **(env or {})}
        self.env.setdefault("SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND", "python")
        if not plugin:  # upstream SGLang alone: load no plugin at all
            self.env["SGLANG_PLUGINS"] = "__none__"
        self.cuda = cuda_available()
        self.mem_fraction = mem_fraction
        self.proc: Optional[subprocess.Popen] = None
        self.start_s: float = float("nan")
        self.wait_gpu_free = wait_gpu_free  # sequential runs: wait until the GPU is empty

    # ------------------------------------------------------------------ lifecycle
    def command(self) -> List[str]:
        cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", self.model_path,
               "--skip-tokenizer-init", "--host", "127.0.0.1", "--port", str(self.port)]
        has = lambda flag: any(a == flag or a.startswith(flag + "=") for a in self.args)
        if self.cuda:
            if not has("--attention-backend"):
                cmd += ["--attention-backend", "triton"]
            if not has("--mem-fraction-static"):
                cmd += ["--mem-fraction-static", str(self.mem_fraction)]
        else:
            cmd += ["--device", "cpu", "--attention-backend", "torch_native", "--dtype", "float32"]
        return cmd + self.args

    def start(self) -> "Server":
        if not self.cuda:
            shim = _cpu_shim(tempfile.mkdtemp(prefix="sglang_shim_"))
            self.env["PYTHONPATH"] = os.pathsep.join(
                [shim] + [p for p in [self.env.get("PYTHONPATH")] if p])
        t0 = time.time()
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT,
                                     env=self.env, start_new_session=True)
        while True:
            if self.proc.poll() is not None:
                raise ServerError(f"server exited with {self.proc.returncode} before it was "
                                  f"healthy; log tail:\n{self.log()[-6000:]}")
            try:
                urllib.request.urlopen(self.base + "/health", timeout=5)
                break
            except Exception:  # noqa: BLE001
                if time.time() - t0 > self.timeout_s:
                    self.stop()
                    raise ServerError(f"server not healthy after {self.timeout_s:.0f} s; "
                                      f"log tail:\n{self.log()[-6000:]}")
                time.sleep(1)
        self.start_s = time.time() - t0
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        self.resume()  # a stopped process group does not act on SIGTERM
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                pass
        self._log.close()
        self.proc = None
        if self.cuda and self.wait_gpu_free:  # the scheduler child may hold the GPU a moment
            _wait_gpu_free(30)

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def pause(self) -> None:
        """SIGSTOP the server's processes: an idle SGLang scheduler busy-polls a CPU core, which
        would disturb a timed server beside it. GPU memory stays allocated."""
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    # ------------------------------------------------------------------ requests
    def post(self, path: str, body: Dict[str, Any], timeout: float = 600) -> Any:
        req = urllib.request.Request(self.base + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            return json.loads(urllib.request.urlopen(req, timeout=timeout).read())
        except urllib.error.HTTPError as e:
            raise ServerError(f"{path} -> HTTP {e.code}: {e.read()[:2000]!r}") from None

    def generate(self, input_ids: Union[Ids, List[Ids]], max_new_tokens: int,
                 ignore_eos: bool = True, **sampling: Any) -> Union[Ids, List[Ids]]:
        """Greedy by default; a list of prompts is sent as one batch request."""
        out = self.generate_raw(input_ids, max_new_tokens, ignore_eos=ignore_eos, **sampling)
        if input_ids and isinstance(input_ids[0], list):
            return [o["output_ids"] for o in out]
        return out["output_ids"]

    def generate_raw(self, input_ids, max_new_tokens: int, ignore_eos: bool = True,
                     **sampling: Any) -> Any:
        params = {"max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": ignore_eos,
                  **sampling}
        return self.post("/generate", {"input_ids": input_ids, "sampling_params": params})


def start_all(servers: Sequence["Server"], stagger_s: float = 3.0) -> List[Optional[str]]:
    """Start servers concurrently (their import and graph-capture phases overlap); returns
    one error string (or None) per server. A server that failed on GPU memory (a race with
    the others) is retried once, alone."""
    import threading

    errors: List[Optional[str]] = [None] * len(servers)

    def run(i: int) -> None:
        try:
            servers[i].start()
        except Exception as e:  # noqa: BLE001
            errors[i] = str(e)

    threads = []
    for i in range(len(servers)):
        th = threading.Thread(target=run, args=(i,), daemon=True)
        th.start()
        threads.append(th)
        time.sleep(stagger_s)
    for th in threads:
        th.join()
    for i, err in enumerate(errors):
        if err is not None and re.search(r"out of memory|Not enough memory|OutOfMemory", err):
            servers[i].stop()
            servers[i].port = free_port()
            servers[i].base = f"http://127.0.0.1:{servers[i].port}"
            errors[i] = None
            run(i)
    return errors


def _wait_gpu_free(timeout_s: float) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        try:
            r = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=10)
        except Exception:  # noqa: BLE001
            return
        if not r.stdout.strip():
            return
        time.sleep(1)
