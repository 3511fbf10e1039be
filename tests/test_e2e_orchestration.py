"""End to end: webhook -> PipelineRun -> watch -> deploy -> commit statuses, with real processes.

`cibroker serve`, `cibroker worker` and `cibroker watcher` run as child processes against
a real redis-server, the fake Kubernetes API (Tekton and rollout simulators moving the
objects) and the fake GitLab API, which enforces GitLab's commit-status transitions.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakes.githost_api import GITLAB_TOKEN, FakeGitLab
from tests.fakes.kube_api import FakeKubeAPI
from tests.fakes.rollout import RolloutSimulator, seed_deployment, seed_service_account
from tests.fakes.tekton import TektonSimulator
from tests.support import SECRETS, free_port, payload
from tests.test_e2e import Process, base_env, wait_healthy

pytestmark = pytest.mark.e2e
SHA1 = "1111111111111111111111111111111111111111"
SHA2 = "2222222222222222222222222222222222222222"
OLD_IMAGE = "registry.example.com/acme/shop-api:0000000000000000000000000000000000000000"
STATUS = "cibroker/build-test-push"


def routing(gitlab_url: str, clone_url: str) -> str:
    return f"""
defaults: {{namespace: ci, service_account: pipeline-bot, status_name: "cibroker/{{pipeline}}",
           target_url: "https://tekton.example.com/#/namespaces/{{namespace}}/pipelineruns/{{name}}"}}
hosts:
  gitlab:
    kind: gitlab
    api_url: {gitlab_url}
    token: {{env: GITLAB_API_TOKEN}}
    webhook_secrets: [{{env: GITLAB_WEBHOOK_SECRET}}]
routes:
  - name: shop-api
    host: gitlab
    repo: acme/shop-api
    clone_url: {clone_url}
    events: {{branches: [main], tags: ["v*"]}}
    pipeline: build-test-push
    image: registry.example.com/acme/shop-api
    deploy:
      - {{environment: staging, when: {{branches: [main]}}, namespace: staging, deployment: shop-api, container: api}}
"""


def push_body(*, sha: str = SHA1, ref: str = "refs/heads/main", before: str = "0" * 40, after: str | None = None) -> bytes:
    data = json.loads(payload("gitlab/push-branch-update.json"))
    data.update(ref=ref, before=before, after=after or sha, checkout_sha=sha, project_id=42)
    data["object_kind"] = "tag_push" if ref.startswith("refs/tags/") else "push"
    data["project"].update(path_with_namespace="acme/shop-api", id=42)
    data["commits"] = [{"id": sha, "message": "change\n"}]
    return json.dumps(data).encode()


class Stack:
    """The three cibroker processes plus the fakes they talk to."""

    def __init__(self, tmp_path: Path, redis_url: str, kube: FakeKubeAPI, gitlab: FakeGitLab, clone_url: str) -> None:
        self.tmp_path, self.kube, self.gitlab = tmp_path, kube, gitlab
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": kube.url}}],
            "users": [{"name": "fake", "user": {"token": "fake-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
        }))
        self.config = tmp_path / "routing.yaml"
        self.config.write_text(routing(gitlab.api_url, clone_url))
        self.env = base_env(tmp_path, CIBROKER_REDIS_URL=redis_url, KUBECONFIG=str(kubeconfig), GITLAB_API_TOKEN=GITLAB_TOKEN,
                            CIBROKER_API_TOKENS="t", CIBROKER_RESYNC_SECONDS="5", CIBROKER_VISIBILITY_TIMEOUT_SECONDS="5")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs: dict[str, Process] = {}
        seed_service_account(kube, namespace="ci", name="pipeline-bot")
        seed_deployment(kube, namespace="staging", name="shop-api", container="api", image=OLD_IMAGE, replicas=2)

    def start(self, role: str) -> Process:
        args = {"serve": ["serve", "--port", str(self.port)], "worker": ["worker", "--concurrency", "2"],
                "watcher": ["watcher"]}[role]
        proc = Process([*args, "--config", str(self.config)], env=self.env, cwd=self.tmp_path,
                       log=self.tmp_path / f"{role}-{time.monotonic_ns()}.log")
        self.procs[role] = proc
        if role == "serve":
            wait_healthy(self.url, proc)
        return proc

    def kill(self, role: str) -> None:
        self.procs[role].proc.send_signal(signal.SIGKILL)
        self.procs[role].proc.wait()

    def push(self, key: str, **kw: Any) -> str:
        event = "Tag Push Hook" if kw.get("ref", "").startswith("refs/tags/") else "Push Hook"
        r = httpx.post(f"{self.url}/hooks/gitlab", content=push_body(**kw), timeout=10,
                       headers={"X-Gitlab-Event": event, "X-Gitlab-Token": SECRETS["GITLAB_WEBHOOK_SECRET"], "Idempotency-Key": key})
        assert r.status_code == 202, r.text
        return r.json()["delivery_id"]

    def delivery(self, delivery_id: str) -> dict[str, Any]:
        return httpx.get(f"{self.url}/api/deliveries/{delivery_id}", headers={"Authorization": "Bearer t"}).json()

    def runs(self) -> list[dict[str, Any]]:
        return self.kube.list("pipelineruns", "ci")

    def image(self) -> str:
        dep = self.kube.get("deployments", "staging", "shop-api")
        return next(c["image"] for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "api")

    def logs(self) -> str:
        return "\n".join(f"--- {p.log.name}\n{p.log.read_text()[-3000:]}" for p in self.procs.values())

    def wait(self, what: str, check: Callable[[], bool], timeout: float = 45) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}\nstatuses: {self.gitlab.calls[-6:]}\n{self.logs()}")
            time.sleep(0.1)

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.stop()


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
    s = Stack(tmp_path, redis_url, kube, fake_gitlab_api, clone_url="https://gitlab.example.com/acme/shop-api.git")
    for role in ("serve", "worker", "watcher"):
        s.start(role)
    yield s
    s.stop()


def test_push_to_main_builds_once_reports_in_order_and_rolls_staging_out(stack: Stack, kube: FakeKubeAPI) -> None:
    """webhook -> one PipelineRun -> pending, running, success -> staging at image:<commit> -> deploy/staging success."""
    with TektonSimulator(kube, auto_start=0.3, auto_finish=1.5), RolloutSimulator(kube):
        first = stack.push("one")
        second = stack.push("one-again-by-group-hook")  # the same push from a second hook: no second run
        stack.wait("deploy/staging success", lambda: stack.gitlab.states(SHA1, "deploy/staging")[-1:] == ["success"])
    assert stack.gitlab.states(SHA1, STATUS) == ["pending", "running", "success"]
    assert stack.gitlab.states(SHA1, "deploy/staging") == ["running", "success"]
    assert len(stack.runs()) == 1
    assert stack.image() == f"registry.example.com/acme/shop-api:{SHA1}"
    steps = sorted(e["step"] for d in (first, second) for e in stack.delivery(d)["log"]
                   if e["step"].startswith("pipelinerun_"))
    assert steps == ["pipelinerun_created", "pipelinerun_exists"]  # whichever worker came first created it
    posted = [c for c in stack.gitlab.calls if c.method == "POST" and c.status == 201]
    assert all("tekton.example.com/#/namespaces/ci/pipelineruns/" in (c.body or {}).get("target_url", "") for c in posted[:3])


def test_failed_run_reports_the_failing_task_and_does_not_deploy(stack: Stack, kube: FakeKubeAPI) -> None:
    with TektonSimulator(kube, auto_start=0.3, auto_finish=1.0, outcome="fail", fail_task="build"):
        stack.push("f")
        stack.wait("failed status", lambda: stack.gitlab.states(SHA1, STATUS)[-1:] == ["failed"])
    assert stack.gitlab.states(SHA1, STATUS) == ["pending", "running", "failed"]
    failed = [c for c in stack.gitlab.calls if (c.body or {}).get("state") == "failed"][-1]
    assert "task build failed" in failed.body["description"]
    assert stack.gitlab.states(SHA1, "deploy/staging") == []
    assert stack.image() == OLD_IMAGE


def test_a_newer_push_cancels_the_older_run_and_says_so(stack: Stack, kube: FakeKubeAPI) -> None:
    with TektonSimulator(kube, auto_start=0.2, auto_finish=4.0), RolloutSimulator(kube):
        stack.push("old", sha=SHA1)
        stack.wait("first run running", lambda: stack.gitlab.states(SHA1, STATUS)[-1:] == ["running"])
        stack.push("new", sha=SHA2, before=SHA1)
        stack.wait("old run canceled", lambda: stack.gitlab.states(SHA1, STATUS)[-1:] == ["canceled"])
        stack.wait("new run deployed", lambda: stack.gitlab.states(SHA2, "deploy/staging")[-1:] == ["success"])
    canceled = [c for c in stack.gitlab.calls if (c.body or {}).get("state") == "canceled"][-1]
    assert canceled.body["description"] == "build-test-push: canceled, superseded by 22222222"
    assert stack.gitlab.states(SHA2, STATUS) == ["pending", "running", "success"]
    assert stack.image().endswith(SHA2)


def test_failed_rollout_is_rolled_back_and_reported(stack: Stack, kube: FakeKubeAPI) -> None:
    with TektonSimulator(kube, auto_start=0.2, auto_finish=0.8), RolloutSimulator(kube, outcome="deadline-exceeded"):
        stack.push("r")
        stack.wait("deploy failed", lambda: stack.gitlab.states(SHA1, "deploy/staging")[-1:] == ["failed"])
    failed = [c for c in stack.gitlab.calls if (c.body or {}).get("name") == "deploy/staging"][-1]
    assert "rolled back to " + OLD_IMAGE in failed.body["description"]
    assert stack.image() == OLD_IMAGE
    assert stack.gitlab.states(SHA1, STATUS) == ["pending", "running", "success"]


def test_watcher_restart_mid_run_still_reports_the_end(stack: Stack, kube: FakeKubeAPI) -> None:
    """The run finishes while no watcher runs; the next watcher's list-and-resync reports it."""
    with TektonSimulator(kube, auto_start=0.2, auto_finish=3.0), RolloutSimulator(kube):
        stack.push("w")
        stack.wait("running", lambda: stack.gitlab.states(SHA1, STATUS)[-1:] == ["running"])
        stack.kill("watcher")
        stack.wait("the run ends in the cluster", lambda: any(
            c.get("status") == "True" for r in stack.runs() for c in r.get("status", {}).get("conditions", [])))
        assert stack.gitlab.states(SHA1, STATUS) == ["pending", "running"]
        stack.start("watcher")
        stack.wait("success after restart", lambda: stack.gitlab.states(SHA1, "deploy/staging")[-1:] == ["success"])
    assert stack.gitlab.states(SHA1, STATUS) == ["pending", "running", "success"]


def test_worker_killed_while_creating_the_run_makes_exactly_one(stack: Stack, kube: FakeKubeAPI) -> None:
    """kill -9 of the worker inside the create call: the task is redelivered and AlreadyExists counts as done."""
    kube.delay(r"/pipelineruns$", 2.0, method="POST", times=1)
    with TektonSimulator(kube, auto_start=0.2, auto_finish=0.5), RolloutSimulator(kube):
        stack.push("k")
        stack.wait("create request in flight", lambda: bool(kube.calls("POST", r"/pipelineruns$")), timeout=20)
        stack.kill("worker")
        stack.start("worker")
        stack.wait("success after redelivery", lambda: stack.gitlab.states(SHA1, STATUS)[-1:] == ["success"], timeout=60)
    assert len(stack.runs()) == 1
    # The watcher may report `running` before the redelivered task gets to `pending`; then pending is
    # (rightly) never posted, because reports only move forward.
    assert stack.gitlab.states(SHA1, STATUS) in (["pending", "running", "success"], ["running", "success"])
    assert not [c for c in stack.gitlab.calls if c.status == 400]  # no illegal transition was ever attempted


def test_annotated_tag_is_peeled_with_git_and_built(tmp_path: Path, redis_url: str, kube: FakeKubeAPI,
                                                    fake_gitlab_api: FakeGitLab) -> None:
    """A real repository: the tag push gave the tag object; ls-remote peels it to the commit that is built."""
    repo = tmp_path / "origin"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-C", str(repo)]
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    (repo / "f").write_text("x")
    subprocess.run([*git, "add", "f"], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    subprocess.run([*git, "tag", "-a", "v1.0.0", "-m", "release"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    tag_object = subprocess.run([*git, "rev-parse", "v1.0.0"], check=True, capture_output=True, text=True).stdout.strip()
    assert commit != tag_object
    s = Stack(tmp_path, redis_url, kube, fake_gitlab_api, clone_url=f"file://{repo}")
    try:
        for role in ("serve", "worker", "watcher"):
            s.start(role)
        with TektonSimulator(kube, auto_start=0.2, auto_finish=0.5):
            data = json.loads(push_body(sha=tag_object, ref="refs/tags/v1.0.0"))
            data.pop("checkout_sha")
            r = httpx.post(f"{s.url}/hooks/gitlab", content=json.dumps(data).encode(),
                           headers={"X-Gitlab-Event": "Tag Push Hook", "X-Gitlab-Token": SECRETS["GITLAB_WEBHOOK_SECRET"]})
            assert r.status_code == 202
            s.wait("tag build success", lambda: fake_gitlab_api.states(commit, STATUS)[-1:] == ["success"])
        [run] = s.runs()
        params = {p["name"]: p["value"] for p in run["spec"]["params"]}
        assert params["git-revision"] == commit and params["image"].endswith(":" + commit)
        assert fake_gitlab_api.states(commit, "deploy/staging") == []  # staging deploys main only
    finally:
        s.stop()
