"""Fake GitLab and GitHub commit-status APIs over real HTTP, for testing workers/adapters/githost.py.

Each fake is a stdlib `ThreadingHTTPServer` on 127.0.0.1 (a free port) in a thread. It
enforces the rules the real host enforces on POSTing a commit status and records every
call, so tests assert on what crossed the wire, never on our own objects:

    fake.api_url                   base URL to hand to the adapter
    fake.calls                     [Call(method, path, body, headers, status)], token redacted
    fake.statuses(sha)             GitLab {(name, ref): [states]}, GitHub {context: [states]}
    fake.states(sha, name)         the accepted states for one name/context, in order
    fake.inject(503, times=2, headers={"Retry-After": "7"}, body=...)  next n requests
    fake.inject_hang()             next request gets no answer until release()/stop
    fake.inject_lost_answer(502)   next request is applied, but the client is answered 502
                                   (a proxy that timed out after the host did the work)
    fake.down(refuse=True)         refuse connections (or refuse=False: 503 to all) until up()

GitLab's rules (app/services/ci/create_commit_status_service.rb, CommitStatus state machine):
only a pending or running status with the same (project, sha, name, ref) is updated;
otherwise a new status object starts at `created`. The posted state fires one event
(pending: enqueue!, running: enqueue then run!, success: success!, failed: drop!,
canceled: cancel!) and an illegal one answers 400 with the state_machines message.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import pytest

CORPUS = Path(__file__).resolve().parents[2] / "fixtures" / "corpus" / "gitlab" / "api"

GITLAB_TOKEN = "glpat-fake-0123456789abcdef"
GITHUB_TOKEN = "ghp_fake0123456789abcdef0123456789abcdef"

# event fired per posted state, and the transitions of GitLab's CommitStatus state machine
# restricted to the states an external status can be in.
GITLAB_EVENTS = {"pending": "enqueue", "running": "run", "success": "success", "failed": "drop", "canceled": "cancel"}
GITLAB_TRANSITIONS = {
    "enqueue": {"created": "pending"},
    "run": {"pending": "running"},
    "success": {"created": "success", "pending": "success", "running": "success"},
    "drop": {"created": "failed", "pending": "failed", "running": "failed"},
    "cancel": {"created": "canceled", "pending": "canceled", "running": "canceled"},
}
GITHUB_STATES = ("pending", "success", "failure", "error")
REDACTED = "<redacted>"


@dataclass(frozen=True)
class Call:
    """One request as the fake saw it; auth header values are redacted (scheme kept)."""

    method: str
    path: str
    body: Any
    headers: Mapping[str, str]
    status: int


@dataclass
class _Fault:
    status: int
    times: int
    headers: Mapping[str, str]
    body: bytes


@dataclass
class _Answer:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def _json(status: int, data: Any, **headers: str) -> _Answer:
    return _Answer(status, json.dumps(data).encode(), {"Content-Type": "application/json", **headers})


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _FakeAPI:
    """The server, the fault queue and the call log; subclasses answer the requests."""

    auth_headers: tuple[str, ...] = ()
    default_fault_bodies: Mapping[int, bytes] = {}

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._faults: list[_Fault] = []
        self._hangs = 0
        self._lost: list[int] = []
        self.hanging = 0  # requests held by inject_hang() right now
        self._release = threading.Event()
        self._mode = "up"
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # lifecycle -------------------------------------------------------------

    def start(self) -> None:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                fake._handle(self)

            do_GET = do_PUT = do_PATCH = do_DELETE = do_POST

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> _FakeAPI:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # faults ----------------------------------------------------------------

    def inject(self, status: int, *, times: int = 1, headers: Mapping[str, str] | None = None, body: bytes | str | Any = None) -> None:
        """Answer the next `times` requests with `status` (before auth or any rule is checked)."""
        if body is None:
            raw = self.default_fault_bodies.get(status, json.dumps({"message": f"{status} fake fault"}).encode())
        elif isinstance(body, bytes):
            raw = body
        elif isinstance(body, str):
            raw = body.encode()
        else:
            raw = json.dumps(body).encode()
        with self._lock:
            self._faults.append(_Fault(status, times, dict(headers or {}), raw))

    @property
    def unused_faults(self) -> int:
        """Injected answers (errors, lost answers, hangs) not given yet."""
        with self._lock:
            return sum(f.times for f in self._faults) + len(self._lost) + self._hangs

    def inject_hang(self, *, times: int = 1) -> None:
        """The next `times` requests get no answer until `release()` (or stop), so clients time out."""
        with self._lock:
            self._hangs += times
            self._release.clear()

    def inject_lost_answer(self, status: int = 502, *, times: int = 1) -> None:
        """The next `times` requests are applied as usual, then answered `status` instead of the real answer."""
        with self._lock:
            self._lost.extend([status] * times)

    def release(self) -> None:
        self._release.set()

    def down(self, *, refuse: bool = True) -> None:
        """Go down: stop listening (connections refused) or, with refuse=False, answer 503 to all."""
        if refuse:
            self.stop()
            self._mode = "refused"
        else:
            self._mode = "503"

    def up(self) -> None:
        if self._mode == "refused":
            self._release.clear()
            self.start()
        self._mode = "up"

    # request handling ------------------------------------------------------

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        length = int(request.headers.get("Content-Length") or 0)
        raw = request.rfile.read(length) if length else b""
        body = _parse_body(raw, request.headers.get("Content-Type", ""), urlsplit(request.path).query)
        with self._lock:
            hang = self._hangs > 0
            if hang:
                self._hangs -= 1
            answer = self._fault() if not hang else None
        if hang:
            with self._lock:
                self.hanging += 1
            self._release.wait()
            with self._lock:
                self.hanging -= 1
            answer = _Answer(503, b"released")
        if answer is None and self._mode == "503":
            answer = _Answer(503, b"<html><body><h1>503 Service Unavailable</h1></body></html>", {"Content-Type": "text/html"})
        if answer is None:
            with self._lock:
                answer = self.answer(request.command, request.path, body, request.headers)
                if self._lost:
                    answer = _Answer(self._lost.pop(0), b"<html><body><h1>502 Bad Gateway</h1></body></html>",
                                     {"Content-Type": "text/html"})
        headers = {k.lower(): self._redact(k, v) for k, v in request.headers.items()}
        with self._lock:
            self.calls.append(Call(request.command, request.path, body, headers, answer.status))
        try:
            request.send_response(answer.status)
            for name, value in answer.headers.items():
                request.send_header(name, value)
            request.send_header("Content-Length", str(len(answer.body)))
            request.end_headers()
            request.wfile.write(answer.body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout test); nothing to answer

    def _fault(self) -> _Answer | None:
        if not self._faults:
            return None
        fault = self._faults[0]
        fault.times -= 1
        if fault.times <= 0:
            self._faults.pop(0)
        content_type = "application/json" if fault.body[:1] in (b"{", b"[") else "text/plain"
        return _Answer(fault.status, fault.body, {"Content-Type": content_type, **fault.headers})

    def _redact(self, name: str, value: str) -> str:
        if name.lower() not in self.auth_headers:
            return value
        scheme, _, secret = value.partition(" ")
        return f"{scheme} {REDACTED}" if secret else REDACTED

    def answer(self, method: str, path: str, body: Any, headers: Any) -> _Answer:
        raise NotImplementedError


def _parse_body(raw: bytes, content_type: str, query: str) -> Any:
    params: dict[str, Any] = dict(parse_qsl(query))
    if not raw:
        return params
    if "json" in content_type:
        try:
            data = json.loads(raw)
        except ValueError:
            return raw.decode(errors="replace")
        return {**params, **data} if isinstance(data, dict) else data
    if "x-www-form-urlencoded" in content_type:
        return {**params, **dict(parse_qsl(raw.decode()))}
    return raw.decode(errors="replace")


class FakeGitLab(_FakeAPI):
    """GitLab API v4 `POST /projects/:id/statuses/:sha` with its commit-status state machine."""

    auth_headers = ("private-token", "authorization")
    default_fault_bodies = {
        409: json.dumps({"message": "Another update to this commit status is in progress"}).encode(),
        429: b"Retry later",
        500: json.dumps({"message": "500 Internal Server Error"}).encode(),
    }

    def __init__(self, *, token: str = GITLAB_TOKEN, projects: Mapping[int, str] | None = None, default_ref: str = "main") -> None:
        super().__init__()
        self.token = token
        self.projects = dict(projects or {42: "acme/shop-api", 7: "group/sub/project"})
        self.default_ref = default_ref
        self.objects: list[dict[str, Any]] = []  # every commit-status object, in creation order
        self._accepted: dict[tuple[int, str, str, str], list[str]] = {}
        self._ids = itertools.count(1001)
        self._pipelines: dict[tuple[int, str, str], int] = {}

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/api/v4"

    def statuses(self, sha: str, *, project: int | None = None) -> dict[tuple[str, str], list[str]]:
        """Accepted states per (name, ref) for a commit, in the order they were accepted."""
        with self._lock:
            found: dict[tuple[str, str], list[str]] = {}
            for (pid, s, name, ref), states in self._accepted.items():
                if s == sha and project in (None, pid):
                    found.setdefault((name, ref), []).extend(states)
            return found

    def all_states(self) -> tuple[dict[tuple[str, str], list[str]], dict[tuple[str, str], str]]:
        """({(sha, name): accepted states in order}, {(sha, name): latest description}) for every commit at once."""
        with self._lock:
            states: dict[tuple[str, str], list[str]] = {}
            for (_, sha, name, _), accepted in self._accepted.items():
                states.setdefault((sha, name), []).extend(accepted)
            described = {(o["sha"], o["name"]): o.get("description") or "" for o in self.objects}
            return states, described

    def states(self, sha: str, name: str) -> list[str]:
        return [state for (n, _), states in self.statuses(sha).items() if n == name for state in states]

    def answer(self, method: str, path: str, body: Any, headers: Any) -> _Answer:
        parts = urlsplit(path).path.split("/")
        # ['', 'api', 'v4', 'projects', '<id>', 'statuses', '<sha>']
        if method != "POST" or len(parts) != 7 or parts[1:4] != ["api", "v4", "projects"] or parts[5] != "statuses":
            return _json(404, {"error": "404 Not Found"})
        if headers.get("PRIVATE-TOKEN") != self.token:
            return _Answer(401, (CORPUS / "commit-status-401-unauthorized.json").read_bytes(), {"Content-Type": "application/json"})
        if not isinstance(body, dict):
            return _json(400, {"error": "The provided content-type '' is not supported."})
        state = body.get("state")
        if not state:
            return _json(400, {"error": "state is missing"})
        if state not in GITLAB_EVENTS:
            return _json(400, {"error": "state does not have a valid value"})
        project = self._project(unquote(parts[4]))
        if project is None:
            return _Answer(404, (CORPUS / "commit-status-404-project-not-found.json").read_bytes(), {"Content-Type": "application/json"})
        sha, name, ref = parts[6], body.get("name") or body.get("context") or "default", body.get("ref") or self.default_ref
        key = (project, sha, name, ref)
        current = next((o for o in reversed(self.objects) if o["_key"] == key and o["status"] in ("pending", "running")), None)
        obj = current or self._new_object(key)
        status = obj["status"]
        if state == "running" and status == "created":
            status = "pending"  # `job.enqueue` without a bang: silently does nothing when it cannot
        event = GITLAB_EVENTS[state]
        after = GITLAB_TRANSITIONS[event].get(status)
        if after is None:
            message = f'Cannot transition status via :{event} from :{status} (Reason(s): Status cannot transition via "{event}")'
            return _json(400, {"message": message})
        now = _now()
        obj.update(status=after, description=body.get("description"), target_url=body.get("target_url"))
        if after == "running":
            obj["started_at"] = now
        if after in ("success", "failed", "canceled"):
            obj["finished_at"] = now
        if current is None:
            self.objects.append(obj)
        self._accepted.setdefault(key, []).append(state)
        return _json(201, {k: v for k, v in obj.items() if not k.startswith("_")})

    def _project(self, ident: str) -> int | None:
        if ident.isdigit():
            return int(ident) if int(ident) in self.projects else None
        return next((pid for pid, path in self.projects.items() if path == ident), None)

    def _new_object(self, key: tuple[int, str, str, str]) -> dict[str, Any]:
        project, sha, name, ref = key
        pipeline = self._pipelines.setdefault((project, sha, ref), 15000 + len(self._pipelines))
        return {
            "_key": key,
            "id": next(self._ids),
            "sha": sha,
            "ref": ref,
            "status": "created",
            "name": name,
            "target_url": None,
            "description": None,
            "created_at": _now(),
            "started_at": None,
            "finished_at": None,
            "allow_failure": False,
            "coverage": None,
            "pipeline_id": pipeline,
            "author": {"id": 7, "name": "CI Bot", "username": "ci-bot", "state": "active", "avatar_url": None, "web_url": "http://gitlab.example.com/ci-bot"},
        }


class FakeGitHub(_FakeAPI):
    """GitHub REST `POST /repos/:owner/:repo/statuses/:sha`: a history per (sha, context), no transitions."""

    auth_headers = ("authorization",)
    default_fault_bodies = {
        500: json.dumps({"message": "Server Error"}).encode(),
        502: b"<html><body><h1>502 Bad Gateway</h1></body></html>",
    }
    docs = "https://docs.github.com/rest/commits/statuses#create-a-commit-status"

    def __init__(self, *, token: str = GITHUB_TOKEN, repos: tuple[str, ...] = ("acme/shop-api",), max_statuses: int = 1000) -> None:
        super().__init__()
        self.token = token
        self.repos = set(repos)
        self.max_statuses = max_statuses
        self._history: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        self._ids = itertools.count(5001)

    @property
    def api_url(self) -> str:
        return self.base_url

    def statuses(self, sha: str) -> dict[str, list[str]]:
        """Accepted states per context for a commit, oldest first."""
        with self._lock:
            found: dict[str, list[str]] = {}
            for (_, s, context), history in self._history.items():
                if s == sha:
                    found.setdefault(context, []).extend(h["state"] for h in history)
            return found

    def states(self, sha: str, name: str) -> list[str]:
        return self.statuses(sha).get(name, [])

    def history(self, sha: str, context: str) -> list[dict[str, Any]]:
        with self._lock:
            return [h for (_, s, c), hs in self._history.items() if s == sha and c == context for h in hs]

    def answer(self, method: str, path: str, body: Any, headers: Any) -> _Answer:
        parts = urlsplit(path).path.split("/")
        # ['', 'repos', '<owner>', '<repo>', 'statuses', '<sha>']
        if method != "POST" or len(parts) != 6 or parts[1] != "repos" or parts[4] != "statuses":
            return self._error(404, "Not Found")
        scheme, _, token = (headers.get("Authorization") or "").partition(" ")
        if scheme.lower() not in ("bearer", "token") or token != self.token:
            return self._error(401, "Bad credentials", docs="https://docs.github.com/rest")
        repo = f"{unquote(parts[2])}/{unquote(parts[3])}"
        if repo not in self.repos:
            return self._error(404, "Not Found")
        if not isinstance(body, dict):
            return self._error(400, "Problems parsing JSON")
        state = body.get("state")
        if state not in GITHUB_STATES:
            return self._invalid("state", "missing_field" if state is None else "invalid", "state is not included in the list")
        description = body.get("description")
        if isinstance(description, str) and len(description) > 140:
            return self._invalid("description", "custom", "description is too long (maximum is 140 characters)")
        sha, context = parts[5], body.get("context") or "default"
        history = self._history.setdefault((repo, sha, context), [])
        if len(history) >= self.max_statuses:
            return self._invalid(None, "custom", "This SHA and context has reached the maximum number of statuses.")
        ident = next(self._ids)
        status = {
            "url": f"{self.base_url}/repos/{repo}/statuses/{sha}",
            "avatar_url": None,
            "id": ident,
            "node_id": f"SC_fake{ident}",
            "state": state,
            "description": description,
            "target_url": body.get("target_url"),
            "context": context,
            "created_at": _now(),
            "updated_at": _now(),
            "creator": {"login": "ci-bot", "id": 1, "type": "User"},
        }
        history.append(status)
        return _json(201, status)

    def _error(self, status: int, message: str, *, docs: str | None = None) -> _Answer:
        return _json(status, {"message": message, "documentation_url": docs or self.docs, "status": str(status)})

    def _invalid(self, field_name: str | None, code: str, message: str) -> _Answer:
        error: dict[str, Any] = {"resource": "Status", "code": code, "message": message}
        if field_name:
            error["field"] = field_name
        return _json(422, {"message": "Validation Failed", "errors": [error], "documentation_url": self.docs, "status": "422"})


@pytest.fixture
def fake_gitlab() -> Iterator[FakeGitLab]:
    """A fake GitLab on a free port: projects 42 acme/shop-api and 7 group/sub/project, token GITLAB_TOKEN."""
    fake = FakeGitLab()
    with fake:
        yield fake


@pytest.fixture
def fake_github() -> Iterator[FakeGitHub]:
    """A fake GitHub on a free port: repo acme/shop-api, token GITHUB_TOKEN."""
    fake = FakeGitHub()
    with fake:
        yield fake
