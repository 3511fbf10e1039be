"""On-call operations (broker.services.oncall) over recording port fakes and the real Redis store.

A re-run must go through the same task a webhook queues; these tests take the queued
Celery message off the real Redis list and hand it to the real orchestrator.
"""

from __future__ import annotations

import dataclasses

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.core import pipelinerun as pr
from broker.core.records import DEPLOY_TASK, PROCESS_TASK
from broker.core.errors import Permanent
from broker.core.records import CANCEL_TASK
from broker.services.oncall import NoCluster, NotConfigured, NotFound, Operations, Refused
from broker.core.trust import verify_request
from tests.support import FIXTURES, make_settings
from tests.support.worlds import ALICE, SHA1, SHA2, SIGNING_KEY, OpsWorld

@pytest.fixture
def world(tmp_path: Path, redis_url: str) -> OpsWorld:
    routing = (FIXTURES / "routing" / "example.yaml").read_text()
    w = OpsWorld(make_settings(tmp_path, routing=routing, environ={"CIBROKER_REDIS_URL": redis_url,
                                                                   "CIBROKER_SIGNING_KEY": SIGNING_KEY}), redis_url)
    yield w
    w.close()


def verified(world: OpsWorld, request_id: str):  # type: ignore[no-untyped-def]
    """The stored request behind a queued task's id, through broker.core.trust's own check."""
    return verify_request(world.settings.require_signing_key(), world.orch.store.get_request(request_id),
                          request_id=request_id)


def test_rerun_of_a_delivery_queues_the_same_task_with_the_next_attempt(world: OpsWorld) -> None:
    delivery, first_run = world.built()
    plan = world.ops.rerun(actor=ALICE, delivery_id=delivery, reason="flaky test")
    [(task, args)] = world.take_tasks()
    assert (task, args) == (PROCESS_TASK, [plan["delivery_id"], 2])
    [name] = world.orch.start(args[0], attempt=args[1], token="w")
    assert f"ci/{name}" == plan["runs"][0] != first_run
    run = world.cluster.runs[("ci", name)]
    assert run["metadata"]["annotations"][pr.A_ATTEMPT] == "2"
    assert run["metadata"]["labels"][pr.L_DELIVERY] == plan["delivery_id"]
    record = world.ops.delivery(plan["delivery_id"])
    assert record["reason"] == f"re-run of delivery {delivery} requested by alice@laptop via cli: flaky test"
    assert [e["step"] for e in record["log"]][:3] == ["rerun_requested", "matched", "queued"]
    assert "re-run as delivery" in world.ops.delivery(delivery)["log"][-1]["detail"]
    assert world.ops.rerun(actor=ALICE, delivery_id=delivery)["attempt"] == 3


def test_a_rerun_neither_supersedes_nor_is_superseded(world: OpsWorld) -> None:
    """Re-running an older commit while a newer push builds must not cancel the newer run."""
    old_delivery, old_run = world.built("old", sha=SHA1)
    world.finish(old_run)
    _, new_run = world.built("new", sha=SHA2, before=SHA1)
    plan = world.ops.rerun(actor=ALICE, delivery_id=old_delivery)
    [(_, args)] = world.take_tasks()
    world.orch.start(args[0], attempt=args[1], token="w")
    namespace, name = new_run.split("/")
    assert not world.cluster.runs[(namespace, name)].get("spec", {}).get("status")
    namespace, name = plan["runs"][0].split("/")
    assert not world.cluster.runs[(namespace, name)].get("spec", {}).get("status")


def test_dry_run_renders_the_pipelinerun_and_changes_nothing(world: OpsWorld) -> None:
    delivery, _ = world.built()
    plan = world.ops.rerun(actor=ALICE, delivery_id=delivery, dry_run=True)
    assert plan["dry_run"] and plan["delivery_id"] is None and plan["attempt"] == 2
    assert plan["pipelineruns"][0]["metadata"]["annotations"][pr.A_ATTEMPT] == "2"
    assert world.take_tasks() == [] and world.ops.audit_log() == []
    assert world.ops.rerun(actor=ALICE, delivery_id=delivery)["attempt"] == 2  # the dry run took no number


def test_rerun_by_run_by_commit_and_by_ref_head(world: OpsWorld) -> None:
    _, run = world.built()
    by_run = world.ops.rerun(actor=ALICE, run=run)
    by_sha = world.ops.rerun(actor=ALICE, repo="acme/shop-api", sha=SHA1)
    assert by_run["sha"] == by_sha["sha"] == SHA1 and (by_run["attempt"], by_sha["attempt"]) == (2, 3)
    world.resolver.push("main", SHA2, before=SHA1)  # a later push moved main on
    by_ref = world.ops.rerun(actor=ALICE, repo="acme/shop-api", ref="main")
    assert by_ref["sha"] == SHA2 and by_ref["ref"] == "refs/heads/main" and by_ref["attempt"] == 2
    assert "git ls-remote" in by_ref["of"]
    tasks = world.take_tasks()
    assert [t for t, _ in tasks] == [PROCESS_TASK] * 3
    created = [world.orch.start(args[0], attempt=args[1], token=f"w{i}") for i, (_, args) in enumerate(tasks)]
    assert len({name for names in created for name in names}) == 3
    assert [e["action"] for e in world.ops.audit_log()] == ["rerun"] * 3


def test_rerun_of_something_unknown_or_ignored_says_why(world: OpsWorld) -> None:
    with pytest.raises(NotFound, match="no delivery"):
        world.ops.rerun(actor=ALICE, delivery_id="0" * 26)
    with pytest.raises(NotFound, match="no run or delivery of acme/shop-api"):
        world.ops.rerun(actor=ALICE, repo="acme/shop-api", sha=SHA2)
    with pytest.raises(NotFound, match="no route builds"):
        world.ops.rerun(actor=ALICE, repo="acme/other", ref="main")
    with pytest.raises(Permanent, match="say what to re-run"):
        world.ops.rerun(actor=ALICE)
    ignored = world.client.post("/hooks/gitlab", headers={"X-Gitlab-Event": "Note Hook", "X-Gitlab-Token": "topsecret"},
                                content=b'{"object_kind": "note"}').json()["delivery_id"]
    with pytest.raises(Refused, match="was ignored"):
        world.ops.rerun(actor=ALICE, delivery_id=ignored)


def test_deploy_only_needs_a_succeeded_run_and_queues_ids_and_a_signed_unforced_request(world: OpsWorld) -> None:
    """Without --force the request says force=False: the worker's ancestry guard applies to a person's re-deploy too."""
    delivery, run = world.built()
    with pytest.raises(Refused, match="not succeeded"):
        world.ops.rerun(actor=ALICE, run=run, deploy_only=True)
    world.finish(run)
    plan = world.ops.rerun(actor=ALICE, run=run, deploy_only=True, reason="roll staging back to this build")
    namespace, name = run.split("/")
    [(task, args)] = world.take_tasks()
    [request_id] = plan["requests"]
    assert (task, args) == (DEPLOY_TASK, [namespace, name, "staging", 2, request_id])
    request = verified(world, request_id)
    assert (request.action, request.namespace, request.name, request.environment, request.attempt, request.force,
            request.actor, request.channel) == ("deploy", namespace, name, "staging", 2, False, "alice@laptop", "cli")
    assert plan["environments"] == ["staging"] and plan["force"] is False
    [entry] = world.ops.audit_log()
    assert (entry["action"], entry["reason"], entry["force"], entry["requests"]) == (
        "redeploy", "roll staging back to this build", False, [request_id])
    logged = world.ops.delivery(delivery)["log"][-1]
    assert logged["step"] == "redeploy_requested" and "forced" not in logged["detail"] and logged["requests"] == [request_id]


def test_a_forced_deploy_only_is_signed_as_forced_and_needs_a_reason(world: OpsWorld) -> None:
    delivery, run = world.built()
    world.finish(run)
    with pytest.raises(Permanent, match="say why"):
        world.ops.rerun(actor=ALICE, run=run, deploy_only=True, force=True)
    with pytest.raises(Permanent, match="only a deploy-only re-run can be forced"):
        world.ops.rerun(actor=ALICE, run=run, force=True, reason="x")
    assert world.take_tasks() == []
    plan = world.ops.rerun(actor=ALICE, run=run, deploy_only=True, force=True, reason="roll back: 2.3 breaks checkout")
    [(task, args)] = world.take_tasks()
    assert task == DEPLOY_TASK and args[4] == plan["requests"][0] and len(args) == 5
    assert verified(world, args[4]).force is True
    assert world.ops.audit_log()[0]["result"].startswith("forced (no ancestry check) deploy to staging requested")
    assert "forced" in world.ops.delivery(delivery)["log"][-1]["detail"]


def test_deploy_only_and_cancel_without_a_signing_key_refuse_and_queue_nothing(world: OpsWorld, tmp_path: Path,
                                                                             redis_url: str) -> None:
    delivery, run = world.built()
    routing = (FIXTURES / "routing" / "example.yaml").read_text()
    (tmp_path / "keyless").mkdir()
    keyless = dataclasses.replace(  # tests.support.SECRETS gives every process a key; this one has none
        make_settings(tmp_path / "keyless", routing=routing, environ={"CIBROKER_REDIS_URL": redis_url}), signing_key=None)
    ops = Operations(settings=keyless, store=world.orch.store, cluster=world.cluster)
    with pytest.raises(NotConfigured, match="CIBROKER_SIGNING_KEY"):
        ops.cancel(run, actor=ALICE)
    world.finish(run)
    with pytest.raises(NotConfigured, match="CIBROKER_SIGNING_KEY"):
        ops.rerun(actor=ALICE, run=run, deploy_only=True)
    assert world.take_tasks() == [] and ops.audit_log() == []


def test_a_forced_redeploy_of_an_older_commit_is_not_refused_but_logged(world: OpsWorld) -> None:
    """The ancestry guard stops automatic deploys of older commits; a person's re-deploy (a rollback) passes."""
    from broker.core.trust import PersonRequest

    delivery, run = world.built()
    obj = world.finish(run)
    deployment = world.cluster.deployments[("staging", "shop-api")]
    deployment["metadata"]["annotations"]["cibroker.dev/deployed-sha"] = SHA2
    world.resolver.ancestry.add((SHA1, SHA2))
    ref = world.orch.trusted(obj)
    assert world.orch.deploy(ref, "staging", token="auto", obj=obj) is None  # refused: older than what runs
    request = PersonRequest(request_id="r1", action="deploy", namespace=ref.namespace, name=ref.name, actor="alice",
                            channel="cli", reason="rollback", at="2026-12-03T12:00:00.000Z", environment="staging", attempt=2,
                            force=True)
    assert world.orch.deploy(ref, "staging", token="person", obj=obj, attempt=2, request=request) == "shop-api"
    steps = [e["step"] for e in world.ops.delivery(delivery)["log"]]
    assert "deploy_refused" in steps and "deploy_forced" in steps
    assert world.host.states()[-2:] == ["deploy/staging:canceled", "deploy/staging:running"]


def test_cancel_changes_nothing_itself_and_queues_a_signed_request_naming_who_and_why(world: OpsWorld) -> None:
    delivery, run = world.built()
    namespace, name = run.split("/")
    before = json.dumps(world.cluster.runs[(namespace, name)], sort_keys=True)
    done = world.ops.cancel(run, actor=ALICE, reason="wrong branch")
    assert json.dumps(world.cluster.runs[(namespace, name)], sort_keys=True) == before  # the run is untouched
    assert (done["requested"], done["spec_status"], done["run"]) == (True, "Cancelled", run)
    [(task, args)] = world.take_tasks()
    assert (task, args) == (CANCEL_TASK, [done["request_id"]])
    request = verified(world, done["request_id"])
    assert (request.action, request.run, request.actor, request.channel, request.reason, request.force) == (
        "cancel", run, "alice@laptop", "cli", "wrong branch", False)
    assert world.ops.audit_log()[0] | {"at": ""} == {
        "at": "", "who": "alice@laptop", "channel": "cli", "action": "cancel", "target": f"PipelineRun {run}",
        "reason": "wrong branch", "result": f"requested (Cancelled), request {done['request_id']}",
        "requests": [done["request_id"]]}
    logged = world.ops.delivery(delivery)["log"][-1]
    assert logged["step"] == "cancel_requested" and "requested by alice@laptop via cli: wrong branch" in logged["detail"]
    world.finish(run, status="False", reason="Cancelled")
    with pytest.raises(Refused, match="already ended"):
        world.ops.cancel(run, actor=ALICE)
    assert world.take_tasks() == []


def test_runs_and_run_views(world: OpsWorld) -> None:
    _, run = world.built()
    namespace, name = run.split("/")
    world.cluster.taskruns[(namespace, name)] = [{
        "metadata": {"name": f"{name}-build", "labels": {"tekton.dev/pipelineTask": "build"}},
        "status": {"podName": f"{name}-build-pod", "startTime": "2026-11-22T10:00:00Z", "completionTime": "2026-11-22T10:01:30Z",
                   "conditions": [{"type": "Succeeded", "status": "False", "reason": "Failed", "message": "exit 2"}],
                   "steps": [{"name": "compile", "terminated": {"exitCode": 2}}]},
    }]
    world.finish(run, status="False", reason="Failed")
    [listed] = world.ops.runs(repo="acme/shop-api")
    assert listed["run"] == run and listed["state"] == "failed" and listed["sha"] == SHA1
    assert world.ops.runs(state="success") == [] and world.ops.runs(repo="acme/other") == []
    shown = world.ops.run(name)  # a bare name is looked up in every routed namespace
    assert shown["failing"] == {"task": "build", "reason": "Failed", "message": "exit 2"}
    assert shown["taskruns"][0]["duration_seconds"] == 90.0
    assert shown["taskruns"][0]["failed_step"] == "compile"
    assert shown["logs"][0] == f"tkn pipelinerun logs {name} -n ci"
    assert f"kubectl logs -n ci {name}-build-pod --all-containers" in shown["logs"][1]
    assert shown["statuses"] == {"cibroker/build-test-push": "pending"}
    with pytest.raises(NotFound):
        world.ops.run("ci/nope")


def test_without_a_cluster_run_actions_say_so(world: OpsWorld) -> None:
    delivery, run = world.built()
    ops = Operations(settings=world.settings, store=world.orch.store, cluster=None)
    assert ops.delivery(delivery)["runs"] is None  # the record still shows
    with pytest.raises(NoCluster):
        ops.runs()
    with pytest.raises(NoCluster):
        ops.cancel(run, actor=ALICE)


def test_deliveries_list_filters_and_pages(world: OpsWorld) -> None:
    ids = [world.push(f"k{i}", sha=f"{i + 1:040x}") for i in range(5)]
    assert [d["delivery_id"] for d in world.ops.deliveries(limit=3)] == ids[::-1][:3]
    assert world.ops.deliveries(repo="acme/other") == []
    assert len(world.ops.deliveries(state="queued")) == 5


def test_pruning_keeps_the_newest_finished_runs_of_a_route(world: OpsWorld, tmp_path: Path, redis_url: str) -> None:
    routing = (FIXTURES / "routing" / "example.yaml").read_text().replace("    pipeline: build-test-push\n",
                                                                          "    pipeline: build-test-push\n    max_keep_runs: 2\n", 1)
    assert "max_keep_runs" in routing
    w = OpsWorld(make_settings(tmp_path, routing=routing, environ={"CIBROKER_REDIS_URL": redis_url,
                                                                   "CIBROKER_SIGNING_KEY": SIGNING_KEY}), redis_url)
    try:
        runs = []
        for i in range(4):
            _, run = w.built(f"p{i}", sha=f"{i + 1:040x}", ref=f"refs/heads/release/{i}")
            runs.append(run)
        for i, run in enumerate(runs):
            obj = w.finish(run)
            obj["status"]["completionTime"] = f"2026-11-22T10:0{i}:00Z"
            w.cluster.runs[tuple(run.split("/"))]["status"]["completionTime"] = obj["status"]["completionTime"]
            w.orch.observe(obj, token=f"o{i}")
        left = sorted(f"{ns}/{name}" for ns, name in w.cluster.runs)
        assert left == sorted(runs[2:])
    finally:
        w.close()


def test_the_oncall_service_needs_exactly_oncall_rbac(world: OpsWorld, kube_cluster, kube_api) -> None:  # type: ignore[no-untyped-def]
    """Through the real adapter and the fake API server: every call the on-call verbs make is in ONCALL_RBAC."""
    from tests.support.rbac import permission as _permission
    from workers.adapters.kube import ONCALL_RBAC

    delivery, run = world.built()
    namespace, name = run.split("/")
    kube_cluster.create_pipelinerun(world.cluster.runs[(namespace, name)], namespace=namespace)
    ops = Operations(settings=world.settings, store=world.orch.store, cluster=kube_cluster, resolver=world.resolver)
    kube_api.requests.clear()
    ops.runs()
    ops.run(run)
    ops.delivery(delivery)
    ops.rerun(actor=ALICE, run=run)
    ops.rerun(actor=ALICE, repo="acme/shop-api", sha=SHA1, dry_run=True)
    ops.cancel(name, actor=ALICE)
    kube_api.mutate("pipelineruns", namespace, name, lambda o: {**o, "status": {"conditions": [
        {"type": "Succeeded", "status": "True", "reason": "Succeeded"}]}})
    ops.rerun(actor=ALICE, run=run, deploy_only=True, force=True, reason="rollback")
    ops.rerun(actor=ALICE, repo="acme/shop-api", sha=SHA1, deploy_only=True)
    assert {_permission(r) for r in kube_api.requests} == ONCALL_RBAC
    assert not kube_api.calls("PATCH") and not kube_api.calls("POST") and not kube_api.calls("DELETE")


def test_a_rollout_overtaken_by_a_newer_deploy_ends_as_superseded(world: OpsWorld) -> None:
    """Soak finding: with deploys back to back the Deployment never settles on the older image; its check must end."""
    import time

    _, old_run = world.built("old", sha=SHA1)
    _, new_run = world.built("new", sha=SHA2, before=SHA1)
    old_obj, new_obj = world.finish(old_run), world.finish(new_run)
    old, new = world.orch.trusted(old_obj), world.orch.trusted(new_obj)
    world.resolver.ancestry.add((SHA1, SHA2))
    assert world.orch.deploy(old, "staging", token="d1", obj=old_obj) == "shop-api"
    assert world.orch.deploy(new, "staging", token="d2", obj=new_obj) == "shop-api"  # SHA1 is not newer than SHA2: no refusal
    assert world.orch.check_rollout(old, "staging", deadline=time.time() + 600, token="c1", obj=old_obj) is True
    assert world.host.statuses[-1].state.value == "canceled"
    assert world.host.statuses[-1].description == "staging: superseded by 22222222 before its rollout finished"
    deployment = world.cluster.deployments[("staging", "shop-api")]
    assert world.orch.check_rollout(new, "staging", deadline=time.time() + 600, token="c2", obj=new_obj) is False  # rolling
    deployment["status"]["observedGeneration"] = deployment["metadata"]["generation"]  # the new ReplicaSet is ready
    assert world.orch.check_rollout(new, "staging", deadline=time.time() + 600, token="c2", obj=new_obj) is True
    assert world.host.states()[-1] == "deploy/staging:success"


def test_a_delivery_whose_task_a_dying_worker_took_is_queued_again_once(world: OpsWorld) -> None:
    """kombu pops a message before recording it as unacked: a kill -9 in between loses it. The sweep finds it."""
    import json as _json

    from broker.services.sweep import sweeper

    delivery = world.push("lost")
    sweep = sweeper(world.orch.store, queue=world.settings.env.queue, resync_seconds=world.settings.env.resync_seconds, older_than=0)
    assert sweep() == 0  # its task still waits in the queue
    raw = world.redis.rpop(world.settings.env.queue)  # a worker took it...
    world.redis.hset("unacked", "tag-1", _json.dumps([_json.loads(raw), "", world.settings.env.queue]))
    assert sweep() == 0  # ...and recorded it as unacked: it is being worked on (or comes back by itself)
    world.redis.delete("unacked")  # ...or died before recording it: the task is nowhere
    assert sweep() == 1
    [(task, args)] = world.take_tasks()
    assert (task, args) == ("cibroker.process_delivery", [delivery])
    assert world.ops.delivery(delivery)["log"][-1]["step"] == "requeued"
    world.orch.start(delivery, token=delivery)
    assert len(world.cluster.runs) == 1 and sweep() == 0  # started: nothing to do any more


def test_the_sweep_looks_at_every_delivery_of_the_window_not_only_the_oldest(world: OpsWorld) -> None:
    """Soak finding: the first version read only the oldest 5,000 index entries and missed a lost delivery."""
    from broker.services.sweep import sweeper

    import time

    earlier = int(time.time() * 1000) - 60_000
    world.redis.zadd("cibroker:deliveries", {f"{i:026x}": earlier for i in range(5200)})  # a busy minute, all started
    delivery = world.push("late")
    world.redis.rpop(world.settings.env.queue)  # taken by a worker that died before recording it
    assert sweeper(world.orch.store, queue=world.settings.env.queue, resync_seconds=world.settings.env.resync_seconds, older_than=0)() == 1
    assert world.take_tasks() == [("cibroker.process_delivery", [delivery])]


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=30),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
                     max_leaves=8)
_keys = st.sampled_from([pr.L_ROUTE, pr.L_HOST, pr.L_SHA, pr.L_DELIVERY, pr.A_REPO, pr.A_REF, pr.A_ATTEMPT, pr.A_DEPLOY,
                         pr.A_IMAGE, pr.A_REPORTED, pr.A_SUPERSEDED_BY, pr.A_RECEIVED, "creationTimestamp", "x"])
_fields = st.dictionaries(_keys, _json | st.text(max_size=80), max_size=8) | _json


@settings(max_examples=300, deadline=None)
@given(labels=_fields, annotations=_fields, status=_fields, meta_extra=st.dictionaries(_keys, _json, max_size=2))
def test_summarize_run_never_raises_and_keeps_its_types_whatever_a_run_says(labels: Any, annotations: Any, status: Any,
                                                                           meta_extra: dict[str, Any]) -> None:
    """Any labels, annotations and status (not strings, not mappings, missing): a summary whose fields the CLI,
    the API and the dashboard can always print, and `unreadable` naming what did not parse."""
    from broker.services.oncall import summarize_run

    obj = {"metadata": {"name": "r", "namespace": "ci", **meta_extra, "labels": labels, "annotations": annotations},
           "status": status}
    summary = summarize_run(obj, now=1e9)
    for key in ("run", "namespace", "name", "route", "host", "repo", "ref", "ref_name", "sha", "delivery_id", "image",
                "state", "reason", "message", "reported", "superseded_by", "cancelled_by", "created", "deploy", "unreadable"):
        assert isinstance(summary[key], str), key
    assert isinstance(summary["attempt"], int) and summary["attempt"] >= 1
    assert json.loads(summary["deploy"]) == summary["environments"]
    assert all(isinstance(e, str) for e in summary["environments"])
    assert summary["duration_seconds"] is None or isinstance(summary["duration_seconds"], float)
    if not isinstance(labels, dict) or not isinstance(labels.get(pr.L_SHA), str):
        assert summary["unreadable"] and summary["sha"] == ""


def test_a_run_written_by_cibroker_reads_cleanly(world: OpsWorld) -> None:
    """The control for the property test: a run the worker made has nothing unreadable."""
    _, run = world.built()
    [listed] = world.ops.runs()
    assert listed["unreadable"] == "" and listed["run"] == run and listed["environments"] == ["staging"]
