"""Content-defined chunks of page images: cut where a page's own content says, so a run of pages
that two snapshots share becomes the same chunks in both, wherever it sits in each file.

CRIU writes a process's dumped pages into `pages-*.img` in address order. Two snapshots of one
model and engine (another port, other flags, a refresh) hold many of the same pages (weights,
tables built at load), but at other offsets of their page images: the heap before them has
another size, ASLR put the mappings elsewhere. Fixed 4 MiB chunks at fixed offsets of one file
therefore never equal the other's (measured: a second 1 GiB-model snapshot shared 0 of its
chunks with the first, `benchmarks/fresh_host.py --dedup`), although 23.5% of its distinct
non-zero pages were in the first.

A chunk ends after every page whose fingerprint has the CUT_BITS set (one page in
AVERAGE_PAGES, at random), but no chunk is shorter than MIN_PAGES or longer than MAX_PAGES: a
shared run resynchronises at its first cutting page after MIN_PAGES, and from there on its
chunks are identical in both snapshots. Cuts fall on page boundaries only (the unit CRIU adds
and removes), so no byte-level rolling hash is needed.

The fingerprint is cheap and content-only: every 8th 64-bit word of the page times a fixed odd
multiplier, summed modulo 2**64 (numpy, about a second per 3 GB here). A zero page's is 0 and
never cuts, so runs of zero pages become MAX_PAGES chunks (which zstd shrinks to nothing). The
multipliers are derived from a fixed string with BLAKE3: they must never change, or chunks of
images built before and after would stop matching (a matter of dedup, never of correctness:
every chunk is still named by the BLAKE3 of its bytes).
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterator
from typing import Any, BinaryIO

import numpy as np

PAGE = 4096
MIN_PAGES = 32
"""128 KiB: shorter chunks would make the index and the fetches per byte costlier."""
AVERAGE_PAGES = 128
"""512 KiB between cutting pages on average (so about 640 KiB chunks with MIN_PAGES)."""
MAX_PAGES = 1024
"""4 MiB, the default fixed chunk size: no content-defined chunk is bigger."""
BLOCK = 16 * 1024 * 1024
"""Bytes read and fingerprinted at a time."""

PAGE_IMAGES = ("pages-*.img",)
"""CRIU's page images (name patterns): the files of a snapshot cut by content."""

_SAMPLED = PAGE // 8 // 8


def _multipliers() -> np.ndarray[Any, Any]:
    import blake3

    raw = blake3.blake3(b"fastboot page-image chunk cuts v1").digest(length=_SAMPLED * 8)
    return np.frombuffer(raw, dtype="<u8") | np.uint64(1)


_MULTIPLIERS = _multipliers()
_CUT_MASK = np.uint64(AVERAGE_PAGES - 1)


def content_defined(name: str | bytes, patterns: tuple[str, ...]) -> bool:
    """Whether a file called `name` (its base name) is cut by content."""
    base = os.path.basename(os.fsdecode(name))
    return any(fnmatch.fnmatchcase(base, p) for p in patterns)


def fingerprints(pages: memoryview) -> np.ndarray[Any, Any]:
    """One fingerprint per whole 4 KiB page of `pages`."""
    count = len(pages) // PAGE
    words = np.frombuffer(pages[: count * PAGE], dtype="<u8").reshape(count, PAGE // 8)
    sampled = words[:, ::8]
    summed: np.ndarray[Any, Any] = (sampled * _MULTIPLIERS).sum(axis=1, dtype=np.uint64)
    return summed


def cutting(fps: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Positions of the pages after which a chunk may end."""
    return np.flatnonzero(((fps >> np.uint64(40)) & _CUT_MASK) == _CUT_MASK)


class PageCutter:
    """Where chunks end, block by block: `cuts(fps)` is given each block's page fingerprints in
    file order and answers the page positions (within that block, exclusive ends) where a chunk
    ends; the chunk open at a block's end carries into the next."""

    def __init__(self, min_pages: int = MIN_PAGES, max_pages: int = MAX_PAGES) -> None:
        self.min_pages = min_pages
        self.max_pages = max_pages
        self._open = 0
        """Pages of the chunk still open from earlier blocks."""

    def cuts(self, fps: np.ndarray[Any, Any]) -> list[int]:
        ends: list[int] = []
        start = -self._open
        for page in cutting(fps).tolist():
            end = page + 1
            while end - start > self.max_pages:
                start += self.max_pages
                ends.append(start)
            if end - start >= self.min_pages:
                ends.append(end)
                start = end
        while len(fps) - start >= self.max_pages:
            start += self.max_pages
            ends.append(start)
        self._open = len(fps) - start
        return ends


def chunks(
    f: BinaryIO, block: int = BLOCK, cutter: PageCutter | None = None
) -> Iterator[memoryview]:
    """The content-defined chunks of the file read from `f`, in order. A chunk is a view valid
    only until the next one is asked for (the caller hashes and stores it at once). A partial
    last page joins the last chunk."""
    cutter = cutter or PageCutter()
    buf = bytearray(block)
    pending = bytearray()
    while True:
        n = _read_full(f, memoryview(buf))
        view = memoryview(buf)[:n]
        whole = n // PAGE
        ends = cutter.cuts(fingerprints(view)) if whole else []
        begin = 0
        for end in ends:
            piece = view[begin : end * PAGE]
            if pending:
                pending += piece
                yield memoryview(pending)
                pending = bytearray()
            else:
                yield piece
            begin = end * PAGE
        pending += view[begin:]
        if n < block:
            break
    if pending:
        yield memoryview(pending)


def _read_full(f: BinaryIO, view: memoryview) -> int:
    """Fill view from f; fewer bytes only at the end of the file."""
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])  # type: ignore[attr-defined]
        if not n:
            break
        got += n
    return got
