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

from celery import Celery, Task

from broker.delivery import PROCESS_TASK
from broker.errors import Permanent, Transient
from broker.logging import get_logger
from broker.ports import CommitState
from workers.orchestration import Orchestrator, RunRef

log = get_logger("cibroker.worker")
REPORT_TASK = "cibroker.report_run"
DEPLOY_TASK = "cibroker.deploy"
ROLLOUT_TASK = "cibroker.check_rollout"
MAX_RETRIES = 40
BACKOFF_BASE = 1.0
BACKOFF_CAP = 300.0
ROLLOUT_POLL_SECONDS = 2.0


def backoff(retries: int) -> float:
    """Capped exponential backoff with full jitter (AWS architecture blog's 'full jitter')."""
    return random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**retries))


@contextmanager
def retrying(task: Task, what: str) -> Iterator[None]:
    try:
        yield
    except Transient as exc:
        countdown = exc.retry_after if exc.retry_after is not None else backoff(task.request.retries)
        log.info("task_retry", task=task.name, what=what, error=str(exc), countdown=round(countdown, 2),
                 retries=task.request.retries)
        raise task.retry(exc=exc, countdown=countdown, max_retries=MAX_RETRIES) from None


def snapshot(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a PipelineRun the tasks need (metadata, spec.status, status.conditions)."""
    meta = obj.get("metadata") or {}
    return {
        "metadata": {k: meta.get(k) for k in ("name", "namespace", "labels", "annotations")},
        "spec": {"status": (obj.get("spec") or {}).get("status")},
        "status": {"conditions": (obj.get("status") or {}).get("conditions") or []},
    }


def register(app: Celery, *, orchestrator: Callable[[], Orchestrator]) -> Callable[[Mapping[str, Any]], None]:
    """Register the tasks; returns the function that enqueues a succeeded run's deploys.

    `orchestrator` returns the (per worker process) service with its adapters.
    """
    common: dict[str, Any] = {"bind": True, "acks_late": True, "reject_on_worker_lost": True, "shared": False}

    @app.task(name=PROCESS_TASK, **common)
    def process_delivery(self: Task, delivery_id: str, attempt: int = 1) -> list[str]:
        with retrying(self, f"delivery {delivery_id}"):
            return orchestrator().start(delivery_id, attempt=attempt, token=self.request.id)

    @app.task(name=REPORT_TASK, **common)
    def report_run(self: Task, obj: dict[str, Any]) -> str | None:
        ref = RunRef.of(obj)
        with retrying(self, f"report {ref.key}"):
            try:
                state = orchestrator().observe(obj, token=self.request.id)
            except Permanent as exc:
                log.warning("report_failed", run=ref.key, error=str(exc))
                return None
        return state.value if state else None

    @app.task(name=DEPLOY_TASK, **common)
    def deploy(self: Task, obj: dict[str, Any], environment: str) -> None:
        ref = RunRef.of(obj)
        orch = orchestrator()
        if not orch.store.claim_once(f"deploy:{ref.key}:{environment}", token=self.request.id, ttl=30 * 86400):
            log.info("deploy_already_claimed", run=ref.key, environment=environment)
            return
        with retrying(self, f"deploy {ref.key} to {environment}"):
            try:
                watching = orch.deploy(ref, environment, token=self.request.id)
            except Permanent as exc:
                orch.report(ref, CommitState.FAILED, f"{environment}: {exc}"[:250], token=self.request.id,
                            name=f"deploy/{environment}")
                return
        if watching is not None:
            deadline = time.time() + orch.settings.routing.defaults.rollout_timeout_seconds
            check_rollout.apply_async(args=[obj, environment, deadline], countdown=ROLLOUT_POLL_SECONDS)

    @app.task(name=ROLLOUT_TASK, **common)
    def check_rollout(self: Task, obj: dict[str, Any], environment: str, deadline: float) -> None:
        ref = RunRef.of(obj)
        orch = orchestrator()
        with retrying(self, f"rollout of {ref.key} to {environment}"):
            try:
                done = orch.check_rollout(ref, environment, deadline=deadline, token=self.request.id)
            except Permanent as exc:
                orch.report(ref, CommitState.FAILED, f"{environment}: {exc}"[:250], token=self.request.id,
                            name=f"deploy/{environment}")
                return
        if not done:
            raise self.retry(countdown=ROLLOUT_POLL_SECONDS, max_retries=None)

    def enqueue_deploys(obj: Mapping[str, Any]) -> None:
        for environment in RunRef.of(obj).deploy:
            deploy.apply_async(args=[snapshot(obj), environment])

    return enqueue_deploys
