"""The watcher against the fake Kubernetes API through the real adapter: resume, 410, cuts, resync."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from broker.core.errors import StoreUnavailable
from broker.core.events import RefKind
from broker.core.pipelinerun import RunRequest, render
from config.settings import parse_routing
from tests.support.fakes.kube_api import FakeKubeAPI
from tests.support.fakes.tekton import TektonSimulator
from tests.support import FIXTURES
from workers.adapters.kube import KubeCluster
from workers.watcher import Watcher


def run_object(sha: str, *, namespace: str = "ci", reported: str = "pending") -> dict[str, Any]:
    routing = parse_routing((FIXTURES / "routing" / "example.yaml").read_text(), source="example.yaml")
    req = RunRequest(delivery_id="01a2018ebee46132f6ae6571c7", host="gitlab", host_kind="gitlab", repo="acme/shop-api",
                     repo_id="42", ref="refs/heads/main", kind=RefKind.BRANCH, name="main", sha=sha, attempt=1,
                     received_at="2026-11-22T04:41:01.924Z")
    obj = render(routing, routing.routes[0], req, git_url="https://x/y.git")
    obj["metadata"]["namespace"] = namespace
    obj["metadata"]["annotations"]["cibroker.dev/reported"] = reported
    return obj


class Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def __call__(self, obj: dict[str, Any]) -> None:
        conds = (obj.get("status") or {}).get("conditions") or [{}]
        with self.lock:
            self.seen.append((obj["metadata"]["name"], str(conds[0].get("reason", ""))))

    def wait(self, what: str, check: Callable[[list[tuple[str, str]]], bool], timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while not check(list(self.seen)):
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {self.seen}"
            time.sleep(0.02)


@pytest.fixture
def watching(kube_api: FakeKubeAPI, kube_cluster: KubeCluster) -> Iterator[tuple[Watcher, Recorder]]:
    recorder = Recorder()
    watcher = Watcher(kube_cluster, ["ci", "other"], submit=recorder, resync_seconds=30, sleep=lambda s: time.sleep(min(s, 0.05)))
    thread = threading.Thread(target=watcher.run, daemon=True)
    thread.start()
    yield watcher, recorder
    watcher.stop.set()
    kube_api.cut_watches()
    thread.join(10)


def wait_watches(kube_api: FakeKubeAPI, n: int) -> None:
    deadline = time.monotonic() + 10
    while kube_api.open_watches != n:
        assert time.monotonic() < deadline, f"open watches {kube_api.open_watches}, expected {n}"
        time.sleep(0.02)


def test_one_watch_per_namespace_and_each_state_change_is_submitted_once(
    kube_api: FakeKubeAPI, tekton: TektonSimulator, watching: tuple[Watcher, Recorder]
) -> None:
    watcher, recorder = watching
    wait_watches(kube_api, 2)
    names = [kube_api.put(run_object(f"{i:040x}"))["metadata"]["name"] for i in range(1, 6)]
    for name in names:
        tekton.start("ci", name)
    recorder.wait("five runs running", lambda seen: sum(r == "Running" for _, r in seen) == 5)
    for name in names:
        tekton.succeed("ci", name)
    recorder.wait("five runs succeeded", lambda seen: sum(r == "Succeeded" for _, r in seen) == 5)
    assert kube_api.open_watches == 2  # O(namespaces), not O(runs)
    assert sorted(recorder.seen) == sorted([(n, "Running") for n in names] + [(n, "Succeeded") for n in names])


def test_runs_already_reported_are_not_submitted_again(kube_api: FakeKubeAPI, watching: tuple[Watcher, Recorder]) -> None:
    watcher, recorder = watching
    wait_watches(kube_api, 2)
    done = run_object("a" * 40, reported="success")
    done["status"] = {"conditions": [{"type": "Succeeded", "status": "True", "reason": "Succeeded"}]}
    kube_api.put(done)
    fresh = kube_api.put(run_object("b" * 40))["metadata"]["name"]
    kube_api.mutate("pipelineruns", "ci", fresh, lambda o: {**o, "status": {"conditions": [
        {"type": "Succeeded", "status": "Unknown", "reason": "Running"}]}})
    recorder.wait("the fresh run", lambda seen: (fresh, "Running") in seen)
    assert all(name == fresh for name, _ in recorder.seen)


def test_a_410_gone_relists_and_nothing_is_missed(kube_api: FakeKubeAPI, tekton: TektonSimulator,
                                                  watching: tuple[Watcher, Recorder]) -> None:
    """History compacted while the stream is cut: the resume gets 410, the watcher lists again and catches up."""
    watcher, recorder = watching
    wait_watches(kube_api, 2)
    name = kube_api.put(run_object("c" * 40))["metadata"]["name"]
    tekton.start("ci", name)
    recorder.wait("running", lambda seen: (name, "Running") in seen)
    lists_before = watcher.stats["lists"]
    # A write the watch does not see (not cibroker's: no label) puts the watcher's resourceVersion
    # behind the newest, so after the compaction its resume is refused with 410 (resuming from the
    # newest version is legal even after a compaction, and would make this test a coin toss).
    unseen = run_object("e" * 40)
    unseen["metadata"]["labels"] = {}
    kube_api.put(unseen)
    kube_api.compact()
    kube_api.cut_watches()
    tekton.succeed("ci", name)
    recorder.wait("success after 410", lambda seen: (name, "Succeeded") in seen)
    assert watcher.stats["lists"] > lists_before
    wait_watches(kube_api, 2)


def test_a_cut_stream_reconnects_from_where_it_was(kube_api: FakeKubeAPI, tekton: TektonSimulator,
                                                   watching: tuple[Watcher, Recorder]) -> None:
    watcher, recorder = watching
    wait_watches(kube_api, 2)
    name = kube_api.put(run_object("d" * 40))["metadata"]["name"]
    kube_api.cut_watches()
    tekton.start("ci", name)
    recorder.wait("running after reconnect", lambda seen: (name, "Running") in seen)
    wait_watches(kube_api, 2)
    assert recorder.seen.count((name, "Running")) == 1


def test_api_errors_back_off_and_recover(kube_api: FakeKubeAPI, tekton: TektonSimulator,
                                         watching: tuple[Watcher, Recorder]) -> None:
    watcher, recorder = watching
    wait_watches(kube_api, 2)
    kube_api.inject("GET", r"/namespaces/ci/pipelineruns$", 500, times=3)
    kube_api.cut_watches()
    name = kube_api.put(run_object("e" * 40))["metadata"]["name"]
    tekton.start("ci", name)
    recorder.wait("running despite 500s", lambda seen: (name, "Running") in seen)
    assert watcher.stats["errors"] >= 1


def test_a_report_that_cannot_be_queued_is_handed_on_again_without_waiting_for_the_resync(
        kube_api: FakeKubeAPI, kube_cluster: KubeCluster, tekton: TektonSimulator) -> None:
    """Redis away while submitting: the watcher backs off and replays that event (resync is 30 s away)."""
    recorder = Recorder()
    failures = [StoreUnavailable("redis unavailable while queueing"), StoreUnavailable("still away")]

    def submit(obj: dict[str, Any]) -> None:
        if failures:
            raise failures.pop(0)
        recorder(obj)

    watcher = Watcher(kube_cluster, ["ci"], submit=submit, resync_seconds=30, sleep=lambda s: time.sleep(min(s, 0.05)))
    thread = threading.Thread(target=watcher.run, daemon=True)
    thread.start()
    try:
        wait_watches(kube_api, 1)
        name = kube_api.put(run_object("f" * 40))["metadata"]["name"]
        tekton.start("ci", name)
        recorder.wait("running handed on after two failed submits", lambda seen: (name, "Running") in seen)
        assert failures == [] and watcher.stats["errors"] == 2 and thread.is_alive()
    finally:
        watcher.stop.set()
        kube_api.cut_watches()
        thread.join(10)


def test_resyncs_do_not_queue_the_same_report_again_while_it_is_under_way() -> None:
    """A lagging report is submitted once per state, and again only after resubmit_seconds (it failed for good)."""
    from tests.support.fakes.ports import FakeCluster

    cluster = FakeCluster()
    cluster.runs[("ci", "r1")] = {"metadata": {"name": "r1", "namespace": "ci", "labels": {"app.kubernetes.io/managed-by": "cibroker"},
                                               "annotations": {"cibroker.dev/reported": "pending"}},
                                  "status": {"conditions": [{"type": "Succeeded", "status": "Unknown", "reason": "Running"}]}}
    now = [1000.0]
    submitted: list[str] = []
    watcher = Watcher(cluster, ["ci"], submit=lambda obj: submitted.append(obj["metadata"]["name"]), resync_seconds=5,
                      resubmit_seconds=300, clock=lambda: now[0])
    for _ in range(10):  # ten resyncs while the report waits in a long queue
        watcher.resync("ci")
        now[0] += 5
    assert submitted == ["r1"]
    cluster.set_condition("ci", "r1", "True", "Succeeded")
    watcher.resync("ci")
    assert submitted == ["r1", "r1"]  # a new state is submitted at once
    now[0] += 301
    watcher.resync("ci")
    assert submitted == ["r1", "r1", "r1"]  # that report never landed: try again


def test_runs_that_are_not_cibrokers_are_never_submitted(kube_api: FakeKubeAPI, kube_cluster: KubeCluster,
                                                         tekton: TektonSimulator) -> None:
    """The trust check runs before a submit: a forged run's events are dropped, ours go on; asked once per state change."""
    recorder, asked = Recorder(), []

    def trust(obj: Any) -> bool:
        asked.append(obj["metadata"]["name"])
        return obj["metadata"]["labels"]["cibroker.dev/sha"] != "f" * 40

    watcher = Watcher(kube_cluster, ["ci"], submit=recorder, trust=trust, resync_seconds=30,
                      sleep=lambda s: time.sleep(min(s, 0.05)))
    thread = threading.Thread(target=watcher.run, daemon=True)
    thread.start()
    try:
        wait_watches(kube_api, 1)
        forged = kube_api.put(run_object("f" * 40))["metadata"]["name"]
        ours = kube_api.put(run_object("1" * 40))["metadata"]["name"]
        for name in (forged, ours):
            tekton.succeed("ci", name)
        recorder.wait("ours succeeded", lambda seen: (ours, "Succeeded") in seen)
    finally:
        watcher.stop.set()
        kube_api.cut_watches()
        thread.join(10)
    assert all(name == ours for name, _ in recorder.seen)
    assert forged in asked and watcher.stats["untrusted"] >= 1
