"""Worlds for service tests: the edge and the orchestrator (and the on-call service) wired to recording
fakes of the ports and the real Redis store. Shared by tests/services and tests/edge."""

from __future__ import annotations

import base64
import json
from typing import Any

import redis
from starlette.testclient import TestClient

from broker.adapters.redis_store import SyncStore
from broker.services.oncall import Actor, Operations
from broker.services.runs import Orchestrator
from config.settings import Settings
from tests.support import payload, web_app
from tests.support.fakes.ports import FakeCluster, FakeGitHost, FakeResolver

SHA1 = "1111111111111111111111111111111111111111"
SHA2 = "2222222222222222222222222222222222222222"
TAG_OBJECT = "7777777777777777777777777777777777777777"
OLD_IMAGE = "registry.example.com/acme/shop-api:0000000000000000000000000000000000000000"


def body(*, ref: str = "refs/heads/main", sha: str = SHA1, before: str = "0" * 40, after: str | None = None) -> bytes:
    data = json.loads(payload("gitlab/push-branch-update.json"))
    data.update(ref=ref, before=before, after=after or sha, checkout_sha=sha)
    data["object_kind"] = "tag_push" if ref.startswith("refs/tags/") else "push"
    data["project"]["path_with_namespace"] = "acme/shop-api"
    data["project"]["web_url"] = "https://gitlab.example.com/acme/shop-api"  # the routing file's host (issue 11)
    data["commits"] = [{"id": sha, "message": "change\n"}]
    return json.dumps(data).encode()


class World:
    """Edge + orchestrator wired to fakes: `push()` accepts a webhook, `orch.start()` runs it."""

    def __init__(self, settings: Settings, redis_url: str) -> None:
        self.settings = settings
        self.cluster = FakeCluster(service_accounts={("ci", "pipeline-bot")})
        self.host = FakeGitHost()
        self.resolver = FakeResolver()
        self.deploys: list[str] = []
        self.orch = Orchestrator(settings=settings, store=SyncStore(redis_url, timeout=2), cluster=self.cluster,
                                 git_hosts={"gitlab": self.host}, resolver=self.resolver,
                                 on_success=lambda ref: self.deploys.append(ref.name))
        self.client = TestClient(web_app(settings))
        self.client.__enter__()
        self.cluster.deployments[("staging", "shop-api")] = {
            "metadata": {"name": "shop-api", "namespace": "staging", "generation": 1, "annotations": {}},
            "spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "api", "image": OLD_IMAGE},
                                                                           {"name": "sidecar", "image": "envoy:1"}]}}},
            "status": {"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2},
        }

    def push(self, key: str, **kw: Any) -> str:
        """Push (the remote's branch moves to the commit, as `git push` does), then its webhook."""
        ref = kw.get("ref", "refs/heads/main")
        if ref.startswith("refs/heads/"):
            self.resolver.push(ref.removeprefix("refs/heads/"), kw.get("sha", SHA1), before=kw.get("before", "0" * 40))
        event = "Tag Push Hook" if kw.get("ref", "").startswith("refs/tags/") else "Push Hook"
        r = self.client.post("/hooks/gitlab", content=body(**kw),
                             headers={"X-Gitlab-Event": event, "X-Gitlab-Token": "topsecret", "Idempotency-Key": key})
        assert r.status_code == 202, r.text
        return r.json()["delivery_id"]

    def only_run(self) -> dict[str, Any]:
        assert len(self.cluster.runs) == 1
        return next(iter(self.cluster.runs.values()))

    def close(self) -> None:
        self.client.__exit__(None, None, None)


ALICE = Actor(who="alice@laptop", channel="cli")
SIGNING_KEY = "a-test-signing-key-of-at-least-32-characters"


class OpsWorld(World):
    def __init__(self, settings: Any, redis_url: str) -> None:
        super().__init__(settings, redis_url)
        self.redis = redis.Redis.from_url(redis_url)
        self.ops = Operations(settings=settings, store=self.orch.store, cluster=self.cluster, resolver=self.resolver)

    def built(self, key: str = "a", **kw: Any) -> tuple[str, str]:
        """A push that was accepted and whose run was created; returns (delivery id, run key)."""
        delivery = self.push(key, **kw)
        self.take_tasks()
        [name] = self.orch.start(delivery, token=f"t-{key}")
        return delivery, f"ci/{name}"

    def take_tasks(self) -> list[tuple[str, list[Any]]]:
        """Pop every queued Celery message: (task name, args)."""
        out = []
        while (raw := self.redis.rpop(self.settings.env.queue)) is not None:
            message = json.loads(raw)
            args, _, _ = json.loads(base64.b64decode(message["body"]))
            out.append((message["headers"]["task"], args))
        return out

    def finish(self, run: str, status: str = "True", reason: str = "Succeeded") -> dict[str, Any]:
        namespace, name = run.split("/")
        return self.cluster.set_condition(namespace, name, status, reason)
