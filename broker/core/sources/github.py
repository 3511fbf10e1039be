"""GitHub webhooks: X-Hub-Signature-256 over the raw body, `push` events.

JSON and form-encoded (`payload=`) bodies are both accepted; the signature is
always checked over the bytes received. create/delete events are ignored: the
`push` event for the same ref carries everything we build from.
"""

from __future__ import annotations


from collections.abc import Mapping
from typing import Any

from broker.core import signatures
from broker.core.errors import Rejected
from broker.core.events import Identity, Ignored, PushEvent
from broker.core.sources import AuthPolicy
from broker.core.sources.common import (
    Loads,
    commit_id,
    deletion,
    display,
    field,
    fingerprint,
    is_zero,
    load_json_or_form,
    previous_sha,
    repo_path,
    repository_id,
    skip_marker,
    split_ref,
    title,
)


def check_hmac(
    headers: Mapping[str, str], body: bytes, *, policy: AuthPolicy, sha256_header: str, sha1_header: str | None, prefixed: bool
) -> str:
    """Shared by GitHub (sha256=<hex>) and Gitea/Forgejo (bare hex); header names as people write them."""
    value = headers.get(sha256_header.lower())
    algorithm, header = "sha256", sha256_header
    if value is None and sha1_header and headers.get(sha1_header.lower()) is not None:
        if not policy.allow_sha1:
            raise Rejected(401, f"only {sha1_header} (SHA-1) was sent; this host requires {sha256_header} (SHA-256), or set allow_sha1_signatures")
        value, algorithm, header = headers.get(sha1_header.lower()), "sha1", sha1_header
    if value is None:
        raise Rejected(401, f"missing {sha256_header}")
    if prefixed:
        scheme, _, value = value.partition("=")
        if scheme.strip().lower() != algorithm:
            raise Rejected(403, f"{header} must start with '{algorithm}='")
    if not signatures.hex_hmac_matches(body, value, policy.webhook_secrets, algorithm=algorithm):
        raise Rejected(403, f"invalid {header}")
    return header


def push_event(payload: dict[str, Any], *, event: str, host_id: str, host_kind: str) -> PushEvent | Ignored:
    """A GitHub-shaped push payload (GitHub, Gitea, Forgejo) as a PushEvent."""
    ref = field(payload, "ref")
    kind, name = split_ref(ref)
    after = field(payload, "after")
    if payload.get("deleted") is True or is_zero(after):
        return deletion(kind, name, event)
    after = commit_id(after, name="after")
    head = payload.get("head_commit") if isinstance(payload.get("head_commit"), dict) else None
    head_id = head.get("id") if head else None
    if isinstance(head_id, str) and head_id:
        sha, source = commit_id(head_id, name="head_commit.id"), "head_commit.id"
    else:
        sha, source = after, "after"
    message = head.get("message") if head and isinstance(head.get("message"), str) else None
    if message is None:
        commits = payload.get("commits") if isinstance(payload.get("commits"), list) else []
        match = next((c for c in commits if isinstance(c, dict) and c.get("id") == sha), None)
        message = match.get("message") if match and isinstance(match.get("message"), str) else None
    repo = repo_path(field(payload, "repository.full_name"), name="repository.full_name")
    sender = field(payload, "sender.login", required=False) or field(payload, "pusher.name", required=False) or ""
    commits = payload.get("commits")
    return PushEvent(
        host=host_id,
        host_kind=host_kind,
        event=event,
        kind=kind,
        repo=repo,
        repo_id=repository_id(field(payload, "repository.id", kind=(int, str)), name="repository.id"),
        ref=ref,
        name=name,
        before=previous_sha(field(payload, "before", required=False)),
        sha=sha,
        sha_source=source,
        pushed=after,
        sender=display(sender, limit=100),
        head_title=title(message),
        total_commits=len(commits) if isinstance(commits, list) else None,
        skip_reason=skip_marker(message),
        web_url=display(field(payload, "repository.html_url", required=False) or "", limit=300),
    )


class GitHubSource:
    kind = "github"

    def authenticate(self, headers: Mapping[str, str], body: bytes, *, policy: AuthPolicy, now: float) -> str:
        return check_hmac(
            headers, body, policy=policy, sha256_header="X-Hub-Signature-256", sha1_header="X-Hub-Signature", prefixed=True
        )

    def parse(self, headers: Mapping[str, str], body: bytes, *, host_id: str, loads: Loads) -> PushEvent | Ignored:
        event = headers.get("x-github-event", "")
        payload = load_json_or_form(headers, body, loads=loads)
        if event == "ping":
            zen = payload.get("zen") if isinstance(payload.get("zen"), str) else ""
            return Ignored(code="ping", reason=f"ping received; the hook works ({zen[:100]})" if zen else "ping received; the hook works", event=event)
        if event in ("create", "delete"):
            return Ignored(code="event_not_built", reason=f"GitHub {event!r} events are not built; the push event for the same ref is", event=event)
        if event != "push":
            shown = event or "(no X-GitHub-Event header)"
            return Ignored(code="event_not_built", reason=f"GitHub event {shown!r} is not built (only push)", event=event)
        return push_event(payload, event=event, host_id=host_id, host_kind=self.kind)

    def needs_body(self, policy: AuthPolicy) -> bool:
        return True

    def require_headers(self, headers: Mapping[str, str], *, policy: AuthPolicy) -> None:
        # A lone X-Hub-Signature (SHA-1) passes here: authenticate() says why it is refused, or checks it.
        if headers.get("x-hub-signature-256") is None and headers.get("x-hub-signature") is None:
            raise Rejected(401, "missing X-Hub-Signature-256")

    def identity(self, headers: Mapping[str, str], event: PushEvent, *, authenticated_by: str = "") -> Identity:
        # X-GitHub-Delivery is not covered by the HMAC (the body is) and GitHub signs no timestamp:
        # a replay could carry any delivery id, so only the push itself identifies the delivery.
        return fingerprint(event)


SOURCE = GitHubSource()
