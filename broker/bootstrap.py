"""The composition root: the one module that builds real adapters from Settings and hands them to services.

Everything above it (the CLI, the Celery app, the watcher) asks here for what it runs on;
everything below it (services, adapters, ports, core) is handed what it needs and never
looks anything up. The web edge does not import this module (it never imports workers, and
the on-call cluster adapter lives there): the CLI builds the edge's wiring here and passes it in.

The worker needs a cluster (it refuses to start without one); the web process and
the CLI only need one for the run views and actions, so for them a missing
Kubernetes configuration is a `None` cluster and a clear answer on those actions.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

from broker.adapters.redis_store import AsyncStore, SyncStore
from broker.core.errors import ConfigError, StoreUnavailable
from broker.logging import get_logger
from broker.ports import Cluster, CommitResolver, GitHost
from broker.services.oncall import Operations
from broker.services.runs import Orchestrator
from config.settings import Settings

log = get_logger("cibroker.bootstrap")


def kube_cluster(settings: Settings) -> Cluster:
    """The cluster from KUBECONFIG or in-cluster credentials; the kubernetes client's own errors when there is none."""
    from workers.adapters.kube import KubeCluster

    return KubeCluster.from_environment(tekton_version=settings.env.tekton_api_version)


def cluster_or_none(settings: Settings) -> tuple[Cluster | None, str]:
    """The cluster from KUBECONFIG or in-cluster credentials, else (None, why not)."""
    try:
        return kube_cluster(settings), "kubernetes"
    except (ConfigError, Exception) as exc:  # the kubernetes client raises its own ConfigException types
        return None, f"no Kubernetes configuration (KUBECONFIG or in-cluster): {exc}"


def store_for(settings: Settings) -> SyncStore:
    assert settings.env.redis_url is not None, "resolve the Redis URL (or start the embedded one) first"
    return SyncStore(settings.env.redis_url.get_secret_value(), timeout=settings.env.redis_timeout_seconds)


@asynccontextmanager
async def edge_store(settings: Settings) -> AsyncIterator[AsyncStore]:
    """The web process's store on its own event loop: prepared at start (Redis away is not fatal), closed at the end."""
    env = settings.env
    assert env.redis_url is not None, "the CLI resolves the Redis URL before the app starts"
    store = AsyncStore(env.redis_url.get_secret_value(), timeout=env.redis_timeout_seconds,
                       record_ttl=env.retention_days * 86400, dedup_ttl=env.dedup_ttl_seconds, queue=env.queue)
    try:
        await store.prepare()
    except StoreUnavailable as exc:  # /readyz says so, and the edge answers 503 until Redis is back
        log.warning("store_unavailable_at_start", error=str(exc))
    try:
        yield store
    finally:
        await store.close()


def resolver_or_none(settings: Settings) -> CommitResolver | None:
    """git through GitPython, or None where there is no git binary (only `rerun --ref` needs it here)."""
    try:
        from workers.adapters.gitrepo import GitCommitResolver
    except ImportError:  # GitPython refuses to import without a git executable
        return None
    return GitCommitResolver(Path(settings.env.state_dir) / "git-mirrors")


def operations(settings: Settings, *, cluster: Cluster | None = None, find_cluster: bool = True) -> Operations:
    """The on-call service: the store, a cluster when one is configured (else run views answer 503), git when there is one."""
    if cluster is None and find_cluster:
        cluster, why = cluster_or_none(settings)
        if cluster is None:
            log.info("api_without_cluster", detail=f"run views and actions answer 503: {why}")
    return Operations(settings=settings, store=store_for(settings), cluster=cluster, resolver=resolver_or_none(settings))


@contextmanager
def edge_operations(settings: Settings, *, cluster: Cluster | None = None, find_cluster: bool = True) -> Iterator[Operations]:
    """The on-call service for the web process's lifetime (its store closed at the end)."""
    ops = operations(settings, cluster=cluster, find_cluster=find_cluster)
    try:
        yield ops
    finally:
        ops.store.close()


def git_hosts(settings: Settings) -> dict[str, GitHost]:
    """A status adapter for every host whose API token is set (hosts without one only get logged)."""
    from workers.adapters.githost import git_host_for

    out: dict[str, GitHost] = {}
    for host_id, host in settings.routing.hosts.items():
        token = settings.credentials[host_id].token
        if token is not None:
            out[host_id] = git_host_for(host.kind, api_url=host.api_url, token=token.get_secret_value(), host_id=host_id)
    return out


def orchestrator(settings: Settings) -> Orchestrator:
    """The worker's service with the real adapters: Kubernetes, the Git hosts' APIs, git, Redis."""
    from workers.adapters.gitrepo import GitCommitResolver

    settings.require_signing_key()  # before anything else: a worker never runs without it
    return Orchestrator(settings=settings, store=store_for(settings), cluster=kube_cluster(settings),
                        git_hosts=git_hosts(settings), resolver=GitCommitResolver(Path(settings.env.state_dir) / "git-mirrors"))


def dry_run_orchestrator(settings: Settings) -> Orchestrator:
    """`cibroker dev` without a cluster: routes and renders, records what it would create, creates and posts nothing."""
    return Orchestrator(settings=settings, store=store_for(settings), cluster=None, git_hosts={},  # type: ignore[arg-type]
                        resolver=resolver_or_none(settings), dry_run=True)  # type: ignore[arg-type]
