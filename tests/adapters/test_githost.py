"""workers/adapters/githost.py against fake GitLab and GitHub APIs that speak HTTP and enforce the hosts' rules."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import httpx
import pytest

from broker.core.errors import Permanent, Transient
from broker.core.status import CommitState, CommitStatus, StatusAnswer
from tests.support.fakes.githost_api import (  # noqa: F401  (fake_gitlab, fake_github are fixtures)
    GITHUB_TOKEN,
    GITLAB_TOKEN,
    FakeGitHub,
    FakeGitLab,
    fake_github,
    fake_gitlab,
)
from tests.support import free_port
from workers.adapters.githost import GiteaStatuses, GitHubStatuses, GitLabStatuses, git_host_for

SHA = "abc12345" + "0" * 32
NAME = "cibroker/build-test-push"
STATUS = CommitStatus(
    repo="acme/shop-api",
    repo_id="42",
    sha=SHA,
    state=CommitState.PENDING,
    name=NAME,
    ref="main",
    description="build-test-push",
    target_url="https://ci.example.com/runs/shop-api-abc12",
)
# Tokens a test gives the adapter; each must never show up in what the adapter raises.
WRONG_TOKENS = {"gitlab": "glpat-WRONG-never-print-me", "github": "ghp_WRONGneverprintme"}


def status(state: CommitState, **changes: str) -> CommitStatus:
    return replace(STATUS, state=state, **changes)


@dataclass
class Host:
    """One implementation under the contract: its kind, fake API and adapter."""

    kind: str
    fake: FakeGitLab | FakeGitHub
    adapter: GitLabStatuses | GitHubStatuses

    def adapter_with(self, **options: object) -> GitLabStatuses | GitHubStatuses:
        token = options.pop("token", GITLAB_TOKEN if self.kind == "gitlab" else GITHUB_TOKEN)
        return git_host_for(self.kind, api_url=self.fake.api_url, token=token, host_id=self.kind, **options)  # type: ignore[arg-type,return-value]


@pytest.fixture(params=["gitlab", "github"])
def host(request: pytest.FixtureRequest) -> Iterator[Host]:
    fake = request.getfixturevalue(f"fake_{request.param}")
    token = GITLAB_TOKEN if request.param == "gitlab" else GITHUB_TOKEN
    adapter = git_host_for(request.param, api_url=fake.api_url, token=token, host_id=request.param)
    yield Host(request.param, fake, adapter)  # type: ignore[arg-type]
    adapter.close()  # type: ignore[attr-defined]


@pytest.fixture
def gitlab(fake_gitlab: FakeGitLab) -> Iterator[GitLabStatuses]:
    with GitLabStatuses(fake_gitlab.api_url, GITLAB_TOKEN, host_id="gitlab") as adapter:
        yield adapter  # type: ignore[misc]


@pytest.fixture
def github(fake_github: FakeGitHub) -> Iterator[GitHubStatuses]:
    with GitHubStatuses(fake_github.api_url, GITHUB_TOKEN, host_id="github") as adapter:
        yield adapter  # type: ignore[misc]


# -- the contract every GitHost honours ---------------------------------------------


def test_a_run_is_reported_in_order(host: Host) -> None:
    """pending, running, success are each posted and the host keeps them in that order."""
    answers = [host.adapter.set_status(status(s)) for s in (CommitState.PENDING, CommitState.RUNNING, CommitState.SUCCESS)]
    assert answers == [StatusAnswer.POSTED] * 3
    expected = {"gitlab": ["pending", "running", "success"], "github": ["pending", "pending", "success"]}[host.kind]
    assert host.fake.states(SHA, NAME) == expected


def test_409_is_transient_and_the_next_post_succeeds(host: Host) -> None:
    """A concurrent-update 409 is worth retrying, and the retry is posted."""
    host.fake.inject(409)
    with pytest.raises(Transient):
        host.adapter.set_status(status(CommitState.PENDING))
    assert host.adapter.set_status(status(CommitState.PENDING)) is StatusAnswer.POSTED
    assert host.fake.states(SHA, NAME) == ["pending"]


def test_429_retry_after_is_honoured(host: Host) -> None:
    """429 with Retry-After: 7 is Transient with retry_after 7."""
    host.fake.inject(429, headers={"Retry-After": "7"}, body="Retry later")
    with pytest.raises(Transient) as caught:
        host.adapter.set_status(status(CommitState.RUNNING))
    assert caught.value.retry_after == 7
    assert host.fake.states(SHA, NAME) == []


@pytest.mark.parametrize("code", [500, 502, 503, 504])
def test_server_errors_are_transient(host: Host, code: int) -> None:
    """5xx answers (JSON or an HTML error page) are Transient, quoting the status code."""
    host.fake.inject(code, body="<html><body><h1>Bad gateway</h1></body></html>" if code == 502 else None)
    with pytest.raises(Transient, match=str(code)) as caught:
        host.adapter.set_status(status(CommitState.PENDING))
    assert caught.value.retry_after is None


def test_a_host_that_goes_down_is_transient_until_it_comes_back(host: Host) -> None:
    """Refused connections are Transient; once the host listens again the post goes through."""
    host.fake.down()
    with pytest.raises(Transient, match="unreachable"):
        host.adapter.set_status(status(CommitState.PENDING))
    host.fake.up()
    assert host.adapter.set_status(status(CommitState.PENDING)) is StatusAnswer.POSTED


def test_a_closed_port_is_transient(host: Host) -> None:
    """An api_url nothing listens on is Transient, not a crash."""
    with git_host_for(host.kind, api_url=f"http://127.0.0.1:{free_port()}", token="t") as adapter:  # type: ignore[attr-defined]
        with pytest.raises(Transient):
            adapter.set_status(STATUS)


def test_a_timeout_is_transient(host: Host) -> None:
    """A host that accepts the request but never answers is Transient (timed out)."""
    host.fake.inject_hang()
    with host.adapter_with(timeout=0.2) as adapter:  # type: ignore[attr-defined]
        with pytest.raises(Transient, match="timed out"):
            adapter.set_status(STATUS)
    host.fake.release()


def test_a_rejected_token_is_permanent_and_never_printed(host: Host) -> None:
    """401 is Permanent, names the setting to fix, and the token is in no message or repr."""
    token = WRONG_TOKENS[host.kind]
    with host.adapter_with(token=token) as adapter:  # type: ignore[attr-defined]
        with pytest.raises(Permanent) as caught:
            adapter.set_status(STATUS)
        assert token not in repr(adapter)
    label = {"gitlab": "GitLab", "github": "GitHub"}[host.kind]
    assert str(caught.value) == f"{label} token rejected (401) posting status for acme/shop-api@abc12345: check hosts.{host.kind}.token"
    assert token not in str(caught.value) and token not in repr(caught.value)
    assert all(token not in str(call.headers) for call in host.fake.calls)


def test_an_unknown_repository_is_permanent_and_named(host: Host) -> None:
    """404 is Permanent and the message names the repository."""
    with pytest.raises(Permanent, match="acme/missing") as caught:
        host.adapter.set_status(status(CommitState.PENDING, repo="acme/missing", repo_id="999"))
    assert "404" in str(caught.value)


def test_403_without_rate_limit_headers_is_permanent(host: Host) -> None:
    """A plain 403 (token lacks permission) is Permanent and says what to fix."""
    host.fake.inject(403, body={"message": "403 Forbidden"})
    with pytest.raises(Permanent, match=f"permission.*hosts.{host.kind}.token"):
        host.adapter.set_status(STATUS)


def test_long_descriptions_are_truncated_to_the_host_limit(host: Host) -> None:
    """GitLab keeps 255 characters and GitHub 140; the host accepts the post."""
    limit = {"gitlab": 255, "github": 140}[host.kind]
    assert host.adapter.set_status(status(CommitState.SUCCESS, description="d" * 400)) is StatusAnswer.POSTED
    sent = host.fake.calls[-1].body["description"]
    assert len(sent) == limit and sent.endswith("…")


def test_target_url_is_left_out_when_unset(host: Host) -> None:
    """No target_url key is sent when the status has none."""
    host.adapter.set_status(replace(STATUS, target_url=None))
    assert "target_url" not in host.fake.calls[-1].body


# -- GitLab ---------------------------------------------------------------------------


def test_gitlab_request_carries_the_status_fields(gitlab: GitLabStatuses, fake_gitlab: FakeGitLab) -> None:
    """The numeric project id, PRIVATE-TOKEN and state/name/ref/description/target_url go on the wire."""
    gitlab.set_status(STATUS)
    call = fake_gitlab.calls[-1]
    assert (call.method, call.path) == ("POST", f"/api/v4/projects/42/statuses/{SHA}")
    assert call.headers["private-token"] == "<redacted>"
    assert call.body == {
        "state": "pending", "name": NAME, "ref": "main", "description": "build-test-push",
        "target_url": "https://ci.example.com/runs/shop-api-abc12",
    }  # fmt: skip


def test_gitlab_running_twice_is_already(gitlab: GitLabStatuses, fake_gitlab: FakeGitLab) -> None:
    """GitLab refuses running -> running with 400; the adapter answers ALREADY, no error."""
    assert gitlab.set_status(status(CommitState.RUNNING)) is StatusAnswer.POSTED
    assert gitlab.set_status(status(CommitState.RUNNING)) is StatusAnswer.ALREADY
    assert fake_gitlab.calls[-1].status == 400
    assert fake_gitlab.states(SHA, NAME) == ["running"]


def test_gitlab_pending_after_running_is_already(gitlab: GitLabStatuses, fake_gitlab: FakeGitLab) -> None:
    """A late pending (enqueue from running) is ALREADY and leaves the status running."""
    gitlab.set_status(status(CommitState.PENDING))
    gitlab.set_status(status(CommitState.RUNNING))
    assert gitlab.set_status(status(CommitState.PENDING)) is StatusAnswer.ALREADY
    assert fake_gitlab.states(SHA, NAME) == ["pending", "running"]
    assert fake_gitlab.objects[-1]["status"] == "running"


def test_gitlab_rerun_after_a_finished_status_is_posted(gitlab: GitLabStatuses, fake_gitlab: FakeGitLab) -> None:
    """After success, pending starts a new GitLab status object (a re-run), not ALREADY."""
    for state in (CommitState.PENDING, CommitState.RUNNING, CommitState.SUCCESS, CommitState.PENDING, CommitState.RUNNING):
        assert gitlab.set_status(status(state)) is StatusAnswer.POSTED
    assert fake_gitlab.states(SHA, NAME) == ["pending", "running", "success", "pending", "running"]
    assert [o["status"] for o in fake_gitlab.objects] == ["success", "running"]


@pytest.mark.parametrize("repo_id", ["", "gid://gitlab/Project/7", "group/sub/project"])
def test_gitlab_non_numeric_project_id_uses_the_encoded_path(gitlab: GitLabStatuses, fake_gitlab: FakeGitLab, repo_id: str) -> None:
    """Without a numeric id the project is addressed as group%2Fsub%2Fproject."""
    answer = gitlab.set_status(status(CommitState.PENDING, repo="group/sub/project", repo_id=repo_id))
    assert answer is StatusAnswer.POSTED
    assert fake_gitlab.calls[-1].path == f"/api/v4/projects/group%2Fsub%2Fproject/statuses/{SHA}"
    assert fake_gitlab.statuses(SHA, project=7) == {(NAME, "main"): ["pending"]}


def test_gitlab_ratelimit_reset_gives_retry_after(gitlab: GitLabStatuses, fake_gitlab: FakeGitLab) -> None:
    """429 with only RateLimit-Reset (epoch) waits until that moment."""
    reset = int(time.time()) + 30
    fake_gitlab.inject(429, headers={"RateLimit-Reset": str(reset)}, body="Retry later")
    with pytest.raises(Transient) as caught:
        gitlab.set_status(STATUS)
    assert caught.value.retry_after is not None and 25 <= caught.value.retry_after <= 30


def test_gitlab_other_400_is_permanent_with_gitlabs_message(gitlab: GitLabStatuses, fake_gitlab: FakeGitLab) -> None:
    """A 400 that is not a refused transition is Permanent and quotes GitLab."""
    fake_gitlab.inject(400, body={"message": {"target_url": ["is blocked: Only allowed schemes are http, https"]}})
    with pytest.raises(Permanent, match="is blocked: Only allowed schemes"):
        gitlab.set_status(STATUS)


# -- GitHub ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (CommitState.PENDING, "pending"),
        (CommitState.RUNNING, "pending"),
        (CommitState.SUCCESS, "success"),
        (CommitState.FAILED, "failure"),
        (CommitState.CANCELED, "error"),
    ],
)
def test_github_state_mapping(github: GitHubStatuses, fake_github: FakeGitHub, state: CommitState, expected: str) -> None:
    """Our states become GitHub's four; the status name is the context."""
    assert github.set_status(status(state)) is StatusAnswer.POSTED
    assert fake_github.statuses(SHA) == {NAME: [expected]}


def test_github_running_says_so_in_the_description(github: GitHubStatuses, fake_github: FakeGitHub) -> None:
    """GitHub has no running state, so a running status's description says running."""
    github.set_status(status(CommitState.RUNNING))
    github.set_status(status(CommitState.RUNNING, description=""))
    assert [h["description"] for h in fake_github.history(SHA, NAME)] == ["running: build-test-push", "running"]


def test_github_request_headers(github: GitHubStatuses, fake_github: FakeGitHub) -> None:
    """Bearer auth, the GitHub media type and the pinned API version are sent."""
    github.set_status(STATUS)
    call = fake_github.calls[-1]
    assert call.path == f"/repos/acme/shop-api/statuses/{SHA}"
    assert call.headers["authorization"] == "Bearer <redacted>"
    assert call.headers["accept"] == "application/vnd.github+json"
    assert call.headers["x-github-api-version"] == "2022-11-28"


def test_github_status_limit_is_permanent() -> None:
    """GitHub's 'maximum number of statuses' 422 is Permanent and quoted."""
    with FakeGitHub(max_statuses=1) as fake, GitHubStatuses(fake.api_url, GITHUB_TOKEN) as adapter:
        adapter.set_status(STATUS)
        with pytest.raises(Permanent, match="This SHA and context has reached the maximum number of statuses"):
            adapter.set_status(STATUS)


@pytest.mark.parametrize(
    "headers",
    [
        {"x-ratelimit-remaining": "0", "x-ratelimit-reset": "{reset}"},
        {"retry-after": "60"},
    ],
    ids=["primary", "secondary"],
)
def test_github_403_rate_limits_are_transient(github: GitHubStatuses, fake_github: FakeGitHub, headers: dict[str, str]) -> None:
    """403 with x-ratelimit-remaining: 0 or retry-after is a rate limit: Transient with the wait."""
    reset = int(time.time()) + 60
    fake_github.inject(403, headers={k: v.format(reset=reset) for k, v in headers.items()}, body={"message": "API rate limit exceeded"})
    with pytest.raises(Transient) as caught:
        github.set_status(STATUS)
    assert caught.value.retry_after is not None and 55 <= caught.value.retry_after <= 60


# -- Gitea and the factory ---------------------------------------------------------


def test_gitea_posts_github_shaped_statuses_with_token_auth(fake_github: FakeGitHub) -> None:
    """Gitea's API has GitHub's path and states; it authenticates with `token <t>` (checked on the GitHub-shaped fake)."""
    with GiteaStatuses(fake_github.api_url, GITHUB_TOKEN) as adapter:
        assert adapter.set_status(status(CommitState.FAILED)) is StatusAnswer.POSTED
        assert adapter.set_status(status(CommitState.CANCELED)) is StatusAnswer.POSTED
    assert fake_github.calls[-1].headers["authorization"] == "token <redacted>"
    assert fake_github.statuses(SHA) == {NAME: ["failure", "error"]}


@pytest.mark.parametrize(("kind", "adapter"), [("gitlab", GitLabStatuses), ("github", GitHubStatuses), ("gitea", GiteaStatuses)])
def test_factory_picks_the_adapter_for_the_kind(kind: str, adapter: type) -> None:
    """git_host_for returns the adapter for each routing-file kind, with a token-free repr."""
    made = git_host_for(kind, api_url="https://git.example.com/api/", token="s3cret-token")
    assert type(made) is adapter
    assert repr(made) == f"{adapter.__name__}(api_url='https://git.example.com/api')"
    made.close()  # type: ignore[attr-defined]


def test_factory_refuses_an_unknown_kind() -> None:
    """An unknown kind is Permanent and lists the known ones."""
    with pytest.raises(Permanent, match="gitea, github, gitlab"):
        git_host_for("bitbucket", api_url="https://x", token="t")


def test_a_shared_client_is_used_and_left_open(fake_gitlab: FakeGitLab) -> None:
    """An adapter given an httpx.Client posts through it and does not close it."""
    with httpx.Client(headers={"X-Trace": "shared"}) as client:
        with GitLabStatuses(fake_gitlab.api_url, GITLAB_TOKEN, client=client) as adapter:
            adapter.set_status(STATUS)
        assert not client.is_closed
    assert fake_gitlab.calls[-1].headers["x-trace"] == "shared"
