"""Entry point of the ``sglang.srt.plugins`` group: registers every hook.

SGLang calls ``register()`` from ``load_plugins()`` in the launcher, the scheduler and the
detokenizer processes. Each feature module exposes:

* ``add_cli_args(parser)``: add its flags to SGLang's parser (``--help`` shows them);
* ``parse_section(args) -> section``: read and validate its flags from the argparse
  namespace, raising ``ValueError`` with a clear message on bad values;
* ``register_hooks()``: register its ``HookRegistry`` hooks.

``register()`` first checks that the installed sglang is one this plugin supports
(``SUPPORTED_SGLANG``, the same range as the dependency in ``pyproject.toml``). Bad plugin
flags raise ``InvalidPluginArguments`` (a ``ValueError``) for library callers; the CLI entry
points (``python -m sglang.launch_server``, ``sglang serve``) print one argparse-style
``error:`` line and exit with status 2 instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Dict, List, Optional

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from sglang_moe_routing.integration import config

logger = logging.getLogger("sglang_moe_routing")

_registered = False

#: The sglang releases this plugin is written and tested against (its hooks reach into sglang
#: internals such as ``select_experts``' keywords and ``_post_process_topk_ids``, which change
#: between releases). pyproject.toml declares the same range (a test keeps them equal).
SUPPORTED_SGLANG = ">=0.5.23,<0.5.24"
ENV_SKIP_VERSION_CHECK = "SGLANG_MOE_ROUTING_SKIP_VERSION_CHECK"


def _plugin_version() -> str:
    from sglang_moe_routing import __version__

    return __version__


def installed_sglang_version() -> Optional[str]:
    """The installed sglang's version: its distribution metadata, else ``sglang.__version__``."""
    from importlib import metadata

    try:
        return metadata.version("sglang")
    except metadata.PackageNotFoundError:
        pass
    try:
        import sglang

        return getattr(sglang, "__version__", None)
    except Exception:  # noqa: BLE001 - an sglang that cannot be imported has no version
        return None


def sglang_version_supported(version: Optional[str]) -> bool:
    """``version`` lies in ``SUPPORTED_SGLANG`` (an unknown or unparsable version does not)."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    if not version:
        return False
    try:
        parsed = Version(version)
    except InvalidVersion:
        return False
    return SpecifierSet(SUPPORTED_SGLANG).contains(parsed, prereleases=True)


def check_sglang_version() -> None:
    """Raise ``RuntimeError`` (one line) when the installed sglang is outside the supported
    range, unless ``SGLANG_MOE_ROUTING_SKIP_VERSION_CHECK=1`` (then warn and go on)."""
    found = installed_sglang_version()
    if sglang_version_supported(found):
        return
    msg = (f"sglang-moe-routing {_plugin_version()} supports sglang {SUPPORTED_SGLANG}; "
           f"found {found or 'unknown'}")
    skip = os.environ.get(ENV_SKIP_VERSION_CHECK, "").strip().lower()
    if skip in ("1", "true", "yes", "on"):
        logger.warning("%s (%s set: trying anyway)", msg, ENV_SKIP_VERSION_CHECK)
        return
    raise RuntimeError(f"{msg} (set {ENV_SKIP_VERSION_CHECK}=1 to try anyway)")


class InvalidPluginArguments(ValueError):
    """Bad plugin flag or environment values; ``errors`` holds one message per problem."""

    def __init__(self, errors: List[str]) -> None:
        self.errors = list(errors)
        super().__init__("sglang-moe-routing: invalid arguments:\n  " + "\n  ".join(self.errors))

    def one_line(self) -> str:
        return "sglang-moe-routing: " + "; ".join(self.errors)


def _feature_modules() -> List[Any]:
    from sglang_moe_routing.integration import expert_choice_hooks

    mods = [expert_choice_hooks]
    for name in ("eplb_hooks", "omni_hooks", "expert_cost_hooks"):
        try:
            mods.append(__import__(f"sglang_moe_routing.integration.{name}", fromlist=[name]))
        except ModuleNotFoundError as e:
            if e.name != f"sglang_moe_routing.integration.{name}":
                raise
    return mods


def add_plugin_arguments(parser: argparse.ArgumentParser) -> None:
    """Every feature's flags, in one argument group."""
    group = parser.add_argument_group("sglang-moe-routing (plugin)")
    for mod in _feature_modules():
        mod.add_cli_args(group)


def _after_add_cli_args(result, parser: argparse.ArgumentParser, *args, **kwargs):
    add_plugin_arguments(parser)
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
        raise InvalidPluginArguments(errors)
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


def _cli_prog() -> Optional[str]:
    """The program name when this process is an sglang CLI entry point, else ``None``."""
    main = sys.modules.get("__main__")
    spec_name = getattr(getattr(main, "__spec__", None), "name", None)
    main_file = os.path.normpath(getattr(main, "__file__", None) or "")
    if spec_name == "sglang.launch_server" or main_file.endswith(
            os.path.join("sglang", "launch_server.py")):
        return "launch_server"
    # the ``sglang`` console script: ``from sglang.cli.main import main; sys.exit(main())``
    if getattr(getattr(main, "main", None), "__module__", None) == "sglang.cli.main":
        return "sglang serve"
    return None


def _around_prepare_server_args(original, argv, *a, **kw):
    """At a CLI entry point, bad plugin flags end like argparse errors: one ``error:`` line
    on stderr and exit status 2. Library callers keep the ``InvalidPluginArguments``."""
    try:
        return original(argv, *a, **kw)
    except InvalidPluginArguments as exc:
        prog = _cli_prog()
        if prog is None:
            raise
        sys.stderr.write(f"{prog}: error: {exc.one_line()}\n")
        sys.stderr.flush()
        raise SystemExit(2) from None


def features_requested(argv: Optional[List[str]] = None,
                       environ: Optional[Dict[str, str]] = None) -> List[str]:
    """The plugin flags in ``argv`` (default ``sys.argv``) and the enabling environment
    variables set in ``environ``: what would silently not happen if the plugin did not load."""
    argv = sys.argv[1:] if argv is None else argv
    environ = os.environ if environ is None else environ
    try:
        parser = argparse.ArgumentParser(add_help=False)
        add_plugin_arguments(parser)
        opts = {o for a in parser._actions for o in a.option_strings}
    except Exception:  # noqa: BLE001 - an sglang we do not support may break the imports
        opts = set()
    from sglang_moe_routing.integration.expert_choice_flags import ENV_ENABLE

    got = sorted({t.split("=", 1)[0] for t in argv if t.split("=", 1)[0] in opts})
    on = ("1", "true", "yes", "on")
    return got + [f"{v}={environ[v]}" for v in (ENV_ENABLE,)
                  if environ.get(v, "").strip().lower() in on]


def register() -> None:
    """Check the sglang version, then register all hooks (idempotent).

    Raises ``RuntimeError`` (before registering anything) for an unsupported sglang; SGLang's
    ``load_plugins`` logs it and runs without the plugin. When the command line or the
    environment asks for a plugin feature (``features_requested``), it raises ``SystemExit``
    instead, which SGLang does not catch: the server stops with that one line rather than
    starting with the feature silently off.
    """
    global _registered
    if _registered:
        return
    try:
        check_sglang_version()
    except RuntimeError as exc:
        asked = features_requested()
        if asked:  # SGLang logs and swallows a plugin's Exception; the feature would be off
            raise SystemExit(f"error: {exc}; not started because {', '.join(asked)} asks for "
                             "a plugin feature") from None
        raise
    _registered = True
    HookRegistry.register(
        "sglang.srt.server_args.ServerArgs.add_cli_args", _after_add_cli_args, HookType.AFTER
    )
    HookRegistry.register(
        "sglang.srt.server_args.ServerArgs.from_cli_args",
        _around_from_cli_args,
        HookType.AROUND,
    )
    HookRegistry.register(
        "sglang.srt.server_args.prepare_server_args", _around_prepare_server_args, HookType.AROUND
    )
    HookRegistry.register(MODEL_RUNNER_INITIALIZE, _before_model_runner_initialize, HookType.BEFORE)
    for mod in _feature_modules():
        mod.register_hooks()


MODEL_RUNNER_INITIALIZE = "sglang.srt.model_executor.model_runner.ModelRunner.initialize"


def _before_model_runner_initialize(*args, **kwargs):
    install_feature_hooks()
    return None


def install_feature_hooks(force: bool = False) -> List[str]:
    """Register and apply the hooks of the features enabled in this process, then check the
    upstream surface they rely on; returns the hooked targets.

    Runs before the model runner initialises (the flags, the environment and the model's
    config are known there); with every feature off it hooks nothing, so upstream routing and
    EPLB run untouched. A missing piece fails start-up with one line naming the feature, the
    symbol and the supported sglang versions. ``force`` hooks every feature (tests, the demo).
    """
    targets: List[str] = []
    for mod in _feature_modules():
        fn = getattr(mod, "runtime_hooks", None)
        if fn is not None:
            targets += fn(force=force)
    if targets:
        HookRegistry.apply_hooks()
    problems = [f"{t} could not be hooked" for t in targets if t not in HookRegistry._patched]
    for mod in _feature_modules():
        check = getattr(mod, "self_check", None)
        if check is not None:
            problems += check()
    if problems:
        raise RuntimeError(
            f"sglang-moe-routing {_plugin_version()} needs sglang {SUPPORTED_SGLANG} (found "
            f"{installed_sglang_version()}): " + "; ".join(problems))
    return targets
