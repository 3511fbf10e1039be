"""The HTTP API for on-call work: deliveries, runs, re-run, cancel, audit, OpenAPI.

Thin: every handler authenticates the bearer token, calls `broker.services.oncall` (the
same service the CLI runs locally) in a worker thread, and maps the service's errors
to HTTP answers. Tokens come from CIBROKER_API_TOKENS (`name=token` entries name the
actor the audit log records). `/openapi.json` describes this API and the webhook edge.
"""

from __future__ import annotations

import hmac
import ipaddress
import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from broker.core.errors import Permanent, Transient
from broker.services.oncall import Actor, BadField, NoCluster, NotConfigured, NotFound, Operations, Refused

DELIVERY_ID = re.compile(r"^[0-9a-f]{26}$")
NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
ACTOR = re.compile(r"[^A-Za-z0-9_.@ -]")
STATES = ("pending", "running", "success", "failed", "canceled")


def json_answer(status: int, payload: Any) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


LOOPBACK_HOST = re.compile(r"^(localhost|127\.0\.0\.1|\[::1\])(:[0-9]{1,5})?\Z")
LIMITER_WINDOW_SECONDS = 60.0
LIMITER_MAX_CLIENTS = 10000  # addresses remembered at once; past it the oldest windows are dropped


def _loopback_ip(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


@dataclass
class FailureLimiter:
    """Wrong API tokens per client address in a fixed one-minute window; past `limit` the address waits.

    While an address is limited every token it presents answers 429 (a right one too), so guessing
    learns nothing until the window ends. Behind a proxy every client shares its address: a guesser
    there locks the others out for at most a minute (the price of not trusting X-Forwarded-For).
    """

    limit: int
    clock: Callable[[], float] = time.monotonic
    _windows: dict[str, tuple[float, int]] = field(default_factory=dict)

    def retry_after(self, client: str) -> int | None:
        """Seconds this client must wait before its next try, or None when it may try now."""
        window = self._windows.get(client)
        if window is None:
            return None
        started, failures = window
        left = started + LIMITER_WINDOW_SECONDS - self.clock()
        if left <= 0:
            del self._windows[client]
            return None
        return math.ceil(left) if failures >= self.limit else None

    def failed(self, client: str) -> None:
        now = self.clock()
        started, failures = self._windows.get(client, (now, 0))
        if now - started >= LIMITER_WINDOW_SECONDS:
            started, failures = now, 0
        self._windows[client] = (started, failures + 1)
        if len(self._windows) > LIMITER_MAX_CLIENTS:
            for stale in sorted(self._windows, key=lambda c: self._windows[c][0])[: LIMITER_MAX_CLIENTS // 2]:
                del self._windows[stale]


@dataclass
class ApiAuth:
    """Bearer tokens, compared in constant time, with a per-client limit on wrong ones.

    Without any token configured the API is open only on the embedded defaults, and then only to a
    request that arrived on a loopback address with a loopback `Host` (localhost, 127.0.0.1, [::1],
    any port): a page on another origin that rebinds its DNS name to 127.0.0.1 still sends its own
    name as `Host`, so it cannot drive a laptop's broker.
    """

    tokens: tuple[tuple[str, str], ...]
    open_without_tokens: bool
    failures_per_minute: int = 10
    _encoded: tuple[tuple[str, bytes], ...] = field(init=False)
    limiter: FailureLimiter = field(init=False)

    def __post_init__(self) -> None:
        self._encoded = tuple((name, token.encode()) for name, token in self.tokens)
        self.limiter = FailureLimiter(self.failures_per_minute)

    @property
    def tokenless(self) -> bool:
        """True when no token is asked for (embedded defaults, none set; loopback requests only)."""
        return not self._encoded and self.open_without_tokens

    def check(self, presented: str | None, request: Request | None = None) -> str | Response:
        """The token's name, or the 401/403/429 answer to give. `request` gives the client address and Host."""
        if not self._encoded:
            if self.open_without_tokens:
                if request is not None and _local_request(request):
                    return "local"
                return json_answer(403, {"error": "without CIBROKER_API_TOKENS this API answers only requests to "
                                                  "localhost / 127.0.0.1 / [::1] on a loopback address; set tokens to use it "
                                                  "from elsewhere"})
            return json_answer(401, {"error": "the API needs a bearer token; set CIBROKER_API_TOKENS on the server"})
        client = request.client.host if request is not None and request.client else ""
        wait = self.limiter.retry_after(client)
        if wait is not None:
            return Response(orjson.dumps({"error": f"too many wrong API tokens from this address; try again in {wait} s"}),
                            status_code=429, media_type="application/json", headers={"Retry-After": str(wait)})
        if not presented:
            return json_answer(401, {"error": "missing Authorization: Bearer <token>"})
        found = None
        candidate = presented.strip().encode()
        for name, known in self._encoded:  # compare with every token, so timing says nothing about which matched
            if hmac.compare_digest(candidate, known):
                found = name
        if found is None:
            self.limiter.failed(client)
            return json_answer(403, {"error": "invalid API token"})
        return found

    def bearer(self, request: Request) -> str | None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return token if scheme.lower() == "bearer" and token else None

    def actor(self, request: Request, *, channel: str, token: str | None = None) -> Actor | Response:
        name = self.check(token if token is not None else self.bearer(request), request)
        if isinstance(name, Response):
            return name
        # The CLI says which person is behind a shared token; recorded as said, next to the token's name.
        said = ACTOR.sub("", request.headers.get("x-cibroker-actor", ""))[:64].strip()
        return Actor(who=f"{said} (token {name})" if said else name, channel=channel)


def _local_request(request: Request) -> bool:
    """Arrived on a loopback address (not merely from one: the socket's own end), naming a loopback Host."""
    server = request.scope.get("server")
    host = request.headers.get("host", "")
    return bool(server) and _loopback_ip(str(server[0])) and LOOPBACK_HOST.match(host.lower()) is not None


async def call(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Response:
    """Run a service call off the event loop; map its errors to answers a person can act on."""
    try:
        return json_answer(200, await run_in_threadpool(fn, *args, **kwargs))
    except NotFound as exc:
        return json_answer(404, {"error": str(exc)})
    except Refused as exc:
        return json_answer(409, {"error": str(exc)})
    except (NoCluster, NotConfigured) as exc:
        return json_answer(503, {"error": str(exc)})
    except BadField as exc:
        return json_answer(400, {"error": str(exc), "field": exc.field})
    except Permanent as exc:
        return json_answer(400, {"error": str(exc)})
    except Transient as exc:
        return json_answer(503, {"error": f"try again shortly: {exc}"})


def _limit(request: Request, default: int = 50) -> int | Response:
    raw = request.query_params.get("limit", str(default))
    if not raw.isdigit() or not 1 <= int(raw) <= 1000:
        return json_answer(400, {"error": "limit must be a whole number from 1 to 1000"})
    return int(raw)


async def _body(request: Request) -> dict[str, Any] | Response:
    raw = await request.body()
    if not raw:
        return {}
    if len(raw) > 64 * 1024:
        return json_answer(413, {"error": "request body larger than 64 KiB"})
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json_answer(400, {"error": "body is not valid JSON"})
    if not isinstance(body, dict):
        return json_answer(400, {"error": "body must be a JSON object"})
    return body


def _text(body: dict[str, Any], key: str, *, limit: int = 500) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise Permanent(f"{key} must be a string of at most {limit} characters")
    return value


def _flag(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise Permanent(f"{key} must be true or false")
    return value


def _rerun_options(body: dict[str, Any]) -> dict[str, Any]:
    """reason, deploy_only, force, dry_run and route of a re-run request; Permanent when one is malformed."""
    return {"reason": _text(body, "reason") or "", "deploy_only": _flag(body, "deploy_only"), "force": _flag(body, "force"),
            "dry_run": _flag(body, "dry_run"), "route": _text(body, "route", limit=63)}


def _run_key(request: Request) -> str | Response:
    namespace = request.path_params.get("namespace", "")
    name = request.path_params["name"]
    if not NAME.match(name) or (namespace and not NAME.match(namespace)):
        return json_answer(404, {"error": "no such run (names are DNS-1123 labels)"})
    return f"{namespace}/{name}" if namespace else name


def api_routes(auth: ApiAuth, ops: Callable[[], Operations]) -> list[Route]:
    """The /api/* routes. `ops` returns the service (built when the app starts)."""

    def guarded(handler: Callable[[Request, Actor], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            actor = auth.actor(request, channel="api")
            if isinstance(actor, Response):
                return actor
            return await handler(request, actor)

        endpoint.__name__ = handler.__name__
        return endpoint

    @guarded
    async def list_deliveries(request: Request, actor: Actor) -> Response:
        limit = _limit(request)
        if isinstance(limit, Response):
            return limit
        return await call(ops().deliveries, limit=limit, repo=request.query_params.get("repo") or None,
                          state=request.query_params.get("state") or None)

    @guarded
    async def get_delivery(request: Request, actor: Actor) -> Response:
        delivery_id = request.path_params["delivery_id"]
        if not DELIVERY_ID.match(delivery_id):
            return json_answer(404, {"error": "no such delivery (ids are 26 lower-case hex characters)"})
        return await call(ops().delivery, delivery_id)

    @guarded
    async def list_runs(request: Request, actor: Actor) -> Response:
        limit = _limit(request)
        if isinstance(limit, Response):
            return limit
        state = request.query_params.get("state") or None
        if state is not None and state not in STATES:
            return json_answer(400, {"error": f"state must be one of {', '.join(STATES)}"})
        return await call(ops().runs, repo=request.query_params.get("repo") or None, state=state,
                          route=request.query_params.get("route") or None, limit=limit)

    @guarded
    async def get_run(request: Request, actor: Actor) -> Response:
        key = _run_key(request)
        return key if isinstance(key, Response) else await call(ops().run, key)

    async def run_request(request: Request) -> tuple[str, dict[str, Any]] | Response:
        """The run named in the path and the JSON body, or the answer that refuses them."""
        key = _run_key(request)
        if isinstance(key, Response):
            return key
        body = await _body(request)
        return body if isinstance(body, Response) else (key, body)

    @guarded
    async def rerun_run(request: Request, actor: Actor) -> Response:
        asked = await run_request(request)
        if isinstance(asked, Response):
            return asked
        key, body = asked
        try:
            options = _rerun_options(body)
        except Permanent as exc:
            return json_answer(400, {"error": str(exc)})
        return await call(ops().rerun, actor=actor, run=key, **options)

    @guarded
    async def rerun(request: Request, actor: Actor) -> Response:
        body = await _body(request)
        if isinstance(body, Response):
            return body
        try:
            options = {key: _text(body, key, limit=255) for key in ("delivery_id", "repo", "sha", "ref", "run")}
            options.update(_rerun_options(body))
        except Permanent as exc:
            return json_answer(400, {"error": str(exc)})
        # repo, ref, sha and run go through the webhook edge's own validators in the service (400 naming the field).
        if options["delivery_id"] is not None and not DELIVERY_ID.match(options["delivery_id"]):
            return json_answer(404, {"error": "no such delivery (ids are 26 lower-case hex characters)"})
        return await call(ops().rerun, actor=actor, **options)

    @guarded
    async def cancel_run(request: Request, actor: Actor) -> Response:
        asked = await run_request(request)
        if isinstance(asked, Response):
            return asked
        key, body = asked
        try:
            reason = _text(body, "reason") or ""
        except Permanent as exc:
            return json_answer(400, {"error": str(exc)})
        return await call(ops().cancel, key, actor=actor, reason=reason)

    @guarded
    async def audit(request: Request, actor: Actor) -> Response:
        limit = _limit(request, 100)
        return limit if isinstance(limit, Response) else await call(ops().audit_log, limit=limit)

    return [
        Route("/api/deliveries", list_deliveries, methods=["GET"]),
        Route("/api/deliveries/{delivery_id}", get_delivery, methods=["GET"]),
        Route("/api/runs", list_runs, methods=["GET"]),
        Route("/api/runs/{name}", get_run, methods=["GET"]),
        Route("/api/runs/{namespace}/{name}", get_run, methods=["GET"]),
        Route("/api/runs/{name}/rerun", rerun_run, methods=["POST"]),
        Route("/api/runs/{namespace}/{name}/rerun", rerun_run, methods=["POST"]),
        Route("/api/runs/{name}/cancel", cancel_run, methods=["POST"]),
        Route("/api/runs/{namespace}/{name}/cancel", cancel_run, methods=["POST"]),
        Route("/api/rerun", rerun, methods=["POST"]),
        Route("/api/audit", audit, methods=["GET"]),
    ]


def _op(summary: str, *, params: list[dict[str, Any]] = (), body: dict[str, Any] | None = None,  # type: ignore[assignment]
        answers: dict[str, str], auth: bool = True) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "parameters": list(params),
                          "responses": {code: {"description": text, "content": {"application/json": {"schema": {"type": "object"}}}}
                                        for code, text in answers.items()}}
    if body is not None:
        op["requestBody"] = {"required": False, "content": {"application/json": {"schema": body}}}
    if not auth:
        op["security"] = []
    return op


def _path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _query(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema}


AUTH_ANSWERS = {"401": "no bearer token", "403": "wrong token"}
RUN_ANSWERS = {**AUTH_ANSWERS, "404": "no such run",
               "503": "no cluster configured, no signing key configured, or Kubernetes/Redis unavailable"}
RERUN_BODY = {"type": "object", "additionalProperties": False, "properties": {
    "reason": {"type": "string", "maxLength": 500,
               "description": "why; kept in the audit and decision logs (required with force)"},
    "deploy_only": {"type": "boolean", "description": "only the deploy stage of a succeeded run (a signed request per "
                                                      "environment, queued for a worker)"},
    "force": {"type": "boolean", "description": "with deploy_only: skip the ancestry guard (deploy even a commit older "
                                                "than the one running); audited with the actor's name"},
    "dry_run": {"type": "boolean"},
    "route": {"type": "string", "maxLength": 63, "description": "only this route; refused (409) unless its host, repo glob "
                                                                "and branch/tag filters take the commit"}}}


def openapi(version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 description of the webhook edge and the on-call API."""
    run_params = [_path("namespace"), _path("name")]
    return {
        "openapi": "3.1.0",
        "info": {"title": "cibroker", "version": version,
                 "description": "Git webhooks in, Tekton PipelineRuns out. /hooks/* authenticate with the Git host's "
                                "webhook secret or signature; /api/* with a bearer token from CIBROKER_API_TOKENS."},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": {
            "/hooks/{host_id}": {"post": _op(
                "Receive a Git host webhook (GitLab, GitHub, Gitea push and tag push)", auth=False,
                params=[_path("host_id")], body={"type": "object"},
                answers={"200": "ignored (with a reason) or duplicate", "202": "accepted and queued", "400": "unparseable body",
                         "401": "missing credentials", "403": "wrong secret or signature", "404": "no such host",
                         "408": "body too slow", "413": "body too large", "415": "unsupported content type",
                         "503": "cannot store right now; resend later"})},
            "/api/deliveries": {"get": _op("Recent deliveries, newest first", params=[
                _query("repo", {"type": "string"}), _query("state", {"type": "string"}),
                _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000})],
                answers={"200": "a list of delivery records", "400": "bad limit", **AUTH_ANSWERS})},
            "/api/deliveries/{delivery_id}": {"get": _op("A delivery's record, decision log and PipelineRuns",
                                                         params=[_path("delivery_id")],
                                                         answers={"200": "the delivery", "404": "unknown or expired", **AUTH_ANSWERS})},
            "/api/runs": {"get": _op("Managed PipelineRuns, newest first", params=[
                _query("repo", {"type": "string"}), _query("state", {"type": "string", "enum": list(STATES)}),
                _query("route", {"type": "string"}), _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000})],
                answers={"200": "a list of runs", "400": "bad filter", **RUN_ANSWERS})},
            "/api/runs/{namespace}/{name}": {"get": _op("A run with its TaskRuns, failing task and log commands",
                                                        params=run_params, answers={"200": "the run", **RUN_ANSWERS})},
            "/api/runs/{namespace}/{name}/rerun": {"post": _op(
                "Re-run a run's commit and route (a new PipelineRun), or only its deploy stage", params=run_params, body=RERUN_BODY,
                answers={"200": "what was queued (or, with dry_run, would be)", "400": "bad body (`field` names it)",
                         "409": "nothing to re-run, an unreadable run, or a route that does not take the commit",
                         **RUN_ANSWERS})},
            "/api/runs/{namespace}/{name}/cancel": {"post": _op(
                "Request the cancel of a run in progress: a signed request, queued for a worker, which sets the run's "
                "spec.status; the watcher then reports it canceled", params=run_params,
                body={"type": "object", "properties": {"reason": {"type": "string", "maxLength": 500}}},
                answers={"200": "cancel requested and queued (`requested`, `request_id`); not yet stopped",
                         "409": "the run already ended", **RUN_ANSWERS})},
            "/api/rerun": {"post": _op(
                "Re-run by delivery, by commit (repo + sha) or by the head of a ref (repo + ref)",
                body={"type": "object", "properties": {
                    **RERUN_BODY["properties"], "delivery_id": {"type": "string"}, "run": {"type": "string"},
                    "repo": {"type": "string", "description": "owner/name, as the webhook edge validates it"},
                    "sha": {"type": "string", "description": "a 40 (or 64) hex commit id"},
                    "ref": {"type": "string", "description": "a branch name, refs/heads/NAME or refs/tags/NAME"}}},
                answers={"200": "what was queued", "400": "bad or incomplete body (`field` names a bad repo, ref, sha or run)",
                         "404": "nothing found to re-run",
                         "409": "nothing to re-run, an unreadable run, or a route that does not take the commit",
                         **RUN_ANSWERS})},
            "/api/audit": {"get": _op("Who did what, when and why", params=[_query("limit", {"type": "integer"})],
                                      answers={"200": "audit entries, newest first", **AUTH_ANSWERS})},
            "/healthz": {"get": _op("The process is up", auth=False, answers={"200": "ok"})},
            "/readyz": {"get": _op("Redis reachable and configuration loaded", auth=False,
                                   answers={"200": "ready", "503": "Redis unavailable"})},
            "/metrics": {"get": _op("Prometheus metrics", auth=False, answers={"200": "text exposition format"})},
        },
    }

