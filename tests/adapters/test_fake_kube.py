"""The fake Kubernetes API and its simulators behave like the real things they stand in for.

Driven through the official client where the wire matters; shapes checked against the
upstream corpus in tests/fixtures/corpus/{kubernetes,tekton}.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import kubernetes
import pytest
import yaml
from kubernetes.client import ApiException

from tests.support.fakes.kube_api import FakeKubeAPI
from tests.support.fakes.rollout import REVISION, RolloutSimulator, rollout_complete, rollout_failed, seed_deployment
from tests.support.fakes.tekton import TektonSimulator, condition
from tests.support import CORPUS

NS = "ci"
TEKTON_REASONS = json.loads((CORPUS / "tekton/reasons-v1.json").read_text())


def corpus_yaml(path: str) -> Any:
    return yaml.safe_load((CORPUS / path).read_text())


@pytest.fixture
def custom(kube_client: kubernetes.client.ApiClient) -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(kube_client)


def run(name: str, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "tekton.dev/v1", "kind": "PipelineRun", "metadata": {"name": name, "labels": labels},
            "spec": {"pipelineRef": {"name": "build"}}}


def create(custom: kubernetes.client.CustomObjectsApi, body: dict[str, Any]) -> dict[str, Any]:
    return custom.create_namespaced_custom_object("tekton.dev", "v1", NS, "pipelineruns", body)


def patch(custom: kubernetes.client.CustomObjectsApi, name: str, body: Any, **kwargs: Any) -> dict[str, Any]:
    return custom.patch_namespaced_custom_object("tekton.dev", "v1", NS, "pipelineruns", name, body, **kwargs)


def status_of(exc: pytest.ExceptionInfo[ApiException]) -> dict[str, Any]:
    return json.loads(exc.value.body)


def watch_lines(custom: kubernetes.client.CustomObjectsApi, **query: Any) -> Iterator[dict[str, Any]]:
    response = custom.list_namespaced_custom_object("tekton.dev", "v1", NS, "pipelineruns", watch=True,
                                                    _preload_content=False, **query)
    try:
        for line in response:
            yield json.loads(line)
    finally:
        response.close()
        response.release_conn()


# -- objects -------------------------------------------------------------------------------


@pytest.mark.parametrize(("selector", "expected"), [
    ("team=a", ["one", "two"]),
    ("team==a,tier=web", ["one"]),
    ("team!=a", ["three", "four"]),  # != also matches objects without the label
    ("tier", ["one", "three"]),
    ("!tier", ["two", "four"]),
    ("team in (a, b),!tier", ["two"]),
    ("team notin (a)", ["three", "four"]),
    ("", ["one", "two", "three", "four"]),
])
def test_label_selectors_match_like_the_api_server(custom: kubernetes.client.CustomObjectsApi, selector: str,
                                                   expected: list[str]) -> None:
    """Equality, inequality, existence, non-existence, set-based and comma-AND requirements."""
    create(custom, run("one", team="a", tier="web"))
    create(custom, run("two", team="a"))
    create(custom, run("three", team="b", tier="db"))
    create(custom, run("four"))
    answer = custom.list_namespaced_custom_object("tekton.dev", "v1", NS, "pipelineruns", label_selector=selector)
    assert [i["metadata"]["name"] for i in answer["items"]] == expected


def test_equality_selectors_follow_label_changes_and_deletes(custom: kubernetes.client.CustomObjectsApi) -> None:
    """The fake's label index (equality selectors skip the full scan) stays right when labels move."""
    create(custom, run("one", team="a"))
    names = lambda sel: [i["metadata"]["name"] for i in  # noqa: E731
                         custom.list_namespaced_custom_object("tekton.dev", "v1", NS, "pipelineruns", label_selector=sel)["items"]]
    assert names("team=a") == ["one"]
    custom.patch_namespaced_custom_object("tekton.dev", "v1", NS, "pipelineruns", "one", {"metadata": {"labels": {"team": "b"}}})
    assert (names("team=a"), names("team=b")) == ([], ["one"])
    custom.delete_namespaced_custom_object("tekton.dev", "v1", NS, "pipelineruns", "one")
    assert names("team=b") == []


def test_an_unparseable_selector_is_400(custom: kubernetes.client.CustomObjectsApi) -> None:
    """A selector the API cannot parse is answered 400 BadRequest."""
    with pytest.raises(ApiException) as caught:
        custom.list_namespaced_custom_object("tekton.dev", "v1", NS, "pipelineruns", label_selector="a=(b")
    assert caught.value.status == 400 and status_of(caught)["reason"] == "BadRequest"


def test_resource_versions_are_global_monotonic_and_skip_no_op_writes(
        custom: kubernetes.client.CustomObjectsApi, kube_api: FakeKubeAPI) -> None:
    """Every write, whatever the object, takes the next resourceVersion; an unchanged patch takes none."""
    a = create(custom, run("a"))
    seed_deployment(kube_api, namespace="prod")
    b = create(custom, run("b"))
    label = patch(custom, "a", {"metadata": {"labels": {"x": "1"}}})
    again = patch(custom, "a", {"metadata": {"labels": {"x": "1"}}})
    versions = [int(o["metadata"]["resourceVersion"]) for o in (a, b, label)]
    assert versions == sorted(versions) and len(set(versions)) == 3
    assert versions[1] > versions[0] + 1  # the deployment's writes in between
    assert again["metadata"]["resourceVersion"] == label["metadata"]["resourceVersion"]
    listed = custom.list_namespaced_custom_object("tekton.dev", "v1", NS, "pipelineruns")
    assert listed["metadata"]["resourceVersion"] == str(kube_api.store.resource_version)


def test_generation_moves_only_when_the_spec_does(kube_client: kubernetes.client.ApiClient,
                                                 kube_api: FakeKubeAPI) -> None:
    """Labels, annotations and status leave generation alone; a spec change bumps it by one."""
    apps = kubernetes.client.AppsV1Api(kube_client)
    seed_deployment(kube_api, namespace="prod")

    def generation_after(body: dict[str, Any], **kwargs: Any) -> int:
        return json.loads(apps.patch_namespaced_deployment("api", "prod", body, _preload_content=False,
                                                          **kwargs).data)["metadata"]["generation"]
    assert generation_after({"metadata": {"labels": {"a": "b"}, "annotations": {"c": "d"}}}) == 1
    status = {"status": {"observedGeneration": 1, "replicas": 7}}
    assert json.loads(apps.patch_namespaced_deployment_status("api", "prod", status, _preload_content=False).data)[
        "metadata"]["generation"] == 1
    assert generation_after({"spec": {"replicas": 3}}) == 2
    assert generation_after({"spec": {"replicas": 3}}) == 2


def test_status_and_main_resource_each_ignore_the_other_half(custom: kubernetes.client.CustomObjectsApi) -> None:
    """Status written to the main resource is dropped; spec written to /status is dropped."""
    created = create(custom, {**run("a"), "status": {"conditions": [{"type": "Succeeded", "status": "True"}]}})
    assert "status" not in created
    assert "status" not in patch(custom, "a", {"status": {"podName": "x"}})
    after = custom.patch_namespaced_custom_object_status("tekton.dev", "v1", NS, "pipelineruns", "a", {
        "spec": {"pipelineRef": {"name": "other"}}, "status": {"startTime": "2026-01-01T00:00:00Z"}})
    assert after["spec"]["pipelineRef"] == {"name": "build"}
    assert after["status"] == {"startTime": "2026-01-01T00:00:00Z"}


def test_json_patch_and_status_replace_apply_like_the_api_server(custom: kubernetes.client.CustomObjectsApi) -> None:
    """RFC 6902 add/replace/test work and a failed test is 422; PUT on /status replaces only the status."""
    create(custom, run("a"))
    ops = [{"op": "test", "path": "/spec/pipelineRef/name", "value": "build"},
           {"op": "add", "path": "/metadata/labels", "value": {"x": "1"}},
           {"op": "replace", "path": "/spec/pipelineRef/name", "value": "deploy"}]
    patched = patch(custom, "a", ops, _content_type="application/json-patch+json")
    assert (patched["metadata"]["labels"], patched["spec"]["pipelineRef"]) == ({"x": "1"}, {"name": "deploy"})
    with pytest.raises(ApiException) as caught:
        patch(custom, "a", ops[:1], _content_type="application/json-patch+json")
    assert caught.value.status == 422
    replaced = custom.replace_namespaced_custom_object_status("tekton.dev", "v1", NS, "pipelineruns", "a", {
        **patched, "spec": {}, "status": {"podName": "p"}})
    assert replaced["status"] == {"podName": "p"} and replaced["spec"]["pipelineRef"] == {"name": "deploy"}


def test_a_stale_resource_version_is_a_409_conflict(custom: kubernetes.client.CustomObjectsApi) -> None:
    """Optimistic concurrency: a patch or replace carrying an old resourceVersion is refused."""
    first = create(custom, run("a"))
    patch(custom, "a", {"metadata": {"labels": {"x": "1"}}})
    stale = {"metadata": {"resourceVersion": first["metadata"]["resourceVersion"], "labels": {"x": "2"}}}
    with pytest.raises(ApiException) as caught:
        patch(custom, "a", stale)
    assert caught.value.status == 409 and status_of(caught)["reason"] == "Conflict"
    with pytest.raises(ApiException) as replaced:
        custom.replace_namespaced_custom_object("tekton.dev", "v1", NS, "pipelineruns", "a", {**first})
    assert replaced.value.status == 409


def test_create_answers_already_exists_and_fills_generated_names(custom: kubernetes.client.CustomObjectsApi) -> None:
    """A taken name is 409 AlreadyExists with details; generateName gets a random 5-character suffix."""
    create(custom, run("a"))
    with pytest.raises(ApiException) as caught:
        create(custom, run("a"))
    assert caught.value.status == 409
    assert status_of(caught) == {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": 'pipelineruns.tekton.dev "a" already exists', "reason": "AlreadyExists",
        "details": {"name": "a", "group": "tekton.dev", "kind": "pipelineruns"}, "code": 409}
    generated = create(custom, {**run(""), "metadata": {"generateName": "build-"}})
    assert generated["metadata"]["name"].startswith("build-") and len(generated["metadata"]["name"]) == 11


def test_a_missing_object_is_a_404_status(custom: kubernetes.client.CustomObjectsApi) -> None:
    """Get of an absent object answers the NotFound Status the real server sends."""
    with pytest.raises(ApiException) as caught:
        custom.get_namespaced_custom_object("tekton.dev", "v1", NS, "pipelineruns", "nope")
    assert caught.value.status == 404
    assert status_of(caught)["message"] == 'pipelineruns.tekton.dev "nope" not found'


def test_strategic_merge_is_refused_for_custom_resources(custom: kubernetes.client.CustomObjectsApi) -> None:
    """Like kube-apiserver, a strategic merge patch of a CRD object is 415 Unsupported Media Type."""
    create(custom, run("a"))
    with pytest.raises(ApiException) as caught:
        patch(custom, "a", {"metadata": {"labels": {"x": "1"}}},
              _content_type="application/strategic-merge-patch+json")
    assert caught.value.status == 415


def test_merge_patch_replaces_a_container_list_that_strategic_merge_would_merge(
        kube_client: kubernetes.client.ApiClient, kube_api: FakeKubeAPI) -> None:
    """The difference the adapter relies on: only the strategic patch keeps the other containers."""
    apps = kubernetes.client.AppsV1Api(kube_client)
    seed_deployment(kube_api, namespace="prod", sidecars={"proxy": "envoy:1"})
    one = {"spec": {"template": {"spec": {"containers": [{"name": "api", "image": "api:2"}]}}}}

    def names(content_type: str) -> list[str]:
        answer = apps.patch_namespaced_deployment("api", "prod", one, _content_type=content_type,
                                                  _preload_content=False)
        return [c["name"] for c in json.loads(answer.data)["spec"]["template"]["spec"]["containers"]]
    assert names("application/strategic-merge-patch+json") == ["api", "proxy"]
    assert names("application/merge-patch+json") == ["api"]


def test_invalid_label_values_are_rejected_with_422(custom: kubernetes.client.CustomObjectsApi) -> None:
    """Label values are validated on every write, as the API server does."""
    with pytest.raises(ApiException) as caught:
        create(custom, run("a", ref="refs/heads/main"))
    assert caught.value.status == 422 and "a valid label must be" in status_of(caught)["message"]
    create(custom, run("a"))
    with pytest.raises(ApiException) as patched:
        patch(custom, "a", {"metadata": {"labels": {"sha": "x" * 64}}})
    assert patched.value.status == 422


def test_deleting_a_run_garbage_collects_its_taskruns(kube_api: FakeKubeAPI, tekton: TektonSimulator,
                                                      custom: kubernetes.client.CustomObjectsApi) -> None:
    """TaskRuns owned by a deleted PipelineRun go with it (ownerReferences)."""
    create(custom, run("a"))
    tekton.succeed(NS, "a")
    assert len(kube_api.list("taskruns", NS)) == 2
    custom.delete_namespaced_custom_object("tekton.dev", "v1", NS, "pipelineruns", "a")
    assert kube_api.list("taskruns", NS) == []


# -- watches -------------------------------------------------------------------------------


def test_watch_replays_after_a_resource_version_then_streams_live(
        custom: kubernetes.client.CustomObjectsApi, kube_api: FakeKubeAPI) -> None:
    """Only changes after resourceVersion N are replayed, in order, then live ones follow."""
    create(custom, run("a"))
    start = kube_api.store.resource_version
    patch(custom, "a", {"metadata": {"labels": {"x": "1"}}})
    create(custom, run("b"))
    events = watch_lines(custom, resource_version=str(start), timeout_seconds=10)
    replayed = [next(events), next(events)]
    custom.delete_namespaced_custom_object("tekton.dev", "v1", NS, "pipelineruns", "a")
    live = next(events)
    events.close()
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in [*replayed, live]] == [
        ("MODIFIED", "a"), ("ADDED", "b"), ("DELETED", "a")]
    assert int(live["object"]["metadata"]["resourceVersion"]) == kube_api.store.resource_version


def test_watch_without_resource_version_starts_with_every_object(custom: kubernetes.client.CustomObjectsApi) -> None:
    """resourceVersion unset or "0": synthetic ADDED events for what exists, like the real server."""
    create(custom, run("a"))
    create(custom, run("b"))
    events = watch_lines(custom, timeout_seconds=10)
    first = [next(events)["object"]["metadata"]["name"] for _ in range(2)]
    events.close()
    assert first == ["a", "b"]


def test_watch_with_a_selector_sees_objects_enter_and_leave_it(custom: kubernetes.client.CustomObjectsApi,
                                                               kube_api: FakeKubeAPI) -> None:
    """A label change that takes an object out of the selection arrives as DELETED, back in as ADDED."""
    create(custom, run("a", state="running"))
    events = watch_lines(custom, label_selector="state=running",
                         resource_version=str(kube_api.store.resource_version), timeout_seconds=10)
    patch(custom, "a", {"metadata": {"labels": {"state": "done"}}})
    patch(custom, "a", {"metadata": {"labels": {"state": "running"}}})
    seen = [next(events)["type"], next(events)["type"]]
    events.close()
    assert seen == ["DELETED", "ADDED"]


def test_resume_from_compacted_history_is_the_recorded_410_event(
        custom: kubernetes.client.CustomObjectsApi, kube_api: FakeKubeAPI) -> None:
    """The ERROR event has the shape kube-apiserver was recorded sending, then the stream ends."""
    create(custom, run("a"))
    old = kube_api.store.resource_version
    create(custom, run("b"))
    kube_api.compact()
    events = list(watch_lines(custom, resource_version=str(old - 1), timeout_seconds=10))
    recorded = json.loads((CORPUS / "kubernetes/watch-error-410-gone-recorded.json").read_text())
    assert len(events) == 1
    assert events[0]["type"] == recorded["type"] == "ERROR"
    assert set(events[0]["object"]) == set(recorded["object"])
    assert {k: events[0]["object"][k] for k in ("kind", "apiVersion", "status", "reason", "code")} == \
        {k: recorded["object"][k] for k in ("kind", "apiVersion", "status", "reason", "code")}
    assert events[0]["object"]["message"].startswith("too old resource version: ")
    still_fine = watch_lines(custom, resource_version=str(kube_api.store.resource_version), timeout_seconds=10)
    create(custom, run("c"))
    assert next(still_fine)["type"] == "ADDED"
    still_fine.close()


def test_bounded_history_expires_old_resource_versions_by_itself() -> None:
    """With a history of 3 writes, resuming from 4 writes back is 410 without any compact() call."""
    with FakeKubeAPI(history_limit=3) as api:
        client = kubernetes.client.ApiClient(kubernetes.client.Configuration(host=api.url))
        try:
            custom = kubernetes.client.CustomObjectsApi(client)
            first = create(custom, run("a"))
            for name in ("b", "c", "d"):
                create(custom, run(name))
            kept = list(watch_lines(custom, resource_version=first["metadata"]["resourceVersion"], timeout_seconds=1))
            create(custom, run("e"))
            expired = list(watch_lines(custom, resource_version=first["metadata"]["resourceVersion"],
                                       timeout_seconds=10))
        finally:
            client.close()
    assert [e["object"]["metadata"]["name"] for e in kept] == ["b", "c", "d"]
    assert [e["object"]["code"] for e in expired] == [410]


def test_periodic_bookmarks_look_like_the_recorded_one() -> None:
    """With bookmarks allowed, an idle watch gets BOOKMARKs carrying only the current resourceVersion."""
    recorded = json.loads((CORPUS / "kubernetes/watch-bookmark-event.json").read_text())
    with FakeKubeAPI(bookmark_interval=0.05) as api:
        client = kubernetes.client.ApiClient(kubernetes.client.Configuration(host=api.url))
        try:
            custom = kubernetes.client.CustomObjectsApi(client)
            create(custom, run("a"))
            events = watch_lines(custom, resource_version=str(api.store.resource_version),
                                 allow_watch_bookmarks=True, timeout_seconds=10)
            bookmarks = [next(events), next(events)]
            events.close()
            plain = watch_lines(custom, resource_version=str(api.store.resource_version), timeout_seconds=1)
            assert list(plain) == []  # no bookmarks unless asked for
        finally:
            client.close()
    for bookmark in bookmarks:
        assert bookmark["type"] == recorded["type"]
        assert bookmark["object"] == {"kind": "PipelineRun", "apiVersion": "tekton.dev/v1",
                                      "metadata": {"resourceVersion": str(api.store.resource_version)}}
        assert set(bookmark["object"]["metadata"]) == set(recorded["object"]["metadata"])


# -- test controls -------------------------------------------------------------------------


def test_injected_faults_answer_the_given_times_then_stop(custom: kubernetes.client.CustomObjectsApi,
                                                         kube_api: FakeKubeAPI) -> None:
    """inject(times=2) fails two matching calls with a realistic Status, the third goes through; all are logged."""
    kube_api.inject("POST", "/pipelineruns$", 403, times=2)
    for _ in range(2):
        with pytest.raises(ApiException) as caught:
            create(custom, run("a"))
        assert caught.value.status == 403
    assert status_of(caught)["message"] == (
        'pipelineruns.tekton.dev is forbidden: User "system:serviceaccount:cibroker:cibroker" cannot create '
        'resource "pipelineruns" in API group "tekton.dev" in the namespace "ci"')
    assert create(custom, run("a"))["metadata"]["name"] == "a"
    assert len(kube_api.calls("POST", "/pipelineruns$")) == 3


def test_cut_watches_drops_streams_without_a_final_chunk(custom: kubernetes.client.CustomObjectsApi,
                                                         kube_api: FakeKubeAPI) -> None:
    """The client sees a broken stream (urllib3 ProtocolError), not a clean end."""
    events = watch_lines(custom, resource_version=str(kube_api.store.resource_version), timeout_seconds=30)
    create(custom, run("a"))
    next(events)
    assert kube_api.open_watches == 1
    assert kube_api.cut_watches() == 1
    with pytest.raises(Exception, match="ended prematurely"):
        next(events)
    assert kube_api.open_watches == 0


# -- simulators ----------------------------------------------------------------------------


def test_tekton_run_moves_through_running_to_succeeded(custom: kubernetes.client.CustomObjectsApi,
                                                       kube_api: FakeKubeAPI, tekton: TektonSimulator) -> None:
    """start and succeed write Tekton's conditions, times and childReferences in the corpus shapes."""
    running_example = json.loads((CORPUS / "tekton/pipelinerun-running-remote-resolver.json").read_text())
    succeeded_example = json.loads((CORPUS / "tekton/pipelinerun-v1-succeeded-childrefs.json").read_text())
    create(custom, run("a"))
    running = tekton.start(NS, "a")
    assert set(condition(running)) == set(running_example["status"]["conditions"][0])
    assert condition(running)["reason"] == "Running" and condition(running)["status"] == "Unknown"
    assert condition(running)["message"] == "Tasks Completed: 0 (Failed: 0, Cancelled 0), Incomplete: 2, Skipped: 0"
    assert running["status"]["childReferences"] == [
        {"apiVersion": "tekton.dev/v1", "kind": "TaskRun", "name": "a-clone", "pipelineTaskName": "clone"}]
    assert set(running["status"]["childReferences"][0]) == set(running_example["status"]["childReferences"][0])
    done = tekton.succeed(NS, "a")
    expected = succeeded_example["status"]["conditions"][0]
    assert {k: condition(done)[k] for k in ("type", "status", "reason", "message")} == \
        {k: expected[k] for k in ("type", "status", "reason", "message")}
    assert done["status"]["startTime"] <= done["status"]["completionTime"]
    assert [condition(t)["reason"] for t in kube_api.list("taskruns", NS)] == ["Succeeded", "Succeeded"]


def test_tekton_failure_marks_the_failing_taskrun_and_the_run(custom: kubernetes.client.CustomObjectsApi,
                                                              kube_api: FakeKubeAPI, tekton: TektonSimulator) -> None:
    """fail(task="build") reads exactly like the upstream reconciler's expected failed run."""
    expected = corpus_yaml("tekton/pipelinerun-v1-failed-task-failed.yaml")["status"]["conditions"][0]
    create(custom, run("a"))
    failed = tekton.fail(NS, "a", task="build")
    assert {k: condition(failed)[k] for k in expected} == expected
    taskruns = {t["metadata"]["labels"]["tekton.dev/pipelineTask"]: condition(t) for t in kube_api.list("taskruns", NS)}
    assert (taskruns["clone"]["status"], taskruns["build"]["status"], taskruns["build"]["reason"]) == \
        ("True", "False", "Failed")


@pytest.mark.parametrize("spec_status", TEKTON_REASONS["pipelinerun_cancel_reasons"][:3])
def test_tekton_honours_every_cancel_spec_status(custom: kubernetes.client.CustomObjectsApi, kube_api: FakeKubeAPI,
                                                 tekton: TektonSimulator, spec_status: str) -> None:
    """Cancelled, CancelledRunFinally and StoppedRunFinally end the run False/Cancelled; TaskRuns too."""
    expected_taskrun = corpus_yaml("tekton/taskrun-v1-cancelled.yaml")["status"]["conditions"][0]
    create(custom, run("a"))
    tekton.start(NS, "a")
    patch(custom, "a", {"spec": {"status": spec_status}})
    done = kube_api.wait_for("pipelineruns", NS, "a", lambda pr: condition(pr).get("status") == "False")
    assert condition(done)["reason"] in TEKTON_REASONS["pipelinerun_cancel_reasons"]
    assert condition(done)["message"] == 'PipelineRun "a" was cancelled'
    [taskrun] = kube_api.list("taskruns", NS)
    assert condition(taskrun)["reason"] == expected_taskrun["reason"]
    assert condition(taskrun)["message"] == 'TaskRun "a-clone" was cancelled. '


def test_tekton_timeout_uses_the_timeout_reason(custom: kubernetes.client.CustomObjectsApi,
                                                tekton: TektonSimulator) -> None:
    """time_out ends False with PipelineRunTimeout and the run's own limit in the message."""
    create(custom, run("a"))
    done = tekton.time_out(NS, "a")
    assert condition(done)["reason"] in TEKTON_REASONS["pipelinerun_timeout_reasons"]
    assert condition(done)["message"] == 'PipelineRun "a" failed to finish within "1h0m0s"'


def test_auto_mode_runs_every_new_pipelinerun_and_respects_pending(kube_api: FakeKubeAPI,
                                                                   custom: kubernetes.client.CustomObjectsApi) -> None:
    """With auto_start, runs start and succeed on their own; a Pending run waits until spec.status is cleared."""
    sim = TektonSimulator(kube_api, auto_start=0.01, auto_finish=0.01)
    try:
        create(custom, run("a"))
        create(custom, {**run("held"), "spec": {"pipelineRef": {"name": "build"}, "status": "PipelineRunPending"}})
        done = kube_api.wait_for("pipelineruns", NS, "a", lambda pr: condition(pr).get("status") == "True")
        assert condition(done)["reason"] in TEKTON_REASONS["pipelinerun_success_reasons"]
        held = kube_api.wait_for("pipelineruns", NS, "held", lambda pr: bool(condition(pr)))
        assert condition(held)["reason"] == "PipelineRunPending"
        patch(custom, "held", {"spec": {"status": None}})
        kube_api.wait_for("pipelineruns", NS, "held", lambda pr: condition(pr).get("status") == "True")
    finally:
        sim.stop()


def test_rollout_goes_through_replica_set_updated_to_complete(kube_api: FakeKubeAPI) -> None:
    """An image change makes a revision-2 ReplicaSet, shows ReplicaSetUpdated, then completes like the corpus."""
    in_progress = corpus_yaml("kubernetes/deployment-rollout-in-progress.yaml")["status"]
    complete = corpus_yaml("kubernetes/deployment-rollout-complete.yaml")["status"]
    sim = RolloutSimulator(kube_api, outcome="stuck")
    try:
        seed_deployment(kube_api, namespace="prod")
        kube_api.mutate("deployments", "prod", "api", lambda d: d["spec"]["template"]["spec"]["containers"][0].update(
            image="registry.example.com/team/api:2.0.0"))
        midway = kube_api.wait_for("deployments", "prod", "api", lambda d: d["status"]["observedGeneration"] == 2)
    finally:
        sim.stop()
    assert set(midway["status"]) == set(in_progress)
    assert [(c["type"], c["status"], c["reason"]) for c in midway["status"]["conditions"]] == \
        [(c["type"], c["status"], c["reason"]) for c in in_progress["conditions"]]
    assert not rollout_complete(midway)

    sim = RolloutSimulator(kube_api)
    try:
        kube_api.mutate("deployments", "prod", "api", lambda d: d["spec"]["template"]["spec"]["containers"][0].update(
            image="registry.example.com/team/api:3.0.0"))
        done = kube_api.wait_for("deployments", "prod", "api", rollout_complete)
    finally:
        sim.stop()
    assert set(done["status"]) == set(complete)
    assert {(c["type"], c["reason"]) for c in done["status"]["conditions"]} == \
        {(c["type"], c["reason"]) for c in complete["conditions"]}
    replicasets = sorted(kube_api.list("replicasets", "prod"),
                         key=lambda rs: int(rs["metadata"]["annotations"][REVISION]))
    assert [rs["metadata"]["annotations"][REVISION] for rs in replicasets] == ["1", "2", "3"]
    assert [rs["spec"]["replicas"] for rs in replicasets] == [0, 0, 2]
    newest = replicasets[-1]
    assert newest["metadata"]["name"] == f"api-{newest['metadata']['labels']['pod-template-hash']}"
    assert done["metadata"]["annotations"][REVISION] == "3"
    template_hash = newest["metadata"]["labels"]["pod-template-hash"]
    assert kube_api.list("replicasets", "prod", f"pod-template-hash={template_hash}") == [newest]


def test_rollout_can_end_in_progress_deadline_exceeded(kube_api: FakeKubeAPI) -> None:
    """The failing outcome matches the recorded degraded Deployment's conditions."""
    degraded = corpus_yaml("kubernetes/deployment-progress-deadline-exceeded.yaml")["status"]
    sim = RolloutSimulator(kube_api, outcome="deadline-exceeded")
    try:
        seed_deployment(kube_api, namespace="prod", replicas=1)
        kube_api.mutate("deployments", "prod", "api", lambda d: d["spec"]["template"]["spec"]["containers"][0].update(
            image="registry.example.com/team/api:bad"))
        failed = kube_api.wait_for("deployments", "prod", "api", rollout_failed)
    finally:
        sim.stop()
    assert [(c["type"], c["status"], c["reason"]) for c in failed["status"]["conditions"]] == \
        [(c["type"], c["status"], c["reason"]) for c in degraded["conditions"]]
    assert {k: failed["status"][k] for k in ("replicas", "updatedReplicas", "unavailableReplicas")} == \
        {k: degraded[k] for k in ("replicas", "updatedReplicas", "unavailableReplicas")}
