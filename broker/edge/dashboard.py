"""The dashboard: what happened to a push, and run it again, from a browser.

Server-rendered HTML over `broker.services.oncall` (the same service as the CLI and the API),
so a page shows exactly what `cibroker deliveries show` / `runs show` print. It works
without JavaScript; with it, each page polls its own URL every few seconds asking for
the `<main>` fragment only (header `X-Dashboard-Fragment: 1`) and swaps it in, pausing
while the tab is hidden or a form is being filled in.

Reads are open, like the Tekton Dashboard: put the broker behind the cluster's SSO
ingress when repository names are sensitive. Actions (re-run, cancel) are HTML form
POSTs that carry the API token in a password field, checked by `ApiAuth.check` like a
bearer token. That token is what stops cross-site request forgery: a forging page cannot
know it. As a second line, a POST whose `Origin` (or, failing that, `Referer`) names
another site is refused. Nothing here renders a secret: records never hold one, and a
token typed into a form is never echoed back.
"""

from __future__ import annotations

import secrets
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import jinja2
import orjson
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from broker.edge.api import ACTOR, DELIVERY_ID, NAME, STATES, ApiAuth
from broker.core.errors import Permanent, StoreUnavailable, Transient
from broker.services.oncall import Actor, NoCluster, NotConfigured, NotFound, Operations, Refused, epoch
from broker.services.oncall import span as shared_span

FRAGMENT_HEADER = "x-dashboard-fragment"
REFRESH_MS = 2500
FORM_LIMIT = 16 * 1024
FILTER_STATES = (*STATES, "ignored")
STATUS_STEPS = ("status_posted", "status_failed", "status_skipped")
DEPLOY_STEPS = ("redeploy_requested",)  # plus every deploy_* step
NOTICES = {
    "cancel": "Cancel requested: queued for a worker, which stops the run in Tekton. The watcher reports the run as "
              "canceled once it has stopped.",
    "redeploy": "Deploy requested: queued for a worker; its results appear under Deploys below.",
}

_templates = jinja2.Environment(
    loader=jinja2.PackageLoader("broker.edge", "templates"),
    autoescape=True,  # every page, including the fragments; nothing is marked safe
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def span(value: float | None) -> str:
    return shared_span(value, missing="–")


def _age(iso_time: str | None, now: float) -> str:
    then = epoch(iso_time)
    return "–" if then is None else span(now - then)


_templates.globals.update(span=span, age=lambda iso: _age(iso, time.time()), refresh_ms=REFRESH_MS,
                          filter_states=FILTER_STATES)


def render(request: Request, template: str, *, status: int = 200, **context: Any) -> HTMLResponse:
    """The whole page, or only its `main` block when the live refresh asks for the fragment."""
    nonce = secrets.token_urlsafe(16)
    context.setdefault("error", None)
    context.setdefault("notice", None)
    # The live refresh polls the page's own URL; an answer to a POST names its page itself (or is not polled).
    page_url = request.url.path + (f"?{request.url.query}" if request.url.query else "") if request.method == "GET" else ""
    context.update(nonce=nonce, page_url=page_url, dry_run=bool(getattr(request.app.state, "dry_run", False)))
    page = _templates.get_template(template)
    if request.headers.get(FRAGMENT_HEADER) == "1":
        html = "".join(page.blocks["main"](page.new_context(context)))
    else:
        html = page.render(context)
    answer = HTMLResponse(html, status_code=status)
    answer.headers.update({
        "Cache-Control": "no-store",
        "Vary": "X-Dashboard-Fragment",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "same-origin",
        # Inline style and script only with this response's nonce; no framing (clickjacking of the buttons).
        "Content-Security-Policy": f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
                                   "connect-src 'self'; img-src 'self' data:; form-action 'self'; "
                                   "frame-ancestors 'none'; base-uri 'none'",
    })
    return answer


def _problem(request: Request, exc: Exception) -> HTMLResponse:
    """A service error as a page a person can act on (the same mapping as the API's)."""
    if isinstance(exc, NotFound):
        status, title = 404, "Not found"
    elif isinstance(exc, NoCluster):
        status, title = 503, "No cluster configured"
    elif isinstance(exc, NotConfigured):
        status, title = 503, "Not configured"
    elif isinstance(exc, Refused):
        status, title = 409, "Refused"
    elif isinstance(exc, Permanent):
        status, title = 400, "Cannot do that"
    else:
        status, title = 503, "Try again shortly"
    return render(request, "problem.html", status=status, title=title, message=str(exc),
                  no_cluster=isinstance(exc, NoCluster))


def overview(service: Operations, *, repo: str | None, state: str | None, limit: int = 50) -> dict[str, Any]:
    """Recent deliveries (each with its runs) and runs, filtered by repo and by run or delivery state."""
    no_cluster = cluster_error = None
    try:
        runs = service.runs(repo=repo, limit=500)
    except NoCluster as exc:
        runs, no_cluster = [], str(exc)
    except (Transient, Permanent) as exc:  # Kubernetes trouble must not hide the deliveries, which come from Redis
        if isinstance(exc, StoreUnavailable):
            raise
        runs, cluster_error = [], str(exc)
    by_delivery: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        by_delivery[r["delivery_id"]].append(r)
    deliveries = []
    for d in service.deliveries(limit=200, repo=repo):
        mine = by_delivery.get(d["delivery_id"], [])
        if state and state not in (d["decision"], d.get("state")) and not any(r["state"] == state for r in mine):
            continue
        deliveries.append({**d, "runs": mine})
    repos = sorted({(d.get("push") or {}).get("repo", "") for d in deliveries} | {r["repo"] for r in runs} - {""})
    return {
        "deliveries": deliveries[:limit],
        "runs": [r for r in runs if not state or r["state"] == state][:limit],
        "repos": repos,
        "no_cluster": no_cluster,
        "cluster_error": cluster_error,
    }


def run_page(service: Operations, key: str) -> dict[str, Any]:
    """A run, its delivery's decision log (statuses and deploys come from it) and the other attempts."""
    run = service.run(key)
    log: list[dict[str, Any]] = []
    delivery_gone = None
    if run["delivery_id"]:
        try:
            log = service.delivery(run["delivery_id"])["log"]
        except NotFound as exc:
            delivery_gone = str(exc)
    attempts = [] if run["unreadable"] else [  # an unreadable run's repo, commit and route are not known
        r for r in service.runs(repo=run["repo"], limit=500)
        if r["sha"] == run["sha"] and r["route"] == run["route"] and not r["unreadable"]]
    return {
        "run": run,
        "statuses": [e for e in log if e["step"] in STATUS_STEPS],
        "deploys": [e for e in log if e["step"].startswith("deploy_") or e["step"] in DEPLOY_STEPS],
        "deploy_environments": run["environments"],
        "attempts": attempts,
        "delivery_gone": delivery_gone,
        "final": run["state"] in ("success", "failed", "canceled"),
    }


def delivery_page(service: Operations, delivery_id: str) -> dict[str, Any]:
    """A delivery with its runs; when Kubernetes cannot be read, the decision log alone and why."""
    try:
        return {"d": service.delivery(delivery_id), "cluster_error": None}
    except (Transient, Permanent) as exc:
        if isinstance(exc, (StoreUnavailable, NotFound, NoCluster)):
            raise
        return {"d": replace(service, cluster=None).delivery(delivery_id), "cluster_error": str(exc)}


def same_origin(request: Request) -> bool:
    """False when the browser says the form was posted from another site."""
    ours = {request.headers.get("host", ""), request.headers.get("x-forwarded-host", "")} - {""}
    origin = request.headers.get("origin")
    if origin is not None:
        return origin != "null" and urlsplit(origin).netloc in ours
    referer = request.headers.get("referer")
    if referer:
        return urlsplit(referer).netloc in ours
    return True  # neither header (some privacy settings strip both): the token alone guards the action


async def read_form(request: Request) -> dict[str, str] | str:
    """The url-encoded form fields (first value of each), or why not."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        return "send the form as application/x-www-form-urlencoded"
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > FORM_LIMIT:
            return "form too large"
    fields = parse_qs(raw.decode("utf-8", errors="replace"), keep_blank_values=True, max_num_fields=20)
    return {name: values[0] for name, values in fields.items()}


def dashboard_routes(auth: ApiAuth, ops: Callable[[], Operations]) -> list[Route]:
    """The dashboard's routes. `ops` returns the on-call service (built when the app starts)."""
    token_needed = not auth.tokenless  # the embedded defaults with no token set act without one (loopback only)

    async def index(request: Request) -> Response:
        repo = request.query_params.get("repo", "").strip()[:200] or None
        state = request.query_params.get("state") or None
        if state is not None and state not in FILTER_STATES:
            state = None
        try:
            found = await run_in_threadpool(overview, ops(), repo=repo, state=state)
        except (Permanent, Transient) as exc:
            return _problem(request, exc)
        return render(request, "index.html", repo=repo or "", state=state or "", **found)

    def run_key(request: Request) -> str | None:
        namespace, name = request.path_params["namespace"], request.path_params["name"]
        return f"{namespace}/{name}" if NAME.match(namespace) and NAME.match(name) else None

    async def show_run(request: Request, *, status: int = 200, error: str | None = None,
                       form: dict[str, str] | None = None) -> Response:
        key = run_key(request)
        if key is None:
            return _problem(request, NotFound("no such run (names are DNS-1123 labels)"))
        try:
            found = await run_in_threadpool(run_page, ops(), key)
        except (Permanent, Transient) as exc:
            return _problem(request, exc)
        notice = NOTICES.get(request.query_params.get("did", ""))
        return render(request, "run.html", status=status, error=error, notice=notice, form=form or {},
                      token_needed=token_needed, **found)

    async def show_delivery(request: Request, *, status: int = 200, error: str | None = None,
                            form: dict[str, str] | None = None) -> Response:
        delivery_id = request.path_params["delivery_id"]
        if not DELIVERY_ID.match(delivery_id):
            return _problem(request, NotFound("no such delivery (ids are 26 lower-case hex characters)"))
        try:
            found = await run_in_threadpool(delivery_page, ops(), delivery_id)
        except (Permanent, Transient) as exc:
            return _problem(request, exc)
        return render(request, "delivery.html", status=status, error=error, form=form or {}, token_needed=token_needed,
                      **found)

    async def action(request: Request, again: Callable[..., Any], do: Callable[[Actor, dict[str, str]], Any],
                     then: Callable[[Any], str]) -> Response:
        """Check origin, form and token; do the action; answer 303 to `then(result)` or the page with the error."""
        if not same_origin(request):
            return await again(request, status=403, error="refused: this form was posted from another site")
        form = await read_form(request)
        if isinstance(form, str):
            return await again(request, status=400, error=form)
        kept = {k: v[:500] for k, v in form.items() if k in ("reason", "who", "deploy_only", "force")}  # re-filled after an error; never the token
        name = auth.check(form.get("token") or None, request)
        if isinstance(name, Response):
            said = orjson.loads(name.body)["error"]
            if not form.get("token") and auth.tokens:  # the API's wording is about headers; this is a form
                said = "enter an API token (one of those set in CIBROKER_API_TOKENS on the broker)"
            return await again(request, status=name.status_code, error=said, form=kept)
        person = ACTOR.sub("", form.get("who", ""))[:64].strip()
        actor = Actor(who=f"{person} (token {name})" if person else name, channel="dashboard")
        try:
            result = await run_in_threadpool(do, actor, form)
        except (Permanent, Transient) as exc:
            status = 409 if isinstance(exc, Refused) else 404 if isinstance(exc, NotFound) else 503 if isinstance(
                exc, (NoCluster, NotConfigured, Transient)) else 400
            return await again(request, status=status, error=str(exc), form=kept)
        return RedirectResponse(then(result), status_code=303)

    def _reason(form: dict[str, str]) -> str:
        return form.get("reason", "")[:500]

    def _after_rerun(plan: dict[str, Any]) -> str:
        if plan.get("delivery_id"):
            return f"/deliveries/{plan['delivery_id']}"
        namespace, _, name = plan["run"].partition("/")
        return f"/runs/{quote(namespace)}/{quote(name)}?did=redeploy"

    async def rerun_run(request: Request) -> Response:
        key = run_key(request)
        if key is None:
            return _problem(request, NotFound("no such run (names are DNS-1123 labels)"))
        def do(actor: Actor, form: dict[str, str]) -> Any:
            deploy_only = form.get("deploy_only") == "on"
            return ops().rerun(actor=actor, run=key, reason=_reason(form), deploy_only=deploy_only,
                               force=deploy_only and form.get("force") == "on")

        return await action(request, show_run, do, _after_rerun)

    async def cancel_run(request: Request) -> Response:
        key = run_key(request)
        if key is None:
            return _problem(request, NotFound("no such run (names are DNS-1123 labels)"))
        return await action(request, show_run, lambda actor, form: ops().cancel(key, actor=actor, reason=_reason(form)),
                            lambda done: f"/runs/{key}?did=cancel")

    async def rerun_delivery(request: Request) -> Response:
        delivery_id = request.path_params["delivery_id"]
        if not DELIVERY_ID.match(delivery_id):
            return _problem(request, NotFound("no such delivery (ids are 26 lower-case hex characters)"))
        return await action(request, show_delivery, lambda actor, form: ops().rerun(
            actor=actor, delivery_id=delivery_id, reason=_reason(form)), _after_rerun)

    async def get_run(request: Request) -> Response:
        return await show_run(request)

    async def get_delivery(request: Request) -> Response:
        return await show_delivery(request)

    return [
        Route("/", index, methods=["GET"]),
        Route("/runs/{namespace}/{name}", get_run, methods=["GET"]),
        Route("/runs/{namespace}/{name}/rerun", rerun_run, methods=["POST"]),
        Route("/runs/{namespace}/{name}/cancel", cancel_run, methods=["POST"]),
        Route("/deliveries/{delivery_id}", get_delivery, methods=["GET"]),
        Route("/deliveries/{delivery_id}/rerun", rerun_delivery, methods=["POST"]),
    ]

