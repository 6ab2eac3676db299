"""The digest cache: reuse only while a file's identity is unchanged; never trust a changed file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from fastboot.snapshot.digests import DigestCache, file_digest


def test_unchanged_file_is_hashed_once_across_instances(tmp_path: Path) -> None:
    data = tmp_path / "weights.bin"
    data.write_bytes(b"w" * 10_000)
    first = DigestCache(tmp_path / "cache.json")
    assert first.digest(data) == file_digest(data)
    first.save()
    assert stat.S_IMODE((tmp_path / "cache.json").stat().st_mode) == 0o600
    again = DigestCache(tmp_path / "cache.json")
    assert again.digest(data) == file_digest(data)
    assert (again.hits, again.misses) == (1, 0)


def test_same_size_rewrite_is_rehashed(tmp_path: Path) -> None:
    data = tmp_path / "weights.bin"
    data.write_bytes(b"a" * 100)
    cache = DigestCache(tmp_path / "cache.json")
    old = cache.digest(data)
    st = data.stat()
    data.write_bytes(b"b" * 100)
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with mtime put back: ctime moved
    assert cache.digest(data) == file_digest(data) != old
    assert cache.misses == 2


def test_renamed_directory_keeps_the_entries(tmp_path: Path) -> None:
    (tmp_path / ".partial-x").mkdir()
    data = tmp_path / ".partial-x" / "a.bin"
    data.write_bytes(b"x" * 64)
    cache = DigestCache(tmp_path / "cache.json")
    digest = cache.digest(data)
    os.rename(tmp_path / ".partial-x", tmp_path / "x")  # how publish puts a snapshot in place
    assert cache.digest(tmp_path / "x" / "a.bin") == digest
    assert cache.hits == 1


def test_unreadable_cache_file_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "cache.json").write_text("{not json")
    data = tmp_path / "a.bin"
    data.write_bytes(b"y")
    cache = DigestCache(tmp_path / "cache.json")
    assert cache.digest(data) == file_digest(data)
    cache.save()
    assert DigestCache(tmp_path / "cache.json").digest(data) == file_digest(data)
