"""``GET /metrics``: the server's Prometheus metrics, on prometheus_client with a registry of its own
(two servers in one process, as in the tests, do not share counters).

- ``fastdit_http_requests_total{method, route, status}``: requests answered, by route template
  and HTTP status;
- ``fastdit_jobs{status}``: jobs in the store per status (read from the store when scraped);
- ``fastdit_queue_depth``: accepted jobs not yet in a forward;
- ``fastdit_jobs_finished_total{status}``: completed, failed, cancelled (deleted while open);
- ``fastdit_forwards_total``, ``fastdit_samples_per_forward``, ``fastdit_tokens_per_forward``
  (histograms: how much each packed forward held; CFG's two samples count two) and
  ``fastdit_step_seconds`` (one sampler step of every active job: the forward and the updates).
"""

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _StoreCollector:
    def __init__(self, counts: Callable[[], dict[str, int]]):
        self.counts = counts

    def collect(self):
        family = GaugeMetricFamily("fastdit_jobs", "Jobs in the store by status", labels=["status"])
        for status, count in self.counts().items():
            family.add_metric([status], count)
        yield family


class Metrics:
    """Every metric of one server; ``counts`` and ``queue_depth`` are read when scraped."""

    def __init__(self, counts: Callable[[], dict[str, int]], queue_depth: Callable[[], int]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("fastdit_http_requests", "HTTP requests answered", ["method", "route", "status"],
                                registry=r)  # fmt: skip
        self.finished = Counter("fastdit_jobs_finished", "Jobs that ended", ["status"], registry=r)
        self.forwards = Counter("fastdit_forwards", "Packed DiT forwards run", registry=r)
        self.samples = Histogram("fastdit_samples_per_forward", "Samples in one packed forward (CFG counts two)",
                                 buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128), registry=r)  # fmt: skip
        self.tokens = Histogram("fastdit_tokens_per_forward", "Packed tokens in one forward",
                                buckets=tuple(2**k for k in range(6, 21)), registry=r)  # fmt: skip
        self.step_seconds = Histogram("fastdit_step_seconds", "One sampler step of all active jobs",
                                      buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
                                      registry=r)  # fmt: skip
        Gauge("fastdit_queue_depth", "Accepted jobs not yet in a forward", registry=r).set_function(queue_depth)
        r.register(_StoreCollector(counts))

    def forward(self, samples: int, tokens: int, seconds: float) -> None:
        self.forwards.inc()
        self.samples.observe(samples)
        self.tokens.observe(tokens)
        self.step_seconds.observe(seconds)

    def text(self) -> bytes:
        return generate_latest(self.registry)
