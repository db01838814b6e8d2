"""Helpers for tests that run against the installed sglang (never imported by GPU tests)."""

import contextlib

from sglang_moe_routing.integration import config


@contextlib.contextmanager
def published_args(*argv: str, model_path: str = "dummy"):
    """Parse ``argv`` with SGLang's real parser (our flags included) and publish the record
    as the process's server args, as a scheduler process does; reset on exit."""
    from sglang.srt.runtime_context import SpawnRanks, publish, reset_context
    from sglang.srt.server_args import prepare_server_args

    server_args = prepare_server_args(["--model-path", model_path, "--device", "cpu", *argv])
    reset_context()
    publish(server_args, role="test", ranks=SpawnRanks(world_rank=0, dp_rank=None))
    config.set_sections(None)
    try:
        yield server_args
    finally:
        reset_context()
        config.set_sections(None)
