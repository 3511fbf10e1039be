"""`cibroker explain`: the edge's decision path with no side effects.

The main property: for every real payload in the corpus, explain reaches the decision
the running edge reaches for the same request (accepted / ignored with the same code /
rejected with the same status), and every PipelineRun it renders is valid for Tekton.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

import pytest
from starlette.testclient import TestClient
from typer.testing import CliRunner

from broker.cli.main import app
from broker.services.explain import explain
from tests.support import web_app
from config.settings import Settings
from tests.support.crd import validate
from tests.support import FIXTURES, SECRETS, make_settings, payload
from tests.support.corpus import corpus_payloads, request_headers

SECRET_HEADERS = {"gitlab": "x-gitlab-token"}


def signed(host: str, headers: dict[str, str], body: bytes) -> dict[str, str]:
    """The request's headers with valid credentials for the test routing file's host."""
    out = {k: v for k, v in headers.items() if k not in ("x-gitlab-token", "x-hub-signature-256", "x-hub-signature",
                                                           "x-gitea-signature", "x-gogs-signature")}
    if host == "gitlab":
        out["x-gitlab-token"] = SECRETS["GITLAB_WEBHOOK_SECRET"]
    elif host == "github":
        digest = hmac.new(SECRETS["GITHUB_WEBHOOK_SECRET"].encode(), body, hashlib.sha256).hexdigest()
        out["x-hub-signature-256"] = f"sha256={digest}"
    else:
        out["x-gitea-signature"] = hmac.new(SECRETS["GITEA_WEBHOOK_SECRET"].encode(), body, hashlib.sha256).hexdigest()
    return out


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


def test_explain_reaches_the_edges_decision_for_every_corpus_payload(settings: Settings, redis_url: str,
                                                                       tmp_path: Path) -> None:
    live = make_settings(tmp_path, environ={"CIBROKER_REDIS_URL": redis_url})
    checked = rendered = failing = 0
    with TestClient(web_app(live)) as client:
        for rel in corpus_payloads():
            host = rel.split("/")[0]
            body = payload(rel)
            headers = signed(host, request_headers(rel), body)
            report = explain(settings, body=body, headers=headers, host_id=host)
            answer = client.post(f"/hooks/{host}", content=body, headers={**headers, "idempotency-key": rel})
            assert report["steps"][0]["result"] == "ok", (rel, report["steps"][0])
            if answer.status_code >= 400:
                assert report["decision"] == "rejected" and report["steps"][-1]["status"] == answer.status_code, rel
            elif answer.status_code == 202:
                assert report["decision"] == "accepted", rel
                assert [r["route"] for r in report["runs"]] == answer.json()["routes"], rel
                for run in report["runs"]:
                    if "error" in run:  # e.g. no clone_url and a project URL off the host: the worker would fail it too
                        assert run["error"].startswith("the worker would fail this route: "), (rel, run)
                        failing += 1
                        continue
                    validate(run["pipelinerun"])
                    assert run["pipelinerun"]["spec"]["params"][1]["value"] == answer.json()["sha"], rel
                    rendered += 1
            elif answer.json()["decision"] == "duplicate":  # two corpus files share a delivery id; explain keeps no state
                assert report["decision"] == "accepted", rel
            else:
                assert report["decision"] == "ignored" and report["steps"][-1]["code"] == answer.json()["code"], rel
            checked += 1
    assert checked >= 40 and rendered >= 10 and failing < rendered, (checked, rendered, failing)


def test_explain_says_when_authentication_would_fail_and_still_explains(settings: Settings) -> None:
    body = payload("gitlab/push-branch-update.json")
    report = explain(settings, body=body, headers={"x-gitlab-event": "Push Hook", "x-gitlab-token": "nope"}, host_id="gitlab")
    assert report["steps"][0] == {"step": "authenticate", "result": "rejected", "status": 403,
                                  "detail": "the edge would answer 403: invalid X-Gitlab-Token (the decision below assumes it passed)"}
    assert report["decision"] == "accepted"


def test_explain_guesses_the_event_header_and_the_host(settings: Settings) -> None:
    data = json.loads(payload("gitlab/tag-push-annotated-created.json"))
    data["project"]["web_url"] = "https://gitlab.com/test/woodpecker"  # on the host it is explained for (issue 11)
    body = json.dumps(data).encode()
    with pytest.raises(Exception, match="cannot tell which host"):
        explain(settings, body=body)  # two GitLab hosts in this routing file
    report = explain(settings, body=body, host_id="gitlab")
    assert report["headers_guessed"] == ["content-type", "x-gitlab-event"]
    assert report["decision"] == "accepted" and "git ls-remote" in report["runs"][0]["commit_note"]


def run_cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args), env={**SECRETS, "CIBROKER_CONFIG": ""})
    return result.exit_code, result.stdout, result.stderr


def test_explain_check_fails_ci_on_payloads_that_would_not_build(tmp_path: Path) -> None:
    config = FIXTURES / "routing" / "example.yaml"
    headers = tmp_path / "headers.json"
    headers.write_text(json.dumps({"X-Gitlab-Event": "Push Hook", "X-Gitlab-Token": SECRETS["GITLAB_WEBHOOK_SECRET"]}))
    pushed = tmp_path / "push.json"
    data = json.loads(payload("gitlab/push-branch-update.json"))
    data["project"]["web_url"] = "https://gitlab.example.com/gitlab-org/hello-world"  # that file's host (issue 11)
    pushed.write_text(json.dumps(data))
    code, out, _ = run_cli("explain", str(pushed), "--headers", str(headers), "--config", str(config), "--check")
    assert code == 1 and "no_route" not in out and "ignored" in out  # gitlab-org/hello-world is not routed there
    data["project"]["path_with_namespace"] = "acme/shop-api"
    data["project"]["web_url"] = "https://gitlab.example.com/acme/shop-api"
    data["ref"] = "refs/heads/main"
    pushed.write_text(json.dumps(data))
    code, out, _ = run_cli("explain", str(pushed), "--headers", str(headers), "--config", str(config), "--check")
    assert code == 0, out
    assert "authenticate ok" in " ".join(out.split()) and "kind: PipelineRun" in out and "deploy: staging" in out
    code, out, _ = run_cli("explain", str(pushed), "--headers", str(headers), "--config", str(config), "--json")
    report = json.loads(out)
    assert report["runs"][0]["image"].endswith(":" + data["checkout_sha"])


def test_explain_input_errors_are_one_line(tmp_path: Path) -> None:
    code, _, err = run_cli("explain", str(tmp_path / "missing.json"))
    assert code == 2 and err.startswith("cibroker: cannot read input") and "Traceback" not in err
    bad = tmp_path / "h.json"
    bad.write_text("[1, 2]")
    code, _, err = run_cli("explain", str(FIXTURES / "corpus" / "gitlab" / "push-branch-update.json"), "--headers", str(bad))
    assert code == 2 and "--headers must be a JSON object" in err
