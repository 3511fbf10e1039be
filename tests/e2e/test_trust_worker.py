"""Issue 10, worker side: the attacker's moves, played through the real processes and the wire fakes.

`cibroker serve`, `worker` and `watcher` run as child processes (tests.support.stack) against a real
redis-server, the fake Kubernetes API and the fake GitLab; the origin is a real git repository
with real commits, so the ancestry guard can decide. The attacker can write PipelineRuns in the
CI namespace (a pipeline step with a token, the on-call service account) and push messages onto
the Redis queue; they do not have the broker's signing key.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis

from broker.core import pipelinerun as pr
from broker.core.records import DEPLOY_TASK, PROCESS_TASK, TaskCall, new_delivery_id, iso
from broker.adapters.redis_store import SyncStore
from broker.adapters.celery_wire import task_message
from broker.core.runlabels import A_SIGNATURE
from broker.core.trust import PersonRequest, sign_request
from tests.support.fakes.githost_api import FakeGitLab
from tests.support.fakes.kube_api import FakeKubeAPI
from tests.support.fakes.rollout import RolloutSimulator
from tests.support.fakes.tekton import TektonSimulator
from tests.support.stack import DEPLOY_STATUS, STATUS, Stack, deployed_image
from tests.support import SECRETS, GitOrigin, make_settings, template_origin
from broker.core.records import CANCEL_TASK, REPORT_TASK

pytestmark = pytest.mark.e2e
KEY = SECRETS["CIBROKER_SIGNING_KEY"].encode()
QUEUE = "cibroker"


class Attacker:
    """The clone URL a forged run names: an HTTP server that records every request (and its Authorization)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str | None]] = []
        seen = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                seen.append((self.path, self.headers.get("Authorization")))
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="git"')
                self.end_headers()

            do_POST = do_GET  # noqa: N815

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/acme/shop-api.git"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclasses.dataclass
class Origin:
    repo: GitOrigin
    c1: str
    c2: str


@pytest.fixture
def origin(tmp_path: Path) -> Origin:
    """The Git host's real repository: commit 1 is the parent of commit 2, so git can say c1 is older."""
    repo = template_origin().copy(tmp_path / "origin.git")
    return Origin(repo, repo.sha(1), repo.sha(2))


def old_snapshot(obj: dict[str, Any]) -> dict[str, Any]:
    """What a task message carried before issue 10 (the run as a dict): a forged message can still carry it."""
    meta = obj.get("metadata") or {}
    status = obj.get("status") or {}
    return {
        "metadata": {k: meta.get(k) for k in ("name", "namespace", "labels", "annotations")},
        "spec": {"status": (obj.get("spec") or {}).get("status")},
        "status": {"conditions": status.get("conditions") or [], "startTime": status.get("startTime"),
                   "completionTime": status.get("completionTime")},
    }


@pytest.fixture
def attacker() -> Iterator[Attacker]:
    a = Attacker()
    yield a
    a.close()


@pytest.fixture
def stack(tmp_path: Path, redis_url: str, kube: FakeKubeAPI, fake_gitlab_api: FakeGitLab, origin: Origin) -> Iterator[Stack]:
    s = Stack(tmp_path, redis_url, kube, fake_gitlab_api, origin=origin.repo)
    s.start_all()
    yield s
    s.stop()


def events(stack: Stack, role: str, event: str) -> list[dict[str, Any]]:
    return [line for p in stack.all_procs if p.log.name.startswith(role) for line in p.lines() if line.get("event") == event]


def wait_event(stack: Stack, role: str, event: str, **match: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = []

    def check() -> bool:
        found[:] = [e for e in events(stack, role, event) if all(str(e.get(k)) == v for k, v in match.items())]
        return bool(found)

    stack.wait(f"{role} logs {event} {match}", check, timeout=30)
    return found[0]


def push_and_deploy(stack: Stack, sha: str, key: str, before: str = "0" * 40) -> str:
    delivery = stack.push(key, sha=sha, before=before)
    stack.wait(f"{sha[:8]} deployed", lambda: stack.gitlab.states(sha, DEPLOY_STATUS)[-1:] == ["success"])
    return delivery


def lpush(redis_url: str, task: str, args: list[Any]) -> str:
    task_id = new_delivery_id()
    redis.Redis.from_url(redis_url).lpush(QUEUE, task_message(task=task, task_id=task_id, args=args, queue=QUEUE, origin="mallory"))
    return task_id


def forged_run(*, name: str, sha: str, delivery: str | None, clone_url: str, signature: str | None = None) -> dict[str, Any]:
    """What an attacker writes: labelled as cibroker's, Succeeded, with its own image, deploy list, clone URL and repo."""
    labels = {pr.MANAGED_BY[0]: pr.MANAGED_BY[1], pr.L_ROUTE: "shop-api", pr.L_HOST: "gitlab", pr.L_SHA: sha,
              pr.L_REF_KIND: "branch", pr.L_REF_HASH: pr.ref_hash("shop-api", "refs/heads/main")}
    if delivery is not None:
        labels[pr.L_DELIVERY] = delivery
    annotations = {pr.A_REPO: "acme/other-project", pr.A_REPO_ID: "42", pr.A_REF: "refs/heads/main", pr.A_HOST_KIND: "gitlab",
                   pr.A_ATTEMPT: "1", pr.A_STATUS_NAME: STATUS, pr.A_IMAGE: "evil.example/pwn:latest",
                   pr.A_CLONE_URL: clone_url, pr.A_DEPLOY: '["staging"]', pr.A_REPORTED: "",
                   pr.A_RECEIVED: "2000-01-01T00:00:00.000Z"}  # (a future one makes _supersede cancel ours: issue 11)
    if signature is not None:
        annotations[A_SIGNATURE] = signature
    return {
        "apiVersion": "tekton.dev/v1", "kind": "PipelineRun",
        "metadata": {"name": name, "namespace": "ci", "labels": labels, "annotations": annotations},
        "spec": {"pipelineRef": {"name": "build-test-push"}, "params": [{"name": "image", "value": "evil.example/pwn:latest"}]},
        "status": {"conditions": [{"type": "Succeeded", "status": "True", "reason": "Succeeded", "message": "done"}],
                   "results": [{"name": "image-digest", "value": "sha256:" + "e" * 64}],
                   "startTime": "2026-12-03T10:00:00Z", "completionTime": "2026-12-03T10:01:00Z"},
    }


FORGED_SHA = "3" * 40


@pytest.mark.parametrize(("delivery", "reason"), [("real", "not_owned"), (None, "no_delivery_label"),
                                                  ("01a2018ebee46132f6ae6571c7", "unknown_delivery"), ("own", "bad_signature")])
def test_a_forged_run_posts_nothing_deploys_nothing_and_sends_no_token(
        stack: Stack, kube: FakeKubeAPI, origin: Origin, attacker: Attacker, delivery: str | None, reason: str) -> None:
    """A Succeeded run cibroker never created (naming a real delivery, none, or an unknown one; or put in place of our own
    run, with its name and delivery label but not our signature): ignored with one warning line and a metric."""
    with TektonSimulator(kube, auto_start=0.2, auto_finish=0.5), RolloutSimulator(kube):
        real = push_and_deploy(stack, origin.c1, "real")
        before = stack.image()
        name = "shop-api-main-evil-000001"
        if delivery == "own":  # replaced whole: our run's name and delivery label, the attacker's everything else
            [ours] = stack.runs()
            name = ours["metadata"]["name"]
        label = real if delivery in ("real", "own") else delivery
        kube.put(forged_run(name=name, sha=FORGED_SHA, delivery=label, clone_url=attacker.url, signature="v1:" + "0" * 64))
        line = wait_event(stack, "watcher", "run_ignored", run=f"ci/{name}")
        # A later, real push still goes all the way: the watcher carried on past the forged run.
        push_and_deploy(stack, origin.c2, "after", before=origin.c1)
    assert line["reason"] == reason and line["level"] == "warning" and name in line["detail"]
    assert len(events(stack, "watcher", "run_ignored")) == 1  # one line per forged run, however many events it made
    assert not [c for c in stack.gitlab.calls if FORGED_SHA in c.path or "other-project" in json.dumps(c.body)]
    assert before == deployed_image(origin.c1) and stack.image() == deployed_image(origin.c2)
    assert stack.images.rollouts_to("evil.example/pwn:latest") == 0
    assert not [c for c in stack.images.changes if "sha256:" + "e" * 64 in c[2]]
    assert attacker.requests == []  # no git request, so no Authorization header, ever reached the clone URL it named
    metrics = stack._http.get(f"{stack.url}/metrics").text
    assert f'cibroker_untrusted_runs_total{{reason="{reason}"}} 1.0' in metrics


def test_a_report_message_naming_a_forged_run_is_refused_by_the_worker(
        stack: Stack, kube: FakeKubeAPI, origin: Origin, attacker: Attacker, redis_url: str) -> None:
    """The attacker queues cibroker.report_run for their own run: the worker re-reads it, finds it is not ours, posts nothing."""
    kube.put(forged_run(name="evil-run", sha=origin.c2, delivery=None, clone_url=attacker.url))
    lpush(redis_url, REPORT_TASK, ["ci", "evil-run"])
    line = wait_event(stack, "worker", "task_refused", task=REPORT_TASK)
    assert line["reason"] == "untrusted_run" and line["run_reason"] == "no_delivery_label"
    assert stack.gitlab.calls == [] and attacker.requests == []


def signed(redis_url: str, request: PersonRequest, **tamper: Any) -> str:
    SyncStore(redis_url, timeout=2).put_request({**sign_request(KEY, request), **tamper}, ttl=600)
    return request.request_id


def unsigned(redis_url: str, request: PersonRequest) -> str:
    SyncStore(redis_url, timeout=2).put_request(dataclasses.asdict(request), ttl=600)
    return request.request_id


@pytest.mark.parametrize("attack", ["snapshot-with-force", "attempt-2-no-request", "unsigned-request", "altered-request",
                                    "request-for-another-run", "report-with-snapshot", "signed-force"])
def test_a_forged_deploy_message_never_rolls_staging_back(
        stack: Stack, kube: FakeKubeAPI, origin: Origin, redis_url: str, attack: str) -> None:
    """Staging runs c2; messages asking to deploy the older c1 (forced) are refused unless a person signed the request.

    `signed-force` is the control: the same message with a request signed by the broker's key does deploy c1.
    """
    with TektonSimulator(kube, auto_start=0.2, auto_finish=0.5), RolloutSimulator(kube):
        push_and_deploy(stack, origin.c1, "one")
        push_and_deploy(stack, origin.c2, "two", before=origin.c1)
        old = next(r for r in stack.runs() if r["metadata"]["labels"][pr.L_SHA] == origin.c1)
        ns, name = "ci", old["metadata"]["name"]
        request = PersonRequest(request_id=f"req-{attack}", action="deploy", namespace=ns, name=name, actor="alice",
                                channel="cli", reason="rollback", at=iso(time.time()), environment="staging", attempt=2,
                                force=True)
        task, why = DEPLOY_TASK, "untrusted_request"
        if attack == "snapshot-with-force":
            args, why = [old_snapshot(old), "staging", 2, True], "old_message_shape"
        elif attack == "attempt-2-no-request":
            args = [ns, name, "staging", 2, ""]
        elif attack == "unsigned-request":
            args = [ns, name, "staging", 2, unsigned(redis_url, request)]
        elif attack == "altered-request":  # a person asked for an unforced deploy; the attacker flips force in Redis
            args = [ns, name, "staging", 2, signed(redis_url, dataclasses.replace(request, force=False), force=True)]
        elif attack == "request-for-another-run":
            other = next(r for r in stack.runs() if r["metadata"]["name"] != name)["metadata"]["name"]
            args = [ns, name, "staging", 2, signed(redis_url, dataclasses.replace(request, name=other))]
        elif attack == "report-with-snapshot":
            task, args, why = REPORT_TASK, [old_snapshot(old)], "old_message_shape"
        else:
            args = [ns, name, "staging", 2, signed(redis_url, request)]
        lpush(redis_url, task, args)
        if attack == "signed-force":
            stack.wait("c1 re-deployed", lambda: stack.image() == deployed_image(origin.c1))
            forced = [e for e in stack.delivery(old["metadata"]["labels"][pr.L_DELIVERY])["log"] if e["step"] == "deploy_forced"]
            assert forced and "alice" in forced[0]["detail"]
            return
        line = wait_event(stack, "worker", "task_refused", task=task)
    assert line["reason"] == why and line["level"] == "warning"
    assert stack.image() == deployed_image(origin.c2)
    assert stack.images.rollouts_to(deployed_image(origin.c1)) == 1  # its own automatic deploy, nothing since
    if why == "untrusted_request":
        # The run is ours, so the person's re-deploy history says why (its own status scope, attempt 2).
        stack.wait("deploy/staging failed on c1", lambda: stack.gitlab.states(origin.c1, DEPLOY_STATUS)[-1:] == ["failed"])
        described = [c.body["description"] for c in stack.gitlab.calls if (c.body or {}).get("state") == "failed"]
        assert any("not deployed" in d for d in described)


def test_a_run_with_garbage_annotations_is_reported_and_deployed_from_the_store(
        stack: Stack, kube: FakeKubeAPI, origin: Origin, attacker: Attacker) -> None:
    """Someone with `patch` rewrites our run's annotations (non-numeric attempt, bad JSON deploy list, their image, clone URL
    and repo): nothing crashes, the status goes to the right project, staging gets the image the routing file names."""
    with TektonSimulator(kube, auto_start=0.2, auto_finish=3.0), RolloutSimulator(kube):
        stack.push("one", sha=origin.c1)
        stack.wait("running", lambda: stack.gitlab.states(origin.c1, STATUS)[-1:] == ["running"])
        [run] = stack.runs()
        kube.mutate("pipelineruns", "ci", run["metadata"]["name"], lambda o: o["metadata"]["annotations"].update({
            pr.A_ATTEMPT: "NaN", pr.A_DEPLOY: "{not json", pr.A_IMAGE: "evil.example/pwn:latest", pr.A_CLONE_URL: attacker.url,
            pr.A_REPO: "acme/other-project", pr.A_REPO_ID: "999", pr.A_STATUS_NAME: "evil/status"}))
        stack.wait("deployed", lambda: stack.gitlab.states(origin.c1, DEPLOY_STATUS)[-1:] == ["success"])
    assert stack.gitlab.states(origin.c1, STATUS) == ["pending", "running", "success"]
    assert all("/projects/42/" in c.path for c in stack.gitlab.calls if c.method == "POST")
    assert not [c for c in stack.gitlab.calls if (c.body or {}).get("name") == "evil/status"]
    assert stack.image() == deployed_image(origin.c1) and attacker.requests == []
    assert events(stack, "worker", "task_crashed") == []


def test_a_poison_record_fails_its_delivery_once_and_is_never_requeued(
        stack: Stack, origin: Origin, redis_url: str, tmp_path: Path) -> None:
    """A stored record the worker cannot handle (an unknown ref kind): failed, the exception class in its log, a failed
    status, and the stranded-delivery sweep leaves it alone."""
    from broker.services.sweep import sweeper

    store = SyncStore(redis_url, timeout=2)
    delivery_id = new_delivery_id()
    push = {"host": "gitlab", "host_kind": "gitlab", "repo": "acme/shop-api", "repo_id": "42", "ref": "refs/heads/main",
            "kind": "something-new", "name": "main", "sha": origin.c1, "pushed": origin.c1, "web_url": "::::"}
    record = {"delivery_id": delivery_id, "host": "gitlab", "host_kind": "gitlab", "event": "push", "received_at": iso(time.time()),
              "decision": "accepted", "code": "accepted", "reason": "", "routes": ["shop-api"], "push": push, "headers": {}}
    store.add_delivery(record=record, log=[{"at": iso(time.time()), "step": "queued", "detail": "queued"}], queue=QUEUE, ttl=3600,
                       call=TaskCall(PROCESS_TASK, delivery_id, (delivery_id,), origin="test"))
    stack.wait("delivery failed", lambda: stack.delivery(delivery_id)["state"] == "failed")
    failed = [e for e in stack.delivery(delivery_id)["log"] if e["step"] == "failed"]
    assert failed and failed[-1]["error_class"] == "ValueError" and "not retried" in failed[-1]["detail"]
    stack.wait("failed status", lambda: stack.gitlab.states(origin.c1, STATUS) == ["failed"])
    assert stack.runs() == []
    settings = make_settings(tmp_path, routing=stack.config.read_text(), environ={"CIBROKER_REDIS_URL": redis_url})
    assert sweeper(store, queue=settings.env.queue, resync_seconds=settings.env.resync_seconds, older_than=0)() == 0
    assert len(events(stack, "worker", "task_crashed")) == 1


def test_a_person_cancels_through_a_signed_request_and_a_forged_one_is_refused(
        stack: Stack, kube: FakeKubeAPI, origin: Origin, redis_url: str) -> None:
    """cibroker.cancel_run: unsigned -> refused, run untouched; signed -> cancelled with who and why, in the decision log."""
    with TektonSimulator(kube, auto_start=0.2, auto_finish=30.0):
        delivery = stack.push("one", sha=origin.c1)
        stack.wait("running", lambda: stack.gitlab.states(origin.c1, STATUS)[-1:] == ["running"])
        [run] = stack.runs()
        name = run["metadata"]["name"]
        request = PersonRequest(request_id="cancel-1", action="cancel", namespace="ci", name=name, actor="bob", channel="api",
                                reason="wrong branch", at=iso(time.time()))
        lpush(redis_url, CANCEL_TASK, [unsigned(redis_url, dataclasses.replace(request, request_id="cancel-0"))])
        line = wait_event(stack, "worker", "task_refused", task=CANCEL_TASK)
        assert line["reason"] == "untrusted_request"
        assert not kube.get("pipelineruns", "ci", name)["spec"].get("status")  # untouched
        lpush(redis_url, CANCEL_TASK, [signed(redis_url, request)])
        stack.wait("canceled", lambda: stack.gitlab.states(origin.c1, STATUS)[-1:] == ["canceled"])
    obj = kube.get("pipelineruns", "ci", name)
    assert obj["spec"]["status"] == "Cancelled"
    assert obj["metadata"]["annotations"]["cibroker.dev/cancelled-by"] == "bob"
    assert [c.body["description"] for c in stack.gitlab.calls if (c.body or {}).get("state") == "canceled"] == [
        "build-test-push: canceled by bob: wrong branch"]
    steps = [e for e in stack.delivery(delivery)["log"] if e["step"] == "cancel_requested"]
    assert steps and "bob via api" in steps[0]["detail"]


@pytest.mark.parametrize("role", ["worker", "watcher"])
def test_worker_and_watcher_refuse_to_start_without_the_signing_key(tmp_path: Path, role: str, stack: Stack) -> None:
    env = {k: v for k, v in stack.env.items() if k != "CIBROKER_SIGNING_KEY"}
    done = subprocess.run([str(Path(__file__).parents[2] / ".venv" / "bin" / "cibroker"), role, "--config", str(stack.config)],
                          env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 2 and "CIBROKER_SIGNING_KEY" in done.stderr, done.stderr


# ---- the verifier on its own (no processes): garbage in, a verdict out, one Redis read per run ----------------------


class CountingLookup:
    def __init__(self, store: SyncStore) -> None:
        self.store, self.calls = store, 0

    def __call__(self, delivery_id: str, namespace: str, name: str) -> Any:
        self.calls += 1
        return self.store.delivery_run(delivery_id, namespace, name)


@pytest.mark.parametrize("garbage", [
    {}, {"metadata": None}, {"metadata": {"labels": "x", "annotations": 7}},
    {"metadata": {"name": "r", "namespace": "ci", "labels": {pr.L_DELIVERY: ["a"]}, "annotations": {A_SIGNATURE: 12}}},
    {"metadata": {"name": "r", "namespace": "ci", "labels": {pr.L_DELIVERY: "a" * 500}}},
    {"metadata": {"name": "r", "namespace": "ci", "labels": {pr.L_DELIVERY: "../../x"}}},
])
def test_garbage_runs_get_a_verdict_not_an_exception(tmp_path: Path, redis_url: str, garbage: dict[str, Any]) -> None:
    from broker.services.provenance import REASONS, RunVerifier

    settings = make_settings(tmp_path, environ={"CIBROKER_REDIS_URL": redis_url})
    verifier = RunVerifier(key=KEY, routing=settings.routing, lookup=SyncStore(redis_url, timeout=2).delivery_run)
    verdict = verifier.verify(garbage)
    assert not verdict.trusted and verdict.reason in REASONS and verdict.detail


def test_a_malformed_stored_record_makes_its_run_untrusted_not_a_crash(tmp_path: Path, redis_url: str) -> None:
    """Redis holds a record the verifier cannot read (no push): `malformed_record`, and one Redis read per run."""
    from broker.services.provenance import RunVerifier

    store = SyncStore(redis_url, timeout=2)
    settings = make_settings(tmp_path, environ={"CIBROKER_REDIS_URL": redis_url})
    delivery_id = new_delivery_id()
    store.add_delivery(record={"delivery_id": delivery_id, "host": "gitlab"}, log=[{"step": "x"}], queue="unused",
                       call=TaskCall(PROCESS_TASK, delivery_id, (delivery_id,)), ttl=60)
    store.own_run(delivery_id, namespace="ci", name="r", route="shop-api", sha="1" * 40, attempt=1)
    lookup = CountingLookup(store)
    verifier = RunVerifier(key=KEY, routing=settings.routing, lookup=lookup)
    run = {"metadata": {"name": "r", "namespace": "ci", "labels": {pr.L_DELIVERY: delivery_id}, "annotations": {A_SIGNATURE: "v1:x"}}}
    for _ in range(5):
        assert verifier.verify(run).reason == "malformed_record"
    assert lookup.calls == 1
