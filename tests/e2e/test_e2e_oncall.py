"""End to end, the on-call surface: re-run and cancel from the CLI (local and --server) and the
API, the decision log, the audit log and /metrics, against the real serve/worker/watcher
processes, the fake Kubernetes API (Tekton and rollout simulators) and the fake GitLab.

A cancel and a deploy-only re-run are signed requests a worker carries out (`cibroker.cancel_run`,
`cibroker.deploy` with a request id). The tests that need the worker's consumers of those say so
(`needs_request_consumers`) and are skipped, with that reason, on a tree whose worker lacks them;
tests/e2e/test_oncall_trust.py checks the on-call side of both at the Redis and wire level regardless.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.fakes.kube_api import FakeKubeAPI
from tests.support.fakes.rollout import RolloutSimulator
from tests.support.fakes.tekton import TektonSimulator
from broker.core.records import DEPLOY_TASK
from broker.core.records import CANCEL_TASK
from tests.support.fakes.githost_api import FakeGitLab
from tests.support.stack import API_TOKEN, IMAGE, SHA1, STATUS, Stack
from tests.support import CIBROKER, SECRETS, Process, base_env, free_port, payload, wait_healthy

pytestmark = pytest.mark.e2e
SIGNING_KEY = "e2e-oncall-signing-key-for-the-whole-stack-0123456789"


@pytest.fixture
def stack(tmp_path: Path, redis_url: str, kube: FakeKubeAPI, fake_gitlab_api: FakeGitLab) -> Iterator[Stack]:
    """tests.support.stack's stack, every process sharing one signing key (workers verify what the on-call side signs)."""
    s = Stack(tmp_path, redis_url, kube, fake_gitlab_api,  # the origin: a real repository (file://)
              CIBROKER_SIGNING_KEY=SIGNING_KEY)
    s.start_all()
    yield s
    s.stop()


def _missing_request_consumers() -> str:
    """Why this tree's worker cannot carry out people's signed requests yet ("" when it can)."""
    from celery import Celery

    from workers import tasks

    app = Celery("probe", set_as_current=False)
    tasks.register(app, orchestrator=lambda: None)  # type: ignore[arg-type, return-value]
    if CANCEL_TASK not in app.tasks:
        return f"the worker has no {CANCEL_TASK} task yet (issue 10, worker side)"
    if list(inspect.signature(app.tasks[DEPLOY_TASK].run).parameters)[:2] == ["obj", "environment"]:
        return f"the worker's {DEPLOY_TASK} still takes a run snapshot, not (namespace, name, environment, attempt, request_id)"
    return ""


needs_request_consumers = pytest.mark.skipif(bool(_missing_request_consumers()), reason=_missing_request_consumers() or "-")


def cli(stack: Stack, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CIBROKER, *args], env=stack.env, cwd=stack.tmp_path, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def api(stack: Stack, method: str, path: str, token: str | None = API_TOKEN, **kw: Any) -> httpx.Response:
    headers = {"X-Cibroker-Actor": "alice"} | ({"Authorization": f"Bearer {token}"} if token is not None else {})
    return httpx.request(method, f"{stack.url}{path}", headers=headers, timeout=10, **kw)


def test_rerun_from_the_cli_builds_again_follows_to_the_end_and_is_audited(stack: Stack, kube: FakeKubeAPI) -> None:
    with TektonSimulator(kube, auto_start=0.3, auto_finish=1.0), RolloutSimulator(kube):
        delivery = stack.push("one")
        stack.wait("deploy/staging success", lambda: stack.gitlab.states(SHA1, "deploy/staging")[-1:] == ["success"])
        [run] = stack.runs()
        first = f"ci/{run['metadata']['name']}"
        done = cli(stack, "rerun", "--run", first, "--reason", "flaky integration test", "--follow", "--config", str(stack.config))
        assert done.returncode == 0, done.stdout + done.stderr + stack.logs()
    names = sorted(r["metadata"]["name"] for r in stack.runs())
    assert len(names) == 2
    second = next(r for r in stack.runs() if f"ci/{r['metadata']['name']}" != first)
    assert second["metadata"]["annotations"]["cibroker.dev/attempt"] == "2"
    # GitLab shows the second build as a new status after the first one ended: nothing posted out of order.
    assert stack.gitlab.states(SHA1, STATUS) == ["pending", "running", "success", "pending", "running", "success"]
    assert "queued a re-run of PipelineRun" in done.stdout and "pipelinerun_created" in done.stdout
    new_delivery = second["metadata"]["labels"]["cibroker.dev/delivery"]
    shown = cli(stack, "deliveries", "show", new_delivery, "--config", str(stack.config))
    assert shown.returncode == 0, shown.stderr
    assert "rerun_requested" in shown.stdout and "flaky integration test" in shown.stdout
    assert f"ci/{second['metadata']['name']}  success" in shown.stdout
    original = stack.delivery(delivery)
    assert any(e["step"] == "rerun_requested" and new_delivery in e["detail"] for e in original["log"])
    audit = cli(stack, "audit", "--json", "--config", str(stack.config))
    [entry] = json.loads(audit.stdout)
    assert entry["action"] == "rerun" and entry["reason"] == "flaky integration test" and entry["channel"] == "cli"
    metrics = httpx.get(f"{stack.url}/metrics").text
    assert 'cibroker_webhooks_total{decision="accepted",event="Push Hook",host="gitlab"} 1.0' in metrics
    assert 'cibroker_runs_total{outcome="success",route="shop-api"} 2.0' in metrics
    assert 'cibroker_pipelineruns_created_total{route="shop-api",trigger="rerun"} 1.0' in metrics
    assert 'cibroker_deploys_total{environment="staging",outcome="success"} 2.0' in metrics
    assert 'cibroker_status_posts_total{host="gitlab",outcome="posted"}' in metrics
    assert 'cibroker_actions_total{action="rerun",channel="cli"} 1.0' in metrics
    assert "cibroker_queue_depth 0.0" in metrics


@needs_request_consumers
def test_cancel_through_the_api_reports_canceled_with_who_and_why(stack: Stack, kube: FakeKubeAPI) -> None:
    with TektonSimulator(kube, auto_start=0.2, auto_finish=300):
        stack.push("c")
        stack.wait("running", lambda: stack.gitlab.states(SHA1, STATUS)[-1:] == ["running"])
        [run] = stack.runs()
        path = f"/api/runs/ci/{run['metadata']['name']}/cancel"
        assert api(stack, "POST", path, token="wrong", json={"reason": "x"}).status_code == 403
        assert api(stack, "POST", path, token=None, json={"reason": "x"}).status_code == 401
        answer = api(stack, "POST", path, json={"reason": "deploy freeze"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["requested"] is True and answer.json()["request_id"]
        stack.wait("canceled", lambda: stack.gitlab.states(SHA1, STATUS)[-1:] == ["canceled"])
    assert stack.gitlab.states(SHA1, STATUS) == ["pending", "running", "canceled"]
    last = [c for c in stack.gitlab.calls if c.method == "POST"][-1]
    assert last.body["description"] == "build-test-push: canceled by alice (token token1): deploy freeze"
    again = api(stack, "POST", path, json={})
    assert again.status_code == 409 and "already ended" in again.json()["error"]
    [entry] = api(stack, "GET", "/api/audit").json()
    assert (entry["who"], entry["channel"], entry["action"]) == ("alice (token token1)", "api", "cancel")


@needs_request_consumers
def test_cancel_from_the_cli_waits_until_the_run_is_canceled(stack: Stack, kube: FakeKubeAPI) -> None:
    with TektonSimulator(kube, auto_start=0.2, auto_finish=300):
        stack.push("w")
        stack.wait("running", lambda: stack.gitlab.states(SHA1, STATUS)[-1:] == ["running"])
        [run] = stack.runs()
        done = cli(stack, "cancel", f"ci/{run['metadata']['name']}", "--reason", "wrong branch", "--wait", "--timeout", "60",
                   "--config", str(stack.config))
    assert done.returncode == 0, done.stdout + done.stderr + stack.logs()
    assert "requested" in done.stdout and f"ci/{run['metadata']['name']}: canceled" in done.stdout
    stack.wait("canceled", lambda: stack.gitlab.states(SHA1, STATUS)[-1:] == ["canceled"])


@needs_request_consumers
def test_a_forced_deploy_only_rolls_staging_back_to_an_older_build(tmp_path: Path, redis_url: str, kube: FakeKubeAPI,
                                                                  fake_gitlab_api: FakeGitLab) -> None:
    """The rollback a person asks for: deploy-only --force of an older run's build, followed to the end and audited.

    The origin is the Git host's real repository (c1 -> c2): the automatic deploy of c2 over c1 passes the ancestry guard,
    which fails closed when git cannot tell (issue 10).
    """
    stack = Stack(tmp_path, redis_url, kube, fake_gitlab_api, CIBROKER_SIGNING_KEY=SIGNING_KEY)
    sha1, sha2 = stack.origin.sha(1), stack.origin.sha(2)  # commit 1 is commit 2's parent
    stack.start_all()
    try:
        with TektonSimulator(kube, auto_start=0.2, auto_finish=0.5), RolloutSimulator(kube):
            stack.push("old", sha=sha1)
            stack.wait("c1 deployed", lambda: stack.gitlab.states(sha1, "deploy/staging")[-1:] == ["success"])
            stack.push("new", sha=sha2, before=sha1)
            stack.wait("c2 deployed", lambda: stack.gitlab.states(sha2, "deploy/staging")[-1:] == ["success"])
            [old] = [r for r in stack.runs() if r["metadata"]["labels"]["cibroker.dev/sha"] == sha1]
            done = cli(stack, "rerun", "--run", f"ci/{old['metadata']['name']}", "--deploy-only", "--force", "--reason",
                       "2.3 breaks checkout", "--follow", "--timeout", "60", "--config", str(stack.config))
            assert done.returncode == 0, done.stdout + done.stderr + stack.logs()
        first, second = (image for _, _, image in stack.images.changes[:2])  # c1's rollout, then c2's
        assert first != second and stack.image() == first and IMAGE in first
        assert "forced" in done.stdout and "deploy_forced" in done.stdout
        [entry] = json.loads(cli(stack, "audit", "--json", "--config", str(stack.config)).stdout)
        assert (entry["action"], entry["force"], entry["reason"]) == ("redeploy", True, "2.3 breaks checkout")
    finally:
        stack.stop()


def test_the_remote_cli_talks_to_the_api_with_the_same_answers(stack: Stack, kube: FakeKubeAPI) -> None:
    with TektonSimulator(kube, auto_start=0.2, auto_finish=0.5):
        stack.push("r")
        stack.wait("success", lambda: stack.gitlab.states(SHA1, STATUS)[-1:] == ["success"])
    local = json.loads(cli(stack, "runs", "list", "--json", "--config", str(stack.config)).stdout)
    remote = json.loads(cli(stack, "runs", "list", "--json", "--server", stack.url, "--token", API_TOKEN).stdout)
    assert [r["run"] for r in local] == [r["run"] for r in remote] and len(remote) == 1
    assert remote[0]["state"] == "success"
    shown = cli(stack, "runs", "show", remote[0]["run"], "--server", stack.url, "--token", API_TOKEN)
    assert shown.returncode == 0 and "tkn pipelinerun logs" in shown.stdout
    dry = cli(stack, "rerun", "--run", remote[0]["run"], "--dry-run", "--server", stack.url, "--token", API_TOKEN)
    assert dry.returncode == 0 and "would queue" in dry.stdout and len(stack.runs()) == 1
    refused = cli(stack, "cancel", remote[0]["run"], "--server", stack.url, "--token", API_TOKEN)
    assert refused.returncode == 1 and "already ended" in refused.stderr and "Traceback" not in refused.stderr
    denied = cli(stack, "runs", "list", "--server", stack.url, "--token", "nope")
    assert denied.returncode == 2 and "invalid API token" in denied.stderr
    missing = cli(stack, "runs", "show", "ci/nope", "--server", stack.url, "--token", API_TOKEN)
    assert missing.returncode == 1 and "no PipelineRun 'nope'" in missing.stderr


def test_openapi_describes_the_api_and_the_edge(stack: Stack) -> None:
    spec = httpx.get(f"{stack.url}/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    for path in ("/hooks/{host_id}", "/api/deliveries", "/api/runs", "/api/runs/{namespace}/{name}/rerun",
                 "/api/runs/{namespace}/{name}/cancel", "/api/audit", "/metrics"):
        assert path in spec["paths"], path


def test_a_rollout_slower_than_a_few_polls_is_still_followed_to_success(stack: Stack, kube: FakeKubeAPI) -> None:
    """Regression: Celery read max_retries=None as 3, so a rollout taking over ~8 s was dropped, stuck at running."""
    with TektonSimulator(kube, auto_start=0.2, auto_finish=0.3), RolloutSimulator(kube, step_seconds=10):
        stack.push("slow")
        stack.wait("deploy/staging success", lambda: stack.gitlab.states(SHA1, "deploy/staging")[-1:] == ["success"],
                   timeout=60)
    assert stack.gitlab.states(SHA1, "deploy/staging") == ["running", "success"]


def test_dev_without_a_cluster_is_a_dry_run_that_shows_the_whole_decision_path(tmp_path: Path) -> None:
    """`cibroker dev` on embedded defaults, no cluster: a push is routed and its PipelineRun rendered and recorded."""
    from tests.support.crd import validate

    port = free_port()
    env = base_env(tmp_path, KUBECONFIG=str(tmp_path / "no-such-kubeconfig"))
    proc = Process(["dev", "--port", str(port)], env=env, cwd=tmp_path, log=tmp_path / "dev.log")
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        answer = httpx.post(f"http://127.0.0.1:{port}/hooks/gitlab", content=payload("gitlab/push-branch-update.json"),
                            headers={"X-Gitlab-Event": "Push Hook", "X-Gitlab-Token": SECRETS["GITLAB_WEBHOOK_SECRET"],
                                     "Content-Type": "application/json"})
        assert answer.status_code == 202 and answer.headers["x-cibroker-mode"] == "dry-run"
        assert answer.json()["mode"].startswith("dry-run")
        delivery_id = answer.json()["delivery_id"]
        deadline = time.monotonic() + 30
        while True:
            found = httpx.get(f"http://127.0.0.1:{port}/api/deliveries/{delivery_id}").json()
            if found["state"] == "dry-run" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        [entry] = [e for e in found["log"] if e["step"] == "dry_run"]
        assert "nothing created, no commit status posted" in entry["detail"]
        validate(entry["pipelinerun"])
        assert entry["pipelinerun"]["spec"]["params"][1] == {"name": "git-revision",
                                                              "value": "2adc9465c4edfc33834e173fe89436a7cb899a1d"}
        runs = httpx.get(f"http://127.0.0.1:{port}/api/runs")
        assert runs.status_code == 503 and "no Kubernetes cluster" in runs.json()["error"]
        for page in ("/", f"/deliveries/{delivery_id}"):
            html = httpx.get(f"http://127.0.0.1:{port}{page}").text
            assert "DRY RUN" in html, page
        assert "dry_run" in httpx.get(f"http://127.0.0.1:{port}/deliveries/{delivery_id}").text
    finally:
        proc.stop()
    lines = proc.lines()
    assert lines and all(line.get("mode") == "dry-run" for line in lines)
    assert any(line["event"] == "dry_run" for line in lines)
