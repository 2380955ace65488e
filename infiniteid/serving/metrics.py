"""``ServerMetrics``: what ``GET /metrics`` exports (Prometheus text format).

One registry per server object, so two servers in one process (tests, a Ray
replica beside a driver) never share counters.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class ServerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("infiniteid_requests", "generate requests answered, by HTTP status", ["status"], registry=r)
        self.queue_depth = Gauge("infiniteid_queue_depth", "requests admitted and not yet in a running batch", registry=r)
        self.batch_size = Histogram("infiniteid_batch_size", "requests per batch run on the backend",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batches = Counter("infiniteid_batches", "batches run on the backend, by outcome", ["outcome"], registry=r)
        self.queue_wait = Histogram("infiniteid_queue_wait_seconds", "time from admission to the start of its batch",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.stage = Histogram("infiniteid_stage_seconds", "time per stage of a request (batch stages per batch)",
                               ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.cache_hits = Counter("infiniteid_cid_cache_hits", "faces whose c_id came from the cache", registry=r)
        self.cache_misses = Counter("infiniteid_cid_cache_misses", "faces encoded (face front end + ID encoder)", registry=r)
        self.face_frontend = Counter("infiniteid_face_frontend_runs", "face images through detection and ArcFace", registry=r)
        self.cache_bytes = Gauge("infiniteid_cid_cache_bytes", "bytes held by the c_id cache", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
