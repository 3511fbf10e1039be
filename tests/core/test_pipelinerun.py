"""PipelineRun rendering: deterministic names, labels any worker can resume from, valid against the CRDs."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.core.errors import Permanent
from broker.core.events import RefKind
from broker.core.pipelinerun import (
    A_DEPLOY,
    A_STATUS_NAME,
    L_DELIVERY,
    L_REF_HASH,
    RunRequest,
    clone_url,
    image_ref,
    render,
    run_name,
    sanitize_tag,
    token_allowed,
)
from config.settings import parse_routing
from tests.support.crd import validate
from tests.support import FIXTURES

SHA = "16862e36b2a3a1a1a45b1e5f5e5b1a2c3d4e5f60"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def routing():
    return parse_routing((FIXTURES / "routing" / "example.yaml").read_text(), source="example.yaml")


def request(ref: str = "refs/heads/main", *, attempt: int = 1, sha: str = SHA) -> RunRequest:
    kind = RefKind.TAG if ref.startswith("refs/tags/") else RefKind.BRANCH
    return RunRequest(delivery_id="01a2018ebee46132f6ae6571c7", host="gitlab", host_kind="gitlab", repo="acme/shop-api",
                      repo_id="42", ref=ref, kind=kind, name=ref.split("/", 2)[2], sha=sha, attempt=attempt,
                      received_at="2026-11-22T04:41:01.924Z")


def test_rendered_v1_pipelinerun_has_the_standard_params_and_service_account() -> None:
    """git-url, git-revision (the commit) and image (with the commit tag) are always set; SA in taskRunTemplate."""
    r = routing()
    route = r.routes[0]
    body = render(r, route, request(), git_url="https://gitlab.example.com/acme/shop-api.git")
    assert body["apiVersion"] == "tekton.dev/v1" and body["kind"] == "PipelineRun"
    assert body["spec"]["pipelineRef"] == {"name": "build-test-push"}
    assert body["spec"]["params"][:3] == [
        {"name": "git-url", "value": "https://gitlab.example.com/acme/shop-api.git"},
        {"name": "git-revision", "value": SHA},
        {"name": "image", "value": f"registry.example.com/acme/shop-api:{SHA}"},
    ]
    assert body["spec"]["taskRunTemplate"] == {"serviceAccountName": "pipeline-bot"}
    assert body["metadata"]["namespace"] == "ci"
    assert body["metadata"]["annotations"][A_STATUS_NAME] == "cibroker/build-test-push"
    assert body["metadata"]["annotations"][A_DEPLOY] == '["staging"]'
    validate(body)


def test_v1beta1_puts_the_service_account_on_the_spec() -> None:
    r = routing()
    body = render(r, r.routes[0], request(), git_url="https://x/y.git", api_version="v1beta1")
    assert body["spec"]["serviceAccountName"] == "pipeline-bot" and "taskRunTemplate" not in body["spec"]
    validate(body)


def test_route_params_workspaces_and_timeouts_are_rendered_and_valid() -> None:
    r = routing()
    route = r.routes[0].model_copy(update={
        "params": {"dockerfile": "Dockerfile", "tag-name": "{tag}", "target": "{image}"},
        "workspaces": [{"name": "source", "volumeClaimTemplate": {"spec": {"accessModes": ["ReadWriteOnce"],
                                                                             "resources": {"requests": {"storage": "1Gi"}}}}}],
        "timeout": "30m",
    })
    body = render(r, route, request("refs/tags/v1.2.0"), git_url="https://x/y.git")
    params = {p["name"]: p["value"] for p in body["spec"]["params"]}
    assert params["tag-name"] == "v1.2.0" and params["target"] == params["image"]
    assert body["spec"]["workspaces"][0]["name"] == "source"
    assert body["spec"]["timeouts"] == {"pipeline": "30m"}
    assert body["metadata"]["annotations"][A_DEPLOY] == "[]"  # the staging deploy is for main only
    validate(body)


def test_a_typo_in_the_spec_would_be_caught_by_the_crd_check() -> None:
    """The CRD check is not vacuous: an unknown spec field is reported as pruned."""
    r = routing()
    body = render(r, r.routes[0], request(), git_url="https://x/y.git")
    broken = copy.deepcopy(body)
    broken["spec"]["taskRunTemplat"] = broken["spec"].pop("taskRunTemplate")
    with pytest.raises(AssertionError, match="taskRunTemplat"):
        validate(broken)
    broken = copy.deepcopy(body)
    broken["spec"]["params"] = "not a list"
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)


def test_run_name_is_deterministic_and_changes_with_attempt_ref_route_and_sha() -> None:
    base = run_name(route="shop-api", ref="refs/heads/main", sha=SHA, attempt=1)
    assert base == run_name(route="shop-api", ref="refs/heads/main", sha=SHA, attempt=1)
    others = {
        run_name(route="shop-api", ref="refs/heads/main", sha=SHA, attempt=2),
        run_name(route="shop-web", ref="refs/heads/main", sha=SHA, attempt=1),
        run_name(route="shop-api", ref="refs/heads/release-1", sha=SHA, attempt=1),
        run_name(route="shop-api", ref="refs/heads/main", sha="0" * 39 + "1", attempt=1),
    }
    assert base not in others and len(others) == 4


def test_refs_that_slug_alike_still_get_different_names() -> None:
    """release/1.2 and release-1.2 read the same once slugged; the digest keeps them apart."""
    a = run_name(route="r", ref="refs/heads/release/1.2", sha=SHA, attempt=1)
    b = run_name(route="r", ref="refs/heads/release-1.2", sha=SHA, attempt=1)
    assert a != b


@given(
    route=st.from_regex(r"[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?", fullmatch=True),
    ref=st.text(min_size=1, max_size=255),
    attempt=st.integers(min_value=1, max_value=10_000),
)
def test_run_names_are_always_dns_labels(route: str, ref: str, attempt: int) -> None:
    name = run_name(route=route, ref="refs/heads/" + ref, sha=SHA, attempt=attempt)
    assert len(name) <= 63 and DNS_LABEL.match(name), name


@given(ref=st.text(min_size=1, max_size=200))
def test_label_values_are_valid_whatever_the_ref(ref: str) -> None:
    """Refs can hold anything git allows; labels carry a digest of the ref, never the ref itself."""
    r = routing()
    body = render(r, r.routes[0], request("refs/heads/" + ref.replace("\x00", "")), git_url="https://x/y.git")
    for value in body["metadata"]["labels"].values():
        assert len(value) <= 63 and LABEL_VALUE.match(value), value
    assert len(body["metadata"]["labels"][L_REF_HASH]) == 16
    assert body["metadata"]["labels"][L_DELIVERY] == "01a2018ebee46132f6ae6571c7"


@pytest.mark.parametrize(
    ("template", "expected"),
    [("{sha}", SHA), ("{short_sha}", SHA[:8]), ("{branch}-{short_sha}", "feature-login-" + SHA[:8]),
     ("v/{branch}", "v-feature-login")],
)
def test_image_tags_follow_the_template_and_the_registry_grammar(template: str, expected: str) -> None:
    r = routing()
    route = r.routes[0].model_copy(update={"image_tag": template})
    assert image_ref(route, request("refs/heads/feature/login")) == f"registry.example.com/acme/shop-api:{expected}"


@pytest.mark.parametrize(("raw", "clean"), [("..v1", "v1"), ("a b:c", "a-b-c"), ("x" * 200, "x" * 128), ("ünï", "n-")])
def test_sanitize_tag(raw: str, clean: str) -> None:
    assert sanitize_tag(raw) == clean


def test_a_tag_that_cannot_be_sanitised_is_permanent() -> None:
    with pytest.raises(Permanent):
        sanitize_tag("...")


def test_clone_url_comes_from_the_routing_file_only() -> None:
    """The route's clone_url ({repo} filled in), else https://<api_url's host>/<repo>.git; never a payload URL."""
    from config.routing import Host

    r = routing()
    route = r.routes[0]
    gitlab = Host(kind="gitlab", api_url="https://gitlab.example.com:8443/api/v4", webhook_secrets=[{"env": "X"}])
    github = Host(kind="github", api_url="https://api.github.com", webhook_secrets=[{"env": "X"}])
    assert clone_url(route, repo="acme/shop-api", host=gitlab) == route.clone_url
    templated = route.model_copy(update={"clone_url": "https://git.example.com:2222/mirror/{repo}.git"})
    assert clone_url(templated, repo="acme/web", host=gitlab) == "https://git.example.com:2222/mirror/acme/web.git"
    bare = route.model_copy(update={"clone_url": None})
    # The default port: a port on api_url is the API's, not a place a token may follow the clone to.
    assert clone_url(bare, repo="acme/shop-api", host=gitlab) == "https://gitlab.example.com/acme/shop-api.git"
    assert clone_url(bare, repo="o/r", host=github) == "https://github.com/o/r.git"
    for hostile in ("../../evil", "acme/../x", "acme/shop api", "@evil.example/x", "", "a/b?x=1", "a/b#c"):
        with pytest.raises(Permanent, match="clone URL"):
            clone_url(bare, repo=hostile, host=gitlab)


@pytest.mark.parametrize(("url", "allowed"), [
    ("https://gitlab.example.com/a/b.git", True), ("https://gitlab.example.com:8443/a/b.git", True),
    ("http://gitlab.example.com/a/b.git", False), ("file:///srv/git/a.git", False), ("ssh://git@gitlab.example.com/a/b", False),
    ("https://user@gitlab.example.com/a/b.git", False),
])
def test_a_token_goes_only_to_an_https_clone_url(url: str, allowed: bool) -> None:
    assert token_allowed(url) is allowed


def test_a_clone_url_template_takes_only_repo() -> None:
    from pydantic import ValidationError

    route = routing().routes[0].model_dump()
    with pytest.raises(ValidationError, match="unknown placeholder"):
        type(routing().routes[0]).model_validate({**route, "clone_url": "https://x.example/{sha}.git"})


def test_example_routing_file_renders_valid_runs_for_every_route_and_ref_kind(tmp_path: Path) -> None:
    r = routing()
    for route in r.routes:
        for ref in ("refs/heads/main", "refs/tags/v1.0.0"):
            validate(render(r, route, request(ref), git_url="https://gitlab.example.com/acme/shop-api.git"))
