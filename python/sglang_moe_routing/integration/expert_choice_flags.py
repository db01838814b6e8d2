"""Flags of expert-choice routing and their validated section ``"expert_choice"``, read by the
routing hooks (``expert_choice_hooks.py``).

``add_cli_args`` adds the flags to SGLang's parser; ``config_from_values`` merges flag values
with the environment and validates them into :class:`ExpertChoiceConfig` (one ``ValueError``
naming every bad flag or variable); ``parse_section`` does that for a parsed ``ServerArgs``
and refuses the parallel modes that give the MoE no count of real tokens. The section reaches
the scheduler processes with the ``ServerArgs`` record (``integration/config.py``).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from sglang_moe_routing.expert_choice.dispatch import BACKENDS
from sglang_moe_routing.integration import config

ENV_ENABLE = "SGLANG_EXPERT_CHOICE"
ENV_CAPACITY = "SGLANG_EXPERT_CAPACITY_FACTOR"
ENV_MIN_TOKENS = "SGLANG_EXPERT_CHOICE_MIN_TOKENS"
HF_CONFIG_KEY = "use_expert_choice"
HF_CONFIG_CAPACITY_KEY = "expert_capacity_factor"

DEFAULT_CAPACITY_FACTOR = 1.25
DEFAULT_MIN_TOKENS = "auto"
# ``auto`` = max(AUTO_MIN_TOKENS_FLOOR, ceil(AUTO_TOKENS_PER_EXPERT * E / k)) per layer: below
# about 4 routed slots per expert, expert choice makes the batch touch more distinct experts than
# token choice (+5.7% at 32 tokens, E = 128, k = 8), and memory-bound decode reads every touched
# expert's weights; the loads it would even out are a few tokens each. docs/expert_choice.md.
AUTO_MIN_TOKENS_FLOOR = 32
AUTO_TOKENS_PER_EXPERT = 4
SECTION = "expert_choice"


@dataclass(frozen=True)
class ExpertChoiceConfig:
    enabled: bool = False
    capacity_factor: float = DEFAULT_CAPACITY_FACTOR
    min_tokens: Optional[int] = None  # None: auto, see min_tokens_for
    backend: str = "auto"
    stats_interval: int = 0
    source: str = "default"

    def min_tokens_for(self, num_experts: int, top_k: int) -> int:
        """The hybrid threshold of a layer with ``num_experts`` routed experts, ``top_k`` each."""
        if self.min_tokens is not None:
            return self.min_tokens
        return max(AUTO_MIN_TOKENS_FLOOR,
                   -(-AUTO_TOKENS_PER_EXPERT * num_experts // max(top_k, 1)))

    def min_tokens_text(self) -> str:
        if self.min_tokens is not None:
            return str(self.min_tokens)
        return (f"auto (max({AUTO_MIN_TOKENS_FLOOR}, {AUTO_TOKENS_PER_EXPERT} * E / top_k) "
                "per layer)")

    def describe(self) -> str:
        if not self.enabled:
            return "expert-choice routing: off (standard token-choice routing)"
        return (
            f"expert-choice routing: ON (source={self.source}, capacity_factor="
            f"{self.capacity_factor}, min_tokens={self.min_tokens_text()}: batches with fewer valid "
            f"tokens use standard routing, backend={self.backend}, load stats every "
            f"{self.stats_interval or 'never'} forward passes)"
        )


# ----------------------------------------------------------------------------- parsing


def _env_truthy(value: Optional[str], name: str = ENV_ENABLE) -> bool:
    """An on/off environment value: 1/0/true/false/yes/no/on/off (any case, surrounding
    whitespace ignored; unset or empty = off). Anything else raises ``ValueError`` naming
    the variable ``name``."""
    word = "" if value is None else value.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("", "0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be one of 1/0/true/false/yes/no/on/off, got {value!r}")


def add_cli_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--enable-expert-choice",
        action="store_true",
        default=False,
        help="Expert-choice MoE routing (sglang-moe-routing): each expert takes its "
        "top-capacity tokens, so expert load is balanced. Also enabled by "
        f"{ENV_ENABLE}=1 or '{HF_CONFIG_KEY}: true' in the model config. Changes the model's "
        "outputs (a token's experts depend on its batch); see docs/expert_choice.md.",
    )
    group.add_argument(
        "--expert-capacity-factor",
        type=str,
        default=None,
        help="Expert capacity C = min(T, ceil(factor * T * top_k / num_experts)); "
        f"must be > 0 (default {DEFAULT_CAPACITY_FACTOR}; env {ENV_CAPACITY}).",
    )
    group.add_argument(
        "--expert-choice-min-tokens",
        type=str,
        default=None,
        help="Batches with fewer valid tokens than this use standard routing (decided on the "
        "GPU, CUDA-graph safe): an integer >= 0, or auto = max("
        f"{AUTO_MIN_TOKENS_FLOOR}, {AUTO_TOKENS_PER_EXPERT} * num_experts / top_k) per layer, "
        "where expert choice stops touching more experts than token choice "
        f"(default {DEFAULT_MIN_TOKENS}; env {ENV_MIN_TOKENS}).",
    )
    group.add_argument(
        "--expert-choice-backend",
        type=str,
        default="auto",
        choices=list(BACKENDS),
        help="Expert-choice implementation: auto (fastest available), cuda, triton, reference.",
    )
    group.add_argument(
        "--expert-choice-stats-interval",
        type=str,
        default="0",
        help="Log per-layer expert load of the expert-choice routed tokens (tokens per expert, "
        "std, max/mean) every N served forward passes, CUDA-graph replays included; capture "
        "and warm-up passes do not count (0 = off; off costs nothing).",
    )


def config_from_values(
    enable: bool,
    capacity_factor: Any,
    min_tokens: Any,
    backend: str = "auto",
    stats_interval: Any = 0,
    environ: Optional[Dict[str, str]] = None,
) -> ExpertChoiceConfig:
    """Merge CLI values with the environment; raise ``ValueError`` on bad values.

    An error names where the bad value came from: the flag, or the environment variable when
    the flag was not given (``SGLANG_EXPERT_CHOICE`` is checked even with the flag given).
    """
    env = os.environ if environ is None else environ
    errors: List[str] = []
    env_on = config.collect(errors, False, lambda: _env_truthy(env.get(ENV_ENABLE), ENV_ENABLE))
    source = "cli" if enable else ("env" if env_on else "default")
    cf_name, mt_name = "--expert-capacity-factor", "--expert-choice-min-tokens"
    if capacity_factor is None:
        if ENV_CAPACITY in env:
            cf_name = ENV_CAPACITY
        capacity_factor = env.get(ENV_CAPACITY, DEFAULT_CAPACITY_FACTOR)
    if min_tokens is None:
        if ENV_MIN_TOKENS in env:
            mt_name = ENV_MIN_TOKENS
        min_tokens = env.get(ENV_MIN_TOKENS, DEFAULT_MIN_TOKENS)
    cfg: Dict[str, Any] = dict(
        capacity_factor=config.collect(errors, None, lambda: config.parse_number(
            cf_name, capacity_factor, 0.0, lo_open=True)),
        min_tokens=config.collect(errors, None, lambda: _parse_min_tokens(mt_name, min_tokens)),
        stats_interval=config.collect(errors, None, lambda: config.parse_integer(
            "--expert-choice-stats-interval", stats_interval, 0)),
    )
    if backend not in BACKENDS:
        errors.append(f"--expert-choice-backend must be one of {BACKENDS}, got {backend!r}")
    if errors:
        raise ValueError("; ".join(errors))
    return ExpertChoiceConfig(
        enabled=source != "default", backend=backend, source=source, **cfg
    )


def _parse_min_tokens(name: str, value: Any) -> Optional[int]:
    """``auto`` (any case) -> None; else an integer >= 0."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    try:
        return config.parse_integer(name, value, 0)
    except ValueError as exc:
        raise ValueError(str(exc).replace("must be an integer", "must be an integer or auto")
                         ) from None


def parse_section(args: argparse.Namespace) -> Dict[str, Any]:
    cfg = config_from_values(
        getattr(args, "enable_expert_choice", False),
        getattr(args, "expert_capacity_factor", None),
        getattr(args, "expert_choice_min_tokens", None),
        getattr(args, "expert_choice_backend", "auto"),
        getattr(args, "expert_choice_stats_interval", 0),
    )
    if cfg.enabled:
        clash = unpadded_count_unavailable(args)
        if clash:
            raise ValueError(
                f"expert-choice routing ({cfg.source}) cannot run with {clash}: there SGLang 0.5.23 "
                "gives the MoE layers no count of real tokens (the real rows of the gathered batch "
                "are not a prefix), so padding rows would be routed as tokens")
    return {SECTION: cfg}


def unpadded_count_unavailable(args: Any) -> Optional[str]:
    """The parallel mode in ``args`` under which upstream passes ``num_token_non_padded=None``
    to ``select_experts`` for padded batches (``ForwardBatch.moe_num_token_non_padded``):
    attention data parallelism (one padded slot per DP rank is gathered), attention context
    parallelism / prefill CP (zigzag-permuted rows). None when the count is always there."""
    if getattr(args, "enable_dp_attention", False):
        return "--enable-dp-attention"
    if int(getattr(args, "attn_cp_size", 1) or 1) > 1:
        return "--attn-cp-size > 1"
    if getattr(args, "enable_prefill_cp", False):
        return "--enable-prefill-cp"
    return None
