"""The on-call HTTP API, /metrics and /openapi.json: auth, validation, error mapping.

The app runs in-process (Starlette's TestClient) with the real Redis store and the
on-call service over recording port fakes; the end-to-end tests drive the same API
against real processes.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from starlette.routing import Route
from starlette.testclient import TestClient

from broker.core import metrics
from broker.services.oncall import Operations
from tests.support import web_app
from config.settings import EnvSettings
from tests.support import FIXTURES, make_settings
from tests.support.worlds import SIGNING_KEY, OpsWorld

TOKENS = "ops=s3cret-ops-token-for-api-tests,bare-token-value-for-api-tests"


@pytest.fixture
def world(tmp_path: Path, redis_url: str) -> OpsWorld:
    routing = (FIXTURES / "routing" / "example.yaml").read_text()
    settings = make_settings(tmp_path, routing=routing, environ={"CIBROKER_REDIS_URL": redis_url, "CIBROKER_API_TOKENS": TOKENS,
                                                                 "CIBROKER_SIGNING_KEY": SIGNING_KEY})
    w = OpsWorld(settings, redis_url)
    w.api = TestClient(web_app(settings, operations=w.ops))
    w.api.__enter__()
    yield w
    w.api.__exit__(None, None, None)
    w.close()


def auth(token: str = "s3cret-ops-token-for-api-tests", actor: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token}"}
    if actor:
        headers["X-Cibroker-Actor"] = actor
    return headers


def test_api_tokens_are_named_for_the_audit_log() -> None:
    env = EnvSettings.from_environ({"CIBROKER_API_TOKENS": "ops=abc, ci-bot=def==,plain,YWJj=,x y=z"})
    assert env.api_token_names() == (("ops", "abc"), ("ci-bot", "def=="), ("token3", "plain"), ("token4", "YWJj="),
                                     ("token5", "x y=z"))


@pytest.mark.parametrize("path", ["/api/deliveries", "/api/runs", "/api/audit", "/api/runs/ci/x"])
def test_every_api_read_needs_a_valid_token(world: OpsWorld, path: str) -> None:
    assert world.api.get(path).status_code == 401
    assert world.api.get(path, headers={"Authorization": "Basic abc"}).status_code == 401
    assert world.api.get(path, headers=auth("s3cret-ops-token-for-api-testsX")).json() == {"error": "invalid API token"}
    assert world.api.get(path, headers=auth("bare-token-value-for-api-tests")).status_code in (200, 404)


def test_actions_need_a_token_and_record_who(world: OpsWorld) -> None:
    _, run = world.built()
    assert world.api.post(f"/api/runs/{run}/cancel", json={"reason": "x"}).status_code == 401
    assert world.api.post(f"/api/runs/{run}/cancel", json={"reason": "x"}, headers=auth("nope")).status_code == 403
    assert world.take_tasks() == [] and world.api.get("/api/audit", headers=auth()).json() == []  # nothing done
    answer = world.api.post(f"/api/runs/{run}/cancel", json={"reason": "freeze"}, headers=auth(actor="bob; rm -rf /"))
    assert answer.status_code == 200, answer.text
    assert answer.json()["requested"] is True and [t for t, _ in world.take_tasks()] == ["cibroker.cancel_run"]
    [entry] = world.api.get("/api/audit", headers=auth()).json()
    assert (entry["who"], entry["channel"], entry["reason"]) == ("bob rm -rf (token ops)", "api", "freeze")


def test_bad_requests_get_precise_answers(world: OpsWorld) -> None:
    _, run = world.built()
    h = auth()
    assert world.api.get("/api/runs?state=bogus", headers=h).status_code == 400
    assert world.api.get("/api/deliveries?limit=0", headers=h).status_code == 400
    assert world.api.get("/api/deliveries?limit=abc", headers=h).status_code == 400
    assert world.api.post(f"/api/runs/{run}/rerun", content=b"{not json", headers=h).json() == {"error": "body is not valid JSON"}
    assert world.api.post(f"/api/runs/{run}/rerun", json=[1], headers=h).status_code == 400
    assert world.api.post(f"/api/runs/{run}/rerun", json={"dry_run": "yes"}, headers=h).json() == {
        "error": "dry_run must be true or false"}
    assert world.api.post(f"/api/runs/{run}/rerun", json={"reason": "x" * 501}, headers=h).status_code == 400
    assert world.api.post(f"/api/runs/{run}/rerun", content=b"x" * 70000, headers=h).status_code == 413
    assert world.api.post("/api/rerun", json={"delivery_id": "../../etc"}, headers=h).status_code == 404
    assert world.api.post("/api/rerun", json={}, headers=h).status_code == 400
    assert world.api.get("/api/runs/ci/NOT_A_NAME", headers=h).status_code == 404
    assert world.api.get("/api/runs/ci/not-there", headers=h).status_code == 404
    assert world.api.get("/api/deliveries/" + "0" * 26, headers=h).status_code == 404
    assert world.take_tasks() == []


def test_rerun_and_dry_run_through_the_api(world: OpsWorld) -> None:
    delivery, run = world.built()
    dry = world.api.post(f"/api/runs/{run}/rerun", json={"dry_run": True}, headers=auth()).json()
    assert dry["dry_run"] and dry["pipelineruns"][0]["kind"] == "PipelineRun" and world.take_tasks() == []
    done = world.api.post("/api/rerun", json={"delivery_id": delivery, "reason": "flaky"}, headers=auth()).json()
    assert done["attempt"] == 2 and [t for t, _ in world.take_tasks()] == ["cibroker.process_delivery"]
    refused = world.api.post(f"/api/runs/{run}/rerun", json={"deploy_only": True}, headers=auth())
    assert refused.status_code == 409 and "not succeeded" in refused.json()["error"]


@pytest.mark.parametrize(("body", "field"), [
    ({"repo": "acme/../etc", "sha": "1" * 40}, "repo"),
    ({"repo": "just-a-name", "ref": "main"}, "repo"),
    ({"repo": "acme/shop-api", "sha": "1" * 40 + "\n"}, "sha"),
    ({"repo": "acme/shop-api", "sha": "zz" * 20}, "sha"),
    ({"repo": "acme/shop-api", "sha": "1" * 39}, "sha"),
    ({"repo": "acme/shop-api", "ref": "main..evil"}, "ref"),
    ({"repo": "acme/shop-api", "ref": "refs/remotes/origin/main"}, "ref"),
    ({"repo": "acme/shop-api", "ref": "ma in"}, "ref"),
    ({"repo": "acme/shop-api", "ref": "refs/heads/x.lock"}, "ref"),
    ({"run": "ci/../../x"}, "run"),
    ({"repo": "acme/shop-api", "sha": "1" * 40, "route": "Not A Route"}, "route"),
    ({"run": "ci/x", "force": True, "reason": "x"}, "force"),
])
def test_api_rerun_fields_pass_the_webhook_edges_validators_and_a_bad_one_is_named(world: OpsWorld, body: dict,
                                                                                   field: str) -> None:
    answer = world.api.post("/api/rerun", json=body, headers=auth())
    assert answer.status_code == 400, answer.text
    assert answer.json()["field"] == field and answer.json()["error"].startswith(f"{field}: ")
    assert world.take_tasks() == [] and world.api.get("/api/audit", headers=auth()).json() == []


def test_api_force_must_be_a_boolean_and_goes_with_deploy_only(world: OpsWorld) -> None:
    _, run = world.built()
    world.finish(run)
    assert world.api.post(f"/api/runs/{run}/rerun", json={"deploy_only": True, "force": "yes"}, headers=auth()).json() == {
        "error": "force must be true or false"}
    answer = world.api.post(f"/api/runs/{run}/rerun", json={"deploy_only": True, "force": True, "reason": "rollback"},
                            headers=auth(actor="carol"))
    assert answer.status_code == 200, answer.text
    [(task, args)] = world.take_tasks()
    assert task == "cibroker.deploy" and args == [*run.split("/"), "staging", answer.json()["attempt"], answer.json()["requests"][0]]
    [entry] = world.api.get("/api/audit", headers=auth()).json()
    assert (entry["who"], entry["channel"], entry["force"]) == ("carol (token ops)", "api", True)


def test_without_a_cluster_run_endpoints_answer_503_and_deliveries_still_work(world: OpsWorld, tmp_path: Path) -> None:
    delivery, _ = world.built()
    ops = Operations(settings=world.settings, store=world.orch.store, cluster=None)
    with TestClient(web_app(world.settings, operations=ops)) as client:
        answer = client.get("/api/runs", headers=auth())
        assert answer.status_code == 503 and "no Kubernetes cluster" in answer.json()["error"]
        found = client.get(f"/api/deliveries/{delivery}", headers=auth()).json()
        assert found["delivery_id"] == delivery and found["runs"] is None


def test_openapi_describes_every_route_the_app_serves(world: OpsWorld) -> None:
    spec = world.api.get("/openapi.json").json()
    served = {r.path for r in world.api.app.routes
              if isinstance(r, Route) and r.endpoint.__module__ != "broker.edge.dashboard"}  # HTML pages are not the API
    documented = set(spec["paths"])
    # a bare-name form of a run route is the same operation as its namespace/name form
    missing = {p for p in served - documented if p.replace("/api/runs/{name}", "/api/runs/{namespace}/{name}") not in documented}
    assert missing <= {"/openapi.json"}, missing
    for path, ops in spec["paths"].items():
        for op in ops.values():
            assert op["responses"], (path, op)
            for param in re.findall(r"\{(\w+)\}", path):
                assert param in {p["name"] for p in op["parameters"] if p["in"] == "path"}, (path, param)


def test_metrics_show_edge_and_cluster_wide_figures(world: OpsWorld) -> None:
    world.push("m")
    world.client.post("/hooks/gitlab", content=b"{}", headers={"X-Gitlab-Event": "Push Hook", "X-Gitlab-Token": "wrong"})
    store = world.orch.store
    store.count(metrics.RUNS.name, metrics.RUNS.field(("shop-api", "success")))
    store.count_many([(metrics.RUN_DURATION.name, f, by) for f, by in metrics.histogram_increments(metrics.RUN_DURATION,
                                                                                                    ("shop-api",), 95.0)])
    text = world.client.get("/metrics").text  # the edge's own client: its counters are per process
    assert 'cibroker_webhooks_total{decision="accepted",event="Push Hook",host="gitlab"} 1.0' in text
    assert 'cibroker_webhooks_total{decision="rejected",event="Push Hook",host="gitlab"} 1.0' in text
    assert 'cibroker_ingest_seconds_count{decision="accepted"} 1.0' in text
    assert 'cibroker_runs_total{outcome="success",route="shop-api"} 1.0' in text
    assert 'cibroker_run_duration_seconds_bucket{le="60.0",route="shop-api"} 0.0' in text
    assert 'cibroker_run_duration_seconds_bucket{le="120.0",route="shop-api"} 1.0' in text
    assert 'cibroker_run_duration_seconds_bucket{le="+Inf",route="shop-api"} 1.0' in text
    assert 'cibroker_run_duration_seconds_sum{route="shop-api"} 95.0' in text
    assert "cibroker_queue_depth 1.0" in text  # the accepted push waits in the queue


def test_a_histogram_observation_lands_in_every_bucket_above_it() -> None:
    fields = dict(metrics.histogram_increments(metrics.RUN_DURATION, ("r",), 300.0))
    sep = metrics.SEP
    assert fields[f"r{sep}le=300.0"] == 1.0 and f"r{sep}le=120.0" not in fields and fields[f"r{sep}sum"] == 300.0
    with pytest.raises(ValueError):
        metrics.RUNS.field(("only-one",))
