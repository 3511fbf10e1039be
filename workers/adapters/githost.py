"""Commit statuses on GitLab, GitHub and Gitea: the only module that imports httpx for Git hosts.

Each adapter turns a host-neutral `CommitStatus` into one POST and the host's answer
into a `StatusAnswer` or one of our errors; the classification of answers is shared:

    200/201                                   POSTED
    400 "Cannot transition status ..."        ALREADY  (GitLab: already in or past that state)
    409, 429, 5xx, timeouts, refused          Transient (retry_after from Retry-After,
    403 with x-ratelimit-remaining: 0,         RateLimit-Reset / x-ratelimit-reset)
      retry-after or "rate limit" (GitHub)
    401, 403, 404                             Permanent, naming the setting to fix
    any other answer                          Permanent, quoting the host's message

The token never appears in a message or a repr. This module decides nothing about
*whether* to report (that is the reporter's job); it only says what the host answered.
"""

from __future__ import annotations

import email.utils
import json
import time
from typing import Any, Self
from urllib.parse import quote

import httpx

from broker.core.errors import Permanent, Transient
from broker.core.status import CommitState, CommitStatus, StatusAnswer
from broker.ports import GitHost

__all__ = ["GitHubStatuses", "GitLabStatuses", "GiteaStatuses", "git_host_for"]

# GitHub and Gitea have no "running"; a running build is a pending status whose description says so.
_GITHUB_STATES = {
    CommitState.PENDING: "pending",
    CommitState.RUNNING: "pending",
    CommitState.SUCCESS: "success",
    CommitState.FAILED: "failure",
    CommitState.CANCELED: "error",
}


class _Statuses:
    """What the three adapters share: the client, the POST, and reading the answer."""

    host = "Git host"
    description_limit: int | None = None

    def __init__(
        self,
        api_url: str,
        token: str,
        *,
        client: httpx.Client | None = None,
        timeout: float = 10,
        host_id: str | None = None,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self._token = token
        self._owns_client = client is None
        self._client = client if client is not None else httpx.Client(timeout=timeout)
        self._setting = f"hosts.{host_id}.token" if host_id else "hosts.<id>.token"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(api_url={self.api_url!r})"

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def set_status(self, status: CommitStatus) -> StatusAnswer:
        url, headers, body = self._request(status)
        subject = f"{status.repo}@{status.sha[:8]}"
        try:
            response = self._client.post(url, headers={"User-Agent": "cibroker", **headers}, json=body)
        except httpx.UnsupportedProtocol as exc:
            raise Permanent(f"{self.host} api_url {self.api_url!r} is not an http(s) URL") from exc
        except httpx.TimeoutException as exc:
            raise Transient(f"{self.host} timed out posting status for {subject}") from exc
        except httpx.TransportError as exc:
            raise Transient(f"{self.host} unreachable posting status for {subject}: {type(exc).__name__}") from exc
        return self._answer(response, repo=status.repo, subject=subject)

    def _request(self, status: CommitStatus) -> tuple[str, dict[str, str], dict[str, Any]]:
        raise NotImplementedError

    def _answer(self, response: httpx.Response, *, repo: str, subject: str) -> StatusAnswer:
        code = response.status_code
        if code in (200, 201):
            return StatusAnswer.POSTED
        message = _message(response)
        said = f"{self.host} answered {code} posting status for {subject}"
        if code == 400 and "cannot transition status" in message.lower():
            return StatusAnswer.ALREADY
        # GitHub throttles with 403 too: primary limits zero x-ratelimit-remaining, secondary ones send retry-after.
        limited = code == 403 and (
            response.headers.get("x-ratelimit-remaining") == "0"
            or "retry-after" in response.headers
            or "rate limit" in message.lower()
        )
        if code in (409, 429) or code >= 500 or limited:
            raise Transient(f"{said}: {message}", retry_after=_retry_after(response.headers, now=time.time()))
        if code == 401:
            raise Permanent(f"{self.host} token rejected (401) posting status for {subject}: check {self._setting}")
        if code == 403:
            raise Permanent(f"{said}: {message}; the token's user needs permission to set commit statuses ({self._setting})")
        if code == 404:
            raise Permanent(f"{said}: {message}; check the repository {repo} exists and {self._setting} can see it")
        raise Permanent(f"{said}: {message}")

    def _description(self, text: str) -> str:
        limit = self.description_limit
        if limit is None or len(text) <= limit:
            return text
        return text[: limit - 1] + "…"


class GitLabStatuses(_Statuses):
    """POST /projects/:id/statuses/:sha (GitLab API v4), authenticated by PRIVATE-TOKEN."""

    host = "GitLab"
    description_limit = 255

    def _request(self, status: CommitStatus) -> tuple[str, dict[str, str], dict[str, Any]]:
        project = status.repo_id if status.repo_id.isdigit() else quote(status.repo, safe="")
        body: dict[str, Any] = {
            "state": str(status.state),
            "name": status.name,
            "ref": status.ref,
            "description": self._description(status.description),
        }
        if status.target_url:
            body["target_url"] = status.target_url
        url = f"{self.api_url}/projects/{project}/statuses/{status.sha}"
        return url, {"PRIVATE-TOKEN": self._token}, body


class GitHubStatuses(_Statuses):
    """POST /repos/:owner/:repo/statuses/:sha (GitHub REST), Bearer token."""

    host = "GitHub"
    description_limit = 140  # GitHub answers 422 "description is too long" past 140
    auth_scheme = "Bearer"

    def _request(self, status: CommitStatus) -> tuple[str, dict[str, str], dict[str, Any]]:
        description = status.description
        if status.state is CommitState.RUNNING and "running" not in description.lower():
            description = f"running: {description}" if description else "running"
        body: dict[str, Any] = {
            "state": _GITHUB_STATES[status.state],
            "context": status.name,
            "description": self._description(description),
        }
        if status.target_url:
            body["target_url"] = status.target_url
        owner_repo = "/".join(quote(part, safe="") for part in status.repo.split("/"))
        headers = {"Authorization": f"{self.auth_scheme} {self._token}", **self._extra_headers()}
        return f"{self.api_url}/repos/{owner_repo}/statuses/{status.sha}", headers, body

    def _extra_headers(self) -> dict[str, str]:
        return {"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": "2022-11-28"}


class GiteaStatuses(GitHubStatuses):
    """Gitea/Forgejo speak GitHub's statuses API under /api/v1, with `Authorization: token`."""

    host = "Gitea"
    description_limit = None
    auth_scheme = "token"

    def _extra_headers(self) -> dict[str, str]:
        return {"Accept": "application/json"}


_KINDS: dict[str, type[_Statuses]] = {"gitlab": GitLabStatuses, "github": GitHubStatuses, "gitea": GiteaStatuses}


def git_host_for(kind: str, *, api_url: str, token: str, host_id: str | None = None, timeout: float = 10) -> GitHost:
    """The adapter for a routing file's `hosts.<id>.kind`."""
    try:
        adapter = _KINDS[kind]
    except KeyError:
        raise Permanent(f"unknown Git host kind {kind!r}; expected one of {', '.join(sorted(_KINDS))}") from None
    return adapter(api_url, token, timeout=timeout, host_id=host_id)


def _message(response: httpx.Response) -> str:
    """The host's own words: GitLab's `message`/`error`, GitHub's `message` and `errors[].message`."""
    try:
        data = response.json()
    except ValueError:  # not JSON: an HTML error page or GitLab's plain 'Retry later'
        text = " ".join(response.text.split())
        return text[:200] or response.reason_phrase
    if not isinstance(data, dict):
        return json.dumps(data)[:200]
    parts: list[str] = []
    for key in ("message", "error"):
        value = data.get(key)
        if value:
            parts.append(value if isinstance(value, str) else json.dumps(value))
    for error in data.get("errors") or []:
        if isinstance(error, dict) and error.get("message"):
            parts.append(str(error["message"]))
        elif isinstance(error, str):
            parts.append(error)
    return ": ".join(parts)[:500] or response.reason_phrase


def _retry_after(headers: httpx.Headers, *, now: float) -> float | None:
    """Seconds to wait: Retry-After (seconds or HTTP date), else a rate-limit reset epoch minus now."""
    value = headers.get("retry-after")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - now)
            except (TypeError, ValueError):
                pass
    for name in ("ratelimit-reset", "x-ratelimit-reset"):
        value = headers.get(name)
        if value:
            try:
                return max(0.0, float(value) - now)
            except ValueError:
                pass
    return None
