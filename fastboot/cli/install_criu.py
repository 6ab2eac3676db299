"""`fastboot install-criu [--prefix DIR]`: a CRIU >= 4.2, built with fastboot's page-mapping patch
where possible (provision-criu.sh says how), never replacing the system's libc."""

from __future__ import annotations

import argparse
import subprocess

from fastboot import envs
from fastboot.errors import UsageError
from fastboot.snapshot.criu import provision_script


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prefix",
        default=str(envs.criu_prefix()),
        help="where to install (default: %(default)s; fastboot finds it there by itself)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        return subprocess.run(
            ["bash", str(provision_script()), args.prefix], check=False
        ).returncode
    except FileNotFoundError as exc:
        raise UsageError("install-criu needs bash and apt-get (Debian or Ubuntu)") from exc
