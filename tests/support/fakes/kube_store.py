"""The fake API server's state: objects, one global resourceVersion, history, watchers.

Behaves like the parts of kube-apiserver + etcd that cibroker relies on: every write
bumps one global resourceVersion (string integers), no-op writes are not writes,
spec changes bump `metadata.generation`, the status subresource and the main resource
each ignore the other's half, writes carrying a stale resourceVersion are 409 Conflict,
a watch resumes from a resourceVersion out of a bounded history and answers 410 Gone
once that history is compacted, and a watch with a label selector sees an object
leave (DELETED) or enter (ADDED) its selection.

No HTTP here: `kube_api.py` serves this store; simulators and seeding helpers write to
it directly so their writes never show up in the request log.
"""

from __future__ import annotations

import copy
import queue
import random
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from tests.support.fakes import selectors

Obj = dict[str, Any]
END = object()  # queued after a terminal watch event: finish the stream


@dataclass(frozen=True)
class Resource:
    plural: str
    group: str
    kind: str
    versions: tuple[str, ...]
    builtin: bool
    has_status: bool

    @property
    def qualified(self) -> str:
        """How the API names the resource in messages: `pipelineruns.tekton.dev`, `deployments.apps`."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def api_version(self, version: str) -> str:
        return f"{self.group}/{version}" if self.group else version


RESOURCES = {r.plural: r for r in [
    Resource("pipelineruns", "tekton.dev", "PipelineRun", ("v1", "v1beta1"), builtin=False, has_status=True),
    Resource("taskruns", "tekton.dev", "TaskRun", ("v1", "v1beta1"), builtin=False, has_status=True),
    Resource("serviceaccounts", "", "ServiceAccount", ("v1",), builtin=True, has_status=False),
    Resource("deployments", "apps", "Deployment", ("v1",), builtin=True, has_status=True),
    Resource("replicasets", "apps", "ReplicaSet", ("v1",), builtin=True, has_status=True),
]}
PLURAL_OF_KIND = {r.kind: r.plural for r in RESOURCES.values()}

_REASONS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 405: "MethodNotAllowed",
            409: "Conflict", 410: "Gone", 415: "UnsupportedMediaType", 422: "Invalid", 429: "TooManyRequests",
            500: "InternalError", 503: "ServiceUnavailable", 504: "Timeout"}
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_NAME_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # what the API server uses for generateName


def status_body(code: int, message: str, *, reason: str | None = None, details: Obj | None = None) -> Obj:
    """A metav1.Status failure, as the API server answers errors."""
    body: Obj = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
                 "reason": reason or _REASONS.get(code, "Unknown"), "code": code}
    if details is not None:
        body["details"] = details
    return body


class ApiError(Exception):
    """An API failure the HTTP layer answers as a Status body."""

    def __init__(self, code: int, message: str, *, reason: str | None = None, details: Obj | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.body = status_body(code, message, reason=reason, details=details)


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def labels_of(obj: Obj) -> dict[str, str]:
    return obj.get("metadata", {}).get("labels") or {}


@dataclass(frozen=True)
class Change:
    """One committed write, as history and listeners see it. For DELETED, `new` is the last state."""

    rv: int
    type: str
    plural: str
    namespace: str
    old: Obj | None
    new: Obj


@dataclass(eq=False)
class Watcher:
    """One open watch: what it selects and the queue its HTTP stream drains."""

    resource: Resource
    version: str
    namespace: str
    selector: str = ""
    bookmarks: bool = False
    connection: Any = None  # the server-side socket, so cut_watches() can drop it
    events: queue.Queue[Any] = field(default_factory=queue.Queue)
    cut: threading.Event = field(default_factory=threading.Event)
    closed: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._match = _parse_selector(self.selector)

    def offer(self, change: Change) -> None:
        if change.plural != self.resource.plural or change.namespace != self.namespace:
            return
        was = change.old is not None and self._match(labels_of(change.old))
        now_ = self._match(labels_of(change.new))
        kind = {("ADDED", False, True): "ADDED", ("MODIFIED", True, True): "MODIFIED",
                ("MODIFIED", False, True): "ADDED", ("MODIFIED", True, False): "DELETED",
                ("DELETED", True, True): "DELETED"}.get((change.type, was, now_))
        if kind:
            self.events.put({"type": kind, "object": copy.deepcopy(change.new)})

    def bookmark(self, rv: int) -> None:
        self.events.put({"type": "BOOKMARK", "object": {
            "kind": self.resource.kind, "apiVersion": self.resource.api_version(self.version),
            "metadata": {"resourceVersion": str(rv)}}})


class Store:
    """Objects keyed by (plural, namespace, name), whatever API version wrote them."""

    def __init__(self, *, history_limit: int = 1000, first_resource_version: int = 100) -> None:
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._objects: dict[tuple[str, str, str], Obj] = {}
        # (plural, namespace, label key, label value) -> object keys: equality selectors without a full scan
        self._by_label: dict[tuple[str, str, str, str], set[tuple[str, str, str]]] = {}
        self._rv = first_resource_version
        self._history: deque[Change] = deque()
        self._history_limit = history_limit
        self._compacted = 0  # changes with rv <= this are gone from history
        self._watchers: set[Watcher] = set()
        self._listeners: list[Callable[[Change], None]] = []

    # -- reading ---------------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        return self._rv

    def find(self, plural: str, namespace: str, name: str) -> Obj | None:
        with self._lock:
            obj = self._objects.get((plural, namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def get(self, plural: str, namespace: str, name: str) -> Obj:
        obj = self.find(plural, namespace, name)
        if obj is None:
            raise _not_found(RESOURCES[plural], name)
        return obj

    def list(self, plural: str, namespace: str | None, selector: str = "") -> tuple[list[Obj], int]:
        match = _parse_selector(selector)
        equalities = _equalities(selector)
        with self._lock:
            if namespace is not None and equalities:
                # Like the API server's indexed lookups: start from the smallest label set; `match` still decides.
                candidates = min((self._by_label.get((plural, namespace, k, v), set()) for k, v in equalities), key=len)
                objects = [(k, self._objects[k]) for k in candidates]
            else:
                objects = list(self._objects.items())
            items = [copy.deepcopy(o) for (p, ns, _), o in objects
                     if p == plural and namespace in (None, ns) and match(labels_of(o))]
            return sorted(items, key=lambda o: int(o["metadata"]["resourceVersion"])), self._rv

    def wait_for(self, plural: str, namespace: str, name: str, predicate: Callable[[Obj], bool], *,
                 timeout: float = 5.0) -> Obj:
        """Block until the object exists and satisfies `predicate` (re-checked on every write)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                obj = self.find(plural, namespace, name)
                if obj is not None and predicate(obj):
                    return obj
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"{plural} {namespace}/{name} did not reach the expected state "
                                         f"within {timeout}s; last seen: {obj!r}")
                self._changed.wait(remaining)

    # -- writing ---------------------------------------------------------------------------

    def create(self, plural: str, namespace: str, body: Obj, *, version: str | None = None,
               keep_status: bool = False) -> Obj:
        """POST semantics; `keep_status` (seeding and simulators) keeps the body's status."""
        resource = RESOURCES[plural]
        obj = _admit_new(resource, namespace, copy.deepcopy(body), version or resource.versions[0])
        if not keep_status and resource.has_status:
            obj.pop("status", None)
        with self._lock:
            meta = obj["metadata"]
            if "name" not in meta:
                meta["name"] = self._generate_name(plural, namespace, meta["generateName"])
            if (plural, namespace, meta["name"]) in self._objects:
                raise ApiError(409, f'{resource.qualified} "{meta["name"]}" already exists', reason="AlreadyExists",
                               details={"name": meta["name"], "group": resource.group, "kind": plural})
            _validate(resource, obj)
            meta.update(uid=str(uuid.uuid4()), creationTimestamp=now())
            if resource.plural != "serviceaccounts":  # only objects with a spec carry a generation
                meta["generation"] = 1
            change = self._commit("ADDED", plural, namespace, None, obj)
        self._notify(change)
        return copy.deepcopy(change.new)

    def update(self, plural: str, namespace: str, name: str, mutate: Callable[[Obj], Obj | None], *,
               subresource: str | None = None, precondition: str | None = None, direct: bool = False) -> Obj:
        """Read-modify-write under the lock. `direct` (simulators) may change every field at once."""
        resource = RESOURCES[plural]
        with self._lock:
            old = self._objects.get((plural, namespace, name))
            if old is None:
                raise _not_found(resource, name)
            if precondition is not None and precondition != old["metadata"]["resourceVersion"]:
                raise _conflict(resource, name)
            draft = copy.deepcopy(old)
            result = mutate(draft)
            new = _merge_halves(resource, old, draft if result is None else result, subresource, direct=direct)
            _validate(resource, new)
            if new == old:
                return copy.deepcopy(old)
            change = self._commit("MODIFIED", plural, namespace, old, new)
        self._notify(change)
        return copy.deepcopy(change.new)

    def delete(self, plural: str, namespace: str, name: str) -> Obj:
        """Delete, then garbage-collect dependents whose ownerReferences name the deleted uid."""
        with self._lock:
            old = self._objects.get((plural, namespace, name))
            if old is None:
                raise _not_found(RESOURCES[plural], name)
            change = self._commit("DELETED", plural, namespace, old, copy.deepcopy(old))
            dependents = [(p, ns, n) for (p, ns, n), o in self._objects.items() if ns == namespace and any(
                ref.get("uid") == old["metadata"]["uid"] for ref in o["metadata"].get("ownerReferences", []))]
        self._notify(change)
        for p, ns, n in dependents:
            if self.find(p, ns, n) is not None:
                self.delete(p, ns, n)
        return copy.deepcopy(change.new)

    def compact(self) -> None:
        """Forget all history: a watch resuming from any older resourceVersion gets 410 Gone."""
        with self._lock:
            self._history.clear()
            self._compacted = self._rv

    def add_listener(self, listener: Callable[[Change], None]) -> None:
        """Call `listener(change)` after every committed write, outside the lock, in the writer's thread."""
        self._listeners.append(listener)

    # -- watching --------------------------------------------------------------------------

    def watch(self, watcher: Watcher, resource_version: str | None) -> None:
        """Register `watcher` and queue what it must see first, atomically with respect to writes."""
        with self._lock:
            if resource_version in (None, "", "0"):
                items, _ = self.list(watcher.resource.plural, watcher.namespace, watcher.selector)
                for item in items:
                    watcher.events.put({"type": "ADDED", "object": item})
            else:
                start = _parse_resource_version(resource_version)
                if start < self._compacted:
                    watcher.events.put({"type": "ERROR", "object": status_body(
                        410, f"too old resource version: {start} ({self._compacted})", reason="Gone")})
                    watcher.events.put(END)
                    return
                for change in self._history:
                    if change.rv > start:
                        watcher.offer(change)
            self._watchers.add(watcher)

    def unwatch(self, watcher: Watcher) -> None:
        with self._lock:
            self._watchers.discard(watcher)

    def watchers(self) -> list[Watcher]:
        with self._lock:
            return list(self._watchers)

    def bookmark(self, watchers: Iterable[Watcher], *, only_if_idle: bool = False) -> None:
        """Queue a BOOKMARK at the current resourceVersion (everything up to it is already queued)."""
        with self._lock:
            for watcher in watchers:
                if watcher.bookmarks and (not only_if_idle or watcher.events.empty()):
                    watcher.bookmark(self._rv)

    # -- internals -------------------------------------------------------------------------

    def _commit(self, kind: str, plural: str, namespace: str, old: Obj | None, new: Obj) -> Change:
        self._rv += 1
        new["metadata"]["resourceVersion"] = str(self._rv)
        key = (plural, namespace, new["metadata"]["name"])
        previous = self._objects.get(key)
        if previous is not None:
            for label in labels_of(previous).items():
                self._by_label.get((plural, namespace, *label), set()).discard(key)
        if kind == "DELETED":
            del self._objects[key]
        else:
            self._objects[key] = new
            for label in labels_of(new).items():
                self._by_label.setdefault((plural, namespace, *label), set()).add(key)
        change = Change(self._rv, kind, plural, namespace, copy.deepcopy(old), copy.deepcopy(new))
        self._history.append(change)
        while len(self._history) > self._history_limit:
            self._compacted = self._history.popleft().rv
        for watcher in self._watchers:
            watcher.offer(change)
        self._changed.notify_all()
        return change

    def _notify(self, change: Change) -> None:
        for listener in list(self._listeners):
            listener(change)

    def _generate_name(self, plural: str, namespace: str, prefix: str) -> str:
        while True:
            name = prefix + "".join(random.choices(_NAME_SUFFIX_ALPHABET, k=5))
            if (plural, namespace, name) not in self._objects:
                return name


def _admit_new(resource: Resource, namespace: str, obj: Obj, version: str) -> Obj:
    """What the API server checks and defaults on create, before storage."""
    expected = resource.api_version(version)
    if resource.builtin:
        obj.setdefault("apiVersion", expected)
        obj.setdefault("kind", resource.kind)
    if "kind" not in obj or "apiVersion" not in obj:
        raise ApiError(400, f"Object 'Kind' is missing in '{obj!r}'")
    if obj["apiVersion"] != expected:
        raise ApiError(400, f"the API version in the data ({obj['apiVersion']}) does not match the expected "
                            f"API version ({expected})")
    if obj["kind"] != resource.kind:
        raise ApiError(400, f"the kind in the data ({obj['kind']}) does not match the expected kind ({resource.kind})")
    meta = obj.setdefault("metadata", {})
    if meta.get("namespace", namespace) != namespace:
        raise ApiError(400, "the namespace of the provided object does not match the namespace sent on the request")
    meta["namespace"] = namespace
    if not meta.get("name") and not meta.get("generateName"):
        raise _invalid(resource, "", "metadata.name: Required value: name or generateName is required")
    if not meta.get("name"):
        meta.pop("name", None)
    for key in ("uid", "resourceVersion", "creationTimestamp", "generation"):
        meta.pop(key, None)
    _default(resource, obj)
    return obj


def _default(resource: Resource, obj: Obj) -> None:
    """The few defaults a real cluster adds that a reader of the object might notice."""
    spec = obj.setdefault("spec", {})
    if resource.plural == "pipelineruns":  # Tekton's defaulting webhook
        spec.setdefault("timeouts", {}).setdefault("pipeline", "1h0m0s")
        if obj["apiVersion"].endswith("/v1"):
            spec.setdefault("taskRunTemplate", {}).setdefault("serviceAccountName", "default")
        else:
            spec.setdefault("serviceAccountName", "default")
    elif resource.plural == "deployments":
        spec.setdefault("replicas", 1)
        spec.setdefault("progressDeadlineSeconds", 600)
        spec.setdefault("revisionHistoryLimit", 10)
        spec.setdefault("strategy", {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%",
                                                                                 "maxUnavailable": "25%"}})
    elif resource.plural == "serviceaccounts":
        obj.pop("spec")


def _merge_halves(resource: Resource, old: Obj, new: Obj, subresource: str | None, *, direct: bool) -> Obj:
    """Apply status-subresource rules, keep immutable metadata, bump generation on spec change."""
    if direct:
        merged = copy.deepcopy(new)
    elif subresource == "status":
        merged = copy.deepcopy(old)
        merged.pop("status", None)
        if "status" in new:
            merged["status"] = copy.deepcopy(new["status"])
    else:
        merged = copy.deepcopy(new)
        if resource.has_status:
            merged.pop("status", None)
            if "status" in old:
                merged["status"] = copy.deepcopy(old["status"])
    meta = merged.setdefault("metadata", {})
    for key in ("name", "namespace", "uid", "creationTimestamp", "generation", "resourceVersion"):
        if key in old["metadata"]:
            meta[key] = old["metadata"][key]
    merged["apiVersion"], merged["kind"] = old["apiVersion"], old["kind"]
    if "generation" in meta and _spec_of(merged) != _spec_of(old):
        meta["generation"] = old["metadata"]["generation"] + 1
    return merged


def _spec_of(obj: Obj) -> Obj:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}


def _validate(resource: Resource, obj: Obj) -> None:
    meta = obj["metadata"]
    name = meta.get("name", "")
    if resource.group == "tekton.dev" and len(name) > 63:
        raise ApiError(400, f'admission webhook "validation.webhook.pipeline.tekton.dev" denied the request: '
                            f'validation failed: Invalid resource name: length must be no more than 63 characters: '
                            f"metadata.name")
    if len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        raise _invalid(resource, name, f'metadata.name: Invalid value: "{name}": a lowercase RFC 1123 subdomain '
                                       "must consist of lower case alphanumeric characters, '-' or '.', and must "
                                       "start and end with an alphanumeric character")
    for key, value in (meta.get("labels") or {}).items():
        prefix, _, label = key.rpartition("/")
        if len(label) > 63 or not _LABEL_NAME.match(label) or (prefix and not _DNS_SUBDOMAIN.match(prefix)):
            raise _invalid(resource, name, f'metadata.labels: Invalid value: "{key}": name part must consist of '
                                           "alphanumeric characters, '-', '_' or '.', and must start and end with "
                                           "an alphanumeric character")
        if not isinstance(value, str) or len(value) > 63 or (value and not _LABEL_NAME.match(value)):
            raise _invalid(resource, name, f'metadata.labels: Invalid value: "{value}": a valid label must be an '
                                           "empty string or consist of alphanumeric characters, '-', '_' or '.', "
                                           "and must start and end with an alphanumeric character")
    for value in (meta.get("annotations") or {}).values():
        if not isinstance(value, str):
            raise ApiError(400, "json: cannot unmarshal non-string into Go struct field ObjectMeta."
                                "metadata.annotations of type string")


def _equalities(selector: str) -> list[tuple[str, str]]:
    """(key, value) pairs when the selector is only `k=v` / `k==v` terms, else []."""
    pairs = []
    for part in (selector or "").split(","):
        key, sep, value = part.strip().partition("=")
        value = value.removeprefix("=")
        if not sep or not key or key.endswith("!") or not value or any(c in part for c in "()!") :
            return []
        pairs.append((key.strip(), value.strip()))
    return pairs


def _parse_selector(selector: str) -> selectors.Requirement:
    try:
        return selectors.parse(selector)
    except selectors.SelectorError as exc:
        raise ApiError(400, f"unable to parse requirement: {exc}") from exc


def _parse_resource_version(text: str) -> int:
    try:
        return int(text)
    except ValueError as exc:
        raise ApiError(400, f'invalid resource version "{text}"') from exc


def _not_found(resource: Resource, name: str) -> ApiError:
    return ApiError(404, f'{resource.qualified} "{name}" not found',
                    details={"name": name, "group": resource.group, "kind": resource.plural})


def _conflict(resource: Resource, name: str) -> ApiError:
    return ApiError(409, f'Operation cannot be fulfilled on {resource.qualified} "{name}": the object has been '
                         "modified; please apply your changes to the latest version and try again",
                    details={"name": name, "group": resource.group, "kind": resource.plural})


def _invalid(resource: Resource, name: str, cause: str) -> ApiError:
    kind = f"{resource.kind}.{resource.group}" if resource.group else resource.kind
    return ApiError(422, f'{kind} "{name}" is invalid: {cause}',
                    details={"name": name, "group": resource.group, "kind": resource.kind})
