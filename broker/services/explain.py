"""`cibroker explain`: the whole decision path for one captured payload, with no side effects.

Authentication, normalisation, routing, commit and image tag, and the PipelineRun(s)
the worker would create, exactly as the edge and the worker compute them, but
nothing stored, queued, posted or created. Usable in CI to lint a routing file
against captured payloads (`--check` fails when a payload would be rejected).

Pure: headers and body in, a report out. Tags are not peeled here (that needs `git
ls-remote`); the report says so.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import orjson

from broker.core import pipelinerun as pr
from broker.core.errors import Permanent, Rejected
from broker.core.events import Ignored, RefKind
from broker.core.routing import decide
from broker.core.sources import AuthPolicy, source_for
from broker.core.sources.common import PROJECT_URL_FIELD, check_project_url, web_base
from config.settings import Settings

EXPLAIN_DELIVERY_ID = "0" * 26


class _Headers(dict):  # lower-case keys; sources look headers up case-insensitively through .get
    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(key.lower(), default)


def guess_headers(body: bytes) -> tuple[str, dict[str, str]]:
    """(host kind, event headers) for a payload captured without its headers."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "", {}
    if not isinstance(payload, dict):
        return "", {}
    kind = payload.get("object_kind")
    if isinstance(kind, str):
        event = {"push": "Push Hook", "tag_push": "Tag Push Hook", "merge_request": "Merge Request Hook",
                 "note": "Note Hook", "pipeline": "Pipeline Hook"}.get(kind, f"{kind.title()} Hook")
        return "gitlab", {"x-gitlab-event": event, "content-type": "application/json"}
    if "ref" in payload and "repository" in payload:
        return "github", {"x-github-event": "push", "content-type": "application/json"}
    return "", {}


def explain(settings: Settings, *, body: bytes, headers: Mapping[str, str] | None = None, host_id: str | None = None,
            now: float | None = None) -> dict[str, Any]:
    """The decision report for one payload (a plain dict, printed as text or JSON by the CLI)."""
    now = time.time() if now is None else now
    guessed_kind, guessed = guess_headers(body)
    given = _Headers({k.lower(): str(v) for k, v in (headers or {}).items()})
    hdrs = _Headers({**guessed, **given})
    host_id = _host_of(settings, hdrs, guessed_kind=guessed_kind, host_id=host_id)
    host = settings.routing.hosts[host_id]
    source = source_for(host.kind)
    steps: list[dict[str, Any]] = [_authenticate(settings, host_id, source, hdrs, body, now=now)]
    report: dict[str, Any] = {"headers_guessed": sorted(set(guessed) - set(given)), "steps": steps, "host": host_id}
    try:
        parsed = source.parse(hdrs, body, host_id=host_id, loads=orjson.loads)
        if not isinstance(parsed, Ignored):  # the edge's rule (issue 11): the project URL is the host's and names the repo
            check_project_url(parsed, web_base(host.kind, host.web_url or host.api_url), field_name=PROJECT_URL_FIELD[host.kind])
    except Rejected as exc:
        steps.append({"step": "parse", "result": "rejected", "status": exc.status, "detail": f"the edge would answer {exc.status}: {exc.reason}"})
        report["decision"] = "rejected"
        return report
    outcome = parsed if isinstance(parsed, Ignored) else decide(parsed, settings.routing.routes)
    if isinstance(outcome, Ignored):
        if outcome.push is not None:
            steps.append({"step": "parse", "result": "ok", "detail": _event_line(outcome.push)})
        steps.append({"step": "route", "result": "ignored", "code": outcome.code, "detail": outcome.reason})
        report["decision"] = "ignored"
        return report
    event = outcome.event
    steps.append({"step": "parse", "result": "ok", "detail": _event_line(event), "event": event.as_dict()})
    steps.append({"step": "route", "result": "matched", "detail": f"route(s) {', '.join(outcome.routes)}"})
    identity = source.identity(hdrs, event)
    steps.append({"step": "deduplicate", "result": "key", "detail": f"{identity.source} {identity.value}"})
    report["decision"] = "accepted"
    report["runs"] = [_run_entry(settings, settings.routing.route(name), event, host_id=host_id) for name in outcome.routes]
    return report


def _host_of(settings: Settings, hdrs: Mapping[str, str], *, guessed_kind: str, host_id: str | None) -> str:
    """The host the payload is for: the one given, else the only host of the kind its headers name."""
    hosts = settings.routing.hosts
    if host_id is None:
        kind = guessed_kind or ("gitlab" if "x-gitlab-event" in hdrs else "github" if "x-github-event" in hdrs else
                                "gitea" if "x-gitea-event" in hdrs else "")
        candidates = [h for h, cfg in hosts.items() if cfg.kind == kind]
        if len(candidates) != 1:
            raise Permanent(f"cannot tell which host this payload is for (candidates: {candidates or sorted(hosts)}); "
                            "pass --host")
        host_id = candidates[0]
    if host_id not in hosts:
        raise Permanent(f"no host {host_id!r} in the routing file (hosts: {', '.join(sorted(hosts))})")
    return host_id


def _authenticate(settings: Settings, host_id: str, source: Any, hdrs: Mapping[str, str], body: bytes, *,
                  now: float) -> dict[str, Any]:
    """The authenticate step with the host's own secrets, when this environment has them."""
    host = settings.routing.hosts[host_id]
    creds = settings.credentials[host_id]
    policy = AuthPolicy(webhook_secrets=creds.webhook_values(), signing_secrets=creds.signing_values(),
                        tolerance_seconds=host.signature_tolerance_seconds, allow_sha1=host.allow_sha1_signatures)
    if not policy.webhook_secrets and not policy.signing_secrets:
        return {"step": "authenticate", "result": "not checked",
                "detail": f"no webhook secret for host {host_id} is set in this environment"}
    try:
        return {"step": "authenticate", "result": "ok", "detail": f"verified by {source.authenticate(hdrs, body, policy=policy, now=now)}"}
    except Rejected as exc:
        return {"step": "authenticate", "result": "rejected", "status": exc.status,
                "detail": f"the edge would answer {exc.status}: {exc.reason} (the decision below assumes it passed)"}


def _run_entry(settings: Settings, route: Any, event: Any, *, host_id: str) -> dict[str, Any]:
    """What a worker would make of the event on one route: commit, image, deploys and the rendered PipelineRun."""
    host = settings.routing.hosts[host_id]
    req = pr.RunRequest(delivery_id=EXPLAIN_DELIVERY_ID, host=host_id, host_kind=host.kind, repo=event.repo,
                        repo_id=event.repo_id, ref=event.ref, kind=event.kind, name=event.name, sha=event.sha, attempt=1,
                        received_at="1970-01-01T00:00:00.000Z")
    entry: dict[str, Any] = {"route": route.name, "commit": event.sha}
    if event.kind is RefKind.TAG:
        entry["commit_note"] = (f"tag {event.name}: {event.sha_source}; a worker confirms with git ls-remote that the "
                                "tag peels to it (not done by explain)")
    try:
        git_url = pr.clone_url(route, repo=event.repo, host=host)
        body_out = pr.render(settings.routing, route, req, git_url=git_url, api_version=settings.env.tekton_api_version)
    except Permanent as exc:
        entry["error"] = f"the worker would fail this route: {exc}"
    else:
        entry["image"] = body_out["metadata"]["annotations"][pr.A_IMAGE]
        entry["deploy"] = [d.environment for d in pr.deploys_for(route, req)]
        entry["pipelinerun"] = body_out
    return entry


def _event_line(event: Any) -> str:
    return f"{event.event}: {event.repo} {event.kind} {event.name!r} at {event.sha[:12]} ({event.sha_source})"
