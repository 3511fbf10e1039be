"""The on-call surface played by an attacker, through the real adapters.

The real ASGI app (API and dashboard) and the real Redis store, over workers.adapters.kube.KubeCluster
talking to the wire-level fake Kubernetes API (tests/fakes/kube_api.py); the CLI as a real
process against the same fakes. Runs with garbage labels and annotations are created straight
in the fake API server, as anyone with `create` on PipelineRuns could. What is checked is what
reaches the outside: HTTP answers, exit codes, the raw task messages on the Redis list, the
requests the fake API server saw, and broker.core.trust's own verification of what was stored.

A worker's consumers of `cibroker.deploy` and `cibroker.cancel_run` are not exercised here: this
module proves what the on-call side writes and queues, and that it writes nothing to the cluster.
"""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from structlog.testing import capture_logs
from starlette.testclient import TestClient

from broker.core import pipelinerun as pr
from broker.core.errors import Untrusted
from broker.services.oncall import Operations
from broker.adapters.redis_store import SyncStore
from broker.core.trust import verify_request
from tests.support import web_app
from config.settings import Settings
from tests.support.fakes.kube_api import FakeKubeAPI
from tests.support.fakes.ports import FakeGitHost, FakeResolver
from tests.support.fakes.rollout import seed_service_account
from tests.support.stack import SHA1, SHA2, hook_headers, push_body
from tests.support import CIBROKER, base_env, make_settings
from workers.adapters.kube import KubeCluster
from broker.services.runs import Orchestrator

TOKEN = "oncall-trust-test-token-0b1c"
SIGNING_KEY = "oncall-trust-test-signing-key-32-characters-at-least"
QUEUE = "cibroker"
ROUTING = """
defaults: {namespace: ci, service_account: pipeline-bot, status_name: "cibroker/{pipeline}"}
hosts:
  gitlab:
    kind: gitlab
    api_url: https://gitlab.example.com/api/v4
    webhook_secrets: [{env: GITLAB_WEBHOOK_SECRET}]
  github:
    kind: github
    api_url: https://api.github.com
    webhook_secrets: [{env: GITHUB_WEBHOOK_SECRET}]
routes:
  - name: shop-api
    host: gitlab
    repo: acme/shop-api
    clone_url: https://gitlab.example.com/acme/shop-api.git
    events: {branches: [main], tags: ["v*"]}
    pipeline: build-test-push
    image: registry.example.com/acme/shop-api
    deploy:
      - {environment: staging, when: {branches: [main]}, namespace: staging, deployment: shop-api, container: api}
  - name: shop-web
    host: gitlab
    repo: acme/shop-web
    clone_url: https://gitlab.example.com/acme/shop-web.git
    events: {branches: [main]}
    pipeline: build-test-push
    image: registry.example.com/acme/shop-web
  - name: api-releases
    host: gitlab
    repo: acme/shop-api
    clone_url: https://gitlab.example.com/acme/shop-api.git
    events: {tags: ["v*"]}
    pipeline: build-test-push
    image: registry.example.com/acme/shop-api
    deploy:
      - {environment: production, namespace: prod, deployment: shop-api, container: api}
  - name: gh-api
    host: github
    repo: acme/shop-api
    clone_url: https://github.com/acme/shop-api.git
    events: {branches: [main]}
    pipeline: build-test-push
    image: registry.example.com/acme/shop-api
"""


class Door:
    """The web app (API, dashboard, webhook edge) and a worker's orchestrator, both over the fake API server."""

    def __init__(self, tmp_path: Path, redis_url: str, kube_api: FakeKubeAPI, cluster: KubeCluster) -> None:
        self.tmp_path, self.kube_api, self.redis_url = tmp_path, kube_api, redis_url
        self.settings: Settings = make_settings(tmp_path, routing=ROUTING, environ={
            "CIBROKER_REDIS_URL": redis_url, "CIBROKER_API_TOKENS": f"ops={TOKEN}", "CIBROKER_SIGNING_KEY": SIGNING_KEY})
        self.redis = redis.Redis.from_url(redis_url)
        self.store = SyncStore(redis_url, timeout=2)
        self.resolver = FakeResolver(branches={"main": SHA2}, ancestry={(SHA1, SHA2)})  # the origin: SHA1 is SHA2's parent
        self.orch = Orchestrator(settings=self.settings, store=self.store, cluster=cluster,
                                 git_hosts={"gitlab": FakeGitHost()}, resolver=self.resolver)
        self.ops = Operations(settings=self.settings, store=self.store, cluster=cluster, resolver=self.resolver)
        self.client = TestClient(web_app(self.settings, operations=self.ops))
        self.client.__enter__()
        seed_service_account(kube_api, namespace="ci", name="pipeline-bot")

    def close(self) -> None:
        self.client.__exit__(None, None, None)
        self.redis.close()

    def api(self, method: str, path: str, **kw: Any) -> Any:
        return self.client.request(method, path, headers={"Authorization": f"Bearer {TOKEN}", "X-Cibroker-Actor": "mallory"},
                                   **kw)

    def built(self, key: str = "a") -> tuple[str, str]:
        """A push accepted by the edge and made into a PipelineRun by the worker's code: (delivery id, run name)."""
        r = self.client.post("/hooks/gitlab", content=push_body(sha=SHA1), headers=hook_headers(key))
        assert r.status_code == 202, r.text
        delivery_id = r.json()["delivery_id"]
        self.redis.delete(QUEUE)  # the worker took the task
        [name] = self.orch.start(delivery_id, token=f"t-{key}")
        return delivery_id, name

    def succeed(self, name: str) -> None:
        self.kube_api.mutate("pipelineruns", "ci", name, lambda o: {**o, "status": {
            "conditions": [{"type": "Succeeded", "status": "True", "reason": "Succeeded"}],
            "startTime": "2026-11-22T10:00:00Z", "completionTime": "2026-11-22T10:02:00Z"}})

    def queued(self) -> list[tuple[str, str, list[Any]]]:
        """Every raw task message on the Redis list, oldest first: (task name, task id, args)."""
        out = []
        for raw in reversed(self.redis.lrange(QUEUE, 0, -1)):
            message = json.loads(raw)
            args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
            assert kwargs == {}
            out.append((message["headers"]["task"], message["headers"]["id"], args))
        return out

    def audit(self) -> list[dict[str, Any]]:
        return self.api("GET", "/api/audit").json()

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The real `cibroker` CLI, locally against the same Redis and the fake API server."""
        kubeconfig = self.tmp_path / "kubeconfig"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.kube_api.url}}],
            "users": [{"name": "fake", "user": {"token": "t"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}]}))
        env = base_env(self.tmp_path, CIBROKER_REDIS_URL=self.redis_url, KUBECONFIG=str(kubeconfig),
                       CIBROKER_SIGNING_KEY=SIGNING_KEY)
        return subprocess.run([CIBROKER, *args, "--config", str(self.tmp_path / "routing.yaml")], env=env, cwd=self.tmp_path,
                              capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


@pytest.fixture
def door(tmp_path: Path, redis_url: str, kube_api: FakeKubeAPI, kube_cluster: KubeCluster) -> Iterator[Door]:
    d = Door(tmp_path, redis_url, kube_api, kube_cluster)
    yield d
    d.close()


def forged(name: str, *, labels: dict[str, Any] | None = None, annotations: dict[str, Any] | None = None,
           status: dict[str, Any] | None = None) -> dict[str, Any]:
    """A PipelineRun made by someone else's hands, labelled as cibroker's."""
    base_labels = {pr.MANAGED_BY[0]: pr.MANAGED_BY[1], pr.L_ROUTE: "shop-api", pr.L_HOST: "gitlab", pr.L_SHA: SHA1,
                   pr.L_DELIVERY: "0" * 26}
    base_annotations = {pr.A_REPO: "acme/shop-api", pr.A_REF: "refs/heads/main", pr.A_ATTEMPT: "1",
                        pr.A_DEPLOY: '["staging"]', pr.A_IMAGE: "registry.example.com/acme/shop-api:x"}
    return {"apiVersion": "tekton.dev/v1", "kind": "PipelineRun",
            "metadata": {"name": name, "namespace": "ci", "labels": {**base_labels, **(labels or {})},
                         "annotations": {**base_annotations, **(annotations or {})}},
            "spec": {"pipelineRef": {"name": "build-test-push"}},
            "status": status or {"conditions": [{"type": "Succeeded", "status": "True", "reason": "Succeeded"}]}}


# What a real API server lets anyone with `create` write (labels and annotations are strings there;
# non-string values are held by summarize_run's property test in test_operations.py).
GARBAGE = {
    "bad-attempt": ({}, {pr.A_ATTEMPT: "three"}, "annotation cibroker.dev/attempt is not a whole number"),
    "huge-attempt": ({}, {pr.A_ATTEMPT: "9" * 400}, "annotation cibroker.dev/attempt is not a whole number"),
    "bad-deploy": ({}, {pr.A_DEPLOY: "[staging"}, "annotation cibroker.dev/deploy is not a JSON list"),
    "object-deploy": ({}, {pr.A_DEPLOY: '{"environment": "production"}'}, "annotation cibroker.dev/deploy is not a JSON list"),
    "number-deploy": ({}, {pr.A_DEPLOY: "[1, 2]"}, "annotation cibroker.dev/deploy is not a JSON list"),
    "bad-repo": ({}, {pr.A_REPO: "../../etc"}, "annotation cibroker.dev/repo is not valid"),
    "no-repo": ({}, {pr.A_REPO: None}, "annotation cibroker.dev/repo is missing"),
    "bad-ref": ({}, {pr.A_REF: "refs/heads/../../x"}, "annotation cibroker.dev/ref is not valid"),
    "pull-ref": ({}, {pr.A_REF: "refs/pull/1/head"}, "annotation cibroker.dev/ref is not valid"),
    "no-route": ({pr.L_ROUTE: None}, {}, "label cibroker.dev/route is missing"),
    "bad-route": ({pr.L_ROUTE: "Shop_API"}, {}, "label cibroker.dev/route is not valid"),
    "bad-sha": ({pr.L_SHA: "HEAD"}, {}, "label cibroker.dev/sha is not valid"),
    "no-sha": ({pr.L_SHA: None}, {}, "label cibroker.dev/sha is missing"),
    "bad-delivery": ({pr.L_DELIVERY: "etc-passwd"}, {}, "label cibroker.dev/delivery is not valid"),
}


def plant_garbage(door: Door) -> None:
    for name, (labels, annotations, _) in GARBAGE.items():
        body = forged(name, labels=labels, annotations=annotations)
        body["metadata"]["labels"] = {k: v for k, v in body["metadata"]["labels"].items() if v is not None}
        body["metadata"]["annotations"] = {k: v for k, v in body["metadata"]["annotations"].items() if v is not None}
        door.kube_api.put(body)
    # A status that is not a mapping (the status subresource takes what it is given).
    door.kube_api.put({**forged("bad-status"), "status": ["Succeeded"]})


def test_garbage_labels_and_annotations_are_shown_unreadable_naming_the_field_never_a_500(door: Door) -> None:
    delivery_id, good = door.built()
    plant_garbage(door)
    listed = door.api("GET", "/api/runs")
    assert listed.status_code == 200, listed.text
    by_name = {r["name"]: r for r in listed.json()}
    assert by_name[good]["unreadable"] == ""
    for name, (_, _, said) in GARBAGE.items():
        assert said in by_name[name]["unreadable"], (name, by_name[name]["unreadable"])
        shown = door.api("GET", f"/api/runs/ci/{name}")
        assert shown.status_code == 200 and said in shown.json()["unreadable"], shown.text
        page = door.client.get(f"/runs/ci/{name}")
        assert page.status_code == 200 and "This PipelineRun is unreadable" in page.text and "Traceback" not in page.text
        assert f'action="/runs/ci/{name}/rerun"' not in page.text  # nothing is re-run from it
    assert by_name["bad-status"]["unreadable"] == "status is not a mapping" and by_name["bad-status"]["state"] == "pending"
    assert by_name["bad-attempt"]["attempt"] == 1 and by_name["bad-deploy"]["environments"] == []
    index = door.client.get("/")
    assert index.status_code == 200 and index.text.count('class="state unreadable"') == len(GARBAGE) + 1
    assert "unreadable: annotation cibroker.dev/attempt is not a whole number" in index.text
    assert door.client.get(f"/deliveries/{delivery_id}").status_code == 200
    assert door.api("GET", f"/api/deliveries/{delivery_id}").status_code == 200


def test_a_delivery_with_an_unreadable_run_shows_it_as_such_in_its_page_api_and_cli(door: Door) -> None:
    """Someone plants a garbage run labelled with a real delivery's id: the delivery's views flag it, never fail."""
    delivery_id, good = door.built()
    door.kube_api.put(forged("planted", labels={pr.L_DELIVERY: delivery_id}, annotations={pr.A_ATTEMPT: "-1"}))
    found = door.api("GET", f"/api/deliveries/{delivery_id}")
    assert found.status_code == 200, found.text
    runs = {r["name"]: r for r in found.json()["runs"]}
    assert runs[good]["unreadable"] == "" and "annotation cibroker.dev/attempt" in runs["planted"]["unreadable"]
    page = door.client.get(f"/deliveries/{delivery_id}")
    assert page.status_code == 200 and "unreadable: annotation cibroker.dev/attempt" in page.text
    shown = door.cli("deliveries", "show", delivery_id)
    assert shown.returncode == 0 and "ci/planted" in shown.stdout and "unreadable: annotation" in shown.stdout


def test_a_run_naming_a_delivery_that_does_not_exist_still_shows(door: Door) -> None:
    door.kube_api.put(forged("orphan", labels={pr.L_DELIVERY: "f" * 26}))
    page = door.client.get("/runs/ci/orphan")
    assert page.status_code == 200 and "no delivery ffffffff" in page.text
    assert door.api("GET", "/api/runs/ci/orphan").json()["delivery_id"] == "f" * 26
    assert door.api("GET", f"/api/deliveries/{'f' * 26}").status_code == 404
    assert door.client.get("/").status_code == 200


def test_unreadable_runs_in_the_cli_lists_are_flagged_without_a_traceback(door: Door) -> None:
    delivery_id, good = door.built()
    plant_garbage(door)
    listed = door.cli("runs", "list")
    assert listed.returncode == 0, listed.stderr
    assert "Traceback" not in listed.stderr + listed.stdout
    rows = {line.split()[0]: line.split()[1] for line in listed.stdout.splitlines()[1:]}
    assert rows[f"ci/{good}"] == "pending" and rows["ci/bad-attempt"] == "unreadable"
    assert "ci/bad-attempt is unreadable (success in Tekton): annotation cibroker.dev/attempt" in listed.stderr
    shown = door.cli("runs", "show", "ci/bad-deploy")
    assert shown.returncode == 0 and "unreadable: annotation cibroker.dev/deploy is not a JSON list" in shown.stdout
    as_json = json.loads(door.cli("runs", "list", "--json").stdout)
    assert {r["name"] for r in as_json if r["unreadable"]} == set(GARBAGE) | {"bad-status"}
    rerun = door.cli("rerun", "--run", "ci/bad-attempt")
    assert rerun.returncode == 1 and "is unreadable" in rerun.stderr and "Traceback" not in rerun.stderr
    assert door.queued() == []


def test_nothing_is_rerun_or_deployed_from_an_unreadable_run(door: Door) -> None:
    plant_garbage(door)
    for name in GARBAGE:
        for body in ({}, {"deploy_only": True}, {"deploy_only": True, "force": True, "reason": "x"}):
            answer = door.api("POST", f"/api/runs/ci/{name}/rerun", json=body)
            assert answer.status_code == 409 and "is unreadable" in answer.json()["error"], (name, body, answer.text)
    assert door.queued() == [] and door.audit() == []


@pytest.mark.parametrize(("route", "said"), [
    ("shop-web", "route shop-web takes repos 'acme/shop-web', not 'acme/shop-api'"),
    ("gh-api", "route gh-api takes host 'github', not 'gitlab'"),
    ("api-releases", "route api-releases does not build branch 'main' (its branch filters: none)"),
])
def test_a_rerun_on_a_foreign_route_is_refused_naming_the_mismatch(door: Door, route: str, said: str) -> None:
    """From a run, a delivery, a commit or a ref: --route must be a route that would have taken that push."""
    delivery_id, name = door.built()
    asks = [("POST", f"/api/runs/ci/{name}/rerun", {"route": route}),
            ("POST", "/api/rerun", {"delivery_id": delivery_id, "route": route}),
            ("POST", "/api/rerun", {"repo": "acme/shop-api", "sha": SHA1, "route": route})]
    if route != "gh-api":  # by ref there is no push yet: the named route's own host is the host (gh-api may build main)
        asks.append(("POST", "/api/rerun", {"repo": "acme/shop-api", "ref": "main", "route": route}))
    for method, path, body in asks:
        with capture_logs() as logs:
            answer = door.api(method, path, json=body)
        assert answer.status_code == 409, (body, answer.text)
        assert said in answer.json()["error"], (body, answer.json())
        [line] = [e for e in logs if e["log_level"] == "warning"]  # one warning line per refusal, saying why
        assert line["event"] == "rerun_refused" and said in line["reason"] and line["by"] == "mallory (token ops)"
    cli = door.cli("rerun", "--delivery", delivery_id, "--route", route)
    assert cli.returncode == 1 and said in cli.stderr and "Traceback" not in cli.stderr
    assert door.queued() == [] and door.audit() == []
    # The route that took the push is fine (the control: the refusals above are about the route).
    assert door.api("POST", f"/api/runs/ci/{name}/rerun", json={"route": "shop-api"}).status_code == 200


def test_a_run_whose_labels_were_changed_is_not_rerun_as_what_they_now_say(door: Door) -> None:
    """Someone relabels a real run to another commit: its delivery (written by cibroker) says otherwise, so it is refused."""
    delivery_id, name = door.built()
    door.kube_api.mutate("pipelineruns", "ci", name, lambda o: {**o, "metadata": {
        **o["metadata"], "labels": {**o["metadata"]["labels"], pr.L_SHA: SHA2}}})
    answer = door.api("POST", f"/api/runs/ci/{name}/rerun", json={})
    assert answer.status_code == 409 and "its labels were changed" in answer.json()["error"]
    assert door.queued() == []


@pytest.mark.parametrize(("args", "said"), [
    (["--repo", "acme/../etc", "--sha", SHA1], "repo: field 'repo' is not a repository path"),
    (["--repo", "acme/shop-api", "--sha", "not-a-commit"], "sha: field 'sha' is not a commit id"),
    (["--repo", "acme/shop-api", "--ref", "refs/heads/a..b"], "ref: field 'ref' is not a valid git ref name"),
    (["--repo", "acme/shop-api", "--ref", "refs/pull/1/head"], "ref: field 'ref' must start with refs/heads/ or refs/tags/"),
    (["--run", "ci/x", "--force"], "--force goes with --deploy-only only"),
])
def test_the_cli_gives_the_api_validators_errors_with_exit_code_2(door: Door, args: list[str], said: str) -> None:
    done = door.cli("rerun", *args)
    assert done.returncode == 2 and said in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert door.queued() == []


def test_api_repo_ref_and_sha_pass_the_webhook_edges_validators(door: Door) -> None:
    for body, field in [({"repo": "acme/shop-api\n", "sha": SHA1}, "repo"), ({"repo": "acme/shop-api", "sha": SHA1 + "\n"}, "sha"),
                        ({"repo": "acme/shop-api", "ref": "refs/heads/main\x00"}, "ref"),
                        ({"repo": "acme/shop-api", "ref": "refs/heads/-o"}, None),
                        ({"repo": "acme/shop-api", "ref": "refs/tags/"}, "ref")]:
        answer = door.api("POST", "/api/rerun", json=body)
        if field is None:  # a valid ref name (the edge takes it too): no route builds it, so nothing is resolved
            assert answer.status_code == 404 and "no route builds" in answer.json()["error"], answer.text
            continue
        assert answer.status_code == 400 and answer.json()["field"] == field, (body, answer.text)
    assert door.queued() == []


def test_a_forced_deploy_is_a_signed_request_and_a_message_with_exactly_its_ids(door: Door) -> None:
    delivery_id, name = door.built()
    door.succeed(name)
    door.kube_api.requests.clear()
    answer = door.api("POST", f"/api/runs/ci/{name}/rerun", json={"deploy_only": True, "force": True, "reason": "roll back"})
    assert answer.status_code == 200, answer.text
    plan = answer.json()
    [(task, task_id, args)] = door.queued()
    [request_id] = plan["requests"]
    assert (task, task_id, args) == ("cibroker.deploy", request_id, ["ci", name, "staging", plan["attempt"], request_id])
    request = verify_request(SIGNING_KEY.encode(), door.store.get_request(request_id), request_id=request_id)
    assert (request.action, request.run, request.environment, request.force, request.actor, request.channel,
            request.reason) == ("deploy", f"ci/{name}", "staging", True, "mallory (token ops)", "api", "roll back")
    assert {r.method for r in door.kube_api.requests} == {"GET"}  # read the run; wrote nothing to the cluster
    [entry] = door.audit()
    assert (entry["who"], entry["action"], entry["force"], entry["requests"]) == ("mallory (token ops)", "redeploy", True,
                                                                                  [request_id])
    # Whoever can write to Redis but holds no key cannot turn an unforced request into a forced one.
    unforced = door.api("POST", f"/api/runs/ci/{name}/rerun", json={"deploy_only": True}).json()["requests"][0]
    stored = door.store.get_request(unforced)
    assert stored["force"] is False
    door.redis.set(f"cibroker:request:{unforced}", json.dumps({**stored, "force": True}))
    with pytest.raises(Untrusted, match="not signed with the broker's key"):
        verify_request(SIGNING_KEY.encode(), door.store.get_request(unforced), request_id=unforced)


def test_where_to_deploy_comes_from_the_routing_file_never_from_the_runs_annotation(door: Door) -> None:
    """A run that says it deploys to production (a route with no production for main) gets a staging request only."""
    delivery_id, name = door.built()
    door.succeed(name)
    door.kube_api.mutate("pipelineruns", "ci", name, lambda o: {**o, "metadata": {
        **o["metadata"], "annotations": {**o["metadata"]["annotations"], pr.A_DEPLOY: '["production", "staging"]'}}})
    plan = door.api("POST", f"/api/runs/ci/{name}/rerun", json={"deploy_only": True}).json()
    assert plan["environments"] == ["staging"]
    assert [args[2] for _, _, args in door.queued()] == ["staging"]
    # ...and a run labelled with a route that would never have built its ref is refused.
    door.kube_api.mutate("pipelineruns", "ci", name, lambda o: {**o, "metadata": {
        **o["metadata"], "labels": {**o["metadata"]["labels"], pr.L_ROUTE: "api-releases"}}})
    refused = door.api("POST", f"/api/runs/ci/{name}/rerun", json={"deploy_only": True, "force": True, "reason": "x"})
    assert refused.status_code == 409 and "route api-releases does not build branch 'main'" in refused.json()["error"]
    assert len(door.queued()) == 1


def test_a_cancel_sends_nothing_to_the_cluster_and_queues_a_signed_request(door: Door) -> None:
    delivery_id, name = door.built()
    before = door.kube_api.get("pipelineruns", "ci", name)
    door.kube_api.requests.clear()
    answer = door.api("POST", f"/api/runs/ci/{name}/cancel", json={"reason": "deploy freeze"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["requested"] is True
    assert door.kube_api.calls("PATCH") == [] and {r.method for r in door.kube_api.requests} == {"GET"}
    assert door.kube_api.get("pipelineruns", "ci", name) == before
    [(task, task_id, args)] = door.queued()
    request_id = answer.json()["request_id"]
    assert (task, task_id, args) == ("cibroker.cancel_run", request_id, [request_id])
    request = verify_request(SIGNING_KEY.encode(), door.store.get_request(request_id), request_id=request_id)
    assert (request.action, request.run, request.actor, request.reason) == ("cancel", f"ci/{name}", "mallory (token ops)",
                                                                           "deploy freeze")
    logged = door.api("GET", f"/api/deliveries/{delivery_id}").json()["log"][-1]
    assert logged["step"] == "cancel_requested" and "queued for a worker" in logged["detail"]
    cli = door.cli("cancel", f"ci/{name}", "--reason", "again")
    assert cli.returncode == 0 and "cancel of ci/" in cli.stdout and "requested" in cli.stdout
    assert door.kube_api.calls("PATCH") == []
    door.succeed(name)
    again = door.api("POST", f"/api/runs/ci/{name}/cancel", json={})
    assert again.status_code == 409 and "already ended" in again.json()["error"]
