"""A --fastboot-hooks module for the integration tests: records each call, with the engine's
health at that moment, to $FASTBOOT_TEST_HOOKS_LOG."""

from __future__ import annotations

import os
import urllib.request


def _record(event: str, url: str) -> None:
    with urllib.request.urlopen(url + "/health", timeout=10) as response:
        status = response.status
    with open(os.environ["FASTBOOT_TEST_HOOKS_LOG"], "a") as log:
        log.write(f"{event} {url} {status}\n")


def quiesce(url: str) -> None:
    _record("quiesce", url)


def resume(url: str) -> None:
    _record("resume", url)
