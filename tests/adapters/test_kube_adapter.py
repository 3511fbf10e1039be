"""workers.adapters.kube.KubeCluster through the official client against the fake API server over HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import kubernetes
import pytest
from kubernetes.config import incluster_config

from broker.core.errors import ConfigError, Expired, Permanent, Transient
from broker.core.watch import WatchEvent
from broker.ports import Cluster
from tests.support.rbac import permission as _permission
from tests.support.fakes.kube_api import FakeKubeAPI
from tests.support.fakes.rollout import (RolloutSimulator, rollout_complete, rollout_failed, seed_deployment,
                                 seed_service_account)
from tests.support.fakes.tekton import TektonSimulator, condition
from workers.adapters.kube import RBAC, KubeCluster, api_client_for

NS = "ci"
RUNS = r"/apis/tekton\.dev/v1/namespaces/ci/pipelineruns"


def pipelinerun(name: str = "build-1", **labels: str) -> dict[str, Any]:
    return {"apiVersion": "tekton.dev/v1", "kind": "PipelineRun",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "cibroker", **labels},
                         "annotations": {"cibroker.io/delivery": "d-1"}},
            "spec": {"pipelineRef": {"name": "build-test-push"}, "taskRunTemplate": {"serviceAccountName": "bot"}}}


def take(events: Iterator[WatchEvent], count: int) -> list[WatchEvent]:
    return [next(events) for _ in range(count)]


def test_kube_cluster_satisfies_the_cluster_port(kube_cluster: KubeCluster) -> None:
    """Every verb of broker.ports.Cluster exists on the adapter with the same keyword-only names."""
    wanted = {name for name in dir(Cluster) if not name.startswith("_")}
    assert wanted <= set(dir(kube_cluster))
    _: Cluster = kube_cluster


def test_create_fills_server_fields_and_reports_created(kube_cluster: KubeCluster, kube_api: FakeKubeAPI) -> None:
    """A new PipelineRun comes back as the API stored it (uid, resourceVersion, generation) and created=True."""
    created, is_new = kube_cluster.create_pipelinerun(MappingProxyType(pipelinerun()), namespace=NS)
    assert is_new is True
    assert created["metadata"]["uid"] and created["metadata"]["generation"] == 1
    assert created["metadata"]["resourceVersion"] == str(kube_api.store.resource_version)
    assert kube_api.get("pipelineruns", NS, "build-1") == created
    post = kube_api.calls("POST", RUNS)[0]
    assert post.query["fieldManager"] == "cibroker"


def test_create_of_an_existing_name_returns_the_existing_run(kube_cluster: KubeCluster, kube_api: FakeKubeAPI) -> None:
    """AlreadyExists is an answer, not an error: the stored run and created=False, in two API calls."""
    first, _ = kube_cluster.create_pipelinerun(pipelinerun(), namespace=NS)
    kube_api.requests.clear()
    again, is_new = kube_cluster.create_pipelinerun(pipelinerun(extra="x"), namespace=NS)
    assert is_new is False
    assert again == first
    assert [r.method for r in kube_api.requests] == ["POST", "GET"]


def test_get_returns_none_for_an_absent_run(kube_cluster: KubeCluster) -> None:
    """404 on get is None."""
    assert kube_cluster.get_pipelinerun(namespace=NS, name="nope") is None


def test_list_filters_by_selector_and_returns_the_list_resource_version(
        kube_cluster: KubeCluster, kube_api: FakeKubeAPI) -> None:
    """Only runs matching the label selector come back, with the list's resourceVersion to watch from."""
    kube_cluster.create_pipelinerun(pipelinerun("a", repo="one"), namespace=NS)
    kube_cluster.create_pipelinerun(pipelinerun("b", repo="two"), namespace=NS)
    kube_cluster.create_pipelinerun(pipelinerun("c"), namespace=NS)
    items, rv = kube_cluster.list_pipelineruns(namespace=NS, selector="repo,repo!=two")
    assert [i["metadata"]["name"] for i in items] == ["a"]
    assert rv == str(kube_api.store.resource_version)
    everything, _ = kube_cluster.list_pipelineruns(namespace=NS, selector="")
    assert len(everything) == 3


def test_patch_merges_annotations_and_null_removes_one(kube_cluster: KubeCluster) -> None:
    """A JSON merge patch adds and removes annotations and leaves the others alone."""
    kube_cluster.create_pipelinerun(pipelinerun(), namespace=NS)
    patched = kube_cluster.patch_pipelinerun(namespace=NS, name="build-1", patch=MappingProxyType(
        {"metadata": {"annotations": {"cibroker.io/reported": "running", "cibroker.io/delivery": None}}}))
    assert patched["metadata"]["annotations"] == {"cibroker.io/reported": "running"}
    assert patched["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "cibroker"
    assert patched["metadata"]["generation"] == 1  # metadata is not spec


def test_cancel_is_a_merge_patch_of_spec_status_that_tekton_honours(
        kube_cluster: KubeCluster, kube_api: FakeKubeAPI, tekton: TektonSimulator) -> None:
    """spec.status Cancelled, sent as merge patch, ends the run False/Cancelled and cancels its TaskRuns."""
    kube_cluster.create_pipelinerun(pipelinerun(), namespace=NS)
    tekton.start(NS, "build-1")
    kube_cluster.patch_pipelinerun(namespace=NS, name="build-1", patch={"spec": {"status": "Cancelled"}})
    assert kube_api.calls("PATCH", RUNS)[0].content_type == "application/merge-patch+json"
    done = kube_api.wait_for("pipelineruns", NS, "build-1", lambda pr: condition(pr).get("status") == "False")
    assert condition(done)["reason"] == "Cancelled"
    assert condition(done)["message"] == 'PipelineRun "build-1" was cancelled'
    [taskrun] = kube_cluster.list_taskruns(namespace=NS, pipelinerun="build-1")
    assert condition(taskrun)["reason"] == "TaskRunCancelled"


def test_list_taskruns_selects_the_children_of_one_run(kube_cluster: KubeCluster, tekton: TektonSimulator) -> None:
    """TaskRuns come back by the tekton.dev/pipelineRun label, never another run's."""
    for name in ("run-a", "run-b"):
        kube_cluster.create_pipelinerun(pipelinerun(name), namespace=NS)
    tekton.succeed(NS, "run-a")
    tekton.start(NS, "run-b")
    names = sorted(t["metadata"]["name"] for t in kube_cluster.list_taskruns(namespace=NS, pipelinerun="run-a"))
    assert names == ["run-a-build", "run-a-clone"]


def test_service_account_present_and_absent(kube_cluster: KubeCluster, kube_api: FakeKubeAPI) -> None:
    """True for a ServiceAccount that exists, False on 404."""
    seed_service_account(kube_api, namespace=NS, name="pipeline-bot")
    assert kube_cluster.service_account_exists(namespace=NS, name="pipeline-bot") is True
    assert kube_cluster.service_account_exists(namespace=NS, name="missing") is False
    assert kube_cluster.service_account_exists(namespace="other", name="pipeline-bot") is False


# -- watch -----------------------------------------------------------------------------------


def test_watch_yields_added_modified_and_bookmark_in_order(kube_cluster: KubeCluster, kube_api: FakeKubeAPI) -> None:
    """Changes after the listed resourceVersion stream as they happen, bookmarks included."""
    _, rv = kube_cluster.list_pipelineruns(namespace=NS, selector="app.kubernetes.io/managed-by=cibroker")
    events = kube_cluster.watch_pipelineruns(namespace=NS, selector="app.kubernetes.io/managed-by=cibroker",
                                             resource_version=rv, timeout_seconds=10)
    kube_cluster.create_pipelinerun(pipelinerun(), namespace=NS)
    kube_cluster.patch_pipelinerun(namespace=NS, name="build-1", patch={"metadata": {"annotations": {"x": "1"}}})
    added, modified = take(events, 2)
    kube_api.send_bookmarks()
    bookmark = next(events)
    events.close()
    assert [e.type for e in (added, modified, bookmark)] == ["ADDED", "MODIFIED", "BOOKMARK"]
    assert modified.object["metadata"]["annotations"]["x"] == "1"
    assert int(added.resource_version) < int(modified.resource_version) <= int(bookmark.resource_version)
    assert bookmark.resource_version == str(kube_api.store.resource_version)
    watch = kube_api.calls("GET", RUNS, watch=True)[0]
    assert watch.query == {"watch": "true", "resourceVersion": rv, "allowWatchBookmarks": "true",
                           "timeoutSeconds": "10", "labelSelector": "app.kubernetes.io/managed-by=cibroker"}


def test_watch_resumed_from_a_resource_version_repeats_nothing(kube_cluster: KubeCluster) -> None:
    """Resuming from the last seen resourceVersion yields only what happened after it."""
    _, start = kube_cluster.list_pipelineruns(namespace=NS, selector="")
    for name in ("a", "b", "c"):
        kube_cluster.create_pipelinerun(pipelinerun(name), namespace=NS)
    first = kube_cluster.watch_pipelineruns(namespace=NS, selector="", resource_version=start, timeout_seconds=10)
    seen = take(first, 2)
    first.close()
    resumed = kube_cluster.watch_pipelineruns(namespace=NS, selector="", resource_version=seen[-1].resource_version,
                                              timeout_seconds=10)
    rest = take(resumed, 1)
    resumed.close()
    assert [e.object["metadata"]["name"] for e in seen + rest] == ["a", "b", "c"]


def test_watch_ends_quietly_at_its_timeout(kube_cluster: KubeCluster, kube_api: FakeKubeAPI) -> None:
    """The server closing the stream at timeoutSeconds is a normal end, not an error."""
    _, rv = kube_cluster.list_pipelineruns(namespace=NS, selector="")
    assert list(kube_cluster.watch_pipelineruns(namespace=NS, selector="", resource_version=rv,
                                                timeout_seconds=1)) == []
    assert kube_api.open_watches == 0


def test_watch_from_a_compacted_resource_version_raises_expired(
        kube_cluster: KubeCluster, kube_api: FakeKubeAPI) -> None:
    """The server's ERROR event with a 410 Status becomes Expired (relist), not a resource."""
    _, rv = kube_cluster.list_pipelineruns(namespace=NS, selector="")
    kube_cluster.create_pipelinerun(pipelinerun(), namespace=NS)
    kube_api.compact()
    with pytest.raises(Expired, match="too old resource version"):
        list(kube_cluster.watch_pipelineruns(namespace=NS, selector="", resource_version=rv, timeout_seconds=5))


def test_watch_answered_410_before_streaming_raises_expired(kube_cluster: KubeCluster, kube_api: FakeKubeAPI) -> None:
    """A plain HTTP 410 on the watch request is Expired too, chained to the client's ApiException."""
    kube_api.inject("GET", RUNS + "$", 410)
    with pytest.raises(Expired) as caught:
        list(kube_cluster.watch_pipelineruns(namespace=NS, selector="", resource_version="1", timeout_seconds=5))
    assert isinstance(caught.value.__cause__, kubernetes.client.ApiException)


def test_a_cut_watch_stream_raises_transient(kube_cluster: KubeCluster, kube_api: FakeKubeAPI) -> None:
    """A connection dropped mid-stream (no final chunk) is Transient, chained to urllib3's error."""
    _, rv = kube_cluster.list_pipelineruns(namespace=NS, selector="")
    events = kube_cluster.watch_pipelineruns(namespace=NS, selector="", resource_version=rv, timeout_seconds=30)
    kube_cluster.create_pipelinerun(pipelinerun(), namespace=NS)
    assert next(events).type == "ADDED"
    assert kube_api.cut_watches() == 1
    with pytest.raises(Transient) as caught:
        next(events)
    assert not isinstance(caught.value, Expired)
    assert "ProtocolError" in str(caught.value)


def test_closing_the_watch_early_releases_the_stream(kube_cluster: KubeCluster, kube_api: FakeKubeAPI) -> None:
    """A consumer that stops iterating closes the connection; the server sees the watch go away."""
    _, rv = kube_cluster.list_pipelineruns(namespace=NS, selector="")
    events = kube_cluster.watch_pipelineruns(namespace=NS, selector="", resource_version=rv, timeout_seconds=30)
    kube_cluster.create_pipelinerun(pipelinerun(), namespace=NS)
    next(events)
    [watcher] = kube_api.store.watchers()
    events.close()
    assert watcher.closed.wait(5)
    assert kube_api.open_watches == 0


# -- error translation -----------------------------------------------------------------------


def test_429_with_retry_after_is_transient_without_a_hidden_retry(
        kube_cluster: KubeCluster, kube_api: FakeKubeAPI) -> None:
    """Too Many Requests surfaces at once with retry_after from the header; urllib3 does not sleep and retry."""
    kube_api.inject("GET", RUNS + "/build-1$", 429, headers={"Retry-After": "7"})
    with pytest.raises(Transient) as caught:
        kube_cluster.get_pipelinerun(namespace=NS, name="build-1")
    assert caught.value.retry_after == 7.0
    assert isinstance(caught.value.__cause__, kubernetes.client.ApiException)
    assert len(kube_api.calls("GET", RUNS)) == 1


def test_the_client_default_transport_would_sleep_through_a_429(kube_api: FakeKubeAPI) -> None:
    """Why api_client_for exists: the stock client retries a GET after Retry-After inside urllib3."""
    kube_api.put({**pipelinerun(), "metadata": {"name": "build-1", "namespace": NS}})
    kube_api.inject("GET", RUNS + "/build-1$", 429, headers={"Retry-After": "0"})
    with kubernetes.client.ApiClient(kubernetes.client.Configuration(host=kube_api.url)) as stock:
        assert KubeCluster(stock).get_pipelinerun(namespace=NS, name="build-1") is not None
    assert len(kube_api.calls("GET", RUNS)) == 2


@pytest.mark.parametrize("status", [500, 503, 504])
def test_server_errors_are_transient(kube_cluster: KubeCluster, kube_api: FakeKubeAPI, status: int) -> None:
    """5xx on any verb is Transient; a 503's Retry-After is kept."""
    kube_api.inject("POST", RUNS + "$", status, headers={"Retry-After": "3"} if status == 503 else None)
    with pytest.raises(Transient) as caught:
        kube_cluster.create_pipelinerun(pipelinerun(), namespace=NS)
    assert caught.value.retry_after == (3.0 if status == 503 else None)
    assert str(status) in str(caught.value)


def test_403_is_permanent_and_names_what_rbac_is_missing(kube_cluster: KubeCluster, kube_api: FakeKubeAPI) -> None:
    """Forbidden names verb, resource, API group and namespace so an operator can fix the Role."""
    kube_api.inject("POST", RUNS + "$", 403)
    with pytest.raises(Permanent) as caught:
        kube_cluster.create_pipelinerun(pipelinerun(), namespace=NS)
    message = str(caught.value)
    assert "'create'" in message and "pipelineruns" in message and "'tekton.dev'" in message and "'ci'" in message
    assert 'cannot create resource "pipelineruns"' in message  # the API's own words are kept


def test_401_on_a_deployment_patch_is_permanent(kube_cluster: KubeCluster, kube_api: FakeKubeAPI) -> None:
    """Unauthorized is Permanent and says which call failed."""
    kube_api.inject("PATCH", "/deployments/api$", 401)
    with pytest.raises(Permanent, match=r"patch deployments\.apps in namespace 'prod': unauthorized"):
        kube_cluster.patch_deployment(namespace="prod", name="api", patch={"metadata": {"labels": {"a": "b"}}})


def test_409_conflict_on_patch_is_transient(kube_cluster: KubeCluster, kube_api: FakeKubeAPI) -> None:
    """A write conflict is worth retrying: Transient, not AlreadyExists handling."""
    kube_cluster.create_pipelinerun(pipelinerun(), namespace=NS)
    kube_api.inject("PATCH", RUNS + "/build-1$", 409)
    with pytest.raises(Transient, match="Operation cannot be fulfilled"):
        kube_cluster.patch_pipelinerun(namespace=NS, name="build-1", patch={"metadata": {"labels": {"a": "b"}}})


def test_stale_resource_version_in_a_patch_is_transient(kube_cluster: KubeCluster) -> None:
    """The fake's real optimistic-concurrency check (not an injection) comes back as Transient."""
    created, _ = kube_cluster.create_pipelinerun(pipelinerun(), namespace=NS)
    kube_cluster.patch_pipelinerun(namespace=NS, name="build-1", patch={"metadata": {"labels": {"a": "b"}}})
    stale = {"metadata": {"resourceVersion": created["metadata"]["resourceVersion"], "labels": {"a": "c"}}}
    with pytest.raises(Transient, match="the object has been modified"):
        kube_cluster.patch_pipelinerun(namespace=NS, name="build-1", patch=stale)


def test_invalid_object_is_permanent_with_the_api_message(kube_cluster: KubeCluster) -> None:
    """422 from validation (a ref with a slash is not a label value) is Permanent and quotes the API."""
    with pytest.raises(Permanent, match=r'rejected \(422\).*Invalid value: "feature/x"'):
        kube_cluster.create_pipelinerun(pipelinerun(ref="feature/x"), namespace=NS)


def test_patch_of_a_missing_run_is_permanent(kube_cluster: KubeCluster) -> None:
    """404 where the port promises no None is Permanent."""
    with pytest.raises(Permanent, match="not found"):
        kube_cluster.patch_pipelinerun(namespace=NS, name="gone", patch={"metadata": {"labels": {"a": "b"}}})


def test_a_slow_api_server_is_transient(kube_client: kubernetes.client.ApiClient, kube_api: FakeKubeAPI) -> None:
    """A read timeout is Transient."""
    kube_api.delay(RUNS + "$", 5)
    cluster = KubeCluster(kube_client, request_timeout=0.3)
    with pytest.raises(Transient, match="ReadTimeoutError|timed out"):
        cluster.create_pipelinerun(pipelinerun(), namespace=NS)


def test_a_refused_connection_is_transient() -> None:
    """No API server listening is Transient, chained to urllib3's error."""
    with FakeKubeAPI() as api:
        url = api.url
    client = api_client_for(kubernetes.client.Configuration(host=url))
    try:
        with pytest.raises(Transient) as caught:
            KubeCluster(client, request_timeout=2).get_pipelinerun(namespace=NS, name="x")
    finally:
        client.close()
    assert caught.value.__cause__ is not None


# -- deployments -----------------------------------------------------------------------------


def test_image_patch_changes_only_the_named_container(
        kube_cluster: KubeCluster, kube_api: FakeKubeAPI, rollout: RolloutSimulator) -> None:
    """A strategic merge patch keyed by container name leaves the sidecar's image alone and bumps generation."""
    seed_deployment(kube_api, namespace="prod", sidecars={"proxy": "envoyproxy/envoy:v1.30.0"})
    before = kube_cluster.get_deployment(namespace="prod", name="api")
    assert before is not None
    patched = kube_cluster.patch_deployment(namespace="prod", name="api", patch={"spec": {"template": {"spec": {
        "containers": [{"name": "api", "image": "registry.example.com/team/api:1.1.0"}]}}}})
    images = {c["name"]: c["image"] for c in patched["spec"]["template"]["spec"]["containers"]}
    assert images == {"api": "registry.example.com/team/api:1.1.0", "proxy": "envoyproxy/envoy:v1.30.0"}
    assert patched["metadata"]["generation"] == before["metadata"]["generation"] + 1
    assert kube_api.calls("PATCH", "/deployments/api$")[0].content_type == "application/strategic-merge-patch+json"
    done = kube_api.wait_for("deployments", "prod", "api", rollout_complete)
    assert done["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "2"
    assert done["status"]["observedGeneration"] == patched["metadata"]["generation"]


def test_rollout_that_misses_its_deadline_is_visible_through_get(
        kube_cluster: KubeCluster, kube_api: FakeKubeAPI, rollout: RolloutSimulator) -> None:
    """ProgressDeadlineExceeded reaches the caller as the Deployment's Progressing condition."""
    seed_deployment(kube_api, namespace="prod")
    rollout.set_outcome("prod", "api", "deadline-exceeded")
    kube_cluster.patch_deployment(namespace="prod", name="api", patch={"spec": {"template": {"spec": {
        "containers": [{"name": "api", "image": "registry.example.com/team/api:broken"}]}}}})
    kube_api.wait_for("deployments", "prod", "api", rollout_failed)
    current = kube_cluster.get_deployment(namespace="prod", name="api")
    assert current is not None and rollout_failed(current) and not rollout_complete(current)


def test_get_deployment_returns_none_when_absent(kube_cluster: KubeCluster) -> None:
    """404 on a Deployment is None."""
    assert kube_cluster.get_deployment(namespace="prod", name="api") is None


# -- configuration, versions, RBAC -----------------------------------------------------------


def test_tekton_v1beta1_is_spoken_on_the_v1beta1_paths(kube_client: kubernetes.client.ApiClient,
                                                       kube_api: FakeKubeAPI) -> None:
    """tekton_version selects the API path; a v1beta1 body is accepted there."""
    cluster = KubeCluster(kube_client, tekton_version="v1beta1")
    body = {**pipelinerun(), "apiVersion": "tekton.dev/v1beta1"}
    cluster.create_pipelinerun(body, namespace=NS)
    assert cluster.get_pipelinerun(namespace=NS, name="build-1") is not None
    assert {r.path for r in kube_api.requests} == {"/apis/tekton.dev/v1beta1/namespaces/ci/pipelineruns",
                                                   "/apis/tekton.dev/v1beta1/namespaces/ci/pipelineruns/build-1"}


def test_from_environment_reads_the_kubeconfig_named_by_kubeconfig(tmp_path: Path, kube_api: FakeKubeAPI) -> None:
    """Outside a cluster, KUBECONFIG picks the file; the adapter then talks to that server."""
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(f"""
apiVersion: v1
kind: Config
clusters: [{{name: fake, cluster: {{server: "{kube_api.url}"}}}}]
users: [{{name: bot, user: {{token: not-a-secret}}}}]
contexts: [{{name: fake, context: {{cluster: fake, user: bot}}}}]
current-context: fake
""")
    cluster = KubeCluster.from_environment(environ={"KUBECONFIG": str(kubeconfig)})
    try:
        assert cluster.get_pipelinerun(namespace=NS, name="nope") is None
    finally:
        cluster.close()
    assert kube_api.requests[-1].path == "/apis/tekton.dev/v1/namespaces/ci/pipelineruns/nope"


def test_from_environment_without_any_config_is_a_config_error(tmp_path: Path) -> None:
    """No in-cluster variables and no kubeconfig file: a ConfigError that says so."""
    with pytest.raises(ConfigError, match="kubernetes: cannot load cluster credentials"):
        KubeCluster.from_environment(environ={"KUBECONFIG": str(tmp_path / "missing")})


@pytest.mark.skipif(Path(incluster_config.SERVICE_TOKEN_FILENAME).exists(), reason="runs inside a pod")
def test_in_cluster_variables_without_a_mounted_token_are_a_config_error() -> None:
    """KUBERNETES_SERVICE_HOST selects in-cluster config; with no service account token that is a ConfigError."""
    with pytest.raises(ConfigError, match="token"):
        KubeCluster.from_environment(environ={"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"})


def test_rbac_lists_exactly_the_calls_the_adapter_makes(
        kube_cluster: KubeCluster, kube_api: FakeKubeAPI, tekton: TektonSimulator) -> None:
    """Every verb of the port, exercised once, needs exactly the permissions in workers.adapters.kube.RBAC."""
    seed_deployment(kube_api, namespace=NS)
    seed_service_account(kube_api, namespace=NS, name="bot")
    kube_cluster.create_pipelinerun(pipelinerun(), namespace=NS)
    kube_cluster.create_pipelinerun(pipelinerun(), namespace=NS)
    kube_cluster.get_pipelinerun(namespace=NS, name="build-1")
    _, rv = kube_cluster.list_pipelineruns(namespace=NS, selector="")
    list(kube_cluster.watch_pipelineruns(namespace=NS, selector="", resource_version=rv, timeout_seconds=1))
    kube_cluster.patch_pipelinerun(namespace=NS, name="build-1", patch={"metadata": {"labels": {"a": "b"}}})
    kube_cluster.list_taskruns(namespace=NS, pipelinerun="build-1")
    kube_cluster.service_account_exists(namespace=NS, name="bot")
    kube_cluster.get_deployment(namespace=NS, name="api")
    kube_cluster.patch_deployment(namespace=NS, name="api", patch={"metadata": {"labels": {"a": "b"}}})
    kube_cluster.delete_pipelinerun(namespace=NS, name="build-1")
    assert {_permission(r) for r in kube_api.requests} == RBAC


def test_deleting_a_pipelinerun_removes_it_and_a_missing_one_is_not_an_error(
        kube_cluster: KubeCluster, kube_api: FakeKubeAPI) -> None:
    kube_cluster.create_pipelinerun(pipelinerun(), namespace=NS)
    kube_cluster.delete_pipelinerun(namespace=NS, name="build-1")
    assert kube_cluster.get_pipelinerun(namespace=NS, name="build-1") is None
    kube_cluster.delete_pipelinerun(namespace=NS, name="build-1")  # already gone: no error
