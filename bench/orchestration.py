"""Orchestration benchmark: webhook -> PipelineRun, and the watcher following many runs to their end.

Real `cibroker serve`, `cibroker worker --concurrency 2` and `cibroker watcher` processes,
a real redis-server (AOF everysec), against the in-process fakes the end-to-end tests use:
FakeKubeAPI (tests/fakes/kube_api.py) moved by TektonSimulator (tests/fakes/tekton.py) and
FakeGitLab (tests/fakes/githost_api.py). Two parts, each on fresh fakes, a flushed Redis and
fresh processes:

  1 create    webhooks at --rate/s for --duration s (distinct branches): webhook answered 202
              (client, monotonic) -> PipelineRun stored by the fake API (its change hook).
              Baseline: the same objects POSTed straight to the fake API with the official
              kubernetes client from this process (request sent -> stored).
  2 lifecycle --runs PipelineRuns made through the broker (webhooks), then all moved to Running
              and finished (Succeeded) at --step-rate/s by the simulator. Measured: open watch
              connections, API requests per run beyond the watch (by kind, from the fake's
              request log), the watcher's RSS, and Succeeded written -> `success` status received
              by the fake GitLab. Baseline: a bare watch (official client, raw stream, same
              namespace and selector) in this process: Succeeded written -> event seen.

Every push is of a real commit: a `file://` origin made with one `git fast-import`, whose branch is moved to
the commit before the webhook goes out, so each worker pays its one `git ls-remote` (issue 11).

Targets are printed, never asserted. See bench/README.md ("Orchestration benchmark").

    .venv/bin/python bench/orchestration.py [--quick] [--out bench/results/x.json]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import hashlib
import itertools
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))  # tests.support.fakes, broker, config

import httpx
import kubernetes
import redis
from ingest import (
    Children,
    Redis,
    SetupError,
    _interrupt,
    _run_text,
    cpu_seconds,
    flush,
    group_members,
    free_port,
    machine,
    tail,
)

from broker.core import pipelinerun as pr
from tests.support.fakes.githost_api import GITLAB_TOKEN, FakeGitLab
from tests.support.fakes.kube_api import FakeKubeAPI, Request
from tests.support.fakes.kube_store import Change
from tests.support.fakes.rollout import seed_service_account
from tests.support.fakes.tekton import TektonSimulator, condition
from tests.support import GitOrigin

SECRET = "bench-webhook-secret"
NAMESPACE = "ci"
BASELINE_NAMESPACE = "bench-baseline"  # part 1's direct creates: a namespace the watcher does not follow
# The bare watch selects exactly what the watcher does (managed-by=cibroker), spelled differently so the
# fake's open watches can be told apart by selector.
BASELINE_SELECTOR = "app.kubernetes.io/managed-by in (cibroker)"
STATUS_NAME = "cibroker/build-test-push"
PROJECT_ID = 42
REPO = "acme/shop-api"
TEKTON_VERSION = "v1"
ROUTING = """\
# Written by bench/orchestration.py: one GitLab host, one route for every branch, NO deploy entries.
defaults: {{namespace: {namespace}, service_account: pipeline-bot, status_name: "cibroker/{{pipeline}}",
           target_url: "https://tekton.example.com/#/namespaces/{{namespace}}/pipelineruns/{{name}}"}}
hosts:
  gitlab:
    kind: gitlab
    api_url: {api_url}
    token: {{env: GITLAB_API_TOKEN}}
    webhook_secrets: [{{env: GITLAB_WEBHOOK_SECRET}}]
routes:
  - name: shop-api
    host: gitlab
    repo: {repo}
    clone_url: {clone_url}
    events: {{branches: ["**"]}}
    pipeline: build-test-push
    image: registry.example.com/{repo}
"""
TARGETS = {  # stated, not asserted
    "created_p99_ms": 250.0,
    "requests_per_run": 4.0,
    "status_p99_ms": 1000.0,
    "watcher_rss_mb": 150.0,
}


# --------------------------------------------------------------------------- small helpers


def pct(values: Iterable[float], q: float) -> float | None:
    """Percentile with linear interpolation between closest ranks (numpy's default)."""
    s = sorted(values)
    if not s:
        return None
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary_ms(seconds: list[float]) -> dict[str, Any]:
    ms = [x * 1000 for x in seconds]
    if not ms:
        return {"n": 0}
    return {"n": len(ms), "min": round(min(ms), 2), "p50": round(pct(ms, 50) or 0, 2), "p90": round(pct(ms, 90) or 0, 2),
            "p99": round(pct(ms, 99) or 0, 2), "max": round(max(ms), 2), "mean": round(sum(ms) / len(ms), 2)}


def proc_status_kb(pid: int, field_name: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def group_rss_kb(pgid: int) -> int:
    """VmRSS summed over a process group (a Celery worker and its pool children)."""
    return sum(proc_status_kb(pid, "VmRSS") or 0 for pid, _ in group_members(pgid))


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("cibroker", "celery", "kombu", "kubernetes", "urllib3", "redis", "httpx", "uvicorn", "starlette", "uvloop"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    server = _run_text(["redis-server", "--version"])
    out["redis-server"] = next((p[2:] for p in server.split() if p.startswith("v=")), server)
    rev = _run_text(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = _run_text(["git", "-C", str(ROOT), "status", "--porcelain", "--", "broker", "workers", "config"])
    out["git"] = (rev if len(rev) < 20 and " " not in rev else "no commit") + (
        " (uncommitted changes in broker/ workers/ config/)" if dirty else "")
    for source in ("broker/services/runs.py", "workers/watcher.py", "workers/tasks.py", "workers/adapters/kube.py"):
        with contextlib.suppress(OSError):  # which code was measured, even when it was not committed
            out[f"sha256 {source}"] = hashlib.sha256((ROOT / source).read_bytes()).hexdigest()[:12]
    return out


def push_body(*, sha: str, branch: str) -> bytes:
    """A GitLab push of one commit to a new branch (the corpus push, like tests/e2e/test_e2e_orchestration.py)."""
    data = json.loads((ROOT / "tests" / "fixtures" / "corpus" / "gitlab" / "push-branch-update.json").read_text())
    data.update(ref=f"refs/heads/{branch}", before="0" * 40, after=sha, checkout_sha=sha, project_id=PROJECT_ID)
    data["object_kind"] = "push"
    data["project"].update(path_with_namespace=REPO, id=PROJECT_ID)
    data["commits"] = [{"id": sha, "message": "change\n"}]
    return json.dumps(data, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- the fakes, instrumented from outside


class TimedGitLab(FakeGitLab):
    """FakeGitLab that also notes when (monotonic) each commit status POST was answered, and how."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.posts: list[tuple[float, str, str, str, int]] = []  # (t, sha, state, name, http status)

    def answer(self, method: str, path: str, body: Any, headers: Any) -> Any:
        got = super().answer(method, path, body, headers)  # called under the fake's lock
        if method == "POST" and isinstance(body, dict):
            self.posts.append((time.monotonic(), urlsplit(path).path.rsplit("/", 1)[-1], str(body.get("state")),
                               str(body.get("name")), got.status))
        return got

    def first(self, state: str, name: str = STATUS_NAME) -> dict[str, float]:
        """sha -> when the first accepted (201) `state` status for it arrived."""
        out: dict[str, float] = {}
        for t, sha, s, n, code in list(self.posts):
            if s == state and n == name and code == 201:
                out.setdefault(sha, t)
        return out

    def count(self, state: str) -> int:
        return len(self.first(state))


class KubeRecorder:
    """A FakeKubeAPI change listener (runs in the writer's thread, right after the commit): when each
    PipelineRun was stored, went Running, and went Succeeded, keyed by (namespace, name)."""

    def __init__(self, api: FakeKubeAPI) -> None:
        self.created: dict[tuple[str, str], float] = {}
        self.running: dict[tuple[str, str], float] = {}
        self.completed: dict[tuple[str, str], float] = {}
        self.sha: dict[tuple[str, str], str] = {}
        api.on_change(self._on_change)

    def _on_change(self, change: Change) -> None:
        t = time.monotonic()
        if change.plural != "pipelineruns" or change.type == "DELETED":
            return
        meta = change.new["metadata"]
        key = (change.namespace, meta["name"])
        if change.type == "ADDED":
            self.sha[key] = (meta.get("labels") or {}).get(pr.L_SHA, "")  # before `created`: readers look it up by that
            self.created.setdefault(key, t)
        old, new = condition(change.old or {}), condition(change.new)
        if new.get("reason") == "Running" and old.get("reason") != "Running":
            self.running.setdefault(key, t)
        if new.get("status") == "True" and old.get("status") != "True":
            self.completed.setdefault(key, t)

    def in_namespace(self, table: dict[tuple[str, str], float], namespace: str) -> dict[str, float]:
        return {name: t for (ns, name), t in list(table.items()) if ns == namespace}


_TASK_DONE = re.compile(r"Task (\S+)\[[^\]]+\] succeeded in ([0-9.e-]+)s")
_PATH = re.compile(r"^/(?:api/v1|apis/[^/]+/[^/]+)/namespaces/(?P<ns>[^/]+)/(?P<plural>[^/]+)"
                   r"(?:/(?P<name>[^/]+)(?:/(?P<sub>[^/]+))?)?/?$")


def classify(req: Request) -> tuple[str, str]:
    """(namespace, what) for one logged request, naming the code path that makes it where it is unambiguous."""
    m = _PATH.match(req.path)
    if not m:
        return "", f"{req.method} {req.path}"
    plural, named, sub = m["plural"], m["name"] is not None, m["sub"]
    if req.method == "GET":
        if req.is_watch:
            return m["ns"], f"watch {plural}"
        verb = "get" if named else "list"
    else:
        verb = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}.get(req.method, req.method)
    what = f"{verb} {plural}" + (f"/{sub}" if sub else "")
    selector = req.query.get("labelSelector", "")
    if plural == "pipelineruns" and verb == "create":
        what += " (Orchestrator._start_route -> create_pipelinerun)"
    elif plural == "pipelineruns" and verb == "list":
        what += (" route+ref-hash selector (Orchestrator._supersede)" if pr.L_REF_HASH in selector
                 else " managed-by selector (Watcher.resync)")
    elif plural == "pipelineruns" and verb == "patch" and isinstance(req.body, dict):
        annotations = (req.body.get("metadata") or {}).get("annotations") or {}
        if (req.body.get("spec") or {}).get("status"):
            what += " spec.status (Orchestrator._cancel)"
        elif pr.A_REPORTED in annotations:
            what += f" reported={annotations[pr.A_REPORTED]} (Orchestrator.observe)"
    elif plural == "pipelineruns" and verb == "get":
        what += " (create_pipelinerun after AlreadyExists)"
    elif plural == "serviceaccounts" and verb == "get":
        what += " (Orchestrator._preflight)"
    elif plural == "taskruns" and verb == "list":
        what += " (Orchestrator.observe, failed runs)"
    return m["ns"], what


def request_breakdown(requests: list[Request], namespace: str) -> tuple[Counter[str], int, int]:
    """Non-watch requests in `namespace` by kind, their total, and the number of watch requests."""
    kinds: Counter[str] = Counter()
    watches = 0
    for req in requests:
        ns, what = classify(req)
        if ns != namespace:
            continue
        if req.is_watch:
            watches += 1
            continue
        kinds[what] += 1
    return kinds, sum(kinds.values()), watches


# --------------------------------------------------------------------------- one stack: fakes + processes


class Stack:
    """Fresh fakes and the three cibroker processes for one part of the benchmark."""

    def __init__(self, name: str, children: Children, tmp: Path, redis_url: str, *, commits: int) -> None:
        self.name, self.children, self.tmp = name, children, tmp
        # The Git host's repository (file://): every push's commit is real, and its branch is moved to it before the
        # webhook goes out, so each worker confirms it with one `git ls-remote` of the branch, as in production.
        self.origin = GitOrigin.create(tmp / f"{name}-origin.git", commits=commits)
        self.api = FakeKubeAPI(bookmark_interval=1.0).start()  # default history_limit (1000 changes)
        self.recorder = KubeRecorder(self.api)
        self.gitlab = TimedGitLab(projects={PROJECT_ID: REPO})
        self.gitlab.start()
        seed_service_account(self.api, namespace=NAMESPACE, name="pipeline-bot")
        self.kubeconfig = tmp / f"{name}-kubeconfig"
        self.kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.api.url}}],
            "users": [{"name": "fake", "user": {"token": "fake-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
        }))
        self.routing = tmp / f"{name}-routing.yaml"
        self.routing.write_text(ROUTING.format(namespace=NAMESPACE, api_url=self.gitlab.api_url, repo=REPO,
                                               clone_url=self.origin.url))
        base = {k: v for k, v in os.environ.items() if not k.startswith(("CIBROKER_", "GITLAB_", "GITHUB_", "GITEA_", "KUBE"))}
        self.env = {**base, "CIBROKER_REDIS_URL": redis_url, "KUBECONFIG": str(self.kubeconfig),
                    "GITLAB_API_TOKEN": GITLAB_TOKEN, "GITLAB_WEBHOOK_SECRET": SECRET, "CIBROKER_LOG_FORMAT": "json",
                    "CIBROKER_STATE_DIR": str(tmp / f"{name}-state"), "CIBROKER_SIGNING_KEY": "bench-signing-key-" + "0" * 32}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}
        self._files: list[Any] = []

    def start(self) -> None:
        cibroker = str(Path(sys.executable).with_name("cibroker"))
        roles = {"serve": ["serve", "--port", str(self.port)], "worker": ["worker", "--concurrency", "2"],
                 "watcher": ["watcher"]}
        for role, args in roles.items():
            log = self.tmp / f"{self.name}-{role}.log"
            handle = open(log, "wb")  # noqa: SIM115 (closed in stop)
            self._files.append(handle)
            self.logs[role] = log
            self.procs[role] = self.children.start([cibroker, *args, "--config", str(self.routing)], env=self.env, stderr=handle)
        self.wait("serve /readyz", self._ready, 60)
        self.wait("the watcher's watch", lambda: self.watcher_watches() >= 1, 60)

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/readyz", timeout=2, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    def watcher_watches(self) -> int:
        return sum(1 for w in self.api.store.watchers() if w.selector != BASELINE_SELECTOR)

    def check_alive(self) -> None:
        for role, proc in self.procs.items():
            if proc.poll() is not None:
                raise SetupError(f"cibroker {role} exited with {proc.returncode}:\n{tail(self.logs[role], 3000)}")

    def wait(self, what: str, check: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
        """Poll `check` until true (True) or the timeout (False); a dead process is a SetupError.
        Costly checks poll slowly: this process also runs the fakes, so polling competes with what is measured."""
        deadline = time.monotonic() + timeout
        while not check():
            self.check_alive()
            if time.monotonic() > deadline:
                print(f"  note: timed out after {timeout:.0f} s waiting for {what}", flush=True)
                return False
            time.sleep(interval)
        return True

    def cpu(self, redis_pid: int) -> dict[str, float]:
        """CPU seconds so far of each process group (a Celery worker with its pool), redis-server and this process."""
        out = {role: cpu_seconds(proc.pid) for role, proc in self.procs.items()}
        out["redis-server"] = cpu_seconds(redis_pid)
        me = resource.getrusage(resource.RUSAGE_SELF)
        out["bench process (fakes, simulator, clients)"] = me.ru_utime + me.ru_stime
        return out

    def queue_length(self, client: redis.Redis) -> int:
        return int(client.llen("cibroker"))

    def stop(self, keep_logs: Path | None = None) -> None:
        for proc in self.procs.values():
            self.children.stop(proc)
        for handle in self._files:
            handle.close()
        self.api.stop()
        self.gitlab.stop()
        if keep_logs is not None:
            keep_logs.mkdir(parents=True, exist_ok=True)
            for log in self.logs.values():
                with contextlib.suppress(OSError):
                    shutil.copy(log, keep_logs / log.name)

    def task_times(self) -> dict[str, dict[str, Any]]:
        """Celery's own "Task <name>[id] succeeded in <s>s" lines from the worker log: run time per task name."""
        times: dict[str, list[float]] = {}
        for match in _TASK_DONE.finditer(tail(self.logs["worker"], 50_000_000)):
            times.setdefault(match[1], []).append(float(match[2]))
        return {name: summary_ms(values) for name, values in times.items()}

    def stderr_notes(self) -> dict[str, str]:
        """Warnings and errors the processes logged (JSON lines at level warning or above, and tracebacks)."""
        out = {}
        for role, log in self.logs.items():
            bad = [ln for ln in tail(log, 400_000).splitlines()
                   if '"level": "warning"' in ln or '"level": "error"' in ln or '"level":"warning"' in ln
                   or '"level":"error"' in ln or "Traceback" in ln or "ERROR/" in ln or "WARNING/" in ln]
            if bad:
                out[role] = "\n".join(bad[-8:])
        return out


class Pusher:
    """Open-loop webhook sender: request i goes out at t0 + i/rate whatever the answers do."""

    def __init__(self, url: str, origin: GitOrigin) -> None:
        self.origin, self.pushed = origin, 0
        self.client = httpx.Client(base_url=url, timeout=30, trust_env=False,
                                   limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))
        self.pool = ThreadPoolExecutor(32, thread_name_prefix="push")

    def one(self, tag: str, branch: str, sha: str) -> dict[str, Any]:
        body = push_body(sha=sha, branch=branch)
        self.origin.move(branch, sha)  # `git push`, then its webhook
        sent = time.monotonic()
        try:
            answer = self.client.post("/hooks/gitlab", content=body, headers={
                "Content-Type": "application/json", "X-Gitlab-Event": "Push Hook", "X-Gitlab-Token": SECRET,
                "Idempotency-Key": f"bench-{tag}"})
            status, text = answer.status_code, answer.text[:300]
        except httpx.HTTPError as exc:
            status, text = 0, f"{type(exc).__name__}: {exc}"
        return {"tag": tag, "sha": sha, "branch": branch, "sent": sent, "accepted": time.monotonic(), "status": status,
                "answer": text if status != 202 else ""}

    def run(self, tags: list[tuple[str, str]], rate: float) -> tuple[list[dict[str, Any]], float]:
        futures: list[Future[dict[str, Any]]] = []
        t0 = time.monotonic()
        for i, (tag, branch) in enumerate(tags):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self.pushed += 1
            futures.append(self.pool.submit(self.one, tag, branch, self.origin.sha(self.pushed)))
        spent = time.monotonic() - t0
        return [f.result() for f in futures], spent

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.client.close()


class GcPauses:
    """Garbage-collector pauses of this process, which also runs the fakes: a long one stalls the fake API and
    fake GitLab (and the bare watch) and shows up in every latency measured here, broker and baseline alike."""

    def __init__(self) -> None:
        self.pauses: list[tuple[float, float, int]] = []  # (start, seconds, generation)
        self._start: float | None = None
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.monotonic()
        elif self._start is not None:
            self.pauses.append((self._start, time.monotonic() - self._start, int(info.get("generation", -1))))
            self._start = None

    def between(self, start: float, end: float) -> dict[str, Any]:
        inside = [(t, d, g) for t, d, g in list(self.pauses) if start <= t <= end]
        return {"collections": len(inside), "over_10ms": sum(1 for _, d, _ in inside if d > 0.01),
                "max_ms": round(max((d for _, d, _ in inside), default=0) * 1000, 1),
                "total_ms": round(sum(d for _, d, _ in inside) * 1000, 1)}


GC = GcPauses()


def cpu_per_run(marks: dict[str, dict[str, float]], order: list[str], runs: int) -> dict[str, dict[str, float]]:
    """CPU milliseconds per run of each process, between consecutive marks (phases)."""
    out: dict[str, dict[str, float]] = {}
    for a, b in itertools.pairwise(order):
        if a in marks and b in marks:
            out[f"{a}->{b}"] = {k: round((marks[b][k] - marks[a][k]) * 1000 / max(runs, 1), 3) for k in marks[b]}
    return out


def paced(items: list[Any], rate: float, fn: Callable[[Any], Any]) -> float:
    """Call fn(item) in this thread at `rate` per second (no catching up beyond the schedule); returns seconds spent."""
    t0 = time.monotonic()
    for i, item in enumerate(items):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        fn(item)
    return time.monotonic() - t0


def official_client(kubeconfig: Path) -> kubernetes.client.CustomObjectsApi:
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration, persist_config=False)
    configuration.connection_pool_maxsize = 32
    return kubernetes.client.CustomObjectsApi(kubernetes.client.ApiClient(configuration))


class BareWatch(threading.Thread):
    """The floor for "completion -> observed": the official client's raw watch stream (as workers/adapters/kube.py reads
    it) on the watcher's namespace and selection, noting when each run's Succeeded event arrives."""

    def __init__(self, kubeconfig: Path, resource_version: str) -> None:
        super().__init__(name="bare-watch", daemon=True)
        self.custom = official_client(kubeconfig)
        self.resource_version = resource_version
        self.seen: dict[str, float] = {}
        self.events = 0
        self.error: str | None = None

    def run(self) -> None:
        try:
            response = self.custom.list_namespaced_custom_object(
                "tekton.dev", TEKTON_VERSION, NAMESPACE, "pipelineruns", label_selector=BASELINE_SELECTOR, watch=True,
                resource_version=self.resource_version, allow_watch_bookmarks=True, timeout_seconds=3600,
                _preload_content=False, _request_timeout=(5, 3700))
            for line in response:
                if not line.strip():
                    continue
                t = time.monotonic()
                event = json.loads(line)
                self.events += 1
                obj = event.get("object") or {}
                if event.get("type") in ("ADDED", "MODIFIED") and condition(obj).get("status") == "True":
                    self.seen.setdefault(obj["metadata"]["name"], t)
        except Exception as exc:  # noqa: BLE001 (ends with the fake server; a real failure shows as missing events)
            self.error = f"{type(exc).__name__}: {exc}"


class Sampler(threading.Thread):
    """Every `interval` s: open watches on the fake (all, and the watcher's), watcher VmRSS, worker group RSS,
    tasks waiting on the Celery queue."""

    def __init__(self, stack: Stack, client: redis.Redis, interval: float = 0.25) -> None:
        super().__init__(name="sampler", daemon=True)
        self.stack, self.client, self.interval = stack, client, interval
        self.samples: list[dict[str, Any]] = []
        self.stop_event = threading.Event()
        self.phase = "start"

    def run(self) -> None:
        watcher, worker = self.stack.procs["watcher"].pid, self.stack.procs["worker"].pid
        while not self.stop_event.is_set():
            self.samples.append({"t": time.monotonic(), "phase": self.phase, "open_watches": self.stack.api.open_watches,
                                 "watcher_watches": self.stack.watcher_watches(),
                                 "watcher_rss_kb": proc_status_kb(watcher, "VmRSS"), "worker_rss_kb": group_rss_kb(worker),
                                 "queue": self.stack.queue_length(self.client)})
            self.stop_event.wait(self.interval)


# --------------------------------------------------------------------------- part 1: webhook -> PipelineRun


def part_create(children: Children, tmp: Path, store: Redis, client: redis.Redis, *, rate: float, duration: float,
                warmup: int, keep_logs: Path | None) -> dict[str, Any]:
    flush(client)
    assert store.proc is not None
    redis_pid = store.proc.pid
    stack = Stack("create", children, tmp, store.url, commits=warmup + int(rate * duration))
    pusher: Pusher | None = None
    try:
        stack.start()
        pusher = Pusher(stack.url, stack.origin)
        # Warm-up: a few pushes, so both pool processes have imported everything and opened their connections.
        pusher.run([(f"warm-{i}", f"bench/warm-{i}") for i in range(warmup)], rate=rate)
        stack.wait("warm-up runs", lambda: len(stack.recorder.in_namespace(stack.recorder.created, NAMESPACE)) >= warmup, 60)
        stack.wait("warm-up pending statuses", lambda: stack.gitlab.count("pending") >= warmup, 60)
        mark = len(stack.api.requests)
        n = int(rate * duration)
        print(f"  part 1: {n} webhooks at {rate:g}/s (distinct branches) ...", flush=True)
        tags = [(f"c{i:05d}", f"bench/c{i:05d}") for i in range(n)]
        broker_window = [time.monotonic(), 0.0]
        cpu_marks = {"start": stack.cpu(redis_pid)}
        pushes, spent = pusher.run(tags, rate=rate)
        accepted = [p for p in pushes if p["status"] == 202]
        shas = {p["sha"] for p in accepted}

        def created_shas() -> set[str]:
            created = stack.recorder.in_namespace(stack.recorder.created, NAMESPACE)
            return {stack.recorder.sha[(NAMESPACE, name)] for name in created} & shas

        complete = stack.wait("every accepted push's PipelineRun", lambda: len(created_shas()) >= len(shas), 120, interval=0.2)
        stack.wait("the queue to drain", lambda: stack.queue_length(client) == 0, 60)
        stack.wait("the pending statuses", lambda: len(set(stack.gitlab.first("pending")) & shas) >= len(shas), 60, interval=0.2)
        broker_requests = list(stack.api.requests[mark:])
        broker_window[1] = time.monotonic()
        cpu_marks["end"] = stack.cpu(redis_pid)
        created_at = {stack.recorder.sha[(NAMESPACE, name)]: t
                      for name, t in stack.recorder.in_namespace(stack.recorder.created, NAMESPACE).items()}
        pending_at = stack.gitlab.first("pending")
        for p in pushes:
            p["created"] = created_at.get(p["sha"])
            p["pending_posted"] = pending_at.get(p["sha"])
        latencies = [p["created"] - p["accepted"] for p in accepted if p["created"] is not None]
        accept_rtt = [p["accepted"] - p["sent"] for p in accepted]
        to_pending = [p["pending_posted"] - p["accepted"] for p in accepted if p["pending_posted"] is not None]

        # Baseline: the same objects, POSTed straight to the fake API by the official client at the same rate.
        print(f"  part 1 baseline: the same {len(accepted)} objects created directly at {rate:g}/s ...", flush=True)
        objects = []
        for name in sorted(stack.recorder.in_namespace(stack.recorder.created, NAMESPACE)):
            obj = stack.api.get("pipelineruns", NAMESPACE, name)
            if obj is None or obj["metadata"].get("labels", {}).get(pr.L_SHA) not in shas:
                continue
            meta = obj["metadata"]
            objects.append({"apiVersion": obj["apiVersion"], "kind": obj["kind"], "spec": obj["spec"], "metadata": {
                "name": meta["name"], "namespace": BASELINE_NAMESPACE, "labels": meta.get("labels") or {},
                "annotations": {**(meta.get("annotations") or {}), pr.A_REPORTED: "pending"}}})
        custom = official_client(stack.kubeconfig)
        direct: list[dict[str, Any]] = []
        lock = threading.Lock()

        def create(obj: dict[str, Any]) -> None:
            sent = time.monotonic()
            try:
                answer = custom.create_namespaced_custom_object(
                    "tekton.dev", TEKTON_VERSION, BASELINE_NAMESPACE, "pipelineruns", obj, field_manager="cibroker",
                    _preload_content=False, _request_timeout=(5, 30))
                answer.data  # noqa: B018 (read the body, as the broker's adapter does)
                status = answer.status
            except kubernetes.client.exceptions.ApiException as exc:
                status = exc.status or 0
            with lock:
                direct.append({"name": obj["metadata"]["name"], "sent": sent, "answered": time.monotonic(), "status": status})

        baseline_window = [time.monotonic(), 0.0]
        with ThreadPoolExecutor(32, thread_name_prefix="direct") as pool:
            paced(objects, rate, lambda obj: pool.submit(create, obj))
        baseline_window[1] = time.monotonic()
        stored = stack.recorder.in_namespace(stack.recorder.created, BASELINE_NAMESPACE)
        for d in direct:
            d["stored"] = stored.get(d["name"])
        base_stored = [d["stored"] - d["sent"] for d in direct if d["stored"] is not None]
        base_rtt = [d["answered"] - d["sent"] for d in direct if d["status"] == 201]
        kinds, total, watches = request_breakdown(broker_requests, NAMESPACE)
        problems = []
        if len(accepted) != n:
            statuses = Counter(p["status"] for p in pushes)
            problems.append(f"{n - len(accepted)} of {n} webhooks not answered 202: {dict(statuses)}; first: "
                            f"{next((p['answer'] for p in pushes if p['status'] != 202), '')}")
        if len(latencies) != len(accepted):
            problems.append(f"{len(accepted) - len(latencies)} accepted pushes never got their PipelineRun")
        if len(base_stored) != len(objects):
            problems.append(f"baseline: {len(objects) - len(base_stored)} direct creates not stored")
        return {
            "pushes_sent": n, "rate_per_s": rate, "send_seconds": round(spent, 3), "accepted": len(accepted),
            "complete": complete and not problems, "problems": problems,
            "accepted_to_created_ms": summary_ms(latencies),
            "webhook_round_trip_ms": summary_ms(accept_rtt),
            "accepted_to_pending_posted_ms": summary_ms(to_pending),
            "baseline_direct_create": {"sent_to_stored_ms": summary_ms(base_stored), "round_trip_ms": summary_ms(base_rtt),
                                       "objects": len(objects), "created_201": sum(1 for d in direct if d["status"] == 201)},
            "api_requests": {"by_kind": dict(kinds.most_common()), "non_watch_total": total, "watch_requests": watches,
                             "per_run": round(total / max(len(latencies), 1), 4)},
            "bench_process_gc": {"broker": GC.between(*broker_window), "baseline": GC.between(*baseline_window)},
            "cpu_ms_per_push": cpu_per_run(cpu_marks, ["start", "end"], len(accepted)),
            "stderr_notes": stack.stderr_notes(),
            "celery_task_run_ms": stack.task_times(),
            "raw": {"pushes": pushes, "direct": direct},
        }
    finally:
        if pusher is not None:
            pusher.close()
        stack.stop(keep_logs)


# --------------------------------------------------------------------------- part 2: the lifecycle of N runs


def part_lifecycle(children: Children, tmp: Path, store: Redis, client: redis.Redis, *, runs: int, create_rate: float,
                   step_rate: float, resync_wait: bool, keep_logs: Path | None) -> dict[str, Any]:
    flush(client)
    assert store.proc is not None
    redis_pid = store.proc.pid
    stack = Stack("lifecycle", children, tmp, store.url, commits=runs)
    pusher: Pusher | None = None
    sampler: Sampler | None = None
    sim: TektonSimulator | None = None
    try:
        stack.start()
        watcher_pid = stack.procs["watcher"].pid
        idle_rss = proc_status_kb(watcher_pid, "VmRSS")
        sampler = Sampler(stack, redis.Redis.from_url(store.url))
        sampler.start()
        mark = len(stack.api.requests)
        pusher = Pusher(stack.url, stack.origin)
        sampler.phase = "create"
        cpu_marks = {"start": stack.cpu(redis_pid)}
        print(f"  part 2: {runs} PipelineRuns through the broker ({create_rate:g} webhooks/s) ...", flush=True)
        pushes, _ = pusher.run([(f"l{i:05d}", f"bench/l{i:05d}") for i in range(runs)], rate=create_rate)
        accepted = {p["sha"] for p in pushes if p["status"] == 202}
        timings: dict[str, float] = {"create_sent": time.monotonic()}
        stack.wait("all PipelineRuns", lambda: len(stack.recorder.in_namespace(stack.recorder.created, NAMESPACE)) >= len(accepted),
                   300, interval=0.2)
        stack.wait("all pending statuses", lambda: len(set(stack.gitlab.first("pending")) & accepted) >= len(accepted), 300, interval=0.2)
        stack.wait("the queue to drain", lambda: stack.queue_length(client) == 0, 120)
        names = sorted(stack.recorder.in_namespace(stack.recorder.created, NAMESPACE))
        sha_of = {name: stack.recorder.sha[(NAMESPACE, name)] for name in names}
        mark_created = len(stack.api.requests)
        timings["created"] = time.monotonic()
        cpu_marks["created"] = stack.cpu(redis_pid)

        bare = BareWatch(stack.kubeconfig, str(stack.api.store.resource_version))
        bare.start()
        stack.wait("the bare watch", lambda: stack.api.open_watches >= stack.watcher_watches() + 1, 30)

        sim = TektonSimulator(stack.api)  # explicit steps only: no auto start or finish
        sampler.phase = "running"
        print(f"  part 2: {len(names)} runs to Running at {step_rate:g}/s ...", flush=True)
        running_spent = paced(names, step_rate, lambda name: sim.start(NAMESPACE, name))
        stack.wait("all running statuses", lambda: len(set(stack.gitlab.first("running")) & set(sha_of.values())) >= len(names), 300, interval=0.2)
        stack.wait("the running annotations", lambda: all(
            (o["metadata"].get("annotations") or {}).get(pr.A_REPORTED) == "running"
            for o in stack.api.list("pipelineruns", NAMESPACE)), 120, interval=0.5)
        stack.wait("the queue to drain", lambda: stack.queue_length(client) == 0, 120)
        timings["running"] = time.monotonic()
        cpu_marks["running"] = stack.cpu(redis_pid)
        if resync_wait:
            # Real runs last minutes, so the watcher resyncs (lists every run) while they are alive: hold all of them
            # Running until it has done so once, so its RSS and request count include a full list of every run.
            sampler.phase = "hold"
            seen = len(stack.api.requests)
            print(f"  part 2: holding {len(names)} Running runs until the watcher's next resync list ...", flush=True)
            stack.wait("a watcher resync", lambda: any("Watcher.resync" in classify(r)[1]
                                                       for r in stack.api.requests[seen:]), 90, interval=0.5)
            time.sleep(2.0)  # let it consider every listed run
            timings["resynced"] = time.monotonic()
        mark_running = len(stack.api.requests)
        mark_running_t = time.monotonic()
        cpu_marks["held"] = stack.cpu(redis_pid)

        sampler.phase = "finish"
        print(f"  part 2: {len(names)} runs to Succeeded at {step_rate:g}/s ...", flush=True)
        finish_spent = paced(names, step_rate, lambda name: sim.succeed(NAMESPACE, name))
        complete = stack.wait("all success statuses", lambda: len(set(stack.gitlab.first("success")) & set(sha_of.values())) >= len(names),
                              300, interval=0.2)
        stack.wait("the success annotations", lambda: all(
            (o["metadata"].get("annotations") or {}).get(pr.A_REPORTED) == "success"
            for o in stack.api.list("pipelineruns", NAMESPACE)), 120, interval=0.5)
        stack.wait("the bare watch to see every success", lambda: len(bare.seen) >= len(names), 30)
        timings["finished"] = time.monotonic()
        cpu_marks["finished"] = stack.cpu(redis_pid)
        sampler.phase = "end"
        time.sleep(0.5)
        sampler.stop_event.set()
        sampler.join()
        hwm = proc_status_kb(watcher_pid, "VmHWM")

        requests = list(stack.api.requests[mark:])
        phases = {"create": requests[: mark_created - mark], "running": requests[mark_created - mark: mark_running - mark],
                  "finish": requests[mark_running - mark:]}
        kinds, total, watches = request_breakdown(requests, NAMESPACE)
        fixed = sum(count for kind, count in kinds.items() if "_preflight" in kind or "Watcher.resync" in kind)
        by_phase = {}
        for phase, reqs in phases.items():
            k, t, w = request_breakdown(reqs, NAMESPACE)
            by_phase[phase] = {"by_kind": dict(k.most_common()), "non_watch_total": t, "watch_requests": w}

        completed = stack.recorder.in_namespace(stack.recorder.completed, NAMESPACE)
        running_at = stack.recorder.in_namespace(stack.recorder.running, NAMESPACE)
        success_posted = stack.gitlab.first("success")
        running_posted = stack.gitlab.first("running")
        per_run = []
        for name in names:
            sha = sha_of[name]
            per_run.append({"name": name, "sha": sha, "running": running_at.get(name), "running_posted": running_posted.get(sha),
                            "completed": completed.get(name), "success_posted": success_posted.get(sha),
                            "bare_seen": bare.seen.get(name)})
        to_status = [r["success_posted"] - r["completed"] for r in per_run if r["success_posted"] and r["completed"]]
        to_running = [r["running_posted"] - r["running"] for r in per_run if r["running_posted"] and r["running"]]
        to_bare = [r["bare_seen"] - r["completed"] for r in per_run if r["bare_seen"] and r["completed"]]
        samples = sampler.samples
        live = [s for s in samples if s["phase"] in ("create", "running", "hold", "finish")]
        rss = [s["watcher_rss_kb"] for s in live if s["watcher_rss_kb"]]
        problems = []
        if len(accepted) != runs:
            problems.append(f"{runs - len(accepted)} of {runs} webhooks not answered 202")
        if len(to_status) != len(names):
            problems.append(f"{len(names) - len(to_status)} of {len(names)} runs have no success status measured")
        if len(names) != len(accepted):
            problems.append(f"{len(names)} PipelineRuns for {len(accepted)} accepted webhooks")
        if bare.error:
            problems.append(f"bare watch: {bare.error}")
        states = Counter(s for _, _, s, _, code in stack.gitlab.posts if code == 201)
        return {
            "runs": len(names), "create_rate_per_s": create_rate, "step_rate_per_s": step_rate,
            "running_step_seconds": round(running_spent, 3), "finish_step_seconds": round(finish_spent, 3),
            "complete": complete and not problems, "problems": problems,
            "completed_to_success_posted_ms": summary_ms(to_status),
            "running_to_running_posted_ms": summary_ms(to_running),
            "baseline_bare_watch": {"completed_to_observed_ms": summary_ms(to_bare), "events": bare.events},
            "open_watches": {
                "watcher_max": max((s["watcher_watches"] for s in live), default=None),
                "watcher_min": min((s["watcher_watches"] for s in live), default=None),
                "all_max": max((s["open_watches"] for s in live), default=None),
                "note": "all = the watcher's + the bare baseline watch (running and finish phases)"},
            "api_requests": {"by_kind": dict(kinds.most_common()), "non_watch_total": total, "watch_requests": watches,
                             "per_run": round(total / max(len(names), 1), 4), "by_phase": by_phase,
                             "fixed": fixed, "per_run_without_fixed": round((total - fixed) / max(len(names), 1), 4),
                             "fixed_note": "requests that do not scale with runs: the service-account get (once per pool "
                                           "process per cache period) and the watcher's resync lists (per namespace per "
                                           "CIBROKER_RESYNC_SECONDS)"},
            "watcher_rss_mb": {"idle_at_start": round((idle_rss or 0) / 1024, 1), "peak_sampled": round(max(rss, default=0) / 1024, 1),
                               "vmhwm_at_end": round((hwm or 0) / 1024, 1)},
            "worker_group_rss_mb_peak": round(max((s["worker_rss_kb"] for s in live), default=0) / 1024, 1),
            "gitlab_accepted_by_state": dict(states),
            "gitlab_rejected": sum(1 for *_, code in stack.gitlab.posts if code != 201),
            "phase_seconds": {k: round(v - timings["create_sent"], 2) for k, v in timings.items()},
            "cpu_ms_per_run": cpu_per_run(cpu_marks, ["start", "created", "running", "held", "finished"], len(names)),
            "bench_process_gc": {"finish_phase": GC.between(mark_running_t, timings["finished"]),
                                 "whole_part": GC.between(timings["create_sent"] - 60, timings["finished"])},
            "stderr_notes": stack.stderr_notes(),
            "celery_task_run_ms": stack.task_times(),
            "raw": {"per_run": per_run, "samples": samples},
        }
    finally:
        if sampler is not None:
            sampler.stop_event.set()
        if sim is not None:
            with contextlib.suppress(Exception):
                sim.stop()
        if pusher is not None:
            pusher.close()
        stack.stop(keep_logs)


# --------------------------------------------------------------------------- report


def _fmt(x: float | None, digits: int = 1) -> str:
    return "" if x is None else f"{x:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.1f}x" if a is not None and b else ""


def _within(value: float | None, target: float) -> str:
    return "" if value is None else ("yes" if value <= target else "**no**")


def _requests_within(req: dict[str, Any]) -> str:
    total, per_run = req["per_run"], req.get("per_run_without_fixed", req["per_run"])
    if total <= TARGETS["requests_per_run"]:
        return "yes"
    if per_run <= TARGETS["requests_per_run"]:
        return "per run yes; total no (fixed requests)"
    return "**no**"


def table(info: dict[str, Any]) -> str:
    lines = ["| # | measure | broker | baseline (same run) | broker / baseline | target | within |",
             "|---|---|---:|---:|---:|---:|:---|"]
    c = info.get("create")
    if c:
        b = c["baseline_direct_create"]["sent_to_stored_ms"]
        a = c["accepted_to_created_ms"]
        for q in ("p50", "p99"):
            lines.append(f"| 1 | webhook 202 → PipelineRun stored, {q} ms ({a['n']} pushes at {c['rate_per_s']:g}/s) | "
                         f"{_fmt(a.get(q))} | {_fmt(b.get(q))} (direct create: sent → stored) | {_ratio(a.get(q), b.get(q))} | "
                         f"{'≤ 250' if q == 'p99' else ''} | {_within(a.get(q), TARGETS['created_p99_ms']) if q == 'p99' else ''} |")
        lines.append(f"| 1 | webhook round trip (sent → 202), p50 / p99 ms | {_fmt(c['webhook_round_trip_ms'].get('p50'))} / "
                     f"{_fmt(c['webhook_round_trip_ms'].get('p99'))} | | | | |")
        lines.append(f"| 1 | API requests per run, webhook → created + pending (non-watch) | {c['api_requests']['per_run']:.3f} | | | | |")
    lc = info.get("lifecycle")
    if lc:
        n = lc["runs"]
        s, bw = lc["completed_to_success_posted_ms"], lc["baseline_bare_watch"]["completed_to_observed_ms"]
        lines.append(f"| 2 | watch connections open, watcher (max over the run; {n} runs) | {lc['open_watches']['watcher_max']} | | | 1 per namespace | |")
        lines.append(f"| 2 | API requests per run beyond the watch ({n} runs, whole life) | {lc['api_requests']['per_run']:.3f} "
                     f"({lc['api_requests'].get('per_run_without_fixed', 0):.3f} per run + {lc['api_requests'].get('fixed', 0)} "
                     f"not per run) | | | ≤ 4 | "
                     f"{_requests_within(lc['api_requests'])} |")
        lines.append(f"| 2 | watcher RSS, MB (peak sampled / VmHWM) | {lc['watcher_rss_mb']['peak_sampled']:.1f} / "
                     f"{lc['watcher_rss_mb']['vmhwm_at_end']:.1f} | {lc['watcher_rss_mb']['idle_at_start']:.1f} (idle at start) | | ≤ 150 | "
                     f"{_within(lc['watcher_rss_mb']['vmhwm_at_end'], TARGETS['watcher_rss_mb'])} |")
        for q in ("p50", "p99"):
            lines.append(f"| 2 | Succeeded written → `success` posted, {q} ms (at {lc['step_rate_per_s']:g}/s) | {_fmt(s.get(q))} | "
                         f"{_fmt(bw.get(q), 2)} (bare watch: written → seen) | {_ratio(s.get(q), bw.get(q))} | "
                         f"{'≤ 1000' if q == 'p99' else ''} | {_within(s.get(q), TARGETS['status_p99_ms']) if q == 'p99' else ''} |")
        r = lc["running_to_running_posted_ms"]
        lines.append(f"| 2 | Running written → `running` posted, p50 / p99 ms | {_fmt(r.get('p50'))} / {_fmt(r.get('p99'))} | | | | |")
    return "\n".join(lines)


def breakdown_table(info: dict[str, Any]) -> str:
    lc = info.get("lifecycle")
    if not lc:
        return ""
    n = max(lc["runs"], 1)
    phases = lc["api_requests"]["by_phase"]
    lines = [(f"API requests in namespace {NAMESPACE} during part 2 (watch requests excluded: "
              f"{lc['api_requests']['watch_requests']}), {lc['runs']} runs:"), "",
             "| request (code path) | create phase | running phase | finish phase | total | per run |", "|---|---:|---:|---:|---:|---:|"]
    for kind, count in lc["api_requests"]["by_kind"].items():
        cells = " | ".join(str(phases[p]["by_kind"].get(kind, 0)) for p in ("create", "running", "finish"))
        lines.append(f"| {kind} | {cells} | {count} | {count / n:.3f} |")
    lines.append(f"| **all** | {' | '.join(str(phases[p]['non_watch_total']) for p in ('create', 'running', 'finish'))} | "
                 f"{lc['api_requests']['non_watch_total']} | {lc['api_requests']['per_run']:.3f} |")
    cpu = lc.get("cpu_ms_per_run") or {}
    if cpu:
        names = {"start->created": "create (webhook → run + pending)", "created->running": "to Running (+ running status)",
                 "running->held": "hold (resync)", "held->finished": "to Succeeded (+ success status)"}
        roles = list(next(iter(cpu.values())))
        lines += ["", "CPU milliseconds per run, by process and phase (from /proc; the bench process runs the fakes):", "",
                  "| phase | " + " | ".join(roles) + " |", "|---|" + "---:|" * len(roles)]
        for phase, row in cpu.items():
            lines.append(f"| {names.get(phase, phase)} | " + " | ".join(f"{row[r]:.2f}" for r in roles) + " |")
    return "\n".join(lines)


def header_text(info: dict[str, Any]) -> str:
    m, v, c = info["machine"], info["versions"], info["config"]
    return (
        f"machine: {m['nproc']} CPU(s), {m['cpu_model']}, kernel {m['kernel']}, {m['os']}, {m['memory_gib']} GiB, "
        f"load average at start {m['loadavg_at_start']}" + (f", at end {m['loadavg_at_end']}" if "loadavg_at_end" in m else "") + "\n"
        f"versions: Python {v['python']}, cibroker {v['cibroker']} (git {v['git']}), celery {v['celery']}, kombu {v['kombu']}, "
        f"kubernetes {v['kubernetes']}, urllib3 {v['urllib3']}, redis-py {v['redis']}, httpx {v['httpx']}, uvicorn {v['uvicorn']}, "
        f"redis-server {v['redis-server']}\n"
        f"config: part 1 {c['rate']:g} webhooks/s for {c['duration']:g} s; part 2 {c['runs']} runs (created at "
        f"{c['create_rate']:g}/s, Running then Succeeded at {c['step_rate']:g}/s); {c['processes']}"
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: part 1 for 10 s, part 2 with 100 runs")
    parser.add_argument("--rate", type=float, default=20.0, help="part 1 webhooks per second (default 20)")
    parser.add_argument("--duration", type=float, default=None, help="part 1 seconds (default 30; --quick 10)")
    parser.add_argument("--runs", type=int, default=None, help="part 2 concurrent PipelineRuns (default 1000; --quick 100)")
    parser.add_argument("--create-rate", type=float, default=50.0, help="part 2 webhooks per second to create the runs (default 50)")
    parser.add_argument("--step-rate", type=float, default=100.0, help="part 2 runs moved to Running, then finished, per second (default 100)")
    parser.add_argument("--no-resync-wait", action="store_true",
                        help="part 2: do not hold the Running runs until the watcher's next resync (--quick implies it)")
    parser.add_argument("--keep-logs", type=Path, metavar="DIR", help="copy the cibroker processes' logs into DIR")
    parser.add_argument("--parts", nargs="+", choices=("create", "lifecycle"), default=["create", "lifecycle"])
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default bench/results/orchestration-<UTC time>.json)")
    parser.add_argument("--report", type=Path, metavar="JSON", help="print the header and tables of a saved results file, run nothing")
    args = parser.parse_args(argv)
    args.duration = args.duration if args.duration is not None else (10.0 if args.quick else 30.0)
    args.runs = args.runs if args.runs is not None else (100 if args.quick else 1000)
    args.no_resync_wait = args.no_resync_wait or args.quick
    if args.rate <= 0 or args.duration <= 0 or args.runs < 1 or args.create_rate <= 0 or args.step_rate <= 0:
        parser.error("rates, --duration and --runs must be positive")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.report:
        saved = json.loads(args.report.read_text())
        print(header_text(saved) + "\n\n" + table(saved) + "\n\n" + breakdown_table(saved))
        return 0
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or BENCH / "results" / f"orchestration-{stamp}.json"
    info: dict[str, Any] = {
        "started_at": stamp, "machine": machine(), "versions": versions(),
        "config": {"rate": args.rate, "duration": args.duration, "runs": args.runs, "create_rate": args.create_rate,
                   "step_rate": args.step_rate, "parts": args.parts, "quick": args.quick,
                   "resync_wait": not args.no_resync_wait,
                   "processes": "cibroker serve (1 uvicorn worker), cibroker worker --concurrency 2 (one Celery worker, "
                                "2 prefork pool processes), cibroker watcher; CIBROKER_RESYNC_SECONDS default (60)",
                   "redis": "redis-server --appendonly yes --appendfsync everysec --save ''",
                   "fake_kube": "FakeKubeAPI(bookmark_interval=1.0), default history_limit 1000, in this process",
                   "targets": TARGETS},
    }
    print(header_text(info), flush=True)
    children = Children()
    failure = None
    with tempfile.TemporaryDirectory(prefix="cibroker-bench-orch-") as tmpname:
        tmp = Path(tmpname)
        try:
            store = Redis(children, tmp / "redis")
            client = store.start()
            if "create" in args.parts:
                info["create"] = part_create(children, tmp, store, client, rate=args.rate, duration=args.duration, warmup=4,
                                             keep_logs=args.keep_logs)
            if "lifecycle" in args.parts:
                info["lifecycle"] = part_lifecycle(children, tmp, store, client, runs=args.runs, create_rate=args.create_rate,
                                                   step_rate=args.step_rate, resync_wait=not args.no_resync_wait,
                                                   keep_logs=args.keep_logs)
        except (SetupError, redis.exceptions.RedisError, OSError, subprocess.SubprocessError) as exc:
            failure = str(exc) if isinstance(exc, SetupError) else f"{type(exc).__name__}: {exc}"
            print(f"orchestration: {failure}", file=sys.stderr)
        except KeyboardInterrupt:
            failure = "interrupted"
            print("orchestration: interrupted; stopping the processes", file=sys.stderr)
        finally:
            children.stop_all()
    info["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    info["failure"] = failure
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=1) + "\n")
    print()
    print(table(info))
    if info.get("lifecycle"):
        print()
        print(breakdown_table(info))
    problems = [f"part {part}: {p}" for part in ("create", "lifecycle") for p in (info.get(part) or {}).get("problems", [])]
    for part in ("create", "lifecycle"):
        for role, text in ((info.get(part) or {}).get("stderr_notes") or {}).items():
            print(f"\nnote: {part} {role} logged warnings/errors:\n  " + text.replace("\n", "\n  "))
    for p in problems:
        print(f"INCOMPLETE {p}", file=sys.stderr)
    print(f"\nraw results: {out}")
    if failure:
        return 130 if failure == "interrupted" else 2
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
