"""Helpers for tests that run against the installed sglang (never imported by GPU tests)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sglang_moe_routing.integration.config import published_server_args as published_args

__all__ = ["published_args", "run_cpu_benchmark"]

REPO = Path(__file__).resolve().parents[1]


def run_cpu_benchmark(script: str, args, timeout: float, **env) -> subprocess.CompletedProcess:
    """``python benchmark/<script> args`` on the CPU with this checkout's ``python/`` first on
    PYTHONPATH (and ``env`` added); skips on a CUDA machine (the script's GPU command runs
    there)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CPU run; on a CUDA machine the GPU command in the docstring runs")
    full = {**os.environ, **env, "PYTHONPATH": os.pathsep.join(
        [str(REPO / "python")] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    return subprocess.run([sys.executable, str(REPO / "benchmark" / script), *map(str, args)],
                          env=full, capture_output=True, text=True, timeout=timeout)
