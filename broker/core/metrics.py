"""Metric families: what each cluster-wide figure means, and how it is kept (pure; rendered by broker.edge.metrics).

Two kinds of figures:

* per web process, in memory (prometheus_client): webhooks by host/event/decision and the
  ingest latency histogram. Run one uvicorn worker per pod and scale by pods, so a scrape
  of a pod sees all of its traffic.
* cluster-wide, in Redis (`SyncStore.count`): what workers and the watcher do (runs,
  durations, status posts, deploys, rate-limit waits) happens in many processes on many
  nodes; each event adds to a Redis hash field, and `/metrics` on any web pod renders the
  totals. A histogram is kept as its cumulative bucket counters plus sum and count.

This module defines the families and the hash fields an observation adds to; it never talks
to Redis itself, and broker.edge.metrics renders them in the Prometheus text format.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


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
# Trust (issue 10). Label values come from fixed sets: broker.services.provenance.REASONS, REFUSALS below, the task names.
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


def bound_label(bound: float) -> str:
    """A bucket bound as Prometheus writes it (`le="30.0"`): Python's float repr, which equals
    prometheus_client's floatToGoString for every bound below 1e6 (the families above use < 1e4)."""
    return repr(float(bound))


def histogram_increments(family: Family, values: Iterable[str], observed: float) -> list[tuple[str, float]]:
    """The hash fields to add to for one observation: every bucket it falls in, +Inf, sum and count."""
    base = family.field(values)
    out = [(f"{base}{SEP}le={bound_label(bound)}", 1.0) for bound in family.buckets if observed <= bound]
    out += [(f"{base}{SEP}le=+Inf", 1.0), (f"{base}{SEP}sum", observed), (f"{base}{SEP}count", 1.0)]
    return out
