"""Pull an image from a remote store, and verify what a local store holds of an image.

`pull` fetches the ref, the index (checked against its digest) and the prefetch profile: that is
all a lazy mount needs. With `everything=True` it also fetches every chunk into the SSD cache
(verified), so the image then mounts and serves with the remote down.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import sys
import time
from dataclasses import dataclass, replace

from fastboot.errors import ImageCorruptError, ImageFSError
from fastboot.imagefs.build import progress_bar
from fastboot.imagefs.index import ChunkRef, ImageIndex
from fastboot.imagefs.metrics import Metrics
from fastboot.imagefs.prefetch import fetch_span, plan
from fastboot.imagefs.remote import RemoteClient
from fastboot.imagefs.store import ImageRef, ImageStore, check_name, decode, digest_of
from fastboot.imagefs.tiers import Tiers

logger = logging.getLogger(__name__)


def pull(
    store: ImageStore,
    name: str,
    remote_url: str,
    *,
    everything: bool = False,
    progress: bool | None = None,
) -> ImageRef:
    """Make image `name` of the remote at `remote_url` mountable here (lazily by default)."""
    check_name(name)
    store.ensure()
    started = time.monotonic()
    client = RemoteClient(remote_url)
    try:
        body = client.get(f"refs/{name}.json")
        assert body is not None
        try:
            remote_ref = ImageRef.from_json(json.loads(body), f"{remote_url}/refs/{name}.json")
        except ValueError as exc:
            raise ImageCorruptError(
                f"{remote_url}/refs/{name}.json is not an image ref ({exc}); push it again"
            ) from exc
        path = store.index_path(remote_ref.index)
        if not path.exists():
            blob = client.get(f"index/{remote_ref.index}")
            assert blob is not None
            if digest_of(blob).hex() != remote_ref.index:
                raise ImageCorruptError(
                    f"the index of {name} on {remote_url} does not match its digest; "
                    "push the image again"
                )
            ImageIndex(bytes(blob), origin=f"{remote_url}/index/{remote_ref.index}")
            store.write_atomic(path, blob)
        profile = client.get(f"profiles/{remote_ref.index}", missing_ok=True)
        if profile is not None and not store.profile_path(remote_ref.index).exists():
            store.write_atomic(store.profile_path(remote_ref.index), profile)
        ref = replace(remote_ref, remote=remote_url)
        store.write_ref(ref)
        if everything:
            fetch_all(store, store.load_index(ref.index), client, progress)
    finally:
        client.close()
    logger.info("pulled image %s from %s in %.1f s", name, remote_url, time.monotonic() - started)
    return ref


def fetch_all(
    store: ImageStore, index: ImageIndex, client: RemoteClient, progress: bool | None
) -> int:
    """Fetch every chunk of `index` that no local tier has into the SSD cache (verified)."""
    tiers = Tiers(store, client, Metrics())  # only its blocking half: no trio loop here
    refs = [index.chunk(int(i)) for i in index.unique_chunks()]
    wanted = [r for r in refs if not tiers.is_local(r)]
    total = sum(r.length for r in wanted)
    show = sys.stderr.isatty() if progress is None else progress
    with (
        progress_bar(show, total, "fetching") as advance,
        concurrent.futures.ThreadPoolExecutor(8) as pool,
    ):
        for got in pool.map(lambda span: fetch_span(tiers, span), plan(wanted)):
            advance(got)
    missing = [r for r in wanted if not tiers.is_local(r)]
    if missing:
        raise ImageFSError(f"{len(missing)} chunks could not be fetched (see the log); pull again")
    return total


@dataclass
class VerifyReport:
    chunks: int = 0
    verified: int = 0
    corrupt: int = 0
    not_local: int = 0
    bytes: int = 0


def verify(store: ImageStore, name: str) -> VerifyReport:
    """Re-hash every chunk of image `name` that a local tier holds. Corrupt cached copies are
    removed (a mount refetches them); a corrupt pack is reported (rebuild or pull again)."""
    ref = store.read_ref(name)
    index = store.load_index(ref.index)
    report = VerifyReport()

    def check(chunk: ChunkRef) -> str:
        stored = store.read_local(chunk)
        if stored is not None:
            try:
                data = decode(chunk, stored)
            except ImageCorruptError:
                return "corrupt"
            return "ok" if digest_of(data) == chunk.digest else "corrupt"
        cached = store.read_cached(chunk.hex)
        if cached is None:
            return "missing"
        if digest_of(cached) == chunk.digest:
            return "ok"
        logger.error("cached chunk %s is corrupt; removed (a mount refetches it)", chunk.hex[:16])
        store.drop_cached(chunk.hex)
        return "corrupt"

    refs = [index.chunk(int(i)) for i in index.unique_chunks()]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for chunk, result in zip(refs, pool.map(check, refs), strict=True):
            report.chunks += 1
            if result == "ok":
                report.verified += 1
                report.bytes += chunk.length
            elif result == "corrupt":
                report.corrupt += 1
                logger.error("chunk %s (pack %s) is corrupt", chunk.hex[:16], chunk.pack[:16])
            else:
                report.not_local += 1
    return report
