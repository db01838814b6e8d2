"""Expert load statistics and routing-quality measures (tensor ops, no host sync)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch


@dataclass
class ExpertLoadStats:
    """Load of one routing call. ``tokens_per_expert``: ``[E]`` int64 (on device)."""

    tokens_per_expert: torch.Tensor

    @property
    def std(self) -> float:
        return float(self.tokens_per_expert.float().std(unbiased=False))

    @property
    def max_over_mean(self) -> float:
        t = self.tokens_per_expert.float()
        mean = t.mean()
        return float(t.max() / mean) if float(mean) > 0 else float("nan")

    def summary(self) -> str:
        return (
            f"tokens/expert min={int(self.tokens_per_expert.min())} "
            f"max={int(self.tokens_per_expert.max())} std={self.std:.2f} "
            f"max/mean={self.max_over_mean:.2f}"
        )


def expert_load(
    topk_ids: torch.Tensor,
    num_experts: int,
    num_token_non_padded: Optional[Union[torch.Tensor, int]] = None,
) -> torch.Tensor:
    """Tokens per expert over the valid rows: ``[E]`` int64, computed on device.

    Args:
        topk_ids: ``[T, k]`` int ids in ``[0, E)`` (``-1`` entries are ignored).
        num_token_non_padded: ``T'``; rows ``>= T'`` are ignored.
    """
    t = topk_ids.shape[0]
    ids = topk_ids.long()
    keep = ids >= 0
    if num_token_non_padded is not None:
        tv = torch.as_tensor(num_token_non_padded, device=ids.device).reshape(())
        keep = keep & (torch.arange(t, device=ids.device) < tv).unsqueeze(1)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, torch.where(keep, ids, num_experts).flatten(),
                        torch.ones_like(ids).flatten())
    return counts[:num_experts]


def routing_fidelity(
    weight_scores: torch.Tensor, ec_ids: torch.Tensor, tc_ids: torch.Tensor
) -> torch.Tensor:
    """Share of token-choice score mass that expert choice keeps, per token.

    ``sum(s[t, ec_ids[t]]) / sum(s[t, tc_ids[t]])``: 1.0 means EC kept the token's own top-k.

    Args:
        weight_scores: ``[T, E]`` fp32 scores (softmax/sigmoid).
        ec_ids, tc_ids: ``[T, k]`` ids.
    Returns:
        ``[T]`` fp32 in ``(0, 1]``.
    """
    ec = torch.gather(weight_scores, 1, ec_ids.long()).sum(-1)
    tc = torch.gather(weight_scores, 1, tc_ids.long()).sum(-1)
    return ec / tc
