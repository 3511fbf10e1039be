"""Webhook sources: one module per Git host dialect, each pure (verify + parse).

A source turns (headers, raw body) into a host-neutral `PushEvent` or an `Ignored`
value, and tells the delivery's identity for deduplication. Sources raise only
`Rejected` (bad credentials, unparseable or malformed bodies). Headers are passed as
a mapping whose lookups are case-insensitive (lower-case keys, or Starlette's Headers).
"""

from __future__ import annotations


from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from broker.core.errors import Rejected
from broker.core.events import Identity, Ignored, PushEvent
from broker.core.sources.common import Loads


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

    def needs_body(self, policy: AuthPolicy) -> bool:
        """False when `authenticate` decides from headers alone (GitLab's token): then it runs before the body is read."""

    def require_headers(self, headers: Mapping[str, str], *, policy: AuthPolicy) -> None:
        """Raise Rejected(401) when a header the check needs is absent (cheap: no secret compared, no body read)."""

    def parse(self, headers: Mapping[str, str], body: bytes, *, host_id: str, loads: Loads) -> PushEvent | Ignored:
        """The event, or why it is ignored; raises Rejected(400/415) for bodies we cannot read."""

    def identity(self, headers: Mapping[str, str], event: PushEvent, *, authenticated_by: str = "") -> Identity:
        """What deduplicates this delivery: the host's signed delivery id when its signature verified
        (`authenticated_by` says), else the push fingerprint. Unsigned headers never decide it."""


@dataclass(frozen=True, slots=True)
class Credential:
    """One credential set of a host and the routes it speaks for.

    `routes` is None for the host's own secrets (every route of the host), else the route names
    whose secrets these are: a delivery verified only by them can match only those routes.
    """

    policy: AuthPolicy
    routes: frozenset[str] | None = None

    @property
    def label(self) -> str:
        return "host" if self.routes is None else "route " + ", ".join(sorted(self.routes))


@dataclass(frozen=True, slots=True)
class Verified:
    """Who vouched for a delivery: the credential's name and the routes it may match (None: all of the host's)."""

    by: str
    routes: frozenset[str] | None


def authenticate_scoped(source: WebhookSource, headers: Mapping[str, str], body: bytes, *,
                        credentials: Sequence[Credential], now: float) -> Verified:
    """Try every credential set of the host; the delivery may match the union of the routes that verified it.

    Every set is tried (none short-circuits on success), so which one matched shows in the answer only.
    When none verifies, the refusal is the first 403 (a credential was presented and is wrong), else
    the first 401 (nothing usable was presented), the host's own set first.
    """
    if len(credentials) == 1:  # the common case: host-wide secrets only
        only = credentials[0]
        return Verified(by=source.authenticate(headers, body, policy=only.policy, now=now), routes=only.routes)
    used: list[str] = []
    routes: set[str] = set()
    everything = False
    refusals: list[Rejected] = []
    for credential in credentials:
        try:
            by = source.authenticate(headers, body, policy=credential.policy, now=now)
        except Rejected as exc:
            refusals.append(exc)
            continue
        if credential.routes is None:
            everything = True
            used.append(by)
        else:
            routes |= credential.routes
            used.append(f"{by} ({credential.label})")
    if not used:
        raise next((r for r in refusals if r.status == 403), refusals[0])
    return Verified(by=" | ".join(dict.fromkeys(used)), routes=None if everything else frozenset(routes))


def require_headers_any(source: WebhookSource, headers: Mapping[str, str], *, credentials: Sequence[Credential]) -> None:
    """Rejected(401) before the body is read when no credential set of the host finds the headers it needs."""
    first: Rejected | None = None
    for credential in credentials:
        try:
            source.require_headers(headers, policy=credential.policy)
            return
        except Rejected as exc:
            first = first or exc
    if first is not None:
        raise first


def source_for(kind: str) -> WebhookSource:
    from broker.core.sources import gitea, github, gitlab

    sources: dict[str, WebhookSource] = {"gitlab": gitlab.SOURCE, "github": github.SOURCE, "gitea": gitea.SOURCE}
    return sources[kind]
