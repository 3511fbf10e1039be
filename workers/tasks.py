"""Celery tasks: thin, idempotent wrappers over `broker.services.runs.Orchestrator`.

Ids in, never object snapshots: a task names a delivery, a run (namespace, name) or a
person's signed request, and re-reads what it acts on (the run from the API, the delivery
and the request from Redis) before acting. Anyone who can write to the Redis queue can
push a message, so a message is a request to look, never an order: a run that is not
cibroker's, a request that is not signed, or a message of an old or unknown shape is
refused with one warning line and a metric (`cibroker_refused_tasks`).

Every task is acks_late + reject_on_worker_lost (a killed worker's task is redelivered
with the same id, which is also the token its status claims are made with). Transient
errors retry with capped exponential backoff and full jitter, or after the peer's
Retry-After; Permanent errors end the task with a reason in the delivery log. Anything
else (a bug, a malformed stored record) marks the delivery `failed` with the exception
class in its decision log, posts a failed status when it can, and is not retried: the
stranded-delivery sweep only re-queues `queued` deliveries, so no poison message loops.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import structlog
from celery import Celery, Task
from celery.exceptions import Retry

from broker.core import metrics
from broker.core.records import CANCEL_TASK, DEPLOY_TASK, PROCESS_TASK, REPORT_TASK, ROLLOUT_TASK
from broker.core.errors import CibrokerError, Permanent, Transient, Untrusted
from broker.logging import get_logger
from broker.core.status import CommitState
from broker.services.provenance import RunFacts
from broker.core.reporting import parse_state, run_state
from broker.core.trust import verify_request
from broker.services.runs import Orchestrator, deploy_scope

log = get_logger("cibroker.worker")
MAX_RETRIES = 40
BACKOFF_BASE = 1.0
BACKOFF_CAP = 300.0
ROLLOUT_POLL_SECONDS = 2.0
ANCESTRY_RETRIES = 3  # a Transient git error in the ancestry check is retried this often, then the deploy is refused
_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?\Z")
_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}\Z")


@contextmanager
def bound(**context: Any) -> Iterator[None]:
    """Bind delivery id / run to every log line of one task (structlog contextvars)."""
    with structlog.contextvars.bound_contextvars(**context):
        yield


def backoff(retries: int) -> float:
    """Capped exponential backoff with full jitter (AWS architecture blog's 'full jitter')."""
    return random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**retries))


class Refused(Exception):
    """A task message we will not act on; `reason` is one of metrics.REFUSALS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def run_ids(args: tuple[Any, ...], what: str) -> tuple[str, str]:
    """(namespace, name) from a message's first two arguments; Refused for a snapshot dict or anything else."""
    if args and isinstance(args[0], dict):
        raise Refused("old_message_shape", f"{what}: the message carries a PipelineRun snapshot (the old shape); tasks take "
                      "(namespace, name) and re-read the run: not acted on")
    if len(args) < 2 or not all(isinstance(a, str) and _NAME.match(a) for a in args[:2]):
        raise Refused("bad_arguments", f"{what}: expected (namespace, name, ...) as strings, got {_shape(args)}")
    return args[0], args[1]


def _shape(args: tuple[Any, ...]) -> str:
    return "(" + ", ".join(type(a).__name__ for a in args[:6]) + ")"


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1_000_000:
        raise Refused("bad_arguments", f"{what}: attempt must be a positive integer, got {type(value).__name__}")
    return value


class Runtime:
    """What the tasks of one worker process share: the orchestrator (built on first use), counters, refusals,
    the crash boundary and retries. Each task below is a plain function of (runtime, Celery task, *args)."""

    def __init__(self, app: Celery, orchestrator: Callable[[], Orchestrator]) -> None:
        self.app = app
        self._orchestrator = orchestrator

    @property
    def orch(self) -> Orchestrator:
        return self._orchestrator()

    def count(self, increments: list[tuple[str, str, float]]) -> None:
        try:
            self.orch.store.count_many(increments)
        except Transient:  # a metric is not worth failing or delaying the task for
            pass

    def refused(self, task: str, exc: Refused | Untrusted, *, reason: str | None = None, **fields: Any) -> None:
        why = reason or (exc.reason if isinstance(exc, Refused) else "untrusted_run")
        log.warning("task_refused", task=task, reason=why, detail=str(exc), **fields)
        self.count([(metrics.REFUSED_TASKS.name, metrics.REFUSED_TASKS.field((task.removeprefix("cibroker."), why)), 1.0)])

    @contextmanager
    def retrying(self, task: Task, what: str) -> Iterator[None]:
        """Transient errors retry the task: after the peer's Retry-After (capped), else capped exponential backoff."""
        try:
            yield
        except Transient as exc:
            # A peer's Retry-After is honoured up to the cap: a longer wait would outlive the visibility timeout.
            countdown = min(exc.retry_after, BACKOFF_CAP) if exc.retry_after is not None else backoff(task.request.retries)
            if exc.retry_after is not None:
                short = task.name.removeprefix("cibroker.")
                self.count([(metrics.RATE_LIMIT_WAITS.name, metrics.RATE_LIMIT_WAITS.field((short,)), 1.0),
                            (metrics.RATE_LIMIT_SECONDS.name, metrics.RATE_LIMIT_SECONDS.field((short,)), float(exc.retry_after))])
            log.info("task_retry", task=task.name, what=what, error=str(exc), countdown=round(countdown, 2),
                     retries=task.request.retries)
            raise task.retry(exc=exc, countdown=countdown, max_retries=MAX_RETRIES) from None

    @contextmanager
    def guarded(self, task: Task, *, delivery_id: Callable[[], str], post: Callable[[str], None] | None = None) -> Iterator[None]:
        """Unexpected exceptions: mark the delivery failed (exception class in its log), post failed, never retry."""
        try:
            yield
        except (Retry, CibrokerError):
            raise
        except Exception as exc:  # noqa: BLE001 (this is the poison-message boundary)
            error_class = type(exc).__name__
            reason = f"{task.name}: unexpected {error_class}: {str(exc)[:200]}; not retried (a bug or a malformed record)"
            log.error("task_crashed", task=task.name, error_class=error_class, error=str(exc)[:200])
            self.count([(metrics.TASK_CRASHES.name, metrics.TASK_CRASHES.field((task.name.removeprefix("cibroker."),)), 1.0)])
            try:
                if post is not None:
                    post(reason)
                if delivery_id():
                    self.orch.mark_failed(delivery_id(), reason, error_class=error_class)
            except Exception as again:  # noqa: BLE001 (Redis or the host away as well: the log line above stays)
                log.error("task_crash_not_recorded", task=task.name, error_class=type(again).__name__, error=str(again)[:200])

    def guarded_run(self, task: Task, facts: list[RunFacts], *, status: str | None = None, scope: str = "") -> Any:
        """`guarded` for a task about one run: its delivery fails, and the failure is posted on `status` (the run's own by default)."""
        def post(reason: str) -> None:
            if facts:
                self.orch.report(facts[0], CommitState.FAILED, reason[:250], token=task.request.id, name=status, scope=scope)

        return self.guarded(task, delivery_id=lambda: facts[0].delivery_id if facts else "", post=post)

    def trusted_run(self, task: str, namespace: str, name: str) -> tuple[dict[str, Any], RunFacts] | None:
        """The run re-read from the API and its facts, or None (refused with a reason)."""
        obj = self.orch.cluster.get_pipelinerun(namespace=namespace, name=name)
        if obj is None:
            self.refused(task, Refused("run_not_found", f"PipelineRun {namespace}/{name} is not in the cluster"))
            return None
        verdict, _ = self.orch.verdict(obj)
        if verdict.facts is None:
            self.refused(task, Untrusted(verdict.detail), reason="untrusted_run", run_reason=verdict.reason)
            self.count([(metrics.UNTRUSTED_RUNS.name, metrics.UNTRUSTED_RUNS.field((verdict.reason,)), 1.0)])
            return None
        return dict(obj), verdict.facts

    def later(self, task: str, args: list[Any], *, countdown: float | None = None) -> None:
        self.app.tasks[task].apply_async(args=args, countdown=countdown)

    def enqueue_deploys(self, ref: RunFacts) -> None:
        """What the orchestrator calls once a run succeeded: one deploy task per environment (attempt 1, no request)."""
        for environment in ref.deploy:
            self.later(DEPLOY_TASK, [ref.namespace, ref.name, environment, 1, ""])


# ---- the tasks -------------------------------------------------------------------------------------


def process_delivery(rt: Runtime, task: Task, *args: Any) -> list[str]:
    """args: delivery_id[, attempt]. Creates the delivery's PipelineRun(s); returns their names."""
    delivery_id = args[0] if args else None
    if not isinstance(delivery_id, str) or not _ID.match(delivery_id) or len(args) > 2:
        rt.refused(PROCESS_TASK, Refused("bad_arguments", f"expected (delivery_id[, attempt]) with a string id, got {_shape(args)}"))
        return []
    attempt = args[1] if len(args) > 1 and isinstance(args[1], int) and not isinstance(args[1], bool) else 1
    orch = rt.orch
    with bound(delivery_id=delivery_id, task="process_delivery"), \
            rt.guarded(task, delivery_id=lambda: delivery_id, post=lambda reason: orch.fail_delivery(delivery_id, reason)), \
            rt.retrying(task, f"delivery {delivery_id}"):
        return orch.start(delivery_id, attempt=attempt, token=task.request.id)
    return []  # crashed: recorded by `guarded`


def report_run(rt: Runtime, task: Task, *args: Any) -> str | None:
    """args: namespace, name[, the `reported` annotation the watcher saw (a hint)]. Posts the run's state."""
    try:
        namespace, name = run_ids(args, REPORT_TASK)
    except Refused as exc:
        rt.refused(REPORT_TASK, exc)
        return None
    facts: list[RunFacts] = []
    with bound(run=f"{namespace}/{name}", task="report_run"), rt.guarded_run(task, facts), \
            rt.retrying(task, f"report {namespace}/{name}"):
        found = rt.trusted_run(REPORT_TASK, namespace, name)
        if found is None:
            return None
        obj, ref = found
        facts.append(ref)
        with bound(delivery_id=ref.delivery_id):
            hint = parse_state(args[2]) if len(args) > 2 and isinstance(args[2], str) else None
            try:
                state = rt.orch.observe(obj, token=task.request.id, reported=hint)
            except Permanent as exc:
                log.warning("report_failed", error=str(exc))
                return None
        return state.value if state else None
    return None


def deploy_args(args: tuple[Any, ...]) -> tuple[str, str, str, int, str]:
    """(namespace, name, environment, attempt, request_id) of a deploy message; Refused when malformed."""
    namespace, name = run_ids(args, DEPLOY_TASK)
    environment = args[2] if len(args) > 2 else None
    if not isinstance(environment, str) or not _NAME.match(environment):
        raise Refused("bad_arguments", f"{DEPLOY_TASK}: environment must be a name, got {_shape(args)}")
    attempt = _int(args[3] if len(args) > 3 else 1, DEPLOY_TASK)
    request_id = args[4] if len(args) > 4 else ""
    if not isinstance(request_id, str) or len(args) > 5:
        raise Refused("bad_arguments", f"{DEPLOY_TASK}: expected (namespace, name, environment, attempt, request_id), "
                      f"got {_shape(args)}")
    return namespace, name, environment, attempt, request_id


def deploy(rt: Runtime, task: Task, *args: Any) -> None:
    """args: namespace, name, environment, attempt (1: the automatic deploy), request_id ("" for the automatic one)."""
    try:
        namespace, name, environment, attempt, request_id = deploy_args(args)
    except Refused as exc:
        rt.refused(DEPLOY_TASK, exc)
        return
    scope = deploy_scope(attempt)
    facts: list[RunFacts] = []
    with bound(run=f"{namespace}/{name}", environment=environment, task="deploy"), \
            rt.guarded_run(task, facts, status=f"deploy/{environment}", scope=scope):
        with rt.retrying(task, f"deploy {namespace}/{name} to {environment}"):
            found = rt.trusted_run(DEPLOY_TASK, namespace, name)
        if found is None:
            return
        obj, ref = found
        facts.append(ref)
        structlog.contextvars.bind_contextvars(delivery_id=ref.delivery_id)
        request = None
        if attempt > 1 or request_id:
            request = _deploy_request(rt, task, ref, environment, attempt=attempt, request_id=request_id)
            if request is None:
                return
        if run_state(obj) is not CommitState.SUCCESS:
            rt.refused(DEPLOY_TASK, Refused("not_succeeded", f"PipelineRun {ref.key} is {run_state(obj).value}, not "
                                            "succeeded: nothing built to deploy"))
            return
        if not rt.orch.store.claim_once(f"deploy:{ref.key}:{environment}{scope}", token=task.request.id, ttl=30 * 86400):
            log.info("deploy_already_claimed")
            return
        if _deploy_now(rt, task, ref, obj, environment, attempt=attempt, request=request):
            rt.later(ROLLOUT_TASK, [namespace, name, environment, attempt], countdown=ROLLOUT_POLL_SECONDS)


def _deploy_request(rt: Runtime, task: Task, ref: RunFacts, environment: str, *, attempt: int, request_id: str) -> Any:
    """A person's deploy request, verified (signature, and that it names this run and environment), or None:
    refused, logged, and for a person's re-deploy (attempt > 1) a failed status on its own history."""
    orch = rt.orch
    try:
        with rt.retrying(task, f"request {request_id[:40]}"):
            return orch.request(request_id, action="deploy", namespace=ref.namespace, name=ref.name,
                                environment=environment, attempt=attempt)
    except Untrusted as exc:
        rt.refused(DEPLOY_TASK, exc, reason="untrusted_request")
        reason = f"{environment}: not deployed: {exc}"
        orch.note(ref.delivery_id, "deploy_refused", reason)
        if attempt > 1:  # a person's re-deploy has its own status history; the automatic one is left alone
            with rt.retrying(task, f"deploy {ref.key} to {environment}"):
                orch.report(ref, CommitState.FAILED, reason[:250], token=task.request.id, name=f"deploy/{environment}",
                            scope=deploy_scope(attempt))
        return None


def _deploy_now(rt: Runtime, task: Task, ref: RunFacts, obj: dict[str, Any], environment: str, *, attempt: int,
                request: Any) -> bool:
    """Set the image (the orchestrator checks ancestry and the target); True when a rollout is now to be watched."""
    orch = rt.orch
    scope = deploy_scope(attempt)
    with rt.retrying(task, f"deploy {ref.key} to {environment}"):
        try:
            watching = orch.deploy(ref, environment, token=task.request.id, obj=obj, attempt=attempt, request=request,
                                   give_up=task.request.retries >= ANCESTRY_RETRIES)
        except Permanent as exc:
            orch.note(ref.delivery_id, "deploy_failed", f"{environment}: {exc}")
            orch.report(ref, CommitState.FAILED, f"{environment}: {exc}"[:250], token=task.request.id,
                        name=f"deploy/{environment}", scope=scope)
            return False
        if watching is None:
            return False
        timeout = orch.settings.routing.defaults.rollout_timeout_seconds
        orch.store.set_deadline(f"{ref.key}:{environment}{scope}", deadline=time.time() + timeout, ttl=2 * timeout + 3600)
    return True


def rollout_args(args: tuple[Any, ...]) -> tuple[str, str, str, int]:
    """(namespace, name, environment, attempt) of a rollout check; Refused when malformed."""
    namespace, name = run_ids(args, ROLLOUT_TASK)
    environment = args[2] if len(args) > 2 else None
    if not isinstance(environment, str) or not _NAME.match(environment) or len(args) > 4:
        raise Refused("bad_arguments", f"{ROLLOUT_TASK}: expected (namespace, name, environment, attempt), got {_shape(args)}")
    return namespace, name, environment, _int(args[3] if len(args) > 3 else 1, ROLLOUT_TASK)


def check_rollout(rt: Runtime, task: Task, *args: Any) -> None:
    """args: namespace, name, environment, attempt. The deadline is the one the deploy stored, not the message's."""
    try:
        namespace, name, environment, attempt = rollout_args(args)
    except Refused as exc:
        rt.refused(ROLLOUT_TASK, exc)
        return
    orch = rt.orch
    scope = deploy_scope(attempt)
    facts: list[RunFacts] = []
    with bound(run=f"{namespace}/{name}", environment=environment, task="check_rollout"), \
            rt.guarded_run(task, facts, status=f"deploy/{environment}", scope=scope):
        with rt.retrying(task, f"rollout of {namespace}/{name} to {environment}"):
            found = rt.trusted_run(ROLLOUT_TASK, namespace, name)
            if found is None:
                return
            obj, ref = found
            facts.append(ref)
            deadline = orch.store.deadline(f"{ref.key}:{environment}{scope}")
            if deadline is None:
                rt.refused(ROLLOUT_TASK, Refused("bad_arguments", f"no deploy of {ref.key} to {environment} (attempt "
                                                 f"{attempt}) is under way"))
                return
            try:
                done = orch.check_rollout(ref, environment, deadline=deadline, token=task.request.id, obj=obj, attempt=attempt)
            except Permanent as exc:
                orch.report(ref, CommitState.FAILED, f"{environment}: {exc}"[:250], token=task.request.id,
                            name=f"deploy/{environment}", scope=scope)
                return
        if not done:
            # Celery reads max_retries=None as "the task's default (3)", which would drop a rollout that takes
            # longer than a few polls; the deadline (checked in check_rollout) is what ends the wait.
            polls_left = int(max(0.0, deadline - time.time()) / ROLLOUT_POLL_SECONDS) + 10
            raise task.retry(countdown=ROLLOUT_POLL_SECONDS, max_retries=task.request.retries + polls_left)


def cancel_run(rt: Runtime, task: Task, *args: Any) -> str | None:
    """args: request_id of a person's signed cancel request (broker.core.trust.PersonRequest, action "cancel")."""
    if len(args) != 1 or not isinstance(args[0], str) or not _ID.match(args[0]):
        rt.refused(CANCEL_TASK, Refused("bad_arguments", f"{CANCEL_TASK}: expected (request_id), got {_shape(args)}"))
        return None
    request_id = args[0]
    orch = rt.orch
    with bound(request=request_id, task="cancel_run"), rt.guarded(task, delivery_id=lambda: ""), \
            rt.retrying(task, f"cancel request {request_id}"):
        try:
            request = verify_request(orch.key, orch.store.get_request(request_id), request_id=request_id)
            if request.action != "cancel":
                raise Untrusted(f"request {request_id[:40]!r} is a {request.action} request, not a cancel")
        except Untrusted as exc:
            rt.refused(CANCEL_TASK, exc, reason="untrusted_request")
            return None
        with bound(run=request.run, by=request.actor):
            try:
                return orch.cancel_run(request)
            except Untrusted as exc:
                rt.refused(CANCEL_TASK, exc, reason="untrusted_run")
            except Permanent as exc:
                rt.refused(CANCEL_TASK, Refused("finished", str(exc)))
    return None


TASKS: dict[str, Callable[..., Any]] = {PROCESS_TASK: process_delivery, REPORT_TASK: report_run, DEPLOY_TASK: deploy,
                                        ROLLOUT_TASK: check_rollout, CANCEL_TASK: cancel_run}
# acks_late + reject_on_worker_lost: a killed worker's task comes back with the same id (its status claims' token).
COMMON: dict[str, Any] = {"bind": True, "acks_late": True, "reject_on_worker_lost": True, "shared": False}


def _bound(rt: Runtime, body: Callable[..., Any]) -> Callable[..., Any]:
    """A Celery task function (bound: `self` is the task) running `body` with this process's runtime.

    It takes any positional arguments: each task checks its own and refuses a malformed message with a reason."""
    def run(self: Task, *args: Any) -> Any:
        return body(rt, self, *args)

    run.__name__, run.__qualname__, run.__doc__ = body.__name__, body.__qualname__, body.__doc__
    return run


def register(app: Celery, *, orchestrator: Callable[[], Orchestrator]) -> Callable[[RunFacts], None]:
    """Register the tasks; returns the function that enqueues a succeeded run's deploys.

    `orchestrator` returns the (per worker process) service with its adapters.
    """
    rt = Runtime(app, orchestrator)
    for name, body in TASKS.items():
        app.task(name=name, **COMMON)(_bound(rt, body))
    return rt.enqueue_deploys
