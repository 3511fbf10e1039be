"""End to end: webhook -> PipelineRun -> watch -> deploy -> commit statuses, with real processes.

`cibroker serve`, `cibroker worker` and `cibroker watcher` run as child processes against
a real redis-server, the fake Kubernetes API (Tekton and rollout simulators moving the
objects) and the fake GitLab API, which enforces GitLab's commit-status transitions
(`tests.support.stack` starts them).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.support.fakes.githost_api import FakeGitLab
from tests.support.fakes.kube_api import FakeKubeAPI
from tests.support.fakes.rollout import RolloutSimulator
from tests.support.fakes.tekton import TektonSimulator
from tests.support.stack import OLD_IMAGE, SHA1, SHA2, STATUS, Stack, deployed_image, push_body
from tests.support import SECRETS

pytestmark = pytest.mark.e2e


def test_push_to_main_builds_once_reports_in_order_and_rolls_staging_out(stack: Stack, kube: FakeKubeAPI) -> None:
    """webhook -> one PipelineRun -> pending, running, success -> staging at image:<commit> -> deploy/staging success."""
    with TektonSimulator(kube, auto_start=0.3, auto_finish=1.5), RolloutSimulator(kube):
        first = stack.push("one")
        # The same push from a second hook: the edge answers duplicate by its push fingerprint (issue 11).
        second = stack.push("one-again-by-group-hook", expect=200)
        assert second == first
        stack.wait("deploy/staging success", lambda: stack.gitlab.states(SHA1, "deploy/staging")[-1:] == ["success"])
    assert stack.gitlab.states(SHA1, STATUS) == ["pending", "running", "success"]
    assert stack.gitlab.states(SHA1, "deploy/staging") == ["running", "success"]
    assert len(stack.runs()) == 1
    assert stack.image() == deployed_image(SHA1)  # by digest: a re-pushed tag cannot change what runs
    steps = sorted(e["step"] for e in stack.delivery(first)["log"] if e["step"].startswith("pipelinerun_"))
    assert steps == ["pipelinerun_created"]
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
    assert canceled.body["description"] == f"build-test-push: canceled, superseded by {SHA2[:8]}"
    assert stack.gitlab.states(SHA2, STATUS) == ["pending", "running", "success"]
    assert stack.image() == deployed_image(SHA2)


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
        s.start_all()
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


def test_a_signed_push_of_a_commit_the_git_host_does_not_know_is_refused(stack: Stack, kube: FakeKubeAPI) -> None:
    """The secret signed it, but the origin has no such commit: a failed status naming why, and no PipelineRun."""
    made_up = "ab" * 20
    delivery = stack.push("forged", sha=made_up, move=False)
    stack.wait("failed status", lambda: stack.gitlab.states(made_up, STATUS) == ["failed"])
    [failed] = [c.body for c in stack.gitlab.calls if (c.body or {}).get("state") == "failed"]
    assert "does not confirm commit abababab on branch main" in failed["description"]
    stack.wait("decision log says failed", lambda: stack.delivery(delivery)["state"] == "failed")
    assert [e["step"] for e in stack.delivery(delivery)["log"]][-2:] == ["failed", "status_posted"]
    assert stack.runs() == [] and not kube.calls("POST", r"/pipelineruns$")


def test_an_old_push_delivered_late_never_cancels_the_newer_run(stack: Stack, kube: FakeKubeAPI) -> None:
    """Push 2 (before = 1) reaches the broker before push 1: push 1's run is cancelled at once, push 2 deploys."""
    with TektonSimulator(kube, auto_start=0.2, auto_finish=2.0), RolloutSimulator(kube):
        stack.origin.move("main", SHA1)  # both pushes happened; their webhooks arrive in the wrong order
        new = stack.push("new", sha=SHA2, before=SHA1)
        stack.wait("new run running", lambda: stack.gitlab.states(SHA2, STATUS)[-1:] == ["running"])
        old = stack.push("old", sha=SHA1, move=False)
        stack.wait("old run canceled", lambda: stack.gitlab.states(SHA1, STATUS)[-1:] == ["canceled"])
        stack.wait("new run deployed", lambda: stack.gitlab.states(SHA2, "deploy/staging")[-1:] == ["success"])
    assert stack.gitlab.states(SHA2, STATUS) == ["pending", "running", "success"]
    assert stack.image() == deployed_image(SHA2)
    assert any(e["step"] == "superseded" and "push chain" in e["detail"] for e in stack.delivery(old)["log"])
    assert not any(e["step"] == "superseded" for e in stack.delivery(new)["log"])
