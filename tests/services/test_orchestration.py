"""The orchestrator over recording fakes of our ports and the real Redis store."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from broker.core import pipelinerun as pr
from broker.core.errors import Permanent, Transient, Untrusted
from broker.core.status import CommitState
from broker.adapters.redis_store import SyncStore
from tests.support import web_app
from tests.support.fakes.githost_api import GITLAB_TOKEN, FakeGitLab
from tests.support.fakes.kube_api import FakeKubeAPI
from tests.support.fakes.rollout import seed_service_account
from tests.support.fakes.tekton import digest_of
from tests.support.stack import hook_headers, push_body
from tests.support import FIXTURES, free_port, make_settings, template_origin
from tests.support.worlds import OLD_IMAGE, SHA1, SHA2, TAG_OBJECT, World, body
from workers.adapters.githost import git_host_for
from workers.adapters.gitrepo import GitCommitResolver
from workers.adapters.kube import KubeCluster
from broker.services.runs import Orchestrator, RunRef

@pytest.fixture
def world(tmp_path: Path, redis_url: str) -> World:
    routing = (FIXTURES / "routing" / "example.yaml").read_text()
    w = World(make_settings(tmp_path, routing=routing, environ={"CIBROKER_REDIS_URL": redis_url}), redis_url)
    yield w
    w.close()


def test_accepted_push_creates_one_pipelinerun_and_reports_pending(world: World) -> None:
    delivery = world.push("a")
    names = world.orch.start(delivery, token="t1")
    run = world.only_run()
    assert names == [run["metadata"]["name"]]
    assert run["metadata"]["labels"][pr.L_SHA] == SHA1
    assert world.host.states() == ["cibroker/build-test-push:pending"]
    assert world.host.statuses[0].ref == "main" and world.host.statuses[0].repo == "acme/shop-api"
    log = world.orch.store.get(delivery)["log"]
    assert [e["step"] for e in log][-2:] == ["pipelinerun_created", "status_posted"]


def test_the_same_push_delivered_twice_makes_one_run_and_one_pending(world: World) -> None:
    """Two deliveries that build the same commit on the same route: one PipelineRun, one pending.

    (The edge now answers a second hook for the very same push `duplicate` by its push fingerprint,
    issue 11; a delivery that differs only in `before` still reaches the worker, whose run name dedups.)"""
    first, second = world.push("project-hook"), world.push("group-hook", before="3" * 40)
    world.orch.start(first, token="t1")
    world.orch.start(second, token="t2")
    assert len(world.cluster.runs) == 1
    assert world.host.states() == ["cibroker/build-test-push:pending"]
    assert world.orch.store.get(second)["log"][-1]["step"] == "pipelinerun_exists"


def test_a_rerun_is_a_new_attempt_with_a_new_name(world: World) -> None:
    delivery = world.push("a")
    [one] = world.orch.start(delivery, token="t1")
    [two] = world.orch.start(delivery, attempt=2, token="t2")
    assert one != two and len(world.cluster.runs) == 2


def test_missing_service_account_fails_the_commit_with_what_to_do(world: World) -> None:
    world.cluster.service_accounts.clear()
    delivery = world.push("a")
    assert world.orch.start(delivery, token="t1") == []
    assert world.cluster.runs == {}
    [status] = world.host.statuses
    assert status.state is CommitState.FAILED
    assert "service account 'pipeline-bot' not found in namespace 'ci'" in status.description


def test_annotated_tag_is_peeled_to_its_commit(world: World) -> None:
    """The push gave the tag object as `after` and no checkout_sha: ls-remote peels it."""
    world.resolver.tags["v1.0.0"] = SHA2
    data = json.loads(body(ref="refs/tags/v1.0.0", sha=TAG_OBJECT))
    data.pop("checkout_sha")
    r = world.client.post("/hooks/gitlab", content=json.dumps(data).encode(),
                          headers={"X-Gitlab-Event": "Tag Push Hook", "X-Gitlab-Token": "topsecret"})
    world.orch.start(r.json()["delivery_id"], token="t1")
    run = world.only_run()
    params = {p["name"]: p["value"] for p in run["spec"]["params"]}
    assert params["git-revision"] == SHA2 and params["image"].endswith(":" + SHA2)


def test_a_tag_that_moved_since_the_push_fails_with_a_reason(world: World) -> None:
    world.resolver.tags["v1.0.0"] = SHA2
    delivery = world.push("a", ref="refs/tags/v1.0.0", sha=SHA1, after=TAG_OBJECT)
    world.orch.start(delivery, token="t1")
    assert world.cluster.runs == {}
    assert world.host.statuses[-1].state is CommitState.FAILED and "moved" in world.host.statuses[-1].description


def test_statuses_follow_the_run_and_never_go_backwards(world: World) -> None:
    """pending -> running -> success; a late `running` after success is not posted; deploys are triggered once."""
    world.orch.start(world.push("a"), token="t1")
    ns, name = "ci", world.only_run()["metadata"]["name"]
    running = world.cluster.set_condition(ns, name, "Unknown", "Running")
    assert world.orch.observe(running, token="w1") is CommitState.RUNNING
    succeeded = world.cluster.set_condition(ns, name, "True", "Succeeded")
    assert world.orch.observe(succeeded, token="w2") is CommitState.SUCCESS
    assert world.orch.observe(running, token="w3") is None  # stale snapshot, e.g. a retried task
    assert world.host.states("cibroker/build-test-push") == ["pending", "running", "success"]
    assert world.cluster.runs[(ns, name)]["metadata"]["annotations"][pr.A_REPORTED] == "success"
    assert world.deploys == [name]


def test_a_retried_report_by_the_same_task_is_allowed_but_another_task_is_not(world: World) -> None:
    world.orch.start(world.push("a"), token="t1")
    ref = world.orch.trusted(world.only_run())
    assert world.orch.report(ref, CommitState.RUNNING, "x", token="w1") is True
    assert world.orch.report(ref, CommitState.RUNNING, "x", token="w1") is True  # its own retry
    assert world.orch.report(ref, CommitState.RUNNING, "x", token="w2") is False


def test_failure_names_the_failing_task(world: World) -> None:
    world.orch.start(world.push("a"), token="t1")
    ns, name = "ci", world.only_run()["metadata"]["name"]
    world.cluster.taskruns[(ns, name)] = [{"metadata": {"name": f"{name}-build", "labels": {"tekton.dev/pipelineTask": "build"}},
                                          "status": {"conditions": [{"type": "Succeeded", "status": "False", "reason": "Failed",
                                                                     "message": '"step-build" exited with code 1'}]}}]
    world.orch.observe(world.cluster.set_condition(ns, name, "False", "Failed", "Tasks Completed: 2 (Failed: 1)"), token="w")
    assert world.host.statuses[-1].state is CommitState.FAILED
    assert world.host.statuses[-1].description == 'build-test-push: task build failed (Failed): "step-build" exited with code 1'


def test_a_newer_push_cancels_the_older_run_of_the_same_branch(world: World) -> None:
    world.orch.start(world.push("a", sha=SHA1), token="t1")
    old_name = world.only_run()["metadata"]["name"]
    world.cluster.set_condition("ci", old_name, "Unknown", "Running")
    world.orch.start(world.push("b", sha=SHA2, before=SHA1), token="t2")
    old = world.cluster.runs[("ci", old_name)]
    assert old["spec"]["status"] == "Cancelled"
    assert old["metadata"]["annotations"][pr.A_SUPERSEDED_BY] == SHA2[:8]
    cancelled = world.cluster.set_condition("ci", old_name, "False", "Cancelled")
    world.orch.observe(cancelled, token="w")
    assert [s.description for s in world.host.statuses if s.sha == SHA1][-1] == "build-test-push: canceled, superseded by 22222222"


def test_an_older_push_processed_late_is_cancelled_at_once(world: World) -> None:
    """The newer push's run exists already: the late older run is cancelled right after it is created."""
    older, newer = world.push("a", sha=SHA1), world.push("b", sha=SHA2, before=SHA1)
    world.orch.start(newer, token="t2")
    world.orch.start(older, token="t1")
    runs = {r["metadata"]["labels"][pr.L_SHA]: r for r in world.cluster.runs.values()}
    assert runs[SHA1]["spec"]["status"] == "Cancelled"
    assert runs[SHA1]["metadata"]["annotations"][pr.A_SUPERSEDED_BY] == SHA2[:8]
    assert "status" not in runs[SHA2]["spec"]


def test_a_run_costs_create_list_and_two_patches(world: World) -> None:
    """API budget per run beyond the watch: create, one list (supersede), running and final patches."""
    world.orch.start(world.push("a"), token="t1")
    name = world.only_run()["metadata"]["name"]
    world.orch.observe(world.cluster.set_condition("ci", name, "Unknown", "Running"), token="w1")
    world.orch.observe(world.cluster.set_condition("ci", name, "True", "Succeeded"), token="w2")
    world.cluster.calls.clear()
    world.orch.start(world.push("b", sha=SHA2, ref="refs/heads/release/1"), token="t2")
    other = next(n for (_, n) in world.cluster.runs if n != name)
    world.orch.observe(world.cluster.set_condition("ci", other, "Unknown", "Running"), token="w3")
    world.orch.observe(world.cluster.set_condition("ci", other, "True", "Succeeded"), token="w4")
    assert [c for c, _ in world.cluster.calls] == [
        "create_pipelinerun", "list_pipelineruns", "patch_pipelinerun", "patch_pipelinerun"]  # SA check cached


def test_tags_never_supersede(world: World) -> None:
    world.resolver.tags.update({"v1.0.0": SHA1, "v1.0.1": SHA2})
    world.orch.start(world.push("a", ref="refs/tags/v1.0.0", sha=SHA1), token="t1")
    world.orch.start(world.push("b", ref="refs/tags/v1.0.1", sha=SHA2), token="t2")
    assert all("status" not in r["spec"] for r in world.cluster.runs.values())


def succeed(world: World) -> tuple[RunRef, dict[str, Any]]:
    world.orch.start(world.push("a"), token="t1")
    name = world.only_run()["metadata"]["name"]
    world.orch.observe(world.cluster.set_condition("ci", name, "True", "Succeeded"), token="w")
    obj = world.cluster.runs[("ci", name)]
    return world.orch.trusted(obj), obj


DIGEST_IMAGE = f"registry.example.com/acme/shop-api@{digest_of(f'registry.example.com/acme/shop-api:{SHA1}')}"


def test_deploy_patches_only_the_named_container_and_reports_success_when_rolled_out(world: World) -> None:
    """By digest (the default): the route's repository @ the digest the run reported; the status names tag and digest."""
    ref, obj = succeed(world)
    assert world.orch.deploy(ref, "staging", token="d1", obj=obj) == "shop-api"
    dep = world.cluster.deployments[("staging", "shop-api")]
    containers = {c["name"]: c["image"] for c in dep["spec"]["template"]["spec"]["containers"]}
    assert containers == {"api": DIGEST_IMAGE, "sidecar": "envoy:1"}
    assert dep["metadata"]["annotations"]["kubernetes.io/change-cause"].startswith("cibroker: acme/shop-api@11111111")
    assert world.orch.check_rollout(ref, "staging", deadline=1e12, token="d1", obj=obj) is False  # generation not observed yet
    dep["status"].update(observedGeneration=dep["metadata"]["generation"])
    assert world.orch.check_rollout(ref, "staging", deadline=1e12, token="d1", obj=obj) is True
    assert world.host.states("deploy/staging") == ["running", "success"]
    digest = DIGEST_IMAGE.split("@")[1]
    assert all(f"tag {SHA1}" in s.description and digest in s.description for s in world.host.statuses if s.name == "deploy/staging")
    started = [e for e in world.orch.store.get(ref.delivery_id)["log"] if e["step"] == "deploy_started"][-1]
    assert started["digest"] == digest and started["tag"].endswith(f":{SHA1}")


def test_failed_rollout_rolls_back_and_says_so(world: World) -> None:
    ref, obj = succeed(world)
    world.orch.deploy(ref, "staging", token="d1", obj=obj)
    dep = world.cluster.deployments[("staging", "shop-api")]
    dep["status"].update(observedGeneration=dep["metadata"]["generation"], conditions=[
        {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
         "message": 'ReplicaSet "shop-api-5d" has timed out progressing.'}])
    assert world.orch.check_rollout(ref, "staging", deadline=1e12, token="d1", obj=obj) is True
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == OLD_IMAGE
    final = world.host.statuses[-1]
    assert final.name == "deploy/staging" and final.state is CommitState.FAILED
    assert "rolled back to " + OLD_IMAGE in final.description


def test_an_older_commit_never_overwrites_a_newer_deploy(world: World) -> None:
    """Git ancestry, not arrival order: a commit that is an ancestor of the deployed one is refused."""
    ref, obj = succeed(world)
    dep = world.cluster.deployments[("staging", "shop-api")]
    dep["metadata"]["annotations"]["cibroker.dev/deployed-sha"] = SHA2
    world.resolver.ancestry.add((SHA1, SHA2))
    assert world.orch.deploy(ref, "staging", token="d1", obj=obj) is None
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == OLD_IMAGE
    assert world.host.statuses[-1].state is CommitState.CANCELED
    assert "older than 22222222" in world.host.statuses[-1].description


# ---- issue 10: fail closed, digests, people's requests, tokens only where they belong ----------------------------


def deployed_elsewhere(world: World, sha: str = SHA2) -> dict[str, Any]:
    dep = world.cluster.deployments[("staging", "shop-api")]
    dep["metadata"]["annotations"]["cibroker.dev/deployed-sha"] = sha
    return dep


@pytest.mark.parametrize("error", [Permanent("git fetch failed for https://gitlab.example.com/acme/shop-api.git: fatal"),
                                   Transient("could not reach https://gitlab.example.com/acme/shop-api.git")])
def test_an_undecidable_ancestry_check_refuses_the_deploy_and_says_why(world: World, error: Exception) -> None:
    """Fail closed: git cannot tell whether the commit is older than the deployed one -> no deploy, deploy/<env> failed."""
    ref, obj = succeed(world)
    dep = deployed_elsewhere(world)
    world.resolver.ancestry_error = error
    assert world.orch.deploy(ref, "staging", token="d1", obj=obj) is None
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == OLD_IMAGE
    final = world.host.statuses[-1]
    assert (final.name, final.state) == ("deploy/staging", CommitState.FAILED)
    assert "cannot tell whether 11111111 is older than 22222222" in final.description
    steps = [e["step"] for e in world.orch.store.get(ref.delivery_id)["log"]]
    assert steps[-3:] == ["ancestry_unknown", "status_posted", "deploy_refused"]


def test_a_transient_git_error_is_retried_before_the_deploy_is_refused(world: World) -> None:
    ref, obj = succeed(world)
    deployed_elsewhere(world)
    world.resolver.ancestry_error = Transient("could not reach the remote")
    with pytest.raises(Transient):
        world.orch.deploy(ref, "staging", token="d1", obj=obj, give_up=False)
    assert [s.name for s in world.host.statuses].count("deploy/staging") == 0


def test_only_a_signed_person_request_forces_past_the_ancestry_guard(world: World) -> None:
    """force comes from a verified PersonRequest alone; the decision log names the person."""
    from broker.core.trust import PersonRequest, sign_request

    ref, obj = succeed(world)
    dep = deployed_elsewhere(world)
    world.resolver.ancestry.add((SHA1, SHA2))
    signed = PersonRequest(request_id="r1", action="deploy", namespace="ci", name=ref.name, actor="alice", channel="cli",
                           reason="roll back", at="2026-12-03T12:00:00.000Z", environment="staging", attempt=2, force=True)
    world.orch.store.put_request(sign_request(world.orch.key, signed), ttl=60)
    request = world.orch.request("r1", action="deploy", namespace="ci", name=ref.name, environment="staging", attempt=2)
    with pytest.raises(Untrusted, match="another action"):
        world.orch.request("r1", action="deploy", namespace="ci", name=ref.name, environment="production", attempt=2)
    assert world.orch.deploy(ref, "staging", token="d1", obj=obj, attempt=2, request=request) == "shop-api"
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == DIGEST_IMAGE
    forced = [e for e in world.orch.store.get(ref.delivery_id)["log"] if e["step"] == "deploy_forced"]
    assert forced and "alice's request via cli" in forced[0]["detail"] and forced[0]["by"] == "alice"


def test_deploy_by_tag_sets_the_rendered_tag(tmp_path: Path, redis_url: str) -> None:
    routing = (FIXTURES / "routing" / "example.yaml").read_text().replace("    image: registry.example.com/acme/shop-api\n",
                                                                          "    image: registry.example.com/acme/shop-api\n"
                                                                          "    deploy_by: tag\n", 1)
    assert "deploy_by: tag" in routing
    w = World(make_settings(tmp_path, routing=routing, environ={"CIBROKER_REDIS_URL": redis_url}), redis_url)
    try:
        ref, obj = succeed(w)
        w.orch.deploy(ref, "staging", token="d1", obj=obj)
        image = w.cluster.deployments[("staging", "shop-api")]["spec"]["template"]["spec"]["containers"][0]["image"]
        assert image == f"registry.example.com/acme/shop-api:{SHA1}"
    finally:
        w.close()


@pytest.mark.parametrize("results", [[], [{"name": "image-digest", "value": "sha256:abc"}],
                                     [{"name": "image-digest", "value": "sha256:" + "A" * 64}],
                                     [{"name": "image-digest", "value": "evil.example/x@sha256:" + "a" * 64}],
                                     [{"name": "image-digest", "value": "sha256:" + "a" * 64},
                                      {"name": "IMAGE_DIGEST", "value": "sha256:" + "b" * 64}]])
def test_a_digest_deploy_without_a_valid_digest_is_refused(world: World, results: list[dict[str, str]]) -> None:
    """Missing, malformed, or contradicting digests: Permanent with a reason; nothing patched."""
    ref, obj = succeed(world)
    obj["status"]["results"] = results
    with pytest.raises(Permanent, match="reports no valid image digest"):
        world.orch.deploy(ref, "staging", token="d1", obj=obj)
    assert ("patch_deployment", "shop-api") not in world.cluster.calls


def test_a_v1beta1_run_reports_its_digest_in_pipeline_results(world: World) -> None:
    from broker.services.provenance import image_digest

    assert image_digest({"status": {"pipelineResults": [{"name": "image-digest", "value": "sha256:" + "c" * 64}]}}) == \
        "sha256:" + "c" * 64


def test_the_token_goes_to_an_https_clone_url_only(tmp_path: Path, redis_url: str) -> None:
    """A file:// (or http://) clone URL never gets the host's token; an https one from the routing file does."""
    routing = (FIXTURES / "routing" / "example.yaml").read_text()
    w = World(make_settings(tmp_path, routing=routing, environ={"CIBROKER_REDIS_URL": redis_url, "GITLAB_API_TOKEN": "tok"}),
              redis_url)
    try:
        assert w.orch.git_auth("gitlab", "file:///srv/git/shop-api.git") is None
        assert w.orch.git_auth("gitlab", "http://gitlab.example.com/acme/shop-api.git") is None
        assert w.orch.git_auth("gitlab", "ssh://git@gitlab.example.com/acme/shop-api.git") is None
        assert w.orch.git_auth("gitlab", "https://gitlab.example.com/acme/shop-api.git") == ("oauth2", "tok")
        ref, obj = succeed(w)
        deployed_elsewhere(w)
        w.orch.deploy(ref, "staging", token="d1", obj=obj)
        assert w.resolver.asked == [(ref.clone_url, ("oauth2", "tok"))] and ref.clone_url.startswith("https://gitlab.example.com/")
    finally:
        w.close()


def test_annotations_are_not_read_for_what_a_run_does(world: World) -> None:
    """Our run with rewritten annotations: statuses, deploy list, image and clone URL still come from routing + store."""
    world.orch.start(world.push("a"), token="t1")
    run = world.only_run()
    run["metadata"]["annotations"].update({pr.A_REPO: "acme/other", pr.A_REPO_ID: "999", pr.A_DEPLOY: "{not json",
                                           pr.A_IMAGE: "evil/pwn:1", pr.A_CLONE_URL: "https://evil.example/x.git",
                                           pr.A_STATUS_NAME: "evil", pr.A_ATTEMPT: "NaN", pr.A_REF: "refs/heads/evil"})
    ref = world.orch.trusted(run)
    assert (ref.repo, ref.repo_id, ref.status_name, ref.ref) == ("acme/shop-api", "4861503", "cibroker/build-test-push", "refs/heads/main")  # the payload's project id
    assert ref.deploy == ("staging",) and ref.image.endswith(f"shop-api:{SHA1}") and "evil" not in ref.clone_url


def test_a_run_squatting_our_deterministic_name_fails_the_delivery(world: World) -> None:
    """Someone created a run with the name cibroker would use: AlreadyExists, not signed -> refused, not adopted."""
    from broker.core.pipelinerun import run_name

    name = run_name(route="shop-api", ref="refs/heads/main", sha=SHA1, attempt=1)
    world.cluster.runs[("ci", name)] = {"metadata": {"name": name, "namespace": "ci", "labels": {}, "annotations": {}}, "spec": {}}
    delivery = world.push("a")
    assert world.orch.start(delivery, token="t1") == []
    [status] = world.host.statuses
    assert status.state is CommitState.FAILED and "cibroker did not create it" in status.description
    assert world.orch.store.get(delivery)["state"] == "failed"
# GitCommitResolver on a real repository (the Git host's copy), KubeCluster over the wire-level fake
# Kubernetes API, the GitLab adapter over the fake GitLab API, the real edge and Redis.

ZERO = "0" * 40


class GitWorld:
    """The edge and the orchestrator on real adapters; `origin` is the Git host's repository."""

    def __init__(self, tmp_path: Path, redis_url: str, kube_api: FakeKubeAPI, kube_cluster: KubeCluster,
                 gitlab: FakeGitLab, *, clone_url: str | None = None) -> None:
        self.origin = template_origin().copy(tmp_path / "origin.git")
        self.kube, self.gitlab = kube_api, gitlab
        routing = (FIXTURES / "routing" / "example.yaml").read_text().replace(
            "https://gitlab.example.com/acme/shop-api.git", clone_url or self.origin.url).replace(
            "https://gitlab.example.com/api/v4", f"{gitlab.api_url}\n    web_url: https://gitlab.example.com")  # pages: issue 11
        self.settings = make_settings(tmp_path, routing=routing,
                                      environ={"CIBROKER_REDIS_URL": redis_url, "GITLAB_API_TOKEN": GITLAB_TOKEN})
        self.store = SyncStore(redis_url, timeout=2)
        self.resolver = GitCommitResolver(tmp_path / "git-cache", timeout=20)
        self.orch = Orchestrator(settings=self.settings, store=self.store, cluster=kube_cluster, resolver=self.resolver,
                                 git_hosts={"gitlab": git_host_for("gitlab", api_url=gitlab.api_url, token=GITLAB_TOKEN,
                                                                   host_id="gitlab")})
        seed_service_account(kube_api, namespace="ci", name="pipeline-bot")
        self.client = TestClient(web_app(self.settings))
        self.client.__enter__()

    def push(self, key: str, *, sha: str, before: str = ZERO, branch: str = "main", move: bool = True) -> str:
        """`git push` (the origin's branch moves to `sha`, unless `move=False`), then the webhook: its delivery id."""
        if move:
            self.origin.move(branch, sha)
        r = self.client.post("/hooks/gitlab", content=push_body(sha=sha, before=before, ref=f"refs/heads/{branch}"),
                             headers=hook_headers(key))
        assert r.status_code == 202, r.text
        return r.json()["delivery_id"]

    def runs(self) -> dict[str, dict[str, Any]]:
        """PipelineRuns in the fake API by commit."""
        return {r["metadata"]["labels"][pr.L_SHA]: r for r in self.kube.list("pipelineruns", "ci")}

    def cancelled(self, sha: str) -> bool:
        return bool(self.runs()[sha]["spec"].get("status"))

    def log(self, delivery_id: str) -> list[tuple[str, str]]:
        return [(e["step"], e["detail"]) for e in self.store.get(delivery_id)["log"]]

    def close(self) -> None:
        self.client.__exit__(None, None, None)
        self.store.close()


@pytest.fixture
def gw(tmp_path: Path, redis_url: str, kube_api: FakeKubeAPI, kube_cluster: KubeCluster,
       fake_gitlab_api: FakeGitLab) -> Iterator[GitWorld]:
    w = GitWorld(tmp_path, redis_url, kube_api, kube_cluster, fake_gitlab_api)
    yield w
    w.close()


def test_a_branch_at_the_pushed_commit_is_built_and_the_log_says_so(gw: GitWorld) -> None:
    sha = gw.origin.sha(5)
    delivery = gw.push("a", sha=sha)
    [name] = gw.orch.start(delivery, token="t")
    assert list(gw.runs()) == [sha] and gw.runs()[sha]["metadata"]["name"] == name
    assert ("commit_resolved", f"branch main points at {sha[:8]}, as pushed") in gw.log(delivery)
    assert gw.gitlab.states(sha, "cibroker/build-test-push") == ["pending"]


def test_a_branch_that_moved_on_builds_what_was_pushed(gw: GitWorld) -> None:
    """A later push moved main before the worker got to this one: the pushed commit is its ancestor, so it is built."""
    sha, later = gw.origin.sha(5), gw.origin.sha(9)
    delivery = gw.push("a", sha=sha)
    gw.origin.move("main", later)
    gw.orch.start(delivery, token="t")
    params = {p["name"]: p["value"] for p in gw.runs()[sha]["spec"]["params"]}
    assert params["git-revision"] == sha
    assert ("commit_resolved", f"branch main moved on to {later[:8]}; {sha[:8]} is its ancestor: building what was pushed"
            ) in gw.log(delivery)


def test_a_commit_the_host_does_not_know_fails_with_why_and_makes_no_run(gw: GitWorld) -> None:
    """A payload signed with the secret but naming a commit that exists nowhere: no PipelineRun, a failed status."""
    made_up = "ab" * 20
    delivery = gw.push("a", sha=made_up, move=False)
    assert gw.orch.start(delivery, token="t") == []
    assert gw.kube.list("pipelineruns", "ci") == []
    assert gw.gitlab.states(made_up, "cibroker/build-test-push") == ["failed"]
    [failed] = [c.body for c in gw.gitlab.calls if (c.body or {}).get("state") == "failed"]
    assert "does not confirm commit abababab on branch main" in failed["description"]
    assert f"commit {made_up} not found on {gw.origin.url}" in failed["description"]
    step, detail = gw.log(delivery)[-2]
    assert step == "failed" and "does not confirm commit abababab" in detail
    assert gw.store.get(delivery)["state"] == "failed"


def test_a_commit_that_is_only_on_another_branch_is_refused(gw: GitWorld) -> None:
    """The commit is real but main does not contain it (it is on `feature` only): not built for main."""
    gw.origin.move("main", gw.origin.sha(5))
    other = gw.origin.sha(9)
    gw.origin.move("feature", other)
    delivery = gw.push("a", sha=other, move=False)
    assert gw.orch.start(delivery, token="t") == []
    assert gw.kube.list("pipelineruns", "ci") == []
    [failed] = [c.body for c in gw.gitlab.calls if (c.body or {}).get("state") == "failed"]
    assert f"commit {other[:12]} is not on branch main" in failed["description"]


def test_a_branch_that_is_gone_is_refused(gw: GitWorld) -> None:
    sha = gw.origin.sha(5)
    delivery = gw.push("a", sha=sha, branch="release/1")
    gw.origin.delete("release/1")
    assert gw.orch.start(delivery, token="t") == []
    assert gw.kube.list("pipelineruns", "ci") == []
    assert "branch release/1 not found" in gw.gitlab.calls[-1].body["description"]


def test_git_unreachable_is_retried_not_failed(tmp_path: Path, redis_url: str, kube_api: FakeKubeAPI,
                                               kube_cluster: KubeCluster, fake_gitlab_api: FakeGitLab) -> None:
    """The Git host refuses connections: Transient (the task retries); no failed status, no run, no `failed` step."""
    w = GitWorld(tmp_path, redis_url, kube_api, kube_cluster, fake_gitlab_api,
                 clone_url=f"http://127.0.0.1:{free_port()}/acme/shop-api.git")
    try:
        delivery = w.push("a", sha=w.origin.sha(5))
        with pytest.raises(Transient, match="could not reach"):
            w.orch.start(delivery, token="t")
        assert w.kube.list("pipelineruns", "ci") == [] and fake_gitlab_api.calls == []
        assert "failed" not in [step for step, _ in w.log(delivery)]
    finally:
        w.close()


def test_an_old_push_delivered_after_the_newer_one_never_cancels_it(gw: GitWorld) -> None:
    """Push 1 then push 2 (before = 1), but the worker gets push 2 first: push 1's late run is the one cancelled."""
    one, two = gw.origin.sha(3), gw.origin.sha(4)
    older = gw.push("one", sha=one, before=gw.origin.sha(2))
    newer = gw.push("two", sha=two, before=one)
    gw.orch.start(newer, token="t2")
    gw.orch.start(older, token="t1")
    assert not gw.cancelled(two)
    assert gw.cancelled(one) and gw.runs()[one]["metadata"]["annotations"][pr.A_SUPERSEDED_BY] == two[:8]
    [(_, said)] = [e for e in gw.log(older) if e[0] == "superseded"]
    assert f"the push chain puts push {two[:8]} after {one[:8]}" in said


def test_a_replayed_old_push_cannot_cancel_the_newer_run(gw: GitWorld) -> None:
    """Push 2 superseded push 1; push 1's delivery is replayed (a new key: the newest arrival), and its task
    redelivered after its run was pruned: the newer run is never cancelled, the old one is cancelled at once."""
    one, two = gw.origin.sha(3), gw.origin.sha(4)
    older = gw.push("one", sha=one, before=gw.origin.sha(2))
    gw.orch.start(older, token="t1")
    newer = gw.push("two", sha=two, before=one)
    gw.orch.start(newer, token="t2")
    assert gw.cancelled(one) and not gw.cancelled(two)
    replay = gw.client.post("/hooks/gitlab", content=push_body(sha=one, before=gw.origin.sha(2)), headers=hook_headers("replay"))
    if replay.status_code == 202:  # the edge took it as new: the worker must still not be fooled by arrival time
        gw.orch.start(replay.json()["delivery_id"], token="t3")
    assert not gw.cancelled(two)
    gw.kube.delete("pipelineruns", "ci", gw.runs()[one]["metadata"]["name"])
    gw.orch.start(older, token="t4")
    assert gw.cancelled(one) and not gw.cancelled(two)


def test_annotations_of_other_runs_do_not_order_pushes(gw: GitWorld) -> None:
    """Anyone with patch rights can write `received-at`: an old run stamped 'newest' is still superseded."""
    one, two = gw.origin.sha(3), gw.origin.sha(4)
    gw.orch.start(gw.push("one", sha=one, before=gw.origin.sha(2)), token="t1")
    name = gw.runs()[one]["metadata"]["name"]
    gw.orch.cluster.patch_pipelinerun(namespace="ci", name=name, patch={  # as anyone with patch rights may
        "metadata": {"annotations": {pr.A_RECEIVED: "9999-12-31T23:59:59.999Z"}}})
    gw.orch.start(gw.push("two", sha=two, before=one), token="t2")
    assert gw.cancelled(one) and not gw.cancelled(two)


def test_a_run_whose_delivery_label_names_no_stored_delivery_is_left_alone(gw: GitWorld) -> None:
    one, two = gw.origin.sha(3), gw.origin.sha(4)
    gw.orch.start(gw.push("one", sha=one, before=gw.origin.sha(2)), token="t1")
    name = gw.runs()[one]["metadata"]["name"]
    gw.orch.cluster.patch_pipelinerun(namespace="ci", name=name, patch={"metadata": {"labels": {pr.L_DELIVERY: "01nosuchdelivery"}}})
    gw.orch.start(gw.push("two", sha=two, before=one), token="t2")
    assert not gw.cancelled(one) and not gw.cancelled(two)


def test_concurrent_pushes_see_each_other_and_converge(gw: GitWorld) -> None:
    """Both creates held in flight at once, so each worker lists after both runs exist: only the newer survives."""
    one, two = gw.origin.sha(3), gw.origin.sha(4)
    older, newer = gw.push("one", sha=one, before=gw.origin.sha(2)), gw.push("two", sha=two, before=one)
    gw.kube.delay(r"/pipelineruns$", 0.5, method="POST", times=2)
    with ThreadPoolExecutor(2) as pool:
        done = [pool.submit(gw.orch.start, older, token="t1"), pool.submit(gw.orch.start, newer, token="t2")]
        for f in done:
            f.result(30)
    assert set(gw.runs()) == {one, two}
    assert gw.cancelled(one) and not gw.cancelled(two)


@pytest.mark.parametrize("order", ["older first", "newer first"])
def test_a_broken_chain_falls_back_to_git_ancestry(gw: GitWorld, order: str) -> None:
    """The push between them was never delivered (no link): git says which commit descends from the other."""
    one, three = gw.origin.sha(3), gw.origin.sha(5)
    older = gw.push("one", sha=one, before=gw.origin.sha(2))
    newer = gw.push("three", sha=three, before=gw.origin.sha(4))  # the push 3 -> 4 is missing
    for delivery in ([older, newer] if order == "older first" else [newer, older]):
        gw.orch.start(delivery, token=f"t-{delivery}")
    assert gw.cancelled(one) and not gw.cancelled(three)
    said = [d for d_id in (older, newer) for step, d in gw.log(d_id) if step == "superseded"]
    assert len(said) == 1 and "git ancestry (the push chain is broken)" in said[0]


def test_an_order_nobody_can_tell_cancels_nothing_and_says_so(gw: GitWorld) -> None:
    """Chain broken and the histories diverged (a force push whose delivery was lost): both runs go on, logged."""
    five = gw.origin.sha(5)
    first = gw.push("five", sha=five, before=gw.origin.sha(4))
    gw.orch.start(first, token="t1")
    forked = gw.origin.fork(2)
    second = gw.push("forked", sha=forked, before=gw.origin.sha(7))  # main was force-pushed; that push was lost
    gw.orch.start(second, token="t2")
    assert not gw.cancelled(five) and not gw.cancelled(forked)
    [(_, said)] = [e for e in gw.log(second) if e[0] == "supersede_undecided"]
    assert "nothing is cancelled on a guess" in said and five[:8] in said


def test_a_later_push_supersedes_a_persons_rerun_but_an_older_one_does_not(gw: GitWorld) -> None:
    """A re-run of push 2 is cancelled by push 3 (newer on the chain); push 1, delivered late, does not touch it."""
    from broker.services.oncall import Actor, Operations

    one, two, three = gw.origin.sha(3), gw.origin.sha(4), gw.origin.sha(5)
    ops = Operations(settings=gw.settings, store=gw.store, cluster=gw.orch.cluster, resolver=gw.resolver)
    older = gw.push("one", sha=one, before=gw.origin.sha(2))
    second = gw.push("two", sha=two, before=one)
    gw.orch.start(second, token="t2")
    gw.orch.cluster.patch_pipelinerun(namespace="ci", name=gw.runs()[two]["metadata"]["name"], patch={"spec": {"status": "Cancelled"}})
    plan = ops.rerun(actor=Actor(who="alice", channel="cli"), delivery_id=second)
    [rerun_name] = gw.orch.start(plan["delivery_id"], attempt=plan["attempt"], token="r")
    rerun = lambda: gw.kube.get("pipelineruns", "ci", rerun_name)  # noqa: E731
    gw.orch.start(older, token="t1")  # late: push 2 is newer, so push 1's run goes at once; the re-run stays
    assert not rerun()["spec"].get("status") and gw.cancelled(one)
    assert gw.runs()[one]["metadata"]["annotations"][pr.A_SUPERSEDED_BY] == two[:8]
    gw.orch.start(gw.push("three", sha=three, before=two), token="t3")
    assert rerun()["spec"]["status"] == "Cancelled" and rerun()["metadata"]["annotations"][pr.A_SUPERSEDED_BY] == three[:8]
    assert gw.cancelled(one) and not gw.cancelled(three)


def test_the_push_chain_walk_is_bounded_and_ends_on_loops(redis_url: str) -> None:
    """Links a -> b -> c, a loop d <-> e (a force push back): the walk answers, undecided beyond its bound."""
    store = SyncStore(redis_url, timeout=2)
    key = {"host": "gitlab", "repo_id": "42", "ref": "refs/heads/main"}
    for after, before in (("b", "a"), ("c", "b"), ("d", "e"), ("e", "d")):
        store.link_push(**key, after=after, before=before, ttl=60)
    assert store.push_order(**key, ours="c", others=["a", "b", "c", "d", "zz"], max_steps=10) == [1, 1, 0, 0, 0]
    assert store.push_order(**key, ours="a", others=["c"], max_steps=10) == [-1]
    assert store.push_order(**key, ours="c", others=["a"], max_steps=1) == [0]  # a is two links back
    assert store.push_order(**key, ours="d", others=["e"], max_steps=10) == [1]  # a loop: both walks end, first answer wins
    assert store.push_order(**{**key, "ref": "refs/heads/other"}, ours="c", others=["a"], max_steps=10) == [0]
    store.close()
