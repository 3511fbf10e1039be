"""The whole broker as real processes against the wire fakes, and the invariants every run must keep.

Shared by the end-to-end tests (test_e2e_orchestration.py), the fault-injection suite
(test_faults.py) and the soak benchmark (bench/soak.py):

    Stack           `cibroker serve`, `cibroker worker`, `cibroker watcher` as child processes
                    on a real redis-server, the fake Kubernetes API (moved by the Tekton and
                    rollout simulators) and the fake GitLab, which enforces GitLab's
                    commit-status state machine
    ImageLog        every change of a Deployment container's image, as the API server saw it
    check_invariants  the promise, checked from the outside: every accepted delivery has
                    exactly one PipelineRun per route, every run ended and its commit shows a
                    final status that matches it, statuses went forward only, exactly one
                    rollout per succeeded run that was due one, none for the others
    settle          waits until check_invariants holds, and still holds a moment later

Fixtures (registered in conftest.py): `fake_gitlab_api`, `kube`, `stack`.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.core import pipelinerun as pr
from broker.core.status import CommitState
from broker.core.reporting import RANK, is_final, parse_state, run_state
from tests.support.fakes.githost_api import GITLAB_TOKEN, FakeGitLab
from tests.support.fakes.kube_api import FakeKubeAPI
from tests.support.fakes.kube_store import Change
from tests.support.fakes.rollout import seed_deployment, seed_service_account
from tests.support.fakes.tekton import digest_of, is_done
from tests.support import SECRETS, GitOrigin, Process, base_env, free_port, payload, template_origin, wait_healthy


def sha_of(n: int) -> str:
    """The n-th commit (1..256) of the origin every Stack's Git host serves: older numbers are ancestors."""
    return template_origin().sha(n)


SHA1 = sha_of(1)
SHA2 = sha_of(2)
OLD_IMAGE = "registry.example.com/acme/shop-api:0000000000000000000000000000000000000000"
IMAGE = "registry.example.com/acme/shop-api"
STATUS = "cibroker/build-test-push"
DEPLOY_STATUS = "deploy/staging"
API_TOKEN = "api-token-for-the-e2e-stack"
KUBE_TOKEN = "fake-kube-bearer-token-5f1d"


def routing(gitlab_url: str, clone_url: str) -> str:
    return f"""
defaults: {{namespace: ci, service_account: pipeline-bot, status_name: "cibroker/{{pipeline}}",
           target_url: "https://tekton.example.com/#/namespaces/{{namespace}}/pipelineruns/{{name}}"}}
hosts:
  gitlab:
    kind: gitlab
    api_url: {gitlab_url}
    web_url: https://gitlab.example.com
    token: {{env: GITLAB_API_TOKEN}}
    webhook_secrets: [{{env: GITLAB_WEBHOOK_SECRET}}]
routes:
  - name: shop-api
    host: gitlab
    repo: acme/shop-api
    clone_url: {clone_url}
    events: {{branches: [main, "b/*"], tags: ["v*"]}}
    pipeline: build-test-push
    image: {IMAGE}
    deploy:
      - {{environment: staging, when: {{branches: [main]}}, namespace: staging, deployment: shop-api, container: api}}
"""


def deployed_image(sha: str) -> str:
    """What staging runs once `sha` is deployed: the route's repository @ the digest the (fake) build reported."""
    return f"{IMAGE}@{digest_of(f'{IMAGE}:{sha}')}"


def push_body(*, sha: str = SHA1, ref: str = "refs/heads/main", before: str = "0" * 40, after: str | None = None,
              message: str = "change\n", repo: str = "acme/shop-api", project_id: int = 42) -> bytes:
    data = json.loads(payload("gitlab/push-branch-update.json"))
    data.update(ref=ref, before=before, after=after or sha, checkout_sha=sha, project_id=project_id)
    data["object_kind"] = "tag_push" if ref.startswith("refs/tags/") else "push"
    data["project"].update(path_with_namespace=repo, id=project_id, web_url=f"https://gitlab.example.com/{repo}")
    data["commits"] = [{"id": sha, "message": message}]
    return json.dumps(data).encode()


def hook_headers(key: str | None, *, ref: str = "refs/heads/main") -> dict[str, str]:
    headers = {"X-Gitlab-Event": "Tag Push Hook" if ref.startswith("refs/tags/") else "Push Hook",
               "X-Gitlab-Token": SECRETS["GITLAB_WEBHOOK_SECRET"], "Content-Type": "application/json"}
    if key is not None:
        headers["Idempotency-Key"] = key
    return headers


class ImageLog:
    """Every time a Deployment container's image changed, in order (rollouts and rollbacks alike)."""

    def __init__(self, kube: FakeKubeAPI) -> None:
        self.changes: list[tuple[str, str, str]] = []  # (namespace/name, container, new image)
        kube.on_change(self._on_change)

    def _on_change(self, change: Change) -> None:
        if change.plural != "deployments" or change.old is None:
            return
        before, after = _images(change.old), _images(change.new)
        for container, image in after.items():
            if before.get(container) != image:
                self.changes.append((f"{change.namespace}/{change.new['metadata']['name']}", container, image))

    def rollouts_to(self, image: str) -> int:
        return sum(1 for _, _, i in self.changes if i == image)


def _images(deployment: Mapping[str, Any]) -> dict[str, str]:
    containers = ((deployment.get("spec") or {}).get("template") or {}).get("spec", {}).get("containers") or []
    return {c["name"]: c.get("image", "") for c in containers}


class Stack:
    """The three cibroker processes plus the fakes they talk to."""

    def __init__(self, tmp_path: Path, redis_url: str, kube: FakeKubeAPI, gitlab: FakeGitLab, clone_url: str | None = None,
                 *, origin: GitOrigin | None = None, **env: str) -> None:
        """`origin`: the Git host's repository (default: this test's own copy of the template origin);
        `clone_url`: what the route clones (default: the origin's file:// URL)."""
        self.tmp_path, self.kube, self.gitlab = tmp_path, kube, gitlab
        if origin is None:
            path = tmp_path / "origin.git"  # a second Stack of one test (a restart) shares the first one's
            origin = template_origin().copy(path)
        self.origin = origin
        clone_url = clone_url or origin.url
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": kube.url}}],
            "users": [{"name": "fake", "user": {"token": KUBE_TOKEN}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
        }))
        self.config = tmp_path / "routing.yaml"
        self.config.write_text(routing(gitlab.api_url, clone_url))
        self.env = base_env(tmp_path, **{
            "CIBROKER_REDIS_URL": redis_url, "KUBECONFIG": str(kubeconfig), "GITLAB_API_TOKEN": GITLAB_TOKEN,
            "CIBROKER_API_TOKENS": API_TOKEN, "CIBROKER_RESYNC_SECONDS": "5", "CIBROKER_VISIBILITY_TIMEOUT_SECONDS": "5", **env})
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # One client for reads: a new httpx client per call builds an SSL context each time, which
        # alone ate a third of the soak process's CPU while it read 8,500 records.
        self._http = httpx.Client(headers={"Authorization": f"Bearer {API_TOKEN}"}, timeout=10)
        self.procs: dict[str, Process] = {}
        self.all_procs: list[Process] = []  # every process ever started, for the log checks
        self.images = ImageLog(kube)
        seed_service_account(kube, namespace="ci", name="pipeline-bot")
        seed_deployment(kube, namespace="staging", name="shop-api", container="api", image=OLD_IMAGE, replicas=2)

    # -- processes -------------------------------------------------------------------------

    def start(self, role: str, *, concurrency: int = 2, **env: str) -> Process:
        args = {"serve": ["serve", "--port", str(self.port)], "worker": ["worker", "--concurrency", str(concurrency)],
                "watcher": ["watcher"]}[role]
        proc = Process([*args, "--config", str(self.config)], env={**self.env, **env}, cwd=self.tmp_path,
                       log=self.tmp_path / f"{role}-{time.monotonic_ns()}.log")
        self.procs[role] = proc
        self.all_procs.append(proc)
        if role == "serve":
            wait_healthy(self.url, proc)
        return proc

    def start_all(self) -> Stack:
        for role in ("serve", "worker", "watcher"):
            self.start(role)
        return self

    def kill(self, role: str) -> None:
        """kill -9: no shutdown code runs, in-flight work is cut where it stands."""
        self.procs[role].proc.send_signal(signal.SIGKILL)
        self.procs[role].proc.wait()

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.stop()
        self._http.close()

    # -- webhooks --------------------------------------------------------------------------

    def post(self, key: str | None, *, timeout: float = 10, move: bool = True, **kw: Any) -> httpx.Response:
        """POST a push webhook; first, unless `move=False`, the branch moves to the commit on the origin (`git push`)."""
        ref = kw.get("ref", "refs/heads/main")
        if move and ref.startswith("refs/heads/"):
            self.origin.move(ref.removeprefix("refs/heads/"), kw.get("sha", SHA1))
        return httpx.post(f"{self.url}/hooks/gitlab", content=push_body(**kw), timeout=timeout,
                          headers=hook_headers(key, ref=kw.get("ref", "refs/heads/main")))

    def push(self, key: str | None, *, expect: int = 202, **kw: Any) -> str:
        """POST a push webhook; its delivery id (202 accepted, or 200 ignored with `expect=200`)."""
        r = self.post(key, **kw)
        assert r.status_code == expect, r.text
        return r.json()["delivery_id"]

    # -- reading -----------------------------------------------------------------------------

    def delivery(self, delivery_id: str, *, timeout: float = 20) -> dict[str, Any]:
        """The delivery record from the edge's API (retried while the edge says Redis is unavailable: 503)."""
        deadline = time.monotonic() + timeout
        while True:
            r = self._http.get(f"{self.url}/api/deliveries/{delivery_id}")
            if r.status_code != 503 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert r.status_code == 200, r.text
        return r.json()

    def runs(self) -> list[dict[str, Any]]:
        return self.kube.list("pipelineruns", "ci")

    def image(self) -> str:
        dep = self.kube.get("deployments", "staging", "shop-api")
        return next(c["image"] for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "api")

    def logs(self) -> str:
        return "\n".join(f"--- {p.log.name}\n{p.log.read_text()[-3000:]}" for p in self.procs.values())

    def captured_output(self) -> str:
        """Everything every process of this stack wrote (stderr and stdout), for the secret checks."""
        return "\n".join(path.read_text(errors="replace") for p in self.all_procs for path in (p.log, p.log.with_suffix(".out"))
                         if path.exists())

    def wait(self, what: str, check: Callable[[], bool], timeout: float = 45) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}\nstatuses: {self.gitlab.calls[-6:]}\n{self.logs()}")
            time.sleep(0.1)


# -- invariants -----------------------------------------------------------------------------


@dataclass
class Outcome:
    """What check_invariants counted; `figures()` is what docs/RELIABILITY.md reports."""

    deliveries: int = 0
    runs: int = 0
    by_state: Counter[str] = field(default_factory=Counter)
    statuses_posted: int = 0
    deploys: int = 0
    duplicated_runs: int = 0
    lost: int = 0
    pending: int = 0
    out_of_order: int = 0
    problems: list[str] = field(default_factory=list)

    def figures(self) -> dict[str, Any]:
        return {"deliveries": self.deliveries, "runs": self.runs, "states": dict(self.by_state),
                "statuses_posted": self.statuses_posted, "deploys": self.deploys, "lost": self.lost,
                "duplicated": self.duplicated_runs, "pending": self.pending, "out_of_order": self.out_of_order}


def legal_sequence(states: list[str]) -> bool:
    """Commit statuses may only move forward: pending < running < one final state, which may repeat."""
    ranks = [RANK[CommitState(s)] for s in states]
    finals = {s for s in states if is_final(CommitState(s))}
    return ranks == sorted(ranks) and len(finals) <= 1


def measure(stack: Stack, deliveries: Iterable[str], *, records: Mapping[str, Mapping[str, Any]] | None = None) -> Outcome:
    """Count, from the outside, how far the promise holds for these accepted deliveries."""
    out = Outcome()
    runs = stack.runs()
    by_key: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for run in runs:
        labels = run["metadata"]["labels"]
        by_key.setdefault((labels[pr.L_ROUTE], labels[pr.L_REF_HASH], labels[pr.L_SHA]), []).append(run)
    wanted: set[tuple[str, str, str]] = set()
    for delivery_id in dict.fromkeys(deliveries):
        record = (records or {}).get(delivery_id) or stack.delivery(delivery_id)
        out.deliveries += 1
        if record.get("decision") != "accepted":
            out.problems.append(f"delivery {delivery_id} is {record.get('decision')!r}, not accepted")
            continue
        push = record["push"]
        for route in record["routes"]:
            key = (route, pr.ref_hash(route, push["ref"]), push["sha"])
            if key in wanted:
                continue  # the same push accepted twice (two hooks): one run for both
            wanted.add(key)
            found = len(by_key.get(key, []))
            if found == 0:
                out.lost += 1
                out.problems.append(f"delivery {delivery_id}: no PipelineRun for route {route} {push['ref']} {push['sha'][:8]}")
            elif found > 1:
                out.duplicated_runs += found - 1
                out.problems.append(f"delivery {delivery_id}: {found} PipelineRuns for route {route} {push['sha'][:8]}")
    stray = [r["metadata"]["name"] for key, rs in by_key.items() if key not in wanted for r in rs]
    if stray:
        out.problems.append(f"PipelineRuns no accepted delivery asked for: {stray[:10]} ({len(stray)})")
    out.runs = len(runs)
    states, described = stack.gitlab.all_states()
    rollouts = Counter(image for _, _, image in list(stack.images.changes))
    for run in runs:
        _check_run(run, out, states=states, described=described, rollouts=rollouts)
    out.statuses_posted = sum(1 for c in list(stack.gitlab.calls) if c.method == "POST" and c.status in (200, 201))
    return out


def _check_run(run: Mapping[str, Any], out: Outcome, *, states: Mapping[tuple[str, str], list[str]],
               described: Mapping[tuple[str, str], str], rollouts: Counter[str]) -> None:
    meta = run["metadata"]
    sha, name = meta["labels"][pr.L_SHA], meta["name"]
    annotations = meta.get("annotations") or {}
    expected = run_state(run)
    out.by_state[expected.value] += 1
    posted = states.get((sha, STATUS), [])
    if not is_done(run):
        out.pending += 1
        out.problems.append(f"{name}: the PipelineRun has not ended ({expected.value})")
        return
    if not legal_sequence(posted):
        out.out_of_order += 1
        out.problems.append(f"{name}: statuses out of order: {posted}")
    if not posted or posted[-1] != expected.value:
        out.pending += 1
        out.problems.append(f"{name}: ended {expected.value} but the commit shows {posted}")
    superseded = annotations.get(pr.A_SUPERSEDED_BY)
    if expected is CommitState.CANCELED and superseded and f"superseded by {superseded}" not in described.get((sha, STATUS), ""):
        out.problems.append(f"{name}: canceled, but its status does not say 'superseded by {superseded}'")
    image = deployed_image(sha)  # deploys go by digest (deploy_by defaults to digest)
    due = "staging" in json.loads(annotations.get(pr.A_DEPLOY) or "[]")
    deploy_states = states.get((sha, DEPLOY_STATUS), [])
    if expected is CommitState.SUCCESS and due:
        out.deploys += rollouts[image]
        if deploy_states[-1:] == ["canceled"] and "older than" in described.get((sha, DEPLOY_STATUS), ""):
            return  # refused: a newer commit already runs there (no rollout, by design)
        if deploy_states[-1:] == ["canceled"] and "superseded by" in described.get((sha, DEPLOY_STATUS), ""):
            if rollouts[image] != 1:  # rolled out, then a newer deploy took over before it finished
                out.problems.append(f"{name}: deploy superseded, but rolled out {rollouts[image]} times")
            return
        if rollouts[image] != 1:
            out.problems.append(f"{name}: succeeded and due a deploy, rolled out {rollouts[image]} times")
        if not deploy_states or deploy_states[-1] != "success" or not legal_sequence(deploy_states):
            out.pending += not deploy_states or not is_final(parse_state(deploy_states[-1]))
            out.problems.append(f"{name}: deploy statuses {deploy_states}")
    elif rollouts[image] or deploy_states:
        out.problems.append(f"{name}: ended {expected.value}, yet rolled out {rollouts[image]} times, deploy statuses {deploy_states}")


def check_invariants(stack: Stack, deliveries: Iterable[str], *, allow_rejected_transitions: bool = False) -> Outcome:
    """Assert the promise for these accepted deliveries; returns the figures."""
    out = measure(stack, deliveries)
    if not allow_rejected_transitions:
        rejected = [c for c in stack.gitlab.calls if c.status == 400]
        if rejected:
            out.problems.append(f"GitLab refused transitions: {[(c.body, c.status) for c in rejected]}")
    assert not out.problems, "\n".join(out.problems)
    assert out.lost == out.duplicated_runs == out.pending == out.out_of_order == 0
    return out


def settle(stack: Stack, deliveries: Iterable[str], *, timeout: float = 60, again_after: float = 1.5,
           allow_rejected_transitions: bool = False) -> Outcome:
    """Wait until every delivery's invariants hold, then check once more a moment later (late posts show up)."""
    ids = list(deliveries)
    records: dict[str, Mapping[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while True:
        for delivery_id in ids:
            if delivery_id not in records:
                records[delivery_id] = stack.delivery(delivery_id)
        out = measure(stack, ids, records=records)
        if not out.problems:
            break
        if time.monotonic() > deadline:
            pytest.fail("invariants did not hold in time:\n" + "\n".join(out.problems)
                        + f"\nlast GitLab calls: {stack.gitlab.calls[-8:]}\n{stack.logs()}")
        time.sleep(0.2)
    time.sleep(again_after)  # nothing awaited here: a late, out-of-order post is exactly what must NOT happen
    return check_invariants(stack, ids, allow_rejected_transitions=allow_rejected_transitions)


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def fake_gitlab_api() -> Iterator[FakeGitLab]:
    with FakeGitLab(projects={42: "acme/shop-api"}) as fake:
        yield fake


@pytest.fixture
def kube() -> Iterator[FakeKubeAPI]:
    with FakeKubeAPI(bookmark_interval=1.0) as api:
        yield api


@pytest.fixture
def stack(tmp_path: Path, redis_url: str, kube: FakeKubeAPI, fake_gitlab_api: FakeGitLab) -> Iterator[Stack]:
    s = Stack(tmp_path, redis_url, kube, fake_gitlab_api)
    s.start_all()
    yield s
    s.stop()
