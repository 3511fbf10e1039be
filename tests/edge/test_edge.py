"""The webhook edge against a real redis-server: answers, records, and what is never stored."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from starlette.testclient import TestClient

from broker.adapters.redis_store import INDEX_KEY
from tests.support import web_app
from tests.support import ROUTING, SECRETS, RedisServer, make_settings, payload

API_TOKEN = "api-token-for-the-edge-tests"
GITLAB_PUSH = "gitlab/push-branch-update.json"
PUSH_HEADERS = {"X-Gitlab-Event": "Push Hook", "X-Gitlab-Token": "topsecret", "Content-Type": "application/json"}


def client_for(tmp_path: Path, redis_url: str, **environ: str) -> TestClient:
    settings = make_settings(tmp_path, environ={"CIBROKER_REDIS_URL": redis_url, "CIBROKER_API_TOKENS": API_TOKEN, **environ})
    return TestClient(web_app(settings))


@pytest.fixture
def client(tmp_path: Path, redis_url: str) -> Iterator[TestClient]:
    with client_for(tmp_path, redis_url) as c:
        yield c


@pytest.fixture
def db(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


def push(client: TestClient, body: bytes = b"", host: str = "gitlab", **headers: str) -> Any:
    return client.post(f"/hooks/{host}", content=body or payload(GITLAB_PUSH), headers={**PUSH_HEADERS, **headers})


def queued(db: redis.Redis) -> list[dict[str, Any]]:
    return [json.loads(m) for m in db.lrange("cibroker", 0, -1)]


def api(client: TestClient, path: str, token: str | None = API_TOKEN) -> Any:
    return client.get(path, headers={"Authorization": f"Bearer {token}"} if token else {})


def test_accepted_push_is_stored_and_queued_before_the_202(client: TestClient, db: redis.Redis) -> None:
    """A new push answers 202 with its delivery id; record and Celery message are already in Redis."""
    r = push(client, **{"Idempotency-Key": "key-1"})
    assert r.status_code == 202, r.text
    answer = r.json()
    assert answer["decision"] == "accepted"
    assert answer["sha"] == "2adc9465c4edfc33834e173fe89436a7cb899a1d"
    assert answer["routes"] == ["everything-gitlab"]
    messages = queued(db)
    assert len(messages) == 1
    assert messages[0]["headers"]["id"] == answer["delivery_id"]
    assert messages[0]["headers"]["task"] == "cibroker.process_delivery"
    stored = api(client, f"/api/deliveries/{answer['delivery_id']}").json()
    assert stored["decision"] == "accepted" and stored["state"] == "queued"
    assert stored["push"]["repo"] == "gitlab-org/hello-world"
    assert stored["identity"]["source"] == "push fingerprint"  # unsigned headers never decide it (issue 11)
    assert stored["identity"]["value"] == stored["fingerprint"]
    assert stored["headers"]["idempotency-key"] == "key-1"  # kept for people
    assert stored["authenticated_by"] == "X-Gitlab-Token"
    assert [e["step"] for e in stored["log"]] == ["received", "authenticated", "deduplicated", "matched", "queued"]


def test_second_copy_of_a_delivery_is_a_duplicate_and_not_queued(client: TestClient, db: redis.Redis) -> None:
    """The same push twice: 202 then 200 duplicate naming the first delivery; one message."""
    first = push(client, **{"Idempotency-Key": "same"}).json()
    second = push(client, **{"Idempotency-Key": "same"})
    assert second.status_code == 200
    assert second.json()["decision"] == "duplicate"
    assert second.json()["delivery_id"] == first["delivery_id"]
    assert second.json()["reason"] == f"already received as delivery {first['delivery_id']} (same push fingerprint)"
    assert len(queued(db)) == 1
    stored = api(client, f"/api/deliveries/{first['delivery_id']}").json()
    assert stored["duplicates"] == 1
    assert stored["log"][-1]["step"] == "duplicate"
    assert "by push fingerprint" in stored["log"][-1]["detail"]


def test_a_replay_with_new_unsigned_delivery_headers_is_still_a_duplicate(client: TestClient, db: redis.Redis) -> None:
    """Issue 11 gap 2: a new Idempotency-Key / event UUIDs (unsigned) do not make a replayed push new."""
    first = push(client, **{"Idempotency-Key": "original", "X-Gitlab-Event-UUID": "u1", "X-Gitlab-Webhook-UUID": "w1"}).json()
    for n in range(3):
        again = push(client, **{"Idempotency-Key": f"replay-{n}", "X-Gitlab-Event-UUID": f"u-{n}", "X-Gitlab-Webhook-UUID": f"w-{n}"})
        assert (again.status_code, again.json()["decision"], again.json()["delivery_id"]) == (200, "duplicate", first["delivery_id"])
    assert len(queued(db)) == 1


def test_without_delivery_headers_the_push_fingerprint_deduplicates(client: TestClient, db: redis.Redis) -> None:
    """No Idempotency-Key or webhook ids: (project, ref, before, after) identifies the delivery."""
    assert push(client).status_code == 202
    assert push(client).json()["decision"] == "duplicate"
    other = json.loads(payload(GITLAB_PUSH))
    other["before"] = "1" * 40
    assert push(client, json.dumps(other).encode()).status_code == 202
    assert len(queued(db)) == 2


def test_deliveries_of_one_host_do_not_deduplicate_another_hosts(tmp_path: Path, redis_url: str, db: redis.Redis) -> None:
    """Dedup keys are per host: the same push (and the same Idempotency-Key) on two hosts is two deliveries."""
    routing = ROUTING
    routing = routing.replace("  gitlab-signed:", "  gitlab-two:\n    kind: gitlab\n    api_url: https://gitlab.com/api/v4\n    webhook_secrets: [{env: GITLAB_WEBHOOK_SECRET}]\n  gitlab-signed:")
    routing += "  - {name: two, host: gitlab-two, repo: '**', events: {branches: ['**']}, pipeline: p, image: i}\n"
    settings = make_settings(tmp_path, routing=routing, environ={"CIBROKER_REDIS_URL": redis_url})
    with TestClient(web_app(settings)) as c:
        assert push(c, **{"Idempotency-Key": "k"}).status_code == 202
        assert push(c, host="gitlab-two", **{"Idempotency-Key": "k"}).status_code == 202
    assert len(queued(db)) == 2


@pytest.mark.parametrize(
    ("fixture", "event", "code"),
    [
        ("gitlab/push-branch-deleted.json", "Push Hook", "branch_deleted"),
        ("gitlab/tag-push-deleted.json", "Tag Push Hook", "tag_deleted"),
        ("gitlab/merge-request-opened.json", "Merge Request Hook", "event_not_built"),
        ("gitlab/note-commit.json", "Note Hook", "event_not_built"),
        ("gitlab/pipeline-hook.json", "Pipeline Hook", "event_not_built"),
        ("gitlab/system-hook-push.json", "System Hook", "system_hook"),
    ],
)
def test_events_we_do_not_build_are_answered_200_ignored_with_a_reason(
    client: TestClient, db: redis.Redis, fixture: str, event: str, code: str
) -> None:
    """Deletions and non-push events: 200 ignored (never 4xx/5xx), recorded, nothing queued."""
    r = push(client, payload(fixture), **{"X-Gitlab-Event": event})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["decision"] == "ignored" and answer["code"] == code and answer["reason"]
    assert queued(db) == []
    stored = api(client, f"/api/deliveries/{answer['delivery_id']}").json()
    assert stored["decision"] == "ignored" and stored["code"] == code
    assert stored["log"][-1]["step"] == "ignored"


def test_push_with_skip_ci_is_ignored(client: TestClient, db: redis.Redis) -> None:
    """[skip ci] in the head commit message: 200 ignored code skip_ci, nothing queued."""
    body = json.loads(payload(GITLAB_PUSH))
    body["commits"][0]["message"] = "Fix typo [skip ci]\n"
    r = push(client, json.dumps(body).encode())
    assert (r.status_code, r.json()["code"]) == (200, "skip_ci")
    assert queued(db) == []


def test_push_no_route_takes_is_ignored_naming_repo_and_ref(tmp_path: Path, redis_url: str, db: redis.Redis) -> None:
    """A repo no route matches: 200 ignored code no_route, the reason names repo and branch."""
    routing = """
hosts:
  gitlab: {kind: gitlab, api_url: https://gitlab.com/api/v4, webhook_secrets: [{env: GITLAB_WEBHOOK_SECRET}]}
routes:
  - {name: shop, host: gitlab, repo: acme/*, events: {branches: [main]}, pipeline: p, image: i}
"""
    with TestClient(web_app(make_settings(tmp_path, routing=routing, environ={"CIBROKER_REDIS_URL": redis_url}))) as c:
        r = push(c)
    assert r.status_code == 200
    assert r.json()["code"] == "no_route"
    assert "gitlab-org/hello-world" in r.json()["reason"] and "master" in r.json()["reason"]
    assert queued(db) == []


@pytest.mark.parametrize(
    ("headers", "status", "error"),
    [
        ({"X-Gitlab-Token": ""}, 403, "invalid X-Gitlab-Token"),
        ({"X-Gitlab-Token": "wrong"}, 403, "invalid X-Gitlab-Token"),
        ({"X-Gitlab-Token": "IsWishesWereHorsesWedAllBeEatingSteak!"}, 403, "invalid X-Gitlab-Token"),
    ],
)
def test_bad_gitlab_token_is_refused_and_nothing_stored(
    client: TestClient, db: redis.Redis, headers: dict[str, str], status: int, error: str
) -> None:
    """A wrong token (including another host's secret) is 403 with a reason; Redis stays empty."""
    r = push(client, **headers)
    assert (r.status_code, r.json()) == (status, {"error": error})
    assert db.dbsize() == 0


def test_missing_gitlab_token_is_401(client: TestClient, db: redis.Redis) -> None:
    r = client.post("/hooks/gitlab", content=payload(GITLAB_PUSH), headers={"X-Gitlab-Event": "Push Hook"})
    assert (r.status_code, r.json()) == (401, {"error": "missing X-Gitlab-Token"})
    assert db.dbsize() == 0


def test_previous_secret_still_authenticates_during_rotation(client: TestClient) -> None:
    """Both configured secrets are accepted, so a secret can be rotated without dropping hooks."""
    assert push(client, **{"X-Gitlab-Token": SECRETS["GITLAB_WEBHOOK_SECRET_PREVIOUS"]}).status_code == 202


def test_authentication_comes_before_parsing(client: TestClient) -> None:
    """An unauthenticated body is refused for its credentials, not its syntax."""
    r = push(client, b"{not json", **{"X-Gitlab-Token": "wrong"})
    assert r.status_code == 403


def test_unparseable_body_is_400(client: TestClient, db: redis.Redis) -> None:
    r = push(client, b"{not json")
    assert r.status_code == 400
    assert r.json()["error"].startswith("body is not valid JSON")
    assert db.dbsize() == 0


def test_malformed_push_is_400_naming_the_field(client: TestClient) -> None:
    body = json.loads(payload(GITLAB_PUSH))
    del body["ref"]
    r = push(client, json.dumps(body).encode())
    assert (r.status_code, r.json()) == (400, {"error": "payload field 'ref' is missing"})


def test_unsupported_content_type_is_415(client: TestClient) -> None:
    r = push(client, **{"Content-Type": "text/plain"})
    assert r.status_code == 415
    assert "text/plain" in r.json()["error"]


def test_body_over_the_limit_is_413(tmp_path: Path, redis_url: str, db: redis.Redis) -> None:
    """Above CIBROKER_MAX_BODY_BYTES: 413, by Content-Length or by counting a chunked body."""
    with client_for(tmp_path, redis_url, CIBROKER_MAX_BODY_BYTES="2048") as c:
        big = payload("gitlab/push-14-commits-real.json")
        assert len(big) > 2048
        r = push(c, big)
        assert r.status_code == 413 and "2048" in r.json()["error"]
        chunked = c.post("/hooks/gitlab", content=iter([big[:1500], big[1500:]]), headers=PUSH_HEADERS)
        assert chunked.status_code == 413
    assert db.dbsize() == 0


def test_unknown_host_is_404(client: TestClient) -> None:
    r = push(client, host="bitbucket")
    assert r.status_code == 404 and "bitbucket" in r.json()["error"]


def test_github_push_form_encoded_is_accepted(client: TestClient, db: redis.Redis) -> None:
    """GitHub's form-encoded `payload=` body is verified over the raw bytes and accepted."""
    import hashlib
    import hmac
    from urllib.parse import urlencode

    body = urlencode({"payload": payload("github/push-branch-update-signed.json").decode()}).encode()
    sig = "sha256=" + hmac.new(b"topsecret", body, hashlib.sha256).hexdigest()
    r = client.post("/hooks/github", content=body, headers={
        "X-GitHub-Event": "push", "X-GitHub-Delivery": "d-1", "X-Hub-Signature-256": sig,
        "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 202, r.text
    assert r.json()["sha"].startswith("199eddf4")


def test_github_ping_is_ignored_with_reason(client: TestClient) -> None:
    import hashlib
    import hmac

    body = payload("github/ping.json")
    sig = "sha256=" + hmac.new(b"topsecret", body, hashlib.sha256).hexdigest()
    r = client.post("/hooks/github", content=body, headers={"X-GitHub-Event": "ping", "X-Hub-Signature-256": sig,
                                                           "Content-Type": "application/json"})
    assert (r.status_code, r.json()["code"]) == (200, "ping")


def test_delivery_api_requires_a_bearer_token(client: TestClient) -> None:
    delivery_id = push(client).json()["delivery_id"]
    assert api(client, f"/api/deliveries/{delivery_id}", token=None).status_code == 401
    assert api(client, f"/api/deliveries/{delivery_id}", token="wrong").status_code == 403
    assert api(client, f"/api/deliveries/{delivery_id}").status_code == 200


def test_delivery_api_answers_404_for_unknown_and_malformed_ids(client: TestClient) -> None:
    assert api(client, "/api/deliveries/" + "0" * 26).status_code == 404
    assert api(client, "/api/deliveries/..%2F..%2Fetc").status_code == 404


def test_delivery_api_without_configured_tokens_says_how_to_enable_it(tmp_path: Path, redis_url: str) -> None:
    settings = make_settings(tmp_path, environ={"CIBROKER_REDIS_URL": redis_url})
    with TestClient(web_app(settings)) as c:
        r = c.get("/api/deliveries/" + "0" * 26)
    assert r.status_code == 401 and "CIBROKER_API_TOKENS" in r.json()["error"]


def test_stored_records_never_hold_secrets_or_bodies(client: TestClient, db: redis.Redis) -> None:
    """Everything written to Redis is free of webhook secrets and of the raw body."""
    push(client, **{"Idempotency-Key": "k1"})
    push(client, payload("gitlab/push-branch-deleted.json"))
    dump = b""
    for key in db.scan_iter():
        kind = db.type(key)
        if kind == b"hash":
            dump += b"".join(db.hgetall(key).values())
        elif kind == b"list":
            dump += b"".join(db.lrange(key, 0, -1))
        elif kind == b"string":
            dump += db.get(key) or b""
    assert dump
    for secret in SECRETS.values():
        assert secret.encode() not in dump
    assert b"noreply@gitlab.com" not in dump  # author e-mails are in the body, never in a record
    assert b"README.md" not in dump  # nor the file lists


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_redis_down_answers_503_and_nothing_is_half_accepted(tmp_path: Path, fresh_redis: RedisServer) -> None:
    """With Redis stopped: 503 JSON for a push, 200 ignored still for a deletion, readyz 503;
    after Redis is back (same AOF) nothing from the outage exists and the resend is accepted."""
    with client_for(tmp_path, fresh_redis.url, CIBROKER_REDIS_TIMEOUT_SECONDS="0.5") as c:
        fresh_redis.stop()
        r = push(c, **{"Idempotency-Key": "during-outage"})
        assert r.status_code == 503 and "redis" in r.json()["error"]
        ignored = push(c, payload("gitlab/push-branch-deleted.json"))
        assert ignored.status_code == 200 and "delivery_id" not in ignored.json()
        assert c.get("/readyz").status_code == 503
        fresh_redis.start()
        db = fresh_redis.client()
        assert db.dbsize() == 0
        assert push(c, **{"Idempotency-Key": "during-outage"}).status_code == 202
        assert db.llen("cibroker") == 1 and db.zcard(INDEX_KEY) == 1
        db.close()


def test_get_on_a_hook_is_405(client: TestClient) -> None:
    assert client.get("/hooks/gitlab").status_code == 405


def test_the_edges_message_template_writes_exactly_what_task_message_writes() -> None:
    """The hot path's pre-cut Celery message equals task_message's bytes but for the random delivery tag."""
    from broker.adapters.celery_wire import MessageTemplate, task_message

    template = MessageTemplate(task="cibroker.process_delivery", queue="cibroker", origin="cibroker-web@host:1")
    for delivery_id in ("01a2018ebee46132f6ae6571c7", "0" * 26):
        made = template.render(delivery_id)
        expected = task_message(task="cibroker.process_delivery", task_id=delivery_id, args=[delivery_id], queue="cibroker",
                                origin="cibroker-web@host:1")
        tags = [json.loads(m)["properties"]["delivery_tag"] for m in (made, expected)]
        assert made.replace(tags[0], "<tag>") == expected.replace(tags[1], "<tag>")
    assert len({json.loads(template.render("1" * 26))["properties"]["delivery_tag"] for _ in range(50)}) == 50
