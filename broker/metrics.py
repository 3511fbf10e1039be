"""Prometheus metrics: what each family means, and how the cluster-wide ones are kept.

Two kinds of figures:

* per web process, in memory (prometheus_client): webhooks by host/event/decision and the
  ingest latency histogram. Run one uvicorn worker per pod and scale by pods, so a scrape
  of a pod sees all of its traffic.
* cluster-wide, in Redis (`SyncStore.count`): what workers and the watcher do (runs,
  durations, status posts, deploys, rate-limit waits) happens in many processes on many
  nodes; each event adds to a Redis hash field, and `/metrics` on any web pod renders the
  totals. A histogram is kept as its cumulative bucket counters plus sum and count.

This module defines the families and renders them; it never talks to Redis itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

SEP = "\x1f"  # between label values in a Redis hash field


@dataclass(frozen=True, slots=True)
class Family:
    name: str
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()  # a histogram when set

    def field(self, values: Iterable[str]) -> str:
        values = tuple(str(v) for v in values)
        if len(values) != len(self.labels):
            raise ValueError(f"{self.name} takes labels {self.labels}, got {values}")
        return SEP.join(values)


RUN_SECONDS = (30, 60, 120, 300, 600, 900, 1800, 3600, 7200)
RUNS = Family("cibroker_runs", "PipelineRuns that ended, by route and outcome (success, failed, canceled).", ("route", "outcome"))
RUN_DURATION = Family("cibroker_run_duration_seconds", "PipelineRun duration, start to completion.", ("route",), RUN_SECONDS)
CREATED = Family("cibroker_pipelineruns_created", "PipelineRuns created, by route and trigger (push, rerun).", ("route", "trigger"))
STATUS_POSTS = Family("cibroker_status_posts", "Commit status posts, by host and outcome (posted, already, retry, error).",
                      ("host", "outcome"))
DEPLOYS = Family("cibroker_deploys", "Deploys, by environment and outcome (success, failed, rolled_back, refused, superseded).",
                 ("environment", "outcome"))
RATE_LIMIT_WAITS = Family("cibroker_rate_limit_waits", "Task retries that waited for a peer's Retry-After (429/503), by task.",
                          ("task",))
RATE_LIMIT_SECONDS = Family("cibroker_rate_limit_wait_seconds", "Seconds of Retry-After waits, by task.", ("task",))
ACTIONS = Family("cibroker_actions", "On-call actions (rerun, cancel), by action and channel (cli, api, dashboard).",
                 ("action", "channel"))
# Trust (issue 10). Label values come from fixed sets: broker.provenance.REASONS, REFUSALS below, the task names.
UNTRUSTED_RUNS = Family("cibroker_untrusted_runs", "PipelineRuns ignored as not cibroker's (forged or altered), by reason "
                        "(no_delivery_label, unknown_delivery, not_owned, bad_signature, route_mismatch, malformed_record).",
                        ("reason",))
REFUSALS = ("old_message_shape", "bad_arguments", "run_not_found", "untrusted_run", "untrusted_request", "not_succeeded",
            "finished")
REFUSED_TASKS = Family("cibroker_refused_tasks", "Task messages refused without acting on them, by task and reason "
                       f"({', '.join(REFUSALS)}).", ("task", "reason"))
TASK_CRASHES = Family("cibroker_task_crashes", "Tasks that hit an unexpected exception (their delivery is marked failed), "
                      "by task.", ("task",))
SHARED: tuple[Family, ...] = (RUNS, RUN_DURATION, CREATED, STATUS_POSTS, DEPLOYS, RATE_LIMIT_WAITS, RATE_LIMIT_SECONDS, ACTIONS,
                              UNTRUSTED_RUNS, REFUSED_TASKS, TASK_CRASHES)


def histogram_increments(family: Family, values: Iterable[str], observed: float) -> list[tuple[str, float]]:
    """The hash fields to add to for one observation: every bucket it falls in, +Inf, sum and count."""
    base = family.field(values)
    out = [(f"{base}{SEP}le={floatToGoString(bound)}", 1.0) for bound in family.buckets if observed <= bound]
    out += [(f"{base}{SEP}le=+Inf", 1.0), (f"{base}{SEP}sum", observed), (f"{base}{SEP}count", 1.0)]
    return out


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
            buckets = [(floatToGoString(b), parts.get(f"le={floatToGoString(b)}", 0.0)) for b in family.buckets]
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
