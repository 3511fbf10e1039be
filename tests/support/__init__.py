"""Test helpers shared by several test modules: real processes, fixtures, settings."""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from config.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]  # the repository
FIXTURES = ROOT / "tests" / "fixtures"
CIBROKER = str(Path(sys.executable).parent / "cibroker")
CORPUS = FIXTURES / "corpus"

ROUTING = """
defaults: {namespace: ci, service_account: pipeline-bot}
hosts:
  gitlab:
    kind: gitlab
    api_url: https://gitlab.com/api/v4
    token: {env: GITLAB_API_TOKEN}
    webhook_secrets: [{env: GITLAB_WEBHOOK_SECRET}, {env: GITLAB_WEBHOOK_SECRET_PREVIOUS}]
  gitlab-signed:
    kind: gitlab
    api_url: https://gitlab.example.com/api/v4
    signing_secrets: [{env: GITLAB_SIGNING_SECRET}]
  github:
    kind: github
    api_url: https://api.github.com
    webhook_secrets: [{env: GITHUB_WEBHOOK_SECRET}]
  gitea:
    kind: gitea
    api_url: https://gitea.example.com/api/v1
    webhook_secrets: [{env: GITEA_WEBHOOK_SECRET}]
routes:
  - name: everything-gitlab
    host: gitlab
    repo: "**"
    events: {branches: ["**"], tags: ["**"]}
    pipeline: build-test-push
    image: registry.example.com/{repo}
  - name: everything-signed
    host: gitlab-signed
    repo: "**"
    events: {branches: ["**"], tags: ["**"]}
    pipeline: build-test-push
    image: registry.example.com/{repo}
  - name: everything-github
    host: github
    repo: "**"
    events: {branches: ["**"], tags: ["**"]}
    pipeline: build-test-push
    image: registry.example.com/{repo}
  - name: everything-gitea
    host: gitea
    repo: "**"
    events: {branches: ["**"], tags: ["**"]}
    pipeline: build-test-push
    image: registry.example.com/{repo}
"""

SECRETS = {
    "GITLAB_WEBHOOK_SECRET": "topsecret",
    "GITLAB_WEBHOOK_SECRET_PREVIOUS": "1234567",
    "GITLAB_SIGNING_SECRET": "whsec_c2lnbmluZy1zZWNyZXQtZm9yLXRlc3Rz",
    "GITHUB_WEBHOOK_SECRET": "topsecret",
    "GITEA_WEBHOOK_SECRET": "IsWishesWereHorsesWedAllBeEatingSteak!",
    # The broker's own key (workers and the watcher refuse to start without it): signs runs and people's requests.
    "CIBROKER_SIGNING_KEY": "test-signing-key-0123456789abcdef0123456789",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def payload(path: str) -> bytes:
    """Exact bytes of a corpus payload, e.g. payload("gitlab/push-branch-update.json")."""
    return (CORPUS / path).read_bytes()


def headers_of(path: str) -> dict[str, str]:
    """The corpus headers next to a payload, or {} when it has none."""
    sibling = CORPUS / path.replace(".json", ".headers.json")
    return json.loads(sibling.read_text()) if sibling.exists() else {}


def make_settings(tmp_path: Path, *, routing: str = ROUTING, environ: dict[str, str] | None = None) -> Settings:
    file = tmp_path / "routing.yaml"
    file.write_text(routing)
    env = {**SECRETS, "CIBROKER_STATE_DIR": str(tmp_path / "state"), **(environ or {})}
    return load_settings(env, config_path=file)


@dataclass
class RedisServer:
    """A real redis-server child with AOF on, that tests can stop and start again."""

    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is needed for the tests (./run test installs it)"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir), "--appendonly", "yes",
             "--appendfsync", "always", "--save", "", "--daemonize", "no", "--logfile", str(self.workdir / "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start: {(self.workdir / 'redis.log').read_text()}") from None
                time.sleep(0.02)
        client.close()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


class Process:
    """A cibroker child process whose stderr (JSON log lines) is kept in a file."""

    def __init__(self, args: list[str], *, env: dict[str, str], cwd: Path, log: Path) -> None:
        self.log = log
        with open(log.with_suffix(".out"), "wb") as out, open(log, "wb") as err:
            self.proc = subprocess.Popen([CIBROKER, *args], env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=err)

    def lines(self) -> list[dict]:
        out = []
        for line in self.log.read_text().splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def base_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"PATH": os.defpath, "HOME": str(tmp_path), "CIBROKER_LOG_FORMAT": "json",
            "CIBROKER_STATE_DIR": str(tmp_path / "state"), **SECRETS, **extra}


def wait_healthy(url: str, proc: Process, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise AssertionError(f"cibroker exited early: {proc.log.read_text()}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"cibroker did not answer /healthz within {timeout} s: {proc.log.read_text()}")


# -- a real Git host's repository, for every test that pushes commits ----------------------------


class GitOrigin:
    """A bare repository standing in for the Git host's copy of acme/shop-api.

    Made by one `git fast-import` call: `commits` empty-tree commits in one line of history
    (commit n is the parent of commit n+1, so an older number is always an ancestor), with fixed
    dates, so the ids are the same on every run. `sha(n)` is the n-th commit (from 1). A hidden ref
    keeps every commit reachable; `move(branch, sha)` is what a developer's `git push` does to
    the host before the webhook is sent. `copy()` gives a test its own refs over the same objects.
    """

    HIDDEN = "refs/cibroker-test/all"

    def __init__(self, path: Path, shas: list[str]) -> None:
        self.path, self._shas = path, shas
        self._known = set(shas)

    @classmethod
    def create(cls, path: Path, *, commits: int, branches: dict[str, int] | None = None) -> GitOrigin:
        """`branches`: name -> the commit number it points at (default: main at the last commit)."""
        env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(path.parent)}
        subprocess.run(["git", "init", "-q", "--bare", str(path)], check=True, env=env)
        lines = []
        for n in range(1, commits + 1):
            message = f"commit {n}\n".encode()
            lines.append(b"commit %s\nmark :%d\ncommitter Dev <dev@example.com> %d +0000\ndata %d\n%s\n"
                         % (cls.HIDDEN.encode(), n, 1_700_000_000 + n, len(message), message))
        for name, n in (branches or {"main": commits}).items():
            lines.append(b"reset refs/heads/%s\nfrom :%d\n\n" % (name.encode(), n))
        marks = path / "cibroker-marks"
        subprocess.run(["git", "fast-import", "--quiet", f"--export-marks={marks}"], input=b"".join(lines),
                       cwd=path, check=True, env={**env, "GIT_DIR": str(path)})
        by_mark = dict(line.split(" ", 1) for line in marks.read_text().split("\n") if line)
        return cls(path, [by_mark[f":{n}"].strip() for n in range(1, commits + 1)])

    @property
    def url(self) -> str:
        return self.path.as_uri()

    def sha(self, n: int) -> str:
        """The n-th commit's id (1-based; n-1 is its parent)."""
        if not 1 <= n <= len(self._shas):
            raise IndexError(f"the origin has commits 1..{len(self._shas)}, not {n}")
        return self._shas[n - 1]

    def knows(self, sha: str) -> bool:
        return sha in self._known

    def move(self, branch: str, sha: str) -> None:
        """Point refs/heads/<branch> at `sha`, as a push to the host does (a loose ref, written atomically)."""
        assert self.knows(sha), f"{sha} is not a commit of the origin; post with move=False to push an unknown commit"
        ref = self.path / "refs" / "heads" / branch
        ref.parent.mkdir(parents=True, exist_ok=True)
        part = ref.with_name(f".{ref.name}.{os.getpid()}.{threading.get_ident()}")
        part.write_text(sha + "\n")
        os.replace(part, ref)

    def head(self, branch: str) -> str | None:
        ref = self.path / "refs" / "heads" / branch
        return ref.read_text().strip() if ref.exists() else None

    def delete(self, branch: str) -> None:
        (self.path / "refs" / "heads" / branch).unlink(missing_ok=True)

    def fork(self, n: int, message: str = "fork") -> str:
        """A new commit whose parent is commit n (history that diverges from n+1...); kept reachable."""
        env = {**os.environ, "GIT_DIR": str(self.path), "GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_NAME": "Dev",
               "GIT_AUTHOR_EMAIL": "dev@example.com", "GIT_COMMITTER_NAME": "Dev", "GIT_COMMITTER_EMAIL": "dev@example.com"}
        git = functools.partial(subprocess.run, check=True, capture_output=True, text=True, env=env)
        tree = git(["git", "rev-parse", f"{self.sha(n)}^{{tree}}"]).stdout.strip()
        sha = git(["git", "commit-tree", tree, "-p", self.sha(n), "-m", message]).stdout.strip()
        git(["git", "update-ref", f"refs/cibroker-test/fork-{sha}", sha])
        self._known.add(sha)
        return sha

    def copy(self, path: Path) -> GitOrigin:
        """This origin's objects and refs at `path` (an existing copy there is taken as it is)."""
        if not path.exists():
            shutil.copytree(self.path, path, symlinks=True)
        return GitOrigin(path, self._shas)


TEMPLATE_COMMITS = 256


@functools.cache
def template_origin() -> GitOrigin:
    """This process's origin template (256 commits, main at the last), built once; removed at exit."""
    where = Path(tempfile.mkdtemp(prefix="cibroker-origin-"))
    atexit.register(shutil.rmtree, where, ignore_errors=True)
    return GitOrigin.create(where / "origin.git", commits=TEMPLATE_COMMITS)


def web_app(settings: Any, *, operations: Any = None, dry_run: bool = False) -> Any:
    """The web app as `cibroker serve` wires it (broker.bootstrap), or around a given on-call service."""
    from contextlib import nullcontext

    from broker import bootstrap
    from broker.edge.web import create_app

    def ops() -> Any:
        return nullcontext(operations) if operations is not None else bootstrap.edge_operations(settings)

    return create_app(settings, store=lambda: bootstrap.edge_store(settings), operations=ops, dry_run=dry_run)
