"""Expert-choice routing inside SGLang's ``TopK`` layer.

One AROUND hook on ``sglang.srt.layers.moe.topk.select_experts`` (the function every
``TopK.forward_*`` calls on the standard-output path). When expert choice is enabled and the
layer's config is one EC supports, the hook computes EC routing and then runs upstream's own
post-processing (``_post_process_topk_ids``: logical->physical EPLB mapping, routed-experts
capture, padding-row masking) and feeds upstream's expert distribution recorder, exactly as
standard routing does. Otherwise it calls upstream untouched. Every MoE model built on
``TopK`` (Qwen2/3-MoE, Mixtral, DeepSeek V2/V3, DBRX, OLMoE, ...) is covered without edits.

Opt-ins (any one enables it): ``--enable-expert-choice``, ``SGLANG_EXPERT_CHOICE=1``, or
``use_expert_choice: true`` in the model's HF config.

Only the model-config opt-in hook is registered at plugin load. The routing hooks
(``select_experts``, ``ModelRunner.load_model``) are registered by :func:`runtime_hooks` before
the model runner initialises, and only when expert choice is on; the load-statistics wrapper
of ``ModelRunner.forward`` only with ``--expert-choice-stats-interval`` > 0.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Dict, List, Optional

import torch

from sglang_moe_routing.expert_choice import RoutingSpec, expert_choice_route
from sglang_moe_routing.integration import config

# add_cli_args and parse_section: part of this feature module's interface to plugin.py
from sglang_moe_routing.integration.expert_choice_flags import (  # noqa: F401
    HF_CONFIG_CAPACITY_KEY,
    HF_CONFIG_KEY,
    SECTION,
    ExpertChoiceConfig,
    add_cli_args,
    config_from_values,
    parse_section,
)
from sglang_moe_routing.integration.expert_choice_stats import (  # noqa: F401 - public API here
    LoadStatsCollector,
    _stats,
    get_expert_choice_load_stats,
    log_stats_now,
    reset_expert_choice_load_stats,
)

logger = logging.getLogger("sglang_moe_routing")

# ------------------------------------------------------------------- the active config

_model_opt_in: Optional[Dict[str, Any]] = None  # set from the HF config of the loaded model
_env_fallback: Optional[ExpertChoiceConfig] = None


def active_config() -> ExpertChoiceConfig:
    """The EC config in effect in this process.

    Order: the section carried by ServerArgs (CLI + env, validated at start-up); else the
    environment alone (e.g. ``sglang.Engine(...)`` built without the CLI); then a model whose
    HF config says ``use_expert_choice: true`` turns it on.
    """
    global _env_fallback
    cfg = config.get_section(SECTION)
    if cfg is None:
        if _env_fallback is None:
            _env_fallback = config_from_values(False, None, None)
        cfg = _env_fallback
    if not cfg.enabled and _model_opt_in is not None:
        cfg = replace(
            cfg,
            enabled=True,
            source="model-config",
            capacity_factor=_model_opt_in.get("capacity_factor", cfg.capacity_factor),
        )
    return cfg


def _after_model_config_init(result, model_config, *args, **kwargs):
    """Record a model-config opt-in (``use_expert_choice`` in the HF config)."""
    global _model_opt_in
    hf = getattr(model_config, "hf_config", None)
    if hf is None or not getattr(hf, HF_CONFIG_KEY, False):
        return result
    opt: Dict[str, Any] = {}
    cf = getattr(hf, HF_CONFIG_CAPACITY_KEY, None)
    if cf is not None:
        opt["capacity_factor"] = config.parse_number(
            f"model config '{HF_CONFIG_CAPACITY_KEY}'", cf, 0.0, lo_open=True)
    if _model_opt_in != opt:
        _model_opt_in = opt
        logger.info("sglang-moe-routing: %s", active_config().describe())
    return result


def _after_load_model(result, model_runner, *args, **kwargs):
    """Build/load the EC kernel before the first forward and before CUDA-graph capture."""
    cfg = active_config()
    if cfg.enabled:
        from sglang_moe_routing.expert_choice.dispatch import prepare_backends

        backend = cfg.backend if cfg.backend != "auto" else prepare_backends()
        logger.info("sglang-moe-routing: expert-choice kernels ready (backend=%s)", backend)
        if cfg.stats_interval > 0 and not getattr(model_runner, "is_draft_worker", False):
            install_stats_hook()
        log_coverage(model_runner)
    return result


def layer_coverage(model: Any, device: str = "cuda") -> List[tuple]:
    """``[(layer_id, reason or None)]`` for every SGLang ``TopK`` module of ``model``: None
    when the layer routes with expert choice, else why it keeps token choice."""
    from sglang.srt.layers.moe.topk import TopK

    out = []
    for module in model.modules():
        if not isinstance(module, TopK):
            continue
        cfg = module.topk_config
        fmt = getattr(cfg, "output_format", None)
        if device == "npu":
            reason = "NPU routing (forward_npu) bypasses select_experts"
        elif fmt is not None and getattr(fmt, "name", "STANDARD") != "STANDARD":
            reason = (f"MoE runner output format {fmt.name} routes inside the runner "
                      "(bypasses select_experts)")
        else:
            reason = unsupported_reason(cfg, None, None)
        out.append((getattr(module, "layer_id", None), reason))
    return out


def log_coverage(model_runner: Any) -> None:
    """Start-up lines: how many MoE layers route with EC, and each one that does not, why."""
    model = getattr(model_runner, "model", None)
    if model is None or not hasattr(model, "modules"):
        return
    cov = layer_coverage(model, str(getattr(model_runner, "device", "cuda")))
    if not cov:
        return
    ec = sum(r is None for _, r in cov)
    logger.info("sglang-moe-routing: expert choice routes %d of %d MoE (TopK) layers%s",
                ec, len(cov), "" if ec == len(cov) else "; the others keep token choice:")
    for layer_id, reason in cov:
        if reason is not None:
            logger.info("sglang-moe-routing:   layer %s: %s", layer_id, reason)


def install_stats_hook() -> None:
    """Count served forward passes only when load statistics are on (nothing otherwise)."""
    from sglang_moe_routing.integration import forward_pass

    forward_pass.add_wrapper(_around_model_runner_forward)


def _around_model_runner_forward(original, model_runner, *args, **kwargs):
    """Counts served forward passes and logs EC load statistics every N of them.

    Runs in Python on every pass, CUDA-graph replays included (the per-layer counters are
    updated on the device, inside the graphs). Graph capture and warm-up call the model's
    own ``forward``, never ``ModelRunner.forward``: their counts are dropped before the first
    served pass.
    """
    cfg = active_config()
    if (not cfg.enabled or cfg.stats_interval <= 0
            or getattr(model_runner, "is_draft_worker", False)):
        return original(model_runner, *args, **kwargs)
    if _stats.dirty or not _stats.served:
        _stats.served = True
        _stats.reset()  # counts of capture / warm-up passes (dummy inputs)
    out = original(model_runner, *args, **kwargs)
    _stats.passes += 1
    if _stats.passes >= cfg.stats_interval:
        log_stats_now()
    return out


# ------------------------------------------------------------------ the routing hook

_warned: set = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning("sglang-moe-routing: %s", msg)


def unsupported_reason(topk_config: Any, dynamic_expert_bias, router_logits_partials) -> Optional[str]:
    """Why EC does not route this call (``None`` when it does)."""
    if not getattr(topk_config, "allow_routed_experts_capture", True):
        # SGLang clears this flag for draft-model (speculative decoding / MTP) TopK layers:
        # token choice there keeps the draft's proposals independent of the batch.
        return "draft / MTP layers (speculative decoding routes its draft with token choice)"
    if dynamic_expert_bias is not None:
        return "per-token dynamic expert bias"
    if router_logits_partials is not None:
        return "split-K router logits partials"
    if topk_config.custom_routing_function is not None:
        return "a custom routing function"
    if topk_config.num_shared_topk_slots and not _shared_slots_supported(topk_config):
        return "fused shared experts in per-rank slots (DeepEP / MegaMoE) or on ROCm (aiter)"
    if topk_config.scoring_func not in ("softmax", "sigmoid"):
        return f"scoring_func={topk_config.scoring_func!r}"
    if getattr(topk_config, "sqrtsoftplus_log1p", False):
        return "sqrtsoftplus routing"
    return None


def _shared_slots_supported(topk_config: Any) -> bool:
    """Fused shared experts in the standard layout: the router writes the shared columns last
    (id ``E + i``) and ``_post_process_topk_ids`` keeps them. EC routes the other columns."""
    from sglang.srt.layers.moe import topk as sgl_topk

    n = topk_config.num_shared_topk_slots
    per_rank = getattr(sgl_topk, "has_per_rank_fused_shared_slots", lambda _n: True)(n)
    return not per_rank and not getattr(sgl_topk, "_use_aiter", False) and n < topk_config.top_k


def _routing_simulation_on() -> bool:
    from sglang.srt.environ import envs

    return bool(
        envs.SGLANG_SIMULATE_UNIFORM_EXPERTS.get()
        or envs.SGLANG_SIMULATE_ROUND_ROBIN_EXPERTS.get()
    )


_SELECT_EXPERTS_POSITIONAL = ("hidden_states", "router_logits", "topk_config")


def _around_select_experts(original, *args, **kwargs):
    """AROUND hook of ``select_experts``: reads only what it needs and passes every argument
    through untouched, so a new upstream keyword cannot break the MoE forward."""
    cfg = active_config()
    if not cfg.enabled:
        return original(*args, **kwargs)
    named = dict(zip(_SELECT_EXPERTS_POSITIONAL, args))
    router_logits = named.get("router_logits", kwargs.get("router_logits"))
    topk_config = named.get("topk_config", kwargs.get("topk_config"))
    hidden_states = named.get("hidden_states", kwargs.get("hidden_states"))
    if router_logits is None or topk_config is None:
        return original(*args, **kwargs)
    reason = unsupported_reason(
        topk_config, kwargs.get("dynamic_expert_bias"), kwargs.get("router_logits_partials"))
    if reason is None and _routing_simulation_on():
        reason = "SGLANG_SIMULATE_*_EXPERTS routing simulation"
    if reason is not None:
        _warn_once(reason, f"expert choice skipped (standard routing) for {reason}")
        return original(*args, **kwargs)
    # Host-side shortcut on the static row count (free); T' < min_tokens with T >= min_tokens
    # is handled on the device by the kernel (capacity = T' gives exactly token choice).
    routed_k = topk_config.top_k - int(topk_config.num_shared_topk_slots or 0)
    min_tokens = cfg.min_tokens_for(router_logits.shape[-1], routed_k)
    if router_logits.shape[0] < min_tokens:
        return original(*args, **kwargs)
    return route_expert_choice(
        cfg, hidden_states, router_logits, topk_config,
        min_tokens=min_tokens,
        layer_id=kwargs.get("layer_id"),
        num_token_non_padded=kwargs.get("num_token_non_padded"),
        expert_location_dispatch_info=kwargs.get("expert_location_dispatch_info"),
    )


def route_expert_choice(
    cfg: ExpertChoiceConfig,
    hidden_states: torch.Tensor,
    router_logits: torch.Tensor,
    topk_config: Any,
    *,
    layer_id: Optional[int],
    num_token_non_padded: Optional[torch.Tensor],
    expert_location_dispatch_info: Any,
    min_tokens: Optional[int] = None,
):
    """EC routing followed by upstream's standard post-processing; returns StandardTopKOutput.

    With fused shared experts (``num_shared_topk_slots`` = s > 0, e.g. DeepSeek V3/R1), EC
    routes ``top_k - s`` slots among the routed experts and the last ``s`` columns hold the
    shared experts as upstream's router writes them for s = 1: id ``E``, weight
    ``fused_shared_expert_weight`` (for s > 1, ids ``E .. E+s-1`` rotated per token).
    """
    from sglang.srt.eplb import expert_location_dispatch
    from sglang.srt.eplb.expert_distribution import get_global_expert_distribution_recorder
    from sglang.srt.layers.moe import topk as sgl_topk

    n_shared = int(topk_config.num_shared_topk_slots or 0)
    top_k = topk_config.top_k - n_shared
    if min_tokens is None:
        min_tokens = cfg.min_tokens_for(router_logits.shape[-1], top_k)
    if layer_id not in _warned:
        _warned.add(layer_id)
        logger.info(
            "sglang-moe-routing: layer %s routes with expert choice (E=%d, top_k=%d%s, cf=%s, "
            "min_tokens=%d)",
            layer_id, router_logits.shape[-1], top_k,
            f" + {n_shared} fused shared" if n_shared else "", cfg.capacity_factor, min_tokens,
        )
    router_logits, correction_bias = expert_location_dispatch.transform_select_experts_inputs(
        router_logits=router_logits,
        correction_bias=topk_config.correction_bias,
        info=expert_location_dispatch_info,
    )
    spec = routing_spec(topk_config, cfg, top_k, correction_bias, router_logits.shape[-1],
                        min_tokens=min_tokens)
    topk_weights, topk_ids = expert_choice_route(
        router_logits, spec, num_token_non_padded, backend=cfg.backend)
    if cfg.stats_interval > 0 and layer_id is not None:
        _stats.add(layer_id, topk_ids, router_logits.shape[-1], num_token_non_padded)
    if n_shared:
        topk_weights, topk_ids = append_shared_slots(
            topk_weights, topk_ids, n_shared, router_logits.shape[-1],
            sgl_topk.fused_shared_expert_weight(
                routed_scaling_factor=topk_config.routed_scaling_factor,
                fused_in_topk=spec.apply_routed_scaling_factor_on_output,
            ),
        )
    topk_ids, topk_weights, recorder_topk_ids = sgl_topk._post_process_topk_ids(
        topk_ids=topk_ids,
        topk_weights=topk_weights,
        topk_config=topk_config,
        router_logits=router_logits,
        num_token_non_padded=num_token_non_padded,
        layer_id=layer_id,
        expert_location_dispatch_info=expert_location_dispatch_info,
        padded_rows_masked=False,
    )
    if recorder_topk_ids is not None:
        get_global_expert_distribution_recorder().on_select_experts(topk_ids=recorder_topk_ids)
    return sgl_topk.StandardTopKOutput(topk_weights, topk_ids, router_logits)


def routing_spec(topk_config: Any, cfg: ExpertChoiceConfig, top_k: int,
                 correction_bias: Optional[torch.Tensor], num_experts: int,
                 min_tokens: Optional[int] = None) -> RoutingSpec:
    """The ``RoutingSpec`` of one ``select_experts`` call: the layer's ``TopKConfig`` (scoring,
    renormalisation, grouped top-k, routed scaling) plus the plugin's settings (capacity
    factor, min tokens). ``top_k`` is the routed experts' share of ``topk_config.top_k``
    (fused shared-expert slots excluded); ``correction_bias`` is upstream's, after
    ``transform_select_experts_inputs``; ``min_tokens``, where the caller already resolved
    it, is used as given."""
    grouped = bool(topk_config.use_grouped_topk)
    return RoutingSpec(
        top_k=top_k,
        capacity_factor=cfg.capacity_factor,
        renormalize=topk_config.renormalize,
        scoring_func=topk_config.scoring_func,
        num_expert_group=topk_config.num_expert_group if grouped else None,
        topk_group=topk_config.topk_group if grouped else None,
        correction_bias=correction_bias,
        routed_scaling_factor=topk_config.routed_scaling_factor,
        apply_routed_scaling_factor_on_output=bool(
            topk_config.apply_routed_scaling_factor_on_output),
        min_tokens=(cfg.min_tokens_for(num_experts, top_k) if min_tokens is None
                    else min_tokens),
    )


def append_shared_slots(topk_weights: torch.Tensor, topk_ids: torch.Tensor, n_shared: int,
                        num_routed: int, weight: float):
    """``[T, k]`` routed slots -> ``[T, k + s]`` with the fused shared-expert columns last."""
    t = topk_ids.shape[0]
    rows = torch.arange(t, device=topk_ids.device, dtype=topk_ids.dtype).unsqueeze(1)
    cols = torch.arange(n_shared, device=topk_ids.device, dtype=topk_ids.dtype)
    shared_ids = num_routed + (rows + cols) % n_shared
    shared_w = torch.full((t, n_shared), weight, dtype=topk_weights.dtype, device=topk_weights.device)
    return torch.cat([topk_weights, shared_w], 1), torch.cat([topk_ids, shared_ids], 1)


def register_hooks() -> None:
    """Cold-path hooks, always registered: the model-config opt-in (read before the model
    runner exists). The routing hooks come from :func:`runtime_hooks` only when EC is on."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(
        "sglang.srt.configs.model_config.ModelConfig.__init__",
        _after_model_config_init,
        HookType.AFTER,
    )


SELECT_EXPERTS = "sglang.srt.layers.moe.topk.select_experts"
LOAD_MODEL = "sglang.srt.model_executor.model_runner.ModelRunner.load_model"
_runtime_registered = False


def runtime_hooks(force: bool = False) -> List[str]:
    """Register the routing hooks when expert choice is on in this process (CLI, environment
    or the model's config), or ``force``; returns their targets ([] when off: upstream runs
    untouched). The hooks themselves still check the active config on every call."""
    global _runtime_registered
    if not (force or active_config().enabled):
        return []
    if not _runtime_registered:
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType

        _runtime_registered = True
        HookRegistry.register(SELECT_EXPERTS, _around_select_experts, HookType.AROUND)
        HookRegistry.register(LOAD_MODEL, _after_load_model, HookType.AFTER)
    return [SELECT_EXPERTS, LOAD_MODEL]


def self_check() -> List[str]:
    """The upstream symbols expert-choice routing relies on that this sglang lacks."""
    if not active_config().enabled:
        return []
    import inspect

    from sglang.srt.layers.moe import topk as sgl_topk

    missing = []
    post = getattr(sgl_topk, "_post_process_topk_ids", None)
    if post is None:
        missing.append("sglang.srt.layers.moe.topk._post_process_topk_ids")
    else:
        params = inspect.signature(post).parameters
        for name in ("topk_ids", "topk_weights", "topk_config", "router_logits", "layer_id",
                     "num_token_non_padded", "expert_location_dispatch_info", "padded_rows_masked"):
            if name not in params:
                missing.append(f"_post_process_topk_ids(..., {name}=)")
    fields = getattr(getattr(sgl_topk, "TopKConfig", None), "__dataclass_fields__", {})
    for name in ("top_k", "use_grouped_topk", "topk_group", "num_expert_group", "renormalize",
                 "custom_routing_function", "correction_bias", "routed_scaling_factor",
                 "apply_routed_scaling_factor_on_output", "scoring_func", "output_format",
                 "allow_routed_experts_capture", "shared_experts"):
        if name not in fields:
            missing.append(f"TopKConfig.{name}")
    for name in ("StandardTopKOutput", "fused_shared_expert_weight", "TopK"):
        if not hasattr(sgl_topk, name):
            missing.append(f"sglang.srt.layers.moe.topk.{name}")
    return [f"expert-choice routing: {m}" for m in missing]
