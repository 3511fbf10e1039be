"""Webhook sources against the real upstream payloads: golden files, then the facts behind them.

Every payload in fixtures/corpus/{gitlab,github,gitea} has its expected outcome in
fixtures/golden/<host>/<name>.expected.json: the normalised PushEvent, or why it is
ignored or rejected. Regenerate them with `python -m tests.regen_golden`, then review
every changed file against its payload (fixtures/README.md says how they were reviewed).
The named tests below restate the important facts so nobody has to open a golden file.
"""

from __future__ import annotations

import orjson
import json
from typing import Any
from urllib.parse import urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.core.errors import Rejected
from broker.core.events import ZERO_SHA, Ignored, PushEvent, RefKind
from broker.core.sources import source_for
from broker.core.sources.common import COMMIT_ID, REPO_PATH, check_project_url, push_fingerprint, split_ref, web_base
from tests.support import headers_of, payload, read_json
from tests.support.corpus import (ANNOTATED_TAG, GITEA_PUSH, GITHUB_PUSH, GITLAB_PUSH, GOLDEN, HOSTS, SUPPLIED_EVENT,
                                  corpus_payloads, golden_path, lower_keys, names_event, outcome, request_headers)

def parse(host: str, body: bytes | dict[str, Any] | list[Any], headers: dict[str, str]) -> PushEvent | Ignored:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return source_for(host).parse(headers, raw, host_id=host, loads=orjson.loads)


def built(host: str, body: bytes | dict[str, Any], headers: dict[str, str]) -> PushEvent:
    result = parse(host, body, headers)
    assert isinstance(result, PushEvent), result
    return result


def ignored(host: str, body: bytes | dict[str, Any], headers: dict[str, str]) -> Ignored:
    result = parse(host, body, headers)
    assert isinstance(result, Ignored), result
    return result


def rejected(host: str, body: bytes | dict[str, Any] | list[Any], headers: dict[str, str]) -> Rejected:
    with pytest.raises(Rejected) as caught:
        parse(host, body, headers)
    return caught.value


def corpus_json(rel: str) -> dict[str, Any]:
    data = json.loads(payload(rel))
    assert isinstance(data, dict)
    return data


def gitlab_push(**changes: Any) -> dict[str, Any]:
    data = corpus_json(GITLAB_PUSH)
    data.update(changes)
    return data


def with_head_message(host: str, message: str) -> tuple[dict[str, Any], dict[str, str]]:
    """A corpus push of `host` whose head commit message is replaced (in memory)."""
    rel = {"gitlab": GITLAB_PUSH, "github": GITHUB_PUSH, "gitea": GITEA_PUSH}[host]
    data = corpus_json(rel)
    head = data["checkout_sha"] if host == "gitlab" else data["head_commit"]["id"]
    for commit in data["commits"]:
        if commit["id"] == head:
            commit["message"] = message
    if host != "gitlab":
        data["head_commit"]["message"] = message
    return data, request_headers(rel)


GITLAB_HEADERS = {"x-gitlab-event": "Push Hook", "content-type": "application/json"}
GITHUB_HEADERS = {"x-github-event": "push", "content-type": "application/json"}
GITEA_HEADERS = {"x-gitea-event": "push", "content-type": "application/json"}
HEADERS = {"gitlab": GITLAB_HEADERS, "github": GITHUB_HEADERS, "gitea": GITEA_HEADERS}
PUSHES = {"gitlab": GITLAB_PUSH, "github": GITHUB_PUSH, "gitea": GITEA_PUSH}


# --- golden files ----------------------------------------------------------------------


@pytest.mark.parametrize("rel", corpus_payloads())
def test_corpus_payload_parses_to_its_golden_outcome(rel: str) -> None:
    """Each real upstream payload normalises to exactly its reviewed expected file."""
    expected = golden_path(rel)
    assert expected.exists(), f"no golden file for {rel}: run `python -m tests.regen_golden` and review it"
    assert outcome(rel) == read_json(expected)


def test_every_golden_file_belongs_to_a_corpus_payload() -> None:
    """No orphaned expectations: every golden file names a payload that is still in the corpus."""
    expected = {str(p.relative_to(GOLDEN)) for p in GOLDEN.rglob("*.expected.json")}
    assert expected == {str(golden_path(rel).relative_to(GOLDEN)) for rel in corpus_payloads()}


def test_supplied_event_headers_are_exactly_those_the_corpus_lacks() -> None:
    """An event header is supplied only for payloads whose corpus headers do not name the event."""
    lacking = {rel for rel in corpus_payloads() if not names_event(rel, lower_keys(headers_of(rel)))}
    assert lacking == set(SUPPLIED_EVENT)


def test_golden_files_cover_built_ignored_and_rejected_shapes_only() -> None:
    """Each golden file is a PushEvent dict, or a single 'ignored'/'rejected' entry."""
    fields = set(PushEvent.__slots__)
    for rel in corpus_payloads():
        data = read_json(golden_path(rel))
        assert set(data) in (fields, {"ignored"}, {"rejected"}), rel


# --- GitLab facts ----------------------------------------------------------------------


def test_gitlab_annotated_tag_builds_checkout_sha_and_keeps_the_tag_object_as_pushed() -> None:
    """Annotated tag: sha is checkout_sha (the commit), pushed is after (the tag object)."""
    event = built("gitlab", payload(ANNOTATED_TAG), request_headers(ANNOTATED_TAG))
    assert event.kind is RefKind.TAG and event.name == "v22"
    assert event.sha == "16862e368d8ab812e48833b741dad720d6e2cb7f"
    assert event.pushed == "fabed3d94cd03e6c2b7958afa9569c18a24d301f"
    assert event.sha_source == "checkout_sha"
    assert event.created and event.event == "Service Hook"


def test_gitlab_lightweight_tag_builds_after_which_is_the_commit() -> None:
    """Lightweight tag: after == checkout_sha, so sha and pushed are the same commit."""
    rel = "gitlab/tag-push-lightweight-created.json"
    event = built("gitlab", payload(rel), request_headers(rel))
    assert event.kind is RefKind.TAG and event.sha == event.pushed == "2adc9465c4edfc33834e173fe89436a7cb899a1d"


def test_gitlab_without_checkout_sha_builds_after() -> None:
    """A push with no checkout_sha builds `after` and says so in sha_source."""
    data = gitlab_push()
    del data["checkout_sha"]
    event = built("gitlab", data, GITLAB_HEADERS)
    assert (event.sha, event.sha_source) == (data["after"], "after")


@pytest.mark.parametrize(
    ("rel", "code"),
    [
        ("gitlab/push-branch-deleted.json", "branch_deleted"),
        ("gitlab/push-branch-deleted-subgroup.json", "branch_deleted"),
        ("gitlab/tag-push-deleted.json", "tag_deleted"),
        ("gitlab/tag-push-deleted-subgroup.json", "tag_deleted"),
        ("github/push-branch-deleted.json", "branch_deleted"),
        ("github/push-tag-deleted.json", "tag_deleted"),
        ("github/push-tag-deleted-octokit.json", "tag_deleted"),
    ],
)
def test_deleted_branch_or_tag_is_ignored(rel: str, code: str) -> None:
    """A push whose after is all zeros deletes the ref: nothing to build."""
    host = rel.split("/")[0]
    assert ignored(host, payload(rel), request_headers(rel)).code == code


@pytest.mark.parametrize(
    "rel",
    [
        "gitlab/merge-request-docs-example.json",
        "gitlab/merge-request-merged.json",
        "gitlab/merge-request-opened.json",
        "gitlab/merge-request-pac.json",
        "gitlab/note-commit.json",
        "gitlab/note-merge-request.json",
        "gitlab/pipeline-hook.json",
    ],
)
def test_gitlab_merge_request_note_and_pipeline_hooks_are_not_built(rel: str) -> None:
    """Merge Request, Note and Pipeline hooks are ignored with code event_not_built."""
    result = ignored("gitlab", payload(rel), request_headers(rel))
    assert result.code == "event_not_built"
    assert result.event == request_headers(rel)["x-gitlab-event"]


@pytest.mark.parametrize("rel", sorted(r for r in corpus_payloads() if r.startswith("gitlab/system-hook-")))
def test_gitlab_system_hook_is_ignored_even_for_pushes(rel: str) -> None:
    """Anything under X-Gitlab-Event: System Hook is ignored with code system_hook."""
    assert ignored("gitlab", payload(rel), request_headers(rel)).code == "system_hook"


@pytest.mark.parametrize(("rel", "kind"), [("gitlab/push-service-hook.json", RefKind.BRANCH), (ANNOTATED_TAG, RefKind.TAG)])
def test_gitlab_service_hook_push_and_tag_push_are_built(rel: str, kind: RefKind) -> None:
    """Integrations send X-Gitlab-Event: Service Hook; object_kind push/tag_push is built."""
    assert request_headers(rel)["x-gitlab-event"] == "Service Hook"
    assert built("gitlab", payload(rel), request_headers(rel)).kind is kind


def test_gitlab_service_hook_for_a_merge_request_is_not_built() -> None:
    """Service Hook with any other object_kind is ignored, not parsed as a push."""
    headers = {**GITLAB_HEADERS, "x-gitlab-event": "Service Hook"}
    assert ignored("gitlab", payload("gitlab/merge-request-opened.json"), headers).code == "event_not_built"


def test_gitlab_event_header_must_match_object_kind() -> None:
    """A Push Hook carrying a tag_push body (or the reverse) is a 400, not a guess."""
    tag = payload("gitlab/tag-push-lightweight-created.json")
    assert rejected("gitlab", tag, GITLAB_HEADERS).status == 400
    assert rejected("gitlab", payload(GITLAB_PUSH), {**GITLAB_HEADERS, "x-gitlab-event": "Tag Push Hook"}).status == 400


def test_gitlab_branch_created_at_existing_commit_without_commits_builds_checkout_sha() -> None:
    """commits[] empty (branch created at an existing commit): sha from checkout_sha, no title, no skip."""
    data = corpus_json("gitlab/push-branch-created.json")
    data.update(commits=[], total_commits_count=0)
    event = built("gitlab", data, GITLAB_HEADERS)
    assert event.created
    assert (event.sha, event.sha_source) == ("c4c79227ed610f1151f05bbc5be33b4f340d39c8", "checkout_sha")
    assert event.head_title == "" and event.skip_reason is None and event.total_commits == 0


def test_gitlab_truncated_commits_keep_total_commits_count() -> None:
    """GitLab lists at most 20 commits; total_commits is total_commits_count (4), not len(commits) (2)."""
    rel = "gitlab/push-docs-example-truncated-commits.json"
    assert len(corpus_json(rel)["commits"]) == 2
    event = built("gitlab", payload(rel), request_headers(rel))
    assert event.total_commits == 4
    assert event.sha == "da1560886d4f094c3e6c9ef40349f7d38b5d27d7" and event.head_title == "fixed readme"


def test_gitlab_subgroup_repo_keeps_its_full_namespace() -> None:
    """A project in nested groups keeps every path segment in repo."""
    rel = "gitlab/push-subgroup.json"
    assert built("gitlab", payload(rel), request_headers(rel)).repo == "group1/group2/group3/grp2repo"


def test_gitlab_head_title_is_the_checkout_commit_first_line() -> None:
    """In a merge push the title comes from the commit at checkout_sha, not the first listed one."""
    rel = "gitlab/push-merge-two-commits.json"
    assert built("gitlab", payload(rel), request_headers(rel)).head_title == "Merge branch 'feature' into 'master'"


# --- skipping ------------------------------------------------------------------------------


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize(
    "message",
    ["[skip ci] bump version", "Fix the build\n\n[ci skip]", "docs: typo [SKIP CI]", "[Ci Skip]"],
)
def test_skip_marker_in_head_commit_message_sets_skip_reason(host: str, message: str) -> None:
    """[skip ci] or [ci skip], in any case, anywhere in the head commit message, marks the push skipped."""
    data, headers = with_head_message(host, message)
    event = built(host, data, headers)
    assert event.skip_reason is not None and "head commit message" in event.skip_reason


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("message", ["skip ci please", "[skip-ci]", "[ci] skip", "Update README"])
def test_message_without_a_bracketed_marker_is_not_skipped(host: str, message: str) -> None:
    """Only the bracketed markers skip; similar words do not."""
    data, headers = with_head_message(host, message)
    assert built(host, data, headers).skip_reason is None


def test_gitlab_skip_marker_in_an_older_commit_does_not_skip() -> None:
    """Only the head commit's message counts: a marker in an earlier commit of the push is ignored."""
    data = corpus_json("gitlab/push-merge-two-commits.json")
    data["commits"][0]["message"] = "[skip ci] wip"
    assert data["commits"][0]["id"] != data["checkout_sha"]
    assert built("gitlab", data, GITLAB_HEADERS).skip_reason is None


def test_gitlab_push_option_ci_skip_sets_skip_reason() -> None:
    """`git push -o ci.skip` arrives as push_options {"ci": {"skip": true}} and skips the push."""
    event = built("gitlab", gitlab_push(push_options={"ci": {"skip": True}}), GITLAB_HEADERS)
    assert event.skip_reason == "push option ci.skip"


def test_gitlab_empty_push_options_do_not_skip() -> None:
    """push_options {} (as real GitLab sends it) does not skip."""
    assert built("gitlab", gitlab_push(push_options={}), GITLAB_HEADERS).skip_reason is None


# --- GitHub and Gitea facts ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rel", "code"),
    [
        ("github/create-branch.json", "event_not_built"),
        ("github/create-tag.json", "event_not_built"),
        ("github/create-tag-octokit.json", "event_not_built"),
        ("github/delete-branch.json", "event_not_built"),
        ("github/delete-tag.json", "event_not_built"),
        ("github/delete-tag-octokit.json", "event_not_built"),
        ("github/ping.json", "ping"),
        ("github/ping-organization-hook.json", "ping"),
    ],
)
def test_github_create_delete_and_ping_are_ignored(rel: str, code: str) -> None:
    """create/delete are ignored (the push event carries the ref); ping only proves the hook works."""
    assert ignored("github", payload(rel), request_headers(rel)).code == code


def test_github_tag_push_builds_head_commit_id() -> None:
    """A GitHub tag push builds head_commit.id."""
    rel = "github/push-tag-created-woodpecker.json"
    event = built("github", payload(rel), request_headers(rel))
    assert event.kind is RefKind.TAG and event.name == "the-tag-v1"
    assert (event.sha, event.sha_source) == ("67012991d6c69b1c58378346fca366b864d8d1a1", "head_commit.id")


def test_github_annotated_tag_builds_head_commit_not_the_tag_object() -> None:
    """When after is an annotated tag object, sha is still head_commit.id and pushed keeps after."""
    data = corpus_json("github/push-tag-created.json")
    data["after"] = "f" * 40
    event = built("github", data, GITHUB_HEADERS)
    assert event.sha == "d2b75aa7797ec26b088fa2dd527e9d2c052fcedd" and event.pushed == "f" * 40


def test_github_moved_tag_is_built_and_not_a_creation() -> None:
    """A re-pushed tag (non-zero before) is built and is not marked created."""
    rel = "github/push-tag-moved.json"
    event = built("github", payload(rel), request_headers(rel))
    assert event.kind is RefKind.TAG and not event.created


@pytest.mark.parametrize("rel", ["gitea/push.json", "gitea/push-pac.json", "gitea/forgejo-push.json"])
def test_gitea_push_without_head_commit_builds_after(rel: str) -> None:
    """Older Gitea and Forgejo pushes have no head_commit: sha is after, title from the matching commit."""
    event = built("gitea", payload(rel), request_headers(rel))
    assert event.sha == event.pushed and event.sha_source == "after" and event.head_title


def test_forgejo_event_header_is_read() -> None:
    """Forgejo's X-Forgejo-Event: push is built as a Gitea push."""
    rel = "gitea/forgejo-push-branch-created.json"
    headers = request_headers(rel)
    assert "x-gitea-event" not in headers
    event = built("gitea", payload(rel), headers)
    assert event.host_kind == "gitea" and event.created and event.sha == "28c3613ae62640216bea5e7dc71aa65356e4298b"


@pytest.mark.parametrize("rel", ["gitea/create-branch.json", "gitea/delete-tag.json", "gitea/create-tag-with-secret-in-body.json"])
def test_gitea_create_and_delete_events_are_not_built(rel: str) -> None:
    """Gitea create/delete events are ignored; the push event carries the ref."""
    assert ignored("gitea", payload(rel), request_headers(rel)).code == "event_not_built"


# --- bodies we refuse ----------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["github", "gitea"])
def test_form_encoded_body_parses_like_json(host: str) -> None:
    """payload=<urlencoded JSON> with application/x-www-form-urlencoded gives the same event as JSON."""
    rel = PUSHES[host]
    as_json = built(host, payload(rel), request_headers(rel))
    form = urlencode({"payload": payload(rel).decode()}).encode()
    headers = {**request_headers(rel), "content-type": "application/x-www-form-urlencoded"}
    assert built(host, form, headers) == as_json


@pytest.mark.parametrize("host", ["github", "gitea"])
@pytest.mark.parametrize("form", [b"payload=%7B", b"other=1", b"payload=1&payload=2", b"=&&"])
def test_bad_form_body_is_400(host: str, form: bytes) -> None:
    """A form body without exactly one payload field holding a JSON object is a 400."""
    headers = {**HEADERS[host], "content-type": "application/x-www-form-urlencoded"}
    assert rejected(host, form, headers).status == 400


@pytest.mark.parametrize(
    ("host", "content_type"),
    [
        ("gitlab", "text/plain"),
        ("gitlab", "application/x-www-form-urlencoded"),
        ("github", "text/plain"),
        ("github", "multipart/form-data; boundary=x"),
        ("gitea", "application/xml"),
    ],
)
def test_unsupported_content_type_is_415(host: str, content_type: str) -> None:
    """A body in a media type the host never sends is refused with 415."""
    headers = {**HEADERS[host], "content-type": content_type}
    assert rejected(host, payload(PUSHES[host]), headers).status == 415


def test_json_content_type_with_charset_is_accepted() -> None:
    """application/json; charset=utf-8 is JSON."""
    built("gitlab", payload(GITLAB_PUSH), {**GITLAB_HEADERS, "content-type": "application/json; charset=utf-8"})


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("body", [b"{", b"", b"\xff\xfe{}", b'{"a": 1} trailing', b"[" * 100_000])
def test_broken_json_is_400(host: str, body: bytes) -> None:
    """Unparseable bodies (truncated, empty, not UTF-8, too deeply nested) are 400."""
    assert rejected(host, body, HEADERS[host]).status == 400


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("body", [b"[]", b'[{"ref": "refs/heads/main"}]', b'"push"', b"null", b"42"])
def test_json_that_is_not_an_object_is_400(host: str, body: bytes) -> None:
    """A JSON array, string, number or null body is 400."""
    assert rejected(host, body, HEADERS[host]).status == 400


@pytest.mark.parametrize("host", HOSTS)
def test_missing_ref_is_400(host: str) -> None:
    """A push without ref is 400."""
    data = corpus_json(PUSHES[host])
    del data["ref"]
    assert rejected(host, data, HEADERS[host]).status == 400


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("ref", ["refs/merge-requests/1/head", "refs/pull/1/merge", "main", "refs/heads/", "refs/notes/commits"])
def test_ref_outside_heads_and_tags_is_400(host: str, ref: str) -> None:
    """Only refs/heads/<name> and refs/tags/<name> are built; other refs are 400."""
    data = corpus_json(PUSHES[host])
    data["ref"] = ref
    assert rejected(host, data, HEADERS[host]).status == 400


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize(
    "ref",
    [
        "refs/heads/has space",
        "refs/heads/a..b",
        "refs/heads/a~1",
        "refs/heads/a^b",
        "refs/heads/a:b",
        "refs/heads/what?",
        "refs/heads/glob*",
        "refs/heads/[x",
        "refs/heads/back\\slash",
        "refs/heads/nul\x00",
        "refs/heads/tab\there",
        "refs/heads/new\nline",
        "refs/heads/del\x7f",
        "refs/heads/a@{1}",
        "refs/heads/a//b",
        "refs/heads/.hidden",
        "refs/heads/a/.b",
        "refs/heads/x.lock",
        "refs/heads/trailing.",
        "refs/heads/trailing/",
        "refs/heads/" + "x" * 250,
    ],
)
def test_invalid_git_ref_name_is_400(host: str, ref: str) -> None:
    """Ref names git check-ref-format refuses (and lone surrogates) are 400."""
    data = corpus_json(PUSHES[host])
    data["ref"] = ref
    error = rejected(host, data, HEADERS[host])
    assert error.status == 400 and "ref" in error.reason


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("name", ["fïx-ünïcode", "日本語/ブランチ", "release/1.2.x", "feature/a-b_c+d", "emoji-🚀"])
def test_unicode_and_slashes_in_branch_names_are_fine(host: str, name: str) -> None:
    """Non-ASCII and nested branch names are valid git refs and are built unchanged."""
    data = corpus_json(PUSHES[host])
    data["ref"] = f"refs/heads/{name}"
    event = built(host, data, HEADERS[host])
    assert (event.kind, event.name) == (RefKind.BRANCH, name)


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("after", "not-a-sha"),
        ("after", "2adc9465"),
        ("after", "2ADC9465C4EDFC33834E173FE89436A7CB899A1D"),
        ("after", "2adc9465c4edfc33834e173fe89436a7cb899a1d\n"),
        ("after", "g" * 40),
        ("after", 12345),
        ("before", "; rm -rf /"),
        ("before", "1" * 39),
    ],
)
def test_invalid_commit_id_is_400(host: str, field: str, value: Any) -> None:
    """after/before that are not full lower-case hex object ids are 400."""
    data = corpus_json(PUSHES[host])
    data[field] = value
    assert rejected(host, data, HEADERS[host]).status == 400


def test_gitlab_invalid_checkout_sha_is_400() -> None:
    """checkout_sha must be a commit id too."""
    assert rejected("gitlab", gitlab_push(checkout_sha="HEAD"), GITLAB_HEADERS).status == 400


@pytest.mark.parametrize("host", ["github", "gitea"])
def test_invalid_head_commit_id_is_400(host: str) -> None:
    """head_commit.id must be a commit id."""
    data = corpus_json(PUSHES[host])
    data["head_commit"]["id"] = "$(reboot)"
    assert rejected(host, data, HEADERS[host]).status == 400


@pytest.mark.parametrize("host", HOSTS)
def test_sha256_object_ids_are_accepted(host: str) -> None:
    """Repositories in SHA-256 object format have 64-hex ids; they are valid commit ids."""
    data = corpus_json(PUSHES[host])
    sha = "a" * 64
    data["after"] = sha
    if host == "gitlab":
        data["checkout_sha"] = sha
    else:
        data["head_commit"]["id"] = sha
    assert built(host, data, HEADERS[host]).sha == sha


def set_repo(host: str, data: dict[str, Any], repo: Any) -> None:
    if host == "gitlab":
        data["project"]["path_with_namespace"] = repo
    else:
        data["repository"]["full_name"] = repo


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize(
    "repo",
    ["../etc/passwd", "group/../other", "a/..", "group/a;rm -rf", "group/$(id)", "group/`id`", "group/a|b", "group/a b",
     "group/a&b", "group/a>b", "noslash", "/leading", "trailing/", "group//double", "group/-dash", "a/b\n", 42],
)
def test_repo_path_with_traversal_or_shell_characters_is_400(host: str, repo: Any) -> None:
    """A repository path must be owner/name segments of [A-Za-z0-9_.+-]; traversal and shell metacharacters are 400."""
    data = corpus_json(PUSHES[host])
    set_repo(host, data, repo)
    assert rejected(host, data, HEADERS[host]).status == 400


@pytest.mark.parametrize(("host", "key"), [("gitlab", "project_id"), ("github", "repository"), ("gitea", "repository")])
@pytest.mark.parametrize("value", [True, "1 2", "../x", ""])
def test_repository_id_must_be_a_number_or_plain_token(host: str, key: str, value: Any) -> None:
    """The repository id keys records: JSON booleans, empty ids and ids with spaces or slashes are 400."""
    data = corpus_json(PUSHES[host])
    if key == "repository":
        data["repository"]["id"] = value
    else:
        data["project_id"] = value
        data["project"]["id"] = value
    assert rejected(host, data, HEADERS[host]).status == 400


@pytest.mark.parametrize("host", HOSTS)
def test_lone_surrogate_escapes_are_refused_as_invalid_json(host: str) -> None:
    """A lone UTF-16 surrogate (in a ref or a message) is not Unicode: 400 naming the JSON problem.

    Git hosts never send one (they emit valid UTF-8); a body that has one is not a real delivery.
    """
    data, headers = with_head_message(host, "fix \ud800 bug")
    error = rejected(host, data, headers)
    assert error.status == 400 and error.reason.startswith("body is not valid JSON") and "surrogate" in error.reason
    data = corpus_json(PUSHES[host])
    data["ref"] = "refs/heads/lone\ud800surrogate"
    assert rejected(host, data, HEADERS[host]).status == 400


# --- identity --------------------------------------------------------------------------------------

GITLAB_IDS = {
    "idempotency-key": "idem-1",
    "webhook-id": "msg_2",
    "x-gitlab-event-uuid": "event-3",
    "x-gitlab-webhook-uuid": "hook-4",
}


def gitlab_identity(authenticated_by: str = "X-Gitlab-Token", **headers: str) -> Any:
    event = built("gitlab", payload(GITLAB_PUSH), GITLAB_HEADERS)
    return source_for("gitlab").identity({**GITLAB_HEADERS, **headers}, event, authenticated_by=authenticated_by)


def test_gitlab_unsigned_delivery_headers_never_decide_the_identity() -> None:
    """Idempotency-Key, the event/webhook UUIDs and an unverified webhook-id are unsigned: the push fingerprint decides."""
    alone = gitlab_identity()
    assert alone.source == "push fingerprint"
    assert gitlab_identity(**GITLAB_IDS) == alone
    assert gitlab_identity(**{**GITLAB_IDS, "idempotency-key": "idem-other", "webhook-id": "other"}) == alone


def test_gitlab_signed_webhook_id_is_the_identity_when_the_signature_verified() -> None:
    """Under a verified signing-token signature, webhook-id (inside the signed string) identifies the delivery."""
    signed = gitlab_identity("webhook-signature", **GITLAB_IDS)
    assert signed.source == "webhook-id" and signed.value == "msg_2"
    assert gitlab_identity("webhook-signature + X-Gitlab-Token", **GITLAB_IDS).key == signed.key
    assert gitlab_identity("webhook-signature", **{**GITLAB_IDS, "webhook-id": "msg_3"}).key != signed.key


def test_gitlab_fingerprint_is_equal_for_the_same_push_and_differs_for_another_after() -> None:
    """Same (host, repo, ref, before, after) gives the same fingerprint; a different after a different one."""
    source = source_for("gitlab")
    same = built("gitlab", payload(GITLAB_PUSH), GITLAB_HEADERS)
    again = built("gitlab", json.dumps(corpus_json(GITLAB_PUSH), indent=1).encode(), GITLAB_HEADERS)
    moved = built("gitlab", gitlab_push(after="1" * 40, checkout_sha="1" * 40), GITLAB_HEADERS)
    assert source.identity({}, same).key == source.identity({}, again).key
    assert source.identity({}, same).key != source.identity({}, moved).key


def test_push_fingerprint_names_host_repo_ref_before_after() -> None:
    """Each of the five parts changes the digest, except the repo path's case (GitLab and GitHub ignore it)."""
    base = {"host": "gitlab", "repo": "acme/app", "ref": "refs/heads/main", "before": "a" * 40, "after": "b" * 40}
    digest = push_fingerprint(**base)
    assert push_fingerprint(**{**base, "repo": "ACME/App"}) == digest
    for key, other in (("host", "gitlab-2"), ("repo", "acme/other"), ("ref", "refs/heads/dev"), ("before", "c" * 40),
                       ("after", "c" * 40)):
        assert push_fingerprint(**{**base, key: other}) != digest, key


def test_github_and_gitea_identities_are_the_push_fingerprint() -> None:
    """X-GitHub-Delivery, X-Gitea-Delivery and X-Forgejo-Delivery are not under the HMAC: only the push identifies it."""
    github = source_for("github")
    event = built("github", payload(GITHUB_PUSH), GITHUB_HEADERS)
    first = github.identity({"x-github-hook-id": "1", "x-github-delivery": "d-1"}, event, authenticated_by="X-Hub-Signature-256")
    assert first.source == "push fingerprint"
    assert github.identity({"x-github-delivery": "d-2"}, event) == first
    gitea = source_for("gitea")
    event = built("gitea", payload("gitea/push.json"), GITEA_HEADERS)
    assert gitea.identity({"x-gitea-delivery": "ee8d97b4"}, event) == gitea.identity({"x-forgejo-delivery": "f"}, event)
    assert gitea.identity({}, event).source == "push fingerprint"


@pytest.mark.parametrize(("kind", "api_url", "expected"), [
    ("gitlab", "https://gitlab.example.com/api/v4", "https://gitlab.example.com"),
    ("gitlab", "https://example.com/gitlab/api/v4/", "https://example.com/gitlab"),
    ("gitlab", "http://10.0.0.5:8080/api/v4", "http://10.0.0.5:8080"),
    ("gitlab", "https://GitLab.Example.com:443/api/v4", "https://gitlab.example.com"),
    ("github", "https://api.github.com", "https://github.com"),
    ("github", "https://api.acme.ghe.com", "https://acme.ghe.com"),
    ("github", "https://ghe.example.com/api/v3", "https://ghe.example.com"),
    ("gitea", "https://gitea.example.com/api/v1", "https://gitea.example.com"),
])
def test_web_base_is_derived_from_the_api_url(kind: str, api_url: str, expected: str) -> None:
    """Project URLs live on the API's origin without its /api/vN suffix (github.com: api.github.com's pages)."""
    assert str(web_base(kind, api_url)) == expected


def event_at(url: str, repo: str = "acme/app") -> PushEvent:
    return PushEvent(host="gitlab", host_kind="gitlab", event="Push Hook", kind=RefKind.BRANCH, repo=repo, repo_id="1",
                     ref="refs/heads/main", name="main", before=ZERO_SHA, sha="a" * 40, sha_source="after", pushed="a" * 40,
                     web_url=url)


@pytest.mark.parametrize("url", ["https://gitlab.example.com/acme/app", "https://GITLAB.example.com:443/Acme/App/",
                                 "https://gitlab.example.com/acme/APP"])
def test_a_project_url_on_the_host_naming_the_repo_passes(url: str) -> None:
    """Scheme, host and port equal (default ports normalised); the path names the repo, case-insensitively."""
    check_project_url(event_at(url), web_base("gitlab", "https://gitlab.example.com/api/v4"), field_name="project.web_url")


@pytest.mark.parametrize(("url", "why"), [
    ("https://gitlab.example.com/other/repo", "names another project"),
    ("https://gitlab.example.com/acme/app/../other", "names another project"),
    ("https://gitlab.example.com/acme/app/sub", "names another project"),
    ("http://gitlab.example.com/acme/app", "is not on this host"),
    ("https://gitlab.example.com:8443/acme/app", "is not on this host"),
    ("https://gitlab.example.com.evil.test/acme/app", "is not on this host"),
    ("https://evil.test/acme/app", "is not on this host"),
    ("https://user@gitlab.example.com/acme/app", "is not on this host"),
    ("https://gitlab.example.com/acme/app?x=1", "is not on this host"),
    ("https://gitlab.example.com:99999/acme/app", "is not a URL"),
    ("", "is missing"),
])
def test_a_project_url_elsewhere_or_for_another_repo_is_403(url: str, why: str) -> None:
    """Issue 11 gap 1: a payload for acme/app whose project URL points elsewhere is refused, saying why."""
    with pytest.raises(Rejected) as caught:
        check_project_url(event_at(url), web_base("gitlab", "https://gitlab.example.com/api/v4"), field_name="project.web_url")
    assert caught.value.status == 403 and why in caught.value.reason


# --- property: nothing but a PushEvent, an Ignored or a 400 ---------------------------------------------


def check_valid(event: PushEvent) -> None:
    """The invariants every later stage relies on."""
    assert split_ref(event.ref) == (event.kind, event.name)
    for sha in (event.sha, event.pushed, event.before):
        assert COMMIT_ID.match(sha)
    assert REPO_PATH.match(event.repo) and ".." not in event.repo
    assert "\n" not in event.head_title and len(event.head_title) <= 200
    json.dumps(event.as_dict(), ensure_ascii=False).encode("utf-8")


# Any code point, weighted towards what git, shells and encoders trip on (lone surrogates included).
tricky = st.sampled_from(list("./-_~^:?*[]\\@{} \t\n\r\x00\x7f;$`|&<>'\"") + ["\ud800", "\udfff", "\u2028", "\ufeff"])
# Lists joined, not st.text(alphabet=one_of(...)): text() merges the alphabets and the few tricky ones vanish.
texts = st.lists(st.one_of(st.characters(exclude_categories=()), tricky), max_size=40).map("".join)
names = st.lists(st.one_of(st.sampled_from(list("abcXYZ019-_.+/")), tricky, st.characters()), min_size=1, max_size=30).map("".join)
refs = st.one_of(texts, st.tuples(st.sampled_from(["refs/heads/", "refs/tags/"]), names).map("".join))
repos = st.one_of(texts, st.tuples(names, names).map("/".join), st.tuples(names, names, names).map("/".join))
keep = st.none()  # leave the corpus value in place, so one injected field at a time reaches the validators


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ref=st.one_of(keep, refs), message=st.one_of(keep, texts), repo=st.one_of(keep, repos), deleted=st.booleans())
def test_arbitrary_text_in_ref_message_or_repo_yields_a_valid_event_or_a_400(
    ref: str | None, message: str | None, repo: str | None, deleted: bool
) -> None:
    """Any text injected into a GitLab push gives a valid PushEvent, an Ignored, or Rejected(400): nothing else."""
    data = corpus_json(GITLAB_PUSH)
    if ref is not None:
        data["ref"] = ref
    if message is not None:
        data["commits"][0]["message"] = message
    if repo is not None:
        data["project"]["path_with_namespace"] = repo
    if deleted:
        data.update(after=ZERO_SHA, checkout_sha=None, commits=[])
    tag = data["ref"].startswith("refs/tags/")
    data["object_kind"] = "tag_push" if tag else "push"
    headers = {**GITLAB_HEADERS, "x-gitlab-event": "Tag Push Hook" if tag else "Push Hook"}
    try:
        result = parse("gitlab", data, headers)
    except Rejected as exc:
        assert exc.status == 400
        return
    if isinstance(result, PushEvent):
        check_valid(result)
        source_for("gitlab").identity(headers, result)
    else:
        assert isinstance(result, Ignored) and result.code in ("branch_deleted", "tag_deleted")
        json.dumps([result.code, result.reason], ensure_ascii=False).encode("utf-8")
