"""Helpers for tests that run against the installed sglang (never imported by GPU tests)."""

from sglang_moe_routing.integration.config import published_server_args as published_args

__all__ = ["published_args"]
