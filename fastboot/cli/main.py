"""`fastboot` entry point: a lazy subcommand dispatcher.

Only the selected command's module is imported (the others are registered as bare stubs so that
`fastboot --help` still lists them), so the CLI starts fast and never imports torch or vllm
unless the chosen command needs it.

A command module provides:

    def add_arguments(parser: argparse.ArgumentParser) -> None
    def run(args: argparse.Namespace) -> int
    PASSTHROUGH = True   (optional) argparse does not parse the command's arguments: they
                         arrive verbatim as args.argv (`serve` forwards them to the engine)
    PASSTHROUGH_AFTER = "ACTION"   (optional) the same for what follows that action's name
                         (`snapshot [--dir D] create ...`), argparse parsing what precedes it
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from fastboot import __version__, logs
from fastboot.errors import FastbootError

logger = logging.getLogger(__name__)

#: name -> (module, one-line help). Register only commands that work.
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("fastboot.cli.serve", "Serve MODEL like `vllm serve`, restored from a snapshot."),
    "snapshot": (
        "fastboot.cli.snapshot",
        "Create (for replicas), list, inspect, verify and remove snapshots.",
    ),
    "agent": (
        "fastboot.cli.agent",
        "Run the per-host agent that restores replicas of snapshots (HTTP API).",
    ),
    "doctor": (
        "fastboot.cli.doctor",
        "Check what this host can do and say how to fix what it can't.",
    ),
    "image": ("fastboot.cli.image", "Build, mount, push and pull lazy images (envs, weights)."),
    "model": ("fastboot.cli.model", "Write local test models (deterministic, nothing downloaded)."),
    "router": ("fastboot.cli.router", "Run the fleet's OpenAI-compatible router (--config FILE)."),
    "install-criu": (
        "fastboot.cli.install_criu",
        "Install CRIU >= 4.2 with fastboot's page-mapping patch into a private prefix (root).",
    ),
}


def build_parser(selected: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastboot",
        description="LLM inference replicas that start in seconds.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"fastboot {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        if name == selected:
            module = importlib.import_module(module_name)
            sub = subparsers.add_parser(
                name, help=help_text, description=help_text, allow_abbrev=False
            )
            module.add_arguments(sub)
            sub.set_defaults(run=module.run)
        else:
            subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def _parse(
    parser: argparse.ArgumentParser, argv: list[str], selected: str | None
) -> argparse.Namespace:
    if selected in COMMANDS:
        module = importlib.import_module(COMMANDS[selected][0])
        rest = argv[argv.index(selected) + 1 :]
        if getattr(module, "PASSTHROUGH", False) and rest not in (["-h"], ["--help"]):
            return argparse.Namespace(command=selected, argv=rest, run=module.run)
        action = getattr(module, "PASSTHROUGH_AFTER", None)
        if action in rest and rest[rest.index(action) + 1 :] not in (["-h"], ["--help"]):
            # argparse's REMAINDER refuses a first token that looks like an option.
            at = len(argv) - len(rest) + rest.index(action)
            args = parser.parse_args(argv[: at + 1])
            args.argv = argv[at + 1 :]
            return args
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    selected = next((a for a in args_list if not a.startswith("-")), None)
    parser = build_parser(selected if selected in COMMANDS else None)
    args = _parse(parser, args_list, selected)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2 if args_list else 0
    logs.configure()
    try:
        code: int = args.run(args)
    except FastbootError as exc:
        logger.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130
    return code
