"""The routing file's schema: the product's public contract.

Every key here is documented in README.md ("Routing file"). Extend, don't rename.
Models are frozen and reject unknown keys, so a typo is an error, not a silent default.
This module is pure data: it reads no files and no environment (see `config.settings`).
"""

from __future__ import annotations

import string
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

TEMPLATE_FIELDS = ("sha", "short_sha", "tag", "branch", "ref", "repo")
IMAGE_TAG_FIELDS = ("sha", "short_sha", "tag", "branch", "ref")
STATUS_NAME_FIELDS = ("pipeline", "route", "environment")
TARGET_URL_FIELDS = ("namespace", "name", "pipeline", "route", "repo", "sha")
GO_DURATION = r"^([0-9]+(\.[0-9]+)?(h|m|s|ms))+$"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
HOST_ID = r"^[a-z0-9]([-_a-z0-9]*[a-z0-9])?$"


def template_fields(template: str) -> list[str]:
    """Names of the `{placeholders}` in `template`; raises ValueError on broken braces."""
    names = []
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if spec or conversion or not name.isidentifier():
            raise ValueError(f"placeholder {{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}} is not a plain name")
        names.append(name)
    return names


def check_template(template: str, allowed: tuple[str, ...]) -> str:
    try:
        names = template_fields(template)
    except ValueError as exc:
        raise ValueError(f"bad template {template!r}: {exc}") from None
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(
            f"unknown placeholder {{{unknown[0]}}} in {template!r}; allowed: "
            + " ".join("{" + a + "}" for a in allowed)
        )
    return template


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SecretRef(_Model):
    """Where a secret lives: an environment variable or a file. Never the value itself."""

    env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = None
    file: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _a_reference(cls, data: Any) -> Any:
        # Say why an inline value is refused, without echoing it (it may be the secret).
        if isinstance(data, SecretRef):
            return data
        if not isinstance(data, dict) or set(data) - {"env", "file"}:
            raise ValueError("a secret is never written inline: write {env: VARIABLE} or {file: PATH}")
        return data

    @model_validator(mode="after")
    def _exactly_one(self) -> SecretRef:
        if (self.env is None) == (self.file is None):
            raise ValueError("give exactly one of 'env' or 'file' (a secret is never written inline)")
        return self

    def describe(self) -> str:
        return f"env {self.env}" if self.env else f"file {self.file}"


class Defaults(_Model):
    namespace: Annotated[str, Field(pattern=DNS_LABEL, max_length=63)] = "ci"
    service_account: Annotated[str, Field(min_length=1, max_length=253)] = "pipeline-bot"
    status_name: str = "cibroker/{pipeline}"
    target_url: str | None = None
    timeout: Annotated[str, Field(pattern=GO_DURATION)] = "1h0m0s"
    rollout_timeout_seconds: Annotated[int, Field(ge=10, le=86400)] = 600

    _status_name = field_validator("status_name")(lambda v: check_template(v, STATUS_NAME_FIELDS))

    @field_validator("target_url")
    @classmethod
    def _target_url(cls, value: str | None) -> str | None:
        return None if value is None else check_template(value, TARGET_URL_FIELDS)


class Host(_Model):
    kind: Literal["gitlab", "github", "gitea"]
    api_url: Annotated[str, Field(pattern=r"^https?://[^/\s]+(/\S*)?$")]
    # Where the host serves project pages (payload project URLs must be under it); default: derived
    # from api_url (its origin without /api/v4, /api/v3, /api/v1; github.com for api.github.com).
    web_url: Annotated[str, Field(pattern=r"^https?://[^/\s?#@]+(/[^\s?#]*)?$")] | None = None
    token: SecretRef | None = None
    webhook_secrets: list[SecretRef] = []
    signing_secrets: list[SecretRef] = []
    signature_tolerance_seconds: Annotated[int, Field(ge=10, le=3600)] = 300
    allow_sha1_signatures: bool = False

    @field_validator("signing_secrets")
    @classmethod
    def _signing_is_gitlab_only(cls, value: list[SecretRef], info: ValidationInfo) -> list[SecretRef]:
        # Checked on the field (not the model) so the error names hosts.<id>.signing_secrets.
        kind = info.data.get("kind")
        if value and kind is not None and kind != "gitlab":
            raise ValueError("signing_secrets is GitLab's signing token; github and gitea sign with webhook_secrets")
        return value

    # Whether the host has a credential of its own, or every route of it has one, is a
    # cross-check of the whole file (`_cross_check`): route-scoped secrets need the routes.


class RefFilter(_Model):
    """Which refs a route (or a deploy) takes: glob patterns over short names."""

    branches: list[Annotated[str, Field(min_length=1)]] = []
    tags: list[Annotated[str, Field(min_length=1)]] = []


class DeployTarget(_Model):
    environment: Annotated[str, Field(pattern=DNS_LABEL, max_length=63)]
    when: RefFilter | None = None
    namespace: Annotated[str, Field(pattern=DNS_LABEL, max_length=63)]
    deployment: Annotated[str, Field(pattern=r"^[a-z0-9]([-.a-z0-9]*[a-z0-9])?$", max_length=253)]
    container: Annotated[str, Field(pattern=DNS_LABEL, max_length=63)]


class Route(_Model):
    name: Annotated[str, Field(pattern=DNS_LABEL, max_length=40)]
    host: str
    repo: Annotated[str, Field(min_length=1)]
    clone_url: Annotated[str, Field(pattern=r"^(https?|ssh|file)://\S+$")] | None = None
    events: RefFilter
    pipeline: Annotated[str, Field(pattern=r"^[a-z0-9]([-.a-z0-9]*[a-z0-9])?$", max_length=253)]
    image: Annotated[str, Field(min_length=1)]
    image_tag: str = "{sha}"
    params: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_][-A-Za-z0-9_.]*$")], str] = {}
    deploy: list[DeployTarget] = []
    deploy_by: Literal["digest", "tag"] = "digest"  # image@sha256 from the run's results, or the rendered tag
    namespace: Annotated[str, Field(pattern=DNS_LABEL, max_length=63)] | None = None
    service_account: Annotated[str, Field(min_length=1, max_length=253)] | None = None
    status_name: str | None = None
    workspaces: list[dict[str, Any]] = []
    timeout: Annotated[str, Field(pattern=GO_DURATION)] | None = None
    supersede: bool = True
    cancel_status: Literal["Cancelled", "CancelledRunFinally"] = "Cancelled"
    max_keep_runs: Annotated[int, Field(ge=1, le=10000)] | None = None  # prune older finished runs of this route
    # Route-scoped credentials: a delivery verified only by one of these can match only this route
    # (README "Secrets scoped to repos"). Same forms and rotation rules as the host's lists.
    webhook_secrets: list[SecretRef] = []
    signing_secrets: list[SecretRef] = []  # gitlab hosts only (checked across the file)

    _image_tag = field_validator("image_tag")(lambda v: check_template(v, IMAGE_TAG_FIELDS))
    _image = field_validator("image")(lambda v: check_template(v, ("repo",)))
    _clone_url = field_validator("clone_url")(lambda v: None if v is None else check_template(v, ("repo",)))

    @field_validator("params")
    @classmethod
    def _params(cls, value: dict[str, str]) -> dict[str, str]:
        for template in value.values():
            check_template(template, TEMPLATE_FIELDS + ("image",))
        return value

    @field_validator("status_name")
    @classmethod
    def _status_name(cls, value: str | None) -> str | None:
        return None if value is None else check_template(value, STATUS_NAME_FIELDS)

    @field_validator("events")
    @classmethod
    def _takes_something(cls, value: RefFilter) -> RefFilter:
        # A field validator, so it names routes[i].events and runs even when other keys are wrong.
        if not value.branches and not value.tags:
            raise ValueError("events needs at least one of 'branches' or 'tags'; this route would never run")
        return value


class RoutingFile(_Model):
    defaults: Defaults = Defaults()
    hosts: dict[Annotated[str, Field(pattern=HOST_ID, max_length=40)], Host]
    routes: list[Route] = []

    def route(self, name: str) -> Route | None:
        """The route of that name (names are unique: the validator below checks), or None."""
        return next((r for r in self.routes if r.name == name), None)

    @model_validator(mode="wrap")
    @classmethod
    def _consistent(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> RoutingFile:
        """Cross-route checks, each at its own key path, reported together with every other problem.

        They read the raw mapping so that a typo elsewhere does not hide them, and they
        skip whatever is malformed there (its own error is already reported).
        """
        problems = _cross_check(data)
        try:
            model = handler(data)
        except ValidationError as exc:
            if not problems:
                raise
            kept = [
                InitErrorDetails(type=PydanticCustomError(e["type"], e["msg"]), loc=e["loc"], input=e["input"])
                for e in exc.errors(include_url=False)
            ]
            raise ValidationError.from_exception_data(cls.__name__, kept + problems) from None
        if problems:
            raise ValidationError.from_exception_data(cls.__name__, problems)
        return model


NO_CREDENTIAL = "a host needs webhook_secrets (or, for gitlab, signing_secrets): unauthenticated hooks are refused"


def _has_secrets(entry: Any) -> bool:
    return isinstance(entry, dict) and bool(entry.get("webhook_secrets") or entry.get("signing_secrets"))


def _cross_check(data: Any) -> list[InitErrorDetails]:
    """Credentials (host-wide or per route), routes naming an undefined host, route names used twice."""
    if not isinstance(data, dict):
        return []
    hosts = data.get("hosts")
    routes = data.get("routes") if isinstance(data.get("routes"), list) else []
    problems: list[InitErrorDetails] = []
    if isinstance(hosts, dict):
        for host_id, host in hosts.items():
            if not isinstance(host, dict) or _has_secrets(host):
                continue
            own = [r for r in routes if isinstance(r, dict) and r.get("host") == host_id]
            if not any(_has_secrets(r) for r in own):
                problems.append(InitErrorDetails(type=PydanticCustomError("no_credential", NO_CREDENTIAL),
                                                 loc=("hosts", host_id), input=host))
    if not routes:
        return problems
    first_use: dict[str, int] = {}
    for i, route in enumerate(routes):
        if not isinstance(route, dict):
            continue
        host, name = route.get("host"), route.get("name")
        defined = hosts.get(host) if isinstance(hosts, dict) and isinstance(host, str) else None
        if isinstance(defined, dict):
            if route.get("signing_secrets") and defined.get("kind") not in (None, "gitlab"):
                problems.append(InitErrorDetails(
                    type=PydanticCustomError("signing_gitlab_only",
                                             "signing_secrets is GitLab's signing token; github and gitea sign with webhook_secrets"),
                    loc=("routes", i, "signing_secrets"), input=route.get("signing_secrets")))
            if not _has_secrets(defined) and not _has_secrets(route) and any(
                    _has_secrets(r) for r in routes if isinstance(r, dict) and r.get("host") == host):
                problems.append(InitErrorDetails(
                    type=PydanticCustomError(
                        "route_without_credential",
                        f"host {host!r} has no webhook_secrets of its own, so this route needs its own webhook_secrets "
                        "(or signing_secrets): no delivery could ever be authenticated for it"),
                    loc=("routes", i, "webhook_secrets"), input=[]))
        if isinstance(hosts, dict) and isinstance(host, str) and host not in hosts:
            known = ", ".join(sorted(str(h) for h in hosts)) or "none"
            problems.append(InitErrorDetails(
                type=PydanticCustomError("undefined_host", f"host {host!r} is not defined under hosts (defined: {known})"),
                loc=("routes", i, "host"), input=host))
        if isinstance(name, str):
            if name in first_use:
                problems.append(InitErrorDetails(
                    type=PydanticCustomError(
                        "duplicate_route",
                        f"route name {name!r} is already used by routes[{first_use[name]}]; "
                        "names identify routes in PipelineRun labels"),
                    loc=("routes", i, "name"), input=name))
            else:
                first_use[name] = i
    return problems

