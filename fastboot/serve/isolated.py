"""`fastboot serve MODEL ... --fastboot-isolated`: serve as one replica, published on the user's
--host/--port.

The engine runs the way the agent runs replicas (fastboot.boot.site.IsolatedSite): in its own
network, mount and pid namespaces, listening on 0.0.0.0:8000 inside; a relay
(fastboot.host.relay) publishes it where the user asked. Its snapshot is the same one
`fastboot snapshot create` makes from the same flags (--host/--port are not part of it), so the
snapshot a user warmed with `fastboot serve` is the one agents restore as many replicas, on this
host or another. The boot is the same sequence as `fastboot serve`'s (fastboot.boot.sequence):

    later runs: verify -> restore -> ready -> resume -> oracle -> relay -> serve
    first run:  cold boot in this run's namespace -> warm up -> oracle -> dump -> publish
                -> restore (the proof) -> relay -> serve
    anything wrong: the reason is logged and the engine cold boots in the namespace
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fastboot.boot import sequence
from fastboot.boot.create import isolated_target
from fastboot.boot.site import INNER_PORT, IsolatedSite
from fastboot.engines import hooks
from fastboot.host import netns
from fastboot.host.relay import Relay
from fastboot.host.supervisor import EngineTree, become_subreaper
from fastboot.serve.config import ServeConfig, run_until_stopped

logger = logging.getLogger(__name__)

#: Links of `fastboot serve --fastboot-isolated` runs (one /30 per serving process).
SERVE_SUBNET = "10.211.0.0/16"
_LISTEN_FLAGS = ("--host", "--port")


def strip_listen_flags(argv: list[str]) -> list[str]:
    """argv without --host/--port (as `--port 8001` or `--port=8001`): the relay takes them.
    After a `--` everything stays (a server command's own flags: the command engine)."""
    out: list[str] = []
    skip = False
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + argv[i:]
        if skip:
            skip = False
        elif arg in _LISTEN_FLAGS:
            skip = True
        elif not arg.startswith(tuple(f"{f}=" for f in _LISTEN_FLAGS)):
            out.append(arg)
    return out


def serve_isolated(config: ServeConfig) -> int:
    """Run until the engine exits or SIGINT/SIGTERM; returns the exit code (see module doc)."""
    hooks.load(config.hooks)
    become_subreaper()
    pid = os.getpid()
    link = netns.create(f"fb-serve-{pid}", f"fbv{pid % 100000}", SERVE_SUBNET, pid % 16384)
    relay = Relay(config.host or "0.0.0.0", config.port or 8000, link.ip, INNER_PORT)

    def boot(run_dir: Path) -> EngineTree:
        relay.bind()  # a busy port fails before any boot
        tree = _boot(config, IsolatedSite(link), run_dir)
        relay.start()  # only a checked engine (oracle matched) gets traffic
        logger.info(
            "serving on %s:%d (engine at %s:%d)", relay.host, relay.port, link.ip, INNER_PORT
        )
        return tree

    def clean_up() -> None:
        relay.stop()
        netns.delete(link)

    return run_until_stopped(boot, clean_up)


def _boot(config: ServeConfig, site: IsolatedSite, run_dir: Path) -> EngineTree:
    spec = config.boot_spec(site.engine_argv(strip_listen_flags(config.engine_argv)))
    if not config.snapshot:
        return sequence.boot(spec, site, None, run_dir)
    digests = sequence.digest_cache(config.store)
    try:
        target = isolated_target(spec, site, config.store, digests)
        return sequence.boot(spec, site, target, run_dir, refresh=config.refresh)
    finally:
        digests.save()
