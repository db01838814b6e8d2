"""Shared test set-up: Triton runs in interpreter mode on machines without CUDA.

Must not import sglang (the GPU machine has none).
"""

import os

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    config.addinivalue_line(
        "markers",
        "server: starts real SGLang servers on the GPU (test/test_gpu_server.py; `-m server`)")
    config.addinivalue_line(
        "markers",
        "gpu_timing: times GPU kernels; needs the GPU to itself (skipped under pytest-xdist with "
        "more than one worker, where other workers' kernels share the GPU and the timings)",
    )


def pytest_collection_modifyitems(config, items):
    if not _HAS_CUDA:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
        return
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
        # Other workers' kernels share the GPU and enter the timed regions (a cost fit came
        # out flat: docs/benchmarks.md, appendix).
        shared = pytest.mark.skip(
            reason="GPU timing test under pytest-xdist: run it without -n (the GPU is shared)")
        for item in items:
            if "gpu_timing" in item.keywords:
                item.add_marker(shared)
