"""Recording fakes of our own ports, for service tests (wire-level fakes test the adapters)."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from broker.core.errors import Permanent
from broker.core.status import CommitStatus, StatusAnswer
from broker.core.watch import WatchEvent


def _merge(target: dict[str, Any], patch: Mapping[str, Any]) -> None:
    for key, value in patch.items():
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        elif value is None:
            target.pop(key, None)
        else:
            target[key] = copy.deepcopy(value)


def _selected(obj: Mapping[str, Any], selector: str) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in (part.split("=", 1) for part in selector.split(",") if part))


@dataclass
class FakeCluster:
    """PipelineRuns, service accounts and Deployments in dicts; every call recorded in `calls`."""

    runs: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    service_accounts: set[tuple[str, str]] = field(default_factory=set)
    deployments: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    taskruns: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    _rv: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def create_pipelinerun(self, body: Mapping[str, Any], *, namespace: str) -> tuple[Mapping[str, Any], bool]:
        self.calls.append(("create_pipelinerun", body["metadata"]["name"]))
        key = (namespace, body["metadata"]["name"])
        if key in self.runs:
            return self.runs[key], False
        obj = copy.deepcopy(dict(body))
        obj["metadata"]["resourceVersion"] = str(next(self._rv))
        self.runs[key] = obj
        return obj, True

    def get_pipelinerun(self, *, namespace: str, name: str) -> Mapping[str, Any] | None:
        self.calls.append(("get_pipelinerun", name))
        return self.runs.get((namespace, name))

    def list_pipelineruns(self, *, namespace: str, selector: str) -> tuple[list[Mapping[str, Any]], str]:
        self.calls.append(("list_pipelineruns", selector))
        return [o for (ns, _), o in self.runs.items() if ns == namespace and _selected(o, selector)], str(next(self._rv))

    def watch_pipelineruns(self, *, namespace: str, selector: str, resource_version: str, timeout_seconds: int) -> Iterator[WatchEvent]:
        return iter(())

    def patch_pipelinerun(self, *, namespace: str, name: str, patch: Mapping[str, Any]) -> Mapping[str, Any]:
        self.calls.append(("patch_pipelinerun", name))
        obj = self.runs[(namespace, name)]
        _merge(obj, patch)
        return obj

    def delete_pipelinerun(self, *, namespace: str, name: str) -> None:
        self.calls.append(("delete_pipelinerun", name))
        self.runs.pop((namespace, name), None)

    def service_account_exists(self, *, namespace: str, name: str) -> bool:
        self.calls.append(("service_account_exists", name))
        return (namespace, name) in self.service_accounts

    def list_taskruns(self, *, namespace: str, pipelinerun: str) -> list[Mapping[str, Any]]:
        self.calls.append(("list_taskruns", pipelinerun))
        return self.taskruns.get((namespace, pipelinerun), [])

    def get_deployment(self, *, namespace: str, name: str) -> Mapping[str, Any] | None:
        self.calls.append(("get_deployment", name))
        return self.deployments.get((namespace, name))

    def patch_deployment(self, *, namespace: str, name: str, patch: Mapping[str, Any]) -> Mapping[str, Any]:
        self.calls.append(("patch_deployment", name))
        obj = self.deployments[(namespace, name)]
        containers = patch.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
        for change in containers:
            for c in obj["spec"]["template"]["spec"]["containers"]:
                if c["name"] == change["name"]:
                    c.update(change)
        _merge(obj["metadata"], patch.get("metadata", {}))
        obj["metadata"]["generation"] = obj["metadata"].get("generation", 1) + (1 if containers else 0)
        return obj

    # test-side helpers -------------------------------------------------------------
    def set_condition(self, namespace: str, name: str, status: str, reason: str, message: str = "") -> dict[str, Any]:
        """Move a run as Tekton would; on success it reports the shipped Pipelines' results (commit, image-digest)."""
        from tests.support.fakes.tekton import results_of

        obj = self.runs[(namespace, name)]
        obj.setdefault("status", {})["conditions"] = [{"type": "Succeeded", "status": status, "reason": reason, "message": message}]
        if status == "True":
            obj["status"]["results" if obj.get("apiVersion", "").endswith("/v1") else "pipelineResults"] = results_of(obj)
        return copy.deepcopy(obj)


@dataclass
class FakeGitHost:
    """Records statuses; answers ALREADY for a repeat of the same state (like GitLab's 'Cannot transition')."""

    statuses: list[CommitStatus] = field(default_factory=list)

    def set_status(self, status: CommitStatus) -> StatusAnswer:
        same = [s for s in self.statuses if (s.sha, s.name, s.ref) == (status.sha, status.name, status.ref)]
        if same and same[-1].state == status.state:
            return StatusAnswer.ALREADY
        self.statuses.append(status)
        return StatusAnswer.POSTED

    def states(self, name: str | None = None) -> list[str]:
        return [f"{s.name}:{s.state}" if name is None else str(s.state) for s in self.statuses if name is None or s.name == name]


@dataclass
class FakeResolver:
    """A remote repository in dicts: branch heads, tags, and which commit descends from which.

    `push(branch, sha, before)` is what a developer's `git push` does to the remote before the
    webhook is sent: the branch moves to `sha`, and `before` becomes its parent. Ancestry is
    transitive, as in git. `calls` records every verb asked.
    """

    tags: dict[str, str] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    ancestry: set[tuple[str, str]] = field(default_factory=set)
    calls: list[tuple[str, str]] = field(default_factory=list)

    def push(self, branch: str, sha: str, *, before: str = "0" * 40) -> None:
        if before.strip("0"):
            self.ancestry.add((before, sha))
        self.branches[branch] = sha
    ancestry_error: Exception | None = None  # raised by is_ancestor (git cannot tell), when set
    asked: list[tuple[str, tuple[str, str] | None]] = field(default_factory=list)  # (clone URL, auth) of every call

    def resolve_branch(self, *, clone_url: str, branch: str, auth: tuple[str, str] | None) -> str:
        self.calls.append(("resolve_branch", branch))
        if branch not in self.branches:
            raise Permanent(f"branch {branch} not found on {clone_url}")
        return self.branches[branch]

    def resolve_tag(self, *, clone_url: str, tag: str, auth: tuple[str, str] | None) -> str:
        self.calls.append(("resolve_tag", tag))
        if tag not in self.tags:
            raise Permanent(f"tag {tag} not found on {clone_url}")
        return self.tags[tag]

    def branch_contains(self, *, clone_url: str, branch: str, sha: str, auth: tuple[str, str] | None) -> str:
        self.calls.append(("branch_contains", f"{branch}@{sha}"))
        head = self.resolve_branch(clone_url=clone_url, branch=branch, auth=auth)
        if head == sha or self._reachable(sha, head):
            return head
        raise Permanent(f"commit {sha[:12]} is not on branch {branch} of {clone_url}: the branch is at {head[:12]}")

    def is_ancestor(self, *, clone_url: str, ancestor: str, descendant: str, auth: tuple[str, str] | None) -> bool:
        self.calls.append(("is_ancestor", f"{ancestor}..{descendant}"))
        self.asked.append((clone_url, auth))
        if self.ancestry_error is not None:
            raise self.ancestry_error
        return self._reachable(ancestor, descendant)

    def _reachable(self, ancestor: str, descendant: str) -> bool:
        seen, frontier = set(), {descendant}
        while frontier:
            parents = {a for (a, d) in self.ancestry if d in frontier} - seen
            if ancestor in parents:
                return True
            seen |= parents
            frontier = parents
        return False
