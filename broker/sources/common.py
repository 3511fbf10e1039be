"""Checks every source shares: body decoding, field access, ref and commit validation.

Everything from a payload is validated here before it can reach a record, a label,
a URL or a Kubernetes name later on.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs

import orjson

from broker.errors import Rejected
from broker.events import ZERO_SHA, Identity, Ignored, PushEvent, RefKind

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


def load_json(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise Rejected(400, f"body is not valid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise Rejected(400, f"body must be a JSON object, got {type(data).__name__}")
    return data


def load_json_or_form(headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
    """JSON body, or a form-encoded body carrying the JSON in `payload=` (GitHub, Gitea)."""
    kind = media_type(headers)
    if kind in ("", "application/json"):
        return load_json(body)
    if kind == "application/x-www-form-urlencoded":
        try:
            form = parse_qs(body.decode("utf-8"), strict_parsing=True, max_num_fields=64)
        except (UnicodeDecodeError, ValueError):
            raise Rejected(400, "form body is not valid application/x-www-form-urlencoded") from None
        payload = form.get("payload")
        if not payload or len(payload) != 1:
            raise Rejected(400, "form body needs exactly one 'payload' field holding the JSON event")
        return load_json(payload[0].encode("utf-8"))
    raise Rejected(415, f"unsupported content type {kind!r}; send application/json or application/x-www-form-urlencoded")


def require_json_type(headers: Mapping[str, str]) -> None:
    kind = media_type(headers)
    if kind not in ("", "application/json"):
        raise Rejected(415, f"unsupported content type {kind!r}; send application/json")


def field(data: Mapping[str, Any], path: str, *, kind: type | tuple[type, ...] = str, required: bool = True) -> Any:
    """`data[a][b]` for path "a.b", type-checked; a missing or mistyped required field is a 400."""
    value: Any = data
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
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
    return not sha or sha == ZERO_SHA or set(sha) == {"0"}


def fingerprint(event: PushEvent) -> Identity:
    """Identity from the push itself when the host sent no delivery id: same push, same key."""
    raw = "\x1f".join((event.repo_id, event.ref, event.before, event.pushed))
    digest = hashlib.sha256(raw.encode()).hexdigest()[:32]
    return Identity(source="fingerprint(repo id, ref, before, after)", value=digest, key=digest)


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
