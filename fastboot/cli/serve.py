"""`fastboot serve MODEL [vllm serve flags] [--fastboot-... flags]`: `vllm serve`, restored."""

from __future__ import annotations

import argparse
from pathlib import Path

from fastboot import envs
from fastboot.cli import engine_choice
from fastboot.cli.engine_argv import FlagSpec
from fastboot.serve import ServeConfig, serve
from fastboot.snapshot import cpu_levels

FLAGS = [
    *engine_choice.FLAGS,
    FlagSpec("snapshot-dir", "where snapshots live (default $FASTBOOT_HOME/snapshots)", True),
    FlagSpec(
        "snapshot-remote",
        "restore a snapshot this host lacks straight from this remote image store (http://), "
        "lazily, where `fastboot snapshot push` published it (default $FASTBOOT_SNAPSHOT_REMOTE)",
        True,
    ),
    FlagSpec("no-snapshot", "plain cold boot: read and write no snapshot"),
    FlagSpec("refresh", "ignore an existing snapshot and make a new one"),
    FlagSpec(
        "hooks", "module with quiesce(url)/resume(url) run around the dump/after restore", True
    ),
    FlagSpec(
        "isolated",
        "run the engine as one replica (own network, mount and pid namespaces), published on "
        "--host/--port; its snapshot is the one `fastboot snapshot create` and agents use",
    ),
    FlagSpec(
        "env-image",
        "run the engine from this image of a Python virtual environment with vLLM "
        "(`fastboot image build .venv --name NAME`), mounted read-only at "
        "$FASTBOOT_HOME/mounts/<image id>",
        True,
    ),
    FlagSpec(
        "weights-image",
        "take the model from this image (`fastboot image build`), mounted read-only at "
        "$FASTBOOT_HOME/mounts/<image id>; MODEL is then the name clients use",
        True,
    ),
]

PASSTHROUGH = True
USAGE = (
    "fastboot serve MODEL [vllm serve flags] [--fastboot-FLAG ...] [-- engine flags]\n"
    "       fastboot serve [MODEL] --fastboot-engine command [--host H] [--port P] "
    "[--fastboot-FLAG ...] -- SERVER ARG...  ({host} {port} {model} in ARG filled in)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = USAGE
    parser.epilog = (
        "fastboot flags:\n"
        + "\n".join(f"  {f.flag}{' VALUE' if f.takes_value else ''}\n      {f.help}" for f in FLAGS)
        + "\n\nEverything else is passed to `vllm serve` verbatim, in order (with "
        "--fastboot-engine command: the server command after `--` is run as given)."
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("argv", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def engine_alias(argv: list[str]) -> list[str]:
    """`--engine NAME` / `--engine=NAME` (the issue's spelling; vLLM has no such flag) as
    `--fastboot-engine`; after a bare `--` everything stays the engine's."""
    out: list[str] = []
    for i, token in enumerate(argv):
        if token == "--":
            return out + argv[i:]
        name, eq, value = token.partition("=")
        out.append("--fastboot-engine" + eq + value if name == "--engine" else token)
    return out


def run(args: argparse.Namespace) -> int:
    split, engine = engine_choice.choose_engine(engine_alias(args.argv), FLAGS)
    snapshot_dir = split.fastboot.get("snapshot-dir")
    config = ServeConfig(
        model=engine.model,
        engine_argv=engine.engine_argv,
        engine=engine.name,
        engine_options=engine.options,
        host=engine.host,
        port=engine.port,
        snapshot_dir=Path(str(snapshot_dir)) if snapshot_dir else None,
        snapshot_remote=str(split.fastboot.get("snapshot-remote") or "") or envs.snapshot_remote(),
        snapshot=not split.fastboot.get("no-snapshot"),
        refresh=bool(split.fastboot.get("refresh")),
        hooks=str(split.fastboot["hooks"]) if "hooks" in split.fastboot else None,
        isolated=bool(split.fastboot.get("isolated")),
        cpu_baseline=str(split.fastboot.get("cpu-baseline", cpu_levels.NATIVE)),
        env_image=str(split.fastboot["env-image"]) if "env-image" in split.fastboot else None,
        weights_image=(
            str(split.fastboot["weights-image"]) if "weights-image" in split.fastboot else None
        ),
    )
    return serve(config)
