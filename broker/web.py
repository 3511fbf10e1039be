"""The webhook edge (Starlette): authenticate, normalise, decide, store durably, answer.

A delivery is answered 202 only after its record and Celery task message are in
Redis (one atomic call, see `broker.store`). Ignored events answer 200 with a reason,
never 4xx/5xx, because GitLab disables hooks that keep failing. Bad credentials,
unreadable bodies and oversize requests get a precise 4xx; Redis trouble a 503, so
the host shows the failure and can resend.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import broker
from broker import delivery
from broker.api import ApiAuth, api_routes, json_answer, openapi
from broker.dashboard import dashboard_routes
from broker.metrics import SHARED, EdgeMetrics
from broker.operations import Operations
from broker.errors import Rejected, StoreUnavailable
from broker.events import Ignored
from broker.logging import get_logger
from broker.routing import decide
from broker.sources import AuthPolicy, WebhookSource, source_for
from broker.store import AsyncStore
from broker.taskmessage import task_message
from config.routing import Host
from config.settings import Settings

log = get_logger("cibroker.web")
BODY_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class HostEdge:
    host_id: str
    host: Host
    source: WebhookSource
    policy: AuthPolicy


def _json(status: int, payload: dict[str, Any]) -> JSONResponse:
    return JSONResponse(payload, status_code=status)


async def read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise Rejected(400, "Content-Length is not a number")
        if int(length) > limit:
            raise Rejected(413, f"body is larger than the {limit}-byte limit")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(BODY_TIMEOUT_SECONDS):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise Rejected(413, f"body is larger than the {limit}-byte limit")
                chunks.append(chunk)
    except TimeoutError:
        raise Rejected(408, f"body not received within {BODY_TIMEOUT_SECONDS:.0f} s") from None
    return b"".join(chunks)


def create_app(settings: Settings, *, store: AsyncStore | None = None, operations: Operations | None = None,
               dry_run: bool = False) -> Starlette:
    """The web app: webhook edge, on-call API, dashboard, metrics.

    `operations` is the on-call service; by default it is built at start-up with the real
    adapters (a cluster when KUBECONFIG or in-cluster credentials are there, else none).
    `dry_run` (from `cibroker dev` without a cluster) is said on every answer of the app
    (header X-Cibroker-Mode) and on every page.
    """
    env = settings.env
    edges = {
        host_id: HostEdge(
            host_id=host_id,
            host=host,
            source=source_for(host.kind),
            policy=AuthPolicy(
                webhook_secrets=settings.credentials[host_id].webhook_values(),
                signing_secrets=settings.credentials[host_id].signing_values(),
                tolerance_seconds=host.signature_tolerance_seconds,
                allow_sha1=host.allow_sha1_signatures,
            ),
        )
        for host_id, host in settings.routing.hosts.items()
    }
    routes = settings.routing.routes
    auth = ApiAuth(env.api_token_names(), open_without_tokens=settings.embedded_defaults)
    origin = f"cibroker-web@{socket.gethostname()}:{os.getpid()}"
    state: dict[str, Any] = {}
    edge_metrics = EdgeMetrics()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if store is not None:
            state["store"] = store
        else:
            assert env.redis_url is not None, "the CLI resolves the Redis URL before the app starts"
            state["store"] = AsyncStore(
                env.redis_url.get_secret_value(),
                timeout=env.redis_timeout_seconds,
                record_ttl=env.retention_days * 86400,
                dedup_ttl=env.dedup_ttl_seconds,
                queue=env.queue,
            )
        try:
            await state["store"].prepare()
        except StoreUnavailable as exc:  # not fatal: /readyz says so, and the edge answers 503 until Redis is back
            log.warning("store_unavailable_at_start", error=str(exc))
        if operations is not None:
            state["ops"] = operations
        else:
            from workers.wiring import cluster_or_none, default_operations

            cluster, why = await run_in_threadpool(cluster_or_none, settings)
            if cluster is None:
                log.info("api_without_cluster", detail=f"run views and actions answer 503: {why}")
            state["ops"] = default_operations(settings, cluster=cluster, find_cluster=False)
        try:
            yield
        finally:
            if store is None:
                await state["store"].close()
            if operations is None:
                state["ops"].store.close()

    async def hook(request: Request) -> Response:
        """The webhook answer; `_hook` decides it, this builds it and counts it once."""
        started = time.perf_counter()
        status, payload = await _hook(request, started)
        host_id = request.path_params["host_id"]
        headers = request.headers
        edge_metrics.observe(host=host_id if host_id in edges else "unknown",
                             event=headers.get("x-gitlab-event") or headers.get("x-github-event") or headers.get("x-gitea-event") or "",
                             decision="rejected" if status >= 400 else payload["decision"],
                             seconds=time.perf_counter() - started)
        return _json(status, payload)

    async def _hook(request: Request, started: float) -> tuple[int, dict[str, Any]]:
        received = time.time()
        host_id = request.path_params["host_id"]
        edge = edges.get(host_id)
        if edge is None:
            return (404, {"error": f"no host {host_id[:60]!r} in the routing file; POST to /hooks/<host id>"})
        headers = request.headers
        try:
            body = await read_body(request, env.max_body_bytes)
            authenticated_by = edge.source.authenticate(headers, body, policy=edge.policy, now=received)
            parsed = edge.source.parse(headers, body, host_id=host_id)
        except Rejected as exc:
            log.info("webhook_rejected", host=host_id, status=exc.status, reason=exc.reason)
            return (exc.status, {"error": exc.reason})
        delivery_id = delivery.new_delivery_id(received)
        outcome = parsed if isinstance(parsed, Ignored) else decide(parsed, routes)
        if isinstance(outcome, Ignored):
            return await _ignored(edge, outcome, delivery_id=delivery_id, received=received, headers=headers,
                                  authenticated_by=authenticated_by, started=started)
        event = outcome.event
        identity = edge.source.identity(headers, event)
        record = delivery.record(
            delivery_id=delivery_id, host_id=host_id, host_kind=edge.host.kind, event=event, event_name=event.event,
            decision="accepted", reason=f"matched route(s) {', '.join(outcome.routes)}", code="accepted",
            received_at=received, headers=headers, authenticated_by=authenticated_by, identity=identity,
            routes=outcome.routes,
        )
        entries = [
            delivery.log_entry("received", f"{event.event} for {event.repo} {event.kind} {event.name!r} at {event.short_sha}", at=received),
            delivery.log_entry("authenticated", f"verified by {authenticated_by}", at=received),
            delivery.log_entry("deduplicated", f"new delivery by {identity.source} {identity.value}", at=received),
            delivery.log_entry("matched", f"route(s) {', '.join(outcome.routes)}", at=received, routes=list(outcome.routes)),
            delivery.log_entry("queued", "queued for a worker", at=received),
        ]
        message = task_message(task=delivery.PROCESS_TASK, task_id=delivery_id, args=[delivery_id], queue=env.queue, origin=origin)
        try:
            prior = await state["store"].accept(
                host_id=host_id, identity=identity, delivery_id=delivery_id, record=record, message=message, log=entries
            )
        except StoreUnavailable as exc:
            log.warning("webhook_not_stored", host=host_id, repo=event.repo, sha=event.sha, error=str(exc))
            return (503, {"error": "cannot store the delivery right now (redis unavailable); resend it later"})
        took_ms = round((time.perf_counter() - started) * 1000, 2)
        if prior is not None:
            log.info("webhook_duplicate", host=host_id, delivery_id=prior, identity=identity.source, took_ms=took_ms)
            return (200, {"decision": "duplicate", "delivery_id": prior,
                               "reason": f"already received as delivery {prior} (same {identity.source})"})
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
    app = Starlette(
        middleware=middleware,
        routes=[
            Route("/hooks/{host_id}", hook, methods=["POST"]),
            *api_routes(auth, ops),
            *dashboard_routes(auth, ops),
            Route("/openapi.json", openapi_endpoint, methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.dry_run = dry_run  # pages say so (broker.dashboard reads it)
    return app


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


def app_from_environment() -> Starlette:
    """uvicorn factory for multi-worker serving: each worker builds its app from CIBROKER_* (set by `cibroker serve`)."""
    from broker.logging import configure
    from config.settings import load_settings

    settings = load_settings(os.environ)
    configure(fmt=settings.env.log_format, level=settings.env.log_level)
    return create_app(settings)
