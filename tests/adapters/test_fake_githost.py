"""The fake Git host APIs enforce the real hosts' rules (so adapter tests against them mean something).

Driven with plain httpx, not our adapters: these tests check the fake, not cibroker.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator

import httpx
import pytest

from tests.support.fakes.githost_api import (  # noqa: F401  (fake_gitlab, fake_github are fixtures)
    CORPUS,
    GITHUB_TOKEN,
    GITLAB_TOKEN,
    FakeGitHub,
    FakeGitLab,
    fake_github,
    fake_gitlab,
)

SHA = "6b9fec60e107f1f323dfa6674b317facd996cb0a"
STATES = ["pending", "running", "success", "failed", "canceled"]

# Written out by hand from GitLab's CommitStatus state machine and CreateCommitStatusService,
# not derived from the fake: (current, posted) -> (event, from) of the 400 answer. Every other
# pair is accepted: success/failed/canceled leave no pending-or-running status to update, so
# the next post starts a new status object.
REJECTED = {
    ("pending", "pending"): ("enqueue", "pending"),
    ("running", "pending"): ("enqueue", "running"),
    ("running", "running"): ("run", "running"),
}


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5) as client:
        yield client


def gitlab_post(http: httpx.Client, fake: FakeGitLab, state: str | None, *, project: str = "42", **fields: str) -> httpx.Response:
    body = {"name": "ci", "ref": "main", **fields}
    if state is not None:
        body["state"] = state
    url = f"{fake.api_url}/projects/{project}/statuses/{SHA}"
    return http.post(url, headers={"PRIVATE-TOKEN": GITLAB_TOKEN}, json=body)


@pytest.mark.parametrize(("current", "posted"), list(itertools.product(STATES, STATES)))
def test_gitlab_transition_table(http: httpx.Client, fake_gitlab: FakeGitLab, current: str, posted: str) -> None:
    """Each of the 25 (current, posted) pairs is accepted or refused exactly as GitLab does."""
    assert gitlab_post(http, fake_gitlab, current).status_code == 201
    answer = gitlab_post(http, fake_gitlab, posted)
    if (current, posted) in REJECTED:
        event, source = REJECTED[(current, posted)]
        assert answer.status_code == 400
        assert answer.json() == {"message": f'Cannot transition status via :{event} from :{source} (Reason(s): Status cannot transition via "{event}")'}
        assert fake_gitlab.statuses(SHA) == {("ci", "main"): [current]}
    else:
        assert answer.status_code == 201
        assert answer.json()["status"] == posted
        assert fake_gitlab.statuses(SHA) == {("ci", "main"): [current, posted]}


def test_gitlab_cannot_transition_message_extends_the_corpus_text(http: httpx.Client, fake_gitlab: FakeGitLab) -> None:
    """Running twice answers GitLab's message, of which the corpus keeps the leading part."""
    corpus = json.loads((CORPUS / "commit-status-400-cannot-transition.json").read_bytes())["message"]
    gitlab_post(http, fake_gitlab, "running")
    assert gitlab_post(http, fake_gitlab, "running").json()["message"].startswith(corpus)


def test_gitlab_rerun_after_finished_creates_a_new_status_object(http: httpx.Client, fake_gitlab: FakeGitLab) -> None:
    """Updates of a pending status keep its id; a post after success starts a new object."""
    first = gitlab_post(http, fake_gitlab, "pending").json()["id"]
    assert gitlab_post(http, fake_gitlab, "running").json()["id"] == first
    assert gitlab_post(http, fake_gitlab, "success").json()["id"] == first
    rerun = gitlab_post(http, fake_gitlab, "pending").json()
    assert rerun["id"] != first
    assert [o["status"] for o in fake_gitlab.objects] == ["success", "pending"]


def test_gitlab_statuses_are_per_name_and_ref(http: httpx.Client, fake_gitlab: FakeGitLab) -> None:
    """A running status on one name or ref does not constrain another."""
    gitlab_post(http, fake_gitlab, "running")
    assert gitlab_post(http, fake_gitlab, "pending", ref="release").status_code == 201
    assert gitlab_post(http, fake_gitlab, "pending", name="deploy").status_code == 201
    assert fake_gitlab.statuses(SHA) == {("ci", "main"): ["running"], ("ci", "release"): ["pending"], ("deploy", "main"): ["pending"]}


def test_gitlab_201_body_has_the_shape_of_a_real_commit_status(http: httpx.Client, fake_gitlab: FakeGitLab) -> None:
    """The 201 answer carries every key of the corpus commit-status object."""
    real = json.loads((CORPUS / "commit-status.json").read_bytes())
    answer = gitlab_post(http, fake_gitlab, "pending", description="queued", target_url="https://ci.example.com/r/1")
    assert answer.status_code == 201
    assert set(answer.json()) == set(real)
    assert answer.json() | {"id": 0, "created_at": "", "pipeline_id": 0, "author": {}} == {
        **{k: None for k in real},
        "id": 0, "sha": SHA, "ref": "main", "status": "pending", "name": "ci", "target_url": "https://ci.example.com/r/1",
        "description": "queued", "created_at": "", "allow_failure": False, "pipeline_id": 0, "author": {},
    }  # fmt: skip


def test_gitlab_wrong_token_answers_the_real_401_body(http: httpx.Client, fake_gitlab: FakeGitLab) -> None:
    """Without the right PRIVATE-TOKEN the answer is GitLab's 401 body, byte for byte."""
    url = f"{fake_gitlab.api_url}/projects/42/statuses/{SHA}"
    answer = http.post(url, headers={"PRIVATE-TOKEN": "nope"}, json={"state": "pending"})
    assert (answer.status_code, answer.content) == (401, (CORPUS / "commit-status-401-unauthorized.json").read_bytes())
    assert fake_gitlab.calls[-1].headers["private-token"] == "<redacted>"


@pytest.mark.parametrize("project", ["999", "acme%2Fmissing"])
def test_gitlab_unknown_project_answers_the_real_404_body(http: httpx.Client, fake_gitlab: FakeGitLab, project: str) -> None:
    """An unknown project id or path answers GitLab's 404 Project Not Found body."""
    answer = gitlab_post(http, fake_gitlab, "pending", project=project)
    assert (answer.status_code, answer.content) == (404, (CORPUS / "commit-status-404-project-not-found.json").read_bytes())


def test_gitlab_project_path_is_accepted_url_encoded(http: httpx.Client, fake_gitlab: FakeGitLab) -> None:
    """`group%2Fsub%2Fproject` names the same project as its numeric id."""
    assert gitlab_post(http, fake_gitlab, "pending", project="group%2Fsub%2Fproject").status_code == 201
    assert gitlab_post(http, fake_gitlab, "running", project="7").status_code == 201
    assert fake_gitlab.statuses(SHA, project=7) == {("ci", "main"): ["pending", "running"]}


@pytest.mark.parametrize(("state", "error"), [(None, "state is missing"), ("failure", "state does not have a valid value")])
def test_gitlab_missing_or_invalid_state_is_400(http: httpx.Client, fake_gitlab: FakeGitLab, state: str | None, error: str) -> None:
    """A post without a state, or with a GitHub-style one, is refused with 400."""
    answer = gitlab_post(http, fake_gitlab, state)
    assert (answer.status_code, answer.json()) == (400, {"error": error})
    assert fake_gitlab.statuses(SHA) == {}


def test_gitlab_accepts_form_encoded_params(http: httpx.Client, fake_gitlab: FakeGitLab) -> None:
    """Form-encoded bodies work like JSON ones and are recorded as dicts."""
    url = f"{fake_gitlab.api_url}/projects/42/statuses/{SHA}"
    answer = http.post(url, headers={"PRIVATE-TOKEN": GITLAB_TOKEN}, data={"state": "success", "name": "ci", "ref": "main"})
    assert answer.status_code == 201
    assert fake_gitlab.calls[-1].body == {"state": "success", "name": "ci", "ref": "main"}


def test_injected_faults_answer_first_then_clear(http: httpx.Client, fake_gitlab: FakeGitLab) -> None:
    """inject(503, times=2) answers two requests with 503, then the rules apply again."""
    fake_gitlab.inject(503, times=2, headers={"Retry-After": "3"})
    codes = [gitlab_post(http, fake_gitlab, "pending").status_code for _ in range(3)]
    assert codes == [503, 503, 201]
    assert [c.status for c in fake_gitlab.calls] == [503, 503, 201]
    assert fake_gitlab.statuses(SHA) == {("ci", "main"): ["pending"]}


def test_down_refuses_connections_until_up(http: httpx.Client, fake_gitlab: FakeGitLab) -> None:
    """down() closes the port; up() listens on the same port again."""
    fake_gitlab.down()
    with pytest.raises(httpx.ConnectError):
        gitlab_post(http, fake_gitlab, "pending")
    fake_gitlab.up()
    assert gitlab_post(http, fake_gitlab, "pending").status_code == 201


def test_down_with_503_answers_everything_with_503(http: httpx.Client, fake_gitlab: FakeGitLab) -> None:
    """down(refuse=False) answers 503 to every request until up()."""
    fake_gitlab.down(refuse=False)
    assert [gitlab_post(http, fake_gitlab, "pending").status_code for _ in range(2)] == [503, 503]
    fake_gitlab.up()
    assert gitlab_post(http, fake_gitlab, "pending").status_code == 201


def github_post(http: httpx.Client, fake: FakeGitHub, body: dict[str, object], *, token: str = GITHUB_TOKEN) -> httpx.Response:
    url = f"{fake.api_url}/repos/acme/shop-api/statuses/{SHA}"
    return http.post(url, headers={"Authorization": f"Bearer {token}"}, json=body)


def test_github_keeps_a_history_without_transition_rules(http: httpx.Client, fake_github: FakeGitHub) -> None:
    """Any state may follow any other on GitHub; each post is appended per context."""
    for state in ["success", "pending", "pending", "failure", "error"]:
        assert github_post(http, fake_github, {"state": state, "context": "ci"}).status_code == 201
    github_post(http, fake_github, {"state": "success", "context": "deploy"})
    assert fake_github.statuses(SHA) == {"ci": ["success", "pending", "pending", "failure", "error"], "deploy": ["success"]}


@pytest.mark.parametrize("state", ["running", "failed", "canceled", None])
def test_github_refuses_states_it_does_not_know(http: httpx.Client, fake_github: FakeGitHub, state: str | None) -> None:
    """GitLab's state names are a 422 Validation Failed on GitHub."""
    answer = github_post(http, fake_github, {"state": state, "context": "ci"})
    assert answer.status_code == 422
    assert answer.json()["message"] == "Validation Failed"


def test_github_limits_statuses_per_sha_and_context() -> None:
    """Past the limit GitHub answers 422 with its 'maximum number of statuses' message."""
    with FakeGitHub(max_statuses=2) as fake, httpx.Client() as http:
        answers = [github_post(http, fake, {"state": "pending", "context": "ci"}) for _ in range(3)]
        other = github_post(http, fake, {"state": "pending", "context": "other"})
    assert [a.status_code for a in answers] == [201, 201, 422]
    assert answers[2].json()["errors"][0]["message"] == "This SHA and context has reached the maximum number of statuses."
    assert other.status_code == 201
    assert fake.statuses(SHA) == {"ci": ["pending", "pending"], "other": ["pending"]}


def test_github_requires_the_token(http: httpx.Client, fake_github: FakeGitHub) -> None:
    """A wrong token is 401 Bad credentials and is redacted in the call log."""
    answer = github_post(http, fake_github, {"state": "pending"}, token="wrong")
    assert (answer.status_code, answer.json()["message"]) == (401, "Bad credentials")
    assert fake_github.calls[-1].headers["authorization"] == "Bearer <redacted>"


def test_github_refuses_descriptions_over_140_characters(http: httpx.Client, fake_github: FakeGitHub) -> None:
    """A 141-character description is a 422; 140 is fine."""
    assert github_post(http, fake_github, {"state": "pending", "description": "x" * 141}).status_code == 422
    assert github_post(http, fake_github, {"state": "pending", "description": "x" * 140}).status_code == 201
