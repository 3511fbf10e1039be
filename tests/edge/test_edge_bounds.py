"""Issue 11, the webhook edge's gaps, each closed and shown here as an attacker would try it.

Through the real ASGI app (`create_app`) and a real redis-server; the socket-level ones (slow
headers, `Expect`-less 413, the in-flight cap, a body never read for a wrong token) against a real
`cibroker serve` (uvicorn with the options the command sets), spoken to over raw sockets and
Python's urllib (which, like GitLab's Ruby Net::HTTP, sends a body without `Expect: 100-continue`).

1. a secret speaks for its repos only (route-scoped secrets; project URL on the host, naming the repo)
2. replays never run again (signed webhook-id and the push fingerprint, whatever unsigned headers say)
3. bounded before authentication (token before body, closed metrics labels, header deadline and size,
   bodies in flight capped)
4. a client without `Expect` reads its 413
5. embedded defaults: one secret per host kind; tokenless API only on loopback names
6. API tokens: a failure limiter (the minimum length is in test_config.py)
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from starlette.testclient import TestClient

from broker.edge.api import FailureLimiter
from tests.support import web_app
from config.settings import load_settings
from tests.support import ROUTING, SECRETS, Process, base_env, free_port, make_settings, payload, wait_healthy

PUSH = "gitlab/push-branch-update.json"  # gitlab-org/hello-world on https://gitlab.com
HEADERS = {"X-Gitlab-Event": "Push Hook", "Content-Type": "application/json"}
API_TOKEN = "bounds-test-api-token-0123456789"
SCOPED = """
hosts:
  gitlab:
    kind: gitlab
    api_url: https://gitlab.com/api/v4
    webhook_secrets: [{env: GROUP_HOOK_SECRET}]
  projects:
    kind: gitlab
    api_url: https://gitlab.com/api/v4
routes:
  - {name: hello, host: projects, repo: gitlab-org/hello-world, events: {branches: ['**']}, pipeline: p, image: i,
     webhook_secrets: [{env: HELLO_HOOK_SECRET}]}
  - {name: shop, host: projects, repo: acme/shop, events: {branches: ['**']}, pipeline: p, image: i,
     webhook_secrets: [{env: SHOP_HOOK_SECRET}]}
  - {name: own-secret, host: gitlab, repo: "gitlab-org/*", events: {branches: ['**']}, pipeline: p, image: i,
     webhook_secrets: [{env: OWN_ROUTE_SECRET}]}
  - {name: group-only, host: gitlab, repo: "gitlab-org/*", events: {branches: ['**']}, pipeline: p, image: i}
"""
SCOPED_SECRETS = {"GROUP_HOOK_SECRET": "group-hook-secret", "HELLO_HOOK_SECRET": "hello-project-secret",
                  "SHOP_HOOK_SECRET": "shop-project-secret", "OWN_ROUTE_SECRET": "own-route-secret"}


@pytest.fixture
def db(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def body_for(repo: str = "gitlab-org/hello-world", *, web: str = "https://gitlab.com", url: str | None = None,
             before: str | None = None) -> bytes:
    data = json.loads(payload(PUSH))
    data["project"]["path_with_namespace"] = repo
    data["project"]["web_url"] = url if url is not None else f"{web}/{repo}"
    if before is not None:
        data["before"] = before
    return json.dumps(data).encode()


def app_client(tmp_path: Path, redis_url: str, *, routing: str | None = None, **environ: str) -> TestClient:
    env = {"CIBROKER_REDIS_URL": redis_url, "CIBROKER_API_TOKENS": API_TOKEN, **SCOPED_SECRETS, **environ}
    settings = make_settings(tmp_path, environ=env) if routing is None else make_settings(tmp_path, routing=routing, environ=env)
    return TestClient(web_app(settings))


# -- 1. a secret speaks for its repos only --------------------------------------------------------


def test_a_route_scoped_secret_accepts_only_its_own_route_and_repo(tmp_path: Path, redis_url: str, db: redis.Redis) -> None:
    """A project hook's secret builds its project; used for another routed repo it is refused (403) naming why."""
    with app_client(tmp_path, redis_url, routing=SCOPED) as c:
        ok = c.post("/hooks/projects", content=body_for(), headers={**HEADERS, "X-Gitlab-Token": "hello-project-secret"})
        assert ok.status_code == 202 and ok.json()["routes"] == ["hello"], ok.text
        stored = c.get(f"/api/deliveries/{ok.json()['delivery_id']}", headers={"Authorization": f"Bearer {API_TOKEN}"}).json()
        assert stored["authenticated_by"] == "X-Gitlab-Token (route hello)"
        # The shop maintainer knows shop's secret and sends a push "for" acme/shop's neighbour.
        stolen = c.post("/hooks/projects", content=body_for(before="1" * 40),
                        headers={**HEADERS, "X-Gitlab-Token": "shop-project-secret"})
        assert stolen.status_code == 403
        assert stolen.json()["error"] == ("the secret that verified this delivery is route shop's, which does not take "
                                          "repo 'gitlab-org/hello-world'; refused")
        assert c.post("/hooks/projects", content=body_for(), headers={**HEADERS, "X-Gitlab-Token": "nope"}).status_code == 403
        assert c.post("/hooks/projects", content=body_for(), headers=HEADERS).status_code == 401
    assert db.llen("cibroker") == 1


def test_a_host_secret_reaches_every_route_and_a_route_secret_only_its_own(tmp_path: Path, redis_url: str) -> None:
    """On a host with both: the group hook's (host) secret matches all routes, a route's secret only that route."""
    with app_client(tmp_path, redis_url, routing=SCOPED) as c:
        group = c.post("/hooks/gitlab", content=body_for(), headers={**HEADERS, "X-Gitlab-Token": "group-hook-secret"})
        assert group.status_code == 202 and group.json()["routes"] == ["own-secret", "group-only"]
        own = c.post("/hooks/gitlab", content=body_for(before="2" * 40), headers={**HEADERS, "X-Gitlab-Token": "own-route-secret"})
        assert own.status_code == 202 and own.json()["routes"] == ["own-secret"]


def test_a_second_hook_for_the_same_push_still_reaches_the_routes_the_first_could_not(tmp_path: Path, redis_url: str) -> None:
    """Project hook first (route own-secret), group hook second: the group hook is new for group-only; a third copy is not."""
    with app_client(tmp_path, redis_url, routing=SCOPED) as c:
        first = c.post("/hooks/gitlab", content=body_for(), headers={**HEADERS, "X-Gitlab-Token": "own-route-secret"})
        assert first.json()["routes"] == ["own-secret"]
        second = c.post("/hooks/gitlab", content=body_for(), headers={**HEADERS, "X-Gitlab-Token": "group-hook-secret"})
        assert second.status_code == 202 and second.json()["routes"] == ["own-secret", "group-only"]
        for token in ("group-hook-secret", "own-route-secret"):
            again = c.post("/hooks/gitlab", content=body_for(), headers={**HEADERS, "X-Gitlab-Token": token})
            assert again.json()["decision"] == "duplicate", token


@pytest.mark.parametrize(("url", "why"), [
    ("https://gitlab.com/other/repo", "names another project than 'gitlab-org/hello-world'"),
    ("https://gitlab.example.com/gitlab-org/hello-world", "is not on this host (https://gitlab.com)"),
    ("http://gitlab.com/gitlab-org/hello-world", "is not on this host"),
    ("https://gitlab.com:8443/gitlab-org/hello-world", "is not on this host"),
    ("", "is missing"),
])
def test_a_payload_whose_project_url_is_not_its_repo_on_this_host_is_refused(tmp_path: Path, redis_url: str,
                                                                             db: redis.Redis, url: str, why: str) -> None:
    """The issue's example: a push for one repo whose web_url points at another is 403, nothing stored or queued."""
    with app_client(tmp_path, redis_url) as c:
        r = c.post("/hooks/gitlab", content=body_for(url=url), headers={**HEADERS, "X-Gitlab-Token": SECRETS["GITLAB_WEBHOOK_SECRET"]})
    assert r.status_code == 403 and why in r.json()["error"], r.text
    assert db.llen("cibroker") == 0 and db.zcard("cibroker:deliveries") == 0


def test_the_repo_path_compares_case_insensitively(tmp_path: Path, redis_url: str) -> None:
    """GitLab and GitHub treat project paths case-insensitively: Gitlab-Org/Hello-World's URL in lower case passes."""
    with app_client(tmp_path, redis_url) as c:
        r = c.post("/hooks/gitlab", content=body_for("Gitlab-Org/Hello-World", url="https://GITLAB.com/gitlab-org/hello-world"),
                   headers={**HEADERS, "X-Gitlab-Token": SECRETS["GITLAB_WEBHOOK_SECRET"]})
    assert r.status_code == 202, r.text


# -- 2. replays -----------------------------------------------------------------------------------


def signed_headers(body: bytes, *, msg_id: str, now: float | None = None) -> dict[str, str]:
    stamp = str(int(time.time() if now is None else now))
    key = base64.b64decode(SECRETS["GITLAB_SIGNING_SECRET"].removeprefix("whsec_"))
    mac = base64.b64encode(hmac.new(key, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256).digest()).decode()
    return {**HEADERS, "webhook-id": msg_id, "webhook-timestamp": stamp, "webhook-signature": f"v1,{mac}"}


def test_a_signed_delivery_replayed_with_a_new_idempotency_key_is_a_duplicate(tmp_path: Path, redis_url: str,
                                                                               db: redis.Redis) -> None:
    """Issue 11 gap 2: the captured signed request, re-sent with a fresh Idempotency-Key, is answered duplicate."""
    body = body_for(web="https://gitlab.example.com")
    with app_client(tmp_path, redis_url) as c:
        first = c.post("/hooks/gitlab-signed", content=body, headers={**signed_headers(body, msg_id="msg_1"), "Idempotency-Key": "a"})
        assert first.status_code == 202, first.text
        replay = c.post("/hooks/gitlab-signed", content=body, headers={**signed_headers(body, msg_id="msg_1"), "Idempotency-Key": "b"})
        assert replay.json() == {"decision": "duplicate", "delivery_id": first.json()["delivery_id"],
                                 "reason": f"already received as delivery {first.json()['delivery_id']} (same signed delivery id)"}
        # Signed anew under another webhook-id (a resend): the same push, so still a duplicate.
        resent = c.post("/hooks/gitlab-signed", content=body, headers=signed_headers(body, msg_id="msg_2"))
        assert "(same push fingerprint)" in resent.json()["reason"]
        record = c.get(f"/api/deliveries/{first.json()['delivery_id']}", headers={"Authorization": f"Bearer {API_TOKEN}"}).json()
    assert record["identity"] == {"source": "webhook-id", "value": "msg_1"}
    assert [e["detail"] for e in record["log"] if e["step"] == "duplicate"] == [
        "the same delivery arrived again by signed delivery id (1 so far); not run again",
        "the same delivery arrived again by push fingerprint (2 so far); not run again"]
    assert db.llen("cibroker") == 1


def test_a_github_redelivery_with_a_new_delivery_id_is_a_duplicate(tmp_path: Path, redis_url: str, db: redis.Redis) -> None:
    """X-GitHub-Delivery is not signed: a replay under a new one is the same push fingerprint."""
    body = payload("github/push-branch-update-signed.json")
    mac = hmac.new(SECRETS["GITHUB_WEBHOOK_SECRET"].encode(), body, hashlib.sha256).hexdigest()
    headers = {"X-GitHub-Event": "push", "Content-Type": "application/json", "X-Hub-Signature-256": f"sha256={mac}"}
    with app_client(tmp_path, redis_url) as c:
        assert c.post("/hooks/github", content=body, headers={**headers, "X-GitHub-Delivery": "d-1"}).status_code == 202
        again = c.post("/hooks/github", content=body, headers={**headers, "X-GitHub-Delivery": "d-2", "X-GitHub-Hook-ID": "9"})
    assert again.json()["decision"] == "duplicate" and db.llen("cibroker") == 1


# -- 3. bounded before authentication (in the app) ------------------------------------------------


def test_metrics_label_only_known_hosts_and_event_names(tmp_path: Path, redis_url: str) -> None:
    """Issue 11 gap 3: 200 junk event headers on unknown and known hosts add no label values; they count as `other`."""
    with app_client(tmp_path, redis_url) as c:
        before = len(c.get("/metrics").text)
        for n in range(100):
            junk = f"junk-{n}-" + "x" * 2000
            c.post(f"/hooks/nohost-{n}", content=b"{}", headers={"X-Gitlab-Event": junk})
            c.post("/hooks/gitlab", content=b"{}", headers={"X-Gitlab-Event": junk, "X-Gitlab-Token": "wrong"})
        c.post("/hooks/gitlab", content=body_for(), headers={**HEADERS, "X-Gitlab-Token": SECRETS["GITLAB_WEBHOOK_SECRET"]})
        text = c.get("/metrics").text
    assert "junk" not in text and "nohost" not in text
    assert 'cibroker_webhooks_total{decision="rejected",event="other",host="other"} 100.0' in text
    assert 'cibroker_webhooks_total{decision="rejected",event="other",host="gitlab"} 100.0' in text
    assert 'cibroker_webhooks_total{decision="accepted",event="Push Hook",host="gitlab"} 1.0' in text
    assert len([line for line in text.splitlines() if line.startswith("cibroker_webhooks_total{")]) == 3
    assert len(text) - before < 8000  # the three series and two histograms' buckets, not 200 series


def test_a_wrong_gitlab_token_is_answered_without_reading_the_body(tmp_path: Path, redis_url: str) -> None:
    """The token is a header: with `Expect: 100-continue` the app answers 403 and never asks for the body."""
    app = web_app(make_settings(tmp_path, environ={"CIBROKER_REDIS_URL": redis_url}))
    sent: list[dict[str, Any]] = []
    reads = 0

    async def receive() -> dict[str, Any]:
        nonlocal reads
        reads += 1
        return {"type": "http.request", "body": b"x" * 65536, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/hooks/gitlab", "headers": [
        (b"x-gitlab-event", b"Push Hook"), (b"x-gitlab-token", b"wrong"), (b"content-length", b"100000000"),
        (b"expect", b"100-continue")], "query_string": b"", "server": ("127.0.0.1", 8080), "client": ("10.0.0.9", 1234)}
    import asyncio

    asyncio.run(app(scope, receive, send))
    assert reads == 0
    assert sent[0]["status"] == 403 and (b"connection", b"close") in sent[0]["headers"]
    assert json.loads(sent[1]["body"]) == {"error": "invalid X-Gitlab-Token"}


# -- socket level: a real `cibroker serve` ---------------------------------------------------------

MAX_BODY = 65536


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, redis_server: Any) -> Iterator[tuple[str, int]]:
    """`cibroker serve` with a 64 KiB body limit, 2 full-size bodies in flight, 1 s header and body deadlines."""
    tmp = tmp_path_factory.mktemp("served")
    (tmp / "routing.yaml").write_text(ROUTING)
    port = free_port()
    proc = Process(["serve", "--config", str(tmp / "routing.yaml"), "--port", str(port)],
                   env=base_env(tmp, CIBROKER_REDIS_URL=redis_server.url, CIBROKER_MAX_BODY_BYTES=str(MAX_BODY),
                                CIBROKER_MAX_INFLIGHT_WEBHOOKS="2", CIBROKER_HEADER_TIMEOUT_SECONDS="1",
                                CIBROKER_BODY_TIMEOUT_SECONDS="1",
                                CIBROKER_API_TOKENS=API_TOKEN), cwd=tmp, log=tmp / "serve.log")
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        yield "127.0.0.1", port
    finally:
        proc.stop()


def read_answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    sock.settimeout(15)  # a safety net against a hang, not a timing assertion
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def test_a_connection_that_never_finishes_its_headers_is_answered_408_and_closed(served: tuple[str, int]) -> None:
    """Issue 11 gap 3: headers sent slowly (here: never finished) do not hold a connection open indefinitely."""
    with socket.create_connection(served) as sock:
        sock.sendall(b"POST /hooks/gitlab HTTP/1.1\r\nHost: x\r\nX-Gitlab-Event: Push")
        answer = read_answer(sock)
    assert answer.startswith(b"HTTP/1.1 408 ") and b"request headers not received in time" in answer


def test_a_body_that_stops_arriving_is_answered_408_and_closed(served: tuple[str, int]) -> None:
    """Authenticated headers, then half a body and silence: 408 once the body deadline passes, then closed."""
    body = body_for(before="b1" * 20)
    with socket.create_connection(served) as sock:
        sock.sendall(b"POST /hooks/gitlab HTTP/1.1\r\nHost: x\r\nX-Gitlab-Event: Push Hook\r\nX-Gitlab-Token: topsecret\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:50])
        answer = read_answer(sock)
    assert answer.startswith(b"HTTP/1.1 408 ") and b"body not received within 1 s" in answer


def test_oversized_headers_are_refused_431(served: tuple[str, int]) -> None:
    """More than 64 KiB of headers: 431 and closed, before any of it reaches the app."""
    with socket.create_connection(served) as sock:
        sock.sendall(b"POST /hooks/gitlab HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 70000 + b"\r\n")
        answer = read_answer(sock)
    assert answer.startswith(b"HTTP/1.1 431 ")


def test_urllib_without_expect_reads_the_413_for_an_oversized_body(served: tuple[str, int]) -> None:
    """Issue 11 gap 4: urllib sends the whole body without waiting; it gets the 413 and its reason, not a reset."""
    body = body_for() + b" " * (3 * MAX_BODY)
    request = urllib.request.Request(f"http://{served[0]}:{served[1]}/hooks/gitlab", data=body, method="POST",
                                     headers={**HEADERS, "X-Gitlab-Token": SECRETS["GITLAB_WEBHOOK_SECRET"]})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=15)
    with caught.value as answer:  # an HTTPError holds the connection until closed
        assert answer.code == 413
        assert json.loads(answer.read()) == {"error": f"body is larger than the {MAX_BODY}-byte limit"}


def test_a_chunked_oversized_body_without_expect_gets_a_readable_413(served: tuple[str, int]) -> None:
    """No Content-Length (chunked): the limit is found while counting; the rest is drained, the 413 read."""
    with socket.create_connection(served) as sock:
        sock.sendall(b"POST /hooks/gitlab HTTP/1.1\r\nHost: x\r\nX-Gitlab-Event: Push Hook\r\nX-Gitlab-Token: topsecret\r\n"
                     b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 16384
        for _ in range(12):  # 192 KiB, three times the limit
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        sock.sendall(b"0\r\n\r\n")
        answer = read_answer(sock)
    assert answer.startswith(b"HTTP/1.1 413 ") and b"connection: close" in answer.lower()


def test_a_wrong_token_with_a_large_body_and_no_expect_is_read_as_403(served: tuple[str, int]) -> None:
    """Refused on its header, the request's body is still drained, so http.client reads the 403."""
    conn = http.client.HTTPConnection(*served, timeout=15)
    conn.request("POST", "/hooks/gitlab", body=b"{" + b" " * (2 * MAX_BODY) + b"}",
                 headers={**HEADERS, "X-Gitlab-Token": "guess"})
    answer = conn.getresponse()
    assert (answer.status, json.loads(answer.read())) == (403, {"error": "invalid X-Gitlab-Token"})
    conn.close()


def test_with_expect_a_wrong_token_is_refused_before_the_body_is_sent(served: tuple[str, int]) -> None:
    """The server answers 403 instead of `100 Continue`: the client never sends its 100 MB."""
    with socket.create_connection(served) as sock:
        sock.sendall(b"POST /hooks/gitlab HTTP/1.1\r\nHost: x\r\nX-Gitlab-Event: Push Hook\r\nX-Gitlab-Token: guess\r\n"
                     b"Content-Length: 100000000\r\nExpect: 100-continue\r\n\r\n")
        answer = read_answer(sock)
    assert answer.startswith(b"HTTP/1.1 403 ") and b"100 Continue" not in answer


def in_flight(base: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=5).text
    return float(re.search(r"^cibroker_webhooks_in_flight (\S+)$", text, re.M).group(1))


def test_webhooks_beyond_the_in_flight_cap_get_503_with_retry_after(served: tuple[str, int]) -> None:
    """Issue 11 gap 3: two slow near-limit bodies fill the budget (2 x 64 KiB); a third webhook is 503 +
    Retry-After; then all is well.

    A body reserves its Content-Length while it is read, so a burst of small pushes (tests/e2e/test_faults.py's
    storm of 100) never meets the cap; slow large bodies, which cost memory, do."""
    base = f"http://{served[0]}:{served[1]}"
    bodies = [body_for(before=f"{n:040x}") for n in (0xA1, 0xA2)]
    bodies = [b + b" " * (65000 - len(b)) for b in bodies]  # JSON may end in white space
    slow = []
    for body in bodies:
        sock = socket.create_connection(served)
        sock.sendall(b"POST /hooks/gitlab HTTP/1.1\r\nHost: x\r\nX-Gitlab-Event: Push Hook\r\nX-Gitlab-Token: topsecret\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:100])
        slow.append(sock)
    try:
        deadline = time.monotonic() + 15
        while in_flight(base) < 2:  # wait for the event (both handlers reading), not for a fixed time
            assert time.monotonic() < deadline, "the two slow requests never reached the handler"
        third = httpx.post(f"{base}/hooks/gitlab", content=body_for(before="a3" * 20),
                           headers={**HEADERS, "X-Gitlab-Token": SECRETS["GITLAB_WEBHOOK_SECRET"]}, timeout=10)
        assert third.status_code == 503 and third.headers["retry-after"] == "1"
        assert "too many webhook bodies being read here (room for 2 of 65536 bytes)" in third.json()["error"]
        for sock, body in zip(slow, bodies, strict=True):
            sock.sendall(body[100:])
            assert sock.recv(65536).startswith(b"HTTP/1.1 202 ")
    finally:
        for sock in slow:
            sock.close()
    again = httpx.post(f"{base}/hooks/gitlab", content=body_for(before="a3" * 20),
                       headers={**HEADERS, "X-Gitlab-Token": SECRETS["GITLAB_WEBHOOK_SECRET"]}, timeout=10)
    assert again.status_code == 202


# -- 5. embedded defaults -------------------------------------------------------------------------


@pytest.fixture
def embedded(tmp_path: Path, redis_url: str) -> Iterator[TestClient]:
    """The embedded defaults (no routing file, no API token), served as on a laptop: http://127.0.0.1:8080."""
    settings = load_settings({"CIBROKER_STATE_DIR": str(tmp_path / "state"), "CIBROKER_REDIS_URL": redis_url})
    assert settings.embedded_defaults and not settings.env.api_token_names()
    with TestClient(web_app(settings), base_url="http://127.0.0.1:8080") as client:
        yield client


def test_embedded_defaults_refuse_a_github_signature_made_with_the_gitlab_secret(embedded: TestClient, tmp_path: Path) -> None:
    """Issue 11 gap 5: each host kind has its own secret; the GitLab one signs nothing for GitHub."""
    gitlab_secret = (tmp_path / "state" / "webhook-secret").read_text().strip()
    github_secret = (tmp_path / "state" / "github-webhook-secret").read_text().strip()
    body = payload("github/push-branch-update-signed.json")
    for secret, status in ((gitlab_secret, 403), (github_secret, 202)):
        mac = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        r = embedded.post("/hooks/github", content=body, headers={"X-GitHub-Event": "push", "Content-Type": "application/json",
                                                                   "X-Hub-Signature-256": f"sha256={mac}"})
        assert r.status_code == status, r.text


@pytest.mark.parametrize("host", ["127.0.0.1:8080", "localhost:8080", "localhost", "[::1]:8080", "LOCALHOST:8080"])
def test_the_tokenless_api_answers_loopback_host_names(embedded: TestClient, host: str) -> None:
    """On a laptop the API needs no token when asked by a loopback name."""
    assert embedded.get("/api/deliveries", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize("host", ["evil.example:8080", "127.0.0.1.evil.example", "attacker.test", "", "localhost.evil:80"])
def test_a_dns_rebinding_page_cannot_drive_the_tokenless_api(embedded: TestClient, host: str) -> None:
    """A page whose name rebinds to 127.0.0.1 still sends its own Host: refused (403), also for dashboard actions."""
    r = embedded.get("/api/deliveries", headers={"Host": host})
    assert r.status_code == 403 and "loopback" in r.json()["error"]
    assert embedded.post("/api/rerun", json={"repo": "a/b", "sha": "1" * 40}, headers={"Host": host}).status_code == 403


def test_the_tokenless_api_refuses_a_request_that_reached_a_non_loopback_address(tmp_path: Path, redis_url: str) -> None:
    """`serve --host 0.0.0.0` on embedded defaults: a request arriving on the LAN address is refused even with Host: localhost."""
    settings = load_settings({"CIBROKER_STATE_DIR": str(tmp_path / "state"), "CIBROKER_REDIS_URL": redis_url})
    with TestClient(web_app(settings), base_url="http://192.168.1.20:8080") as client:
        r = client.get("/api/deliveries", headers={"Host": "localhost:8080"})
    assert r.status_code == 403


# -- 6. API token guesses -------------------------------------------------------------------------


def test_wrong_api_tokens_are_limited_per_client_with_429_and_retry_after(tmp_path: Path, redis_url: str) -> None:
    """Issue 11 gap 6: after 10 wrong tokens in a minute the address gets 429 (even with the right one); others do not."""
    settings = make_settings(tmp_path, environ={"CIBROKER_REDIS_URL": redis_url, "CIBROKER_API_TOKENS": API_TOKEN})
    app = web_app(settings)
    right = {"Authorization": f"Bearer {API_TOKEN}"}
    other = TestClient(app, client=("198.51.100.2", 4000))  # the same app (started once, by the guesser's client)
    with TestClient(app, client=("203.0.113.7", 4000)) as guesser:
        answers = [guesser.get("/api/deliveries", headers={"Authorization": f"Bearer guess-{n:024d}"}).status_code
                   for n in range(12)]
        assert answers == [403] * 10 + [429] * 2
        limited = guesser.get("/api/deliveries", headers=right)
        assert limited.status_code == 429 and 1 <= int(limited.headers["retry-after"]) <= 60
        assert "too many wrong API tokens" in limited.json()["error"]
        assert other.get("/api/deliveries", headers=right).status_code == 200


def test_the_failure_limiter_forgets_a_client_after_its_minute() -> None:
    """The window is one minute from the first failure; after it the client may try again."""
    now = [1000.0]
    limiter = FailureLimiter(3, clock=lambda: now[0])
    for _ in range(3):
        assert limiter.retry_after("a") is None
        limiter.failed("a")
    assert limiter.retry_after("a") == 60
    now[0] += 59.5
    assert limiter.retry_after("a") == 1
    now[0] += 1
    assert limiter.retry_after("a") is None
