"""Omni (Cartesian-product) router in SGLang: the ``--omni-router-backend`` flag and the
Doge model registration.

* ``--omni-router-backend {auto,triton,torch,reference}`` (default ``auto``) picks the implementation
  of :func:`sglang_moe_routing.omni.omni_router` used by the Doge model's CDMoE layers. The
  value is parsed and validated in the launcher (section ``"omni"``) and reaches the
  scheduler processes with the ``ServerArgs`` record (see ``integration/config.py``).
* ``DogeForCausalLM`` (``models/doge.py``) is put into SGLang's
  ``ModelRegistry`` by a BEFORE hook on ``get_model_architecture``, the one function the
  model loader asks for a model class. The same hook widens the key rows of the model
  config's KV geometry for Doge's folded attention (``widen_kv_geometry``): the KV pool is
  built from that config after the model. Nothing of SGLang's model zoo is imported at plugin
  load time; the registry is touched only when a model is about to be built.

Doge needs the plugin: without it (``SGLANG_EXTERNAL_MODEL_PACKAGE=sglang_moe_routing.models``)
the KV pool's key rows are not widened and the first forward fails with a one-line error.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Any, Dict, Tuple, Type

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

logger = logging.getLogger("sglang_moe_routing")

SECTION = "omni"
BACKENDS: Tuple[str, ...] = ("auto", "triton", "torch", "reference")
DEFAULT_BACKEND = "auto"
MODEL_PACKAGE = "sglang_moe_routing.models"
ARCHITECTURES: Tuple[str, ...] = ("DogeForCausalLM",)
GET_MODEL_ARCHITECTURE = "sglang.srt.model_loader.utils.get_model_architecture"


@dataclass(frozen=True)
class OmniConfig:
    """Settings of the Omni router inside SGLang."""

    backend: str = DEFAULT_BACKEND

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(
                f"--omni-router-backend must be one of {', '.join(BACKENDS)}; "
                f"got {self.backend!r}"
            )

    def describe(self) -> str:
        return (
            f"omni router: backend={self.backend} (used by CDMoE layers of "
            f"{', '.join(ARCHITECTURES)})"
        )


def add_cli_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--omni-router-backend",
        type=str,
        default=DEFAULT_BACKEND,
        choices=list(BACKENDS),
        help="Implementation of the Omni (Cartesian product-key) router used by Doge CDMoE "
        "layers (sglang-moe-routing): auto (Triton on CUDA, PyTorch otherwise), triton, "
        "torch (pruned k*k PyTorch), reference (naive: scores all n*n experts, the algorithm of "
        "transformers' DogeCDMoE; a baseline). See docs/omni_router.md.",
    )


def parse_section(args: argparse.Namespace) -> Dict[str, Any]:
    """``{"omni": OmniConfig}`` from the parsed flags; ``ValueError`` on a bad value."""
    value = getattr(args, "omni_router_backend", DEFAULT_BACKEND)
    if value is None:
        value = DEFAULT_BACKEND
    if not isinstance(value, str):
        raise ValueError(f"--omni-router-backend must be a string, got {value!r}")
    return {SECTION: OmniConfig(backend=value.strip().lower())}


def model_classes() -> Dict[str, Type[Any]]:
    """Architecture name -> model class, for every model file this package ships."""
    from sglang.srt.models.registry import import_model_classes

    return dict(import_model_classes(MODEL_PACKAGE, strict=True))


def register_models() -> None:
    """Put our model classes into SGLang's ``ModelRegistry`` (idempotent).

    Our class wins over an upstream class of the same architecture name: installing the
    plugin is the opt-in. The replacement is logged.
    """
    from sglang.srt.models.registry import ModelRegistry

    for arch, cls in model_classes().items():
        current = ModelRegistry.models.get(arch)
        if current is cls:
            continue
        if current is not None:
            logger.info(
                "sglang-moe-routing: %s -> %s.%s (replaces %r)",
                arch,
                cls.__module__,
                cls.__name__,
                current,
            )
        ModelRegistry.models[arch] = cls


def _before_get_model_architecture(model_config: Any, *args: Any, **kwargs: Any) -> None:
    architectures = getattr(getattr(model_config, "hf_config", None), "architectures", None)
    if architectures and any(a in ARCHITECTURES for a in architectures):
        register_models()
        # Doge's folded dynamic-mask attention stores wider key rows (the bias channel):
        # the KV pool, built after the model from this config, must be sized for them.
        from sglang_moe_routing.models.doge_attention import widen_kv_geometry

        widen_kv_geometry(model_config)
    return None


def register_hooks() -> None:
    HookRegistry.register(GET_MODEL_ARCHITECTURE, _before_get_model_architecture, HookType.BEFORE)
