"""Expert-choice (EC) routing: the plain-PyTorch reference (the spec and the test oracle).

Contract (``shared/design.md``): given router logits ``[T, E]`` and the layer's TopK config,

1. scores ``s`` are the per-token scores standard routing uses (softmax or sigmoid). With a
   ``correction_bias`` the *selection* score is ``s + bias`` while weights use ``s``. With
   grouped top-k, experts outside the token's ``topk_group`` best groups get selection
   score ``-inf`` (groups ranked as upstream SGLang ranks them: the max score of the group
   without a bias, the sum of the group's two best biased scores with one).
2. capacity ``C = min(T', ceil(cf * T' * k / E))`` where ``T'`` is the number of valid
   (non-padding) rows; padding rows never count and are never picked. Hybrid mode: when
   ``T' < min_tokens`` the capacity is ``T'`` (every expert takes every eligible token), which
   makes the result exactly token choice -- decided on the device, no host sync.
3. each expert picks its top-``C`` valid tokens by selection score (ties: lower token index);
   a token whose selection score for that expert is ``-inf`` (or NaN) is never picked.
4. each token keeps the ``k`` best experts (by selection score) among those that picked it;
   free slots take its best remaining experts by selection score (no duplicates, no -1 ids,
   no zero-weight slots).
5. weights are ``s`` at the chosen experts, renormalised when ``renormalize``, then multiplied
   by ``routed_scaling_factor`` when ``apply_routed_scaling_factor_on_output`` (as upstream).

Output: ``(topk_weights float32 [T, k], topk_ids int32 [T, k])`` -- SGLang's standard TopK
output. Row order within ``k``: experts that picked the token first (best first), then the
fallback experts (best first). Padding rows (index >= T') get plain token-choice routing of
their own logits (they are masked downstream) and never influence valid rows.

Everything is tensor code: no ``.item()``, no data-dependent Python branching, so it runs
under CUDA-graph capture with a changing ``num_token_non_padded`` tensor.
NaN logits: NaN selection scores rank below every finite score (never picked, chosen last in
the fallback); the weights carry the NaN, as token-choice routing would.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

SCORING_FUNCS = ("softmax", "sigmoid")


def validate_routing_args(
    num_tokens: int,
    num_experts: int,
    top_k: int,
    capacity_factor: float,
    scoring_func: str,
    num_expert_group: Optional[int],
    topk_group: Optional[int],
    min_tokens: int = 0,
) -> None:
    """Raise ``ValueError`` with a clear message for arguments no routing can honour."""
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"expert choice: top_k must be a positive int, got {top_k!r}")
    if top_k > num_experts:
        raise ValueError(
            f"expert choice: top_k={top_k} exceeds the number of experts E={num_experts}"
        )
    if not isinstance(capacity_factor, (int, float)) or not math.isfinite(capacity_factor):
        raise ValueError(
            f"expert choice: capacity_factor must be a finite number, got {capacity_factor!r}"
        )
    if capacity_factor <= 0:
        raise ValueError(
            f"expert choice: capacity_factor must be > 0, got {capacity_factor}"
        )
    if not isinstance(min_tokens, int) or min_tokens < 0:
        raise ValueError(f"expert choice: min_tokens must be an int >= 0, got {min_tokens!r}")
    if scoring_func not in SCORING_FUNCS:
        raise ValueError(
            f"expert choice: scoring_func must be one of {SCORING_FUNCS}, got {scoring_func!r}"
        )
    if (num_expert_group is None) != (topk_group is None):
        raise ValueError(
            "expert choice: num_expert_group and topk_group must be given together"
        )
    if num_expert_group is not None:
        if num_expert_group < 1 or num_experts % num_expert_group != 0:
            raise ValueError(
                f"expert choice: E={num_experts} is not divisible into "
                f"num_expert_group={num_expert_group} groups"
            )
        if not 1 <= topk_group <= num_expert_group:
            raise ValueError(
                f"expert choice: topk_group={topk_group} must be in [1, {num_expert_group}]"
            )
        if top_k > topk_group * (num_experts // num_expert_group):
            raise ValueError(
                f"expert choice: top_k={top_k} exceeds the experts in topk_group={topk_group} "
                f"groups of {num_experts // num_expert_group}"
            )


def validate_inputs(
    router_logits: torch.Tensor,
    top_k: int,
    capacity_factor: float,
    scoring_func: str,
    num_expert_group: Optional[int],
    topk_group: Optional[int],
    correction_bias: Optional[torch.Tensor],
    min_tokens: int = 0,
) -> None:
    """Tensor and argument checks every implementation shares (clear ``ValueError``s)."""
    if router_logits.dim() != 2:
        raise ValueError(
            f"expert choice: router_logits must be [T, E], got shape {tuple(router_logits.shape)}"
        )
    if not router_logits.is_floating_point():
        raise ValueError(
            f"expert choice: router_logits must be floating point, got {router_logits.dtype}"
        )
    num_tokens, num_experts = router_logits.shape
    validate_routing_args(
        num_tokens, num_experts, top_k, capacity_factor, scoring_func,
        num_expert_group, topk_group, min_tokens,
    )
    if correction_bias is not None and correction_bias.shape != (num_experts,):
        raise ValueError(
            f"expert choice: correction_bias must have shape [{num_experts}], "
            f"got {tuple(correction_bias.shape)}"
        )


def compute_scores(
    router_logits: torch.Tensor,
    scoring_func: str = "softmax",
    correction_bias: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token scores.

    Args:
        router_logits: ``[T, E]`` any float dtype.
        scoring_func: ``"softmax"`` or ``"sigmoid"``.
        correction_bias: optional ``[E]``; added for selection only.
    Returns:
        ``(weight_scores [T, E] fp32, select_scores [T, E] fp32)``.
    """
    logits = router_logits.float()
    if scoring_func == "softmax":
        scores = torch.softmax(logits, dim=-1)
    else:
        scores = torch.sigmoid(logits)
    select = scores if correction_bias is None else scores + correction_bias.float()
    return scores, select


def mask_groups(
    select_scores: torch.Tensor,
    num_expert_group: int,
    topk_group: int,
    biased: bool,
) -> torch.Tensor:
    """Grouped top-k: experts outside each token's best ``topk_group`` groups get ``-inf``.

    Group score as upstream SGLang: max of the group's scores (``grouped_topk``), or the sum
    of its two best biased scores (``biased_grouped_topk``). Groups are ranked best first;
    equal group scores go to the lower group index (upstream's ``torch.topk`` leaves that
    unspecified) and a NaN group score ranks as ``+inf``.

    Args:
        select_scores: ``[T, E]`` fp32.
    Returns:
        ``[T, E]`` fp32, masked.
    """
    t, e = select_scores.shape
    grouped = select_scores.view(t, num_expert_group, e // num_expert_group)
    if biased:
        group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)
    else:
        group_scores = grouped.max(dim=-1).values
    # Deterministic group choice (torch.topk leaves ties unspecified): best first, equal
    # scores -> lower group index; a NaN group score ranks as +inf.
    group_key = torch.nan_to_num(
        group_scores, nan=float("inf"), posinf=float("inf"), neginf=float("-inf")
    )
    group_idx = torch.sort(group_key, dim=-1, descending=True, stable=True).indices[
        :, :topk_group
    ]
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool)
    group_mask.scatter_(1, group_idx, True)
    expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(t, e)
    return select_scores.masked_fill(~expert_mask, float("-inf"))


def capacity(
    num_valid: torch.Tensor,
    num_experts: int,
    top_k: int,
    capacity_factor: float,
    min_tokens: int = 0,
) -> torch.Tensor:
    """``C = min(T', ceil(cf * T' * k / E))`` as a 0-d int64 tensor (no host sync).

    ``T' < min_tokens`` gives ``C = T'`` (hybrid: exactly token choice).
    Computed in float64 so the ceil is exact for every T' < 2**40.
    """
    tv = num_valid.to(torch.float64)
    c = torch.ceil(tv * (capacity_factor * top_k / num_experts) - 1e-9)
    c = torch.minimum(c, tv)
    c = torch.where(tv < min_tokens, tv, c)
    return c.to(torch.int64)


def num_valid_tokens(
    num_tokens: int,
    num_token_non_padded: Optional[Union[torch.Tensor, int]],
    device: torch.device,
) -> torch.Tensor:
    """``T'`` as a 0-d int64 tensor on ``device``, clamped to ``[0, T]``."""
    # torch.full is a device fill (capturable); torch.tensor(int, device=cuda) would be a
    # host-to-device copy, which CUDA-graph capture rejects.
    if num_token_non_padded is None:
        return torch.full((), num_tokens, dtype=torch.int64, device=device)
    if not isinstance(num_token_non_padded, torch.Tensor):
        num_token_non_padded = torch.full((), int(num_token_non_padded), dtype=torch.int64, device=device)
    tv = torch.as_tensor(num_token_non_padded, device=device).reshape(()).to(torch.int64)
    return tv.clamp(0, num_tokens)


def expert_pick_mask(
    select_scores: torch.Tensor, valid_rows: torch.Tensor, cap: torch.Tensor
) -> torch.Tensor:
    """Step 3: ``picked[t, e]`` = expert ``e`` takes token ``t`` among its top-``cap``.

    Args:
        select_scores: ``[T, E]`` fp32 (``-inf``/NaN = not eligible).
        valid_rows: ``[T]`` bool.
        cap: 0-d int64 capacity.
    Returns:
        ``[T, E]`` bool.
    """
    eligible = valid_rows.unsqueeze(1) & (select_scores > float("-inf"))
    key = torch.where(eligible, select_scores, torch.full_like(select_scores, float("-inf")))
    # Descending stable sort over tokens: equal scores keep the lower token index first.
    order = torch.sort(key, dim=0, descending=True, stable=True).indices  # [T, E]
    rank = torch.empty_like(order)
    ar = torch.arange(key.shape[0], device=key.device).unsqueeze(1).expand_as(order)
    rank.scatter_(0, order, ar)
    return eligible & (rank < cap)


def token_select(
    select_scores: torch.Tensor, picked: torch.Tensor, top_k: int
) -> torch.Tensor:
    """Step 4: per token, picked experts first (best first), then the best others.

    Args:
        select_scores: ``[T, E]`` fp32.
        picked: ``[T, E]`` bool.
    Returns:
        ``topk_ids [T, k]`` int64.
    """
    key = torch.nan_to_num(select_scores, nan=float("-inf"))
    # Two stable sorts = lexicographic order (picked desc, score desc, expert id asc).
    by_score = torch.sort(key, dim=1, descending=True, stable=True).indices
    picked_sorted = torch.gather(picked, 1, by_score).to(torch.int8)
    by_picked = torch.sort(picked_sorted, dim=1, descending=True, stable=True).indices
    return torch.gather(by_score, 1, by_picked[:, :top_k])


def finalize_weights(
    weight_scores: torch.Tensor,
    topk_ids: torch.Tensor,
    renormalize: bool,
    routed_scaling_factor: Optional[float],
    apply_routed_scaling_factor_on_output: bool,
) -> torch.Tensor:
    """Step 5: gather ``s``, renormalise, scale. Returns ``[T, k]`` fp32."""
    w = torch.gather(weight_scores, 1, topk_ids)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    if apply_routed_scaling_factor_on_output and routed_scaling_factor is not None:
        w = w * routed_scaling_factor
    return w


def expert_choice_topk_reference(
    router_logits: torch.Tensor,
    top_k: int,
    capacity_factor: float = 1.25,
    *,
    renormalize: bool = True,
    scoring_func: str = "softmax",
    num_expert_group: Optional[int] = None,
    topk_group: Optional[int] = None,
    correction_bias: Optional[torch.Tensor] = None,
    routed_scaling_factor: Optional[float] = None,
    apply_routed_scaling_factor_on_output: bool = False,
    num_token_non_padded: Optional[Union[torch.Tensor, int]] = None,
    min_tokens: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Expert-choice routing (see the module docstring for the contract).

    Args:
        router_logits: ``[T, E]`` bf16/fp16/fp32, any strides.
        top_k: experts per token ``k``.
        capacity_factor: ``cf > 0``.
        num_token_non_padded: ``T'`` (int or 0-d/1-element tensor); ``None`` = all rows.
        min_tokens: hybrid threshold; ``T' < min_tokens`` routes exactly as token choice.
    Returns:
        ``(topk_weights [T, k] float32, topk_ids [T, k] int32)``.
    """
    validate_inputs(
        router_logits, top_k, capacity_factor, scoring_func, num_expert_group, topk_group,
        correction_bias, min_tokens,
    )
    num_tokens, num_experts = router_logits.shape
    device = router_logits.device
    if num_tokens == 0:
        return (
            torch.empty(0, top_k, dtype=torch.float32, device=device),
            torch.empty(0, top_k, dtype=torch.int32, device=device),
        )

    weight_scores, select_scores = compute_scores(router_logits, scoring_func, correction_bias)
    if num_expert_group is not None:
        select_scores = mask_groups(
            select_scores, num_expert_group, topk_group, biased=correction_bias is not None
        )

    t_valid = num_valid_tokens(num_tokens, num_token_non_padded, device)
    valid_rows = torch.arange(num_tokens, device=device) < t_valid
    cap = capacity(t_valid, num_experts, top_k, capacity_factor, min_tokens)
    picked = expert_pick_mask(select_scores, valid_rows, cap)
    topk_ids = token_select(select_scores, picked, top_k)
    topk_weights = finalize_weights(
        weight_scores, topk_ids, renormalize, routed_scaling_factor,
        apply_routed_scaling_factor_on_output,
    )
    return topk_weights, topk_ids.to(torch.int32)


def token_choice_topk_reference(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    renormalize: bool = True,
    scoring_func: str = "softmax",
    num_expert_group: Optional[int] = None,
    topk_group: Optional[int] = None,
    correction_bias: Optional[torch.Tensor] = None,
    routed_scaling_factor: Optional[float] = None,
    apply_routed_scaling_factor_on_output: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Standard token-choice top-k with the same scoring (the baseline EC is compared to).

    Same ordering rule as EC's fallback (score desc, expert id asc). Returns
    ``(topk_weights [T, k] float32, topk_ids [T, k] int32)``.
    """
    num_tokens, num_experts = router_logits.shape
    validate_routing_args(
        num_tokens, num_experts, top_k, 1.0, scoring_func, num_expert_group, topk_group
    )
    weight_scores, select_scores = compute_scores(router_logits, scoring_func, correction_bias)
    if num_expert_group is not None:
        select_scores = mask_groups(
            select_scores, num_expert_group, topk_group, biased=correction_bias is not None
        )
    no_pick = torch.zeros_like(select_scores, dtype=torch.bool)
    topk_ids = token_select(select_scores, no_pick, top_k)
    topk_weights = finalize_weights(
        weight_scores, topk_ids, renormalize, routed_scaling_factor,
        apply_routed_scaling_factor_on_output,
    )
    return topk_weights, topk_ids.to(torch.int32)
