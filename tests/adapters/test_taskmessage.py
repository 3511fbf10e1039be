"""The hand-written Celery message is what Celery itself would send, and a real worker runs it."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest
import redis
from celery.contrib.testing.worker import start_worker

from broker.core.records import PROCESS_TASK
from broker.adapters.redis_store import SyncStore
from broker.adapters.celery_wire import task_message
from tests.support.fakes.ports import FakeCluster, FakeGitHost, FakeResolver
from tests.support import make_settings
from workers.celery_app import create_celery
from broker.services.runs import Orchestrator


def celery_sent_message(redis_url: str, tmp_path: Path, *, task_id: str) -> dict:
    """What Celery's own producer puts on the Redis list for the same task."""
    app = create_celery(make_settings(tmp_path, environ={"CIBROKER_REDIS_URL": redis_url}))
    app.send_task(PROCESS_TASK, args=[task_id], task_id=task_id, queue="cibroker")
    raw = redis.Redis.from_url(redis_url).rpop("cibroker")
    assert raw is not None
    return json.loads(raw)


def test_envelope_matches_celerys_own_message(redis_url: str, tmp_path: Path) -> None:
    """Same envelope keys, content type, routing and task headers as Celery's producer writes."""
    ours = json.loads(task_message(task=PROCESS_TASK, task_id="t1", args=["t1"], queue="cibroker", origin="test"))
    theirs = celery_sent_message(redis_url, tmp_path, task_id="t1")
    assert ours.keys() == theirs.keys()
    assert ours["content-type"] == theirs["content-type"] == "application/json"
    assert ours["content-encoding"] == theirs["content-encoding"]
    assert set(ours["properties"]) == set(theirs["properties"])
    assert ours["properties"]["delivery_info"] == theirs["properties"]["delivery_info"]
    assert ours["properties"]["body_encoding"] == theirs["properties"]["body_encoding"]
    assert set(ours["headers"]) <= set(theirs["headers"])
    for key in ("lang", "task", "id", "root_id", "parent_id", "retries", "eta", "expires", "group", "timelimit", "argsrepr"):
        assert ours["headers"][key] == theirs["headers"][key], key
    ours_body = json.loads(base64.b64decode(ours["body"]))
    theirs_body = json.loads(base64.b64decode(theirs["body"]))
    assert ours_body[:2] == theirs_body[:2] == [["t1"], {}]
    assert set(ours_body[2]) <= set(theirs_body[2])


def test_a_real_worker_runs_the_hand_written_message(redis_url: str, tmp_path: Path) -> None:
    """An accepted delivery is taken by a real Celery worker, which creates its PipelineRun (ports faked)."""
    from starlette.testclient import TestClient

    from tests.support import web_app
    from tests.support import payload

    settings = make_settings(tmp_path, environ={"CIBROKER_REDIS_URL": redis_url})
    with TestClient(web_app(settings)) as client:
        answer = client.post("/hooks/gitlab", content=payload("gitlab/push-branch-update.json"),
                             headers={"X-Gitlab-Event": "Push Hook", "X-Gitlab-Token": "topsecret"}).json()
    delivery_id = answer["delivery_id"]
    store = SyncStore(redis_url, timeout=2)
    cluster = FakeCluster(service_accounts={("ci", "pipeline-bot")})
    host = FakeGitHost()
    app = create_celery(settings, orchestrator=lambda s: Orchestrator(
        settings=s, store=store, cluster=cluster, git_hosts={"gitlab": host},
        resolver=FakeResolver(branches={"master": "2adc9465c4edfc33834e173fe89436a7cb899a1d"})))  # the payload's push
    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
        deadline = time.monotonic() + 20
        while not host.statuses:
            if time.monotonic() > deadline:
                pytest.fail("the worker did not process the delivery within 20 s")
            time.sleep(0.05)
    [(_, name)] = cluster.runs
    assert cluster.runs[("ci", name)]["metadata"]["labels"]["cibroker.dev/delivery"] == delivery_id
    assert host.states() == ["cibroker/build-test-push:pending"]
    assert redis.Redis.from_url(redis_url).llen("cibroker") == 0
