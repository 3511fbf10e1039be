"""Building the real adapters from Settings, for the processes that need them.

The worker needs a cluster (it refuses to start without one); the web process and
the CLI only need one for the run views and actions, so for them a missing
Kubernetes configuration is a `None` cluster and a clear answer on those actions.
"""

from __future__ import annotations

from pathlib import Path

from broker.errors import ConfigError
from broker.operations import Operations
from broker.ports import Cluster, CommitResolver
from broker.store import SyncStore
from config.settings import Settings


def cluster_or_none(settings: Settings) -> tuple[Cluster | None, str]:
    """The cluster from KUBECONFIG or in-cluster credentials, else (None, why not)."""
    from workers.kube import KubeCluster

    try:
        return KubeCluster.from_environment(tekton_version=settings.env.tekton_api_version), "kubernetes"
    except (ConfigError, Exception) as exc:  # the kubernetes client raises its own ConfigException types
        return None, f"no Kubernetes configuration (KUBECONFIG or in-cluster): {exc}"


def store_for(settings: Settings) -> SyncStore:
    assert settings.env.redis_url is not None, "resolve the Redis URL (or start the embedded one) first"
    return SyncStore(settings.env.redis_url.get_secret_value(), timeout=settings.env.redis_timeout_seconds)


def resolver_or_none(settings: Settings) -> CommitResolver | None:
    """git through GitPython, or None where there is no git binary (only `rerun --ref` needs it here)."""
    try:
        from workers.gitrepo import GitCommitResolver
    except ImportError:  # GitPython refuses to import without a git executable
        return None
    return GitCommitResolver(Path(settings.env.state_dir) / "git-mirrors")


def default_operations(settings: Settings, *, cluster: Cluster | None = None, find_cluster: bool = True) -> Operations:
    if cluster is None and find_cluster:
        cluster, _ = cluster_or_none(settings)
    return Operations(settings=settings, store=store_for(settings), cluster=cluster, resolver=resolver_or_none(settings))
