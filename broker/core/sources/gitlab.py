"""GitLab webhooks: X-Gitlab-Token or the signing token, Push Hook and Tag Push Hook.

The commit to build is `checkout_sha`: for an annotated tag `after` is the tag
object, and `commits[-1]` is empty for a branch created at an existing commit and
truncated at 20 commits.
"""

from __future__ import annotations


from collections.abc import Mapping
from typing import Any

from broker.core import signatures
from broker.core.errors import Rejected
from broker.core.events import Identity, Ignored, PushEvent, RefKind
from broker.core.sources import AuthPolicy
from broker.core.sources.common import (
    Loads,
    commit_id,
    deletion,
    display,
    field,
    fingerprint,
    header_identity,
    is_zero,
    load_json,
    previous_sha,
    repo_path,
    repository_id,
    require_json_type,
    skip_marker,
    split_ref,
    title,
)

BUILT = {"Push Hook": "push", "Tag Push Hook": "tag_push"}
# Integrations ("Service Hook") send the same payloads; dispatch on object_kind.
BY_OBJECT_KIND = {"Service Hook"}


class GitLabSource:
    kind = "gitlab"

    def needs_body(self, policy: AuthPolicy) -> bool:
        return bool(policy.signing_secrets)  # the token alone is a header; the signature covers the body

    def require_headers(self, headers: Mapping[str, str], *, policy: AuthPolicy) -> None:
        if policy.signing_secrets:
            missing = [n for n in ("webhook-id", "webhook-timestamp", "webhook-signature") if not headers.get(n)]
            if missing:
                raise Rejected(401, f"missing {', '.join(missing)} (this hook requires GitLab's signing token)")
        if policy.webhook_secrets and headers.get("x-gitlab-token") is None:
            raise Rejected(401, "missing X-Gitlab-Token")

    def authenticate(self, headers: Mapping[str, str], body: bytes, *, policy: AuthPolicy, now: float) -> str:
        used = []
        if policy.signing_secrets:
            used.append(self._check_signature(headers, body, policy=policy, now=now))
        if policy.webhook_secrets:
            token = headers.get("x-gitlab-token")
            if token is None:
                raise Rejected(401, "missing X-Gitlab-Token")
            if not signatures.token_matches(token, policy.webhook_secrets):
                raise Rejected(403, "invalid X-Gitlab-Token")
            used.append("X-Gitlab-Token")
        if not used:
            # Settings refuse such a host; refuse here too rather than let an empty policy accept anyone.
            raise Rejected(403, "no webhook secret or signing token is configured for this host; every request is refused")
        return " + ".join(used)

    @staticmethod
    def _check_signature(headers: Mapping[str, str], body: bytes, *, policy: AuthPolicy, now: float) -> str:
        msg_id = headers.get("webhook-id")
        stamp = headers.get("webhook-timestamp")
        signature = headers.get("webhook-signature")
        missing = [n for n, v in (("webhook-id", msg_id), ("webhook-timestamp", stamp), ("webhook-signature", signature)) if not v]
        if missing:
            raise Rejected(401, f"missing {', '.join(missing)} (this hook requires GitLab's signing token)")
        assert msg_id and stamp and signature
        # isdigit() alone takes "²" and "١٢", which int() refuses or reads; and int() refuses > 4300 digits.
        if not (stamp.isascii() and stamp.isdigit()) or len(stamp) > 12:
            raise Rejected(401, "webhook-timestamp is not a Unix time in seconds")
        if abs(now - int(stamp)) > policy.tolerance_seconds:
            raise Rejected(403, f"webhook-timestamp is more than {policy.tolerance_seconds} s from now (stale or replayed)")
        if not signatures.standard_webhook_matches(
            body, msg_id=msg_id, timestamp=stamp, signature_header=signature, secrets=policy.signing_secrets
        ):
            raise Rejected(403, "invalid webhook-signature")
        return "webhook-signature"

    def parse(self, headers: Mapping[str, str], body: bytes, *, host_id: str, loads: Loads) -> PushEvent | Ignored:
        require_json_type(headers)
        event = headers.get("x-gitlab-event", "")
        payload = load_json(body, loads=loads)
        kind = payload.get("object_kind")
        if event in BY_OBJECT_KIND and kind in BUILT.values():
            pass
        elif event == "System Hook":
            return Ignored(code="system_hook", reason="system hooks are not built; add a project or group webhook", event=event)
        elif event not in BUILT:
            shown = event or "(no X-Gitlab-Event header)"
            return Ignored(code="event_not_built", reason=f"GitLab event {shown!r} is not built (only Push Hook and Tag Push Hook)", event=event)
        elif kind != BUILT[event]:
            raise Rejected(400, f"X-Gitlab-Event {event!r} does not match object_kind {kind!r}")
        return self._push(payload, event=event, host_id=host_id)

    @staticmethod
    def _push(payload: dict[str, Any], *, event: str, host_id: str) -> PushEvent | Ignored:
        ref_kind, name = split_ref(field(payload, "ref"))
        expected = RefKind.TAG if payload.get("object_kind") == "tag_push" else RefKind.BRANCH
        if ref_kind is not expected:
            raise Rejected(400, f"object_kind {payload.get('object_kind')!r} with ref {field(payload, 'ref')!r}")
        after = field(payload, "after")
        if is_zero(after):
            return deletion(ref_kind, name, event)
        after = commit_id(after, name="after")
        before = previous_sha(field(payload, "before", required=False))
        checkout = field(payload, "checkout_sha", required=False)
        if checkout:
            sha, source = commit_id(checkout, name="checkout_sha"), "checkout_sha"
        else:
            sha, source = after, "after"
        repo = repo_path(field(payload, "project.path_with_namespace"), name="project.path_with_namespace")
        project_id = field(payload, "project_id", kind=(int, str), required=False) or field(payload, "project.id", kind=(int, str))
        commits = field(payload, "commits", kind=list, required=False) or []
        head = next((c for c in commits if isinstance(c, dict) and c.get("id") == sha), None)
        message = head.get("message") if head and isinstance(head.get("message"), str) else None
        skip = skip_marker(message) or _push_option_skip(payload.get("push_options"))
        total = field(payload, "total_commits_count", kind=int, required=False)
        return PushEvent(
            host=host_id,
            host_kind="gitlab",
            event=event,
            kind=ref_kind,
            repo=repo,
            repo_id=repository_id(project_id, name="project_id"),
            ref=field(payload, "ref"),
            name=name,
            before=before,
            sha=sha,
            sha_source=source,
            pushed=after,
            sender=display(payload.get("user_username") or payload.get("user_name") or "", limit=100),
            head_title=title(message),
            total_commits=total,
            skip_reason=skip,
            web_url=display(field(payload, "project.web_url", required=False) or "", limit=300),
        )

    def identity(self, headers: Mapping[str, str], event: PushEvent, *, authenticated_by: str = "") -> Identity:
        # webhook-id is inside the signed string ("id.timestamp.body") only when the signature verified;
        # Idempotency-Key and the event UUIDs are unsigned, so they never make a delivery new.
        if "webhook-signature" in authenticated_by:
            signed = header_identity(headers, "webhook-id")
            if signed is not None:
                return signed
        return fingerprint(event)


def _push_option_skip(options: Any) -> str | None:
    """GitLab's `git push -o ci.skip` arrives as push_options {"ci": {"skip": true}}."""
    if not isinstance(options, dict):
        return None
    ci = options.get("ci")
    if (isinstance(ci, dict) and ci.get("skip")) or options.get("ci.skip"):
        return "push option ci.skip"
    return None


SOURCE = GitLabSource()
