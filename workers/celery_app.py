"""The Celery application and the orchestrator behind its tasks, built from Settings.

Tasks must not be lost: acks_late with reject_on_worker_lost, so a killed worker's
task is redelivered after the visibility timeout; prefetch 1, so a worker holds no
task it is not running. The orchestrator (and its Kubernetes, Git host and git
adapters) is built once per worker process, on first use.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from celery import Celery
from kombu.exceptions import OperationalError

from broker import bootstrap
from broker.adapters.embedded_redis import kombu_url
from broker.core.errors import StoreUnavailable
from broker.core.pipelinerun import A_REPORTED
from broker.core.records import REPORT_TASK
from broker.services.runs import Orchestrator
from config.settings import Settings
from workers import tasks


def create_celery(settings: Settings, *, orchestrator: Callable[[Settings], Orchestrator] = bootstrap.orchestrator) -> Celery:
    env = settings.env
    assert env.redis_url is not None, "resolve the Redis URL (or start the embedded one) first"
    app = Celery("cibroker", broker=kombu_url(env.redis_url.get_secret_value()), set_as_current=False)
    app.conf.update(
        task_default_queue=env.queue,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        # kombu sweeps for a dead worker's unacked tasks only every interval x throttle seconds (10 x 10
        # by default): a killed worker's task came back up to 100 s after its visibility timeout.
        broker_transport_options={"visibility_timeout": env.visibility_timeout_seconds,
                                  "unacked_restore_interval": 5, "unacked_restore_throttle": 1},
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        accept_content=["json"],
        task_serializer="json",
    )
    built: list[Orchestrator] = []

    def get() -> Orchestrator:
        if not built:
            service = orchestrator(settings)
            service.on_success = enqueue_deploys
            built.append(service)
        return built[0]

    enqueue_deploys = tasks.register(app, orchestrator=get)
    return app


def submitter(app: Celery) -> Callable[[Mapping[str, Any]], None]:
    """What the watcher calls for a run whose state moved: a report task on the queue, naming the run (ids only)."""

    def submit(obj: Mapping[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        try:
            # The third argument is the `reported` annotation the watcher saw: a hint, see Orchestrator.observe.
            hint = (meta.get("annotations") or {}).get(A_REPORTED) or ""
            app.send_task(REPORT_TASK, args=[meta.get("namespace"), meta.get("name"), hint],
                          queue=app.conf.task_default_queue)
        except (OperationalError, OSError) as exc:  # the queue (Redis) is away: the watcher backs off and replays
            raise StoreUnavailable(f"cannot queue a status report: {type(exc).__name__}: {exc}") from exc

    return submit
