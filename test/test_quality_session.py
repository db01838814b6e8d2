"""benchmark/quality_session.sh end to end on the CPU (``QUALITY_TINY=1``, about a minute on 2
cores): data once, a token-choice and an expert-choice Qwen3-MoE trained from the same seed, the
EC model held to the TC model's step count (issue 11 item 5 compares the two at equal
training), both evaluated, one plot."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_session_trains_both_models_to_the_same_step_count(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    env = {**os.environ, "QUALITY_TINY": "1", "OUT": str(tmp_path / "out"),
           "PYTHON": sys.executable,  # this interpreter (CI calls .venv/bin/python, not PATH's)
           "QUALITY_WORK": str(tmp_path / "work"),
           "PYTHONPATH": os.pathsep.join([str(REPO / "python"), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(["bash", "benchmark/quality_session.sh"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    log = (tmp_path / "out" / "session.log").read_text()
    assert r.returncode == 0, log[-3000:] + r.stderr[-2000:]
    steps = [int(s) for s in re.findall(r"\[train\] stopped: \w+ after (\d+) steps", log)]
    assert len(steps) == 2, log[-3000:]
    tc_steps, ec_steps = steps
    assert f"at most {tc_steps} steps like TC" in log
    assert 0 < ec_steps <= tc_steps
    for name in ("tc_quality.json", "ec_quality.json", "quality.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0, name
    tc = json.loads((tmp_path / "out" / "tc_quality.json").read_text())
    ec = json.loads((tmp_path / "out" / "ec_quality.json").read_text())
    assert (tc["trained_with"], ec["trained_with"]) == ("tc", "ec")
    # each eval names the routing path it took (SGLang's TopK here on the CPU, where sglang is)
    assert ec["routing_path"] and ec["rows"]
