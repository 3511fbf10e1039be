"""The Celery application and the orchestrator behind its tasks, built from Settings.

Tasks must not be lost: acks_late with reject_on_worker_lost, so a killed worker's
task is redelivered after the visibility timeout; prefetch 1, so a worker holds no
task it is not running. The orchestrator (and its Kubernetes, Git host and git
adapters) is built once per worker process, on first use.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from celery import Celery
from kombu.exceptions import OperationalError

from broker import metrics
from broker.embedded import kombu_url
from broker.logging import get_logger
from broker.errors import StoreUnavailable
from broker.ports import Cluster, GitHost
from broker.pipelinerun import A_REPORTED
from broker.provenance import RunVerifier
from broker.store import SyncStore
from config.settings import Settings
from workers import tasks
from workers.orchestration import Orchestrator
from workers.watcher import Watcher

log = get_logger("cibroker.app")


def git_hosts(settings: Settings) -> dict[str, GitHost]:
    """A status adapter for every host whose API token is set (hosts without one only get logged)."""
    from workers.githost import git_host_for

    out: dict[str, GitHost] = {}
    for host_id, host in settings.routing.hosts.items():
        token = settings.credentials[host_id].token
        if token is not None:
            out[host_id] = git_host_for(host.kind, api_url=host.api_url, token=token.get_secret_value(), host_id=host_id)
    return out


def default_orchestrator(settings: Settings) -> Orchestrator:
    from workers.gitrepo import GitCommitResolver
    from workers.kube import KubeCluster
    from workers.wiring import store_for

    settings.require_signing_key()  # before anything else: a worker never runs without it
    return Orchestrator(
        settings=settings,
        store=store_for(settings),
        cluster=KubeCluster.from_environment(tekton_version=settings.env.tekton_api_version),
        git_hosts=git_hosts(settings),
        resolver=GitCommitResolver(Path(settings.env.state_dir) / "git-mirrors"),
    )


def create_celery(settings: Settings, *, orchestrator: Callable[[Settings], Orchestrator] = default_orchestrator) -> Celery:
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
            app.send_task(tasks.REPORT_TASK, args=[meta.get("namespace"), meta.get("name"), hint],
                          queue=app.conf.task_default_queue)
        except (OperationalError, OSError) as exc:  # the queue (Redis) is away: the watcher backs off and replays
            raise StoreUnavailable(f"cannot queue a status report: {type(exc).__name__}: {exc}") from exc

    return submit


def trust_check(settings: Settings, store: SyncStore) -> Callable[[Mapping[str, Any]], bool]:
    """The watcher's filter: is this run cibroker's? One warning line and a metric per run that is not."""
    verifier = RunVerifier(key=settings.require_signing_key(), routing=settings.routing, lookup=store.delivery_run)

    def trusted(obj: Mapping[str, Any]) -> bool:
        verdict, first = verifier.check(obj)
        if verdict.facts is None and first:
            meta = obj.get("metadata") or {}
            log.warning("run_ignored", run=f"{meta.get('namespace')}/{meta.get('name')}", reason=verdict.reason,
                        detail=verdict.detail)
            try:
                store.count(metrics.UNTRUSTED_RUNS.name, metrics.UNTRUSTED_RUNS.field((verdict.reason,)))
            except StoreUnavailable:
                pass
        return verdict.facts is not None

    return trusted


def build_watcher(settings: Settings, cluster: Cluster, *, submit: Callable[[Mapping[str, Any]], None],
                  sweep: bool = True) -> Watcher:
    """The watcher the `watcher` and `dev` commands run: namespaces from the routing file, runs checked for trust."""
    from workers.wiring import store_for

    store = store_for(settings)
    routing = settings.routing
    namespaces = sorted({r.namespace or routing.defaults.namespace for r in routing.routes})
    return Watcher(cluster, namespaces, submit=submit, resync_seconds=settings.env.resync_seconds,
                   sweep=sweeper(settings, store) if sweep else None, trust=trust_check(settings, store))


STRANDED_AFTER_SECONDS = 120.0


def sweeper(settings: Settings, store: SyncStore, *, older_than: float | None = None) -> Callable[[], int]:
    """What the watcher runs every resync: queue again the deliveries whose task a dying worker took with it.

    kombu's Redis transport pops a message before it records it as unacked; a worker killed in
    between loses it (celery/kombu#1836 and others). Such a delivery stays `queued` with its task
    nowhere: it is queued again under its own task id, so the worker's idempotent path (one
    PipelineRun per push, ordered status claims keyed by that id) makes it happen exactly once.
    """
    from broker.delivery import PROCESS_TASK, log_entry
    from broker.taskmessage import task_message

    queue = settings.env.queue
    if older_than is None:
        older_than = max(STRANDED_AFTER_SECONDS, 2.0 * settings.env.resync_seconds)

    def sweep() -> int:
        found = store.stranded(queue=queue, older_than=older_than)
        for record in found:
            delivery_id = record["delivery_id"]
            args: list[object] = [delivery_id] if not record.get("attempt") else [delivery_id, int(record["attempt"])]
            message = task_message(task=PROCESS_TASK, task_id=delivery_id, args=args, queue=queue, origin="cibroker-watcher")
            store.requeue(delivery_id, queue=queue, message=message, entry=log_entry(
                "requeued", f"still queued after {older_than:.0f} s and its task was neither waiting nor taken "
                "(a worker died while taking it): queued again", at=time.time()))
            log.warning("delivery_requeued", delivery_id=delivery_id, waited_seconds=older_than)
        return len(found)

    return sweep
