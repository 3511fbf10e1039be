"""A fake Kubernetes API server over real HTTP, for driving the official client in tests.

Serves, from the in-memory `Store` (kube_store.py):

    /apis/tekton.dev/{v1,v1beta1}/namespaces/{ns}/{pipelineruns,taskruns}[/{name}[/status]]
    /apis/apps/v1/namespaces/{ns}/{deployments,replicasets}[/{name}[/status]]
    /api/v1/namespaces/{ns}/serviceaccounts[/{name}]

with create (POST), get, list and watch (GET), replace (PUT), patch (PATCH: merge, strategic
for built-in kinds only, JSON patch) and delete, answering errors as metav1.Status bodies.
Watches stream chunked newline-delimited JSON like the real server: replay after
`resourceVersion`, live events, BOOKMARKs, ERROR 410 once history is compacted, and a
clean end at `timeoutSeconds`.

Test controls: `inject()` answers matching requests with an error, `delay()` slows them,
`compact()` forgets history, `cut_watches()` drops open watch connections mid-stream,
`send_bookmarks()` makes every bookmark-enabled watch emit one now, `requests` logs every
call, `open_watches` counts streams and `unused_faults()` lists injections not met yet. In-process `put/get/list/mutate/delete/wait_for`
read and write the store without HTTP (and without being logged), for seeding and for the
simulators in tekton.py and rollout.py.
"""

from __future__ import annotations

import json
import queue
import re
import select
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.support.fakes import patches
from tests.support.fakes.kube_store import (END, PLURAL_OF_KIND, RESOURCES, ApiError, Change, Obj, Resource, Store, Watcher,
                                    status_body)

_ROUTE = re.compile(
    r"^/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))/namespaces/(?P<namespace>[^/]+)"
    r"/(?P<plural>[^/]+)(?:/(?P<name>[^/]+)(?:/(?P<sub>[^/]+))?)?/?$")
_VERBS = {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
_PATCHERS: dict[str, Callable[[Any, Any], Any]] = {
    "application/merge-patch+json": patches.merge_patch,
    "application/strategic-merge-patch+json": patches.strategic_merge_patch,
    "application/json-patch+json": patches.json_patch,
}


@dataclass(frozen=True)
class Request:
    """One request the fake received: what tests count and inspect."""

    method: str
    path: str
    query: Mapping[str, str]
    content_type: str = ""
    body: Any = None

    @property
    def is_watch(self) -> bool:
        return self.query.get("watch") in ("true", "1")


@dataclass
class _Rule:
    method: str
    pattern: re.Pattern[str]
    times: int | None  # None: forever
    status: int = 0
    headers: Mapping[str, str] = field(default_factory=dict)
    body: Any = None
    seconds: float = 0.0

    def take(self, method: str, path: str) -> bool:
        if self.method not in ("*", method) or not self.pattern.search(path) or self.times == 0:
            return False
        if self.times is not None:
            self.times -= 1
        return True


@dataclass(frozen=True)
class _Route:
    resource: Resource
    version: str
    namespace: str
    name: str | None
    sub: str | None


class FakeKubeAPI:
    """The fake server. Use as a context manager, or start()/stop()."""

    def __init__(self, *, bookmark_interval: float | None = 1.0, history_limit: int = 1000,
                 user: str = "system:serviceaccount:cibroker:cibroker") -> None:
        self.store = Store(history_limit=history_limit)
        self.bookmark_interval = bookmark_interval
        self.user = user  # named in injected 403 messages, like the real server does
        self.requests: list[Request] = []
        self._faults: list[_Rule] = []
        self._delays: list[_Rule] = []
        self._rules_lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> FakeKubeAPI:
        handler = type("Handler", (_Handler,), {"api": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.handle_error = lambda request, client_address: None  # type: ignore[method-assign]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-kube-api", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        for watcher in self.store.watchers():
            watcher.closed.wait(5)

    def __enter__(self) -> FakeKubeAPI:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._httpd is not None, "start the server first"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    # -- test controls ---------------------------------------------------------------------

    def inject(self, method: str, path_regex: str, status: int, *, times: int | None = 1,
               headers: Mapping[str, str] | None = None, body: Any = None) -> None:
        """Answer the next `times` requests matching (method or "*", regex searched in the path)
        with `status`; the body defaults to the Status the real server sends for that code."""
        with self._rules_lock:
            self._faults.append(_Rule(method, re.compile(path_regex), times, status, dict(headers or {}), body))

    def delay(self, path_regex: str, seconds: float, *, method: str = "*", times: int | None = None) -> None:
        """Hold matching requests for `seconds` before answering them."""
        with self._rules_lock:
            self._delays.append(_Rule(method, re.compile(path_regex), times, seconds=seconds))

    def unused_faults(self) -> list[str]:
        """Injected answers not yet given (method, path regex, status, times left): a test's faults were all met when empty."""
        with self._rules_lock:
            return [f"{r.method} {r.pattern.pattern} {r.status} x{r.times}" for r in self._faults if r.times]

    def compact(self) -> None:
        """Drop the watch history: resuming from an older resourceVersion now answers 410 Gone."""
        self.store.compact()

    def cut_watches(self, *, timeout: float = 5.0) -> int:
        """Drop every open watch connection without ending its chunked stream; returns how many."""
        watchers = self.store.watchers()
        for watcher in watchers:
            watcher.cut.set()
            try:
                watcher.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for watcher in watchers:
            assert watcher.closed.wait(timeout), "a watch stream did not close after being cut"
        return len(watchers)

    def send_bookmarks(self) -> None:
        """Every open watch that asked for bookmarks gets one at the current resourceVersion."""
        self.store.bookmark(self.store.watchers())

    @property
    def open_watches(self) -> int:
        return len(self.store.watchers())

    def calls(self, method: str | None = None, path_regex: str = "", *, watch: bool | None = None) -> list[Request]:
        """The logged requests with this method (None: any) whose path matches `path_regex`."""
        return [r for r in list(self.requests) if (method is None or r.method == method)
                and re.search(path_regex, r.path) and (watch is None or r.is_watch == watch)]

    # -- in-process access (not logged) ----------------------------------------------------

    def put(self, obj: Obj) -> Obj:
        """Create or replace `obj` whole, status included (seeding); plural and namespace from the object."""
        plural = PLURAL_OF_KIND[obj["kind"]]
        meta = obj["metadata"]
        version = obj["apiVersion"].rpartition("/")[2]
        if self.store.find(plural, meta["namespace"], meta["name"]) is None:
            return self.store.create(plural, meta["namespace"], obj, version=version, keep_status=True)
        return self.store.update(plural, meta["namespace"], meta["name"], lambda _: obj, direct=True)

    def get(self, plural: str, namespace: str, name: str) -> Obj | None:
        return self.store.find(plural, namespace, name)

    def list(self, plural: str, namespace: str | None = None, selector: str = "") -> list[Obj]:
        return self.store.list(plural, namespace, selector)[0]

    def mutate(self, plural: str, namespace: str, name: str, change: Callable[[Obj], Obj | None]) -> Obj:
        """Read-modify-write every field (spec, status, metadata) as one write, like a controller."""
        return self.store.update(plural, namespace, name, change, direct=True)

    def delete(self, plural: str, namespace: str, name: str) -> Obj:
        return self.store.delete(plural, namespace, name)

    def wait_for(self, plural: str, namespace: str, name: str, predicate: Callable[[Obj], bool], *,
                 timeout: float = 5.0) -> Obj:
        return self.store.wait_for(plural, namespace, name, predicate, timeout=timeout)

    def on_change(self, listener: Callable[[Change], None]) -> None:
        self.store.add_listener(listener)

    # -- used by the handler ---------------------------------------------------------------

    def _match(self, rules: list[_Rule], method: str, path: str) -> _Rule | None:
        with self._rules_lock:
            return next((rule for rule in rules if rule.take(method, path)), None)


class _Handler(BaseHTTPRequestHandler):
    api: FakeKubeAPI
    protocol_version = "HTTP/1.1"
    timeout = 30  # idle keep-alive connections give up eventually
    wbufsize = -1  # headers and body leave in one write (flushed per response and per watch event)

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._handle()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def _handle(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip()
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        request = Request(self.command, url.path, query, content_type, body)
        self.api.requests.append(request)
        if delay := self.api._match(self.api._delays, self.command, url.path):
            self.api._stopping.wait(delay.seconds)
        try:
            route = _route(url.path)
            if fault := self.api._match(self.api._faults, self.command, url.path):
                self._send_fault(fault, request, route)
            elif request.is_watch and self.command == "GET" and route.name is None:
                self._watch(route, query)
            else:
                self._send(*_dispatch(self.api.store, route, request))
        except ApiError as exc:
            self._send(exc.code, exc.body)

    def _send(self, code: int, payload: Any, headers: Mapping[str, str] | None = None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload, separators=(",", ":")).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_fault(self, fault: _Rule, request: Request, route: _Route) -> None:
        body = fault.body
        if body is None:
            body = status_body(fault.status, _fault_message(self.api.user, fault.status, request, route))
            if "Retry-After" in fault.headers:
                body["details"] = {"retryAfterSeconds": int(fault.headers["Retry-After"])}
        elif isinstance(body, str):
            body = body.encode()
        self._send(fault.status, body, fault.headers)

    def _watch(self, route: _Route, query: Mapping[str, str]) -> None:
        watcher = Watcher(route.resource, route.version, route.namespace, query.get("labelSelector", ""),
                          bookmarks=query.get("allowWatchBookmarks") == "true", connection=self.connection)
        self.api.store.watch(watcher, query.get("resourceVersion"))
        clean = False
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.flush()
            clean = self._stream(watcher, int(query.get("timeoutSeconds") or 0))
        except OSError:
            pass
        finally:
            # Unregistered before the last chunk: once a client sees the end, open_watches no longer counts it.
            self.api.store.unwatch(watcher)
            watcher.closed.set()
        try:
            if clean:
                self._chunk(b"")
                return
        except OSError:
            pass
        self.close_connection = True

    def _stream(self, watcher: Watcher, timeout: int) -> bool:
        """Write events until the timeout, END or shutdown (True: end cleanly), or a cut or gone client (False)."""
        deadline = time.monotonic() + timeout if timeout else float("inf")
        interval = self.api.bookmark_interval
        next_bookmark = time.monotonic() + interval if interval else float("inf")
        while not self.api._stopping.is_set() and time.monotonic() < deadline:
            if watcher.cut.is_set():
                return False
            try:
                event = watcher.events.get(timeout=min(0.05, max(deadline - time.monotonic(), 0.001)))
            except queue.Empty:
                if time.monotonic() >= next_bookmark:
                    self.api.store.bookmark([watcher], only_if_idle=True)
                    next_bookmark += interval or 0
                if self._client_gone():
                    return False
                continue
            if event is END:
                break
            self._chunk(json.dumps(event, separators=(",", ":")).encode() + b"\n")
        return not watcher.cut.is_set()

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _client_gone(self) -> bool:
        readable, _, _ = select.select([self.connection], [], [], 0)
        try:
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True


def _route(path: str) -> _Route:
    match = _ROUTE.match(path)
    group = "" if match and match["core"] else (match["group"] if match else None)
    resource = RESOURCES.get(match["plural"]) if match else None
    version = (match["core"] or match["version"]) if match else ""
    if resource is None or resource.group != group or version not in resource.versions \
            or (match["sub"] not in (None, "status")) or (match["sub"] and not resource.has_status):
        raise ApiError(404, "the server could not find the requested resource", details={})
    return _Route(resource, version, match["namespace"], match["name"], match["sub"])


def _dispatch(store: Store, route: _Route, request: Request) -> tuple[int, Any]:
    r, method = route.resource, request.method
    if route.name is None and method == "GET":
        items, rv = store.list(r.plural, route.namespace, request.query.get("labelSelector", ""))
        return 200, {"apiVersion": r.api_version(route.version), "kind": f"{r.kind}List",
                     "metadata": {"resourceVersion": str(rv)}, "items": items}
    if route.name is None and method == "POST":
        return 201, store.create(r.plural, route.namespace, _object_body(request), version=route.version)
    if route.name is None:
        raise ApiError(405, "the server does not allow this method on the requested resource")
    if method == "GET":
        return 200, store.get(r.plural, route.namespace, route.name)
    if method == "PUT":
        return 200, _replace(store, route, _object_body(request))
    if method == "PATCH":
        return 200, _patch(store, route, request)
    if method == "DELETE" and route.sub is None:
        deleted = store.delete(r.plural, route.namespace, route.name)
        if r.builtin:
            return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                         "details": {"name": route.name, "group": r.group, "kind": r.plural,
                                     "uid": deleted["metadata"]["uid"]}}
        return 200, deleted
    raise ApiError(405, "the server does not allow this method on the requested resource")


def _object_body(request: Request) -> Obj:
    if not isinstance(request.body, dict):
        raise ApiError(400, "the body of the request was not a JSON object")
    return request.body


def _replace(store: Store, route: _Route, body: Obj) -> Obj:
    meta = body.get("metadata") or {}
    if meta.get("name") != route.name:
        raise ApiError(400, f"the name of the object ({meta.get('name')}) does not match the name on the URL "
                            f"({route.name})")
    if not meta.get("resourceVersion") and not route.resource.builtin:
        raise ApiError(422, f'{route.resource.kind}.{route.resource.group} "{route.name}" is invalid: '
                            "metadata.resourceVersion: Invalid value: 0x0: must be specified for an update")
    return store.update(route.resource.plural, route.namespace, route.name, lambda _: body,
                        subresource=route.sub, precondition=meta.get("resourceVersion"))


def _patch(store: Store, route: _Route, request: Request) -> Obj:
    patcher = _PATCHERS.get(request.content_type)
    if patcher is None or (patcher is patches.strategic_merge_patch and not route.resource.builtin):
        raise ApiError(415, f"the body of the request was in an unknown format - accepted media types include: "
                            f"{', '.join(t for t in _PATCHERS if route.resource.builtin or 'strategic' not in t)}")
    precondition = None
    if isinstance(request.body, dict):
        precondition = (request.body.get("metadata") or {}).get("resourceVersion")
    elif not isinstance(request.body, list):
        raise ApiError(400, "the body of the request was not valid JSON")

    def apply(current: Obj) -> Obj:
        try:
            return patcher(current, request.body)
        except patches.PatchError as exc:
            raise ApiError(422, str(exc)) from exc

    return store.update(route.resource.plural, route.namespace, route.name, apply, subresource=route.sub,
                        precondition=precondition)


def _fault_message(user: str, status: int, request: Request, route: _Route) -> str:
    """The message the real server would send with this status for this request."""
    r = route.resource
    if status in (401,):
        return "Unauthorized"
    if status == 403:
        verb = "list" if request.method == "GET" and route.name is None else _VERBS[request.method]
        verb = "watch" if request.is_watch else verb
        target = f'{r.qualified} "{route.name}"' if route.name else r.qualified
        resource = f"{r.plural}/{route.sub}" if route.sub else r.plural
        return (f'{target} is forbidden: User "{user}" cannot {verb} resource "{resource}" in API group '
                f'"{r.group}" in the namespace "{route.namespace}"')
    return {409: f'Operation cannot be fulfilled on {r.qualified} "{route.name}": the object has been modified; '
                 "please apply your changes to the latest version and try again",
            429: "Too many requests, please try again later.",
            500: "Internal error occurred: etcdserver: request timed out",
            503: "the server is currently unable to handle the request",
            504: "Timeout: request did not complete within the allotted timeout"}.get(status, f"injected {status}")
