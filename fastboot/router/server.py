"""Run a Router until SIGINT/SIGTERM, on uvloop: `fastboot router --config FILE` lands here."""

from __future__ import annotations

import asyncio
import logging
import signal

from fastboot.router.app import Router
from fastboot.router.config import RouterConfig

logger = logging.getLogger(__name__)


async def serve(config: RouterConfig, stop: asyncio.Event | None = None) -> None:
    """Start the router, wait for `stop` (or a signal), then stop it cleanly."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    router = Router(config)
    try:
        await router.start()
        await stop.wait()
        logger.info("router stopping")
    finally:
        await router.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def run(config: RouterConfig) -> int:
    """Serve on uvloop (one event loop, one process) until interrupted."""
    import uvloop

    uvloop.run(serve(config))
    return 0
