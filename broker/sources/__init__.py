"""Webhook sources: one module per Git host dialect, each pure (verify + parse).

A source turns (headers, raw body) into a host-neutral `PushEvent` or an `Ignored`
value, and tells the delivery's identity for deduplication. Sources raise only
`Rejected` (bad credentials, unparseable or malformed bodies). Headers are passed as
a mapping whose lookups are case-insensitive (lower-case keys, or Starlette's Headers).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from broker.events import Identity, Ignored, PushEvent


@dataclass(frozen=True, slots=True)
class AuthPolicy:
    """The credentials one host accepts. Values are secrets: this type never prints them."""

    webhook_secrets: tuple[str, ...] = ()
    signing_secrets: tuple[str, ...] = ()
    tolerance_seconds: int = 300
    allow_sha1: bool = False

    def __repr__(self) -> str:
        return (
            f"AuthPolicy(webhook_secrets=<{len(self.webhook_secrets)} redacted>, "
            f"signing_secrets=<{len(self.signing_secrets)} redacted>, tolerance_seconds={self.tolerance_seconds})"
        )


class WebhookSource(Protocol):
    kind: str

    def authenticate(self, headers: Mapping[str, str], body: bytes, *, policy: AuthPolicy, now: float) -> str:
        """Name of the credential that verified the request; raises Rejected(401/403)."""

    def parse(self, headers: Mapping[str, str], body: bytes, *, host_id: str) -> PushEvent | Ignored:
        """The event, or why it is ignored; raises Rejected(400/415) for bodies we cannot read."""

    def identity(self, headers: Mapping[str, str], event: PushEvent) -> Identity:
        """The host's identity of this delivery (for deduplication)."""


def source_for(kind: str) -> WebhookSource:
    from broker.sources import gitea, github, gitlab

    sources: dict[str, WebhookSource] = {"gitlab": gitlab.SOURCE, "github": github.SOURCE, "gitea": gitea.SOURCE}
    return sources[kind]
