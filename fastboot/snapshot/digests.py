"""File digests remembered by identity, so a boot does not re-hash unchanged gigabytes.

A restore used to hash every snapshot file (1.9 GB for the tiny model: 0.26 s of a 1.2 s
restore) and every model file (the snapshot key: 1 GiB of weights per boot). A file's digest is
remembered with its identity — device, inode, size, mtime_ns and ctime_ns — and reused only while
all five still match. Any write through the filesystem changes mtime and ctime, and ctime cannot
be set from user space, so a modified, truncated or replaced file is re-hashed and caught by its
manifest digest. What this does not catch is corruption below the filesystem (a bad disk block
under an unchanged inode); `fastboot snapshot verify` always re-hashes everything for that.

The cache is a small JSON file (0600) beside the snapshots, replaced atomically; it is keyed by
device and inode, so a snapshot directory renamed from .partial-* into place keeps its entries.
Concurrent writers may drop each other's new entries: that costs a re-hash, never a wrong answer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

#: The digest cache of a snapshot store, beside its snapshots.
DIGEST_CACHE = ".digests.json"

logger = logging.getLogger(__name__)

#: Entries kept (oldest dropped first): one per snapshot or model file in use.
MAX_ENTRIES = 20_000


def file_digest(path: Path) -> str:
    """BLAKE3 of a file's content (multi-threaded, memory-mapped)."""
    import blake3

    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    if path.stat().st_size:
        hasher.update_mmap(path)
    return str(hasher.hexdigest())


def _identity(st: os.stat_result) -> tuple[str, list[int]]:
    return f"{st.st_dev}:{st.st_ino}", [st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class DigestCache:
    """Digests of files by identity, loaded from and saved to one JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[str, list[object]] = {}
        self._dirty = False
        self.hits = 0
        self.misses = 0
        try:
            data = json.loads(path.read_text())
            if isinstance(data, dict):
                self._entries = {k: v for k, v in data.items() if isinstance(v, list)}
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            logger.debug("ignoring unreadable digest cache %s: %s", path, exc)

    def digest(self, path: Path) -> str:
        """The file's BLAKE3, from the cache while the file is unchanged, else computed."""
        key, stamp = _identity(path.stat())
        entry = self._entries.get(key)
        if entry is not None and entry[:3] == stamp and isinstance(entry[3], str):
            self.hits += 1
            return entry[3]
        self.misses += 1
        digest = file_digest(path)
        self.remember(path, digest)
        return digest

    def remember(self, path: Path, digest: str) -> None:
        """Record a digest computed elsewhere (stat is taken now: call it right after hashing
        a file that nobody writes any more)."""
        key, stamp = _identity(path.stat())
        self._entries.pop(key, None)  # re-insert last: the oldest entries go first
        self._entries[key] = [*stamp, digest]
        self._dirty = True

    def save(self) -> None:
        """Write the cache atomically (0600); failures only cost a re-hash next time."""
        if not self._dirty:
            return
        entries = list(self._entries.items())[-MAX_ENTRIES:]
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(dict(entries), f)
            os.replace(tmp, self.path)
            self._dirty = False
        except OSError as exc:
            logger.debug("could not save digest cache %s: %s", self.path, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()
