"""The run codec: what render() writes on a PipelineRun is exactly what RunReader reads back, and garbage reads as nothing."""

from __future__ import annotations

import dataclasses

import pytest

from broker.core import runlabels
from broker.core.events import RefKind
from broker.core.pipelinerun import RunRequest, render
from config.settings import parse_routing
from tests.support import FIXTURES

SHA = "1" * 40


def rendered() -> dict:
    routing = parse_routing((FIXTURES / "routing" / "example.yaml").read_text(), source="example.yaml")
    req = RunRequest(delivery_id="0" * 12 + "a" * 14, host="gitlab", host_kind="gitlab", repo="acme/shop-api", repo_id="42",
                     ref="refs/heads/main", kind=RefKind.BRANCH, name="main", sha=SHA, attempt=3,
                     received_at="2026-11-22T04:41:01.924Z")
    return render(routing, routing.routes[0], req, git_url="https://gitlab.example.com/acme/shop-api.git")


def test_what_render_writes_reads_back_field_for_field() -> None:
    """Every field render() writes comes back through RunReader unchanged, with no problem noted."""
    obj = rendered()
    read = runlabels.RunReader(obj)
    assert (read.namespace(), read.name()) == (obj["metadata"]["namespace"], obj["metadata"]["name"])
    assert (read.route(), read.host(), read.sha(), read.delivery_id()) == ("shop-api", "gitlab", SHA, "0" * 12 + "a" * 14)
    assert (read.repo(), read.ref(), read.attempt()) == ("acme/shop-api", "refs/heads/main", 3)
    assert read.image() == obj["metadata"]["annotations"][runlabels.A_IMAGE] and read.image().endswith(SHA)
    assert read.environments() == ["staging"]
    assert read.reported() == "" and read.problems == []


def test_every_name_render_writes_is_one_of_the_codecs() -> None:
    """No label or annotation name is spelled anywhere but broker.core.runlabels."""
    names = {v for k, v in vars(runlabels).items() if k.startswith(("L_", "A_"))} | {runlabels.MANAGED_BY[0]}
    meta = rendered()["metadata"]
    assert set(meta["labels"]) | set(meta["annotations"]) <= names
    assert {f.name for f in dataclasses.fields(runlabels.RunLabels)} >= {"route", "sha", "delivery_id", "image", "deploy"}


@pytest.mark.parametrize(("where", "key", "value", "problem"), [
    ("labels", runlabels.L_DELIVERY, ["not", "a", "string"], "is not a string"),
    ("labels", runlabels.L_SHA, "HEAD", "is not valid"),
    ("annotations", runlabels.A_REPO, "../../etc", "is not valid"),
    ("annotations", runlabels.A_ATTEMPT, "-1", "is not a whole number"),
    ("annotations", runlabels.A_DEPLOY, '["prod", {"x": 1}]', "is not a JSON list"),
])
def test_a_field_someone_else_wrote_reads_as_nothing_and_says_why(where: str, key: str, value: object, problem: str) -> None:
    """An edited label or annotation is never passed on: it reads as empty (or the default) and is named in problems."""
    obj = rendered()
    obj["metadata"][where][key] = value
    read = runlabels.RunReader(obj)
    values = {runlabels.L_DELIVERY: read.delivery_id, runlabels.L_SHA: read.sha, runlabels.A_REPO: read.repo,
              runlabels.A_ATTEMPT: read.attempt, runlabels.A_DEPLOY: read.environments}
    assert values[key]() in ("", 1, [])
    assert any(key in p and problem in p for p in read.problems), read.problems
