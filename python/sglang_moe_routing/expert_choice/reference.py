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

from typing import Optional, Tuple, Union

import torch

from sglang_moe_routing.expert_choice.spec import RoutingSpec, check_spec, validate_inputs

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
    weight_scores: torch.Tensor, topk_ids: torch.Tensor, spec: RoutingSpec
) -> torch.Tensor:
    """Step 5: gather ``s``, renormalise, scale. Returns ``[T, k]`` fp32."""
    w = torch.gather(weight_scores, 1, topk_ids)
    if spec.renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    scale = spec.output_scale()
    if scale is not None:
        w = w * scale
    return w


def _scores(router_logits: torch.Tensor, spec: RoutingSpec) -> Tuple[torch.Tensor, torch.Tensor]:
    """Step 1: ``(select_scores, weight_scores)``, the selection scores group-masked."""
    bias = spec.correction_bias
    weight_scores, select_scores = compute_scores(router_logits, spec.scoring_func, bias)
    if spec.num_expert_group is not None:
        select_scores = mask_groups(
            select_scores, spec.num_expert_group, spec.topk_group, biased=bias is not None
        )
    return select_scores, weight_scores


def expert_choice_topk_reference(
    router_logits: torch.Tensor,
    spec: RoutingSpec,
    num_token_non_padded: Optional[Union[torch.Tensor, int]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Expert-choice routing (see the module docstring for the contract).

    Args:
        router_logits: ``[T, E]`` bf16/fp16/fp32, any strides.
        spec: the layer's routing (``RoutingSpec``: k, capacity factor, scoring, ...).
        num_token_non_padded: ``T'`` (int or 0-d/1-element tensor); ``None`` = all rows.
    Returns:
        ``(topk_weights [T, k] float32, topk_ids [T, k] int32)``.
    """
    validate_inputs(router_logits, spec)
    top_k = spec.top_k
    num_tokens, num_experts = router_logits.shape
    device = router_logits.device
    if num_tokens == 0:
        return (
            torch.empty(0, top_k, dtype=torch.float32, device=device),
            torch.empty(0, top_k, dtype=torch.int32, device=device),
        )

    select_scores, weight_scores = _scores(router_logits, spec)
    t_valid = num_valid_tokens(num_tokens, num_token_non_padded, device)
    valid_rows = torch.arange(num_tokens, device=device) < t_valid
    cap = capacity(t_valid, num_experts, top_k, spec.capacity_factor, spec.min_tokens)
    picked = expert_pick_mask(select_scores, valid_rows, cap)
    topk_ids = token_select(select_scores, picked, top_k)
    topk_weights = finalize_weights(weight_scores, topk_ids, spec)
    return topk_weights, topk_ids.to(torch.int32)


def token_choice_topk_reference(
    router_logits: torch.Tensor, spec: RoutingSpec
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Standard token-choice top-k with the same scoring (the baseline EC is compared to);
    ``spec.capacity_factor`` and ``spec.min_tokens`` are not used.

    Same ordering rule as EC's fallback (score desc, expert id asc). Returns
    ``(topk_weights [T, k] float32, topk_ids [T, k] int32)``.
    """
    num_tokens, num_experts = router_logits.shape
    check_spec(spec, num_experts, token_choice=True)
    select_scores, weight_scores = _scores(router_logits, spec)
    no_pick = torch.zeros_like(select_scores, dtype=torch.bool)
    topk_ids = token_select(select_scores, no_pick, spec.top_k)
    topk_weights = finalize_weights(weight_scores, topk_ids, spec)
    return topk_weights, topk_ids.to(torch.int32)
