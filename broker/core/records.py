"""Delivery records: ids, task names and the record a person reads later (Redis keys: broker.adapters.redis_store).

A delivery is one webhook request we answered. Its record holds the normalised
event, the headers that matter, the decision and why, and timestamps; never the
body, never a secret, never a whole header set.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from functools import lru_cache
from collections.abc import Mapping
from typing import Any

from broker.core.events import Identity, Ignored, PushEvent

# The Celery task names: the public contract between whoever queues (the edge, the on-call side,
# the watcher) and the workers (workers/tasks.py). Arguments are ids only.
PROCESS_TASK = "cibroker.process_delivery"  # (delivery_id[, attempt])
DEPLOY_TASK = "cibroker.deploy"  # (namespace, name, environment, attempt, request_id); people queue it too
REPORT_TASK = "cibroker.report_run"  # (namespace, name[, reported hint])
ROLLOUT_TASK = "cibroker.check_rollout"  # (namespace, name, environment, attempt)
CANCEL_TASK = "cibroker.cancel_run"  # (request_id); its consumer verifies the request and patches the run
# Headers worth keeping for the decision log; values are clipped. Credentials are never listed.
KEPT_HEADERS = frozenset((
    "user-agent",
    "x-gitlab-event",
    "x-gitlab-instance",
    "x-gitlab-event-uuid",
    "x-gitlab-webhook-uuid",
    "idempotency-key",
    "webhook-id",
    "webhook-timestamp",
    "x-request-id",
    "x-github-event",
    "x-github-delivery",
    "x-github-hook-id",
    "x-gitea-event",
    "x-gitea-delivery",
    "x-forgejo-event",
    "x-forgejo-delivery",
    "content-type",
))


@dataclass(frozen=True, slots=True)
class TaskCall:
    """A task to queue: its Celery name, id and arguments (ids only); the store writes it in Celery's wire format."""

    task: str
    task_id: str
    args: tuple[Any, ...]
    origin: str = "cibroker"


def new_delivery_id(now: float | None = None) -> str:
    """Time-ordered, unique, URL- and label-safe: 12 hex of milliseconds + 14 random hex."""
    ms = int((time.time() if now is None else now) * 1000)
    return f"{ms:012x}{os.urandom(7).hex()}"


def kept_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """One pass over the request's headers (names compared lower-case)."""
    out = {}
    lower = type(headers) is not dict  # the edge passes a dict with lower-case names already
    for name, value in headers.items():
        lowered = name.lower() if lower else name
        if lowered in KEPT_HEADERS and value:
            out[lowered] = value[:200]
    return out


def iso(ts: float) -> str:
    """UTC time with milliseconds, e.g. 2026-11-22T04:41:01.924Z."""
    return f"{_second(int(ts))}.{int(ts * 1000) % 1000:03d}Z"


@lru_cache(maxsize=64)
def _second(second: int) -> str:  # many deliveries share a second: format it once
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def record(
    *,
    delivery_id: str,
    host_id: str,
    host_kind: str,
    event: PushEvent | None,
    event_name: str,
    decision: str,
    reason: str,
    code: str,
    received_at: float,
    headers: Mapping[str, str],
    authenticated_by: str,
    identity: Identity | None = None,
    routes: tuple[str, ...] = (),
    fingerprint: str | None = None,
    at: str | None = None,
) -> dict[str, Any]:
    out = {
        "delivery_id": delivery_id,
        "host": host_id,
        "host_kind": host_kind,
        "event": event_name,
        "received_at": at or iso(received_at),
        "decision": decision,
        "code": code,
        "reason": reason,
        "authenticated_by": authenticated_by,
        "identity": None if identity is None else {"source": identity.source, "value": identity.value},
        "routes": list(routes),
        "push": None if event is None else event.as_dict(),
        "headers": kept_headers(headers),
    }
    if fingerprint is not None:  # broker.core.sources.common.push_fingerprint: names the push across deliveries
        out["fingerprint"] = fingerprint
    return out


def log_entry(step: str, detail: str, *, at: float, **extra: Any) -> dict[str, Any]:
    """One line of a delivery's decision log: a snake_case step and a sentence for people."""
    return {"at": iso(at), "step": step, "detail": detail, **extra}


def ignored_record(
    *, delivery_id: str, host_id: str, host_kind: str, ignored: Ignored, received_at: float, headers: Mapping[str, str], authenticated_by: str
) -> dict[str, Any]:
    return record(
        delivery_id=delivery_id,
        host_id=host_id,
        host_kind=host_kind,
        event=ignored.push,
        event_name=ignored.event,
        decision="ignored",
        reason=ignored.reason,
        code=ignored.code,
        received_at=received_at,
        headers=headers,
        authenticated_by=authenticated_by,
    )
