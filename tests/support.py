"""Test helpers shared by several test modules: real processes, fixtures, settings."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from config.settings import Settings, load_settings

FIXTURES = Path(__file__).parent / "fixtures"
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
