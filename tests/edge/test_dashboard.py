"""The dashboard's pages and forms, rendered by the real app over a real Redis and a recording fake cluster.

Fast checks of what the browser test (tests/edge/test_dashboard_browser.py) does not cover one by
one: escaping, the token and origin guards on actions, the no-cluster pages, the fragment the
live refresh swaps in.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from starlette.testclient import TestClient

from broker.core import pipelinerun as pr
from broker.core.records import log_entry
from broker.core.errors import Transient
from broker.core.runlabels import A_CANCELLED_BY
from broker.services.oncall import Operations
from broker.adapters.redis_store import SyncStore
from broker.core.trust import verify_request
from tests.support import web_app
from config.settings import Settings, load_settings
from tests.support.fakes.ports import FakeCluster, FakeGitHost, FakeResolver
from tests.support import FIXTURES, ROUTING, SECRETS, make_settings, payload
from broker.services.runs import Orchestrator

SHA1 = "1111111111111111111111111111111111111111"
TOKEN = "dashboard-test-token-9f8e7d"
SIGNING_KEY = "a-dashboard-test-signing-key-of-32-chars-or-more"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
SAME_ORIGIN = {**FORM, "Origin": "http://testserver"}


def push_body(*, repo: str = "acme/shop-api", ref: str = "refs/heads/main", sha: str = SHA1,
              web: str = "https://gitlab.example.com") -> bytes:
    data = json.loads(payload("gitlab/push-branch-update.json"))
    data.update(ref=ref, before="0" * 40, after=sha, checkout_sha=sha)
    data["project"]["path_with_namespace"] = repo
    data["project"]["web_url"] = f"{web}/{repo}"  # on the host's own origin, naming the repo (issue 11)
    data["commits"] = [{"id": sha, "message": "change\n"}]
    return json.dumps(data).encode()


class Board:
    """The web app (dashboard included) and an orchestrator sharing one Redis and one fake cluster."""

    def __init__(self, settings: Settings, redis_url: str, *, with_cluster: bool = True,
                 base_url: str = "http://testserver") -> None:
        self.cluster = FakeCluster(service_accounts={("ci", "pipeline-bot")})
        self.host = FakeGitHost()
        self.store = SyncStore(redis_url, timeout=2)
        self.resolver = FakeResolver()  # the remote: each push moves its branch there first, as `git push` does
        self.orch = Orchestrator(settings=settings, store=self.store, cluster=self.cluster,
                                 git_hosts={"gitlab": self.host}, resolver=self.resolver)
        self.ops = Operations(settings=settings, store=self.store, cluster=self.cluster if with_cluster else None)
        self.client = TestClient(web_app(settings, operations=self.ops), base_url=base_url)
        self.client.__enter__()
        self.web = settings.routing.hosts["gitlab"].api_url.removesuffix("/api/v4")

    def push(self, key: str, *, expect: int = 202, **kw: Any) -> str:
        self.resolver.push(kw.get("ref", "refs/heads/main").removeprefix("refs/heads/"), kw.get("sha", SHA1))
        r = self.client.post("/hooks/gitlab", content=push_body(web=self.web, **kw),
                             headers={"X-Gitlab-Event": "Push Hook", "X-Gitlab-Token": SECRETS["GITLAB_WEBHOOK_SECRET"],
                                      "Idempotency-Key": key})
        assert r.status_code == expect, r.text
        return r.json()["delivery_id"]

    def build(self, key: str, **kw: Any) -> tuple[str, str]:
        """A push whose PipelineRun was created (and `pending` posted): (delivery id, run name)."""
        delivery_id = self.push(key, **kw)
        [name] = self.orch.start(delivery_id, token=f"start-{key}")
        return delivery_id, name

    def move(self, name: str, status: str, reason: str, message: str = "") -> None:
        """Tekton moved the run; the watcher's report follows (statuses posted, logged)."""
        obj = self.cluster.runs[("ci", name)]
        obj.setdefault("status", {})["startTime"] = "2026-11-22T04:41:02Z"
        if status != "Unknown":
            obj["status"]["completionTime"] = "2026-11-22T04:42:09Z"
        self.orch.observe(self.cluster.set_condition("ci", name, status, reason, message), token=f"{name}-{reason}")

    def close(self) -> None:
        self.client.__exit__(None, None, None)


@pytest.fixture
def board(tmp_path: Path, redis_url: str) -> Iterator[Board]:
    settings = make_settings(tmp_path, routing=(FIXTURES / "routing" / "example.yaml").read_text(),
                             environ={"CIBROKER_REDIS_URL": redis_url, "CIBROKER_API_TOKENS": f"oncall={TOKEN}",
                                      "CIBROKER_SIGNING_KEY": SIGNING_KEY})
    b = Board(settings, redis_url)
    yield b
    b.close()


@pytest.fixture
def db(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


def rows(html: str, kind: str) -> list[str]:
    """The ids of the table rows of one kind (`delivery` or `run`) a page lists."""
    return re.findall(rf'<tr data-{kind}="([^"]+)"', html)


def section(html: str, name: str) -> str:
    match = re.search(rf'<section class="card" id="{name}">(.*?)</section>', html, re.S)
    assert match, f"no section {name!r} on the page"
    return match.group(1)


def test_overview_shows_each_delivery_with_its_run_state_commit_ref_route_and_duration(board: Board) -> None:
    delivery_id, name = board.build("a")
    board.move(name, "True", "Succeeded")
    page = board.client.get("/")
    assert page.status_code == 200
    assert rows(page.text, "delivery") == [delivery_id]
    assert rows(page.text, "run") == [f"ci/{name}"]
    deliveries = section(page.text, "deliveries")
    assert f'href="/runs/ci/{name}"' in deliveries and 'class="state success"' in deliveries
    assert "acme/shop-api" in deliveries and ">main<" in deliveries and SHA1[:8] in deliveries and "shop-api" in deliveries
    assert "67s" in section(page.text, "runs")  # 04:41:02 -> 04:42:09
    assert f'href="/deliveries/{delivery_id}"' in deliveries


def test_filters_by_repo_and_by_state_without_javascript(board: Board) -> None:
    """GET parameters filter both tables: a run state matches deliveries through their runs."""
    built, name = board.build("a")
    board.move(name, "False", "Failed", "task build failed")
    ignored = board.push("b", repo="acme/other", expect=200)  # no route takes acme/other: recorded as ignored
    assert rows(board.client.get("/").text, "delivery") == [ignored, built]
    assert rows(board.client.get("/", params={"repo": "acme/shop-api"}).text, "delivery") == [built]
    assert rows(board.client.get("/", params={"repo": "acme/other"}).text, "run") == []
    only_ignored = board.client.get("/", params={"state": "ignored"}).text
    assert rows(only_ignored, "delivery") == [ignored] and rows(only_ignored, "run") == []
    failed = board.client.get("/", params={"state": "failed"}).text
    assert rows(failed, "delivery") == [built] and rows(failed, "run") == [f"ci/{name}"]
    assert rows(board.client.get("/", params={"state": "success"}).text, "delivery") == []
    assert '<option value="failed" selected>' in failed  # the form shows the filter in force


def test_run_page_shows_statuses_with_answers_taskruns_failing_step_deploys_and_log_commands(board: Board) -> None:
    delivery_id, name = board.build("a")
    board.move(name, "Unknown", "Running")
    board.cluster.taskruns[("ci", name)] = [
        {"metadata": {"name": f"{name}-clone", "labels": {"tekton.dev/pipelineTask": "clone"}},
         "status": {"podName": f"{name}-clone-pod", "startTime": "2026-11-22T04:41:03Z", "completionTime": "2026-11-22T04:41:20Z",
                    "conditions": [{"type": "Succeeded", "status": "True", "reason": "Succeeded"}]}},
        {"metadata": {"name": f"{name}-build", "labels": {"tekton.dev/pipelineTask": "build"}},
         "status": {"podName": f"{name}-build-pod", "startTime": "2026-11-22T04:41:21Z", "completionTime": "2026-11-22T04:42:08Z",
                    "steps": [{"name": "compile", "terminated": {"exitCode": 2}}],
                    "conditions": [{"type": "Succeeded", "status": "False", "reason": "Failed",
                                    "message": "step compile exited 2"}]}},
    ]
    board.move(name, "False", "Failed", "Tasks Completed: 2 (Failed: 1)")
    board.store.append_log(delivery_id, log_entry("deploy_refused", "staging: not deployed: 11111111 is older", at=0))
    page = board.client.get(f"/runs/ci/{name}")
    assert page.status_code == 200
    statuses = section(page.text, "statuses")
    assert [m for m in re.findall(r'class="state (pending|running|failed)"', statuses)] == ["pending", "running", "failed"]
    assert statuses.count('class="state posted"') == 3 and "cibroker/build-test-push" in statuses
    taskruns = section(page.text, "taskruns")
    assert "clone" in taskruns and "compile" in taskruns and "47s" in taskruns
    assert "Failing task: build" in page.text and "step compile exited 2" in page.text
    assert "staging: not deployed" in section(page.text, "deploys")
    logs = section(page.text, "logs")
    assert f"tkn pipelinerun logs {name} -n ci" in logs and f"kubectl logs -n ci {name}-build-pod --all-containers" in logs
    assert "Cancel run" not in page.text  # the run ended: only re-run is offered


def test_everything_from_a_payload_is_escaped(tmp_path: Path, redis_url: str) -> None:
    """A branch name can hold quotes and angle brackets: it is shown, never run as HTML."""
    settings = make_settings(tmp_path, routing=ROUTING, environ={"CIBROKER_REDIS_URL": redis_url, "CIBROKER_API_TOKENS": TOKEN})
    b = Board(settings, redis_url)
    try:
        evil = '"><script>alert(1)</script><img/src=x/onerror=alert(2)>'
        delivery_id, name = b.build("x", ref=f"refs/heads/{evil}")
        pages = [b.client.get("/").text, b.client.get(f"/deliveries/{delivery_id}").text,
                 b.client.get(f"/runs/ci/{name}").text]
        for html in pages:
            assert "<script>alert" not in html and "<img/src" not in html
            assert "&#34;&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in html
    finally:
        b.close()


def test_rerun_with_the_token_queues_the_next_attempt_and_redirects_to_its_delivery(board: Board, db: redis.Redis) -> None:
    first, name = board.build("a")
    board.move(name, "True", "Succeeded")
    queued_before = db.llen("cibroker")
    r = board.client.post(f"/runs/ci/{name}/rerun", data={"token": TOKEN, "reason": "flaky test", "who": "ana"},
                          headers=SAME_ORIGIN, follow_redirects=False)
    assert r.status_code == 303, r.text
    new_id = r.headers["location"].removeprefix("/deliveries/")
    assert re.fullmatch(r"[0-9a-f]{26}", new_id) and new_id != first
    record = board.store.get(new_id)
    assert record["attempt"] == 2 and record["requested_by"] == "ana (token oncall)"
    assert db.llen("cibroker") == queued_before + 1
    [entry] = board.ops.audit_log()
    assert (entry["who"], entry["channel"], entry["action"], entry["reason"]) == ("ana (token oncall)", "dashboard", "rerun", "flaky test")
    [made] = board.orch.start(new_id, attempt=2, token="t2")  # what the worker does with the queued task
    page = board.client.get(r.headers["location"])
    assert "flaky test" in page.text and rows(section(page.text, "runs"), "run") == [f"ci/{made}"]
    assert board.cluster.runs[("ci", made)]["metadata"]["annotations"][pr.A_ATTEMPT] == "2"


@pytest.mark.parametrize(("token", "status", "said"), [("wrong-token", 403, "invalid API token"),
                                                       ("", 401, "enter an API token")])
def test_a_wrong_or_missing_token_is_refused_and_nothing_is_done(board: Board, db: redis.Redis, token: str, status: int,
                                                                 said: str) -> None:
    _, name = board.build("a")
    queued_before = db.llen("cibroker")
    for action in ("rerun", "cancel"):
        r = board.client.post(f"/runs/ci/{name}/{action}", data={"token": token, "reason": "why"}, headers=SAME_ORIGIN)
        assert r.status_code == status
        assert said in r.text and 'role="alert"' in r.text
        assert 'value="why"' in r.text and 'name="token" autocomplete="off" required>' in r.text  # the token is never echoed
        if token:
            assert token not in r.text
    assert db.llen("cibroker") == queued_before and board.ops.audit_log() == []
    assert board.cluster.runs[("ci", name)]["spec"].get("status") is None


@pytest.mark.parametrize("headers", [{"Origin": "https://evil.example"}, {"Origin": "null"},
                                     {"Referer": "https://evil.example/page"}])
def test_a_form_posted_from_another_site_is_refused_even_with_the_token(board: Board, db: redis.Redis,
                                                                        headers: dict[str, str]) -> None:
    _, name = board.build("a")
    queued_before = db.llen("cibroker")
    r = board.client.post(f"/runs/ci/{name}/rerun", data={"token": TOKEN}, headers={**FORM, **headers}, follow_redirects=False)
    assert r.status_code == 403 and "posted from another site" in r.text
    assert db.llen("cibroker") == queued_before and board.ops.audit_log() == []
    same_site = {**FORM, "Referer": f"http://testserver/runs/ci/{name}"}
    assert board.client.post(f"/runs/ci/{name}/rerun", data={"token": TOKEN}, headers=same_site,
                             follow_redirects=False).status_code == 303


def test_cancel_requests_a_stop_records_who_and_refuses_a_finished_one(board: Board, db: redis.Redis) -> None:
    """The page queues a signed cancel request for a worker; it says so, and does not touch the run itself."""
    _, name = board.build("a")
    board.move(name, "Unknown", "Running")
    assert "Cancel run" in board.client.get(f"/runs/ci/{name}").text
    before = json.dumps(board.cluster.runs[("ci", name)], sort_keys=True)
    queued = db.llen("cibroker")
    r = board.client.post(f"/runs/ci/{name}/cancel", data={"token": TOKEN, "reason": "wrong branch"}, headers=FORM,
                          follow_redirects=False)
    assert (r.status_code, r.headers["location"]) == (303, f"/runs/ci/{name}?did=cancel")
    assert json.dumps(board.cluster.runs[("ci", name)], sort_keys=True) == before
    assert A_CANCELLED_BY not in board.cluster.runs[("ci", name)]["metadata"]["annotations"]
    assert db.llen("cibroker") == queued + 1
    message = json.loads(db.lindex("cibroker", 0))  # LPUSH: the newest message is first
    [request_id] = json.loads(base64.b64decode(message["body"]))[0]
    assert message["headers"]["task"] == "cibroker.cancel_run"
    request = verify_request(SIGNING_KEY.encode(), board.store.get_request(request_id), request_id=request_id)
    assert (request.run, request.actor, request.channel, request.reason) == (f"ci/{name}", "oncall", "dashboard", "wrong branch")
    page = board.client.get(r.headers["location"]).text
    assert "Cancel requested: queued for a worker" in page
    board.move(name, "False", "Cancelled")
    again = board.client.post(f"/runs/ci/{name}/cancel", data={"token": TOKEN}, headers=FORM)
    assert again.status_code == 409 and "already ended" in again.text


def test_deploy_only_from_the_run_page_is_unforced_unless_the_box_is_ticked_with_a_reason(board: Board,
                                                                                         db: redis.Redis) -> None:
    _, name = board.build("a")
    board.move(name, "True", "Succeeded")
    page = board.client.get(f"/runs/ci/{name}").text
    assert 'name="deploy_only"' in page and 'name="force"' in page
    db.delete("cibroker")

    def queued_request() -> Any:
        message = json.loads(db.lpop("cibroker"))
        args = json.loads(base64.b64decode(message["body"]))[0]
        assert message["headers"]["task"] == "cibroker.deploy" and args[:3] == ["ci", name, "staging"] and len(args) == 5
        return verify_request(SIGNING_KEY.encode(), board.store.get_request(args[4]), request_id=args[4])

    r = board.client.post(f"/runs/ci/{name}/rerun", data={"token": TOKEN, "deploy_only": "on"}, headers=FORM,
                          follow_redirects=False)
    assert (r.status_code, r.headers["location"]) == (303, f"/runs/ci/{name}?did=redeploy")
    assert queued_request().force is False
    assert "Deploy requested: queued for a worker" in board.client.get(r.headers["location"]).text
    refused = board.client.post(f"/runs/ci/{name}/rerun", data={"token": TOKEN, "deploy_only": "on", "force": "on"},
                                headers=FORM)
    assert refused.status_code == 400 and "say why" in refused.text and db.llen("cibroker") == 0
    assert 'name="force" checked' in refused.text  # the form comes back as it was sent
    r = board.client.post(f"/runs/ci/{name}/rerun", data={"token": TOKEN, "deploy_only": "on", "force": "on",
                                                          "reason": "rollback"}, headers=FORM, follow_redirects=False)
    assert r.status_code == 303
    request = queued_request()
    assert (request.force, request.channel, request.reason) == (True, "dashboard", "rollback")
    r = board.client.post(f"/runs/ci/{name}/rerun", data={"token": TOKEN, "force": "on", "reason": "x"}, headers=FORM,
                          follow_redirects=False)  # force without deploy-only: an ordinary re-run, nothing forced
    assert r.status_code == 303 and json.loads(db.lpop("cibroker"))["headers"]["task"] == "cibroker.process_delivery"


def test_a_delivery_that_made_no_run_can_be_rerun_from_its_page(board: Board) -> None:
    """No service account: the delivery failed before any PipelineRun existed; its page offers the re-run."""
    board.cluster.service_accounts.clear()
    delivery_id = board.push("a")
    assert board.orch.start(delivery_id, token="t1") == []
    page = board.client.get(f"/deliveries/{delivery_id}")
    assert "pipeline-bot" in section(page.text, "log") and f'action="/deliveries/{delivery_id}/rerun"' in page.text
    r = board.client.post(f"/deliveries/{delivery_id}/rerun", data={"token": TOKEN}, headers=FORM, follow_redirects=False)
    assert r.status_code == 303 and board.store.get(r.headers["location"].removeprefix("/deliveries/"))["attempt"] == 2


def test_without_a_cluster_the_pages_say_so_instead_of_failing(tmp_path: Path, redis_url: str) -> None:
    settings = make_settings(tmp_path, routing=(FIXTURES / "routing" / "example.yaml").read_text(),
                             environ={"CIBROKER_REDIS_URL": redis_url, "CIBROKER_API_TOKENS": TOKEN})
    b = Board(settings, redis_url, with_cluster=False)
    try:
        delivery_id = b.push("a")
        index = b.client.get("/")
        assert index.status_code == 200 and "No Kubernetes cluster configured" in index.text
        assert rows(index.text, "delivery") == [delivery_id]
        page = b.client.get(f"/deliveries/{delivery_id}")
        assert page.status_code == 200 and "No Kubernetes cluster configured" in page.text
        run = b.client.get("/runs/ci/shop-api-main-11111111-abcdef")
        assert run.status_code == 503 and "No Kubernetes cluster configured" in run.text
    finally:
        b.close()


def test_the_live_refresh_gets_only_the_main_content_and_pages_carry_a_strict_policy(board: Board) -> None:
    delivery_id, _ = board.build("a")
    full = board.client.get(f"/deliveries/{delivery_id}")
    nonce = re.search(r"script-src 'nonce-([^']+)'", full.headers["content-security-policy"]).group(1)
    assert f'<script nonce="{nonce}">' in full.text and "frame-ancestors 'none'" in full.headers["content-security-policy"]
    assert f'data-live-url="/deliveries/{delivery_id}"' in full.text
    fragment = board.client.get(f"/deliveries/{delivery_id}", headers={"X-Dashboard-Fragment": "1"})
    assert fragment.status_code == 200 and "<html" not in fragment.text and "<script" not in fragment.text
    assert 'data-title="cibroker · delivery' in fragment.text and delivery_id in fragment.text
    assert fragment.headers["vary"] == "X-Dashboard-Fragment" and fragment.headers["cache-control"] == "no-store"


@pytest.mark.parametrize(("path", "said"), [("/deliveries/0123456789abcdef0123456789", "no delivery"),
                                            ("/deliveries/not-an-id", "26 lower-case hex"),
                                            ("/runs/ci/no-such-run", "no PipelineRun"),
                                            ("/runs/ci/Bad_Name", "DNS-1123")])
def test_unknown_things_are_404_pages_that_say_why(board: Board, path: str, said: str) -> None:
    r = board.client.get(path)
    assert r.status_code == 404 and said in r.text and r.headers["content-type"].startswith("text/html")


def test_no_page_shows_a_secret(board: Board) -> None:
    delivery_id, name = board.build("a")
    board.client.post(f"/runs/ci/{name}/rerun", data={"token": TOKEN}, headers=FORM)
    for path in ("/", f"/deliveries/{delivery_id}", f"/runs/ci/{name}"):
        html = board.client.get(path).text
        for secret in (TOKEN, *(s for s in SECRETS.values() if len(s) > 8)):  # "1234567" could be in any id
            assert secret not in html, f"{path} shows a secret"


class UnreachableCluster(FakeCluster):
    def list_pipelineruns(self, *, namespace: str, selector: str) -> tuple[list[Any], str]:
        raise Transient("list pipelineruns in namespace 'ci': 503 Service Unavailable")


def test_when_kubernetes_cannot_be_read_the_deliveries_and_decision_logs_still_show(tmp_path: Path, redis_url: str) -> None:
    settings = make_settings(tmp_path, routing=(FIXTURES / "routing" / "example.yaml").read_text(),
                             environ={"CIBROKER_REDIS_URL": redis_url, "CIBROKER_API_TOKENS": TOKEN})
    b = Board(settings, redis_url)
    try:
        delivery_id = b.push("a")
        b.ops.cluster = UnreachableCluster()
        for path in ("/", f"/deliveries/{delivery_id}"):
            page = b.client.get(path)
            assert page.status_code == 200 and "Kubernetes cannot be read right now" in page.text
            assert "503 Service Unavailable" in page.text and delivery_id in page.text
        assert "queued for a worker" in section(b.client.get(f"/deliveries/{delivery_id}").text, "log")
    finally:
        b.close()


def test_on_the_embedded_defaults_with_no_token_set_actions_need_no_token(tmp_path: Path, redis_url: str) -> None:
    """Like the API: a laptop's `./run serve` with no CIBROKER_API_TOKENS acts as `local`."""
    settings = load_settings({**SECRETS, "CIBROKER_STATE_DIR": str(tmp_path / "state"), "CIBROKER_REDIS_URL": redis_url})
    assert settings.embedded_defaults
    b = Board(settings, redis_url, base_url="http://127.0.0.1:8080")  # tokenless answers only loopback requests (issue 11)
    try:
        delivery_id = b.push("a", repo="gitlab-org/hello-world")
        page = b.client.get(f"/deliveries/{delivery_id}").text
        assert 'name="token"' not in page and "No API token is needed here" in page
        r = b.client.post(f"/deliveries/{delivery_id}/rerun", data={"reason": "try again"}, headers=FORM, follow_redirects=False)
        assert r.status_code == 303
        assert [(e["who"], e["channel"]) for e in b.ops.audit_log()] == [("local", "dashboard")]
    finally:
        b.close()
