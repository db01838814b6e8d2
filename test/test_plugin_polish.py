"""Plugin polish (issue 10): the supported sglang range, strict SGLANG_EXPERT_CHOICE values,
errors that name the environment variable, argparse-style CLI errors, ``--help`` and the demo."""

import os
import subprocess
import sys
import types
from importlib import metadata
from pathlib import Path

import pytest

sglang = pytest.importorskip("sglang")

from packaging.requirements import Requirement  # noqa: E402
from packaging.specifiers import SpecifierSet  # noqa: E402
from sglang.srt.plugins import load_plugins  # noqa: E402
from sglang.srt.plugins.hook_registry import HookRegistry  # noqa: E402

from sglang_moe_routing.integration import config, plugin  # noqa: E402
from sglang_moe_routing.integration import expert_choice_hooks as ech  # noqa: E402
from sglang_moe_routing.integration import expert_choice_flags as ecf  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ENV_VARS = (ecf.ENV_ENABLE, ecf.ENV_CAPACITY, ecf.ENV_MIN_TOKENS, plugin.ENV_SKIP_VERSION_CHECK)


@pytest.fixture(scope="module", autouse=True)
def plugins_loaded():
    load_plugins()
    yield


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


# ----------------------------------------------------------------- A. supported sglang range


def _fake_sglang_version(monkeypatch, version):
    real = metadata.version

    def fake(name):
        if name == "sglang":
            if version is None:
                raise metadata.PackageNotFoundError(name)
            return version
        return real(name)

    monkeypatch.setattr(metadata, "version", fake)


def test_pyproject_declares_the_supported_range():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (req,) = [Requirement(d) for d in deps if Requirement(d).name == "sglang"]
    assert req.specifier == SpecifierSet(plugin.SUPPORTED_SGLANG)
    assert plugin.SUPPORTED_SGLANG == ">=0.5.23,<0.5.24"
    # what pip installs today is inside it
    assert plugin.sglang_version_supported(metadata.version("sglang"))


@pytest.mark.parametrize("version, ok", [
    ("0.5.23", True), ("0.5.23.post1", True), ("0.5.23+cu128", True),
    ("0.5.22", False), ("0.5.24", False), ("0.5.24rc1", False), ("0.5.23rc1", False),
    ("0.6.0", False), ("not-a-version", False), (None, False),
])
def test_version_range(version, ok):
    assert plugin.sglang_version_supported(version) is ok


def test_register_refuses_unsupported_sglang_before_registering_anything(monkeypatch):
    _fake_sglang_version(monkeypatch, "0.6.0")
    registered = []
    monkeypatch.setattr(HookRegistry, "register", classmethod(lambda cls, *a, **k: registered.append(a)))
    monkeypatch.setattr(plugin, "_registered", False)
    with pytest.raises(RuntimeError) as exc:
        plugin.register()
    assert str(exc.value) == (
        "sglang-moe-routing 0.1.0 supports sglang >=0.5.23,<0.5.24; found 0.6.0 "
        "(set SGLANG_MOE_ROUTING_SKIP_VERSION_CHECK=1 to try anyway)"
    )
    assert registered == [] and plugin._registered is False


def test_version_falls_back_to_dunder_version(monkeypatch):
    _fake_sglang_version(monkeypatch, None)
    monkeypatch.setattr(sglang, "__version__", "0.5.22", raising=False)
    assert plugin.installed_sglang_version() == "0.5.22"
    with pytest.raises(RuntimeError, match="found 0.5.22 "):
        plugin.check_sglang_version()
    monkeypatch.setattr(sglang, "__version__", "0.5.23", raising=False)
    plugin.check_sglang_version()  # supported: no error


def test_skip_version_check(monkeypatch, caplog):
    import logging

    _fake_sglang_version(monkeypatch, "0.7.1")
    monkeypatch.setenv(plugin.ENV_SKIP_VERSION_CHECK, "1")
    logging.getLogger("sglang_moe_routing").addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="sglang_moe_routing"):
            plugin.check_sglang_version()
    finally:
        logging.getLogger("sglang_moe_routing").removeHandler(caplog.handler)
    assert any("found 0.7.1" in r.getMessage() for r in caplog.records)


# ------------------------------------------------- B. SGLANG_EXPERT_CHOICE and env errors


@pytest.mark.parametrize("value, enabled", [
    ("1", True), ("true", True), (" TRUE ", True), ("Yes", True), ("on", True),
    ("0", False), ("false", False), ("No", False), (" OFF", False), ("", False), ("  ", False),
])
def test_env_enable_recognised_values(value, enabled):
    cfg = ecf.config_from_values(False, None, None, environ={ecf.ENV_ENABLE: value})
    assert cfg.enabled is enabled
    assert cfg.source == ("env" if enabled else "default")


@pytest.mark.parametrize("value", ["maybe", "2", "enable", "y", "1.0"])
def test_env_enable_rejects_other_values(value):
    msg = f"SGLANG_EXPERT_CHOICE must be one of 1/0/true/false/yes/no/on/off, got {value!r}"
    with pytest.raises(ValueError) as exc:
        ecf.config_from_values(False, None, None, environ={ecf.ENV_ENABLE: value})
    assert str(exc.value) == msg
    # also when the flag turns EC on anyway: a bad value is never silently ignored
    with pytest.raises(ValueError, match="SGLANG_EXPERT_CHOICE must be one of"):
        ecf.config_from_values(True, None, None, environ={ecf.ENV_ENABLE: value})


def test_env_enable_bad_value_fails_at_startup(monkeypatch):
    from sglang.srt.server_args import prepare_server_args

    monkeypatch.setenv(ecf.ENV_ENABLE, "maybe")
    with pytest.raises(ValueError, match="SGLANG_EXPERT_CHOICE must be one of .* got 'maybe'"):
        prepare_server_args(["--model-path", "dummy"])


def test_env_enable_bad_value_without_server_args(monkeypatch):
    """``sglang.Engine`` without the CLI: the environment alone is read at the first call."""
    monkeypatch.setenv(ecf.ENV_ENABLE, "maybe")
    monkeypatch.setattr(ech, "_env_fallback", None)
    config.set_sections({})
    try:
        with pytest.raises(ValueError, match="SGLANG_EXPERT_CHOICE must be one of"):
            ech.active_config()
    finally:
        config.set_sections(None)


def test_env_value_errors_name_the_variable():
    env = {ecf.ENV_CAPACITY: "-2", ecf.ENV_MIN_TOKENS: "x"}
    with pytest.raises(ValueError) as exc:
        ecf.config_from_values(True, None, None, environ=env)
    msg = str(exc.value)
    assert "SGLANG_EXPERT_CAPACITY_FACTOR must be a finite number > 0, got '-2'" in msg
    assert "SGLANG_EXPERT_CHOICE_MIN_TOKENS must be an integer or auto, got 'x'" in msg
    assert "--expert-capacity-factor" not in msg and "--expert-choice-min-tokens" not in msg
    # a value given on the command line is named by its flag (the environment is not read)
    with pytest.raises(ValueError) as exc:
        ecf.config_from_values(True, "0", "-1", environ=env)
    msg = str(exc.value)
    assert "--expert-capacity-factor must be a finite number > 0, got '0'" in msg
    assert "--expert-choice-min-tokens must be >= 0, got '-1'" in msg
    assert "SGLANG_EXPERT" not in msg
    # good environment values still work, unchanged
    cfg = ecf.config_from_values(False, None, None, environ={
        ecf.ENV_ENABLE: "1", ecf.ENV_CAPACITY: "1.5", ecf.ENV_MIN_TOKENS: "8"})
    assert (cfg.enabled, cfg.source, cfg.capacity_factor, cfg.min_tokens) == (True, "env", 1.5, 8)


def test_env_value_error_names_the_variable_at_startup(monkeypatch):
    from sglang.srt.server_args import prepare_server_args

    monkeypatch.setenv(ecf.ENV_CAPACITY, "-2")
    with pytest.raises(ValueError, match="SGLANG_EXPERT_CAPACITY_FACTOR must be a finite"):
        prepare_server_args(["--model-path", "dummy", "--enable-expert-choice"])


# ---------------------------------------------------------------- C. argparse-style errors


def test_library_callers_keep_a_value_error():
    from sglang.srt.server_args import prepare_server_args

    with pytest.raises(plugin.InvalidPluginArguments) as exc:
        prepare_server_args(["--model-path", "dummy", "--expert-capacity-factor", "-1",
                             "--expert-choice-min-tokens", "q"])
    assert isinstance(exc.value, ValueError)
    assert str(exc.value).startswith("sglang-moe-routing: invalid arguments:\n  ")
    assert exc.value.one_line() == (
        "sglang-moe-routing: --expert-capacity-factor must be a finite number > 0, got '-1'; "
        "--expert-choice-min-tokens must be an integer or auto, got 'q'"
    )


@pytest.mark.parametrize("main_spec, main_attrs, prog", [
    ("sglang.launch_server", {}, "launch_server"),
    (None, {"main": types.SimpleNamespace(__module__="sglang.cli.main")}, "sglang serve"),
])
def test_cli_entry_exits_2_with_one_error_line(monkeypatch, capsys, main_spec, main_attrs, prog):
    fake_main = types.ModuleType("__main__")
    fake_main.__spec__ = types.SimpleNamespace(name=main_spec) if main_spec else None
    for k, v in main_attrs.items():
        setattr(fake_main, k, v)
    monkeypatch.setitem(sys.modules, "__main__", fake_main)

    def original(argv):
        raise plugin.InvalidPluginArguments(["--expert-capacity-factor must be > 0, got '-1'"])

    with pytest.raises(SystemExit) as exc:
        plugin._around_prepare_server_args(original, ["--model-path", "x"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err == f"{prog}: error: sglang-moe-routing: --expert-capacity-factor must be > 0, got '-1'\n"


def _cli_env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    for name in ENV_VARS:
        env.pop(name, None)
    return env


def _assert_argparse_style(proc, prog):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert lines == [
        f"{prog}: error: sglang-moe-routing: --expert-capacity-factor must be a finite number "
        "> 0, got '-1'"
    ], proc.stderr[-3000:]


@pytest.mark.slow
def test_launch_server_bad_flag_exits_2_without_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "sglang.launch_server", "--model-path", "x",
         "--expert-capacity-factor", "-1"],
        capture_output=True, text=True, timeout=300, env=_cli_env(),
    )
    _assert_argparse_style(proc, "launch_server")


@pytest.mark.slow
def test_sglang_serve_bad_flag_exits_2_without_traceback(tmp_path):
    """``sglang serve`` loads the plugin before parsing: it accepts (and checks) our flags."""
    script = Path(sys.executable).with_name("sglang")
    if not script.exists():
        pytest.skip("no `sglang` console script next to this Python")
    proc = subprocess.run(
        [str(script), "serve", "--model-path", str(tmp_path), "--expert-capacity-factor", "-1"],
        capture_output=True, text=True, timeout=300, env=_cli_env(),
    )
    _assert_argparse_style(proc, "sglang serve")


# ------------------------------------------------------------------------------ D. --help


def test_help_groups_flags_under_the_plugin_title():
    import argparse

    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    (group,) = [g for g in parser._action_groups if g.title == "sglang-moe-routing (plugin)"]
    flags = {s for a in group._group_actions for s in a.option_strings}
    assert {"--enable-expert-choice", "--expert-capacity-factor",
            "--expert-choice-min-tokens"} <= flags


# ------------------------------------------------------------------------------ E. demo


def _demo(capsys, *argv):
    from sglang_moe_routing import demo

    assert demo.main(list(argv)) == 0
    return capsys.readouterr().out


def test_demo_prints_capacity_and_fallback(capsys):
    out = _demo(capsys, "--tokens", "64")
    assert "C = min(T, ceil(cf*T*k/E)) = min(64, ceil(1.25*64*2/8)) = 20 tokens per expert" in out
    assert "Fallback slots" in out and "past C" in out
    assert "OFF" not in out
    out = _demo(capsys, "--tokens", "16", "--min-tokens", "8", "--capacity-factor", "2")
    assert "= min(16, ceil(2*16*2/8)) = 8 tokens per expert" in out


def test_demo_says_when_min_tokens_turned_expert_choice_off(capsys):
    out = _demo(capsys, "--tokens", "16")
    assert "Expert choice OFF for this batch: T=16 < min tokens=32" in out
    assert "C = min(" not in out


def test_upstream_missing_resolves_functions_and_class_attributes(monkeypatch):
    """The self-checks' resolver: module functions and class attributes of the installed
    sglang resolve; a removed one, an unknown module or class is reported by name."""
    from sglang.srt.layers.moe.fused_moe_triton import layer

    from sglang_moe_routing.integration import eplb_hooks
    from sglang_moe_routing.integration.upstream import missing

    ok = ["sglang.srt.layers.moe.topk.select_experts",
          "sglang.srt.layers.moe.fused_moe_triton.layer.FusedMoE.run_moe_core"]
    bad = ["sglang.srt.layers.moe.topk.no_such_function",
           "sglang.srt.no_such_module.f", "sglang.srt.layers.moe.topk.NoSuchClass.f"]
    assert missing(ok + bad) == bad
    monkeypatch.delattr(layer.FusedMoE, "run_moe_core")
    with config.published_server_args("--enable-expert-compute-profiling"):
        config.set_sections(None)
        assert any("compute-aware EPLB: sglang.srt.layers.moe.fused_moe_triton.layer."
                   "FusedMoE.run_moe_core" == m for m in eplb_hooks.self_check())


@pytest.mark.parametrize("argv, env, asked", [
    (["--model-path", "m", "--enable-expert-choice"], {}, ["--enable-expert-choice"]),
    (["--expert-capacity-factor=2"], {}, ["--expert-capacity-factor"]),
    (["--model-path", "m"], {"SGLANG_EXPERT_CHOICE": "1"}, ["SGLANG_EXPERT_CHOICE=1"]),
    (["--model-path", "m"], {"SGLANG_EXPERT_CHOICE": "0"}, []),
])
def test_unsupported_sglang_with_a_feature_requested_stops_the_launcher(monkeypatch, argv, env, asked):
    """SGLang swallows a plugin's Exception (the feature would be silently off): when a plugin
    flag or SGLANG_EXPERT_CHOICE asks for a feature, the version error is a SystemExit."""
    _fake_sglang_version(monkeypatch, "0.6.0")
    monkeypatch.setattr(HookRegistry, "register", classmethod(lambda cls, *a, **k: None))
    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.setattr(sys, "argv", ["launch_server"] + argv)
    monkeypatch.delenv("SGLANG_EXPERT_CHOICE", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert plugin.features_requested() == asked
    if not asked:
        with pytest.raises(RuntimeError, match="found 0.6.0"):
            plugin.register()
        return
    with pytest.raises(SystemExit) as exc:
        plugin.register()
    msg = str(exc.value.code)
    assert "\n" not in msg and "found 0.6.0" in msg and asked[0] in msg
    assert plugin._registered is False
