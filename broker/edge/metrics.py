"""Prometheus metrics of the web process, and the rendering of the cluster-wide families.

Two kinds of figures (broker.core.metrics says what each family means):

* per web process, in memory (prometheus_client): webhooks by host/event/decision and the
  ingest latency histogram. Run one uvicorn worker per pod and scale by pods, so a scrape
  of a pod sees all of its traffic.
* cluster-wide, in Redis: what workers and the watcher count (broker.core.metrics.SHARED),
  read once per scrape and rendered here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from broker.core.metrics import SEP, SHARED, Family, bound_label


class SharedCollector(Collector):
    """Renders the Redis-kept counters (read once per scrape) as Prometheus families."""

    def __init__(self, counters: Mapping[str, Mapping[str, float]], *, queue_depth: int | None) -> None:
        self._counters = counters
        self._queue_depth = queue_depth

    def collect(self):  # type: ignore[no-untyped-def]
        if self._queue_depth is not None:
            yield GaugeMetricFamily("cibroker_queue_depth", "Tasks waiting in the Celery queue.", value=self._queue_depth)
        for family in SHARED:
            fields = self._counters.get(family.name) or {}
            if family.buckets:
                yield self._histogram(family, fields)
                continue
            metric = CounterMetricFamily(family.name, family.help, labels=family.labels)
            for field, value in sorted(fields.items()):
                metric.add_metric(field.split(SEP), value)
            yield metric

    @staticmethod
    def _histogram(family: Family, fields: Mapping[str, float]) -> HistogramMetricFamily:
        metric = HistogramMetricFamily(family.name, family.help, labels=family.labels)
        series: dict[tuple[str, ...], dict[str, float]] = {}
        for field, value in fields.items():
            *labels, part = field.split(SEP)
            series.setdefault(tuple(labels), {})[part] = value
        for labels, parts in sorted(series.items()):
            buckets = [(bound_label(b), parts.get(f"le={bound_label(b)}", 0.0)) for b in family.buckets]
            buckets.append(("+Inf", parts.get("le=+Inf", 0.0)))
            metric.add_metric(list(labels), buckets, parts.get("sum", 0.0))
        return metric


class EdgeMetrics:
    """The web process's own figures (in memory, per process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.webhooks = Counter("cibroker_webhooks", "Webhook requests answered, by host, event and decision.",
                                ("host", "event", "decision"), registry=self.registry)
        self.ingest = Histogram("cibroker_ingest_seconds", "Webhook answer time in the web process (read, verify, store).",
                                ("decision",), registry=self.registry,
                                buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
        self._children: dict[tuple[str, str, str], tuple[Any, Any]] = {}

    def track_in_flight(self, bodies: Callable[[], float], reserved: Callable[[], float]) -> None:
        """Expose the webhook bodies being read right now and the bytes they reserve (read at scrape time)."""
        gauge = Gauge("cibroker_webhooks_in_flight", "Webhook bodies being read by this process.", registry=self.registry)
        gauge.set_function(bodies)
        held = Gauge("cibroker_webhook_body_bytes_reserved", "Bytes reserved by webhook bodies being read (their Content-Length).",
                     registry=self.registry)
        held.set_function(reserved)

    def observe(self, *, host: str, event: str, decision: str, seconds: float) -> None:
        """Count one answer. `host` and `event` must come from closed sets (the edge maps the rest to `other`)."""
        key = (host, event, decision)
        children = self._children.get(key)
        if children is None:  # label lookups cost more than the counting; the sets are closed, so keep them
            children = self._children[key] = (self.webhooks.labels(host, event or "unknown", decision),
                                               self.ingest.labels(decision))
        children[0].inc()
        children[1].observe(seconds)

    def render(self, counters: Mapping[str, Mapping[str, float]] | None, *, queue_depth: int | None) -> bytes:
        """The Prometheus text: this process's figures, then the cluster-wide ones (when Redis answered)."""
        text = generate_latest(self.registry)
        if counters is not None:
            shared = CollectorRegistry(auto_describe=False)
            shared.register(SharedCollector(counters, queue_depth=queue_depth))
            text += generate_latest(shared)
        return text
