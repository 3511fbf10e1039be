"""Ports: the few verbs cibroker needs from the outside world, and the values they carry.

Each port has one adapter module that imports the third-party client (see the
import-linter contracts): GitHost -> workers/githost.py (httpx), CommitResolver ->
workers/gitrepo.py (GitPython), Cluster -> workers/kube.py (kubernetes). Services
depend on these Protocols only, so tests can pass recording fakes of the ports or
the real adapters pointed at wire-level fake servers. Add a verb only when a caller
needs it.

Adapters raise `broker.errors.Transient` (retry later; `retry_after` when the peer
said so) or `broker.errors.Permanent` (a person must act); never library exceptions.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol


class CommitState(enum.StrEnum):
    """Host-neutral commit status states (GitLab's names; adapters map them for other hosts)."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCESS = "success"
    FAILED = "failed"
    CANCELED = "canceled"


@dataclass(frozen=True, slots=True)
class CommitStatus:
    """One commit status to post. `ref` is the short branch or tag name (GitLab's `ref`)."""

    repo: str
    repo_id: str
    sha: str
    state: CommitState
    name: str
    ref: str
    description: str = ""
    target_url: str | None = None


class StatusAnswer(enum.StrEnum):
    POSTED = "posted"
    ALREADY = "already"  # the host says the status is already in (or past) that state


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


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One event of a watch stream: ADDED, MODIFIED, DELETED or BOOKMARK, with the object."""

    type: str
    object: Mapping[str, Any]

    @property
    def resource_version(self) -> str:
        return str(self.object.get("metadata", {}).get("resourceVersion", ""))


class Cluster(Protocol):
    def create_pipelinerun(self, body: Mapping[str, Any], *, namespace: str) -> tuple[Mapping[str, Any], bool]:
        """Create; returns (object, created). AlreadyExists returns the existing object and False."""

    def get_pipelinerun(self, *, namespace: str, name: str) -> Mapping[str, Any] | None: ...

    def list_pipelineruns(self, *, namespace: str, selector: str) -> tuple[list[Mapping[str, Any]], str]:
        """Items and the list's resourceVersion (to start a watch from)."""

    def watch_pipelineruns(self, *, namespace: str, selector: str, resource_version: str, timeout_seconds: int) -> Iterator[WatchEvent]:
        """Events after `resource_version`, with bookmarks; raises `Expired` on 410 Gone."""

    def patch_pipelinerun(self, *, namespace: str, name: str, patch: Mapping[str, Any]) -> Mapping[str, Any]:
        """JSON merge patch (labels, annotations, spec.status for cancelling)."""

    def service_account_exists(self, *, namespace: str, name: str) -> bool: ...

    def list_taskruns(self, *, namespace: str, pipelinerun: str) -> list[Mapping[str, Any]]: ...

    def delete_pipelinerun(self, *, namespace: str, name: str) -> None:
        """Delete (its TaskRuns go with it); a run already gone is not an error."""

    def get_deployment(self, *, namespace: str, name: str) -> Mapping[str, Any] | None: ...

    def patch_deployment(self, *, namespace: str, name: str, patch: Mapping[str, Any]) -> Mapping[str, Any]:
        """Strategic merge patch (container image by name, annotations)."""
