"""Every FASTBOOT_* environment variable, in one place.

Read through the functions below (not os.environ directly) so the names, defaults and meaning
live here only.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Where `fastboot install-criu` puts a private CRIU when the system's is too old.
DEFAULT_CRIU_PREFIX = Path("/opt/fastboot/criu")


def criu_override() -> str | None:
    """FASTBOOT_CRIU: path of the criu executable to use, instead of searching for one."""
    return os.environ.get("FASTBOOT_CRIU") or None


def criu_prefix() -> Path:
    """FASTBOOT_CRIU_PREFIX: where a private CRIU is installed (default /opt/fastboot/criu)."""
    return Path(os.environ.get("FASTBOOT_CRIU_PREFIX") or DEFAULT_CRIU_PREFIX)


def copy_pages() -> bool:
    """FASTBOOT_COPY_PAGES=1: restores read every page of the images into the process, even
    with a CRIU that can map them copy-on-write (fastboot.snapshot.criu.PAGE_MAPPING)."""
    return os.environ.get("FASTBOOT_COPY_PAGES", "") not in ("", "0")


def lazy_pages() -> bool:
    """FASTBOOT_LAZY_PAGES=1: a restore from a lazily mounted remote snapshot uses CRIU's
    `--lazy-pages` (userfaultfd; pages served from the mount by a `criu lazy-pages` daemon as the
    engine touches them) instead of mapping the page images (fastboot.snapshot.criu.restore)."""
    return os.environ.get("FASTBOOT_LAZY_PAGES", "") not in ("", "0")


def log_level() -> str:
    """FASTBOOT_LOG_LEVEL: level of fastboot's own log lines (default INFO)."""
    return os.environ.get("FASTBOOT_LOG_LEVEL", "INFO").upper()


def home() -> Path:
    """FASTBOOT_HOME: fastboot's state (snapshots, caches). Default: /var/lib/fastboot for root,
    else $XDG_STATE_HOME/fastboot (~/.local/state/fastboot)."""
    if value := os.environ.get("FASTBOOT_HOME"):
        return Path(value)
    if os.geteuid() == 0:
        return Path("/var/lib/fastboot")
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "fastboot"


def snapshot_dir() -> Path:
    """Where snapshots live unless a command says otherwise ($FASTBOOT_HOME/snapshots)."""
    return home() / "snapshots"


def image_store() -> Path:
    """FASTBOOT_IMAGE_STORE: the local image store (default $FASTBOOT_HOME/images)."""
    if value := os.environ.get("FASTBOOT_IMAGE_STORE"):
        return Path(value)
    return home() / "images"


def image_remote() -> str | None:
    """FASTBOOT_IMAGE_REMOTE: base URL of the remote image store (a static HTTP server)."""
    return os.environ.get("FASTBOOT_IMAGE_REMOTE") or None


def snapshot_remote() -> str | None:
    """FASTBOOT_SNAPSHOT_REMOTE: base URL of the remote image store that `fastboot serve` and
    agents restore snapshots they lack from (`fastboot snapshot push` publishes there)."""
    return os.environ.get("FASTBOOT_SNAPSHOT_REMOTE") or None


def snapshot_fetch() -> str:
    """FASTBOOT_SNAPSHOT_FETCH: how a snapshot missing here is brought from the snapshot
    remote: "copy" (default) or "mount" (fastboot.imagefs.lazy_snapshots.FETCH_MODES)."""
    return os.environ.get("FASTBOOT_SNAPSHOT_FETCH") or "copy"


def image_push_dir() -> str | None:
    """FASTBOOT_IMAGE_PUSH_DIR: the directory `fastboot image push` publishes into (what the
    remote's static HTTP server serves)."""
    return os.environ.get("FASTBOOT_IMAGE_PUSH_DIR") or None


#: Set by fastboot in the environment of an engine it launched. The engine-side plugin
#: (fastboot_patches) stays inert unless it is present. patches/report.py repeats both names:
#: it runs inside the engine and imports nothing from fastboot.
ENGINE_CHILD = "FASTBOOT_ENGINE_CHILD"

#: Set by fastboot to a file where the engine-side plugin appends one line per process that
#: loaded it, so the launcher can verify the plugin really ran (engines swallow plugin errors).
PLUGIN_REPORT = "FASTBOOT_PLUGIN_REPORT"
