"""The one codec for what cibroker writes on a PipelineRun's labels and annotations, and reads back.

`RunLabels.metadata()` writes them (broker.core.pipelinerun.render); `RunReader` reads them back
from an object the API returned (the on-call views, the verifier's index lookup, the watcher's
hint). Every name lives here, once.

Labels and annotations are an index, never an order: anyone who may edit PipelineRuns can write
them. What a run does is decided from the routing file and the stored delivery
(broker.services.provenance); what is read here is shown, looked up or compared, and a field that
does not parse becomes "" (or a default) with the reason in `RunReader.problems` (docs/SECURITY.md).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from broker.core.errors import Rejected
from broker.core.sources.common import commit_id, repo_path, split_ref

GROUP = "cibroker.dev"
MANAGED_BY = ("app.kubernetes.io/managed-by", "cibroker")
SELECTOR = f"{MANAGED_BY[0]}={MANAGED_BY[1]}"
# Labels: what runs are found by (selectors).
L_ROUTE = f"{GROUP}/route"
L_HOST = f"{GROUP}/host"
L_SHA = f"{GROUP}/sha"
L_REF_KIND = f"{GROUP}/ref-kind"
L_REF_HASH = f"{GROUP}/ref-hash"
L_DELIVERY = f"{GROUP}/delivery"
# Annotations written at creation.
A_REPO = f"{GROUP}/repo"
A_REPO_ID = f"{GROUP}/repo-id"
A_REF = f"{GROUP}/ref"
A_HOST_KIND = f"{GROUP}/host-kind"
A_ATTEMPT = f"{GROUP}/attempt"
A_STATUS_NAME = f"{GROUP}/status-name"
A_IMAGE = f"{GROUP}/image"
A_RECEIVED = f"{GROUP}/received-at"
A_CLONE_URL = f"{GROUP}/clone-url"
A_DEPLOY = f"{GROUP}/deploy"
A_SIGNATURE = f"{GROUP}/signature"  # broker.core.trust.run_signature, added by the worker before the create
# Annotations written later: the last state reported (a hint), who superseded or cancelled the run and why.
A_REPORTED = f"{GROUP}/reported"
A_SUPERSEDED_BY = f"{GROUP}/superseded-by"
A_CANCELLED_BY = f"{GROUP}/cancelled-by"
A_CANCEL_REASON = f"{GROUP}/cancel-reason"

NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")
DELIVERY_ID = re.compile(r"^[0-9a-f]{26}\Z")
MAX_ATTEMPT = 1_000_000


@dataclass(frozen=True, slots=True)
class RunLabels:
    """What a run carries about itself when cibroker creates it."""

    route: str
    host: str  # the host id, slugged to a label value
    sha: str
    ref_kind: str
    ref_hash: str
    delivery_id: str
    repo: str
    repo_id: str
    ref: str
    host_kind: str
    attempt: int
    status_name: str
    image: str
    received_at: str
    clone_url: str
    deploy: tuple[str, ...]

    def metadata(self) -> dict[str, dict[str, str]]:
        """{"labels": ..., "annotations": ...} as the API takes them (the reported hint starts empty)."""
        return {
            "labels": {MANAGED_BY[0]: MANAGED_BY[1], L_ROUTE: self.route, L_HOST: self.host, L_SHA: self.sha,
                       L_REF_KIND: self.ref_kind, L_REF_HASH: self.ref_hash, L_DELIVERY: self.delivery_id},
            "annotations": {A_REPO: self.repo, A_REPO_ID: self.repo_id, A_REF: self.ref, A_HOST_KIND: self.host_kind,
                            A_ATTEMPT: str(self.attempt), A_STATUS_NAME: self.status_name, A_IMAGE: self.image,
                            A_RECEIVED: self.received_at, A_CLONE_URL: self.clone_url, A_DEPLOY: json.dumps(list(self.deploy)),
                            A_REPORTED: ""},
        }


def cancelled(*, by: str, reason: str) -> dict[str, str]:
    """The annotations a person's cancel leaves on the run (broker.core.reporting.describe shows them)."""
    return {A_CANCELLED_BY: by[:100], A_CANCEL_REASON: reason[:200]}


def _ref_ok(ref: str) -> object:
    split_ref(ref)
    return True


class RunReader:
    """Reads a PipelineRun as the untrusted input it is, noting each field that does not parse."""

    def __init__(self, obj: object) -> None:
        self.problems: list[str] = []
        self.obj = obj if isinstance(obj, Mapping) else {}
        if not isinstance(obj, Mapping):
            self.problems.append("the object is not a mapping")
        self.meta = self.mapping(self.obj.get("metadata"), "metadata")
        self.labels = self.mapping(self.meta.get("labels"), "metadata.labels")
        self.annotations = self.mapping(self.meta.get("annotations"), "metadata.annotations")
        self.status = self.mapping(self.obj.get("status"), "status")

    def mapping(self, value: object, where: str) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.problems.append(f"{where} is not a mapping")
            return {}
        return value

    def text(self, source: Mapping[str, Any], key: str, what: str, *, required: bool = False,
             check: Callable[[str], object] | None = None, limit: int = 1000) -> str:
        """The string at `key`, or "" (noting why) when it is missing, not a string, too long or fails `check`."""
        value = source.get(key)
        if value is None or value == "":
            if required:
                self.problems.append(f"{what} {key} is missing")
            return ""
        if not isinstance(value, str):
            self.problems.append(f"{what} {key} is not a string ({type(value).__name__})")
            return ""
        if len(value) > limit:
            self.problems.append(f"{what} {key} is longer than {limit} characters")
            return ""
        if check is not None:
            try:
                ok = check(value)
            except (Rejected, ValueError):
                ok = False
            if not ok:
                self.problems.append(f"{what} {key} is not valid ({value[:40]!r})")
                return ""
        return value

    def label(self, key: str, **kw: Any) -> str:
        return self.text(self.labels, key, "label", **kw)

    def annotation(self, key: str, **kw: Any) -> str:
        return self.text(self.annotations, key, "annotation", **kw)

    # -- the fields, each checked as it is read --------------------------------------------------

    def namespace(self) -> str:
        return self.text(self.meta, "namespace", "metadata", required=True, check=NAME.match)

    def name(self) -> str:
        return self.text(self.meta, "name", "metadata", required=True, check=NAME.match)

    def route(self) -> str:
        return self.label(L_ROUTE, required=True, check=NAME.match, limit=63)

    def host(self) -> str:
        return self.label(L_HOST, required=True, limit=63)

    def sha(self) -> str:
        return self.label(L_SHA, required=True, check=lambda v: commit_id(v, name=L_SHA), limit=64)

    def delivery_id(self) -> str:
        return self.label(L_DELIVERY, required=True, check=DELIVERY_ID.match, limit=26)

    def repo(self) -> str:
        return self.annotation(A_REPO, required=True, check=lambda v: repo_path(v, name=A_REPO), limit=255)

    def ref(self) -> str:
        return self.annotation(A_REF, required=True, check=_ref_ok, limit=255)

    def image(self) -> str:
        return self.annotation(A_IMAGE, limit=500)

    def reported(self) -> str:
        return self.annotation(A_REPORTED, limit=100)

    def superseded_by(self) -> str:
        return self.annotation(A_SUPERSEDED_BY, limit=200)

    def cancelled_by(self) -> str:
        return self.annotation(A_CANCELLED_BY, limit=200)

    def signature(self) -> str:
        return self.annotation(A_SIGNATURE, limit=200)

    def attempt(self) -> int:
        raw = self.annotations.get(A_ATTEMPT)
        if raw is None or raw == "":
            return 1
        if isinstance(raw, str) and raw.isascii() and raw.isdigit() and 1 <= int(raw) <= MAX_ATTEMPT:
            return int(raw)
        self.problems.append(f"annotation {A_ATTEMPT} is not a whole number from 1 to {MAX_ATTEMPT} ({str(raw)[:40]!r})")
        return 1

    def environments(self) -> list[str]:
        raw = self.annotations.get(A_DEPLOY)
        if raw is None or raw == "":
            return []
        try:
            value = json.loads(raw) if isinstance(raw, str) and len(raw) <= 4096 else None
        except ValueError:
            value = None
        if not (isinstance(value, list) and all(isinstance(e, str) and NAME.match(e) for e in value)):
            self.problems.append(f"annotation {A_DEPLOY} is not a JSON list of environment names")
            return []
        return value

    def conditions(self) -> list[dict[str, str]]:
        raw = self.status.get("conditions")
        if raw is None:
            return []
        if not isinstance(raw, list):
            self.problems.append("status.conditions is not a list")
            return []
        return [{k: str(v)[:1000] for k, v in c.items() if isinstance(k, str) and isinstance(v, (str, int, float, bool))}
                for c in raw if isinstance(c, Mapping)]

    def clean(self) -> dict[str, Any]:
        """The object with only what parsed: safe to hand to broker.core.reporting (describe, run_state)."""
        annotations = {k: v for k, v in self.annotations.items() if isinstance(k, str) and isinstance(v, str)}
        return {"metadata": {"name": self.meta.get("name"), "namespace": self.meta.get("namespace"),
                             "annotations": annotations},
                "status": {"conditions": self.conditions()}}
