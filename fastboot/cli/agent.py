"""`fastboot agent`: the per-host daemon that restores replicas of snapshots (docs/agent-api.md)."""

from __future__ import annotations

import argparse
import ipaddress
import re
from pathlib import Path

from fastboot import envs
from fastboot.cli.sizes import parse_size
from fastboot.errors import UsageError
from fastboot.host import netns


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen", default="127.0.0.1:7070", help="HOST:PORT (default %(default)s)"
    )
    parser.add_argument(
        "--token-file", type=Path, required=True, help="file holding the API's bearer token"
    )
    parser.add_argument(
        "--snapshot-remote",
        default=None,
        help="remote image store (http://) to restore snapshots this host lacks from, lazily "
        "(`fastboot snapshot push`; default $FASTBOOT_SNAPSHOT_REMOTE)",
    )
    parser.add_argument("--name", default="a", help="short agent name, [a-z0-9]{1,6} (default a)")
    parser.add_argument(
        "--snapshot-dir", type=Path, default=None, help="default $FASTBOOT_HOME/snapshots"
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="replica logs (default $FASTBOOT_HOME/agent-NAME)",
    )
    parser.add_argument(
        "--slots",
        type=int,
        default=None,
        help="replicas at once (default: GPUs, or memory / 3 GiB)",
    )
    parser.add_argument(
        "--subnet", default=netns.DEFAULT_SUBNET, help="replica links (one /30 each)"
    )
    parser.add_argument(
        "--replica-route",
        action="append",
        default=[],
        metavar="CIDR",
        help="a network replicas answer through this host, e.g. the router's (repeatable); "
        "route --subnet to this host there",
    )
    parser.add_argument(
        "--replica-memory", type=parse_size, default=None, help="cgroup memory limit per replica"
    )
    parser.add_argument(
        "--replica-cpus", type=float, default=None, help="CPU cores per replica (cgroup quota)"
    )
    parser.add_argument(
        "--ready-timeout", type=float, default=120.0, help="seconds a restore may take to answer"
    )


def run(args: argparse.Namespace) -> int:

    import uvloop

    # aiohttp and the agent load for `fastboot agent` itself, not for its --help.
    from fastboot.agent import resources
    from fastboot.agent.replicas import AgentConfig
    from fastboot.agent.server import serve
    from fastboot.host.cgroups import Limits
    from fastboot.snapshot.store import Store

    if not re.fullmatch(r"[a-z0-9]{1,6}", args.name):
        raise UsageError(f"--name {args.name!r}: use 1 to 6 of a-z and 0-9")
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--listen {args.listen!r}: give HOST:PORT")
    try:
        token = args.token_file.read_text().strip()
    except OSError as exc:
        raise UsageError(f"cannot read --token-file {args.token_file}: {exc.strerror}") from exc
    if not token:
        raise UsageError(f"--token-file {args.token_file} is empty")
    for network in args.replica_route:
        try:
            ipaddress.ip_network(network)
        except ValueError as exc:
            raise UsageError(f"--replica-route {network!r}: {exc}; give a CIDR") from exc
    config = AgentConfig(
        name=args.name,
        store=Store(args.snapshot_dir or envs.snapshot_dir()),
        state_dir=args.state_dir or envs.home() / f"agent-{args.name}",
        slots=args.slots if args.slots is not None else resources.probe().slots,
        subnet=args.subnet,
        routes=tuple(args.replica_route),
        limits=Limits(args.replica_memory, args.replica_cpus),
        ready_timeout_s=args.ready_timeout,
        snapshot_remote=args.snapshot_remote or envs.snapshot_remote(),
    )
    uvloop.run(serve(config, token, host.strip("[]"), int(port)))
    return 0
