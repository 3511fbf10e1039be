"""The webhook edge (Starlette): authenticate, normalise, decide, store durably, answer.

A delivery is answered 202 only after its record and Celery task message are in
Redis (one atomic call, see `broker.adapters.redis_store`). Ignored events answer 200 with a reason,
never 4xx/5xx, because GitLab disables hooks that keep failing. Bad credentials,
unreadable bodies and oversize requests get a precise 4xx; Redis trouble a 503, so
the host shows the failure and can resend.
"""

from __future__ import annotations

import asyncio
import os
import orjson
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AbstractContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import broker
from broker.core import records as delivery
from broker.edge.api import ApiAuth, api_routes, json_answer, openapi
from broker.edge.dashboard import dashboard_routes
from broker.core.metrics import SHARED
from broker.edge.metrics import EdgeMetrics
from broker.ports import IngestStore
from broker.services.oncall import Operations
from broker.core.errors import Rejected, StoreUnavailable
from broker.core.events import Ignored, PushEvent
from broker.logging import get_logger
from broker.core.routing import Accepted, decide
from broker.core.routing import glob_match
from broker.core.sources import AuthPolicy, Credential, Verified, WebhookSource, authenticate_scoped, require_headers_any, source_for
from broker.core.sources.common import (
    FINGERPRINT_SOURCE,
    PROJECT_URL_FIELD,
    WebBase,
    check_project_url,
    push_fingerprint,
    web_base,
)
from broker.adapters.celery_wire import MessageTemplate
from config.routing import Host
from config.routing import Route as RouteConfig
from config.settings import Settings

log = get_logger("cibroker.web")
BODY_TIMEOUT_SECONDS = 10.0
# An answer given before the body was read (413, 401, 503...) is read by clients that send the body
# without waiting for `Expect: 100-continue` (Ruby's Net::HTTP, urllib) only if the body is taken off
# the wire first: closing with unread bytes makes the kernel reset the connection, and the client sees
# ECONNRESET instead of the answer. So up to this much is read and dropped, then the connection closed.
DRAIN_BYTES = 8 * 1024 * 1024
DRAIN_SECONDS = 5.0
RETRY_AFTER_SECONDS = 1
# Event names that may become a metrics label (anything else is `other`): an unauthenticated header
# must not create label values (each is kept in memory for the life of the process).
KNOWN_EVENTS = frozenset((
    "Push Hook", "Tag Push Hook", "System Hook", "Service Hook", "Merge Request Hook", "Note Hook", "Issue Hook",
    "Pipeline Hook", "Job Hook", "Deployment Hook", "Release Hook", "Wiki Page Hook", "Member Hook",
    "push", "ping", "create", "delete", "pull_request", "release", "workflow_run", "check_run", "check_suite",
    "issues", "issue_comment", "status",
))


@dataclass(frozen=True, slots=True)
class HostEdge:
    host_id: str
    host: Host
    source: WebhookSource
    policy: AuthPolicy
    credentials: tuple[Credential, ...] = ()
    routes: tuple[RouteConfig, ...] = ()
    base: WebBase | None = None
    header_only: bool = False  # every credential set is a header (GitLab token): checked before the body is read


class Refusal(Exception):
    """An answer decided before the request was fully read: the body is drained (bounded), then the connection closed."""

    def __init__(self, status: int, reason: str, *, retry_after: int | None = None) -> None:
        super().__init__(reason)
        self.status, self.reason, self.retry_after = status, reason, retry_after


def _json(status: int, payload: dict[str, Any]) -> JSONResponse:
    return JSONResponse(payload, status_code=status)


async def read_body(receive: Any, limit: int, *, seconds: float = BODY_TIMEOUT_SECONDS) -> bytes:
    """The whole body, at most `limit` bytes and within `seconds`; Refusal(413/408) otherwise.

    The deadline is one timer that cancels this task (asyncio.timeout's work, at a third of its
    cost on the hot path); a cancel that is not ours propagates untouched.
    """
    task = asyncio.current_task()
    assert task is not None
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    timer = asyncio.get_running_loop().call_later(seconds, expire)
    chunks: list[bytes] = []
    size = 0
    try:
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise Rejected(400, "the client went away before sending the whole body")
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise Refusal(413, f"body is larger than the {limit}-byte limit")
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
    except asyncio.CancelledError:
        if not expired:
            raise
        task.uncancel()
        raise Refusal(408, f"body not received within {seconds:g} s") from None
    finally:
        timer.cancel()
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def drain(receive: Any, *, limit: int = DRAIN_BYTES, seconds: float = DRAIN_SECONDS) -> None:
    """Read and drop what is left of a request body, up to `limit` bytes or `seconds`."""
    try:
        async with asyncio.timeout(seconds):
            while limit > 0:
                message = await receive()
                if message["type"] != "http.request":
                    return
                limit -= len(message.get("body", b""))
                if not message.get("more_body", False):
                    return
    except TimeoutError:
        return


def entry_bytes(step: str, detail: str, at: str, **extra: Any) -> bytes:
    """A log entry as stored (JSON bytes), with its time already formatted (the edge formats it once per request)."""
    return orjson.dumps({"at": at, "step": step, "detail": detail, **extra})


OpenStore = Callable[[], AbstractAsyncContextManager[IngestStore]]
OpenOperations = Callable[[], AbstractContextManager[Operations]]


def create_app(settings: Settings, *, store: OpenStore, operations: OpenOperations, dry_run: bool = False) -> Starlette:
    """The web app: webhook edge, on-call API, dashboard, metrics.

    What it runs on is handed in by the composition root (broker.bootstrap, through the CLI):
    `store` opens the webhook store on the app's own event loop at start-up; `operations`
    opens the on-call service (in a thread: it may look for a cluster). `dry_run` (from
    `cibroker dev` without a cluster) is said on every answer of the app (header
    X-Cibroker-Mode) and on every page.
    """
    env = settings.env
    edges = {host_id: _host_edge(settings, host_id, host) for host_id, host in settings.routing.hosts.items()}
    auth = ApiAuth(env.api_token_names(), open_without_tokens=settings.embedded_defaults,
                   failures_per_minute=env.api_failures_per_minute)
    origin = f"cibroker-web@{socket.gethostname()}:{os.getpid()}"
    messages = MessageTemplate(task=delivery.PROCESS_TASK, queue=env.queue, origin=origin)
    state: dict[str, Any] = {}
    edge_metrics = EdgeMetrics()
    inflight = [0, 0]  # webhook bodies being read by this process right now, and the bytes they reserve
    body_budget = env.max_inflight_webhooks * env.max_body_bytes
    edge_metrics.track_in_flight(lambda: inflight[0], lambda: inflight[1])

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with store() as opened:
            state["store"] = opened
            services = operations()
            state["ops"] = await run_in_threadpool(services.__enter__)
            try:
                yield
            finally:
                await run_in_threadpool(services.__exit__, None, None, None)

    mode_header = [(b"x-cibroker-mode", b"dry-run")] if dry_run else []

    async def hook(scope: Any, receive: Any, send: Any) -> None:
        """POST /hooks/<host id>, as a bare ASGI app (no Starlette request, routing or middleware on the hot path).

        `_hook` decides; this counts the answer once, drains what is left of a refused body, and sends it.
        """
        started = time.perf_counter()
        raw = scope["headers"]
        headers: dict[str, str] = {}
        for name, value in reversed(raw):  # first occurrence wins, as Starlette's Headers.get
            headers[name.decode("latin-1")] = value.decode("latin-1")
        host_id = scope["path"][7:]
        extra: list[tuple[bytes, bytes]] = []
        status, payload, unread = await _hook(scope, receive, headers, host_id, started)
        if status == 503:
            extra.append((b"retry-after", str(RETRY_AFTER_SECONDS).encode()))
        if unread:
            # The body was not (wholly) read. With `Expect: 100-continue` the client waits for our word and
            # sends nothing; otherwise it is sending: take it off the wire (bounded) so it can read this answer.
            # (Not after a 408: that client is not sending.)
            if status != 408 and headers.get("expect", "").lower() != "100-continue":
                await drain(receive)
            extra.append((b"connection", b"close"))
        event = headers.get("x-gitlab-event") or headers.get("x-github-event") or headers.get("x-gitea-event") or ""
        edge_metrics.observe(host=host_id if host_id in edges else "other",
                             event=event if event in KNOWN_EVENTS else ("other" if event else ""),
                             decision="rejected" if status >= 400 else payload["decision"],
                             seconds=time.perf_counter() - started)
        body = orjson.dumps(payload)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                *extra, *mode_header]})
        await send({"type": "http.response.body", "body": body})

    async def _hook(scope: Any, receive: Any, headers: dict[str, str], host_id: str,
                    started: float) -> tuple[int, dict[str, Any], bool]:
        """(status, answer, whether the body is left unread)."""
        received = time.time()
        if scope["method"] != "POST":
            return (405, {"error": "method not allowed; POST a webhook"}, True)
        edge = edges.get(host_id)
        if edge is None:
            return (404, {"error": f"no host {host_id[:60]!r} in the routing file; POST to /hooks/<host id>"}, True)
        verified: Verified | None = None
        body_read = False
        try:
            # Before a byte of the body is read: credentials in headers, and the declared size.
            if edge.header_only:
                verified = authenticate_scoped(edge.source, headers, b"", credentials=edge.credentials, now=received)
            else:
                require_headers_any(edge.source, headers, credentials=edge.credentials)
            length = headers.get("content-length")
            if length is not None:
                if not (length.isascii() and length.isdigit()):
                    raise Refusal(400, "Content-Length is not a number")
                if int(length) > env.max_body_bytes:
                    raise Refusal(413, f"body is larger than the {env.max_body_bytes}-byte limit")
            # Bodies being read are what an unauthenticated client can make this process hold, so their
            # bytes are capped: each reserves its Content-Length (chunked: the whole limit) until read,
            # within max_inflight_webhooks full-size bodies. A burst of small pushes never meets it.
            reserve = int(length) if length is not None else env.max_body_bytes
            if inflight[1] + reserve > body_budget:
                raise Refusal(503, f"too many webhook bodies being read here (room for {env.max_inflight_webhooks} "
                                   f"of {env.max_body_bytes} bytes); resend shortly")
            inflight[0] += 1
            inflight[1] += reserve
            try:
                body = await read_body(receive, env.max_body_bytes, seconds=env.body_timeout_seconds)
            finally:
                inflight[0] -= 1
                inflight[1] -= reserve
            body_read = True
            if verified is None:
                verified = authenticate_scoped(edge.source, headers, body, credentials=edge.credentials, now=received)
            parsed = edge.source.parse(headers, body, host_id=host_id, loads=orjson.loads)
            if isinstance(parsed, Ignored):
                outcome: Any = parsed
            else:
                routes = _routes_for(edge, parsed, verified)
                outcome = decide(parsed, routes)
        except Refusal as exc:
            log.info("webhook_rejected", host=host_id, status=exc.status, reason=exc.reason)
            return (exc.status, {"error": exc.reason}, True)
        except Rejected as exc:
            log.info("webhook_rejected", host=host_id, status=exc.status, reason=exc.reason)
            return (exc.status, {"error": exc.reason}, not body_read)
        delivery_id = delivery.new_delivery_id(received)
        if isinstance(outcome, Ignored):
            status, answer = await _ignored(edge, outcome, delivery_id=delivery_id, received=received, headers=headers,
                                            authenticated_by=verified.by, started=started)
            return (status, answer, False)
        status, answer = await _accept(edge, outcome, delivery_id=delivery_id, received=received, headers=headers,
                                       verified=verified, started=started)
        return (status, answer, False)

    def _routes_for(edge: HostEdge, event: PushEvent, verified: Verified) -> tuple[RouteConfig, ...]:
        """The routes this push may match: the project URL is the host's and names the repo; the secret speaks for them."""
        assert edge.base is not None
        check_project_url(event, edge.base, field_name=PROJECT_URL_FIELD[edge.host.kind])
        if verified.routes is None:
            return edge.routes
        scoped = tuple(r for r in edge.routes if r.name in verified.routes)
        if not any(glob_match(r.repo, event.repo, ignore_case=True) for r in scoped):
            raise Rejected(403, f"the secret that verified this delivery is route {', '.join(sorted(verified.routes))}'s, "
                                f"which does not take repo {event.repo!r}; refused")
        return scoped

    async def _accept(edge: HostEdge, outcome: Accepted, *, delivery_id: str, received: float, headers: dict[str, str],
                      verified: Verified, started: float) -> tuple[int, dict[str, Any]]:
        event = outcome.event
        host_id = edge.host_id
        fingerprint = push_fingerprint(host=host_id, repo=event.repo, ref=event.ref, before=event.before, after=event.pushed)
        identity = edge.source.identity(headers, event, authenticated_by=verified.by)
        signed = None if identity.source == FINGERPRINT_SOURCE else identity
        matched = ", ".join(outcome.routes)
        at = delivery.iso(received)
        record = delivery.record(
            delivery_id=delivery_id, host_id=host_id, host_kind=edge.host.kind, event=event, event_name=event.event,
            decision="accepted", reason=f"matched route(s) {matched}", code="accepted",
            received_at=received, headers=headers, authenticated_by=verified.by, identity=identity,
            routes=outcome.routes, fingerprint=fingerprint, at=at,
        )
        dedup = f"new delivery by push fingerprint {fingerprint}"
        if signed is not None:
            dedup += f" and signed {signed.source} {signed.value}"
        entries = [
            entry_bytes("received", f"{event.event} for {event.repo} {event.kind} {event.name!r} at {event.short_sha}", at),
            entry_bytes("authenticated", f"verified by {verified.by}", at),
            entry_bytes("deduplicated", dedup, at),
            entry_bytes("matched", f"route(s) {matched}", at, routes=list(outcome.routes)),
            entry_bytes("queued", "queued for a worker", at),
        ]
        message = messages.render(delivery_id)
        try:
            prior = await state["store"].accept(host_id=host_id, signed=signed, fingerprint=fingerprint, routes=outcome.routes,
                                                delivery_id=delivery_id, record=record, message=message, log=entries)
        except StoreUnavailable as exc:
            log.warning("webhook_not_stored", host=host_id, repo=event.repo, sha=event.sha, error=str(exc))
            return (503, {"error": "cannot store the delivery right now (redis unavailable); resend it later"})
        took_ms = round((time.perf_counter() - started) * 1000, 2)
        if prior is not None:
            first, why = prior
            log.info("webhook_duplicate", host=host_id, delivery_id=first, detail=f"duplicate of {first} by {why}", took_ms=took_ms)
            return (200, {"decision": "duplicate", "delivery_id": first,
                          "reason": f"already received as delivery {first} (same {why})"})
        log.info("webhook_accepted", host=host_id, delivery_id=delivery_id, repo=event.repo, ref=event.ref,
                 sha=event.sha, routes=list(outcome.routes), took_ms=took_ms)
        answer = {"decision": "accepted", "delivery_id": delivery_id, "routes": list(outcome.routes), "repo": event.repo,
                  "ref": event.ref, "sha": event.sha}
        if dry_run:
            answer["mode"] = "dry-run: the PipelineRun is rendered and recorded, not created (no cluster)"
        return (202, answer)

    async def _ignored(edge: HostEdge, ignored: Ignored, *, delivery_id: str, received: float, headers: Any,
                       authenticated_by: str, started: float) -> tuple[int, dict[str, Any]]:
        record = delivery.ignored_record(delivery_id=delivery_id, host_id=edge.host_id, host_kind=edge.host.kind,
                                         ignored=ignored, received_at=received, headers=headers,
                                         authenticated_by=authenticated_by)
        entries = [
            delivery.log_entry("received", f"{ignored.event or 'event'} on host {edge.host_id}", at=received),
            delivery.log_entry("authenticated", f"verified by {authenticated_by}", at=received),
            delivery.log_entry("ignored", ignored.reason, at=received, code=ignored.code),
        ]
        answer: dict[str, Any] = {"decision": "ignored", "code": ignored.code, "reason": ignored.reason}
        try:
            await state["store"].record_ignored(delivery_id=delivery_id, record=record, log=entries)
            answer["delivery_id"] = delivery_id
        except StoreUnavailable as exc:  # an ignored event needs nothing stored to be answered truthfully
            log.warning("ignored_not_recorded", host=edge.host_id, error=str(exc))
        log.info("webhook_ignored", host=edge.host_id, code=ignored.code, reason=ignored.reason,
                 delivery_id=answer.get("delivery_id"), took_ms=round((time.perf_counter() - started) * 1000, 2))
        return (200, answer)

    def ops() -> Operations:
        return state["ops"]

    async def metrics_endpoint(request: Request) -> Response:
        try:
            counters, depth = await state["store"].counters([f.name for f in SHARED], queue=env.queue)
        except StoreUnavailable as exc:  # this process's own figures still help; say the rest is missing
            log.warning("metrics_without_store", error=str(exc))
            counters, depth = None, None
        return Response(edge_metrics.render(counters, queue_depth=depth), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def openapi_endpoint(request: Request) -> Response:
        return json_answer(200, openapi(broker.__version__))

    async def healthz(request: Request) -> Response:
        return _json(200, {"status": "ok"})

    async def readyz(request: Request) -> Response:
        try:
            await state["store"].ping()
        except StoreUnavailable as exc:
            return _json(503, {"status": "unavailable", "error": str(exc)})
        return _json(200, {"status": "ready", "config": settings.source, "hosts": sorted(edges),
                           "mode": "dry-run" if dry_run else "live"})

    middleware = [Middleware(ModeHeader)] if dry_run else []
    app = EdgeApp(
        hook,
        middleware=middleware,
        routes=[
            Route("/hooks/{host_id}", hook, methods=["POST"]),  # listed for the API description; EdgeApp serves it first
            *api_routes(auth, ops),
            *dashboard_routes(auth, ops),
            Route("/openapi.json", openapi_endpoint, methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.dry_run = dry_run  # pages say so (broker.edge.dashboard reads it)
    return app


def _host_edge(settings: Settings, host_id: str, host: Host) -> HostEdge:
    """A host's webhook source, its credential sets (its own, then each route's) and its routes."""
    source = source_for(host.kind)
    creds = settings.credentials[host_id]

    def policy(webhook: tuple[str, ...], signing: tuple[str, ...]) -> AuthPolicy:
        return AuthPolicy(webhook_secrets=webhook, signing_secrets=signing, tolerance_seconds=host.signature_tolerance_seconds,
                          allow_sha1=host.allow_sha1_signatures)

    own = policy(creds.webhook_values(), creds.signing_values())
    credentials = [Credential(own)] if (own.webhook_secrets or own.signing_secrets) else []
    routes = tuple(r for r in settings.routing.routes if r.host == host_id)
    for route in routes:
        scoped = settings.route_credentials.get(route.name)
        if scoped is not None and (scoped.webhook_secrets or scoped.signing_secrets):
            credentials.append(Credential(policy(scoped.webhook_values(), scoped.signing_values()), frozenset((route.name,))))
    if not credentials:  # settings refuse this; refuse every request rather than accept anyone
        credentials = [Credential(own)]
    return HostEdge(host_id=host_id, host=host, source=source, policy=own, credentials=tuple(credentials), routes=routes,
                    base=web_base(host.kind, host.web_url or host.api_url),
                    header_only=not any(source.needs_body(c.policy) for c in credentials))


class EdgeApp(Starlette):
    """The Starlette app, except that POST /hooks/<host id> goes straight to the webhook handler.

    The webhook path is the hot one: it skips Starlette's middleware stack, router and Request
    objects (measured: about a third of the edge's CPU per request; bench/README.md).
    """

    def __init__(self, hook: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._hook = hook

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if path.startswith("/hooks/") and "/" not in path[7:] and len(path) > 7:
                await self._hook(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


class ModeHeader:
    """Dry-run mode (`cibroker dev` without a cluster): every answer carries X-Cibroker-Mode: dry-run."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def sending(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-cibroker-mode", b"dry-run")]
            await send(message)

        await self.app(scope, receive, sending if scope["type"] == "http" else send)
