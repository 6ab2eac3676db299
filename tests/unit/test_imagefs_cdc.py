"""Content-defined chunks of page images: where they cut, that equal runs of pages become equal
chunks wherever they sit, and that an index of such chunks reads back byte for byte."""

from __future__ import annotations

import io
import os
import random
from pathlib import Path

import numpy as np
import pyfuse3
import pytest
import trio

from fastboot.errors import ImageCorruptError
from fastboot.imagefs import cdc
from fastboot.imagefs import index as ix
from fastboot.imagefs.build import build
from fastboot.imagefs.fs import ImageOperations
from fastboot.imagefs.metrics import Metrics
from fastboot.imagefs.store import ImageStore
from fastboot.imagefs.tiers import Tiers
from tests.unit.test_imagefs_index import reencoded

PAGE = cdc.PAGE


def pages(count: int, seed: int) -> bytes:
    """Distinct pseudo-random pages, some of them zero (as in a page image)."""
    rng = random.Random(seed)
    out = bytearray()
    for _ in range(count):
        out += bytes(PAGE) if rng.random() < 0.1 else rng.randbytes(PAGE)
    return bytes(out)


def cut(data: bytes, block: int = cdc.BLOCK) -> list[bytes]:
    return [bytes(c) for c in cdc.chunks(io.BytesIO(data), block=block)]


def test_chunks_cover_the_file_on_page_boundaries_within_bounds() -> None:
    data = pages(3000, 1) + b"tail"  # a partial last page joins the last chunk
    got = cut(data, block=64 * PAGE)  # chunks carried across many blocks
    assert b"".join(got) == data
    assert all(len(c) % PAGE == 0 for c in got[:-1])
    assert all(cdc.MIN_PAGES * PAGE <= len(c) <= cdc.MAX_PAGES * PAGE for c in got[:-1])
    assert 3000 / cdc.MAX_PAGES < len(got) < 3000 / cdc.MIN_PAGES
    # the block size is an implementation detail: the same cuts either way
    assert got == cut(data)


def test_zero_runs_become_max_size_chunks() -> None:
    got = cut(bytes(3 * cdc.MAX_PAGES * PAGE))
    assert [len(c) for c in got] == [cdc.MAX_PAGES * PAGE] * 3


def test_equal_runs_of_pages_are_equal_chunks_at_other_offsets() -> None:
    shared = pages(4000, 2)
    first = pages(37, 3) + shared + pages(500, 4)
    second = pages(1234, 5) + shared[: 2000 * PAGE] + pages(3, 6) + shared[2000 * PAGE :]
    a, b = set(cut(first)), set(cut(second))
    common = sum(len(c) for c in a & b)
    # only the chunks around the run's starts and the splice differ
    assert common >= 0.85 * len(shared)
    # fixed-size chunks at fixed offsets share nothing here
    size = cdc.MAX_PAGES * PAGE
    fixed = {first[i : i + size] for i in range(0, len(first), size)}
    assert not fixed & {second[i : i + size] for i in range(0, len(second), size)}


def test_content_defined_names() -> None:
    assert cdc.content_defined(b"/x/images/pages-12.img", cdc.PAGE_IMAGES)
    assert not cdc.content_defined("/x/images/pagemap-12.img", cdc.PAGE_IMAGES)
    assert not cdc.content_defined("pages-1.img", ())


@pytest.fixture
def page_image(tmp_path: Path) -> tuple[ImageStore, ix.ImageIndex, Path]:
    src = tmp_path / "snap"
    (src / "images").mkdir(parents=True)
    (src / "images" / "pages-1.img").write_bytes(pages(700, 7) + bytes(100))
    (src / "images" / "core-1.img").write_bytes(os.urandom(3 * 8192))
    store = ImageStore(tmp_path / "store")
    ref = build(
        store,
        src,
        "snap",
        chunk_size=64 * PAGE,
        progress=False,
        content_defined=cdc.PAGE_IMAGES,
    )
    return store, store.load_index(ref.index), src


def test_the_index_finds_variable_chunks_by_offset(
    page_image: tuple[ImageStore, ix.ImageIndex, Path],
) -> None:
    _, index, src = page_image
    entry = index.resolve("images/pages-1.img") or 0
    other = index.resolve("images/core-1.img") or 0
    assert int(index.entries["chunk_shift"][entry]) == ix.VARIABLE
    assert index.chunk_size_of(other) == 64 * PAGE and index.chunk_count(other) == 1
    data = (src / "images" / "pages-1.img").read_bytes()
    count = index.chunk_count(entry)
    assert count > 700 // 64  # cut by content, at most 64 pages (the chunk size) each
    offsets = [index.chunk_offset(entry, k) for k in range(count + 1)]
    assert offsets[0] == 0 and offsets[-1] == len(data) and offsets == sorted(offsets)
    for k in range(count):
        ref = index.file_chunk(entry, k)
        assert offsets[k + 1] - offsets[k] == ref.raw_length <= 64 * PAGE
        for off in (offsets[k], offsets[k + 1] - 1):
            assert index.chunk_at(entry, off) == k


def test_a_file_whose_chunks_do_not_add_up_is_refused(
    page_image: tuple[ImageStore, ix.ImageIndex, Path],
) -> None:
    _, index, _ = page_image
    chunks = index.chunks.copy()
    entry = index.resolve("images/pages-1.img") or 0
    chunks["raw_length"][int(index.entries["chunk_start"][entry])] -= PAGE
    with pytest.raises(ImageCorruptError, match="bad chunk lengths"):
        ix.ImageIndex(reencoded(index, chunks=chunks))


def test_reads_across_variable_chunks_return_the_file(
    page_image: tuple[ImageStore, ix.ImageIndex, Path],
) -> None:
    store, index, src = page_image
    data = (src / "images" / "pages-1.img").read_bytes()
    metrics = Metrics()
    ops = ImageOperations(index, Tiers(store, None, metrics), metrics, None, 4, None)
    entry = index.resolve("images/pages-1.img") or 0
    rng = random.Random(8)
    spans = [(0, len(data)), (len(data) - 5000, 10_000)]
    spans += [(rng.randrange(len(data)), rng.randrange(1, 300_000)) for _ in range(40)]

    async def main() -> list[bytes]:
        async with trio.open_nursery() as nursery:
            ops.tiers.nursery = nursery
            info = await ops.open(pyfuse3.InodeT(entry + 1), os.O_RDONLY, None)  # type: ignore[arg-type]
            got = [bytes(await ops.read(info.fh, off, size)) for off, size in spans]
            await ops.release(info.fh)
            nursery.cancel_scope.cancel()
        return got

    got = trio.run(main)
    assert got == [data[off : off + size] for off, size in spans]


def test_a_second_image_with_the_pages_moved_adds_little(tmp_path: Path) -> None:
    shared = pages(3000, 9)
    store = ImageStore(tmp_path / "store")
    added = []
    for n, prefix in enumerate((pages(10, 10), pages(333, 11))):
        src = tmp_path / f"snap{n}"
        src.mkdir()
        (src / "pages-1.img").write_bytes(prefix + shared)
        before = sum(p.stat().st_size for p in (store.root / "packs").glob("*.pack")) if n else 0
        build(store, src, f"s{n}", progress=False, content_defined=cdc.PAGE_IMAGES)
        after = sum(p.stat().st_size for p in (store.root / "packs").glob("*.pack"))
        added.append(after - before)
    assert added[1] < 0.25 * added[0]


def test_fingerprints_are_fixed() -> None:
    """Changing them silently ends dedup with every image built before: this pins them."""
    page = np.arange(PAGE // 8, dtype="<u8").tobytes()
    assert cdc.fingerprints(memoryview(page)).tolist() == [3765567277347871184]
    assert cdc.fingerprints(memoryview(bytes(PAGE))).tolist() == [0]
