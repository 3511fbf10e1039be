"""`cibroker config check`, run as the installed console script in a clean environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import FIXTURES

CIBROKER = Path(sys.executable).parent / "cibroker"
EXAMPLE = FIXTURES / "routing" / "example.yaml"
SHIPPED_EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "example.yaml"
BROKEN = FIXTURES / "routing" / "broken.yaml"
EXAMPLE_SECRETS = {
    "GITLAB_WEBHOOK_SECRET": "current-hook-secret",
    "GITLAB_WEBHOOK_SECRET_PREVIOUS": "previous-hook-secret",
    "GITLAB_API_TOKEN": "glpat-api-token-value",
}
INLINE = "a secret is never written inline: write {env: VARIABLE} or {file: PATH}"
BROKEN_ERRORS = [
    f"{BROKEN}: hosts.gitlab.token: {INLINE}",
    f"{BROKEN}: routes[0].events: Field required",
    f"{BROKEN}: routes[0].evnts: Extra inputs are not permitted",
    f"{BROKEN}: routes[0].image_tag: unknown placeholder {{version}} in '{{version}}'; "
    "allowed: {sha} {short_sha} {tag} {branch} {ref}",
    f"{BROKEN}: routes[1].host: host 'gitlub' is not defined under hosts (defined: gitlab)",
    f"{BROKEN}: routes[1].name: route name 'shop-api' is already used by routes[0]; "
    "names identify routes in PipelineRun labels",
]


def check(tmp_path: Path, *args: str, secrets: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `cibroker config check ARGS` with an environment built from scratch (plus `secrets`)."""
    env = {"PATH": os.defpath, "HOME": str(tmp_path), "LC_ALL": "C.UTF-8", **(secrets or {})}
    return subprocess.run([str(CIBROKER), "config", "check", *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=False)


def assert_no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize("path", [EXAMPLE, SHIPPED_EXAMPLE], ids=["issue-example", "config-example"])
def test_the_example_checks_ok_with_its_secrets_set(tmp_path: Path, path: Path) -> None:
    """The documented example passes: exit 0, one OK line with a summary, nothing on stderr."""
    result = check(tmp_path, str(path), secrets=EXAMPLE_SECRETS)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == f"{path}: OK (1 host(s), 1 route(s))\n"


def test_unset_secrets_are_warnings_by_default(tmp_path: Path) -> None:
    """Without --require-secrets, unset secrets are warned about (naming the variables) and the file is still OK."""
    result = check(tmp_path, str(EXAMPLE))
    assert result.returncode == 0
    assert result.stdout == f"{EXAMPLE}: OK (1 host(s), 1 route(s))\n"
    assert result.stderr.splitlines() == [
        f"warning: {EXAMPLE}: hosts.gitlab.webhook_secrets[0]: env GITLAB_WEBHOOK_SECRET is not set (skipped)",
        f"warning: {EXAMPLE}: hosts.gitlab.webhook_secrets[1]: env GITLAB_WEBHOOK_SECRET_PREVIOUS is not set (skipped)",
        f"warning: {EXAMPLE}: hosts.gitlab.token: env GITLAB_API_TOKEN is not set; commit statuses cannot be posted",
        f"warning: {EXAMPLE}: hosts.gitlab.webhook_secrets: none is set "
        "(env GITLAB_WEBHOOK_SECRET, env GITLAB_WEBHOOK_SECRET_PREVIOUS); every request to /hooks/gitlab would be refused",
    ]


def test_a_broken_file_fails_with_one_precise_line_per_problem(tmp_path: Path) -> None:
    """Exit 1; stderr has `error: <file>: <key.path>: <message>` for every problem; no traceback, no OK."""
    result = check(tmp_path, str(BROKEN), secrets=EXAMPLE_SECRETS)
    assert result.returncode == 1
    assert result.stdout == ""
    assert sorted(result.stderr.splitlines()) == sorted(f"error: {line}" for line in BROKEN_ERRORS)
    assert "glpat-inline-token-value" not in result.stderr
    assert_no_traceback(result)


def test_json_output_lists_every_error(tmp_path: Path) -> None:
    """--json prints one JSON document on stdout: ok false, the file, and each problem line."""
    result = check(tmp_path, "--json", str(BROKEN))
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert report["file"] == str(BROKEN)
    assert sorted(report["errors"]) == sorted(BROKEN_ERRORS)
    assert report["warnings"] == [] and report["summary"] == ""
    assert result.stderr == ""


def test_json_output_for_a_good_file(tmp_path: Path) -> None:
    """--json on the example: ok true, no errors or warnings, and the summary."""
    result = check(tmp_path, "--json", str(EXAMPLE), secrets=EXAMPLE_SECRETS)
    assert result.returncode == 0
    assert json.loads(result.stdout) == {
        "file": str(EXAMPLE), "ok": True, "errors": [], "warnings": [], "summary": "1 host(s), 1 route(s)"}


def test_require_secrets_fails_when_a_referenced_secret_is_unset(tmp_path: Path) -> None:
    """--require-secrets turns unset secrets into errors naming each variable; exit 1."""
    only_token = {"GITLAB_API_TOKEN": "glpat-api-token-value"}
    result = check(tmp_path, "--require-secrets", str(EXAMPLE), secrets=only_token)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"error: {EXAMPLE}: hosts.gitlab.webhook_secrets[0]: env GITLAB_WEBHOOK_SECRET is not set (skipped)",
        f"error: {EXAMPLE}: hosts.gitlab.webhook_secrets[1]: env GITLAB_WEBHOOK_SECRET_PREVIOUS is not set (skipped)",
        f"error: {EXAMPLE}: hosts.gitlab.webhook_secrets: none is set "
        "(env GITLAB_WEBHOOK_SECRET, env GITLAB_WEBHOOK_SECRET_PREVIOUS); every request to /hooks/gitlab would be refused",
    ]
    assert "glpat-api-token-value" not in result.stdout + result.stderr
    assert_no_traceback(result)


def test_require_secrets_fails_on_a_missing_api_token(tmp_path: Path) -> None:
    """With --require-secrets even the API token must be set."""
    secrets = {k: v for k, v in EXAMPLE_SECRETS.items() if k != "GITLAB_API_TOKEN"}
    result = check(tmp_path, "--require-secrets", "--json", str(EXAMPLE), secrets=secrets)
    assert result.returncode == 1
    assert json.loads(result.stdout)["errors"] == [
        f"{EXAMPLE}: hosts.gitlab.token: env GITLAB_API_TOKEN is not set; commit statuses cannot be posted"]


def test_require_secrets_passes_when_every_secret_is_set(tmp_path: Path) -> None:
    """--require-secrets with all secrets set: exit 0, and no secret value is printed."""
    result = check(tmp_path, "--require-secrets", str(EXAMPLE), secrets=EXAMPLE_SECRETS)
    assert (result.returncode, result.stderr) == (0, "")
    for value in EXAMPLE_SECRETS.values():
        assert value not in result.stdout


def test_a_file_secret_is_found_next_to_the_checked_file(tmp_path: Path) -> None:
    """`{file: ...}` is resolved relative to the checked file's directory, not the working directory."""
    config_dir = tmp_path / "conf"
    config_dir.mkdir()
    (config_dir / "hook-secret").write_text("from-a-file\n")
    routing = config_dir / "routing.yaml"
    routing.write_text(EXAMPLE.read_text().replace(
        "[{env: GITLAB_WEBHOOK_SECRET}, {env: GITLAB_WEBHOOK_SECRET_PREVIOUS}]", "[{file: hook-secret}]"))
    result = check(tmp_path, "--require-secrets", str(routing), secrets={"GITLAB_API_TOKEN": "t"})
    assert (result.returncode, result.stderr) == (0, "")


def test_a_missing_file_is_one_error_line(tmp_path: Path) -> None:
    """A path that does not exist: exit 1 and `error: <file>: cannot read: <reason>`."""
    missing = tmp_path / "nope.yaml"
    result = check(tmp_path, str(missing))
    assert result.returncode == 1
    assert result.stderr == f"error: {missing}: cannot read: No such file or directory\n"
    assert_no_traceback(result)


def test_a_yaml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    """Broken YAML: exit 1 with `error: <file>:<line>:<col>: not valid YAML: ...`."""
    path = tmp_path / "routing.yaml"
    path.write_text("hosts:\n\tgitlab: {}\n")
    result = check(tmp_path, str(path))
    assert result.returncode == 1
    assert result.stderr == f"error: {path}:2:1: not valid YAML: found character '\\t' that cannot start any token\n"
    assert_no_traceback(result)


def test_a_file_that_is_not_utf8_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    """A binary file is reported as an error line, exit 1, without a traceback."""
    path = tmp_path / "routing.yaml"
    path.write_bytes(b"hosts: \xff\xfe\n")
    result = check(tmp_path, str(path))
    assert_no_traceback(result)
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: {path}: ")
