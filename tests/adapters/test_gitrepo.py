"""GitCommitResolver against real git repositories in tmp_path and tiny local servers."""

from __future__ import annotations

import base64
import fcntl
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from broker.core.errors import Permanent, Transient
from workers.adapters.gitrepo import GitCommitResolver, scrub_url

AUTH = ("user", "s3cr3t-token")
AUTH_HEADER = "Basic " + base64.b64encode(b"user:s3cr3t-token").decode()
MISSING_SHA = "deadbeef" * 5
REAL_GIT = shutil.which("git") or "git"  # looked up once, so the PATH spy below sees only the resolver


def git(*args: str, cwd: Path) -> str:
    return subprocess.run([REAL_GIT, *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(autouse=True)
def git_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A HOME of the test's own: no user or system git config leaks in."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for role in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{role}_NAME", "Test")
        monkeypatch.setenv(f"GIT_{role}_EMAIL", "test@example.com")
    return home


@dataclass(frozen=True)
class Origin:
    path: Path
    url: str
    c1: str  # lightweight tag v1.0
    c2: str  # annotated tag v1.2
    c3: str  # neither a tip nor tagged
    c4: str  # main's tip
    f1: str  # feature, diverged from c1
    tag_object: str


@pytest.fixture
def origin(tmp_path: Path) -> Origin:
    """main: c1 (v1.0) - c2 (v1.2, annotated) - c3 - c4; feature: c1 - f1; a branch named refs/tags/v9."""
    path = tmp_path / "origin"
    git("init", "-q", "-b", "main", str(path), cwd=tmp_path)

    def commit(message: str) -> str:
        git("commit", "-q", "--allow-empty", "-m", message, cwd=path)
        return git("rev-parse", "HEAD", cwd=path)

    c1 = commit("c1")
    git("tag", "v1.0", cwd=path)
    c2 = commit("c2")
    git("tag", "-a", "v1.2", "-m", "release 1.2", cwd=path)
    git("branch", "refs/tags/v9", cwd=path)  # refs/heads/refs/tags/v9: tail-matches refs/tags/v9
    c3 = commit("c3")
    c4 = commit("c4")
    git("checkout", "-q", "-b", "feature", c1, cwd=path)
    f1 = commit("f1")
    git("checkout", "-q", "main", cwd=path)
    return Origin(path, path.as_uri(), c1, c2, c3, c4, f1, git("rev-parse", "v1.2", cwd=path))


@pytest.fixture
def resolver(tmp_path: Path) -> GitCommitResolver:
    return GitCommitResolver(tmp_path / "cache", timeout=30)


@dataclass
class GitSpy:
    argv_log: Path
    env_log: Path

    def argv(self) -> str:
        return self.argv_log.read_text() if self.argv_log.exists() else ""


@pytest.fixture
def git_spy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> GitSpy:
    """A `git` first on PATH that records its argv and some GIT_* environment, then runs the real git."""
    real = REAL_GIT
    bindir = tmp_path / "spybin"
    bindir.mkdir()
    spy = GitSpy(tmp_path / "git-argv.log", tmp_path / "git-env.log")
    script = bindir / "git"
    script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> "{spy.argv_log}"\n'
                      f'env | grep -E "^GIT_(CONFIG_|TERMINAL_PROMPT|ALLOW_PROTOCOL)" >> "{spy.env_log}"\nexec "{real}" "$@"\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{Path(real).parent}:/usr/bin:/bin")
    return spy


@dataclass
class Recorder:
    url: str
    status: int = 404
    headers: list[dict[str, str]] = field(default_factory=list)


@pytest.fixture
def http_recorder() -> Iterator[Recorder]:
    """A plain HTTP server (not a git server) that records each request's headers and answers `status`."""
    recorder = Recorder(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            recorder.headers.append(dict(self.headers))
            self.send_response(recorder.status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    recorder.url = f"http://127.0.0.1:{server.server_address[1]}/group/repo.git"
    yield recorder
    server.shutdown()
    server.server_close()
    thread.join()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- resolve_tag -------------------------------------------------------------------------


def test_annotated_tag_peels_to_its_commit(resolver: GitCommitResolver, origin: Origin) -> None:
    """An annotated tag resolves to the commit it points at, not to the tag object."""
    sha = resolver.resolve_tag(clone_url=origin.url, tag="v1.2", auth=None)
    assert sha == origin.c2
    assert sha != origin.tag_object


def test_lightweight_tag_resolves_to_its_commit(resolver: GitCommitResolver, origin: Origin) -> None:
    """A lightweight tag resolves to the commit it names."""
    assert resolver.resolve_tag(clone_url=origin.url, tag="v1.0", auth=None) == origin.c1


def test_missing_tag_is_permanent_and_named(resolver: GitCommitResolver, origin: Origin) -> None:
    """A tag the remote does not have is Permanent, naming the tag and the URL."""
    with pytest.raises(Permanent, match="tag v7.7 not found on file://") as caught:
        resolver.resolve_tag(clone_url=origin.url, tag="v7.7", auth=None)
    assert origin.url in str(caught.value)


def test_branch_whose_name_ends_like_the_tag_is_not_the_tag(resolver: GitCommitResolver, origin: Origin) -> None:
    """ls-remote tail-matches patterns; refs/heads/refs/tags/v9 must not pass for tag v9."""
    with pytest.raises(Permanent, match="tag v9 not found"):
        resolver.resolve_tag(clone_url=origin.url, tag="v9", auth=None)


@pytest.mark.parametrize("url", [
    "--upload-pack=touch /tmp/pwned",
    "--upload-pack=evil",
    "-oProxyCommand=evil",
    "ext::sh -c touch% /tmp/pwned",
    "ext::evil",
    "file:///tmp/some repo",
    "https://example.com/repo.git\n",
    "https://example.com/a\tb",
    "git://example.com/repo.git",
    "/srv/git/repo.git",
    "ssh://-oProxyCommand=evil/repo",
    "https:///no-host",
    "file://otherhost/srv/repo.git",
    "ssh://git:pw@example.com/repo.git",
    "",
])
def test_bad_clone_urls_are_refused_without_running_git(
        resolver: GitCommitResolver, git_spy: GitSpy, origin: Origin, url: str) -> None:
    """URLs outside the allow-list, starting with '-' or holding whitespace are Permanent before git runs."""
    with pytest.raises(Permanent, match="refusing clone URL"):
        resolver.resolve_tag(clone_url=url, tag="v1.0", auth=None)
    with pytest.raises(Permanent, match="refusing clone URL"):
        resolver.is_ancestor(clone_url=url, ancestor=origin.c1, descendant=origin.c4, auth=None)
    assert git_spy.argv() == ""


def test_the_git_spy_sees_git_run(resolver: GitCommitResolver, git_spy: GitSpy, origin: Origin) -> None:
    """The spy used to prove 'git did not run' does record a run (so those tests can fail)."""
    resolver.resolve_tag(clone_url=origin.url, tag="v1.0", auth=None)
    assert "ls-remote" in git_spy.argv()


def test_git_never_prompts_and_only_allowed_protocols_run(
        resolver: GitCommitResolver, git_spy: GitSpy, origin: Origin) -> None:
    """Every git the resolver starts has terminal prompts off and GIT_ALLOW_PROTOCOL narrowed."""
    resolver.resolve_tag(clone_url=origin.url, tag="v1.0", auth=None)
    resolver.is_ancestor(clone_url=origin.url, ancestor=origin.c1, descendant=origin.c4, auth=None)
    runs = len(git_spy.argv().splitlines())
    env = git_spy.env_log.read_text().splitlines()
    assert runs >= 3
    assert env.count("GIT_TERMINAL_PROMPT=0") == runs
    assert env.count("GIT_ALLOW_PROTOCOL=https:http:ssh:file") == runs
    assert not any(line.startswith(("GIT_CONFIG_COUNT", "GIT_CONFIG_VALUE")) for line in env)  # no auth, no header


@pytest.mark.parametrize("tag", ["v1 2", "v*", "a..b", "-x", "v1.2^{}", "v1:2", "", "v1.lock", "/v1"])
def test_bad_tag_names_are_refused_without_running_git(
        resolver: GitCommitResolver, git_spy: GitSpy, origin: Origin, tag: str) -> None:
    """Tag names git would reject, or that ls-remote would treat as a glob, are Permanent."""
    with pytest.raises(Permanent, match="refusing tag name"):
        resolver.resolve_tag(clone_url=origin.url, tag=tag, auth=None)
    assert git_spy.argv() == ""


def test_missing_local_repository_is_permanent(resolver: GitCommitResolver, tmp_path: Path) -> None:
    """A file:// path that does not exist is Permanent (no retry creates it), for both verbs."""
    url = (tmp_path / "nowhere" / "repo.git").as_uri()
    with pytest.raises(Permanent, match="repository not found at file://"):
        resolver.resolve_tag(clone_url=url, tag="v1.0", auth=None)
    with pytest.raises(Permanent, match="repository not found at file://"):
        resolver.is_ancestor(clone_url=url, ancestor="a" * 40, descendant="b" * 40, auth=None)


# --- is_ancestor -------------------------------------------------------------------------


def test_older_commit_on_the_branch_is_an_ancestor(resolver: GitCommitResolver, origin: Origin) -> None:
    """A commit earlier on the same branch is an ancestor of the tip."""
    assert resolver.is_ancestor(clone_url=origin.url, ancestor=origin.c1, descendant=origin.c4, auth=None) is True


def test_newer_commit_is_not_an_ancestor(resolver: GitCommitResolver, origin: Origin) -> None:
    """The tip is not an ancestor of an older commit (a deploy would go backwards)."""
    assert resolver.is_ancestor(clone_url=origin.url, ancestor=origin.c4, descendant=origin.c2, auth=None) is False


def test_diverged_commits_are_not_ancestors_either_way(resolver: GitCommitResolver, origin: Origin) -> None:
    """A commit on a diverged branch is not an ancestor, in either direction."""
    assert resolver.is_ancestor(clone_url=origin.url, ancestor=origin.f1, descendant=origin.c4, auth=None) is False
    assert resolver.is_ancestor(clone_url=origin.url, ancestor=origin.c4, descendant=origin.f1, auth=None) is False


def test_uppercase_commit_ids_are_accepted(resolver: GitCommitResolver, origin: Origin) -> None:
    """Commit ids are compared case-insensitively, as git does."""
    assert resolver.is_ancestor(clone_url=origin.url, ancestor=origin.c1.upper(), descendant=origin.c3, auth=None)


def test_unknown_commit_is_permanent_and_named(resolver: GitCommitResolver, origin: Origin) -> None:
    """A commit the remote does not have, even after fetching every head and tag, is Permanent."""
    with pytest.raises(Permanent, match=f"commit {MISSING_SHA} not found on file://"):
        resolver.is_ancestor(clone_url=origin.url, ancestor=MISSING_SHA, descendant=origin.c4, auth=None)


@pytest.mark.parametrize("sha", ["abc123", "HEAD", "-x", "g" * 40, "main"])
def test_bad_commit_ids_are_refused_without_running_git(
        resolver: GitCommitResolver, git_spy: GitSpy, origin: Origin, sha: str) -> None:
    """Only full commit ids are accepted: no refs, no abbreviations, no options."""
    with pytest.raises(Permanent, match="refusing commit"):
        resolver.is_ancestor(clone_url=origin.url, ancestor=sha, descendant=origin.c4, auth=None)
    assert git_spy.argv() == ""


def test_falls_back_to_heads_and_tags_when_the_server_refuses_fetch_by_id(
        resolver: GitCommitResolver, origin: Origin, git_home: Path) -> None:
    """Protocol v0 refuses a want that is not a ref tip (c3); the resolver then fetches every head and tag."""
    (git_home / ".gitconfig").write_text("[protocol]\n\tversion = 0\n")
    assert resolver.is_ancestor(clone_url=origin.url, ancestor=origin.c3, descendant=origin.c4, auth=None) is True


def test_mirror_is_reused_without_reinit_or_remote(resolver: GitCommitResolver, origin: Origin, tmp_path: Path) -> None:
    """A second call on the same URL answers from the existing mirror: no re-init, no remote needed."""
    assert resolver.is_ancestor(clone_url=origin.url, ancestor=origin.c1, descendant=origin.c4, auth=None)
    (mirror,) = (tmp_path / "cache").iterdir()
    before = (mirror / "config").stat()
    shutil.rmtree(origin.path)
    assert resolver.is_ancestor(clone_url=origin.url, ancestor=origin.c1, descendant=origin.c4, auth=None)
    after = (mirror / "config").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert list((tmp_path / "cache").iterdir()) == [mirror]


def test_one_mirror_per_clone_url(resolver: GitCommitResolver, origin: Origin, tmp_path: Path) -> None:
    """Two URLs get two mirrors, each named by a hash of its URL."""
    other = tmp_path / "other"
    shutil.copytree(origin.path, other)
    resolver.is_ancestor(clone_url=origin.url, ancestor=origin.c1, descendant=origin.c4, auth=None)
    resolver.is_ancestor(clone_url=other.as_uri(), ancestor=origin.c1, descendant=origin.c4, auth=None)
    names = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(names) == 2
    assert all(len(name) == 32 and "origin" not in name for name in names)


def test_concurrent_calls_on_one_url_all_succeed(resolver: GitCommitResolver, origin: Origin) -> None:
    """Threads asking about one URL at once share one mirror and all get the right answer."""
    questions = [(origin.c1, origin.c4, True), (origin.c4, origin.c1, False),
                 (origin.f1, origin.c4, False), (origin.c2, origin.c3, True)] * 2
    start = threading.Barrier(len(questions))
    answers: dict[int, bool | BaseException] = {}

    def ask(index: int, ancestor: str, descendant: str) -> None:
        start.wait()
        try:
            answers[index] = resolver.is_ancestor(clone_url=origin.url, ancestor=ancestor, descendant=descendant, auth=None)
        except BaseException as exc:  # collected and asserted below
            answers[index] = exc

    threads = [threading.Thread(target=ask, args=(i, a, d)) for i, (a, d, _) in enumerate(questions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert answers == {i: expected for i, (_, _, expected) in enumerate(questions)}


def test_a_mirror_locked_by_another_process_is_waited_for(resolver: GitCommitResolver, origin: Origin, tmp_path: Path) -> None:
    """While another holder has the mirror's flock, a call waits; it completes once the lock is released."""
    resolver.is_ancestor(clone_url=origin.url, ancestor=origin.c1, descendant=origin.c2, auth=None)
    (mirror,) = (tmp_path / "cache").iterdir()
    answers: list[bool] = []
    with open(mirror / "cibroker.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        worker = threading.Thread(target=lambda: answers.append(resolver.is_ancestor(
            clone_url=origin.url, ancestor=origin.c1, descendant=origin.c4, auth=None)))
        worker.start()
        worker.join(timeout=1)
        assert worker.is_alive() and answers == []
        fcntl.flock(handle, fcntl.LOCK_UN)
    worker.join(timeout=30)
    assert answers == [True]


# --- branch_contains: the pushed commit is real and on its branch ---------------------------


def test_a_branch_at_the_pushed_commit_answers_its_head_with_one_ls_remote(
        resolver: GitCommitResolver, origin: Origin, git_spy: GitSpy) -> None:
    assert resolver.branch_contains(clone_url=origin.url, branch="main", sha=origin.c4, auth=None) == origin.c4
    assert [line.split()[0] for line in git_spy.argv().splitlines()] == ["ls-remote"]  # no mirror, no fetch


def test_a_branch_that_moved_on_contains_the_pushed_ancestor(resolver: GitCommitResolver, origin: Origin) -> None:
    """c2 was pushed, then main moved on to c4: c2 is its ancestor, and main's head is answered."""
    assert resolver.branch_contains(clone_url=origin.url, branch="main", sha=origin.c2.upper(), auth=None) == origin.c4


def test_a_commit_only_on_another_branch_is_permanent_and_named(resolver: GitCommitResolver, origin: Origin) -> None:
    with pytest.raises(Permanent, match=f"commit {origin.f1[:12]} is not on branch main of {origin.url}: "
                                        f"the branch is at {origin.c4[:12]}"):
        resolver.branch_contains(clone_url=origin.url, branch="main", sha=origin.f1, auth=None)


def test_a_commit_the_remote_does_not_know_is_permanent(resolver: GitCommitResolver, origin: Origin) -> None:
    with pytest.raises(Permanent, match=f"commit {MISSING_SHA} not found on {origin.url}"):
        resolver.branch_contains(clone_url=origin.url, branch="main", sha=MISSING_SHA, auth=None)


def test_a_branch_that_is_gone_is_permanent(resolver: GitCommitResolver, origin: Origin) -> None:
    with pytest.raises(Permanent, match="branch gone not found"):
        resolver.branch_contains(clone_url=origin.url, branch="gone", sha=origin.c1, auth=None)


def test_an_unreachable_remote_is_transient_for_branch_contains(resolver: GitCommitResolver) -> None:
    with pytest.raises(Transient, match="could not reach"):
        resolver.branch_contains(clone_url=f"http://127.0.0.1:{closed_port()}/r.git", branch="main", sha="a" * 40, auth=AUTH)


@pytest.mark.parametrize("sha", ["abc", "g" * 40, "--upload-pack=evil" + "a" * 23])
def test_bad_pushed_commit_ids_are_refused_without_running_git(
        resolver: GitCommitResolver, origin: Origin, git_spy: GitSpy, sha: str) -> None:
    with pytest.raises(Permanent, match="expected a full 40- or 64-hex commit id"):
        resolver.branch_contains(clone_url=origin.url, branch="main", sha=sha, auth=None)
    assert git_spy.argv() == ""


# --- credentials and network failures ------------------------------------------------------


def test_credentials_stay_out_of_argv_and_errors(resolver: GitCommitResolver, git_spy: GitSpy) -> None:
    """With auth against a closed port: Transient, and the token is in git's environment only."""
    url = f"http://127.0.0.1:{closed_port()}/repo.git"
    with pytest.raises(Transient, match="could not reach http://127.0.0.1") as tag_error:
        resolver.resolve_tag(clone_url=url, tag="v1.0", auth=AUTH)
    with pytest.raises(Transient, match="could not reach http://127.0.0.1") as ancestry_error:
        resolver.is_ancestor(clone_url=url, ancestor="a" * 40, descendant="b" * 40, auth=AUTH)
    for caught in (tag_error, ancestry_error):
        assert "s3cr3t" not in str(caught.value) and "s3cr3t" not in repr(caught.value)
        assert caught.value.__cause__ is None or "s3cr3t" not in str(caught.value.__cause__)
    argv = git_spy.argv()
    assert "ls-remote" in argv and "fetch" in argv
    assert "s3cr3t" not in argv and AUTH_HEADER.split()[1] not in argv
    assert f"GIT_CONFIG_VALUE_0=Authorization: {AUTH_HEADER}" in git_spy.env_log.read_text()


@pytest.mark.parametrize("verb", ["resolve_tag", "is_ancestor", "branch_contains"])
def test_auth_is_sent_as_a_basic_header(resolver: GitCommitResolver, http_recorder: Recorder, verb: str) -> None:
    """The server sees Authorization: Basic base64(user:token); a 404 from it is Permanent."""
    with pytest.raises(Permanent, match="repository not found at http://127.0.0.1") as caught:
        call(resolver, verb, http_recorder.url, AUTH)
    assert http_recorder.headers and all(h.get("Authorization") == AUTH_HEADER for h in http_recorder.headers)
    assert "s3cr3t" not in str(caught.value)


def test_credentials_in_the_url_move_to_the_header(
        resolver: GitCommitResolver, http_recorder: Recorder, git_spy: GitSpy) -> None:
    """user:token@ in an http URL is sent as the Basic header and appears in no argv or message."""
    url = http_recorder.url.replace("http://", "http://user:s3cr3t-token@")
    with pytest.raises(Permanent) as caught:
        resolver.resolve_tag(clone_url=url, tag="v1.0", auth=None)
    assert http_recorder.headers[0].get("Authorization") == AUTH_HEADER
    assert "s3cr3t" not in str(caught.value) and http_recorder.url in str(caught.value)
    assert "s3cr3t" not in git_spy.argv()


def test_no_auth_sends_no_authorization_header(resolver: GitCommitResolver, http_recorder: Recorder) -> None:
    """Without auth, git sends no Authorization header."""
    with pytest.raises(Permanent):
        resolver.resolve_tag(clone_url=http_recorder.url, tag="v1.0", auth=None)
    assert http_recorder.headers and all("Authorization" not in h for h in http_recorder.headers)


@pytest.mark.parametrize(("status", "error", "words"), [
    (401, Permanent, "authentication failed for http://127.0.0.1"),
    (403, Permanent, "authentication failed for http://127.0.0.1"),
    (404, Permanent, "repository not found at http://127.0.0.1"),
    (503, Transient, "could not reach http://127.0.0.1"),
    (429, Transient, "could not reach http://127.0.0.1"),
])
def test_http_answers_map_to_permanent_or_transient(
        resolver: GitCommitResolver, http_recorder: Recorder,
        status: int, error: type[Exception], words: str) -> None:
    """401/403 are authentication failures, 404 a missing repository (Permanent); 5xx/429 are Transient."""
    http_recorder.status = status
    for verb in ("resolve_tag", "is_ancestor", "branch_contains"):
        with pytest.raises(error, match=words) as caught:
            call(resolver, verb, http_recorder.url, AUTH)
        assert type(caught.value) is error and "s3cr3t" not in str(caught.value)


def test_a_silent_server_times_out_as_transient(tmp_path: Path) -> None:
    """A server that accepts but never answers: git is killed after `timeout`, and that is Transient."""
    resolver = GitCommitResolver(tmp_path / "cache", timeout=1)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/repo.git"
        with pytest.raises(Transient, match=f"git ls-remote timed out after 1s on {url}"):
            resolver.resolve_tag(clone_url=url, tag="v1.0", auth=AUTH)


def test_scrub_url_drops_userinfo() -> None:
    """user:pass@ and token@ are removed from URLs inside any text; scp-like git@host: is left alone."""
    assert scrub_url("fatal: 'https://u:p@ss@host:8443/x.git/' and http://tok@h/y") == \
        "fatal: 'https://host:8443/x.git/' and http://h/y"
    assert scrub_url("git@github.com:org/repo.git") == "git@github.com:org/repo.git"


def call(resolver: GitCommitResolver, verb: str, url: str, auth: tuple[str, str] | None) -> object:
    if verb == "resolve_tag":
        return resolver.resolve_tag(clone_url=url, tag="v1.0", auth=auth)
    if verb == "branch_contains":
        return resolver.branch_contains(clone_url=url, branch="main", sha="a" * 40, auth=auth)
    return resolver.is_ancestor(clone_url=url, ancestor="a" * 40, descendant="b" * 40, auth=auth)
