"""Checks every source shares: body decoding, field access, ref and commit validation.

Everything from a payload is validated here before it can reach a record, a label,
a URL or a Kubernetes name later on.
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import lru_cache
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlsplit

from broker.core.errors import Rejected
from broker.core.events import ZERO_SHA, Identity, Ignored, PushEvent, RefKind

# \Z, not $: "$" also matches before a trailing newline, and "<sha>\n" is no commit id.
COMMIT_ID = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?\Z")
REPO_PATH = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.+-]*(/[A-Za-z0-9_.][A-Za-z0-9_.+-]*)+\Z")
# git check-ref-format: no control chars, space, ~ ^ : ? * [ \ , no "..", "@{", "//", no trailing "." or "/" or ".lock".
# Lone surrogates (JSON "\ud800") are no text git can hold, and would break every later encode().
BAD_REF = re.compile(r"[\x00-\x20\x7f~^:?*\[\\\ud800-\udfff]|\.\.|@\{|//|/\.|^\.|\.lock(/|$)|[./]$")
SKIP_MARKERS = ("[skip ci]", "[ci skip]")
MAX_TITLE = 200


def media_type(headers: Mapping[str, str]) -> str:
    return headers.get("content-type", "").split(";", 1)[0].strip().lower()


# The JSON decoder is the caller's (the core imports no third-party parser): the edge and explain
# pass orjson.loads. It must raise json.JSONDecodeError (orjson's subclasses it) with a `msg`, and
# refuse lone surrogate escapes ("\ud800"), which no git ref or later encode() can hold; orjson does.
Loads = Callable[[bytes | str], Any]


def load_json(body: bytes, *, loads: Loads) -> dict[str, Any]:
    try:
        data = loads(body)
    except json.JSONDecodeError as exc:
        raise Rejected(400, f"body is not valid JSON: {exc.msg}") from None
    except RecursionError:  # the standard library's decoder on arrays nested thousands deep
        raise Rejected(400, "body is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # the standard library on bytes that are not UTF-8
        raise Rejected(400, f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise Rejected(400, f"body must be a JSON object, got {type(data).__name__}")
    return data


def load_json_or_form(headers: Mapping[str, str], body: bytes, *, loads: Loads) -> dict[str, Any]:
    """JSON body, or a form-encoded body carrying the JSON in `payload=` (GitHub, Gitea)."""
    kind = media_type(headers)
    if kind in ("", "application/json"):
        return load_json(body, loads=loads)
    if kind == "application/x-www-form-urlencoded":
        try:
            form = parse_qs(body.decode("utf-8"), strict_parsing=True, max_num_fields=64)
        except (UnicodeDecodeError, ValueError):
            raise Rejected(400, "form body is not valid application/x-www-form-urlencoded") from None
        payload = form.get("payload")
        if not payload or len(payload) != 1:
            raise Rejected(400, "form body needs exactly one 'payload' field holding the JSON event")
        return load_json(payload[0].encode("utf-8"), loads=loads)
    raise Rejected(415, f"unsupported content type {kind!r}; send application/json or application/x-www-form-urlencoded")


def require_json_type(headers: Mapping[str, str]) -> None:
    kind = media_type(headers)
    if kind not in ("", "application/json"):
        raise Rejected(415, f"unsupported content type {kind!r}; send application/json")


def field(data: Mapping[str, Any], path: str, *, kind: type | tuple[type, ...] = str, required: bool = True) -> Any:
    """`data[a][b]` for path "a.b", type-checked; a missing or mistyped required field is a 400."""
    value: Any = data
    for part in _parts(path):
        # Payloads are JSON objects (dicts); `type(...) is dict` is much cheaper than an ABC check per step.
        value = value.get(part) if type(value) is dict or isinstance(value, Mapping) else None
    if value is None:
        if required:
            raise Rejected(400, f"payload field '{path}' is missing")
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # JSON true/false are Python bools, and bool is an int: never let them pass as a number.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in kinds):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise Rejected(400, f"payload field '{path}' must be {names}, got {type(value).__name__}")
    return value


@lru_cache(maxsize=64)
def _parts(path: str) -> tuple[str, ...]:
    return tuple(path.split("."))


def commit_id(value: str, *, name: str) -> str:
    if not COMMIT_ID.match(value):
        raise Rejected(400, f"payload field '{name}' is not a commit id")
    return value


def split_ref(ref: str) -> tuple[RefKind, str]:
    """(branch|tag, short name) of a full ref; refs we do not build are a 400."""
    if len(ref) > 255 or BAD_REF.search(ref):
        raise Rejected(400, "payload field 'ref' is not a valid git ref name")
    for prefix, kind in (("refs/heads/", RefKind.BRANCH), ("refs/tags/", RefKind.TAG)):
        if ref.startswith(prefix) and len(ref) > len(prefix):
            return kind, ref[len(prefix):]
    raise Rejected(400, "payload field 'ref' must start with refs/heads/ or refs/tags/")


def previous_sha(value: str | None) -> str:
    """The payload's `before`: a commit id, or the zero id when the ref is new (absent, null or all zeros)."""
    return ZERO_SHA if is_zero(value) else commit_id(value or "", name="before")


def repo_path(value: str, *, name: str) -> str:
    if len(value) > 255 or not REPO_PATH.match(value) or ".." in value:
        raise Rejected(400, f"payload field '{name}' is not a repository path (owner/name)")
    return value


REPO_ID = re.compile(r"^[A-Za-z0-9_.:=+-]{1,100}\Z")
SURROGATE = re.compile(r"[\ud800-\udfff]")


def display(value: object, *, limit: int) -> str:
    """Free text for people (sender, URL, title), shortened.

    JSON can carry lone surrogates ("\\ud800"); they cannot be encoded as UTF-8, so the
    record store would fail on them. They become U+FFFD here.
    """
    return SURROGATE.sub("\ufffd", str(value)[:limit])


def repository_id(value: int | str, *, name: str) -> str:
    """The host's id of the repository, as text: it keys the fingerprint and the record."""
    text = str(value)
    if not REPO_ID.match(text):
        raise Rejected(400, f"payload field '{name}' is not a repository id")
    return text


def title(message: str | None) -> str:
    if not message:
        return ""
    line = message.strip().splitlines()[0] if message.strip() else ""
    return display(line, limit=MAX_TITLE)


def skip_marker(message: str | None) -> str | None:
    if not message:
        return None
    lowered = message.lower()
    for marker in SKIP_MARKERS:
        if marker in lowered:
            return f"{marker} in the head commit message"
    return None


def deletion(kind: RefKind, name: str, event: str) -> Ignored:
    return Ignored(code=f"{kind}_deleted", reason=f"{kind} {name!r} was deleted; nothing to build", event=event)


def is_zero(sha: str | None) -> bool:
    return not sha or sha == ZERO_SHA or not sha.strip("0")


def push_fingerprint(*, host: str, repo: str, ref: str, before: str, after: str) -> str:
    """The digest that names one push: (host id, repo path, ref, before, after).

    The same push delivered twice (a resend, a replay with new unsigned headers, a second hook)
    has the same fingerprint. Repo paths compare case-insensitively (GitLab and GitHub treat them
    so). Pure, so a reconciler can compute it from a stored record or a host's API answer.
    """
    raw = "\x1f".join((host, repo.lower(), ref, before.lower(), after.lower()))
    return hashlib.sha256(raw.encode("utf-8", "surrogateescape")).hexdigest()[:32]


FINGERPRINT_SOURCE = "push fingerprint"


def fingerprint(event: PushEvent) -> Identity:
    """The push fingerprint of an event as its deduplication identity."""
    digest = push_fingerprint(host=event.host, repo=event.repo, ref=event.ref, before=event.before, after=event.pushed)
    return Identity(source=FINGERPRINT_SOURCE, value=digest, key=digest)


class WebBase(NamedTuple):
    """Where a Git host serves its web pages (and so its project URLs): scheme, host name, port, path prefix."""

    scheme: str
    host: str
    port: int
    prefix: str

    def __str__(self) -> str:
        default = {"https": 443, "http": 80}.get(self.scheme)
        port = "" if self.port == default else f":{self.port}"
        return f"{self.scheme}://{self.host}{port}{self.prefix}"


# The payload field that holds the project's URL, per host kind (PushEvent.web_url comes from it).
PROJECT_URL_FIELD = {"gitlab": "project.web_url", "github": "repository.html_url", "gitea": "repository.html_url"}
API_SUFFIX = re.compile(r"/api(/v[0-9]+)?/?\Z")


def web_base(kind: str, api_url: str) -> WebBase:
    """The host's web origin and path prefix, from its API URL (routing file hosts.<id>.api_url).

    GitLab `https://gitlab.example.com[/prefix]/api/v4`, Gitea `.../api/v1`, GitHub Enterprise
    `https://ghe.example.com/api/v3` serve pages at the same origin without the API suffix;
    github.com serves its API from api.github.com (and GHE.com from api.<name>.ghe.com).
    """
    parts = urlsplit(api_url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    port = parts.port or {"https": 443, "http": 80}.get(scheme, 0)
    prefix = API_SUFFIX.sub("", parts.path).rstrip("/")
    if kind == "github" and host.startswith("api.") and (host == "api.github.com" or host.endswith(".ghe.com")) and not prefix:
        host = host.removeprefix("api.")
    return WebBase(scheme, host, port, prefix)


def check_project_url(event: PushEvent, base: WebBase, *, field_name: str) -> None:
    """Rejected(403) unless the payload's project URL is `<host's web base>/<the repo it claims>`.

    The URL must be on the host's own scheme, host and port, carry no user, query or fragment, and
    its path must name the same project as the payload's path (case-insensitively, as GitLab and
    GitHub compare project paths). Otherwise a payload for `acme/app` could point its clone URL at
    another project.
    """
    url = event.web_url
    if not url:
        raise Rejected(403, f"payload field '{field_name}' is missing; cannot tell the project is on this host ({base})")
    if url.lower() == f"{base}/{event.repo}".lower():  # the canonical form, as hosts send it: nothing more to check
        return
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise Rejected(403, f"payload field '{field_name}' is not a URL") from None
    scheme = parts.scheme.lower()
    port = port or {"https": 443, "http": 80}.get(scheme, 0)
    if (scheme, (parts.hostname or "").lower(), port) != (base.scheme, base.host, base.port) or parts.username is not None \
            or parts.password is not None or parts.query or parts.fragment:
        raise Rejected(403, f"payload field '{field_name}' is not on this host ({base}); refused")
    path = parts.path.rstrip("/")
    if path.lower() != f"{base.prefix}/{event.repo}".lower():
        raise Rejected(403, f"payload field '{field_name}' names another project than {event.repo!r}; refused")


def header_identity(headers: Mapping[str, str], *names: str) -> Identity | None:
    """Identity from the first group of headers that are all present (a group is "a+b")."""
    for group in names:
        parts = group.split("+")
        values = [headers.get(p, "").strip() for p in parts]
        if all(values):
            joined = "\x1f".join(values)
            shown = " + ".join(v[:100] for v in values).encode("ascii", "replace").decode()
            return Identity(source=" + ".join(parts), value=shown, key=hashlib.sha256(joined.encode("utf-8", "surrogateescape")).hexdigest()[:32])
    return None
