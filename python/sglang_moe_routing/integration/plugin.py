"""Entry point of the ``sglang.srt.plugins`` group: registers every hook.

SGLang calls ``register()`` from ``load_plugins()`` in the launcher, the scheduler and the
detokenizer processes. Each feature module exposes:

* ``add_cli_args(parser)``: add its flags to SGLang's parser (``--help`` shows them);
* ``parse_section(args) -> section``: read and validate its flags from the argparse
  namespace, raising ``ValueError`` with a clear message on bad values;
* ``register_hooks()``: register its ``HookRegistry`` hooks.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any, Dict, List

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from sglang_moe_routing.integration import config

logger = logging.getLogger("sglang_moe_routing")

_registered = False


def _feature_modules() -> List[Any]:
    from sglang_moe_routing.integration import expert_choice_hooks

    mods = [expert_choice_hooks]
    for name in ("eplb_hooks", "omni_hooks"):
        try:
            mods.append(__import__(f"sglang_moe_routing.integration.{name}", fromlist=[name]))
        except ModuleNotFoundError as e:
            if e.name != f"sglang_moe_routing.integration.{name}":
                raise
    return mods


def _after_add_cli_args(result, parser: argparse.ArgumentParser, *args, **kwargs):
    group = parser.add_argument_group("sglang-moe-routing (plugin)")
    for mod in _feature_modules():
        mod.add_cli_args(group)
    return result


def parse_sections(args: argparse.Namespace) -> Dict[str, Any]:
    """Validate every feature's flags; raises ``ValueError`` with all problems listed."""
    sections: Dict[str, Any] = {}
    errors: List[str] = []
    for mod in _feature_modules():
        try:
            sections.update(mod.parse_section(args))
        except ValueError as e:
            errors.append(str(e))
    if errors:
        raise ValueError("sglang-moe-routing: invalid arguments:\n  " + "\n  ".join(errors))
    return sections


def _around_from_cli_args(original, cls, args: argparse.Namespace, *a, **kw):
    server_args = original(cls, args, *a, **kw)
    sections = parse_sections(args)
    config.attach_to_server_args(server_args, sections)
    for name, section in sections.items():
        describe = getattr(section, "describe", None)
        if describe is not None:
            logger.info("sglang-moe-routing: %s", describe())
    return server_args


def register() -> None:
    """Register all hooks (idempotent)."""
    global _registered
    if _registered:
        return
    _registered = True
    HookRegistry.register(
        "sglang.srt.server_args.ServerArgs.add_cli_args", _after_add_cli_args, HookType.AFTER
    )
    HookRegistry.register(
        "sglang.srt.server_args.ServerArgs.from_cli_args",
        _around_from_cli_args,
        HookType.AROUND,
    )
    for mod in _feature_modules():
        mod.register_hooks()
