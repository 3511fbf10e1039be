"""Gitea and Forgejo webhooks: GitHub-shaped push payloads, bare-hex HMAC-SHA256.

Forgejo sends X-Forgejo-* headers and, for compatibility, the X-Gitea-* ones too;
when X-Forgejo-Signature is present it is the one checked. The legacy `secret`
field inside the body is never accepted as a credential.
"""

from __future__ import annotations


from collections.abc import Mapping

from broker.core.errors import Rejected
from broker.core.events import Identity, Ignored, PushEvent
from broker.core.sources import AuthPolicy
from broker.core.sources.common import Loads, fingerprint, load_json_or_form
from broker.core.sources.github import check_hmac, push_event


class GiteaSource:
    kind = "gitea"

    def authenticate(self, headers: Mapping[str, str], body: bytes, *, policy: AuthPolicy, now: float) -> str:
        header = "X-Forgejo-Signature" if headers.get("x-forgejo-signature") is not None else "X-Gitea-Signature"
        if headers.get(header.lower()) is None:
            raise Rejected(401, "missing X-Gitea-Signature (or X-Forgejo-Signature)")
        return check_hmac(headers, body, policy=policy, sha256_header=header, sha1_header=None, prefixed=False)

    def parse(self, headers: Mapping[str, str], body: bytes, *, host_id: str, loads: Loads) -> PushEvent | Ignored:
        event = headers.get("x-forgejo-event") or headers.get("x-gitea-event") or ""
        payload = load_json_or_form(headers, body, loads=loads)
        if event != "push":
            shown = event or "(no X-Gitea-Event header)"
            return Ignored(code="event_not_built", reason=f"Gitea event {shown!r} is not built (only push)", event=event)
        return push_event(payload, event=event, host_id=host_id, host_kind=self.kind)

    def needs_body(self, policy: AuthPolicy) -> bool:
        return True

    def require_headers(self, headers: Mapping[str, str], *, policy: AuthPolicy) -> None:
        if headers.get("x-forgejo-signature") is None and headers.get("x-gitea-signature") is None:
            raise Rejected(401, "missing X-Gitea-Signature (or X-Forgejo-Signature)")

    def identity(self, headers: Mapping[str, str], event: PushEvent, *, authenticated_by: str = "") -> Identity:
        # X-Gitea-Delivery / X-Forgejo-Delivery are unsigned (the HMAC covers the body only).
        return fingerprint(event)


SOURCE = GiteaSource()
