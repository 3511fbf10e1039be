"""Celery tasks: thin, idempotent wrappers over `workers.orchestration.Orchestrator`.

Ids and small snapshots in; the work lives in the orchestrator. Every task is
acks_late + reject_on_worker_lost (a killed worker's task is redelivered with the
same id, which is also the token its status claims are made with). Transient errors
retry with capped exponential backoff and full jitter, or after the peer's
Retry-After; Permanent errors end the task with a reason in the delivery log.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import structlog
from celery import Celery, Task

from broker.delivery import DEPLOY_TASK, PROCESS_TASK
from broker.pipelinerun import snapshot
from broker import metrics
from broker.errors import Permanent, Transient
from broker.logging import get_logger
from broker.ports import CommitState
from workers.orchestration import Orchestrator, RunRef, deploy_scope

log = get_logger("cibroker.worker")
REPORT_TASK = "cibroker.report_run"
ROLLOUT_TASK = "cibroker.check_rollout"
MAX_RETRIES = 40
BACKOFF_BASE = 1.0
BACKOFF_CAP = 300.0
ROLLOUT_POLL_SECONDS = 2.0


@contextmanager
def bound(**context: Any) -> Iterator[None]:
    """Bind delivery id / run to every log line of one task (structlog contextvars)."""
    with structlog.contextvars.bound_contextvars(**context):
        yield


def backoff(retries: int) -> float:
    """Capped exponential backoff with full jitter (AWS architecture blog's 'full jitter')."""
    return random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**retries))


@contextmanager
def retrying(task: Task, what: str, count: Callable[[list[tuple[str, str, float]]], None] | None = None) -> Iterator[None]:
    try:
        yield
    except Transient as exc:
        # A peer's Retry-After is honoured up to the cap: a longer wait would outlive the visibility timeout.
        countdown = min(exc.retry_after, BACKOFF_CAP) if exc.retry_after is not None else backoff(task.request.retries)
        if exc.retry_after is not None and count is not None:
            short = task.name.removeprefix("cibroker.")
            count([(metrics.RATE_LIMIT_WAITS.name, metrics.RATE_LIMIT_WAITS.field((short,)), 1.0),
                   (metrics.RATE_LIMIT_SECONDS.name, metrics.RATE_LIMIT_SECONDS.field((short,)), float(exc.retry_after))])
        log.info("task_retry", task=task.name, what=what, error=str(exc), countdown=round(countdown, 2),
                 retries=task.request.retries)
        raise task.retry(exc=exc, countdown=countdown, max_retries=MAX_RETRIES) from None


def register(app: Celery, *, orchestrator: Callable[[], Orchestrator]) -> Callable[[Mapping[str, Any]], None]:
    """Register the tasks; returns the function that enqueues a succeeded run's deploys.

    `orchestrator` returns the (per worker process) service with its adapters.
    """
    common: dict[str, Any] = {"bind": True, "acks_late": True, "reject_on_worker_lost": True, "shared": False}

    def count(increments: list[tuple[str, str, float]]) -> None:
        try:
            orchestrator().store.count_many(increments)
        except Transient:  # a metric is not worth failing or delaying the task for
            pass

    @app.task(name=PROCESS_TASK, **common)
    def process_delivery(self: Task, delivery_id: str, attempt: int = 1) -> list[str]:
        with bound(delivery_id=delivery_id, task="process_delivery"), retrying(self, f"delivery {delivery_id}", count):
            return orchestrator().start(delivery_id, attempt=attempt, token=self.request.id)

    @app.task(name=REPORT_TASK, **common)
    def report_run(self: Task, obj: dict[str, Any]) -> str | None:
        ref = RunRef.of(obj)
        with bound(delivery_id=ref.delivery_id, run=ref.key, task="report_run"), retrying(self, f"report {ref.key}", count):
            try:
                state = orchestrator().observe(obj, token=self.request.id)
            except Permanent as exc:
                log.warning("report_failed", error=str(exc))
                return None
        return state.value if state else None

    @app.task(name=DEPLOY_TASK, **common)
    def deploy(self: Task, obj: dict[str, Any], environment: str, attempt: int = 1, force: bool = False) -> None:
        ref = RunRef.of(obj)
        orch = orchestrator()
        scope = deploy_scope(attempt)
        with bound(delivery_id=ref.delivery_id, run=ref.key, environment=environment, task="deploy"):
            if not orch.store.claim_once(f"deploy:{ref.key}:{environment}{scope}", token=self.request.id, ttl=30 * 86400):
                log.info("deploy_already_claimed")
                return
            with retrying(self, f"deploy {ref.key} to {environment}", count):
                try:
                    watching = orch.deploy(ref, environment, token=self.request.id, attempt=attempt, force=force)
                except Permanent as exc:
                    orch.report(ref, CommitState.FAILED, f"{environment}: {exc}"[:250], token=self.request.id,
                                name=f"deploy/{environment}", scope=scope)
                    return
            if watching is not None:
                deadline = time.time() + orch.settings.routing.defaults.rollout_timeout_seconds
                check_rollout.apply_async(args=[obj, environment, deadline, attempt], countdown=ROLLOUT_POLL_SECONDS)

    @app.task(name=ROLLOUT_TASK, **common)
    def check_rollout(self: Task, obj: dict[str, Any], environment: str, deadline: float, attempt: int = 1) -> None:
        ref = RunRef.of(obj)
        orch = orchestrator()
        with bound(delivery_id=ref.delivery_id, run=ref.key, environment=environment, task="check_rollout"):
            with retrying(self, f"rollout of {ref.key} to {environment}", count):
                try:
                    done = orch.check_rollout(ref, environment, deadline=deadline, token=self.request.id, attempt=attempt)
                except Permanent as exc:
                    orch.report(ref, CommitState.FAILED, f"{environment}: {exc}"[:250], token=self.request.id,
                                name=f"deploy/{environment}", scope=deploy_scope(attempt))
                    return
            if not done:
                # Celery reads max_retries=None as "the task's default (3)", which would drop a rollout that takes
                # longer than a few polls; the deadline (checked in check_rollout) is what ends the wait.
                polls_left = int(max(0.0, deadline - time.time()) / ROLLOUT_POLL_SECONDS) + 10
                raise self.retry(countdown=ROLLOUT_POLL_SECONDS, max_retries=self.request.retries + polls_left)

    def enqueue_deploys(obj: Mapping[str, Any]) -> None:
        for environment in RunRef.of(obj).deploy:
            deploy.apply_async(args=[snapshot(obj), environment])

    return enqueue_deploys
