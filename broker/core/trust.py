"""What only cibroker can vouch for: HMACs with the broker's own signing key.

Two things in the cluster and in Redis must be provably cibroker's before a worker acts
on them, because other hands can write where they live:

- A PipelineRun. Any pipeline step with a token, and any tool with `patch`, can create or
  relabel one. cibroker signs the fields that decide what a run does (name, namespace,
  route, repo, ref, sha, delivery id) into the `cibroker.dev/signature` annotation when it
  creates the run; a run without a valid signature is not cibroker's, whatever its labels say.
- A person's request (a deploy-only re-run, possibly forced past the ancestry guard; a
  cancel). The on-call surface writes it to Redis, signed, and queues a task that names only
  its id. Whoever can push a task message onto the queue cannot forge the signature, so a
  queued message alone can never ask for a forced deploy.

The key (CIBROKER_SIGNING_KEY, or a file) is readable only by cibroker's own service
accounts. Pure: standard library only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from broker.core.errors import Untrusted

_VERSION = "v1"
ACTIONS = ("deploy", "cancel")


def _mac(key: bytes, purpose: str, fields: Mapping[str, Any]) -> str:
    # Canonical JSON (sorted keys, no spaces) with a purpose prefix: a run signature can never
    # be replayed as a request signature or the other way round.
    text = purpose + "\x00" + json.dumps(dict(fields), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return f"{_VERSION}:" + hmac.new(key, text.encode("ascii"), hashlib.sha256).hexdigest()


def run_signature(key: bytes, *, name: str, namespace: str, route: str, repo: str, ref: str, sha: str,
                  delivery_id: str) -> str:
    """The signature annotation of a PipelineRun cibroker creates."""
    return _mac(key, "pipelinerun", {"name": name, "namespace": namespace, "route": route, "repo": repo, "ref": ref,
                                     "sha": sha, "delivery_id": delivery_id})


def run_signature_ok(key: bytes, signature: object, *, name: str, namespace: str, route: str, repo: str, ref: str,
                     sha: str, delivery_id: str) -> bool:
    """Whether `signature` (as read off a run: any type, any length) vouches for these fields."""
    if not isinstance(signature, str) or len(signature) > 200:
        return False
    expected = run_signature(key, name=name, namespace=namespace, route=route, repo=repo, ref=ref, sha=sha,
                             delivery_id=delivery_id)
    return hmac.compare_digest(signature.encode("utf-8", "replace"), expected.encode("ascii"))


@dataclass(frozen=True, slots=True)
class PersonRequest:
    """A person's action on one run, as the on-call surface stored it (who, what, why, when)."""

    request_id: str
    action: Literal["deploy", "cancel"]
    namespace: str
    name: str
    actor: str
    channel: str
    reason: str
    at: str
    environment: str = ""
    attempt: int = 1
    force: bool = False

    @property
    def run(self) -> str:
        return f"{self.namespace}/{self.name}"


def sign_request(key: bytes, request: PersonRequest) -> dict[str, Any]:
    """The record to store: the request's fields plus their signature."""
    fields = asdict(request)
    return {**fields, "signature": _mac(key, "request", fields)}


def verify_request(key: bytes, stored: Mapping[str, Any] | None, *, request_id: str) -> PersonRequest:
    """The request behind a task's `request_id`; Untrusted when missing, altered or not signed by us."""
    if stored is None:
        raise Untrusted(f"request {request_id[:40]!r} is not in the store (forged task, or expired)")
    fields = {k: v for k, v in stored.items() if k != "signature"}
    try:
        request = PersonRequest(**fields)
    except TypeError as exc:
        raise Untrusted(f"request {request_id[:40]!r} has unexpected fields ({exc})") from None
    signature = stored.get("signature")
    if not isinstance(signature, str) or not hmac.compare_digest(
            signature.encode("utf-8", "replace"), _mac(key, "request", asdict(request)).encode("ascii")):
        raise Untrusted(f"request {request_id[:40]!r} is not signed with the broker's key")
    if request.request_id != request_id:
        raise Untrusted(f"request {request_id[:40]!r} holds the signed request {request.request_id[:40]!r}")
    if request.action not in ACTIONS or not isinstance(request.attempt, int) or not isinstance(request.force, bool):
        raise Untrusted(f"request {request_id[:40]!r} has an unknown action or malformed fields")
    return request
