"""`fastboot router --config FILE`: the fleet's OpenAI-compatible front (docs/router.md)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        required=True,
        help="router config, TOML (.toml) or YAML (.yaml/.yml): models, agents, listen address",
    )
    parser.add_argument("--host", default=None, help="listen address (overrides the config)")
    parser.add_argument("--port", type=int, default=None, help="listen port (overrides the config)")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    # Here, not at the top: the router's modules (aiohttp, and numpy through fastboot.buffer)
    # take ~0.25 s to import that `fastboot router --help` need not wait for.
    from fastboot.router.config import load_config, validate
    from fastboot.router.server import run as run_router

    config = load_config(args.config)
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if overrides:
        config = dataclasses.replace(config, **overrides)
        validate(config, str(args.config))
    return run_router(config)
