"""Prometheus metrics of one mount daemon (its own registry; served on loopback and/or a textfile).

Tiers are `ram` (the daemon's LRU), `local` (a pack in the local store), `cache` (the SSD chunk
cache) and `remote`. The kernel page cache is the tier above them all: reads it serves never reach
the daemon, so `fastboot_imagefs_read_bytes_total` counts only what the kernel asked for.

    chunk_hits_total{tier}       chunk lookups that tier answered
    chunk_misses_total{tier}     chunk lookups that fell through that tier
    chunk_bytes_total{tier}      bytes a tier below RAM delivered, as stored (local and remote:
                                 compressed; each chunk once per load)
    remote_raw_bytes_total       the same chunks from the remote, decompressed
    corrupt_chunks_total{tier}   chunks whose bytes failed their BLAKE3 (never served)
    remote_fetch_seconds         latency of one ranged GET (demand, readahead or prefetch)
    remote_errors_total          remote GETs that failed (down, bad status, short body)
    singleflight_coalesced_total misses that waited for an in-flight fetch of the same chunk
    readahead_chunks_total       chunks fetched ahead of a sequential reader
    prefetch_bytes_total         bytes fetched by replaying the recorded profile
    prefetch_used_bytes_total    of those, bytes a reader later asked the daemon for (pages
                                 the prefetch put in the page cache are read without asking)
    read_bytes_total             bytes returned to the kernel
    ops_total{op}, errors_total{op,errno}   FUSE requests and the ones answered with an error
"""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "fastboot_imagefs_"


class Metrics:
    """Every metric of one daemon, on a private registry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = PREFIX
        self.hits = Counter(p + "chunk_hits", "Chunk lookups a tier answered", ["tier"], registry=r)
        self.misses = Counter(
            p + "chunk_misses", "Chunk lookups that fell through a tier", ["tier"], registry=r
        )
        self.bytes = Counter(
            p + "chunk_bytes", "Chunk bytes a tier below RAM delivered", ["tier"], registry=r
        )
        self.corrupt = Counter(
            p + "corrupt_chunks", "Chunks that failed their digest", ["tier"], registry=r
        )
        self.remote_seconds = Histogram(
            p + "remote_fetch_seconds",
            "Latency of one ranged GET to the remote",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10),
            registry=r,
        )
        self.remote_errors = Counter(p + "remote_errors", "Remote GETs that failed", registry=r)
        self.remote_raw_bytes = Counter(
            p + "remote_raw_bytes", "Raw (decompressed) bytes of chunks from the remote", registry=r
        )
        self.coalesced = Counter(
            p + "singleflight_coalesced",
            "Misses that waited for an in-flight fetch of the same chunk",
            registry=r,
        )
        self.readahead = Counter(
            p + "readahead_chunks", "Chunks fetched ahead of a sequential reader", registry=r
        )
        self.prefetch_bytes = Counter(
            p + "prefetch_bytes", "Bytes fetched by replaying the profile", registry=r
        )
        self.prefetch_used = Counter(
            p + "prefetch_used_bytes", "Prefetched bytes a reader later asked for", registry=r
        )
        self.read_bytes = Counter(p + "read_bytes", "Bytes returned to the kernel", registry=r)
        self.passthrough_opens = Counter(
            p + "passthrough_opens",
            "Opens answered with a backing file (the kernel reads it without the daemon)",
            registry=r,
        )
        self.materialised_bytes = Counter(
            p + "materialised_bytes",
            "Bytes of files written whole to local disk for passthrough",
            registry=r,
        )
        self.ops = Counter(p + "ops", "FUSE requests", ["op"], registry=r)
        self.errors = Counter(
            p + "errors", "FUSE requests answered with an error", ["op", "errno"], registry=r
        )
        self.image_bytes = Gauge(p + "image_bytes", "Logical size of the image", registry=r)
        self.stored_bytes = Gauge(
            p + "image_stored_bytes", "Bytes of the image's distinct chunks", registry=r
        )
        for tier in ("ram", "local", "cache", "remote"):
            self.hits.labels(tier)
            self.misses.labels(tier)
            self.bytes.labels(tier)
            self.corrupt.labels(tier)

    def write_textfile(self, path: Path) -> None:
        from prometheus_client import write_to_textfile

        write_to_textfile(str(path), self.registry)


def parse(text: str) -> dict[str, float]:
    """Samples of an exposition as {'name{label="v",...}': value} (tests, benchmarks, `ls`)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def read_textfile(path: Path) -> dict[str, float]:
    return parse(path.read_text())
