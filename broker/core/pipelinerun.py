"""PipelineRun rendering: from an accepted push and a route to the object we create.

Pure. The name is deterministic per (route, ref, sha, attempt), so creating it twice
hits AlreadyExists: a second delivery of the same push never starts a second run.
Labels and annotations carry everything a worker needs to resume the run after a
crash (host, repo, ref, sha, route, delivery, attempt, what was last reported).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from broker.core.errors import Permanent
from broker.core.events import RefKind
from broker.core.runlabels import (
    A_ATTEMPT, A_CANCEL_REASON, A_CANCELLED_BY, A_CLONE_URL, A_DEPLOY, A_HOST_KIND, A_IMAGE, A_RECEIVED, A_REF, A_REPO,
    A_REPO_ID, A_REPORTED, A_SIGNATURE, A_STATUS_NAME, A_SUPERSEDED_BY, GROUP, L_DELIVERY, L_HOST, L_REF_HASH, L_REF_KIND,
    L_ROUTE, L_SHA, MANAGED_BY, SELECTOR, RunLabels,
)
from config.routing import DeployTarget, Host, Route, RoutingFile

# The names on a run's labels and annotations, and their codec, live in broker.core.runlabels
# (re-exported here: callers say pr.L_ROUTE, pr.A_IMAGE, ...).

__all__ = ["A_ATTEMPT", "A_CANCEL_REASON", "A_CANCELLED_BY", "A_CLONE_URL", "A_DEPLOY", "A_HOST_KIND", "A_IMAGE", "A_RECEIVED",
           "A_REF", "A_REPO", "A_REPO_ID", "A_REPORTED", "A_SIGNATURE", "A_STATUS_NAME", "A_SUPERSEDED_BY", "GROUP", "L_DELIVERY",
           "L_HOST", "L_REF_HASH", "L_REF_KIND", "L_ROUTE", "L_SHA", "MANAGED_BY", "SELECTOR", "RunLabels", "RunRequest", "render"]

TAG_OK = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")


@dataclass(frozen=True, slots=True)
class RunRequest:
    """What to run: one route for one resolved commit of one delivery."""

    delivery_id: str
    host: str
    host_kind: str
    repo: str
    repo_id: str
    ref: str
    kind: RefKind
    name: str
    sha: str
    attempt: int
    received_at: str


def ref_hash(route: str, ref: str) -> str:
    return hashlib.sha256(f"{route}\x00{ref}".encode()).hexdigest()[:16]


def slug(text: str, limit: int) -> str:
    out = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return out[:limit].strip("-") or "x"


def run_name(*, route: str, ref: str, sha: str, attempt: int) -> str:
    """DNS-1123 label (<= 63): readable route and ref, short sha, and a digest of all four."""
    digest = hashlib.sha256(f"{route}\x00{ref}\x00{sha}\x00{attempt}".encode()).hexdigest()[:6]
    short_ref = ref.removeprefix("refs/heads/").removeprefix("refs/tags/")
    name = f"{slug(route, 20)}-{slug(short_ref, 20)}-{sha[:8]}-{digest}"
    return name[:63].strip("-")


def template_values(req: RunRequest) -> dict[str, str]:
    return {
        "sha": req.sha,
        "short_sha": req.sha[:8],
        "tag": req.name if req.kind is RefKind.TAG else "",
        "branch": req.name if req.kind is RefKind.BRANCH else "",
        "ref": req.ref,
        "repo": req.repo,
    }


def sanitize_tag(tag: str) -> str:
    """Fit a rendered tag to the registry grammar [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", tag)
    cleaned = re.sub(r"^[.-]+", "", cleaned)[:128]
    if not TAG_OK.match(cleaned):
        raise Permanent(f"image tag {tag!r} cannot be made a valid registry tag")
    return cleaned


def image_ref(route: Route, req: RunRequest) -> str:
    values = template_values(req)
    repo = route.image.format(repo=req.repo.lower())
    return f"{repo}:{sanitize_tag(route.image_tag.format(**values))}"


REPO_OK = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*\Z")


def clone_url(route: Route, *, repo: str, host: Host) -> str:
    """Where to read the route's repository from: the routing file only, never a payload or an annotation.

    The route's `clone_url` (its `{repo}` filled in), else `https://<host of the host's api_url>/<repo>.git`
    on the default port (github.com's API is api.github.com: the `api.` goes). A Git host token is
    sent only to an https clone URL (see `token_allowed`).
    """
    if not REPO_OK.match(repo) or ".." in repo:
        raise Permanent(f"repository name {repo[:80]!r} cannot be put in a clone URL")
    if route.clone_url:
        return route.clone_url.format(repo=repo)
    hostname = urlsplit(host.api_url).hostname or ""
    if host.kind == "github":
        hostname = hostname.removeprefix("api.")
    if not hostname:
        raise Permanent(f"route {route.name!r}: cannot derive a clone URL from api_url {host.api_url!r}; set routes[].clone_url")
    return f"https://{hostname}/{repo}.git"


def token_allowed(clone_url: str) -> bool:
    """A Git host token goes only over https (a file://, http:// or ssh:// clone URL never gets one)."""
    parts = urlsplit(clone_url)
    return parts.scheme == "https" and bool(parts.hostname) and parts.username is None


def deploys_for(route: Route, req: RunRequest) -> list[DeployTarget]:
    from broker.core.routing import ref_selected

    return [d for d in route.deploy if d.when is None or ref_selected(d.when, req.kind, req.name)]


def status_name(routing: RoutingFile, route: Route, *, environment: str = "") -> str:
    template = route.status_name or routing.defaults.status_name
    return template.format(pipeline=route.pipeline, route=route.name, environment=environment)


def render(
    routing: RoutingFile, route: Route, req: RunRequest, *, git_url: str, api_version: str = "v1"
) -> dict[str, Any]:
    """The PipelineRun body (a plain dict, as the API takes it)."""
    namespace = route.namespace or routing.defaults.namespace
    service_account = route.service_account or routing.defaults.service_account
    image = image_ref(route, req)
    values = {**template_values(req), "image": image}
    params = [
        {"name": "git-url", "value": git_url},
        {"name": "git-revision", "value": req.sha},
        {"name": "image", "value": image},
    ]
    fixed = {p["name"] for p in params}
    params += [{"name": k, "value": v.format(**values)} for k, v in route.params.items() if k not in fixed]
    name = run_name(route=route.name, ref=req.ref, sha=req.sha, attempt=req.attempt)
    spec: dict[str, Any] = {
        "pipelineRef": {"name": route.pipeline},
        "params": params,
        "timeouts": {"pipeline": route.timeout or routing.defaults.timeout},
    }
    if route.workspaces:
        spec["workspaces"] = [dict(w) for w in route.workspaces]
    if api_version == "v1":
        spec["taskRunTemplate"] = {"serviceAccountName": service_account}
    else:
        spec["serviceAccountName"] = service_account
    labels = RunLabels(route=route.name, host=slug(req.host, 63), sha=req.sha, ref_kind=str(req.kind),
                       ref_hash=ref_hash(route.name, req.ref), delivery_id=req.delivery_id, repo=req.repo, repo_id=req.repo_id,
                       ref=req.ref, host_kind=req.host_kind, attempt=req.attempt, status_name=status_name(routing, route),
                       image=image, received_at=req.received_at, clone_url=git_url,
                       deploy=tuple(d.environment for d in deploys_for(route, req)))
    return {
        "apiVersion": f"tekton.dev/{api_version}",
        "kind": "PipelineRun",
        "metadata": {"name": name, "namespace": namespace, **labels.metadata()},
        "spec": spec,
    }
