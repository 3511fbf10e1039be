"""The CommitResolver adapter: git ls-remote to peel tags, bare mirrors to check ancestry.

The only module that imports GitPython. Every clone URL is checked against an allow-list
before git runs (no option or `ext::` injection), credentials travel to git in the
environment as an `http.extraHeader` (never in the URL, argv, messages or logs), git never
prompts, and every git command is killed after `timeout` seconds. Git failures become
`Transient` (connection problems, timeouts, 5xx/429) or `Permanent` (authentication,
missing repository, tag or commit, anything unrecognised); no GitPython exception escapes.

Mirrors under `cache_dir` are shared by every caller of one URL whatever credentials they
hold: the broker holds all those tokens anyway, and a mirror only answers ancestry.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import re
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from git.cmd import Git
from git.exc import GitCommandNotFound, GitError

from broker.core.errors import Permanent, Transient

# Protocols git itself may use, even through redirects or helpers: defence in depth
# behind the URL allow-list below (GIT_ALLOW_PROTOCOL also blocks `ext::`).
_ALLOWED_PROTOCOLS = "https:http:ssh:file"
_SCP_LIKE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*@[A-Za-z0-9][A-Za-z0-9.-]*:[^\s]+")
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s]*@")
_SHA = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
_BAD_TAG = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//|^[-/.]|[/.]$|\.lock$")

_AUTH_FAILED = ("authentication failed", "could not read username", "could not read password",
                "terminal prompts disabled", "error: 401", "error: 403", "http 401", "http 403",
                "permission denied (publickey", "invalid username or password")
_UNREACHABLE = ("could not resolve host", "failed to connect", "couldn't connect", "connection refused",
                "connection timed out", "connection reset", "timed out", "early eof",
                "remote end hung up unexpectedly", "unexpected disconnect", "rpc failed",
                "gnutls", "ssl_error_syscall", "error: 429", "error: 500", "error: 502",
                "error: 503", "error: 504")
# Narrow on purpose: a fetch by id that the server refuses must fall back, not read as "not found".
_NOT_FOUND = re.compile(r"repository not found|does not appear to be a git repository|error: 404|repository '[^']*' not found")


def scrub_url(text: str) -> str:
    """Drop any `user:pass@` (or `token@`) after a `scheme://` in `text`."""
    return _USERINFO.sub(r"\1", text)


@dataclass(frozen=True, slots=True)
class _Remote:
    """A clone URL that passed the allow-list, stripped of credentials, and the auth to send."""

    url: str
    auth: tuple[str, str] | None

    def secrets(self) -> tuple[str, ...]:
        """Strings that must never reach a message: the password and the header carrying it."""
        if self.auth is None:
            return ()
        return tuple(s for s in (self.auth[1], _basic(self.auth)) if s)


def _basic(auth: tuple[str, str]) -> str:
    return base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode("ascii")


def _remote(clone_url: str, auth: tuple[str, str] | None) -> _Remote:
    """Check `clone_url` against the allow-list; move any URL credentials into auth."""
    shown = scrub_url(clone_url)
    if not clone_url or clone_url.startswith("-") or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in clone_url):
        raise Permanent(f"refusing clone URL {shown!r}: empty, starts with '-' or contains whitespace")
    if _SCP_LIKE.fullmatch(clone_url):
        return _Remote(clone_url, auth)
    parts = urlsplit(clone_url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path:
            raise Permanent(f"refusing clone URL {shown!r}: file:// URLs must name a local path")
        return _Remote(clone_url, auth)
    if scheme not in ("https", "http", "ssh") or not parts.hostname or parts.hostname.startswith("-"):
        raise Permanent(f"refusing clone URL {shown!r}: use https://, http://, ssh://, git@host:path or file://")
    if parts.password is not None and scheme == "ssh":
        raise Permanent(f"refusing clone URL {shown!r}: ssh:// URLs cannot carry a password")
    if scheme == "ssh" or parts.username is None:
        return _Remote(clone_url, auth)
    # Credentials in an http(s) URL would land in git's argv: send them as a header instead
    # (explicit `auth` wins), and keep the URL clean for argv, messages and the mirror's name.
    url = scrub_url(clone_url)
    return _Remote(url, auth or (unquote(parts.username), unquote(parts.password or "")))


def _check_tag(tag: str) -> None:
    if not tag or _BAD_TAG.search(tag):
        raise Permanent(f"refusing tag name {tag!r}: not a valid git tag name")


def _check_sha(sha: str) -> None:
    if not _SHA.fullmatch(sha):
        raise Permanent(f"refusing commit {sha!r}: expected a full 40- or 64-hex commit id")


class GitCommitResolver:
    """CommitResolver over the git CLI (through GitPython), with bare mirrors under `cache_dir`."""

    def __init__(self, cache_dir: Path, *, timeout: float = 60) -> None:
        self._cache_dir = Path(cache_dir).resolve()
        self._timeout = timeout
        self._guard = threading.Lock()
        self._locks: dict[Path, threading.Lock] = {}

    def resolve_tag(self, *, clone_url: str, tag: str, auth: tuple[str, str] | None) -> str:
        """The commit `tag` peels to on the remote; Permanent if the remote has no such tag."""
        remote = _remote(clone_url, auth)
        _check_tag(tag)
        ref = f"refs/tags/{tag}"
        self._cache_dir.mkdir(parents=True, exist_ok=True)  # a cwd of ours, outside any repository
        out = self._git(remote, "ls_remote", remote.url, ref, f"{ref}^{{}}", cwd=self._cache_dir)
        # ls-remote patterns match on the tail of a ref (refs/heads/refs/tags/v1 matches
        # refs/tags/v1), so keep only the exact tag and its peeled line.
        found = {name: sha for sha, name in (line.split("\t", 1) for line in out.splitlines() if "\t" in line)}
        sha = found.get(f"{ref}^{{}}") or found.get(ref)
        if sha is None:
            raise Permanent(f"tag {tag} not found on {remote.url}")
        return sha.strip().lower()

    def resolve_branch(self, *, clone_url: str, branch: str, auth: tuple[str, str] | None) -> str:
        """The commit at the head of `branch` on the remote now; Permanent if there is no such branch."""
        remote = _remote(clone_url, auth)
        _check_tag(branch)  # branch and tag names share git's ref-name rules
        ref = f"refs/heads/{branch}"
        self._cache_dir.mkdir(parents=True, exist_ok=True)
        out = self._git(remote, "ls_remote", remote.url, ref, cwd=self._cache_dir)
        found = {name.strip(): sha for sha, name in (line.split("\t", 1) for line in out.splitlines() if "\t" in line)}
        sha = found.get(ref)
        if sha is None:
            raise Permanent(f"branch {branch} not found on {remote.url}")
        return sha.strip().lower()

    def branch_contains(self, *, clone_url: str, branch: str, sha: str, auth: tuple[str, str] | None) -> str:
        """The head of `branch` on the remote now, when `sha` is that head or an ancestor of it.

        One `git ls-remote` of the branch; only when the branch moved on since the push is the
        pushed commit's ancestry checked in this URL's mirror. Permanent when the remote does not
        know the commit, has no such branch, or the branch does not contain the commit;
        Transient when the remote could not be asked.
        """
        remote = _remote(clone_url, auth)
        sha = sha.lower()
        _check_sha(sha)
        head = self.resolve_branch(clone_url=clone_url, branch=branch, auth=auth)
        if head == sha or self.is_ancestor(clone_url=clone_url, ancestor=sha, descendant=head, auth=auth):
            return head
        raise Permanent(f"commit {sha[:12]} is not on branch {branch} of {remote.url}: the branch is at {head[:12]}, "
                        "which does not contain it")

    def is_ancestor(self, *, clone_url: str, ancestor: str, descendant: str, auth: tuple[str, str] | None) -> bool:
        """True when `ancestor` is reachable from `descendant`, fetching both into this URL's mirror."""
        remote = _remote(clone_url, auth)
        ancestor, descendant = ancestor.lower(), descendant.lower()
        _check_sha(ancestor)
        _check_sha(descendant)
        mirror = self._cache_dir / hashlib.sha256(remote.url.encode()).hexdigest()[:32]
        with self._locked(mirror):
            if not (mirror / "HEAD").is_file():
                self._git(remote, "init", "--bare", "--quiet", str(mirror), cwd=self._cache_dir)
            self._fetch(remote, mirror, (ancestor, descendant))
            status, _, stderr = self._run(remote, "merge_base", "--is-ancestor", ancestor, descendant, mirror=mirror)
        if status in (0, 1):
            return status == 0
        raise self._error(remote, "merge-base", status=status, stderr=stderr) or Permanent(
            f"git merge-base failed for {remote.url}: {self._detail(remote, stderr)}")

    def _fetch(self, remote: _Remote, mirror: Path, shas: tuple[str, ...]) -> None:
        """Make `shas` present in the mirror: nothing if they are, by id, else every head and tag."""
        missing = [sha for sha in shas if not self._has_commit(remote, mirror, sha)]
        if not missing:
            return
        # Servers may refuse wants that are not ref tips (protocol v0 without
        # uploadpack.allowReachableSHA1InWant): then take every head and tag instead.
        by_id = [f"+{sha}:refs/cibroker/{sha}" for sha in missing]
        status, _, stderr = self._run(remote, "fetch", "--no-tags", "--no-write-fetch-head", remote.url, *by_id, mirror=mirror)
        if status != 0:
            known = self._error(remote, "fetch", status=status, stderr=stderr)
            if known is not None:
                raise known
            everything = ("+refs/heads/*:refs/remotes/origin/*", "+refs/tags/*:refs/tags/*")
            status, _, stderr = self._run(remote, "fetch", "--no-tags", "--no-write-fetch-head", remote.url, *everything, mirror=mirror)
            if status != 0:
                raise self._error(remote, "fetch", status=status, stderr=stderr) or Permanent(
                    f"git fetch failed for {remote.url}: {self._detail(remote, stderr)}")
        for sha in missing:
            if not self._has_commit(remote, mirror, sha):
                raise Permanent(f"commit {sha} not found on {remote.url}")

    def _has_commit(self, remote: _Remote, mirror: Path, sha: str) -> bool:
        status, _, _ = self._run(remote, "cat_file", "-e", f"{sha}^{{commit}}", mirror=mirror)
        return status == 0

    @contextmanager
    def _locked(self, mirror: Path) -> Iterator[None]:
        """Hold this mirror against other threads and other processes for one fetch-and-check."""
        with self._guard:
            lock = self._locks.setdefault(mirror, threading.Lock())
        mirror.mkdir(parents=True, exist_ok=True)
        # The thread lock keeps this process's threads queued in Python; flock (one open file
        # description per holder) keeps other worker processes out.
        with lock, open(mirror / "cibroker.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _env(self, remote: _Remote, mirror: Path | None) -> Mapping[str, str]:
        env = {
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_ALLOW_PROTOCOL": _ALLOWED_PROTOCOLS,
            "GIT_TRACE_REDACT": "1",
            # Keep git from picking up the config of a repository above the cache dir.
            "GIT_CEILING_DIRECTORIES": str(self._cache_dir.parent),
        }
        if mirror is not None:
            env["GIT_DIR"] = str(mirror)
        if remote.auth is not None:
            # The environment, unlike `-c` in argv, is not visible to other users in ps.
            env |= {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "http.extraHeader",
                    "GIT_CONFIG_VALUE_0": f"Authorization: Basic {_basic(remote.auth)}"}
        return env

    def _run(self, remote: _Remote, verb: str, *args: str, mirror: Path | None = None,
             cwd: Path | None = None) -> tuple[int, str, str]:
        """Run one git command; (status, stdout, stderr), status -1 when it was killed on timeout."""
        started = time.monotonic()
        try:
            status, out, err = getattr(Git(cwd or mirror), verb)(
                *args, env=self._env(remote, mirror), kill_after_timeout=self._timeout,
                with_extended_output=True, with_exceptions=False)
        except GitCommandNotFound as exc:
            raise Permanent("the git executable was not found on this worker") from exc
        except GitError as exc:  # GitPython's own refusals (unsafe option or protocol)
            raise Permanent(f"GitPython refused git {verb.replace('_', '-')} for {remote.url}: {type(exc).__name__}") from exc
        if status != 0 and (status < 0 or time.monotonic() - started >= self._timeout):
            return -1, out, err
        return status, out, err

    def _git(self, remote: _Remote, verb: str, *args: str, cwd: Path) -> str:
        status, out, stderr = self._run(remote, verb, *args, cwd=cwd)
        if status != 0:
            name = verb.replace("_", "-")
            raise self._error(remote, name, status=status, stderr=stderr) or Permanent(
                f"git {name} failed for {remote.url}: {self._detail(remote, stderr)}")
        return out

    def _error(self, remote: _Remote, name: str, *, status: int, stderr: str) -> Permanent | Transient | None:
        """The error a failed git command stands for, or None when git's words are not recognised."""
        if status == -1:
            return Transient(f"git {name} timed out after {self._timeout:g}s on {remote.url}")
        text = stderr.lower()
        detail = self._detail(remote, stderr)
        if any(p in text for p in _AUTH_FAILED):
            return Permanent(f"authentication failed for {remote.url}: {detail}")
        if any(p in text for p in _UNREACHABLE):
            return Transient(f"could not reach {remote.url}: {detail}")
        if _NOT_FOUND.search(text):
            # Includes a file:// path that does not exist: no retry will create it, and an
            # operator must fix the URL, exactly as for a 404 from a Git host.
            return Permanent(f"repository not found at {remote.url}: {detail}")
        return None

    @staticmethod
    def _detail(remote: _Remote, stderr: str) -> str:
        """Git's most telling stderr line, with URL credentials and secrets blanked out."""
        lines = [line.strip() for line in stderr.splitlines() if line.strip()]
        telling = [line for line in lines if line.lower().startswith(("fatal:", "error:"))]
        detail = scrub_url((telling or lines or ["(no message)"])[0])[:300]
        for secret in remote.secrets():
            detail = detail.replace(secret, "***")
        return detail
