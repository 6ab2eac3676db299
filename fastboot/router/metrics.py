"""The router's Prometheus metrics (names from docs/router.md, prefix `router_`).

Each Router owns its own registry, so several routers (tests, benchmarks) can live in one process.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# Sub-millisecond to minutes: request latencies and router overhead share one layout.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1)
BOOT_BUCKETS = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class RouterMetrics:
    """Every metric the router exports."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "router_requests",
            "Requests answered, by model and status code",
            ["model", "code"],
            registry=r,
        )
        self.duration = Histogram(
            "router_request_duration_seconds",
            "Arrival to last byte sent, per model",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttfb = Histogram(
            "router_ttfb_seconds",
            "Arrival to the first upstream byte (time to first token for streams)",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "router_queue_depth", "Requests waiting for a replica", ["model"], registry=r
        )
        self.queue_wait = Histogram(
            "router_queue_wait_seconds",
            "Time requests waited in the queue (only those that waited)",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rejections = Counter(
            "router_queue_rejections",
            "Requests refused: full (429) or deadline (503)",
            ["model", "reason"],
            registry=r,
        )
        self.cold_start = Histogram(
            "router_cold_start_seconds",
            "Arrival to first token of the request that triggered a scale-up",
            ["model"],
            buckets=BOOT_BUCKETS,
            registry=r,
        )
        self.boot = Histogram(
            "router_replica_boot_seconds",
            "Replica boot phases: place (agent POST), restore and ready (agent's timings), "
            "total (placement start to ready seen by the router)",
            ["model", "phase"],
            buckets=BOOT_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge(
            "router_inflight", "In-flight requests per replica", ["model", "replica"], registry=r
        )
        self.replicas = Gauge(
            "router_replicas", "Replicas by state", ["model", "state"], registry=r
        )
        self.overhead = Histogram(
            "router_proxy_overhead_seconds",
            "Router-internal time of a request: before dispatch (queue wait excluded) and after "
            "the upstream's last byte",
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.prefix_route = Counter(
            "router_prefix_route",
            "Routing decisions: hit (prefix affinity), miss, imbalanced (affinity skipped)",
            ["decision"],
            registry=r,
        )
        self.replica_failures = Counter(
            "router_replica_failures",
            "Replicas lost: crashed mid-request, failed restore, dead, boot timeout",
            ["model", "reason"],
            registry=r,
        )
        self.host_losses = Counter(
            "router_host_losses",
            "Hosts declared lost: their agent silent past host_lost_s (crash, partition)",
            ["agent"],
            registry=r,
        )
        self.placement_errors = Counter(
            "router_placement_errors",
            "Agents that could not take a placement (unreachable, full, refused)",
            ["agent", "reason"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
