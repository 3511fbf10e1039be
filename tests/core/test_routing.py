"""Route matching: glob semantics over repo paths and ref names, and the accept/ignore decision."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.core.events import Ignored, PushEvent, RefKind
from broker.core.routing import Accepted, decide, glob_match, matching_routes
from config.routing import Route
from config.settings import parse_routing
from tests.support import FIXTURES

SHA = "2adc9465c4edfc33834e173fe89436a7cb899a1d"
EXAMPLE_ROUTES = parse_routing((FIXTURES / "routing" / "example.yaml").read_text(), source="example.yaml").routes


def push(name: str = "main", *, kind: RefKind = RefKind.BRANCH, repo: str = "acme/shop-api", host: str = "gitlab",
         skip_reason: str | None = None) -> PushEvent:
    prefix = "refs/heads/" if kind is RefKind.BRANCH else "refs/tags/"
    return PushEvent(
        host=host, host_kind="gitlab", event="Push Hook", kind=kind, repo=repo, repo_id="42",
        ref=prefix + name, name=name, before="1" * 40, sha=SHA, sha_source="checkout_sha", pushed=SHA,
        skip_reason=skip_reason,
    )


def tag(name: str, **kw: Any) -> PushEvent:
    return push(name, kind=RefKind.TAG, **kw)


def route(name: str = "shop-api", *, repo: str = "acme/shop-api", host: str = "gitlab",
          branches: tuple[str, ...] = ("main",), tags: tuple[str, ...] = ()) -> Route:
    return Route.model_validate({
        "name": name, "host": host, "repo": repo, "events": {"branches": list(branches), "tags": list(tags)},
        "pipeline": "build-test-push", "image": "registry.example.com/acme/shop-api",
    })


# --- glob semantics --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "value", "expected"),
    [
        # `*`: any run of characters within one segment
        ("release/*", "release/1.2", True),
        ("release/*", "release/1/2", False),
        ("release/*", "release", False),
        ("acme/*", "acme/shop-api", True),
        ("acme/*", "acme/team/shop-api", False),
        ("*", "main", True),
        ("*", "feature/x", False),
        ("v*", "v1.2.3", True),
        ("v*", "release-v1", False),
        ("*-api", "shop-api", True),
        # `**`: across segments
        ("**", "feature/team/x", True),
        ("acme/**", "acme/team/shop-api", True),
        ("acme/**", "other/team/shop-api", False),
        ("**/shop-api", "acme/team/shop-api", True),
        ("feature/**/fix", "feature/a/b/fix", True),
        # `?`: one character, never `/`
        ("v?", "v1", True),
        ("v?", "v10", False),
        ("v?", "v", False),
        ("a?b", "a/b", False),
        # classes
        ("v[123]", "v2", True),
        ("v[123]", "v4", False),
        ("v[0-9]", "v7", True),
        ("v[0-9]", "vx", False),
        ("v[!123]", "v4", True),
        ("v[!123]", "v2", False),
        ("a[!x]b", "a/b", False),
        ("[abc", "[abc", True),
        # everything else is literal, including regex metacharacters
        ("v1.2", "v1.2", True),
        ("v1.2", "v1x2", False),
        ("a+b", "a+b", True),
        ("a+b", "aab", False),
        ("(x)|y", "(x)|y", True),
        ("(x)|y", "y", False),
        ("^main$", "main", False),
        ("^main$", "^main$", True),
        ("a{1,2}", "a{1,2}", True),
        ("a{1,2}", "a", False),
        ("c\\d", "c\\d", True),
        ("c\\d", "c1", False),
        # the whole value must match, not a prefix or a substring
        ("main", "main-2", False),
        ("main", "xmain", False),
        ("main", "main\n", False),
    ],
)
def test_glob_match(pattern: str, value: str, expected: bool) -> None:
    """`*` within a segment, `**` across segments, `?`, `[abc]`, `[!abc]`; all else literal; whole-value match."""
    assert glob_match(pattern, value) is expected


def test_glob_match_is_case_sensitive_unless_asked() -> None:
    """Ref names are case-sensitive; ignore_case (used for repo paths) folds case."""
    assert glob_match("Main", "main") is False
    assert glob_match("Acme/*", "acme/shop-API", ignore_case=True) is True


GLOB_META = "*?["


@given(st.text().filter(lambda s: not any(c in GLOB_META for c in s)), st.booleans())
def test_a_pattern_without_metacharacters_matches_itself_and_nothing_longer(s: str, ignore_case: bool) -> None:
    """For any string s without glob metacharacters, glob_match(s, s) and not glob_match(s, s + 'x')."""
    assert glob_match(s, s, ignore_case=ignore_case) is True
    assert glob_match(s, s + "x", ignore_case=ignore_case) is False


# --- which routes take a push ----------------------------------------------------------------


def test_repo_paths_match_case_insensitively() -> None:
    """GitLab and GitHub treat project paths case-insensitively, so routes do too."""
    assert matching_routes(push(repo="ACME/Shop-API"), [route()]) == (route(),)


def test_repo_globs_match_whole_groups() -> None:
    """repo: acme/* takes every project directly in acme, not in its subgroups or in other groups."""
    routes = [route(repo="acme/*")]
    assert matching_routes(push(repo="acme/web"), routes) == tuple(routes)
    assert matching_routes(push(repo="acme/team/web"), routes) == ()
    assert matching_routes(push(repo="other/web"), routes) == ()


def test_ref_names_match_case_sensitively() -> None:
    """Branch `Main` is not branch `main`."""
    assert matching_routes(push("Main"), [route(branches=("main",))]) == ()


def test_branch_patterns_apply_to_branches_only() -> None:
    """A branch named like a tag pattern is not taken by the tags list, and vice versa."""
    tags_only = route(branches=(), tags=("v*",))
    branches_only = route(branches=("v*",))
    assert matching_routes(push("v1.0"), [tags_only]) == ()
    assert matching_routes(tag("v1.0"), [tags_only]) == (tags_only,)
    assert matching_routes(tag("v1.0"), [branches_only]) == ()
    assert matching_routes(push("v1.0"), [branches_only]) == (branches_only,)


def test_the_host_must_match() -> None:
    """A route for host gitlab does not take the same repo pushed to another host."""
    assert matching_routes(push(host="github"), [route(host="gitlab")]) == ()


@pytest.mark.parametrize(
    ("event", "taken"),
    [
        (push("main"), True),
        (push("release/1.2"), True),
        (push("release/1/2"), False),
        (push("feature/x"), False),
        (tag("v1.0.0"), True),
        (tag("main"), False),
        (tag("release/1.2"), False),
        (push("main", repo="acme/shop-web"), False),
    ],
    ids=lambda v: f"{v.kind}:{v.repo}:{v.name}" if isinstance(v, PushEvent) else str(v),
)
def test_the_documented_example_routes(event: PushEvent, taken: bool) -> None:
    """The example's shop-api route takes main, release/* and v* tags of acme/shop-api, nothing else."""
    assert [r.name for r in matching_routes(event, EXAMPLE_ROUTES)] == (["shop-api"] if taken else [])


# --- decide ----------------------------------------------------------------------------------


def test_a_push_asking_to_skip_ci_is_ignored_even_when_a_route_matches() -> None:
    """skip_reason wins: Ignored with code skip_ci, carrying the push."""
    event = push(skip_reason="[ci skip] in the head commit message")
    assert decide(event, [route()]) == Ignored(
        code="skip_ci", reason="skipped: [ci skip] in the head commit message", event="Push Hook", push=event)


def test_a_push_no_route_takes_is_ignored_with_a_reason_naming_repo_kind_and_ref() -> None:
    """No match: Ignored code no_route; the reason says which repo, branch or tag, and host."""
    event = tag("v1.0", repo="acme/shop-web")
    assert decide(event, [route(tags=("v*",))]) == Ignored(
        code="no_route", reason="no route for acme/shop-web tag 'v1.0' on host 'gitlab'", event="Push Hook", push=event)


def test_a_push_several_routes_take_is_accepted_for_all_in_file_order() -> None:
    """Every matching route is listed, in the order of the routing file (not sorted), skipping those that don't match."""
    routes = [
        route("zeta", repo="acme/*"),
        route("beta", repo="acme/other"),
        route("alpha", repo="**", branches=("**",)),
        route("gamma", repo="acme/shop-api", branches=(), tags=("*",)),
        route("delta", repo="ACME/SHOP-API", branches=("ma?n",)),
    ]
    event = push("main")
    assert decide(event, routes) == Accepted(event=event, routes=("zeta", "alpha", "delta"))


def test_decide_takes_any_iterable_of_routes() -> None:
    """Routes may come as a generator (read once)."""
    event = push()
    assert decide(event, (r for r in [route()])) == Accepted(event=event, routes=("shop-api",))
