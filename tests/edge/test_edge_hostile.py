"""Hostile and malformed requests against the real ASGI app (`create_app`) and a real redis-server.

test_sources_golden.py holds the pure parsers to "a valid event, an Ignored or a 400" for
arbitrary text in a payload. This file goes one layer out, over HTTP semantics: hosts,
credentials (missing, wrong, another host's, stale or future-dated signatures), content
types, body sizes, JSON that is broken, of the wrong shape or the wrong types, and shell,
YAML and Unicode metacharacters in refs, repo paths and commit messages. For every request:
a precise 4xx or 200 with a reason, never a 5xx; a task message is queued exactly when the
answer is 202; a 202 only for an authenticated push, and then the PipelineRun it would make
passes the fake API server's own name and label validation. No answer carries a secret.

Issue 11's rules are played too: a project URL for another repo, host, scheme or port is never
accepted; a route-scoped secret (host `gitlab-scoped`) accepts only its own route's repos; and a
header-only credential (GitLab's token) is judged before the body's size.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from broker.core.events import RefKind
from broker.core.pipelinerun import RunRequest, render
from tests.support import web_app
from config.settings import Settings
from tests.support.fakes.kube_store import Store
from tests.support import ROUTING as BASE_ROUTING
from tests.support import SECRETS, make_settings, payload

MAX_BODY = 64 * 1024
HOSTILE_TOKEN = "hostile-input-test-api-token"
PUSHES = {"gitlab": "gitlab/push-branch-update.json", "gitlab-signed": "gitlab/push-branch-update.json",
          "gitlab-scoped": "gitlab/push-branch-update.json",
          "github": "github/push-branch-update-signed.json", "gitea": "gitea/push-three-commits.json"}
EVENT = {"gitlab": ("X-Gitlab-Event", "Push Hook"), "gitlab-signed": ("X-Gitlab-Event", "Push Hook"),
         "gitlab-scoped": ("X-Gitlab-Event", "Push Hook"),
         "github": ("X-GitHub-Event", "push"), "gitea": ("X-Gitea-Event", "push")}
ANSWERS = {200, 202, 400, 401, 403, 404, 405, 408, 413, 415}
# Where each host serves project pages (from its api_url in tests/support.py ROUTING, or below).
WEB = {"gitlab": "https://gitlab.com", "gitlab-signed": "https://gitlab.example.com", "gitlab-scoped": "https://gitlab.com",
       "github": "https://github.com", "gitea": "https://gitea.example.com"}
# A host with no secret of its own: each route has one. The corpus push is for gitlab-org/hello-world.
SCOPED = {"SCOPED_HELLO_SECRET": "route-secret-for-hello-world", "SCOPED_ACME_SECRET": "route-secret-for-acme-only"}
SCOPED_ROUTES = {"scoped-hello": ("gitlab-org/*", "SCOPED_HELLO_SECRET"), "scoped-acme": ("acme/*", "SCOPED_ACME_SECRET")}
ROUTING = BASE_ROUTING.replace("routes:\n", """  gitlab-scoped:
    kind: gitlab
    api_url: https://gitlab.com/api/v4
routes:
""", 1) + "".join(
    f"  - {{name: {name}, host: gitlab-scoped, repo: '{repo}', events: {{branches: ['**'], tags: ['**']}}, pipeline: p, "
    f"image: i, webhook_secrets: [{{env: {env}}}]}}\n" for name, (repo, env) in SCOPED_ROUTES.items())


@dataclass
class Case:
    host: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    auth: str = "valid"  # valid | missing | wrong | other-host | stale | future | other-route (gitlab-scoped)
    oversize: bool = False
    url: str = "own"  # own | other-repo | other-host | other-scheme | other-port | missing


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory, redis_server: Any) -> Iterator[tuple[TestClient, redis.Redis, Settings]]:
    """One app for all examples (module-scoped: Hypothesis runs hundreds of requests through it)."""
    settings_ = make_settings(tmp_path_factory.mktemp("hostile"), routing=ROUTING, environ={
        "CIBROKER_REDIS_URL": redis_server.url, "CIBROKER_MAX_BODY_BYTES": str(MAX_BODY), "CIBROKER_API_TOKENS": HOSTILE_TOKEN,
        **SCOPED})
    db = redis.Redis.from_url(redis_server.url)
    db.flushall()
    with TestClient(web_app(settings_), raise_server_exceptions=False) as client:
        yield client, db, settings_
    db.close()


# -- strategies -----------------------------------------------------------------------------

tricky = st.sampled_from(list("./-_~^:?*[]\\@{}#&!|>%' \"`$;\t\n\r\x00\x7f") + [
    "${{ secrets.X }}", "$(id)", "`reboot`", "; rm -rf /", "&& curl x|sh", "!!python/object:os.system", "{{7*7}}",
    "*anchor", "&anchor", "---\n", "key: value", "- item", "%{x}", "\u2028", "\ufeff", "\u202e", "日本", "🚀", "é", "İ",
    "ﬁ", "Ⅻ", "..", "refs/heads/", "a" * 70, "\ud800"])
texts = st.lists(st.one_of(tricky, st.characters()), max_size=25).map("".join)
names = st.lists(st.one_of(st.sampled_from(list("abcXYZ019-_.+/")), tricky), min_size=1, max_size=20).map("".join)
refs = st.one_of(texts, st.tuples(st.sampled_from(["refs/heads/", "refs/tags/"]), names).map("".join))
repos = st.one_of(texts, st.tuples(names, names).map("/".join))
wrong_types = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.lists(st.integers(), max_size=3),
                        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.text(max_size=5))


def base(host: str) -> dict[str, Any]:
    data = json.loads(payload(PUSHES[host]))
    repo, url = REPO_FIELD[host], URL_FIELD[host]
    set_path(data, url, f"{WEB[host]}/{data[repo[0]][repo[1]]}")  # the corpus payloads come from other hosts
    return data


def set_path(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    target: Any = data
    for key in path[:-1]:
        if not isinstance(target, dict):
            return
        target = target.setdefault(key, {})
    if isinstance(target, dict):
        target[path[-1]] = value


REPO_FIELD = {"gitlab": ("project", "path_with_namespace"), "gitlab-signed": ("project", "path_with_namespace"),
              "gitlab-scoped": ("project", "path_with_namespace"),
              "github": ("repository", "full_name"), "gitea": ("repository", "full_name")}
URL_FIELD = {"gitlab": ("project", "web_url"), "gitlab-signed": ("project", "web_url"), "gitlab-scoped": ("project", "web_url"),
             "github": ("repository", "html_url"), "gitea": ("repository", "html_url")}


def tamper_url(data: Any, host: str, how: str) -> None:
    """Point the payload's project URL elsewhere (`how`), keeping its claimed repo."""
    if how == "own" or not isinstance(data, dict):
        return
    repo_at = data.get(REPO_FIELD[host][0])
    repo = repo_at.get(REPO_FIELD[host][1]) if isinstance(repo_at, dict) else None
    repo = repo if isinstance(repo, str) else "x/y"
    web = WEB[host]
    url = {"other-repo": f"{web}/someone/else", "other-host": f"https://evil.example/{repo}",
           "other-scheme": web.replace("https://", "http://") + f"/{repo}", "other-port": f"{web}:8443/{repo}",
           "missing": None}[how]
    set_path(data, URL_FIELD[host], url)
FIELDS = [("ref",), ("after",), ("before",), ("commits",), ("project",), ("repository",), ("project_id",),
          ("checkout_sha",), ("head_commit",), ("object_kind",), ("deleted",), ("push_options",), ("total_commits_count",)]


@st.composite
def bodies(draw: st.DrawFn, host: str, url: str = "own") -> tuple[bytes, bool]:
    """A body for `host` (its project URL as `url` says), and whether it is over the size limit."""
    kind = draw(st.sampled_from(["valid", "text", "text", "text", "type", "missing", "broken", "not-object", "bytes", "huge"]))
    data = base(host)
    tamper_url(data, host, url)
    if draw(st.integers(0, 4)):  # mostly a new push (a new `before`); else the corpus one, which soon is a duplicate
        data["before"] = draw(st.text(alphabet="0123456789abcdef", min_size=40, max_size=40))
    if kind == "valid":
        pass
    elif kind == "text":
        where = draw(st.sampled_from(["ref", "repo", "message"]))
        if where == "ref":
            data["ref"] = draw(refs)
        elif where == "repo":
            set_path(data, REPO_FIELD[host], draw(repos))
        else:
            commits = data.get("commits") or [{}]
            commits[-1]["message"] = draw(texts)
            data["commits"] = commits
            if isinstance(data.get("head_commit"), dict):
                data["head_commit"]["message"] = commits[-1]["message"]
    elif kind == "type":
        set_path(data, draw(st.sampled_from(FIELDS + [REPO_FIELD[host]])), draw(wrong_types))
    elif kind == "missing":
        data.pop(draw(st.sampled_from(["ref", "after", "before", "commits", "project", "repository"])), None)
    elif kind == "broken":
        raw = json.dumps(data).encode()
        return raw[: draw(st.integers(0, len(raw) - 1))], False
    elif kind == "not-object":
        return json.dumps(draw(st.one_of(st.lists(st.integers(), max_size=3), st.text(max_size=10), st.integers(),
                                         st.none()))).encode(), False
    elif kind == "bytes":
        return draw(st.binary(max_size=200)), False
    else:
        data["padding"] = "x" * (MAX_BODY + draw(st.integers(1, 4096)))
        return json.dumps(data).encode(), True
    try:
        return json.dumps(data).encode("utf-8", "surrogatepass"), False
    except UnicodeEncodeError:
        return json.dumps(data).encode(), False


def sign(case: Case, *, now: float) -> None:
    """Set the host's credential headers as `case.auth` says (an unknown host gets GitLab's)."""
    host, body, auth = case.host if case.host != "bitbucket" else "gitlab", case.body, case.auth
    gitlab_secret = SECRETS["GITLAB_WEBHOOK_SECRET"]
    if host == "gitlab-scoped":
        if auth != "missing":
            case.headers["X-Gitlab-Token"] = {"valid": SCOPED["SCOPED_HELLO_SECRET"], "other-route": SCOPED["SCOPED_ACME_SECRET"],
                                              "other-host": gitlab_secret}.get(auth, "not-the-secret")
        return
    own = {"gitlab": gitlab_secret, "github": SECRETS["GITHUB_WEBHOOK_SECRET"], "gitea": SECRETS["GITEA_WEBHOOK_SECRET"]}
    other = {"gitlab": SECRETS["GITEA_WEBHOOK_SECRET"], "github": SECRETS["GITEA_WEBHOOK_SECRET"],
             "gitea": gitlab_secret, "gitlab-signed": gitlab_secret}
    if auth == "missing":
        return
    if host == "gitlab-signed":
        key = base64.b64decode(SECRETS["GITLAB_SIGNING_SECRET"].removeprefix("whsec_"))
        if auth in ("wrong", "other-host"):
            key = other[host].encode()
        stamp = str(int(now + {"stale": -3600, "future": 3600}.get(auth, 0)))
        mac = base64.b64encode(hmac.new(key, f"msg_1.{stamp}.".encode() + body, hashlib.sha256).digest()).decode()
        case.headers.update({"webhook-id": "msg_1", "webhook-timestamp": stamp, "webhook-signature": f"v1,{mac}"})
        return
    secret = {"valid": own[host], "wrong": "not-the-secret", "other-host": other[host]}.get(auth, own[host])
    if host == "gitlab":
        case.headers["X-Gitlab-Token"] = secret
    else:
        digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        if host == "github":
            case.headers["X-Hub-Signature-256"] = f"sha256={digest}"
        else:
            case.headers["X-Gitea-Signature"] = digest


@st.composite
def cases(draw: st.DrawFn) -> Case:
    host = draw(st.sampled_from(["gitlab"] * 4 + ["gitlab-signed", "github", "gitea", "gitlab-scoped"] * 2 + ["bitbucket"]))
    known = host if host != "bitbucket" else "gitlab"
    url = draw(st.sampled_from(["own"] * 12 + ["other-repo", "other-host", "other-scheme", "other-port", "missing"]))
    body, oversize = draw(bodies(known, url))
    auth = draw(st.sampled_from(["valid"] * 8 + ["missing", "wrong", "other-host"]
                                + (["stale", "future"] if host == "gitlab-signed" else [])
                                + (["other-route"] * 3 if host == "gitlab-scoped" else [])))
    case = Case(host=host, body=body, auth=auth, oversize=oversize, url=url)
    name, value = EVENT[known]
    case.headers[name] = draw(st.sampled_from([value] * 8 + ["Merge Request Hook", "ping", ""]))
    case.headers["Content-Type"] = draw(st.sampled_from(["application/json"] * 10 + ["text/plain", "application/xml", ""]))
    case.headers["Idempotency-Key"] = draw(st.text(alphabet="abcdef0123456789", min_size=8, max_size=16))
    sign(case, now=time.time())
    return case


# -- the property ---------------------------------------------------------------------------


def expected_refusal(case: Case) -> int | None:
    """The status the edge must answer before it looks at the payload, if any.

    Headers first: a missing credential is 401 and a wrong GitLab token 403 whatever the body's
    size (no body is read for them); then the size; then signatures over the body.
    """
    if case.host == "bitbucket":
        return 404
    if case.auth == "missing":
        return 401
    if case.host in ("gitlab", "gitlab-scoped") and case.auth in ("wrong", "other-host"):
        return 403
    if case.oversize:
        return 413
    if case.auth in ("wrong", "other-host", "stale", "future"):
        return 403
    return None


def check_renderable(settings_: Settings, stored: dict[str, Any]) -> None:
    """The PipelineRun an accepted delivery makes is one the API server takes (names, labels)."""
    push = stored["push"]
    for route_name in stored["routes"]:
        route = next(r for r in settings_.routing.routes if r.name == route_name)
        req = RunRequest(delivery_id=stored["delivery_id"], host=stored["host"], host_kind=stored["host_kind"],
                         repo=push["repo"], repo_id=push["repo_id"], ref=push["ref"], kind=RefKind(push["kind"]),
                         name=push["name"], sha=push["sha"], attempt=1, received_at=stored["received_at"])
        body = render(settings_.routing, route, req, git_url="https://gitlab.example.com/x/y.git")
        Store().create("pipelineruns", body["metadata"]["namespace"], body, version="v1")  # raises on invalid names


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                                                 HealthCheck.data_too_large])
@given(case=cases())
def test_every_hostile_request_gets_a_precise_answer_and_only_valid_pushes_are_queued(
        edge: tuple[TestClient, redis.Redis, Settings], case: Case) -> None:
    client, db, settings_ = edge
    queued_before = db.llen("cibroker")
    r = client.post(f"/hooks/{case.host}", content=case.body, headers=case.headers)
    assert r.status_code in ANSWERS, (r.status_code, r.text)
    answer = r.json()
    event(f"{r.status_code} {answer.get('decision') or answer.get('code') or ''}".strip())
    text = r.text
    assert not [s for s in SECRETS.values() if s in text], "a secret in an answer"
    queued = db.llen("cibroker") - queued_before
    assert queued == (1 if r.status_code == 202 else 0)
    refusal = expected_refusal(case)
    if refusal is not None:
        assert r.status_code == refusal, (case.auth, case.host, r.text)
    if r.status_code >= 400:
        assert set(answer) == {"error"} and isinstance(answer["error"], str) and answer["error"]
        return
    assert case.auth in ("valid", "other-route") and case.host != "bitbucket" and not case.oversize
    if r.status_code == 202:
        # Only a push whose project URL is its host's and names its repo; a route secret only for its own repos.
        assert case.url == "own", (case.url, r.text)
        assert case.auth == "valid"
        if case.host == "gitlab-scoped":
            assert answer["routes"] == ["scoped-hello"]
    if r.status_code == 200:
        assert answer["decision"] in ("ignored", "duplicate") and answer["reason"]
        event(f"200 {answer.get('code', 'duplicate')}")
        return
    assert answer["decision"] == "accepted" and answer["routes"]
    stored = client.get(f"/api/deliveries/{answer['delivery_id']}", headers={"Authorization": f"Bearer {HOSTILE_TOKEN}"}).json()
    assert stored["decision"] == "accepted"
    check_renderable(settings_, stored)


def test_one_hosts_webhook_secret_authenticates_no_other_host(edge: tuple[TestClient, redis.Redis, Settings]) -> None:
    """Every host refuses (403) a request made with any other host's secret, in its own credential scheme."""
    client, db, _ = edge
    queued_before = db.llen("cibroker")
    own = {"gitlab": SECRETS["GITLAB_WEBHOOK_SECRET"], "github": SECRETS["GITHUB_WEBHOOK_SECRET"],
           "gitea": SECRETS["GITEA_WEBHOOK_SECRET"]}
    for host in ("gitlab", "gitea", "gitlab-signed"):
        for other_host, secret in own.items():
            if other_host == host or secret == own.get(host):
                continue  # (GitLab's and GitHub's test secrets are equal; each is tried against Gitea)
            case = Case(host=host, body=payload(PUSHES[host]), headers={"Content-Type": "application/json",
                                                                           EVENT[host][0]: EVENT[host][1]})
            if host == "gitlab":
                case.headers["X-Gitlab-Token"] = secret
            elif host == "gitea":
                case.headers["X-Gitea-Signature"] = hmac.new(secret.encode(), case.body, hashlib.sha256).hexdigest()
            else:
                stamp = str(int(time.time()))
                mac = base64.b64encode(hmac.new(secret.encode(), f"m.{stamp}.".encode() + case.body,
                                                hashlib.sha256).digest()).decode()
                case.headers.update({"webhook-id": "m", "webhook-timestamp": stamp, "webhook-signature": f"v1,{mac}",
                                     "X-Gitlab-Token": secret})
            r = client.post(f"/hooks/{host}", content=case.body, headers=case.headers)
            assert r.status_code == 403, (host, other_host, r.text)
    github_with_gitea_secret = hmac.new(own["gitea"].encode(), payload(PUSHES["github"]), hashlib.sha256).hexdigest()
    r = client.post("/hooks/github", content=payload(PUSHES["github"]), headers={
        "Content-Type": "application/json", "X-GitHub-Event": "push", "X-Hub-Signature-256": f"sha256={github_with_gitea_secret}"})
    assert r.status_code == 403
    assert db.llen("cibroker") == queued_before
