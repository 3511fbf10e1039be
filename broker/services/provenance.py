"""Is this PipelineRun cibroker's, and what may it do? Decided from what only cibroker writes.

A PipelineRun's labels and annotations are written by many hands (any pipeline step with a
token, any tool with `patch`), so they are an index for finding runs, never an order. A run
counts as cibroker's only when

- the delivery its label names is in the store, and that stored delivery says it owns this
  run (namespace/name, with its route, resolved commit and attempt: written by the worker
  BEFORE it creates the run, so a crash after the create still matches), and
- its `cibroker.dev/signature` annotation is the HMAC (broker key) over the run's name and
  namespace and the route, repo, ref, sha and delivery id *as stored*.

Everything the run does next (which commit status it posts and where, which image goes to
which Deployment, which clone URL gets a credential) is then derived from the routing file
and the stored delivery: `RunFacts`. Nothing is read from the run's annotations except the
signature itself and the last-reported hint.

Pure: the store is reached through the `lookup` callable the caller passes in. One Redis
read per run, then the verdict is cached per (run, delivery label, signature).
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from broker.core import pipelinerun as pr
from broker.core.errors import Permanent, Untrusted
from broker.core.events import RefKind
from broker.core.status import CommitState
from broker.core.reporting import parse_state
from broker.core.routing import glob_match
from broker.core import metrics
from broker.core.errors import StoreUnavailable
from broker.core.trust import run_signature_ok
from broker.logging import get_logger
from broker.ports import Counters
from config.routing import RoutingFile

log = get_logger("cibroker.provenance")

# The fixed set of reasons a run is not cibroker's (metric label values).
REASONS = ("no_delivery_label", "unknown_delivery", "not_owned", "bad_signature", "route_mismatch", "malformed_record")
# (delivery id, namespace, name) -> (stored delivery record, stored ownership entry) or None.
Lookup = Callable[[str, str, str], "tuple[Mapping[str, Any], Mapping[str, Any] | None] | None"]
_DELIVERY_ID = re.compile(r"[A-Za-z0-9._-]{1,128}\Z")


@dataclass(frozen=True, slots=True)
class RunFacts:
    """What a verified run may act on: the routing file plus the stored delivery that created it."""

    namespace: str
    name: str
    host: str
    host_kind: str
    repo: str
    repo_id: str
    ref: str
    sha: str
    route: str
    delivery_id: str
    status_name: str
    deploy: tuple[str, ...]
    clone_url: str
    image: str  # the tag image (repository:tag) the route renders for this commit
    reported: CommitState | None = None  # the run's `reported` annotation: a hint for skipping work, never a decision
    kind: RefKind = RefKind.BRANCH
    ref_name: str = ""
    attempt: int = 1

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def short_ref(self) -> str:
        return self.ref.removeprefix("refs/heads/").removeprefix("refs/tags/")


@dataclass(frozen=True, slots=True)
class Verdict:
    """The answer for one run: `facts` when it is cibroker's, else a `reason` (one of REASONS) and a sentence."""

    facts: RunFacts | None
    reason: str = ""
    detail: str = ""

    @property
    def trusted(self) -> bool:
        return self.facts is not None


def facts_of(routing: RoutingFile, record: Mapping[str, Any], owned: Mapping[str, Any], *, namespace: str, name: str) -> RunFacts:
    """RunFacts from a stored delivery and its ownership entry; Permanent when they do not fit the routing file."""
    push = record["push"]
    route = routing.route(str(owned["route"]))
    if route is None:
        raise Permanent(f"route {owned['route']!r} is no longer in the routing file")
    host = routing.hosts.get(route.host)
    if host is None or record["host"] != route.host:
        raise Permanent(f"route {route.name} is on host {route.host!r}, the delivery came from {record['host']!r}")
    if not glob_match(route.repo, str(push["repo"]), ignore_case=True):
        raise Permanent(f"route {route.name} builds {route.repo!r}, not {push['repo']!r}")
    kind = RefKind(push["kind"])
    req = pr.RunRequest(
        delivery_id=str(record["delivery_id"]), host=str(record["host"]), host_kind=host.kind, repo=str(push["repo"]),
        repo_id=str(push["repo_id"]), ref=str(push["ref"]), kind=kind, name=str(push["name"]), sha=str(owned["sha"]),
        attempt=int(owned["attempt"]), received_at=str(record.get("received_at", "")),
    )
    return RunFacts(
        namespace=namespace, name=name, host=req.host, host_kind=host.kind, repo=req.repo, repo_id=req.repo_id, ref=req.ref,
        sha=req.sha, route=route.name, delivery_id=req.delivery_id, status_name=pr.status_name(routing, route),
        deploy=tuple(d.environment for d in pr.deploys_for(route, req)),
        clone_url=pr.clone_url(route, repo=req.repo, host=host), image=pr.image_ref(route, req), kind=kind,
        ref_name=req.name, attempt=req.attempt,
    )


class RunVerifier:
    """Decides whether a PipelineRun is cibroker's (see the module docstring); thread-safe, cached per run."""

    def __init__(self, *, key: bytes, routing: RoutingFile, lookup: Lookup, cache_size: int = 20_000) -> None:
        self._key = key
        self._routing = routing
        self._lookup = lookup
        self._cache: OrderedDict[tuple[str, str, str, str], Verdict] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def verify(self, obj: Mapping[str, Any]) -> Verdict:
        return self.check(obj)[0]

    def check(self, obj: Mapping[str, Any]) -> tuple[Verdict, bool]:
        """(verdict, first time): `first` is False when this run's verdict was already known (say it once)."""
        meta = obj.get("metadata") if isinstance(obj, Mapping) else None
        meta = meta if isinstance(meta, Mapping) else {}
        labels = meta.get("labels") if isinstance(meta.get("labels"), Mapping) else {}
        annotations = meta.get("annotations") if isinstance(meta.get("annotations"), Mapping) else {}
        namespace, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
        delivery_id = labels.get(pr.L_DELIVERY)
        signature = annotations.get(pr.A_SIGNATURE)
        cache_key = (namespace, name, str(delivery_id), str(signature)[:200])
        with self._lock:
            known = self._cache.get(cache_key)
            if known is not None:
                self._cache.move_to_end(cache_key)
        if known is not None:
            return self._with_hint(known, annotations), False
        verdict = self._decide(namespace, name, delivery_id, signature)  # Transient (Redis away) is not cached
        with self._lock:
            self._cache[cache_key] = verdict
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return self._with_hint(verdict, annotations), True

    def require(self, obj: Mapping[str, Any]) -> RunFacts:
        """The run's facts, or Untrusted with the reason."""
        verdict = self.verify(obj)
        if verdict.facts is None:
            raise Untrusted(verdict.detail)
        return verdict.facts

    @staticmethod
    def _with_hint(verdict: Verdict, annotations: Mapping[str, Any]) -> Verdict:
        if verdict.facts is None:
            return verdict
        hint = annotations.get(pr.A_REPORTED)
        return replace(verdict, facts=replace(verdict.facts, reported=parse_state(hint if isinstance(hint, str) else None)))

    def _decide(self, namespace: str, name: str, delivery_id: object, signature: object) -> Verdict:
        run = f"{namespace}/{name}"
        if not isinstance(delivery_id, str) or not _DELIVERY_ID.match(delivery_id):
            return Verdict(None, "no_delivery_label", f"PipelineRun {run} names no delivery ({pr.L_DELIVERY} label)")
        found = self._lookup(delivery_id, namespace, name)
        if found is None:
            return Verdict(None, "unknown_delivery", f"PipelineRun {run} names delivery {delivery_id}, which is not in the store")
        record, owned = found
        if owned is None:
            return Verdict(None, "not_owned", f"PipelineRun {run}: delivery {delivery_id} never created a run of that name")
        try:
            push = record["push"]
            fields = dict(name=name, namespace=namespace, route=str(owned["route"]), repo=str(push["repo"]),
                          ref=str(push["ref"]), sha=str(owned["sha"]), delivery_id=delivery_id)
        except (KeyError, TypeError) as exc:
            return Verdict(None, "malformed_record", f"PipelineRun {run}: delivery {delivery_id}'s record is malformed "
                                                     f"({type(exc).__name__}: {exc})")
        if not run_signature_ok(self._key, signature, **fields):
            return Verdict(None, "bad_signature", f"PipelineRun {run} does not carry cibroker's signature for delivery "
                                                  f"{delivery_id} (not created by cibroker, or altered)")
        try:
            facts = facts_of(self._routing, record, owned, namespace=namespace, name=name)
        except Permanent as exc:
            return Verdict(None, "route_mismatch", f"PipelineRun {run}: {exc}")
        except (KeyError, TypeError, ValueError) as exc:
            return Verdict(None, "malformed_record", f"PipelineRun {run}: delivery {delivery_id}'s record is malformed "
                                                     f"({type(exc).__name__}: {exc})")
        return Verdict(facts)


DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z")
DIGEST_RESULTS = ("image-digest", "IMAGE_DIGEST")  # the shipped Pipelines' result; Tekton Chains' type-hint name


def image_digest(obj: Mapping[str, Any]) -> str | None:
    """The image digest a finished run reports (v1 `status.results`, v1beta1 `status.pipelineResults`), validated.

    None when there is none, or when what is there is not exactly `sha256:<64 hex>`, or when
    two digest results disagree.
    """
    status = obj.get("status") if isinstance(obj.get("status"), Mapping) else {}
    found: set[str] = set()
    for field in ("results", "pipelineResults"):
        items = status.get(field)
        if not isinstance(items, list):
            continue
        for item in items:
            if isinstance(item, Mapping) and item.get("name") in DIGEST_RESULTS:
                value = item.get("value")
                if not isinstance(value, str) or not DIGEST.match(value.strip()):
                    return None
                found.add(value.strip())
    return found.pop() if len(found) == 1 else None


def repository_of(tag_image: str) -> str:
    """`registry:5000/acme/app` of `registry:5000/acme/app:tag` (the route renders the tag; the repository is the routing file's)."""
    head, _, last = tag_image.rpartition("/")
    if ":" in last:
        last = last.split(":", 1)[0]
    return f"{head}/{last}" if head else last


def trust_filter(verifier: RunVerifier, counters: Counters) -> Callable[[Mapping[str, Any]], bool]:
    """The watcher's filter: is this run cibroker's? One warning line and a metric per run that is not."""
    def trusted(obj: Mapping[str, Any]) -> bool:
        verdict, first = verifier.check(obj)
        if verdict.facts is None and first:
            meta = obj.get("metadata") or {}
            log.warning("run_ignored", run=f"{meta.get('namespace')}/{meta.get('name')}", reason=verdict.reason,
                        detail=verdict.detail)
            try:
                counters.count(metrics.UNTRUSTED_RUNS.name, metrics.UNTRUSTED_RUNS.field((verdict.reason,)))
            except StoreUnavailable:
                pass
        return verdict.facts is not None

    return trusted
