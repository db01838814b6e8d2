"""Read EPLB events out of an SGLang server log (benchmarks and GPU tests).

Multi-GPU schedulers prefix their lines with the rank (``[time TP0 EP0] ...``); rank-0 lines
are used where a log names ranks, every line otherwise (one GPU).

* :func:`rebalances`: upstream ``EPLBManager`` lines: ``[EPLBManager] rebalance start``,
  ``[EPLBManager] rebalance end time=1.234s`` (the duration upstream measures between two
  device synchronisations), ``[EPLBManager] Skipped ep rebalancing: ...`` (upstream's and
  this plugin's utilization threshold).
* :func:`balancedness_lines`: this plugin's line at every rebalance (rank 0, any algorithm):
  ``[EPLBManager] balancedness (...) before: tokens=0.912 compute=0.731 | after: ...``
  (modelled on the recorded window; ``compute`` only where the profiler has a fit).
* :func:`errors`: Python tracebacks and fatal lines.
"""

from __future__ import annotations

import re
from typing import Dict, List

_RANK = re.compile(r"\bTP(\d+)\b")
_END = re.compile(r"\[EPLBManager\] rebalance end(?: time=([\d.]+)s)?")
_BAL = re.compile(r"\[EPLBManager\] balancedness .*? before: (.*?) \| after: (.*?) \(algorithm=([\w-]+)\)")
_KV = re.compile(r"(\w+)=([\d.]+)")


def rank0_lines(text: str) -> List[str]:
    lines = text.splitlines()
    ranked = [ln for ln in lines if _RANK.search(ln)]
    if not ranked:
        return lines
    return [ln for ln in lines if (m := _RANK.search(ln)) is None or m.group(1) == "0"]


def rebalances(text: str) -> Dict[str, object]:
    """{'started', 'done', 'skipped', 'durations_s'} counted on rank 0."""
    lines = rank0_lines(text)
    durations = []
    done = 0
    for ln in lines:
        m = _END.search(ln)
        if m:
            done += 1
            if m.group(1):
                durations.append(float(m.group(1)))
    return {
        "started": sum("[EPLBManager] rebalance start" in ln for ln in lines),
        "done": done,
        "skipped": sum("Skipped ep rebalancing" in ln for ln in lines),
        "durations_s": durations,
    }


def balancedness_lines(text: str) -> List[Dict[str, object]]:
    """[{'before': {'tokens': .., 'compute': ..}, 'after': {...}, 'algorithm': ..}] per rebalance."""
    out = []
    for ln in rank0_lines(text):
        m = _BAL.search(ln)
        if m:
            out.append({"before": {k: float(v) for k, v in _KV.findall(m.group(1))},
                        "after": {k: float(v) for k, v in _KV.findall(m.group(2))},
                        "algorithm": m.group(3)})
    return out


def errors(text: str) -> List[str]:
    """First line of every traceback's last line (the exception) and fatal lines."""
    lines = text.splitlines()
    out = []
    for i, ln in enumerate(lines):
        if ln.startswith("Traceback (most recent call last)"):
            j = i + 1
            while j < len(lines) and (lines[j].startswith(" ") or not lines[j].strip()):
                j += 1
            out.append(lines[j][:300] if j < len(lines) else "Traceback")
        elif "Received sigquit" in ln or "CUDA error" in ln:
            out.append(ln[:300])
    return out
