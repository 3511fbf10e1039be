"""End to end with real processes: `cibroker serve` (uvicorn), `cibroker worker` (Celery), redis-server."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.support import CIBROKER, ROUTING, Process, base_env, free_port, payload, wait_healthy

pytestmark = pytest.mark.e2e
PUSH_HEADERS = {"X-Gitlab-Event": "Push Hook", "X-Gitlab-Token": "topsecret", "Content-Type": "application/json"}


@pytest.fixture
def routing_file(tmp_path: Path) -> Path:
    file = tmp_path / "routing.yaml"
    file.write_text(ROUTING)
    return file


@pytest.fixture
def server(tmp_path: Path, redis_url: str, routing_file: Path) -> Iterator[str]:
    port = free_port()
    proc = Process(["serve", "--config", str(routing_file), "--port", str(port)],
                   env=base_env(tmp_path, CIBROKER_REDIS_URL=redis_url, CIBROKER_API_TOKENS="e2e-test-token-at-least-24-chars"), cwd=tmp_path,
                   log=tmp_path / "serve.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield url
    finally:
        proc.stop()


def test_fifty_concurrent_copies_of_one_delivery_make_one_accept(server: str, redis_url: str) -> None:
    """50 simultaneous copies of one delivery over real HTTP: exactly 1 accepted, 49 duplicates, 1 task."""
    body = payload("gitlab/push-branch-update.json")

    async def storm() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(base_url=server, limits=limits, timeout=10) as client:
            return await asyncio.gather(*[
                client.post("/hooks/gitlab", content=body, headers={**PUSH_HEADERS, "Idempotency-Key": "storm-1"})
                for _ in range(50)
            ])

    answers = asyncio.run(storm())
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [200] * 49 + [202]
    ids = {r.json()["delivery_id"] for r in answers}
    assert len(ids) == 1
    assert sorted(r.json()["decision"] for r in answers) == ["accepted"] + ["duplicate"] * 49
    db = redis.Redis.from_url(redis_url)
    assert db.llen("cibroker") == 1
    record = httpx.get(f"{server}/api/deliveries/{ids.pop()}", headers={"Authorization": "Bearer e2e-test-token-at-least-24-chars"}).json()
    assert record["duplicates"] == 49


def test_worker_refuses_to_start_without_a_cluster(tmp_path: Path, redis_url: str, routing_file: Path) -> None:
    """No KUBECONFIG and not in a pod: `cibroker worker` exits 2 with one clear line, instead of failing every task."""
    kubeconfig = tmp_path / "missing-kubeconfig"
    result = subprocess.run([CIBROKER, "worker", "--config", str(routing_file)], cwd=tmp_path, capture_output=True, text=True,
                            env=base_env(tmp_path, CIBROKER_REDIS_URL=redis_url, KUBECONFIG=str(kubeconfig)), timeout=60)
    assert result.returncode == 2
    assert "cibroker: no Kubernetes configuration (KUBECONFIG or in-cluster)" in result.stderr
    assert "Traceback" not in result.stderr


def test_embedded_defaults_say_so_first_and_keep_deliveries_across_a_restart(tmp_path: Path) -> None:
    """No routing file, no CIBROKER_REDIS_URL: the first log line names the embedded redis-server;
    an accepted delivery is still readable after the broker (and its redis child) restart."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in base_env(tmp_path).items() if not k.endswith("WEBHOOK_SECRET")}

    def start() -> Process:
        proc = Process(["serve", "--port", str(port)], env=env, cwd=tmp_path, log=tmp_path / f"serve-{time.monotonic_ns()}.log")
        wait_healthy(url, proc)
        return proc

    first = start()
    try:
        opening = first.lines()[0]
        assert opening["event"] == "web_starting"
        assert "embedded redis-server" in opening["store"] and opening["config"] == "<embedded defaults>"
        secret_file = tmp_path / "state" / "webhook-secret"
        assert oct(secret_file.stat().st_mode & 0o777) == "0o600"
        secret = secret_file.read_text().strip()
        answer = httpx.post(f"{url}/hooks/gitlab", content=payload("gitlab/push-branch-update.json"),
                            headers={**PUSH_HEADERS, "X-Gitlab-Token": secret})
        assert answer.status_code == 202, answer.text
        delivery_id = answer.json()["delivery_id"]
        assert all(secret not in line for line in first.log.read_text().splitlines())
    finally:
        first.stop()
    from broker.adapters.embedded_redis import _answers

    deadline = time.monotonic() + 10
    while _answers(tmp_path / "state" / "redis.sock"):  # the child went down with the broker
        assert time.monotonic() < deadline, "the embedded redis-server outlived the broker"
        time.sleep(0.05)
    second = start()
    try:
        again = httpx.get(f"{url}/api/deliveries/{delivery_id}")
        assert again.status_code == 200
        assert again.json()["decision"] == "accepted"
    finally:
        second.stop()


def test_serve_refuses_to_start_on_a_broken_routing_file(tmp_path: Path) -> None:
    """A bad routing file stops start-up with one precise line per problem and exit code 2."""
    bad = tmp_path / "routing.yaml"
    bad.write_text("hosts:\n  gitlab: {kind: gitlab, api_url: https://x, webhook_secrets: [{env: NOPE}]}\nroutes:\n  - {name: a, host: gitlab, repo: x/y, evnts: {}}\n")
    result = subprocess.run([CIBROKER, "serve", "--config", str(bad)], env=base_env(tmp_path), cwd=tmp_path,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert f"{bad}: routes[0].evnts: Extra inputs are not permitted" in result.stderr
    assert "Traceback" not in result.stderr


def test_without_a_redis_server_binary_the_fallback_works_and_says_it_is_not_durable(tmp_path: Path) -> None:
    """No redis-server on PATH and no CIBROKER_REDIS_URL: in-memory fakeredis, announced as NOT durable."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**base_env(tmp_path), "PATH": str(tmp_path / "empty-bin")}
    env = {k: v for k, v in env.items() if not k.endswith("WEBHOOK_SECRET")}
    proc = Process(["serve", "--port", str(port)], env=env, cwd=tmp_path, log=tmp_path / "serve.log")
    try:
        wait_healthy(url, proc)
        opening = proc.lines()[0]
        assert "fakeredis" in opening["store"] and "NOT durable" in opening["store"]
        secret = (tmp_path / "state" / "webhook-secret").read_text().strip()
        headers = {**PUSH_HEADERS, "X-Gitlab-Token": secret}
        body = payload("gitlab/push-branch-update.json")
        assert httpx.post(f"{url}/hooks/gitlab", content=body, headers=headers).status_code == 202
        assert httpx.post(f"{url}/hooks/gitlab", content=body, headers=headers).json()["decision"] == "duplicate"
    finally:
        proc.stop()
