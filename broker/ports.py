"""Ports: the few verbs cibroker needs from the outside world, and the values they carry.

Each port has one adapter module that imports the third-party client (see the
import-linter contracts): GitHost -> workers/adapters/githost.py (httpx), CommitResolver ->
workers/adapters/gitrepo.py (GitPython), Cluster -> workers/adapters/kube.py (kubernetes). Services
depend on these Protocols only, so tests can pass recording fakes of the ports or
the real adapters pointed at wire-level fake servers. Add a verb only when a caller
needs it.

Adapters raise `broker.core.errors.Transient` (retry later; `retry_after` when the peer
said so) or `broker.core.errors.Permanent` (a person must act); never library exceptions.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from broker.core.events import Identity
from broker.core.records import TaskCall
from broker.core.status import CommitState, CommitStatus, StatusAnswer
from broker.core.watch import WatchEvent

__all__ = ["IngestStore", "Audit", "Cluster", "CommitResolver", "CommitState", "CommitStatus", "Counters", "DeliveryRecords", "Deadlines",
           "Deployments", "GitHost", "OncallStore", "ReportClaims", "Requests", "RunControl", "RunLedger", "RunWatch", "StatusAnswer",
           "Stranded", "WatchEvent", "WorkerStore"]


class GitHost(Protocol):
    def set_status(self, status: CommitStatus) -> StatusAnswer:
        """Post a commit status; Transient on 5xx/429/409/timeouts, Permanent on 401/403/404/other 4xx."""


class CommitResolver(Protocol):
    def resolve_tag(self, *, clone_url: str, tag: str, auth: tuple[str, str] | None) -> str:
        """The commit a tag peels to on the remote (git ls-remote); Permanent if the tag is not there."""

    def resolve_branch(self, *, clone_url: str, branch: str, auth: tuple[str, str] | None) -> str:
        """The commit at the head of a branch on the remote now (for `cibroker rerun --ref`)."""

    def branch_contains(self, *, clone_url: str, branch: str, sha: str, auth: tuple[str, str] | None) -> str:
        """The branch's head now, when `sha` is that head or its ancestor (the commit is real and on the branch).

        Permanent when the remote does not know the commit, has no such branch, or the branch does
        not contain it; Transient when the remote could not be asked (network, 5xx, timeout).
        """

    def is_ancestor(self, *, clone_url: str, ancestor: str, descendant: str, auth: tuple[str, str] | None) -> bool:
        """True when `ancestor` is reachable from `descendant` (git merge-base --is-ancestor)."""


class RunWatch(Protocol):
    """What the watcher needs: find cibroker's runs and follow them."""

    def get_pipelinerun(self, *, namespace: str, name: str) -> Mapping[str, Any] | None: ...

    def list_pipelineruns(self, *, namespace: str, selector: str) -> tuple[list[Mapping[str, Any]], str]:
        """Items and the list's resourceVersion (to start a watch from)."""

    def watch_pipelineruns(self, *, namespace: str, selector: str, resource_version: str, timeout_seconds: int) -> Iterator[WatchEvent]:
        """Events after `resource_version`, with bookmarks; raises `Expired` on 410 Gone."""


class RunControl(Protocol):
    """What starting, cancelling and pruning runs needs."""

    def create_pipelinerun(self, body: Mapping[str, Any], *, namespace: str) -> tuple[Mapping[str, Any], bool]:
        """Create; returns (object, created). AlreadyExists returns the existing object and False."""

    def patch_pipelinerun(self, *, namespace: str, name: str, patch: Mapping[str, Any]) -> Mapping[str, Any]:
        """JSON merge patch (labels, annotations, spec.status for cancelling)."""

    def delete_pipelinerun(self, *, namespace: str, name: str) -> None:
        """Delete (its TaskRuns go with it); a run already gone is not an error."""

    def list_taskruns(self, *, namespace: str, pipelinerun: str) -> list[Mapping[str, Any]]: ...

    def service_account_exists(self, *, namespace: str, name: str) -> bool: ...


class Deployments(Protocol):
    """What the deploy stage needs: read a Deployment, set its image."""

    def get_deployment(self, *, namespace: str, name: str) -> Mapping[str, Any] | None: ...

    def patch_deployment(self, *, namespace: str, name: str, patch: Mapping[str, Any]) -> Mapping[str, Any]:
        """Strategic merge patch (container image by name, annotations)."""


class Cluster(RunWatch, RunControl, Deployments, Protocol):
    """The three together: what one Kubernetes adapter (workers.adapters.kube) offers."""


# ---- the store (Redis: broker.adapters.redis_store), in the slices its callers use -----------------


class IngestStore(Protocol):
    """The webhook edge's store (async, on the web process's event loop)."""

    async def accept(self, *, host_id: str, signed: Identity | None, fingerprint: str, routes: tuple[str, ...], delivery_id: str,
                     record: dict[str, Any] | bytes, message: str | bytes,
                     log: list[dict[str, Any]] | list[bytes]) -> tuple[str, str] | None:
        """Store the delivery and queue its task atomically, unless a dedup key says it is a duplicate:
        None when accepted, else (the first delivery's id, what made it a duplicate)."""

    async def record_ignored(self, *, delivery_id: str, record: dict[str, Any], log: list[dict[str, Any]]) -> None: ...

    async def get(self, delivery_id: str) -> dict[str, Any] | None: ...

    async def counters(self, families: list[str], *, queue: str) -> tuple[dict[str, dict[str, float]], int]: ...

    async def ping(self) -> None: ...


class DeliveryRecords(Protocol):
    """Stored deliveries and their decision logs."""

    def get(self, delivery_id: str) -> dict[str, Any] | None:
        """The record with its `state` and `log`, or None."""

    def records(self, delivery_ids: list[str]) -> list[dict[str, Any] | None]: ...

    def recent(self, *, limit: int, offset: int = 0) -> list[dict[str, Any] | None]: ...

    def append_log(self, delivery_id: str, entry: dict[str, Any], *, state: str | None = None) -> None: ...

    def add_delivery(self, *, record: dict[str, Any], log: list[dict[str, Any]], queue: str, call: TaskCall, ttl: int) -> None:
        """Store a delivery made by a person (a re-run) and queue its task, in one transaction."""


class RunLedger(Protocol):
    """Which delivery owns which run, and the order of a ref's pushes."""

    def own_run(self, delivery_id: str, *, namespace: str, name: str, route: str, sha: str, attempt: int) -> None: ...

    def delivery_run(self, delivery_id: str, namespace: str, name: str) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
        """(the delivery's record, the run entry it owns under that name or None), or None without a record."""

    def link_push(self, *, host: str, repo_id: str, ref: str, after: str, before: str, ttl: int) -> None: ...

    def push_order(self, *, host: str, repo_id: str, ref: str, ours: str, others: list[str], max_steps: int) -> list[int]: ...


class ReportClaims(Protocol):
    """Ordered, leased claims on status posts, and once-only claims (deploys)."""

    def claim_report(self, run: str, status_name: str, *, state: str, rank: int, token: str, ttl: int,
                     lease_seconds: float = ...) -> int:
        """1: claimed; 0: a later or equal state is in; -1: an earlier post is in flight (retry soon)."""

    def release_report(self, run: str, status_name: str, *, state: str, token: str) -> None: ...

    def reported(self, run: str) -> dict[str, str]: ...

    def claim_once(self, key: str, *, token: str, ttl: int) -> bool: ...


class Counters(Protocol):
    """Cluster-wide metric counters (broker.core.metrics families)."""

    def count(self, family: str, labels: str, *, by: float = 1) -> None: ...

    def count_many(self, increments: list[tuple[str, str, float]]) -> None: ...


class Requests(Protocol):
    """People's signed requests (broker.core.trust) and the tasks that carry them out."""

    def put_request(self, request: dict[str, Any], *, ttl: int) -> None: ...

    def get_request(self, request_id: str) -> dict[str, Any] | None: ...

    def enqueue(self, *, queue: str, call: TaskCall) -> None: ...


class Deadlines(Protocol):
    """Rollout deadlines and attempt counters."""

    def set_deadline(self, key: str, *, deadline: float, ttl: int) -> float: ...

    def deadline(self, key: str) -> float | None: ...

    def next_attempt(self, key: str, *, ttl: int) -> int: ...

    def peek_attempt(self, key: str) -> int: ...


class Audit(Protocol):
    def audit(self, entry: dict[str, Any], *, retention_seconds: int) -> None: ...

    def audit_log(self, *, limit: int) -> list[dict[str, Any]]: ...


class Stranded(Protocol):
    """Deliveries a dying worker took with it (the watcher's sweep)."""

    def stranded(self, *, queue: str, older_than: float, max_queue: int = ..., horizon: float = ...) -> list[dict[str, Any]]: ...

    def requeue(self, delivery_id: str, *, queue: str, call: TaskCall, entry: dict[str, Any]) -> None: ...


class WorkerStore(DeliveryRecords, RunLedger, ReportClaims, Counters, Requests, Deadlines, Protocol):
    """The slices the orchestrator (broker.services.runs) and its tasks use."""


class OncallStore(DeliveryRecords, ReportClaims, Counters, Requests, Deadlines, Audit, Protocol):
    """The slices the on-call service (broker.services.oncall) uses."""

    def close(self) -> None: ...
