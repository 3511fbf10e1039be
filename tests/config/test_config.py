"""Settings: the routing file's schema and its error messages, secret resolution, CIBROKER_* and embedded defaults.

Every error test asserts the whole problem line: file, key path and message.
"""

from __future__ import annotations

import stat
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.core.errors import ConfigError
from config.routing import RoutingFile
from config.settings import EMBEDDED, EnvSettings, ensure_dev_secret, load_settings, parse_routing
from tests.support import FIXTURES, ROUTING, SECRETS, make_settings

EXAMPLE = FIXTURES / "routing" / "example.yaml"
SHIPPED_EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "example.yaml"
SOURCE = "routing.yaml"
INLINE = "a secret is never written inline: write {env: VARIABLE} or {file: PATH}"
EXAMPLE_SECRETS = {
    "GITLAB_WEBHOOK_SECRET": "current-hook-secret",
    "GITLAB_WEBHOOK_SECRET_PREVIOUS": "previous-hook-secret",
    "GITLAB_API_TOKEN": "glpat-api-token-value",
}


def host(**changes: Any) -> dict[str, Any]:
    base = {"kind": "gitlab", "api_url": "https://gitlab.example.com/api/v4",
            "webhook_secrets": [{"env": "GITLAB_WEBHOOK_SECRET"}]}
    return {**base, **changes}


def route(*, without: tuple[str, ...] = (), **changes: Any) -> dict[str, Any]:
    base = {"name": "shop-api", "host": "gitlab", "repo": "acme/shop-api", "events": {"branches": ["main"]},
            "pipeline": "build-test-push", "image": "registry.example.com/acme/shop-api"}
    return {k: v for k, v in {**base, **changes}.items() if k not in without}


def document(*, hosts: Any = None, routes: Any = None, **top: Any) -> str:
    data = {"hosts": {"gitlab": host()} if hosts is None else hosts, "routes": [route()] if routes is None else routes, **top}
    return yaml.safe_dump(data, sort_keys=False)


def problems(text: str) -> list[str]:
    """The problem lines parse_routing raises for `text` (and fails the test if it accepts it)."""
    with pytest.raises(ConfigError) as caught:
        parse_routing(text, source=SOURCE)
    assert str(caught.value) == "\n".join(caught.value.problems)
    return caught.value.problems


def write(directory: Path, text: str, name: str = "routing.yaml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text)
    return path


# --- the documented example -------------------------------------------------------------------


def test_the_documented_example_loads_with_its_secrets_set() -> None:
    """The issue's example file loads: one gitlab host with both secrets and the token, one route as written."""
    settings = load_settings(EXAMPLE_SECRETS, config_path=EXAMPLE)
    assert settings.source == str(EXAMPLE)
    assert settings.warnings == ()
    assert settings.embedded_defaults is False
    creds = settings.credentials["gitlab"]
    assert creds.webhook_values() == ("current-hook-secret", "previous-hook-secret")
    assert creds.token is not None and creds.token.get_secret_value() == "glpat-api-token-value"
    assert settings.routing.defaults.status_name == "cibroker/{pipeline}"
    [shop] = settings.routing.routes
    assert (shop.name, shop.host, shop.repo, shop.pipeline, shop.image_tag) == (
        "shop-api", "gitlab", "acme/shop-api", "build-test-push", "{sha}")
    assert shop.events.branches == ["main", "release/*"] and shop.events.tags == ["v*"]
    [staging] = shop.deploy
    assert (staging.environment, staging.namespace, staging.deployment, staging.container) == (
        "staging", "staging", "shop-api", "api")
    assert staging.when is not None and staging.when.branches == ["main"]


def test_the_shipped_example_is_the_documented_example_plus_the_catalogs_workspaces() -> None:
    """config/example.yaml (with its comments) means what the issue's example means, with the workspaces
    deploy/tekton's build-test-push needs bound (tests/deploy/test_deploy_manifests.py checks they fit)."""
    shipped = parse_routing(SHIPPED_EXAMPLE.read_text(), source=str(SHIPPED_EXAMPLE))
    documented = parse_routing(EXAMPLE.read_text(), source=str(EXAMPLE))
    assert [w["name"] for w in shipped.routes[0].workspaces] == ["source", "dockerconfig"]
    assert shipped.model_copy(update={"routes": [r.model_copy(update={"workspaces": []}) for r in shipped.routes]}) == documented


def test_the_routing_models_are_frozen() -> None:
    """A loaded routing file cannot be changed in place."""
    routing = parse_routing(EXAMPLE.read_text(), source=str(EXAMPLE))
    with pytest.raises(ValueError, match="frozen"):
        routing.routes[0].pipeline = "other"  # type: ignore[misc]


def test_a_gitlab_host_may_authenticate_with_signing_secrets_alone() -> None:
    """signing_secrets without webhook_secrets is enough for a gitlab host."""
    routing = parse_routing(document(hosts={"gitlab": host(webhook_secrets=[], signing_secrets=[{"env": "SIGNING"}])}),
                            source=SOURCE)
    assert [ref.env for ref in routing.hosts["gitlab"].signing_secrets] == ["SIGNING"]


# --- YAML-level problems ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("hosts:\n  gitlab: {kind: gitlab\nroutes: []\n",
                     "routing.yaml:3:7: not valid YAML: expected ',' or '}', but got ':'", id="unclosed-flow-mapping"),
        pytest.param("hosts:\n\tgitlab: {}\n",
                     "routing.yaml:2:1: not valid YAML: found character '\\t' that cannot start any token", id="tab-indent"),
        pytest.param("hosts:\n  gitlab:\n    kind: gitlab\n   api_url: x\n",
                     "routing.yaml:4:4: not valid YAML: expected <block end>, but found '<block mapping start>'",
                     id="bad-indent"),
    ],
)
def test_a_yaml_syntax_error_names_file_line_and_column(text: str, expected: str) -> None:
    """Broken YAML is one problem: `file:line:column: not valid YAML: <what the parser saw>`."""
    assert problems(text) == [expected]


def test_a_key_given_twice_in_one_mapping_is_refused_with_its_position() -> None:
    """YAML would keep the last `gitlab:` silently; the routing file refuses it where the repeat is."""
    text = (
        "hosts:\n"
        "  gitlab: {kind: gitlab, api_url: 'https://a.example', webhook_secrets: [{env: A}]}\n"
        "  gitlab: {kind: github, api_url: 'https://b.example', webhook_secrets: [{env: B}]}\n"
    )
    assert problems(text) == ["routing.yaml:3:3: not valid YAML: found duplicate key 'gitlab'"]


def test_yaml_merge_keys_may_still_override_merged_values() -> None:
    """`<<: *anchor` followed by an explicit key is an override, not a duplicate."""
    text = (
        "hosts:\n"
        "  gitlab: &base {kind: gitlab, api_url: 'https://a.example', webhook_secrets: [{env: A}]}\n"
        "  gitea: {<<: *base, kind: gitea}\n"
    )
    routing = parse_routing(text, source=SOURCE)
    assert routing.hosts["gitea"].kind == "gitea"
    assert routing.hosts["gitea"].api_url == "https://a.example"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("- hosts\n", "routing.yaml: the routing file must be a mapping with 'hosts' and 'routes', got list",
                     id="list"),
        pytest.param("just words\n", "routing.yaml: the routing file must be a mapping with 'hosts' and 'routes', got str",
                     id="scalar"),
        pytest.param("", "routing.yaml: the routing file is empty; it needs at least 'hosts'", id="empty"),
        pytest.param("# only a comment\n", "routing.yaml: the routing file is empty; it needs at least 'hosts'",
                     id="comment-only"),
    ],
)
def test_the_top_level_must_be_a_mapping(text: str, expected: str) -> None:
    """A file that is not a mapping says what it got instead."""
    assert problems(text) == [expected]


# --- schema problems, one at a time ----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(document(rootes=[]), "routing.yaml: rootes: Extra inputs are not permitted", id="top-level"),
        pytest.param(document(hosts={"gitlab": host(tokn={"env": "T"})}),
                     "routing.yaml: hosts.gitlab.tokn: Extra inputs are not permitted", id="host"),
        pytest.param(document(defaults={"namespace": "ci", "timout": "1h"}),
                     "routing.yaml: defaults.timout: Extra inputs are not permitted", id="defaults"),
        pytest.param(document(routes=[route(deploy=[{"environment": "staging", "namespace": "staging",
                                                     "deployment": "shop-api", "container": "api", "replicas": 2}])]),
                     "routing.yaml: routes[0].deploy[0].replicas: Extra inputs are not permitted", id="deploy"),
        pytest.param(document(routes=[route(events={"branches": ["main"], "tag": ["v*"]})]),
                     "routing.yaml: routes[0].events.tag: Extra inputs are not permitted", id="events"),
    ],
)
def test_an_unknown_key_is_an_error_at_its_path(text: str, expected: str) -> None:
    """A typo is never ignored: the unknown key is named with its full path."""
    assert problems(text) == [expected]


def test_a_typo_in_a_route_key_reports_the_typo_and_the_missing_key() -> None:
    """`evnts` is reported as unknown, and the `events` it was meant to be as missing."""
    text = document(routes=[{**route(without=("events",)), "evnts": {"branches": ["main"]}}])
    assert sorted(problems(text)) == [
        "routing.yaml: routes[0].events: Field required",
        "routing.yaml: routes[0].evnts: Extra inputs are not permitted",
    ]


def test_a_file_without_hosts_is_refused() -> None:
    """`hosts` is required."""
    assert problems(yaml.safe_dump({"routes": []})) == ["routing.yaml: hosts: Field required"]


@pytest.mark.parametrize("key", ["name", "host", "repo", "events", "pipeline", "image"])
def test_a_route_without_a_required_key_names_it(key: str) -> None:
    """Each required route key, when missing, is reported at routes[i].<key>."""
    text = document(routes=[route(), route(name="second", without=(key,))])
    assert problems(text) == [f"routing.yaml: routes[1].{key}: Field required"]


@pytest.mark.parametrize("key", ["kind", "api_url"])
def test_a_host_without_a_required_key_names_it(key: str) -> None:
    """kind and api_url are required on every host."""
    hosts = {"gitlab": {k: v for k, v in host().items() if k != key}}
    assert problems(document(hosts=hosts)) == [f"routing.yaml: hosts.gitlab.{key}: Field required"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(document(hosts=[]), "routing.yaml: hosts: Input should be a valid dictionary", id="hosts-list"),
        pytest.param(document(routes={"shop-api": route()}), "routing.yaml: routes: Input should be a valid list",
                     id="routes-mapping"),
        pytest.param(document(routes=[route(events={"branches": "main"})]),
                     "routing.yaml: routes[0].events.branches: Input should be a valid list", id="branches-string"),
        pytest.param(document(routes=[route(events={"branches": ["main", 1.5]})]),
                     "routing.yaml: routes[0].events.branches[1]: Input should be a valid string", id="branch-number"),
        pytest.param(document(routes=[route(params={"DEBUG": True})]),
                     "routing.yaml: routes[0].params.DEBUG: Input should be a valid string", id="param-bool"),
        pytest.param(document(hosts={"gitlab": host(signature_tolerance_seconds="soon")}),
                     "routing.yaml: hosts.gitlab.signature_tolerance_seconds: "
                     "Input should be a valid integer, unable to parse string as an integer", id="tolerance-word"),
        pytest.param(document(hosts={"gitlab": host(api_url="gitlab.example.com")}),
                     "routing.yaml: hosts.gitlab.api_url: String should match pattern '^https?://[^/\\s]+(/\\S*)?$'",
                     id="api-url-without-scheme"),
        pytest.param(document(routes=["shop-api"]),
                     "routing.yaml: routes[0]: Input should be a valid dictionary or instance of Route", id="route-string"),
    ],
)
def test_a_value_of_the_wrong_kind_is_reported_at_its_path(text: str, expected: str) -> None:
    """Wrong types are reported at the exact key (with list indexes), saying what was expected."""
    assert problems(text) == [expected]


def test_a_host_kind_must_be_gitlab_github_or_gitea() -> None:
    """An unsupported host kind lists the supported ones."""
    text = document(hosts={"gitlab": host(kind="bitbucket")})
    assert problems(text) == ["routing.yaml: hosts.gitlab.kind: Input should be 'gitlab', 'github' or 'gitea'"]


def test_a_route_on_an_undefined_host_names_the_defined_ones() -> None:
    """routes[i].host must be a key of hosts; the message lists the hosts that exist."""
    text = document(hosts={"gitlab": host(), "gitea": host(kind="gitea")},
                    routes=[route(), route(name="web", host="gitlub")])
    assert problems(text) == ["routing.yaml: routes[1].host: host 'gitlub' is not defined under hosts (defined: gitea, gitlab)"]


def test_a_route_name_used_twice_is_reported_at_each_repeat() -> None:
    """Route names are unique; each repeat names the route that used it first."""
    text = document(routes=[route(), route(repo="acme/web"), route(repo="acme/docs")])
    assert problems(text) == [
        "routing.yaml: routes[1].name: route name 'shop-api' is already used by routes[0]; "
        "names identify routes in PipelineRun labels",
        "routing.yaml: routes[2].name: route name 'shop-api' is already used by routes[0]; "
        "names identify routes in PipelineRun labels",
    ]


@pytest.mark.parametrize("name", ["Shop-API", "shop_api", "-shop", "shop-", "shop api", "x" * 41])
def test_a_route_name_must_be_dns_safe(name: str) -> None:
    """Route names go into Kubernetes labels: lowercase letters, digits and inner dashes, at most 40."""
    expected = (
        "String should have at most 40 characters" if len(name) > 40
        else "String should match pattern '^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'"
    )
    assert problems(document(routes=[route(name=name)])) == [f"routing.yaml: routes[0].name: {expected}"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(document(routes=[route(image_tag="{version}")]),
                     "routing.yaml: routes[0].image_tag: unknown placeholder {version} in '{version}'; "
                     "allowed: {sha} {short_sha} {tag} {branch} {ref}", id="image_tag"),
        pytest.param(document(routes=[route(image_tag="{repo}-{sha}")]),
                     "routing.yaml: routes[0].image_tag: unknown placeholder {repo} in '{repo}-{sha}'; "
                     "allowed: {sha} {short_sha} {tag} {branch} {ref}", id="image_tag-repo"),
        pytest.param(document(routes=[route(params={"REVISION": "{commit}"})]),
                     "routing.yaml: routes[0].params: unknown placeholder {commit} in '{commit}'; "
                     "allowed: {sha} {short_sha} {tag} {branch} {ref} {repo} {image}", id="params"),
        pytest.param(document(defaults={"status_name": "ci/{repo}"}),
                     "routing.yaml: defaults.status_name: unknown placeholder {repo} in 'ci/{repo}'; "
                     "allowed: {pipeline} {route} {environment}", id="defaults-status_name"),
        pytest.param(document(routes=[route(status_name="ci/{branch}")]),
                     "routing.yaml: routes[0].status_name: unknown placeholder {branch} in 'ci/{branch}'; "
                     "allowed: {pipeline} {route} {environment}", id="route-status_name"),
        pytest.param(document(routes=[route(image="registry.example.com/{project}")]),
                     "routing.yaml: routes[0].image: unknown placeholder {project} in 'registry.example.com/{project}'; "
                     "allowed: {repo}", id="image"),
        pytest.param(document(routes=[route(image_tag="{sha:.8}")]),
                     "routing.yaml: routes[0].image_tag: bad template '{sha:.8}': placeholder {sha:.8} is not a plain name",
                     id="format-spec"),
    ],
)
def test_an_unknown_template_placeholder_lists_the_allowed_ones(text: str, expected: str) -> None:
    """Templates accept only their own placeholders, and the error lists them."""
    assert problems(text) == [expected]


def test_every_documented_placeholder_is_accepted() -> None:
    """The placeholders the contract documents for image_tag, params and status_name all validate."""
    routing = parse_routing(document(
        defaults={"status_name": "ci/{pipeline}/{route}/{environment}"},
        routes=[route(image_tag="{sha}-{short_sha}-{tag}-{branch}-{ref}", image="registry.example.com/{repo}",
                      params={"REF": "{ref}", "IMAGE": "{image}", "REPO": "{repo}"})],
    ), source=SOURCE)
    assert routing.routes[0].params == {"REF": "{ref}", "IMAGE": "{image}", "REPO": "{repo}"}


@pytest.mark.parametrize("events", [{}, {"branches": []}, {"branches": [], "tags": []}])
def test_a_route_whose_events_take_nothing_is_refused(events: dict[str, list[str]]) -> None:
    """A route needs at least one branch or tag pattern, or it would never run."""
    assert problems(document(routes=[route(events=events)])) == [
        "routing.yaml: routes[0].events: events needs at least one of 'branches' or 'tags'; this route would never run"
    ]


def test_an_empty_ref_pattern_is_refused() -> None:
    """An empty string is not a glob."""
    assert problems(document(routes=[route(events={"branches": ["main", ""]})])) == [
        "routing.yaml: routes[0].events.branches[1]: String should have at least 1 character"
    ]


# --- secrets in the routing file -------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "path"),
    [
        pytest.param({"token": "s3cr3t-inline-value"}, "hosts.gitlab.token", id="token-string"),
        pytest.param({"token": {"value": "s3cr3t-inline-value"}}, "hosts.gitlab.token", id="token-value-key"),
        pytest.param({"webhook_secrets": ["s3cr3t-inline-value"]}, "hosts.gitlab.webhook_secrets[0]", id="webhook-string"),
        pytest.param({"webhook_secrets": [{"env": "GITLAB_WEBHOOK_SECRET"}, {"value": "s3cr3t-inline-value"}]},
                     "hosts.gitlab.webhook_secrets[1]", id="webhook-value-key"),
        pytest.param({"webhook_secrets": [], "signing_secrets": [12345678]}, "hosts.gitlab.signing_secrets[0]",
                     id="signing-number"),
    ],
)
def test_a_secret_written_inline_is_refused_without_echoing_it(changes: dict[str, Any], path: str) -> None:
    """Secrets are only ever references; an inline one is refused, and its value is not repeated in the error."""
    found = problems(document(hosts={"gitlab": host(**changes)}))
    assert found == [f"routing.yaml: {path}: {INLINE}"]
    assert "s3cr3t" not in "\n".join(found) and "12345678" not in "\n".join(found)


@pytest.mark.parametrize("ref", [{"env": "A", "file": "a.txt"}, {}])
def test_a_secret_reference_names_exactly_one_place(ref: dict[str, str]) -> None:
    """A SecretRef has env or file, not both and not neither."""
    assert problems(document(hosts={"gitlab": host(token=ref)})) == [
        "routing.yaml: hosts.gitlab.token: give exactly one of 'env' or 'file' (a secret is never written inline)"
    ]


def test_a_secret_env_reference_must_be_a_variable_name() -> None:
    """`env:` holds a variable name, not a value."""
    assert problems(document(hosts={"gitlab": host(token={"env": "glpat 123"})})) == [
        "routing.yaml: hosts.gitlab.token.env: String should match pattern '^[A-Za-z_][A-Za-z0-9_]*$'"
    ]


def test_a_host_without_webhook_or_signing_secrets_is_refused() -> None:
    """Unauthenticated hooks are refused: a host needs at least one secret reference."""
    assert problems(document(hosts={"gitlab": host(webhook_secrets=[])})) == [
        "routing.yaml: hosts.gitlab: a host needs webhook_secrets (or, for gitlab, signing_secrets): "
        "unauthenticated hooks are refused"
    ]


@pytest.mark.parametrize("kind", ["github", "gitea"])
def test_signing_secrets_are_refused_on_github_and_gitea(kind: str) -> None:
    """signing_secrets is GitLab's; on other hosts it is an error at hosts.<id>.signing_secrets."""
    hosts = {"hub": host(kind=kind, signing_secrets=[{"env": "SIGNING"}])}
    assert problems(document(hosts=hosts, routes=[])) == [
        "routing.yaml: hosts.hub.signing_secrets: "
        "signing_secrets is GitLab's signing token; github and gitea sign with webhook_secrets"
    ]


# --- many problems at once -------------------------------------------------------------------


def test_every_problem_in_a_file_is_reported_at_once() -> None:
    """Field errors in several hosts and routes and the cross-route checks all come back together."""
    text = document(
        hosts={"gitlab": host(kind="gitlub", tokn={"env": "T"}), "hub": host(kind="github", webhook_secrets=[])},
        routes=[
            {**route(without=("events",), image_tag="{version}"), "evnts": {"branches": ["main"]}},
            route(host="nowhere"),
            route(name="Bad_Name", without=("pipeline",), events={}),
        ],
    )
    assert sorted(problems(text)) == sorted([
        "routing.yaml: hosts.gitlab.kind: Input should be 'gitlab', 'github' or 'gitea'",
        "routing.yaml: hosts.gitlab.tokn: Extra inputs are not permitted",
        "routing.yaml: hosts.hub: a host needs webhook_secrets (or, for gitlab, signing_secrets): "
        "unauthenticated hooks are refused",
        "routing.yaml: routes[0].events: Field required",
        "routing.yaml: routes[0].evnts: Extra inputs are not permitted",
        "routing.yaml: routes[0].image_tag: unknown placeholder {version} in '{version}'; "
        "allowed: {sha} {short_sha} {tag} {branch} {ref}",
        "routing.yaml: routes[1].host: host 'nowhere' is not defined under hosts (defined: gitlab, hub)",
        "routing.yaml: routes[1].name: route name 'shop-api' is already used by routes[0]; "
        "names identify routes in PipelineRun labels",
        "routing.yaml: routes[2].name: String should match pattern '^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'",
        "routing.yaml: routes[2].pipeline: Field required",
        "routing.yaml: routes[2].events: events needs at least one of 'branches' or 'tags'; this route would never run",
    ])


def test_problems_name_the_routing_file_path_given(tmp_path: Path) -> None:
    """load_settings reports problems against the path it was given, not a fixed name."""
    path = write(tmp_path / "conf", document(routes=[route(host="nowhere")]), name="prod-routing.yaml")
    with pytest.raises(ConfigError) as caught:
        load_settings({}, config_path=path)
    assert caught.value.problems == [f"{path}: routes[0].host: host 'nowhere' is not defined under hosts (defined: gitlab)"]


def test_a_missing_routing_file_is_a_config_error(tmp_path: Path) -> None:
    """A routing file that cannot be read is one problem naming the path and the reason."""
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as caught:
        load_settings({}, config_path=path)
    assert caught.value.problems == [f"{path}: cannot read the routing file: No such file or directory"]


def test_a_routing_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    """Binary garbage is reported as a ConfigError, not a UnicodeDecodeError."""
    path = tmp_path / "routing.yaml"
    path.write_bytes(b"hosts: \xff\xfe\n")
    with pytest.raises(ConfigError) as caught:
        load_settings({}, config_path=path)
    assert caught.value.problems == [f"{path}: the routing file is not UTF-8 text (byte 7)"]


def test_cibroker_config_names_the_routing_file_when_no_path_is_given(tmp_path: Path) -> None:
    """CIBROKER_CONFIG is used when load_settings gets no config_path."""
    path = write(tmp_path, EXAMPLE.read_text())
    settings = load_settings({**EXAMPLE_SECRETS, "CIBROKER_CONFIG": str(path)})
    assert settings.source == str(path)
    assert settings.embedded_defaults is False


# --- secret resolution -----------------------------------------------------------------------


def test_no_repr_or_str_of_settings_shows_a_secret_value(tmp_path: Path) -> None:
    """Settings, credentials and the environment part redact every secret they hold."""
    settings = make_settings(tmp_path, environ={
        "GITLAB_API_TOKEN": "glpat-api-token-value",
        "CIBROKER_REDIS_URL": "redis://:redis-password-value@127.0.0.1:6379/0",
        "CIBROKER_API_TOKENS": "api-token-one-long-enough-x,api-token-two-long-enough-x",
    })
    assert settings.credentials["gitlab"].webhook_values() == ("topsecret", "1234567")
    assert settings.credentials["gitlab-signed"].signing_values() == (SECRETS["GITLAB_SIGNING_SECRET"],)
    assert settings.env.api_token_values() == ("api-token-one-long-enough-x", "api-token-two-long-enough-x")
    shown = "\n".join([
        repr(settings), str(settings), repr(settings.env), str(settings.env),
        repr(settings.credentials), *(repr(c) for c in settings.credentials.values()),
        *(str(c) for c in settings.credentials.values()),
    ])
    for value in [*SECRETS.values(), "glpat-api-token-value", "redis-password-value", "api-token-one-long-enough-x", "api-token-two-long-enough-x"]:
        assert value not in shown
    assert "**********" in shown


def test_a_file_secret_is_read_relative_to_the_routing_file(tmp_path: Path) -> None:
    """`{file: secrets/hook}` is found next to the routing file, whatever the working directory; whitespace is trimmed."""
    config_dir = tmp_path / "conf"
    write(config_dir / "secrets", "secret-from-a-file\n", name="hook")
    absolute = write(tmp_path / "elsewhere", "  absolute-secret \n", name="token")
    path = write(config_dir, document(hosts={"gitlab": host(
        webhook_secrets=[{"file": "secrets/hook"}], token={"file": str(absolute)})}))
    settings = load_settings({}, config_path=path)
    creds = settings.credentials["gitlab"]
    assert creds.webhook_values() == ("secret-from-a-file",)
    assert creds.token is not None and creds.token.get_secret_value() == "absolute-secret"
    assert settings.warnings == ()


def test_a_missing_or_empty_secret_file_counts_as_unset(tmp_path: Path) -> None:
    """A file secret that is absent or blank is skipped with a warning, like an unset variable."""
    write(tmp_path, "\n", name="blank")
    path = write(tmp_path, document(hosts={"gitlab": host(
        webhook_secrets=[{"file": "absent"}, {"file": "blank"}, {"env": "GITLAB_WEBHOOK_SECRET"}])}))
    settings = load_settings({"GITLAB_WEBHOOK_SECRET": "from-env"}, config_path=path)
    assert settings.credentials["gitlab"].webhook_values() == ("from-env",)
    assert settings.warnings == (
        "hosts.gitlab.webhook_secrets[0]: file absent is not set (skipped)",
        "hosts.gitlab.webhook_secrets[1]: file blank is not set (skipped)",
    )


def test_one_of_two_webhook_secrets_unset_loads_with_a_rotation_warning(tmp_path: Path) -> None:
    """During rotation one secret may be unset: the host keeps the other one, and the gap is a warning."""
    env = {k: v for k, v in EXAMPLE_SECRETS.items() if k != "GITLAB_WEBHOOK_SECRET_PREVIOUS"}
    settings = load_settings(env, config_path=EXAMPLE)
    assert settings.credentials["gitlab"].webhook_values() == ("current-hook-secret",)
    assert settings.warnings == ("hosts.gitlab.webhook_secrets[1]: env GITLAB_WEBHOOK_SECRET_PREVIOUS is not set (skipped)",)


def test_an_empty_variable_counts_as_unset() -> None:
    """GITLAB_WEBHOOK_SECRET="" is not a secret; it is skipped like an unset one."""
    settings = load_settings({**EXAMPLE_SECRETS, "GITLAB_WEBHOOK_SECRET": ""}, config_path=EXAMPLE)
    assert settings.credentials["gitlab"].webhook_values() == ("previous-hook-secret",)
    assert settings.warnings == ("hosts.gitlab.webhook_secrets[0]: env GITLAB_WEBHOOK_SECRET is not set (skipped)",)


def test_no_webhook_secret_set_is_an_error_naming_the_variables_never_a_value(tmp_path: Path) -> None:
    """With none of a host's webhook secrets set the settings fail, naming the variables; no other host's value leaks."""
    environ = {k: v for k, v in SECRETS.items() if not k.startswith("GITLAB_WEBHOOK")}
    path = write(tmp_path, ROUTING)
    with pytest.raises(ConfigError) as caught:
        load_settings(environ, config_path=path)
    assert caught.value.problems == [
        f"{path}: hosts.gitlab.webhook_secrets: none is set (env GITLAB_WEBHOOK_SECRET, env GITLAB_WEBHOOK_SECRET_PREVIOUS); "
        "every request to /hooks/gitlab would be refused"
    ]
    for value in environ.values():
        assert value not in str(caught.value)


def test_no_signing_secret_set_is_an_error(tmp_path: Path) -> None:
    """A gitlab host that authenticates only by signing secrets needs one of them set."""
    environ = {k: v for k, v in SECRETS.items() if k != "GITLAB_SIGNING_SECRET"}
    path = write(tmp_path, ROUTING)
    with pytest.raises(ConfigError) as caught:
        load_settings(environ, config_path=path)
    assert caught.value.problems == [f"{path}: hosts.gitlab-signed.signing_secrets: none is set (env GITLAB_SIGNING_SECRET)"]


def test_every_host_missing_its_secrets_is_reported_at_once(tmp_path: Path) -> None:
    """Secret problems of several hosts are listed together."""
    path = write(tmp_path, ROUTING)
    with pytest.raises(ConfigError) as caught:
        load_settings({}, config_path=path)
    assert [p.split(": ")[1] for p in caught.value.problems] == [
        "hosts.gitlab.webhook_secrets", "hosts.gitlab-signed.signing_secrets",
        "hosts.github.webhook_secrets", "hosts.gitea.webhook_secrets",
    ]


def test_a_missing_api_token_is_only_a_warning() -> None:
    """Without its API token a host still takes webhooks; the warning says statuses cannot be posted."""
    env = {k: v for k, v in EXAMPLE_SECRETS.items() if k != "GITLAB_API_TOKEN"}
    settings = load_settings(env, config_path=EXAMPLE)
    assert settings.credentials["gitlab"].token is None
    assert settings.warnings == ("hosts.gitlab.token: env GITLAB_API_TOKEN is not set; commit statuses cannot be posted",)


# --- CIBROKER_* environment ------------------------------------------------------------------


def test_environment_defaults() -> None:
    """With no CIBROKER_* variables: 1 MiB body limit, 64 webhooks in flight, 14 days retention and dedup window."""
    env = EnvSettings.from_environ({"PATH": "/usr/bin", "MAX_BODY_BYTES": "not ours"})
    assert env.max_body_bytes == 1024 * 1024
    assert env.max_inflight_webhooks == 64 and env.api_failures_per_minute == 10
    assert (env.header_timeout_seconds, env.keep_alive_seconds) == (10.0, 5.0)
    assert env.retention_days == 14
    assert env.dedup_ttl_seconds == 14 * 24 * 3600
    assert env.queue == "cibroker"
    assert env.config is None and env.redis_url is None and env.api_token_values() == ()


def test_environment_values_are_read_from_cibroker_variables() -> None:
    """CIBROKER_<NAME> sets <name>; an empty value means the default."""
    env = EnvSettings.from_environ({"CIBROKER_MAX_BODY_BYTES": "2048", "CIBROKER_RETENTION_DAYS": "3",
                                    "CIBROKER_QUEUE": "", "CIBROKER_STATE_DIR": "/var/lib/cibroker"})
    assert (env.max_body_bytes, env.retention_days, env.queue, env.state_dir) == (
        2048, 3, "cibroker", Path("/var/lib/cibroker"))


def test_a_non_numeric_body_limit_is_a_config_error_naming_the_variable() -> None:
    """CIBROKER_MAX_BODY_BYTES=ten is refused, and the error names the variable."""
    with pytest.raises(ConfigError) as caught:
        EnvSettings.from_environ({"CIBROKER_MAX_BODY_BYTES": "ten"})
    assert caught.value.problems == [
        "environment: CIBROKER_MAX_BODY_BYTES: Input should be a valid integer, unable to parse string as an integer"
    ]


def test_every_bad_environment_variable_is_reported_at_once() -> None:
    """Several bad CIBROKER_* values are all listed."""
    with pytest.raises(ConfigError) as caught:
        EnvSettings.from_environ({"CIBROKER_MAX_BODY_BYTES": "10", "CIBROKER_LOG_LEVEL": "loud"})
    assert caught.value.problems == [
        "environment: CIBROKER_MAX_BODY_BYTES: Input should be greater than or equal to 1024",
        "environment: CIBROKER_LOG_LEVEL: Input should be 'debug', 'info', 'warning' or 'error'",
    ]


def test_load_settings_refuses_a_bad_environment_before_reading_the_routing_file() -> None:
    """A bad CIBROKER_* value fails load_settings with the environment problem."""
    with pytest.raises(ConfigError) as caught:
        load_settings({**EXAMPLE_SECRETS, "CIBROKER_MAX_BODY_BYTES": "lots"}, config_path=EXAMPLE)
    assert [p.split(": ")[1] for p in caught.value.problems] == ["CIBROKER_MAX_BODY_BYTES"]


# --- embedded defaults -----------------------------------------------------------------------


def test_embedded_defaults_create_a_private_webhook_secret_and_reuse_it(tmp_path: Path) -> None:
    """With no routing file: the bundled defaults, one random secret per host kind (0600), the same next time.

    Issue 11 gap 5: the GitLab and GitHub hosts never share a secret (a GitHub HMAC made with the
    GitLab token must not verify; tests/edge/test_edge_bounds.py plays it through the app).
    """
    state = tmp_path / "state"
    first = load_settings({"CIBROKER_STATE_DIR": str(state)}, config_path=None)
    assert first.embedded_defaults is True and first.source == EMBEDDED
    assert sorted(first.routing.hosts) == ["github", "gitlab"]
    values = {}
    for name in ("webhook-secret", "github-webhook-secret"):
        secret_file = state / name
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
        values[name] = secret_file.read_text().strip()
        assert len(values[name]) >= 32
    assert values["webhook-secret"] != values["github-webhook-secret"]
    assert first.credentials["gitlab"].webhook_values() == (values["webhook-secret"],)
    assert first.credentials["github"].webhook_values() == (values["github-webhook-secret"],)
    assert not [v for v in values.values() if v in repr(first)]

    second = load_settings({"CIBROKER_STATE_DIR": str(state)}, config_path=None)
    assert second.credentials["gitlab"].webhook_values() == (values["webhook-secret"],)
    assert second.credentials["github"].webhook_values() == (values["github-webhook-secret"],)
    assert sorted(p.name for p in state.iterdir()) == ["github-webhook-secret", "signing-key", "webhook-secret"]


def test_embedded_defaults_prefer_a_webhook_secret_from_the_environment(tmp_path: Path) -> None:
    """GITLAB_WEBHOOK_SECRET, when set, is the embedded gitlab host's first secret; the file stays second."""
    settings = load_settings({"CIBROKER_STATE_DIR": str(tmp_path), "GITLAB_WEBHOOK_SECRET": "from-env"})
    file_value = (tmp_path / "webhook-secret").read_text().strip()
    assert settings.credentials["gitlab"].webhook_values() == ("from-env", file_value)
    assert "hosts.gitlab.webhook_secrets[0]: env GITLAB_WEBHOOK_SECRET is not set (skipped)" not in settings.warnings
    assert "hosts.github.webhook_secrets[0]: env GITHUB_WEBHOOK_SECRET is not set (skipped)" in settings.warnings


def test_two_state_directories_get_different_secrets(tmp_path: Path) -> None:
    """The dev secret is random, not a constant."""
    a = ensure_dev_secret(tmp_path / "a").read_text()
    b = ensure_dev_secret(tmp_path / "b").read_text()
    assert a != b


def test_an_existing_dev_secret_is_never_replaced(tmp_path: Path) -> None:
    """ensure_dev_secret keeps whatever secret is already there."""
    write(tmp_path, "chosen-by-the-operator\n", name="webhook-secret")
    assert ensure_dev_secret(tmp_path).read_text() == "chosen-by-the-operator\n"


def test_processes_starting_together_all_get_the_same_whole_dev_secret(tmp_path: Path) -> None:
    """Many concurrent first starts agree on one complete secret and leave no temporary files."""
    barrier = threading.Barrier(16)
    seen: list[str] = []
    failures: list[BaseException] = []

    def start() -> None:
        try:
            barrier.wait()
            seen.append(ensure_dev_secret(tmp_path).read_text())
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            failures.append(exc)

    threads = [threading.Thread(target=start) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert len(set(seen)) == 1 and seen[0].endswith("\n") and len(seen[0].strip()) >= 32
    assert [p.name for p in tmp_path.iterdir()] == ["webhook-secret"]


@pytest.mark.parametrize(("tokens", "named"), [("short-token", "token1"), ("ops=abcdefghij,ci=" + "x" * 30, "ops")])
def test_an_api_token_shorter_than_24_characters_is_refused_at_start_naming_its_entry(tokens: str, named: str) -> None:
    """Issue 11 gap 6: CIBROKER_API_TOKENS entries need 24+ characters; the error names the entry, never its value."""
    with pytest.raises(ConfigError) as caught:
        load_settings({**EXAMPLE_SECRETS, "CIBROKER_API_TOKENS": tokens}, config_path=EXAMPLE)
    [problem] = caught.value.problems
    assert problem.startswith(f"environment: CIBROKER_API_TOKENS: entry {named!r} is ") and "at least 24" in problem
    assert "abcdefghij" not in problem and "short-token" not in problem
    assert load_settings({**EXAMPLE_SECRETS, "CIBROKER_API_TOKENS": "ops=" + "y" * 24}, config_path=EXAMPLE).env.api_token_names()


def test_route_scoped_secrets_resolve_like_host_ones_and_errors_name_the_route() -> None:
    """routes[i].webhook_secrets: resolved into route_credentials; none set is an error at routes[i]."""
    text = document(hosts={"gitlab": host(webhook_secrets=[])},
                    routes=[route(name="shop", webhook_secrets=[{"env": "SHOP_HOOK"}, {"env": "SHOP_HOOK_OLD"}])])
    file = Path(tempfile.mkdtemp()) / "routing.yaml"
    file.write_text(text)
    settings = load_settings({"SHOP_HOOK": "shop-secret"}, config_path=file)
    assert settings.route_credentials["shop"].webhook_values() == ("shop-secret",)
    assert "routes[0].webhook_secrets[1]: env SHOP_HOOK_OLD is not set (skipped)" in settings.warnings
    with pytest.raises(ConfigError) as caught:
        load_settings({}, config_path=file)
    assert caught.value.problems == [f"{file}: routes[0].webhook_secrets: none is set (env SHOP_HOOK, env SHOP_HOOK_OLD); "
                                     "deliveries for route shop would be refused"]


def test_a_host_may_leave_its_secrets_to_its_routes_but_then_every_route_needs_one() -> None:
    """No host-wide secret is fine when routes carry theirs; a route without one is an error at its key path."""
    ok = document(hosts={"gitlab": host(webhook_secrets=[])}, routes=[route(name="a", webhook_secrets=[{"env": "A"}])])
    assert parse_routing(ok, source="routing.yaml").routes[0].webhook_secrets[0].env == "A"
    text = document(hosts={"gitlab": host(webhook_secrets=[])},
                    routes=[route(name="a", webhook_secrets=[{"env": "A"}]), route(name="b")])
    assert problems(text) == ["routing.yaml: routes[1].webhook_secrets: host 'gitlab' has no webhook_secrets of its own, so "
                              "this route needs its own webhook_secrets (or signing_secrets): no delivery could ever be "
                              "authenticated for it"]
    github = document(hosts={"hub": host(kind="github")}, routes=[route(name="a", host="hub", signing_secrets=[{"env": "S"}])])
    assert problems(github) == ["routing.yaml: routes[0].signing_secrets: signing_secrets is GitLab's signing token; "
                                "github and gitea sign with webhook_secrets"]


def test_routing_file_model_accepts_exactly_what_parse_routing_accepts() -> None:
    """RoutingFile.model_validate applies the same cross-route checks as parse_routing."""
    data = yaml.safe_load(document(routes=[route(host="nowhere")]))
    with pytest.raises(ValueError, match=r"routes\.0\.host"):
        RoutingFile.model_validate(data)
