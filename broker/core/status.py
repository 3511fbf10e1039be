"""Commit statuses as cibroker speaks of them: host-neutral states and the status to post."""

from __future__ import annotations

import enum
from dataclasses import dataclass


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
