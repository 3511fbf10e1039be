"""The cibroker processes (serve, worker, watcher) against the fakes they talk to, for end-to-end tests.

`Stack` runs the real `cibroker serve`, `cibroker worker` and `cibroker watcher` as child
processes with a real redis-server, the fake Kubernetes API (the test moves PipelineRuns
with the Tekton and rollout simulators) and the fake GitLab API. Test modules take the
fixtures by importing them: `from tests.stack import fake_gitlab_api, kube, stack`.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakes.githost_api import GITLAB_TOKEN, FakeGitLab
from tests.fakes.kube_api import FakeKubeAPI
from tests.fakes.rollout import seed_deployment, seed_service_account
from tests.support import SECRETS, free_port, payload
from tests.test_e2e import Process, base_env, wait_healthy

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


def push_body(*, sha: str = SHA1, ref: str = "refs/heads/main", before: str = "0" * 40, after: str | None = None,
              repo: str = "acme/shop-api", project_id: int = 42) -> bytes:
    data = json.loads(payload("gitlab/push-branch-update.json"))
    data.update(ref=ref, before=before, after=after or sha, checkout_sha=sha, project_id=project_id)
    data["object_kind"] = "tag_push" if ref.startswith("refs/tags/") else "push"
    data["project"].update(path_with_namespace=repo, id=project_id)
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

    def push(self, key: str, *, expect: int = 202, **kw: Any) -> str:
        """POST a push webhook; its delivery id (202 accepted, or 200 ignored with `expect=200`)."""
        event = "Tag Push Hook" if kw.get("ref", "").startswith("refs/tags/") else "Push Hook"
        r = httpx.post(f"{self.url}/hooks/gitlab", content=push_body(**kw), timeout=10,
                       headers={"X-Gitlab-Event": event, "X-Gitlab-Token": SECRETS["GITLAB_WEBHOOK_SECRET"], "Idempotency-Key": key})
        assert r.status_code == expect, r.text
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
