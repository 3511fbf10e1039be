"""The one settings object: environment (CIBROKER_*) plus the routing file, validated at once.

Built at start-up by `load_settings(environ, ...)` and passed in explicitly; nothing
reads the environment at import time. Secrets are resolved here, from the environment
or files named in the routing file, into `SecretStr` (redacted repr).
"""

from __future__ import annotations

import os
import re
import secrets as _secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from config.errors import ConfigError
from config.routing import RoutingFile, SecretRef

ENV_PREFIX = "CIBROKER_"
MIN_SIGNING_KEY = 32
EMBEDDED = "<embedded defaults>"
MIN_API_TOKEN_LENGTH = 24
# The embedded defaults' webhook secret files, one per host kind (a GitHub HMAC made with the GitLab
# token must not verify): <state dir>/<name>, random, created on first start (config/defaults.yaml).
DEV_SECRET_FILES = ("webhook-secret", "github-webhook-secret")


class EnvSettings(BaseModel):
    """CIBROKER_* environment variables (documented in README "Configuration reference")."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    config: Path | None = None
    redis_url: SecretStr | None = None
    queue: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")] = "cibroker"
    # GitLab's own cap is 25 MB, but a push payload lists at most 20 commits: real pushes are KBs.
    max_body_bytes: Annotated[int, Field(ge=1024)] = 1024 * 1024
    # Webhook bodies read at once by one web process; beyond it 503 + Retry-After (memory bound: this x max_body_bytes).
    max_inflight_webhooks: Annotated[int, Field(ge=1, le=100000)] = 64
    # Wrong API tokens one client address may present per minute before every API call from it answers 429.
    api_failures_per_minute: Annotated[int, Field(ge=1, le=100000)] = 10
    # A request's headers must arrive within this (slow-header connections are closed), and idle keep-alive ends.
    header_timeout_seconds: Annotated[float, Field(gt=0, le=300)] = 10.0
    keep_alive_seconds: Annotated[float, Field(gt=0, le=300)] = 5.0
    # A webhook body must arrive whole within this from the end of its headers (408 otherwise).
    body_timeout_seconds: Annotated[float, Field(gt=0, le=300)] = 10.0
    dedup_ttl_seconds: Annotated[int, Field(ge=60)] = 14 * 24 * 3600
    retention_days: Annotated[int, Field(ge=1)] = 14
    redis_timeout_seconds: Annotated[float, Field(gt=0, le=30)] = 2.0
    state_dir: Path = Path(".cibroker")
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    api_tokens: SecretStr | None = None
    # The broker's own HMAC key (broker.core.trust): signs the PipelineRuns cibroker creates and the
    # requests people make through the on-call surface. Only cibroker's service accounts read it.
    signing_key: SecretStr | None = None
    signing_key_file: Path | None = None
    tekton_api_version: Literal["v1", "v1beta1"] = "v1"
    resync_seconds: Annotated[int, Field(ge=5, le=3600)] = 60
    # Above the longest retry countdown (tasks.BACKOFF_CAP, 300 s), or kombu redelivers waiting retries early.
    visibility_timeout_seconds: Annotated[int, Field(ge=5)] = 600

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> EnvSettings:
        values = {k[len(ENV_PREFIX):].lower(): v for k, v in environ.items() if k.startswith(ENV_PREFIX) and v != ""}
        try:
            return cls(**values)
        except ValidationError as exc:
            raise ConfigError([f"environment: {ENV_PREFIX}{_loc(e['loc']).upper()}: {e['msg']}" for e in exc.errors()]) from exc

    def short_api_tokens(self) -> list[str]:
        """Problems naming each CIBROKER_API_TOKENS entry shorter than MIN_API_TOKEN_LENGTH (by name, never the value)."""
        return [f"environment: {ENV_PREFIX}API_TOKENS: entry {name!r} is {len(token)} characters; an API token needs at "
                f"least {MIN_API_TOKEN_LENGTH} (make one with `openssl rand -hex 32`)"
                for name, token in self.api_token_names() if len(token) < MIN_API_TOKEN_LENGTH]

    def api_token_values(self) -> tuple[str, ...]:
        return tuple(token for _, token in self.api_token_names())

    def api_token_names(self) -> tuple[tuple[str, str], ...]:
        """(name, token) per entry of CIBROKER_API_TOKENS: `name=token`, or a bare token (named token1, token2, ...).

        The name is what the audit log records as who acted.
        """
        if self.api_tokens is None:
            return ()
        out = []
        for i, entry in enumerate(t.strip() for t in self.api_tokens.get_secret_value().split(",") if t.strip()):
            name, sep, token = entry.partition("=")
            if sep and token and re.fullmatch(r"[A-Za-z][A-Za-z0-9_.@-]{0,63}", name):
                out.append((name, token))
            else:
                out.append((f"token{i + 1}", entry))
        return tuple(out)


@dataclass(frozen=True)
class HostCredentials:
    webhook_secrets: tuple[SecretStr, ...] = ()
    signing_secrets: tuple[SecretStr, ...] = ()
    token: SecretStr | None = None

    def webhook_values(self) -> tuple[str, ...]:
        return tuple(s.get_secret_value() for s in self.webhook_secrets)

    def signing_values(self) -> tuple[str, ...]:
        return tuple(s.get_secret_value() for s in self.signing_secrets)


@dataclass(frozen=True)
class Settings:
    env: EnvSettings
    routing: RoutingFile
    source: str
    credentials: Mapping[str, HostCredentials]
    warnings: tuple[str, ...] = field(default=())
    # Route-scoped webhook/signing secrets by route name (only routes that set any; README "Secrets scoped to repos").
    route_credentials: Mapping[str, HostCredentials] = field(default_factory=dict)
    signing_key: SecretStr | None = None

    def require_signing_key(self) -> bytes:
        """The broker's signing key; ConfigError when this process has none (it must not run without one)."""
        if self.signing_key is None:
            raise ConfigError([
                f"environment: {ENV_PREFIX}SIGNING_KEY (or {ENV_PREFIX}SIGNING_KEY_FILE) is not set: workers, the watcher "
                "and the on-call API sign and verify PipelineRuns and people's requests with it (at least "
                f"{MIN_SIGNING_KEY} characters; e.g. `openssl rand -hex 32`)"])
        return self.signing_key.get_secret_value().encode("utf-8")

    @property
    def embedded_defaults(self) -> bool:
        return self.source == EMBEDDED


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping.

    Plain YAML keeps the last one silently, which would drop a whole host or route filter.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable key: SafeLoader reports it itself
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_routing(text: str, *, source: str) -> RoutingFile:
    """Parse and validate routing YAML; every problem becomes one `source: key.path: message` line."""
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{source}{where}: not valid YAML: {problem}"]) from exc
    if data is None:
        raise ConfigError([f"{source}: the routing file is empty; it needs at least 'hosts'"])
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: the routing file must be a mapping with 'hosts' and 'routes', got {type(data).__name__}"])
    try:
        return RoutingFile.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{source}: {_loc(err['loc'])}: {msg}")
        raise ConfigError(problems) from exc


def _read_secret(ref: SecretRef, *, environ: Mapping[str, str], base: Path) -> str | None:
    if ref.env:
        value = environ.get(ref.env)
        return value if value else None
    path = Path(os.path.expanduser(ref.file or ""))
    path = path if path.is_absolute() else base / path
    try:
        value = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return value or None


def resolve_credentials(
    routing: RoutingFile, *, environ: Mapping[str, str], base: Path
) -> tuple[dict[str, HostCredentials], list[str], list[str]]:
    """Secrets per host, plus (errors, warnings) naming what is missing, never a value."""
    creds, _, errors, warnings = resolve_all_credentials(routing, environ=environ, base=base)
    return creds, errors, warnings


def resolve_all_credentials(
    routing: RoutingFile, *, environ: Mapping[str, str], base: Path
) -> tuple[dict[str, HostCredentials], dict[str, HostCredentials], list[str], list[str]]:
    """Secrets per host and per route (route name), plus (errors, warnings) naming what is missing, never a value."""
    creds: dict[str, HostCredentials] = {}
    by_route: dict[str, HostCredentials] = {}
    errors: list[str] = []
    warnings: list[str] = []

    def resolve(refs: list[SecretRef], where: str) -> tuple[SecretStr, ...]:
        got = []
        for i, ref in enumerate(refs):
            value = _read_secret(ref, environ=environ, base=base)
            if value is None:
                warnings.append(f"{where}[{i}]: {ref.describe()} is not set (skipped)")
            else:
                got.append(SecretStr(value))
        return tuple(got)

    for host_id, host in routing.hosts.items():
        webhook = resolve(host.webhook_secrets, f"hosts.{host_id}.webhook_secrets")
        signing = resolve(host.signing_secrets, f"hosts.{host_id}.signing_secrets")
        if host.webhook_secrets and not webhook:
            errors.append(f"hosts.{host_id}.webhook_secrets: none is set ({', '.join(r.describe() for r in host.webhook_secrets)}); every request to /hooks/{host_id} would be refused")
        if host.signing_secrets and not signing:
            errors.append(f"hosts.{host_id}.signing_secrets: none is set ({', '.join(r.describe() for r in host.signing_secrets)})")
        token = None
        if host.token is not None:
            value = _read_secret(host.token, environ=environ, base=base)
            if value is None:
                warnings.append(f"hosts.{host_id}.token: {host.token.describe()} is not set; commit statuses cannot be posted")
            else:
                token = SecretStr(value)
        creds[host_id] = HostCredentials(webhook_secrets=webhook, signing_secrets=signing, token=token)
    for i, route in enumerate(routing.routes):
        if not route.webhook_secrets and not route.signing_secrets:
            continue
        where = f"routes[{i}]"
        webhook = resolve(route.webhook_secrets, f"{where}.webhook_secrets")
        signing = resolve(route.signing_secrets, f"{where}.signing_secrets")
        if route.webhook_secrets and not webhook:
            errors.append(f"{where}.webhook_secrets: none is set ({', '.join(r.describe() for r in route.webhook_secrets)}); "
                          f"deliveries for route {route.name} would be refused")
        if route.signing_secrets and not signing:
            errors.append(f"{where}.signing_secrets: none is set ({', '.join(r.describe() for r in route.signing_secrets)})")
        by_route[route.name] = HostCredentials(webhook_secrets=webhook, signing_secrets=signing)
    return creds, by_route, errors, warnings


def ensure_dev_secret(state_dir: Path, name: str = DEV_SECRET_FILES[0]) -> Path:
    """An embedded-defaults secret file (a webhook secret, the signing key): created once (0600), random, never logged."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / name
    if path.exists():
        return path
    # `serve` and `worker` may start at once (Procfile): write a private temporary file in
    # full, then link it into place, so no process ever reads a half-written secret and
    # the one that loses the race keeps the winner's value.
    tmp = state_dir / f".{name}.{os.getpid()}.{_secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(_secrets.token_urlsafe(32) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_settings(environ: Mapping[str, str], *, config_path: str | Path | None = None) -> Settings:
    """Everything a cibroker process needs, validated at once; raises ConfigError listing every problem."""
    env = EnvSettings.from_environ(environ)
    if short := env.short_api_tokens():
        raise ConfigError(short)
    path = Path(config_path) if config_path else env.config
    if path is None:
        source = EMBEDDED
        for name in DEV_SECRET_FILES:
            ensure_dev_secret(env.state_dir, name)
        text = resources.files("config").joinpath("defaults.yaml").read_text(encoding="utf-8")
        base = env.state_dir
    else:
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError([f"{path}: cannot read the routing file: {exc.strerror}"]) from exc
        except UnicodeDecodeError as exc:
            raise ConfigError([f"{path}: the routing file is not UTF-8 text (byte {exc.start})"]) from exc
        base = path.parent
    routing = parse_routing(text, source=source)
    creds, by_route, errors, warnings = resolve_all_credentials(routing, environ=environ, base=base)
    if errors:
        raise ConfigError([f"{source}: {e}" for e in errors])
    signing_key = _signing_key(env, embedded=path is None)
    return Settings(env=env, routing=routing, source=source, credentials=creds, warnings=tuple(warnings),
                    signing_key=signing_key, route_credentials=by_route)


def _signing_key(env: EnvSettings, *, embedded: bool) -> SecretStr | None:
    """CIBROKER_SIGNING_KEY, else the file CIBROKER_SIGNING_KEY_FILE names, else (embedded defaults) a generated one."""
    where = f"{ENV_PREFIX}SIGNING_KEY"
    value = env.signing_key.get_secret_value().strip() if env.signing_key is not None else None
    if value is None and env.signing_key_file is not None:
        where = f"{ENV_PREFIX}SIGNING_KEY_FILE ({env.signing_key_file})"
        try:
            value = env.signing_key_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError([f"environment: {where}: cannot read the signing key: {exc}"]) from exc
    if value is None and embedded:
        where = "the embedded defaults' generated signing key"
        value = ensure_dev_secret(env.state_dir, "signing-key").read_text(encoding="utf-8").strip()
    if value is None:
        return None
    if len(value) < MIN_SIGNING_KEY:
        raise ConfigError([f"environment: {where}: the signing key is shorter than {MIN_SIGNING_KEY} characters"])
    return SecretStr(value)
