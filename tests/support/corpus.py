"""The corpus's webhook payloads as requests: their headers (with the event header upstream omits),
what the sources make of each (the golden files' shape), and where its golden file lives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from broker.core.errors import Rejected
from broker.core.events import Ignored
from broker.core.sources import source_for
from tests.support import CORPUS, FIXTURES, headers_of, payload

GOLDEN = FIXTURES / "golden"
HOSTS = ("gitlab", "github", "gitea")
EVENT_HEADERS = {"gitlab": ("x-gitlab-event",), "github": ("x-github-event",), "gitea": ("x-gitea-event", "x-forgejo-event")}

# Payloads whose upstream fixture has no headers (or none naming the event): the event
# header the upstream test delivers them with, or the hook GitLab sends for their object_kind.
SUPPLIED_EVENT: dict[str, tuple[str, str]] = {
    "gitlab/merge-request-docs-example.json": ("X-Gitlab-Event", "Merge Request Hook"),
    "gitlab/merge-request-pac.json": ("X-Gitlab-Event", "Merge Request Hook"),
    "gitlab/note-commit.json": ("X-Gitlab-Event", "Note Hook"),
    "gitlab/note-merge-request.json": ("X-Gitlab-Event", "Note Hook"),
    "gitlab/pipeline-hook.json": ("X-Gitlab-Event", "Pipeline Hook"),
    "gitlab/push-14-commits-real.json": ("X-Gitlab-Event", "Push Hook"),
    "gitlab/push-docs-example-truncated-commits.json": ("X-Gitlab-Event", "Push Hook"),
    "gitlab/push-merge-two-commits.json": ("X-Gitlab-Event", "Push Hook"),
    "gitlab/tag-push-deleted-subgroup.json": ("X-Gitlab-Event", "Tag Push Hook"),
    "gitlab/tag-push-docs-example.json": ("X-Gitlab-Event", "Tag Push Hook"),
    "github/create-tag-octokit.json": ("X-GitHub-Event", "create"),
    "github/delete-tag-octokit.json": ("X-GitHub-Event", "delete"),
    "github/ping-organization-hook.json": ("X-GitHub-Event", "ping"),
    "github/push-forced.json": ("X-GitHub-Event", "push"),
    "github/push-merge-pr-two-commits.json": ("X-GitHub-Event", "push"),
    "github/push-new-branch-initial-commit.json": ("X-GitHub-Event", "push"),
    "github/push-no-username-committer.json": ("X-GitHub-Event", "push"),
    "github/push-tag-created-woodpecker.json": ("X-GitHub-Event", "push"),
    "github/push-tag-deleted-octokit.json": ("X-GitHub-Event", "push"),
    "github/push-tag-moved.json": ("X-GitHub-Event", "push"),
    "gitea/push-pac.json": ("X-Gitea-Event", "push"),
}

ANNOTATED_TAG = "gitlab/tag-push-annotated-created.json"
GITLAB_PUSH = "gitlab/push-branch-update.json"
GITHUB_PUSH = "github/push-branch-update-signed.json"
GITEA_PUSH = "gitea/push-three-commits.json"


def lower_keys(headers: dict[str, str]) -> dict[str, str]:
    """Corpus header files keep upstream's spelling; sources look headers up in lower case."""
    return {name.lower(): value for name, value in headers.items()}


def corpus_payloads() -> list[str]:
    """Every webhook payload of the three hosts (not headers, signature vectors or gitlab/api/)."""
    return [
        f"{host}/{file.name}"
        for host in HOSTS
        for file in sorted((CORPUS / host).glob("*.json"))
        if not file.name.endswith(".headers.json") and not file.name.startswith("_")
    ]


def names_event(rel: str, headers: dict[str, str]) -> bool:
    return any(name in headers for name in EVENT_HEADERS[rel.split("/")[0]])


def request_headers(rel: str) -> dict[str, str]:
    """The headers a payload is delivered with: its corpus headers, plus the event header it represents."""
    headers = lower_keys(headers_of(rel))
    if not names_event(rel, headers):
        name, value = SUPPLIED_EVENT[rel]
        headers[name.lower()] = value
    return headers


def outcome(rel: str) -> dict[str, Any]:
    """What the source makes of a corpus payload, in the shape the golden files hold."""
    host = rel.split("/")[0]
    try:
        result = source_for(host).parse(request_headers(rel), payload(rel), host_id=host, loads=orjson.loads)
    except Rejected as exc:
        return {"rejected": {"status": exc.status, "reason": exc.reason}}
    if isinstance(result, Ignored):
        return {"ignored": {"code": result.code, "reason": result.reason}}
    return result.as_dict()


def golden_path(rel: str) -> Path:
    return GOLDEN / rel.replace(".json", ".expected.json")
