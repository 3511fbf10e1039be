"""Fault injection: break a process, Redis, the Kubernetes API or the Git host on purpose, then check the promise.

Real `cibroker serve`, `cibroker worker` and `cibroker watcher` processes, a real
redis-server, the wire fakes (tests/fakes). Faults are placed with the fakes' own
controls (a request held until the test acts, injected answers, a TCP proxy in front
of Redis), so a kill lands inside the step it is meant to interrupt instead of after
a guessed sleep. Every scenario ends with `settle()`: every accepted delivery has
exactly one PipelineRun per route, every run ended and its commit shows the matching
final status, statuses only moved forward, and exactly one rollout per succeeded run
that was due one (tests/support/stack.py). Each also checks that no secret reached the logs or
Redis. The figures go to the junit properties (`record_property`) and docs/RELIABILITY.md.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.support.fakes.githost_api import GITLAB_TOKEN, FakeGitLab
from tests.support.fakes.kube_api import FakeKubeAPI
from tests.support.fakes.rollout import RolloutSimulator
from tests.support.fakes.tcp_proxy import TcpProxy
from tests.support.fakes.tekton import TektonSimulator, condition
from tests.support.stack import (API_TOKEN, DEPLOY_STATUS, IMAGE, KUBE_TOKEN, STATUS, Outcome, Stack, deployed_image, hook_headers, push_body,
                         settle, sha_of)
from tests.support import SECRETS, RedisServer

pytestmark = [pytest.mark.faults, pytest.mark.e2e]
SECRET_VALUES = [*SECRETS.values(), GITLAB_TOKEN, KUBE_TOKEN, API_TOKEN]


@pytest.fixture
def make_stack(tmp_path: Path, kube: FakeKubeAPI, fake_gitlab_api: FakeGitLab) -> Iterator[Callable[..., Stack]]:
    """Build a Stack on a given Redis URL; on teardown, no secret may be in its logs or in Redis."""
    made: list[tuple[Stack, str]] = []

    def make(redis_url: str, **env: str) -> Stack:
        s = Stack(tmp_path, redis_url, kube, fake_gitlab_api, **env)
        made.append((s, redis_url))
        return s

    yield make
    for s, url in made:
        s.stop()
        assert_no_secrets(s.captured_output(), where="process logs")
        assert_no_secrets(redis_dump(url), where="Redis")


@pytest.fixture
def faulty(make_stack: Callable[..., Stack], redis_url: str) -> Stack:
    """The whole stack, started, on the session's Redis."""
    return make_stack(redis_url).start_all()


def assert_no_secrets(text: str, *, where: str) -> None:
    assert text, f"nothing captured from {where}"
    leaked = [s for s in SECRET_VALUES if s in text]
    assert not leaked, f"secrets in {where}: {leaked}"


def redis_dump(url: str) -> str:
    """Every value in Redis as text (records, logs, task messages, claims), or a note when it is gone."""
    client = redis.Redis.from_url(url, socket_timeout=2)
    out: list[bytes] = []
    try:
        for key in client.scan_iter():
            kind = client.type(key)
            out.append(key)
            if kind == b"hash":
                out.extend(client.hgetall(key).values())
            elif kind == b"list":
                out.extend(client.lrange(key, 0, -1))
            elif kind == b"string":
                out.append(client.get(key) or b"")
            elif kind == b"zset":
                out.extend(client.zrange(key, 0, -1))
    except redis.exceptions.ConnectionError:
        return "(redis already stopped)"
    finally:
        client.close()
    return b"\n".join(out).decode(errors="replace")


def record(record_property: Callable[[str, Any], None], outcome: Outcome, **extra: Any) -> None:
    record_property("invariants", json.dumps({**outcome.figures(), **extra}, sort_keys=True))


def run_named(kube: FakeKubeAPI, sha: str) -> dict[str, Any]:
    return next(r for r in kube.list("pipelineruns", "ci") if r["metadata"]["labels"]["cibroker.dev/sha"] == sha)


def has_run(kube: FakeKubeAPI, sha: str) -> bool:
    return any(r["metadata"]["labels"]["cibroker.dev/sha"] == sha for r in kube.list("pipelineruns", "ci"))


# -- processes killed mid-step ----------------------------------------------------------------


@pytest.mark.parametrize("step", ["create", "report", "deploy"])
def test_worker_killed_inside_each_task_kind_loses_and_repeats_nothing(
        step: str, faulty: Stack, kube: FakeKubeAPI, record_property: Any) -> None:
    """kill -9 of the worker while its create / report / deploy call is held by the fake: redelivered, done once."""
    stack, gitlab, sha = faulty, faulty.gitlab, sha_of(0xC1)
    with TektonSimulator(kube) as tekton, RolloutSimulator(kube):
        if step == "create":  # held, then never stored: only the redelivered task can create the run
            kube.delay(r"/pipelineruns$", 2.0, method="POST", times=1)
            kube.inject("POST", r"/pipelineruns$", 503, times=1)
        delivery = stack.push("kill-" + step, sha=sha)
        if step == "create":
            stack.wait("create call in flight", lambda: bool(kube.calls("POST", r"/pipelineruns$")))
        else:
            stack.wait("pending posted", lambda: gitlab.states(sha, STATUS) == ["pending"])
            name = run_named(kube, sha)["metadata"]["name"]
            if step == "report":
                gitlab.inject_hang()  # the report task's `running` POST
                tekton.start("ci", name)
                stack.wait("running report held by GitLab", lambda: gitlab.hanging == 1)
            else:
                kube.delay(r"/deployments/shop-api$", 2.0, method="PATCH", times=1)  # lands; the redelivery follows it
                tekton.succeed("ci", name)
                stack.wait("deploy patch in flight", lambda: bool(kube.calls("PATCH", r"/deployments/shop-api$")))
        stack.kill("worker")
        gitlab.release()
        stack.start("worker")
        if step != "deploy":
            stack.wait("the run exists", lambda: has_run(kube, sha), timeout=60)
            tekton.succeed("ci", run_named(kube, sha)["metadata"]["name"])
        outcome = settle(stack, [delivery], timeout=90)
    assert outcome.runs == 1 and outcome.deploys == 1
    assert gitlab.states(sha, DEPLOY_STATUS)[-1] == "success"
    record(record_property, outcome, scenario=f"worker kill -9 during {step}")


def test_watcher_killed_mid_run_reports_every_run_after_restart(faulty: Stack, kube: FakeKubeAPI, record_property: Any) -> None:
    """kill -9 of the watcher with three runs going; they end while it is down; the restarted one reports all."""
    stack = faulty
    shas = [sha_of(0xA0 + i) for i in range(3)]
    with TektonSimulator(kube) as tekton, RolloutSimulator(kube):
        deliveries = [stack.push(f"w{i}", sha=sha, ref=f"refs/heads/b/w{i}") for i, sha in enumerate(shas)]
        stack.wait("three runs created", lambda: all(has_run(kube, s) for s in shas))
        for sha in shas:
            tekton.start("ci", run_named(kube, sha)["metadata"]["name"])
        stack.wait("running reported", lambda: all(stack.gitlab.states(s, STATUS)[-1:] == ["running"] for s in shas))
        stack.kill("watcher")
        tekton.succeed("ci", run_named(kube, shas[0])["metadata"]["name"])
        tekton.fail("ci", run_named(kube, shas[1])["metadata"]["name"], task="build")
        tekton.time_out("ci", run_named(kube, shas[2])["metadata"]["name"])
        assert [stack.gitlab.states(s, STATUS)[-1] for s in shas] == ["running"] * 3
        stack.start("watcher")
        outcome = settle(stack, deliveries)
    assert [stack.gitlab.states(s, STATUS)[-1] for s in shas] == ["success", "failed", "failed"]
    record(record_property, outcome, scenario="watcher kill -9 mid-run")


def test_web_killed_mid_request_never_loses_or_doubles_a_delivery(
        make_stack: Callable[..., Stack], redis_server: RedisServer, redis_url: str, kube: FakeKubeAPI,
        record_property: Any) -> None:
    """kill -9 of `cibroker serve` while Redis holds (a) its answer, (b) its request: the client sees a
    failed request; the resend is (a) a duplicate of the stored delivery, (b) accepted. One run each."""
    with TcpProxy(redis_server.port) as proxy, TektonSimulator(kube, auto_start=0.1, auto_finish=0.2), \
            RolloutSimulator(kube), ThreadPoolExecutor(1) as pool:
        stack = make_stack(redis_url)
        stack.start("worker")
        stack.start("watcher")
        stack.start("serve", CIBROKER_REDIS_URL=proxy.url)
        deliveries = []
        for phase, sha, hold in (("answer-lost", sha_of(0xD1), proxy.hold_replies),
                                 ("request-lost", sha_of(0xD2), proxy.hold_requests)):
            ref = f"refs/heads/b/{phase}"
            hold()
            sent: Future[httpx.Response] = pool.submit(stack.post, phase, sha=sha, ref=ref)
            stack.wait("the accept call is held at the proxy", lambda: proxy.held > 0)
            stack.kill("serve")
            with pytest.raises(httpx.TransportError):
                sent.result(10)
            stack.wait("the proxy dropped the dead connection", lambda: proxy.held == 0)
            proxy.passing()
            stack.start("serve", CIBROKER_REDIS_URL=proxy.url)
            again = stack.post(phase, sha=sha, ref=ref)
            decision = "duplicate" if phase == "answer-lost" else "accepted"
            assert again.json()["decision"] == decision, again.text
            deliveries.append(again.json()["delivery_id"])
        outcome = settle(stack, deliveries)
    assert outcome.runs == 2
    record(record_property, outcome, scenario="web kill -9 mid-request (answer lost; request lost)")


# -- Redis ------------------------------------------------------------------------------------


def test_redis_killed_and_restarted_with_aof_while_deliveries_are_in_flight(
        make_stack: Callable[..., Stack], fresh_redis: RedisServer, kube: FakeKubeAPI, record_property: Any) -> None:
    """kill -9 of redis-server with four deliveries between the edge and their runs; it restarts from its AOF."""
    stack = make_stack(fresh_redis.url).start_all()
    shas = [sha_of(0xE0 + i) for i in range(4)]
    with TektonSimulator(kube, auto_start=0.2, auto_finish=0.5), RolloutSimulator(kube):
        kube.delay(r"/pipelineruns$", 1.0, method="POST", times=4)
        deliveries = [stack.push(f"r{i}", sha=sha, ref=f"refs/heads/b/r{i}") for i, sha in enumerate(shas)]
        stack.wait("a create call in flight", lambda: bool(kube.calls("POST", r"/pipelineruns$")))
        assert fresh_redis.proc is not None
        fresh_redis.proc.kill()
        fresh_redis.proc.wait()
        fresh_redis.start()
        outcome = settle(stack, deliveries, timeout=90)
    assert outcome.runs == 4
    record(record_property, outcome, scenario="redis kill -9 + restart (AOF) with deliveries in flight")


def test_redis_unreachable_for_a_while_answers_503_and_recovers_by_itself(
        make_stack: Callable[..., Stack], redis_server: RedisServer, kube: FakeKubeAPI, record_property: Any) -> None:
    """Every process reaches Redis through a proxy that resets and refuses connections for a while:
    the edge answers 503 (nothing stored), /readyz says so; afterwards all recover without a restart."""
    with TcpProxy(redis_server.port) as proxy, TektonSimulator(kube, auto_start=0.3, auto_finish=1.0), \
            RolloutSimulator(kube):
        stack = make_stack(proxy.url, CIBROKER_REDIS_TIMEOUT_SECONDS="0.5").start_all()
        before = [stack.push(f"u{i}", sha=sha_of(0xF0 + i), ref=f"refs/heads/b/u{i}") for i in range(2)]
        stack.wait("runs started", lambda: all(has_run(kube, sha_of(0xF0 + i)) for i in range(2)))
        proxy.unreachable()
        refused = stack.post("during", sha=sha_of(0xF5), ref="refs/heads/b/during")
        assert refused.status_code == 503 and "redis" in refused.json()["error"], refused.text
        assert httpx.get(f"{stack.url}/readyz").status_code == 503
        stack.wait("both runs ended while Redis was away", lambda: all(
            condition(run_named(kube, sha_of(0xF0 + i))).get("status") == "True" for i in range(2)), timeout=20)
        proxy.passing()
        stack.wait("ready again", lambda: httpx.get(f"{stack.url}/readyz").status_code == 200)
        resent = stack.push("during", sha=sha_of(0xF5), ref="refs/heads/b/during")
        outcome = settle(stack, [*before, resent], timeout=90)
    assert outcome.runs == 3
    record(record_property, outcome, scenario="redis unreachable (reset + refused) then back")


# -- Kubernetes API ---------------------------------------------------------------------------


def test_kubernetes_api_errors_and_slowness_are_retried_to_exactly_one_outcome(
        faulty: Stack, kube: FakeKubeAPI, record_property: Any) -> None:
    """429 with Retry-After on create, 500s on reads, 409 on patches, every Deployment read slow: same end."""
    stack = faulty
    kube.inject("POST", r"/pipelineruns$", 429, times=2, headers={"Retry-After": "1"})
    kube.inject("GET", r"/serviceaccounts/", 500, times=2)
    kube.inject("PATCH", r"/pipelineruns/", 409, times=3)
    kube.inject("GET", r"/taskruns$", 503, times=1, headers={"Retry-After": "1"})
    kube.inject("PATCH", r"/deployments/", 500, times=1)
    kube.delay(r"/deployments/", 0.7, method="GET")
    shas = [sha_of(0xB0), sha_of(0xB1), sha_of(0xB2)]
    with TektonSimulator(kube) as tekton, RolloutSimulator(kube):
        deliveries = [stack.push("k0", sha=shas[0]),
                      stack.push("k1", sha=shas[1], ref="refs/heads/b/one"),
                      stack.push("k2", sha=shas[2], ref="refs/heads/b/two")]
        stack.wait("runs created through 429s and 500s", lambda: all(has_run(kube, s) for s in shas), timeout=60)
        names = [run_named(kube, s)["metadata"]["name"] for s in shas]
        for name in names:
            tekton.start("ci", name)
        tekton.succeed("ci", names[0])
        tekton.succeed("ci", names[1])
        tekton.fail("ci", names[2], task="build")
        outcome = settle(stack, deliveries, timeout=90, allow_rejected_transitions=True)
    assert kube.unused_faults() == [] and outcome.runs == 3
    assert stack.gitlab.states(shas[0], DEPLOY_STATUS)[-1] == "success"
    assert "task build failed" in [c.body for c in stack.gitlab.calls if (c.body or {}).get("state") == "failed"][-1]["description"]
    record(record_property, outcome, scenario="kube 429/500/503/409 + slow reads")


def test_watch_gone_and_cut_streams_still_report_every_run(faulty: Stack, kube: FakeKubeAPI, record_property: Any) -> None:
    """Mid-run the history is compacted and every watch cut (resume -> 410 Gone -> relist), then a watch
    request fails with 500 and the streams are cut again: every run still gets its final status."""
    stack = faulty
    shas = [sha_of(0x90 + i) for i in range(3)]
    with TektonSimulator(kube) as tekton, RolloutSimulator(kube):
        deliveries = [stack.push(f"g{i}", sha=sha, ref=f"refs/heads/b/g{i}") for i, sha in enumerate(shas)]
        stack.wait("runs created", lambda: all(has_run(kube, s) for s in shas))
        names = [run_named(kube, s)["metadata"]["name"] for s in shas]
        stack.wait("the watch is open", lambda: kube.open_watches >= 1)
        kube.delay(r"/pipelineruns$", 1.0, method="GET", times=1)  # the watcher's resume, held while history goes
        kube.cut_watches()
        tekton.start("ci", names[0])
        kube.compact()
        watcher_log = stack.procs["watcher"].log
        stack.wait("410 Gone met and the namespace listed again", lambda: "watch_expired" in watcher_log.read_text())
        stack.wait("running reported after the relist", lambda: stack.gitlab.states(shas[0], STATUS)[-1:] == ["running"])
        kube.inject("GET", r"/pipelineruns$", 500, times=1)
        kube.cut_watches()
        tekton.succeed("ci", names[0])
        tekton.fail("ci", names[1], task="build")
        tekton.succeed("ci", names[2])
        stack.wait("the 500 was met", lambda: kube.unused_faults() == [])
        kube.cut_watches()
        outcome = settle(stack, deliveries, timeout=60)
    assert outcome.runs == 3
    record(record_property, outcome, scenario="watch 410 Gone + cut streams + 500 on watch")


# -- Git host ---------------------------------------------------------------------------------


def test_git_host_errors_are_retried_and_statuses_stay_in_order(faulty: Stack, kube: FakeKubeAPI,
                                                                 record_property: Any) -> None:
    """GitLab answers 5xx bursts, 429 Retry-After, 409 'another update in progress', and a 502 after it
    applied a status (so the retry meets 'Cannot transition'): every commit ends right, in order."""
    stack, gitlab = faulty, faulty.gitlab
    gitlab.inject_lost_answer(502)
    gitlab.inject(500, times=3)
    gitlab.inject(429, headers={"Retry-After": "1"})
    gitlab.inject(409)
    gitlab.inject(503, times=2)
    shas = [sha_of(0x70), sha_of(0x71)]
    with TektonSimulator(kube, auto_start=0.3, auto_finish=0.8), RolloutSimulator(kube):
        deliveries = [stack.push("h0", sha=shas[0]), stack.push("h1", sha=shas[1], ref="refs/heads/b/h")]
        outcome = settle(stack, deliveries, timeout=90, allow_rejected_transitions=True)
    refused = [c for c in gitlab.calls if c.status >= 400]
    assert gitlab.unused_faults == 0 and len(refused) >= 8
    record(record_property, outcome, scenario="GitLab 5xx/429/409/lost answer", refused_answers=len(refused))


def test_git_host_unreachable_for_a_while_statuses_arrive_in_order_when_it_is_back(
        faulty: Stack, kube: FakeKubeAPI, record_property: Any) -> None:
    """GitLab refuses connections while two runs are created, start and end; when it is back every status
    arrives, in order, and the deploy that was waiting for its `running` status goes ahead."""
    stack, gitlab = faulty, faulty.gitlab
    shas = [sha_of(0x60), sha_of(0x61)]
    with TektonSimulator(kube, auto_start=0.2, auto_finish=0.5), RolloutSimulator(kube):
        gitlab.down(refuse=True)
        deliveries = [stack.push("d0", sha=shas[0]), stack.push("d1", sha=shas[1], ref="refs/heads/b/d")]
        stack.wait("both runs ended while GitLab was down", lambda: all(
            has_run(kube, s) and condition(run_named(kube, s)).get("status") == "True" for s in shas), timeout=30)
        assert gitlab.calls == []  # the deploy waits too: its `deploy/staging running` is posted before the patch
        gitlab.up()
        outcome = settle(stack, deliveries, timeout=90)
    assert outcome.runs == 2 and outcome.deploys == 1
    record(record_property, outcome, scenario="GitLab unreachable while runs start and end")


# -- duplicates and superseding pushes --------------------------------------------------------


def test_duplicate_storm_and_resends_make_one_run(faulty: Stack, kube: FakeKubeAPI, record_property: Any) -> None:
    """The same delivery 100 times at once: one 202, 99 duplicates naming it. GitLab's later resend
    (same Idempotency-Key) is a duplicate too, and so is the same push from a second hook (new key):
    the push fingerprint decides, not unsigned headers (issue 11)."""
    stack = faulty
    sha = sha_of(0x50)

    async def storm() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=stack.url, limits=httpx.Limits(max_connections=100), timeout=30) as client:
            return await asyncio.gather(*[client.post("/hooks/gitlab", content=push_body(sha=sha), headers=hook_headers("storm"))
                                          for _ in range(100)])

    with TektonSimulator(kube, auto_start=0.2, auto_finish=0.5), RolloutSimulator(kube):
        stack.origin.move("main", sha)  # the push the 100 copies announce
        answers = asyncio.run(storm())
        assert sorted(r.status_code for r in answers) == [200] * 99 + [202]
        [first] = {r.json()["delivery_id"] for r in answers}
        second_hook = stack.push("group-hook-copy", sha=sha, expect=200)
        assert second_hook == first
        settle(stack, [first, second_hook])
        resend = stack.post("storm", sha=sha)
        assert (resend.status_code, resend.json()["decision"], resend.json()["delivery_id"]) == (200, "duplicate", first)
        outcome = settle(stack, [first, second_hook], again_after=0)
    assert outcome.runs == 1 and outcome.deploys == 1
    assert stack.delivery(first)["duplicates"] == 101
    record(record_property, outcome, scenario="duplicate storm x100 + resend + second hook", answers=len(answers) + 2)


def test_burst_of_superseding_pushes_runs_only_the_newest(faulty: Stack, kube: FakeKubeAPI, record_property: Any) -> None:
    """Eight pushes to main in a burst: the newest runs to the end and deploys; the seven older runs are
    canceled and their commits say 'superseded by'."""
    stack = faulty
    shas = [sha_of(0x40 + i) for i in range(8)]
    with TektonSimulator(kube, auto_start=0.2, auto_finish=4.0), RolloutSimulator(kube):
        deliveries = []
        for i, sha in enumerate(shas):
            deliveries.append(stack.push(f"burst-{i}", sha=sha, before=shas[i - 1] if i else "0" * 40))
        outcome = settle(stack, deliveries, timeout=60)
    finals = [stack.gitlab.states(sha, STATUS)[-1] for sha in shas]
    assert finals == ["canceled"] * 7 + ["success"]
    assert stack.image() == deployed_image(shas[-1]) and outcome.deploys == 1
    record(record_property, outcome, scenario="burst of 8 superseding pushes")
