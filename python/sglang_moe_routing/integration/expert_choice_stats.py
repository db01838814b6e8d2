"""Expert-choice load statistics (``--expert-choice-stats-interval``): per-layer
tokens-per-expert counters accumulated on the device, and the log line.

The routing hook (``expert_choice_hooks.route_expert_choice``) adds each layer's ids; the
``ModelRunner.forward`` wrapper (``expert_choice_hooks._around_model_runner_forward``) counts
served passes and calls :func:`log_stats_now` every N of them.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Dict, Optional

import torch

from sglang_moe_routing.integration import config

logger = logging.getLogger("sglang_moe_routing")


class LoadStatsCollector:
    """Per-layer tokens-per-expert counters, accumulated on the device (no host sync).

    Only used when expert choice is on and ``--expert-choice-stats-interval`` > 0; the
    counters are read (one sync) when a log line is due.
    """

    def __init__(self) -> None:
        self.counts: Dict[int, torch.Tensor] = {}
        self.passes = 0  # served forward passes since the last log line
        self.dirty = False  # counts hold capture / warm-up traffic (reset before serving)
        self.served = False  # a served forward pass has run (earlier counts were dropped)
        self._lock = threading.Lock()

    def add(self, layer_id: int, topk_ids: torch.Tensor, num_experts: int,
            num_token_non_padded: Optional[torch.Tensor]) -> None:
        from sglang_moe_routing.expert_choice.stats import expert_load

        with self._lock:
            buf = self.counts.get(layer_id)
            if buf is None or buf.shape[0] != num_experts or buf.device != topk_ids.device:
                if config.capturing_cuda_graph():
                    # No kernel may run here (a zero-fill would be recorded into the graph
                    # and wipe the counts at every replay): allocate only; the reset at the
                    # first served forward pass zeroes it outside any capture.
                    buf = torch.empty(num_experts, dtype=torch.int64, device=topk_ids.device)
                    self.dirty = True
                else:
                    buf = torch.zeros(num_experts, dtype=torch.int64, device=topk_ids.device)
                self.counts[layer_id] = buf
        # In place, so a captured CUDA graph keeps accumulating into the same buffer on replay.
        buf.add_(expert_load(topk_ids, num_experts, num_token_non_padded))

    def summary(self) -> Dict[int, Dict[str, Any]]:
        """``{layer_id: {tokens_per_expert, std, max_over_mean}}`` (reads the device)."""
        out = {}
        with self._lock:
            items = sorted(self.counts.items())
        for layer_id, counts in items:
            c = counts.double().cpu()
            mean = c.mean().item()
            out[layer_id] = {
                "tokens_per_expert": c.long().tolist(),
                "std": c.std(unbiased=False).item(),
                "max_over_mean": (c.max().item() / mean) if mean > 0 else float("nan"),
            }
        return out

    def reset(self) -> None:
        """Zero the counters in place (buffers captured in CUDA graphs stay valid)."""
        with self._lock:
            for buf in self.counts.values():
                buf.zero_()
            self.passes = 0
            self.dirty = False


_stats = LoadStatsCollector()


def get_expert_choice_load_stats() -> Dict[int, Dict[str, Any]]:
    """Per-layer load of the expert-choice calls since the last reset (public API)."""
    return _stats.summary()


def reset_expert_choice_load_stats() -> None:
    _stats.reset()


def log_stats_now() -> None:
    """Log one line per layer with the counts since the last line, then reset (one host sync)."""
    n = _stats.passes
    summary = _stats.summary()
    _stats.reset()
    if not summary or all(sum(s["tokens_per_expert"]) == 0 for s in summary.values()):
        return  # no expert-choice traffic in the window (e.g. every batch below min-tokens)
    for lid, s in summary.items():
        logger.info(
            "expert-choice load layer %d (last %d forward passes): tokens=%d std=%.2f "
            "max/mean=%.2f tokens/expert=%s",
            lid, n, sum(s["tokens_per_expert"]), s["std"], s["max_over_mean"],
            s["tokens_per_expert"],
        )
