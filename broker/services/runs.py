"""Run orchestration: accepted delivery -> PipelineRun -> commit statuses -> deploy.

Services over the ports (`Cluster`, `GitHost`, `CommitResolver`) and the delivery
store; Celery tasks in `workers.tasks` are thin wrappers. Every step is idempotent:
the PipelineRun name is deterministic (AlreadyExists counts as success), status
reports are claimed in order in Redis (a retry of an older report never overtakes a
newer one), and a deploy runs once per (run, environment).

Trust (issue 10): a run's labels and annotations are an index, never an order. Every run
cibroker creates is signed and recorded in its stored delivery before the create; what a
run does next (which status it posts where, which image it deploys, which clone URL gets a
token) is derived from the routing file and that stored delivery (`broker.services.provenance`).
A run that does not verify is ignored; a forced deploy needs a person's signed request.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from broker.core import metrics
from broker.core import pipelinerun as pr
from broker.core.records import log_entry
from broker.core.errors import Permanent, Transient, Untrusted
from broker.core.events import RefKind
from broker.logging import get_logger
from broker.services.oncall import duration, git_auth
from broker.core.status import CommitState, CommitStatus, StatusAnswer
from broker.ports import Cluster, CommitResolver, GitHost, WorkerStore
from broker.services.provenance import RunFacts as RunRef  # what a verified run may act on (routing file + stored delivery)
from broker.services.provenance import RunVerifier, Verdict, facts_of, image_digest, repository_of
from broker.core.runlabels import cancelled
from broker.core.trust import PersonRequest, run_signature, verify_request
from broker.core.reporting import RANK, describe, is_final, parse_state, run_state, should_report
from broker.core.rollout import A_DEPLOYED_SHA, A_PREVIOUS_IMAGE, A_PREVIOUS_SHA, Rollout, container_image, rollout_status, set_image_patch
from config.routing import DeployTarget, Route
from config.settings import Settings

log = get_logger("cibroker.orchestration")
CLAIM_TTL = 30 * 86400
# How long a claimed status post may be in flight before a later state goes anyway (its poster
# died); longer than the Git host client's own timeouts.
STATUS_LEASE_SECONDS = 30.0
SA_CACHE_SECONDS = 60.0
# Superseding: links of the push chain walked per push when ordering two pushes of one branch, and
# how many finished runs of the branch (newest created first) a push is compared with.
CHAIN_STEPS = 200
FINISHED_COMPARED = 10


@dataclass(frozen=True, slots=True)
class _OtherRun:
    """Another run of the same branch and route, as its stored delivery (not its annotations) describes it."""

    name: str
    delivery_id: str
    sha: str
    pushed: str
    rerun: bool
    active: bool


def _active(obj: Mapping[str, Any]) -> bool:
    """Neither finished nor already being cancelled."""
    return not is_final(run_state(obj)) and not (obj.get("spec") or {}).get("status")


@dataclass
class Orchestrator:
    settings: Settings
    store: WorkerStore
    cluster: Cluster
    git_hosts: Mapping[str, GitHost]
    resolver: CommitResolver
    clock: Callable[[], float] = time.time
    # Called with a verified succeeded run that has deploys; the tasks layer enqueues them (ids only).
    on_success: Callable[[RunRef], None] = lambda ref: None  # noqa: E731
    # No cluster to talk to (`cibroker dev` on a laptop): render and record, create and post nothing.
    dry_run: bool = False
    # The broker's signing key (CIBROKER_SIGNING_KEY): signs the runs we create, verifies runs and people's requests.
    key: bytes = b""
    _sa_seen: dict[tuple[str, str], float] = field(default_factory=dict)
    verifier: RunVerifier = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.key:
            self.key = self.settings.require_signing_key()
        self.verifier = RunVerifier(key=self.key, routing=self.settings.routing, lookup=self.store.delivery_run)

    # ---- lookups -------------------------------------------------------------------------

    @property
    def api_version(self) -> str:
        return self.settings.env.tekton_api_version

    def route(self, name: str) -> Route:
        route = self.settings.routing.route(name)
        if route is None:
            raise Permanent(f"route {name!r} is no longer in the routing file")
        return route

    def git_auth(self, host_id: str, clone_url: str) -> tuple[str, str] | None:
        """The host's token for git, only for an https clone URL (derived from the routing file, never from input)."""
        return git_auth(self.settings, host_id) if pr.token_allowed(clone_url) else None

    def trusted(self, obj: Mapping[str, Any]) -> RunRef:
        """The facts of a run cibroker created (routing file + stored delivery); Untrusted otherwise."""
        return self.verifier.require(obj)

    def verdict(self, obj: Mapping[str, Any]) -> tuple[Verdict, bool]:
        return self.verifier.check(obj)

    def _log(self, delivery_id: str, step: str, detail: str, *, delivery_state: str | None = None, **extra: Any) -> None:
        """Append to the delivery's decision log; `delivery_state` also moves the delivery's state (queued, started...)."""
        if delivery_id:
            self.store.append_log(delivery_id, log_entry(step, detail, at=self.clock(), **extra), state=delivery_state)

    # ---- start: delivery -> PipelineRun(s) ----------------------------------------------

    def start(self, delivery_id: str, *, attempt: int = 1, token: str | None = None) -> list[str]:
        """Create the PipelineRun of every matched route; returns their names. Safe to repeat."""
        record = self.store.get(delivery_id)
        if record is None:
            raise Permanent(f"delivery {delivery_id} is not in the store (expired?)")
        if record["decision"] != "accepted":
            return []
        names = []
        attempt = int(record.get("attempt") or attempt)
        for route_name in record["routes"]:
            try:
                names.append(self._start_route(record, self.route(route_name), attempt=attempt, token=token or uuid.uuid4().hex))
            except Permanent as exc:
                self._fail_before_run(record, route_name, str(exc), attempt=attempt)
        return names

    def _start_route(self, record: Mapping[str, Any], route: Route, *, attempt: int, token: str) -> str:
        push = record["push"]
        host = self.settings.routing.hosts[route.host]
        git_url = pr.clone_url(route, repo=push["repo"], host=host)
        kind = RefKind(push["kind"])
        sha = self._commit(push, kind=kind, git_url=git_url, host_id=route.host, delivery_id=record["delivery_id"])
        req = pr.RunRequest(
            delivery_id=record["delivery_id"], host=record["host"], host_kind=record["host_kind"], repo=push["repo"],
            repo_id=push["repo_id"], ref=push["ref"], kind=kind, name=push["name"], sha=sha, attempt=attempt,
            received_at=record["received_at"],
        )
        body = pr.render(self.settings.routing, route, req, git_url=git_url, api_version=self.api_version)
        body["metadata"]["annotations"][pr.A_REPORTED] = CommitState.PENDING.value
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        if self.dry_run:
            return self._dry_run(route, req, body)
        body["metadata"]["annotations"][pr.A_SIGNATURE] = run_signature(
            self.key, name=name, namespace=namespace, route=route.name, repo=req.repo, ref=req.ref, sha=sha,
            delivery_id=req.delivery_id)
        self._preflight(namespace, body)
        # Before the create: a crash right after it still leaves a run that matches its stored delivery.
        self.store.own_run(req.delivery_id, namespace=namespace, name=name, route=route.name, sha=sha, attempt=attempt)
        obj, created = self.cluster.create_pipelinerun(body, namespace=namespace)
        if created:
            ref = facts_of(self.settings.routing, record, {"route": route.name, "sha": sha, "attempt": attempt},
                           namespace=namespace, name=name)
        else:
            verdict, _ = self.verdict(obj)
            if verdict.facts is None:
                self.store.count(metrics.UNTRUSTED_RUNS.name, metrics.UNTRUSTED_RUNS.field((verdict.reason,)))
                raise Permanent(f"a PipelineRun named {namespace}/{name} already exists and cibroker did not create it "
                                f"({verdict.detail}); delete it and re-run")
            ref = verdict.facts
        self._log(req.delivery_id, "pipelinerun_created" if created else "pipelinerun_exists",
                  f"PipelineRun {namespace}/{name} {'created' if created else 'already existed (same push delivered again)'} "
                  f"for route {route.name}, commit {sha[:8]}, image {ref.image}", run=f"{namespace}/{name}", delivery_state="started")
        if created:
            self.store.count(metrics.CREATED.name, metrics.CREATED.field((route.name, "rerun" if record.get("rerun_of") else "push")))
        self.report(ref, CommitState.PENDING, f"{route.pipeline}: queued", token=token)
        if self._supersedes(route, kind) and not record.get("rerun_of"):
            # A person's re-run neither cancels newer pushes nor is cancelled by older ones; a later push still supersedes it.
            self._supersede(route, req, namespace=namespace, name=name, pushed=push.get("pushed") or sha, git_url=git_url)
        return name

    def _commit(self, push: Mapping[str, Any], *, kind: RefKind, git_url: str, host_id: str, delivery_id: str) -> str:
        """The commit to build, confirmed with the Git host: tags peeled with git ls-remote, branches checked to hold it."""
        if kind is not RefKind.TAG:
            return self._confirm_branch(push, git_url=git_url, host_id=host_id, delivery_id=delivery_id)
        peeled = self.resolver.resolve_tag(clone_url=git_url, tag=push["name"], auth=self.git_auth(host_id, git_url))
        if peeled == push["sha"]:
            detail = f"tag {push['name']} peels to {peeled[:8]} on the remote, as the push said"
        elif push["sha"] == push["pushed"]:
            detail = f"tag {push['name']}: the push gave the tag object {push['pushed'][:8]}; it peels to commit {peeled[:8]}"
        else:
            raise Permanent(
                f"tag {push['name']} now peels to {peeled[:8]} on the remote but the push said {push['sha'][:8]}; "
                "it moved since: push it again or re-run"
            )
        self._log(delivery_id, "commit_resolved", detail)
        return peeled

    def _confirm_branch(self, push: Mapping[str, Any], *, git_url: str, host_id: str, delivery_id: str) -> str:
        """The pushed commit, once the host says the branch points at it or has moved on from it.

        A payload is only as good as the secret that signed it: the Git host's own answer (one
        ls-remote; ancestry only when the branch moved on) is what makes the commit real. Then
        the push's link (before -> after) joins the branch's push chain, before any run exists.
        """
        sha, branch = str(push["sha"]), str(push["name"])
        if self.dry_run:
            self._log(delivery_id, "commit_resolved", f"DRY RUN: branch {branch} at {sha[:8]} not confirmed with the Git host")
            return sha
        try:
            head = self.resolver.branch_contains(clone_url=git_url, branch=branch, sha=sha, auth=self.git_auth(host_id, git_url))
        except Permanent as exc:
            raise Permanent(f"the Git host does not confirm commit {sha[:8]} on branch {branch}: {exc}") from exc
        if head == sha:
            detail = f"branch {branch} points at {sha[:8]}, as pushed"
        else:
            detail = f"branch {branch} moved on to {head[:8]}; {sha[:8]} is its ancestor: building what was pushed"
        self._log(delivery_id, "commit_resolved", detail, head=head)
        if push.get("before"):
            self.store.link_push(host=host_id, repo_id=str(push["repo_id"]), ref=str(push["ref"]),
                                 after=str(push.get("pushed") or sha), before=str(push["before"]),
                                 ttl=self.settings.env.retention_days * 86400)
        return sha

    def _preflight(self, namespace: str, body: Mapping[str, Any]) -> None:
        spec = body["spec"]
        sa = (spec.get("taskRunTemplate") or {}).get("serviceAccountName") or spec.get("serviceAccountName")
        seen = self._sa_seen.get((namespace, sa))
        if seen is not None and self.clock() - seen < SA_CACHE_SECONDS:
            return
        if not self.cluster.service_account_exists(namespace=namespace, name=sa):
            raise Permanent(
                f"service account {sa!r} not found in namespace {namespace!r}: create it with the git basic-auth "
                "secret (annotated tekton.dev/git-0) and the registry dockerconfigjson secret"
            )
        self._sa_seen[(namespace, sa)] = self.clock()

    @staticmethod
    def _supersedes(route: Route, kind: RefKind) -> bool:
        return route.supersede and kind is RefKind.BRANCH

    def _supersede(self, route: Route, req: pr.RunRequest, *, namespace: str, name: str, pushed: str, git_url: str) -> None:
        """After creating our run: cancel older unfinished runs of this branch, or ours if a newer push exists.

        "Newer" follows the push chain (`before` -> `after` of the stored deliveries), then git
        ancestry when the chain is broken; when neither can tell, nothing is cancelled. Listing
        *after* the create (and linking before it) means two pushes processed at once still see
        each other. Another run's labels only find its stored delivery; its annotations are not read.
        """
        selector = f"{pr.SELECTOR},{pr.L_ROUTE}={route.name},{pr.L_REF_HASH}={pr.ref_hash(route.name, req.ref)}"
        items, _ = self.cluster.list_pipelineruns(namespace=namespace, selector=selector)
        ours = next((o for o in items if (o.get("metadata") or {}).get("name") == name), None)
        others = self._comparable(route, req, [o for o in items if (o.get("metadata") or {}).get("name") != name])
        if not others:
            return
        verdicts = self.store.push_order(host=route.host, repo_id=req.repo_id, ref=req.ref, ours=pushed,
                                         others=[o.pushed for o in others], max_steps=CHAIN_STEPS)
        how = ["the push chain" if v else "" for v in verdicts]
        for i, other in enumerate(others):
            if verdicts[i] == 0 and other.sha != req.sha and (other.active or not other.rerun):
                verdicts[i], how[i] = self._by_ancestry(req, other, git_url=git_url)
        newer = next((o for o, v in zip(others, verdicts) if v < 0 and not o.rerun), None)
        if newer is not None:
            if ours is None or _active(ours):
                self._cancel(route, namespace=namespace, name=name, delivery_id=req.delivery_id, by=newer.sha[:8],
                             why=f"{how[others.index(newer)]} puts push {newer.sha[:8]} after {req.sha[:8]}")
            return
        for other, verdict, said in zip(others, verdicts, how):
            if not other.active:
                continue
            if verdict > 0:
                self._cancel(route, namespace=namespace, name=other.name, delivery_id=other.delivery_id, by=req.sha[:8],
                             why=f"{said} puts push {req.sha[:8]} after {other.sha[:8]}")
            elif verdict == 0 and other.sha != req.sha:
                detail = (f"not superseding PipelineRun {namespace}/{other.name} ({other.sha[:8]}): neither the push chain "
                          f"nor git ancestry tells whether it is older than {req.sha[:8]} ({said or 'no answer'}); "
                          "nothing is cancelled on a guess")
                self._log(req.delivery_id, "supersede_undecided", detail)
                log.warning("supersede_undecided", delivery_id=req.delivery_id, run=f"{namespace}/{other.name}",
                            sha=req.sha, other_sha=other.sha)

    def _comparable(self, route: Route, req: pr.RunRequest, items: list[Mapping[str, Any]]) -> list[_OtherRun]:
        """Other runs of this branch to order against ours, each with what its stored delivery says.

        Every unfinished run, and the most recently created finished ones (a late old push is
        then cancelled at once, at a bounded cost on branches with thousands of runs). A run whose
        delivery label names no stored delivery of this branch and route is left alone.
        """
        active = [o for o in items if _active(o)]
        finished = sorted((o for o in items if not _active(o)),
                          key=lambda o: (o.get("metadata") or {}).get("creationTimestamp") or "", reverse=True)
        chosen = active + finished[:FINISHED_COMPARED]
        ids = [str(((o.get("metadata") or {}).get("labels") or {}).get(pr.L_DELIVERY, "")) for o in chosen]
        records = self.store.records([i for i in ids if i])
        by_id = dict(zip([i for i in ids if i], records, strict=True))
        out = []
        for obj, delivery_id in zip(chosen, ids, strict=True):
            record = by_id.get(delivery_id) if delivery_id else None
            if record is not None and not self.verifier.verify(obj).trusted:
                continue  # a run cibroker did not create (or one altered since) neither cancels nor is cancelled
            push = (record or {}).get("push") or {}
            if (record is None or record.get("decision") != "accepted" or route.name not in (record.get("routes") or ())
                    or (record.get("host"), str(push.get("repo_id")), push.get("ref")) != (req.host, req.repo_id, req.ref)
                    or not push.get("sha")):
                continue
            out.append(_OtherRun(name=str(obj["metadata"]["name"]), delivery_id=delivery_id, sha=str(push["sha"]),
                                 pushed=str(push.get("pushed") or push["sha"]), rerun=bool(record.get("rerun_of")),
                                 active=_active(obj)))
        return out

    def _by_ancestry(self, req: pr.RunRequest, other: _OtherRun, *, git_url: str) -> tuple[int, str]:
        """The push chain is broken between the two: 1 ours descends from the other's commit, -1 the reverse, 0 unknown."""
        auth = self.git_auth(req.host, git_url)
        try:
            if self.resolver.is_ancestor(clone_url=git_url, ancestor=other.sha, descendant=req.sha, auth=auth):
                return 1, "git ancestry (the push chain is broken)"
            if self.resolver.is_ancestor(clone_url=git_url, ancestor=req.sha, descendant=other.sha, auth=auth):
                return -1, "git ancestry (the push chain is broken)"
        except Permanent as exc:
            return 0, f"the push chain is broken and git cannot tell: {exc}"
        return 0, "the push chain is broken and neither commit descends from the other"

    def _cancel(self, route: Route, *, namespace: str, name: str, delivery_id: str, by: str, why: str = "") -> None:
        self.cluster.patch_pipelinerun(namespace=namespace, name=name, patch={
            "spec": {"status": route.cancel_status}, "metadata": {"annotations": {pr.A_SUPERSEDED_BY: by}}})
        self._log(delivery_id, "superseded", f"PipelineRun {namespace}/{name} cancelled ({route.cancel_status}): superseded by {by}"
                  + (f" ({why})" if why else ""))

    def _dry_run(self, route: Route, req: pr.RunRequest, body: dict[str, Any]) -> str:
        """No cluster (`cibroker dev` on a laptop): record what would be created and deployed, create and post nothing."""
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        image = body["metadata"]["annotations"][pr.A_IMAGE]
        self._log(req.delivery_id, "dry_run", f"DRY RUN (no cluster): would create PipelineRun {namespace}/{name} for route "
                  f"{route.name}, commit {req.sha[:8]}, image {image}; nothing created, no commit status posted",
                  run=f"{namespace}/{name}", pipelinerun=body, delivery_state="dry-run")
        for target in pr.deploys_for(route, req):
            self._log(req.delivery_id, "dry_run", f"DRY RUN: once it succeeds, would set {target.namespace}/{target.deployment} "
                      f"container {target.container} to {image} ({target.environment}) and wait for the rollout")
        return name

    def _fail_before_run(self, record: Mapping[str, Any], route_name: str, reason: str, *, attempt: int) -> None:
        """A permanent problem before any PipelineRun exists: say so on the commit and in the log."""
        self._log(record["delivery_id"], "failed", f"route {route_name}: {reason}", delivery_state="failed")
        log.warning("run_not_started", delivery_id=record["delivery_id"], route=route_name, reason=reason)
        self._post_not_started(record, route_name, reason, attempt=attempt)

    def _post_not_started(self, record: Mapping[str, Any], route_name: str, reason: str, *, attempt: int) -> None:
        route = self.settings.routing.route(route_name)
        if route is None:
            return
        push = record["push"]
        name = pr.run_name(route=route.name, ref=push["ref"], sha=push["sha"], attempt=attempt)
        ref = RunRef(
            namespace=route.namespace or self.settings.routing.defaults.namespace, name=name, host=route.host,
            host_kind=self.settings.routing.hosts[route.host].kind, repo=push["repo"], repo_id=push["repo_id"], ref=push["ref"],
            sha=push["sha"], route=route.name, delivery_id=record["delivery_id"],
            status_name=pr.status_name(self.settings.routing, route), deploy=(), clone_url="", image="",
        )
        self.report(ref, CommitState.FAILED, f"{route.pipeline}: not started: {reason}"[:250], token=uuid.uuid4().hex)

    # ---- a task that crashed (workers.tasks `guarded`) ---------------------------------

    def note(self, delivery_id: str, step: str, detail: str, **extra: Any) -> None:
        """One line in a delivery's decision log."""
        self._log(delivery_id, step, detail, **extra)

    def mark_failed(self, delivery_id: str, reason: str, *, error_class: str) -> None:
        """The delivery is `failed` (never re-queued by the sweep), with the exception class in its decision log."""
        self._log(delivery_id, "failed", reason, delivery_state="failed", error_class=error_class)

    def fail_delivery(self, delivery_id: str, reason: str) -> None:
        """Best effort: a failed commit status for every route of a delivery whose task crashed."""
        record = self.store.get(delivery_id)
        if record is None:
            return
        attempt = int(record.get("attempt") or 1)
        for route_name in record.get("routes") or []:
            try:
                self._post_not_started(record, str(route_name), reason, attempt=attempt)
            except (Transient, Permanent, KeyError, TypeError, ValueError, AttributeError) as exc:
                log.warning("crash_status_not_posted", delivery_id=delivery_id, route=str(route_name),
                            error_class=type(exc).__name__)

    # ---- reporting ---------------------------------------------------------------------

    def target_url(self, ref: RunRef) -> str | None:
        template = self.settings.routing.defaults.target_url
        if template is None:
            return None
        route = self.settings.routing.route(ref.route)
        return template.format(namespace=ref.namespace, name=ref.name, pipeline=route.pipeline if route else "",
                               route=ref.route, repo=ref.repo, sha=ref.sha)

    def report(self, ref: RunRef, state: CommitState, description: str, *, token: str, name: str | None = None,
               scope: str = "") -> bool:
        """Post `state` for the run's commit if it moves forward; True when this call reported it.

        `scope` separates claim histories that may legally start over (a person's re-deploy of a run).
        """
        status_name = name or ref.status_name
        claim = self.store.claim_report(ref.key + scope, status_name, state=state.value, rank=RANK[state], token=token,
                                        ttl=CLAIM_TTL, lease_seconds=STATUS_LEASE_SECONDS)
        if claim == 0:
            return False
        if claim < 0:
            raise Transient(f"{status_name}: an earlier state is still being posted for {ref.sha[:8]}; {state} waits for it")
        try:
            return self._post(ref, state, description, status_name=status_name)
        finally:
            self.store.release_report(ref.key + scope, status_name, state=state.value, token=token)

    def _post(self, ref: RunRef, state: CommitState, description: str, *, status_name: str) -> bool:
        host = self.git_hosts.get(ref.host)
        if host is None:
            self._log(ref.delivery_id, "status_skipped", f"{status_name} {state}: no API token for host {ref.host}")
            return True
        try:
            answer = host.set_status(CommitStatus(
                repo=ref.repo, repo_id=ref.repo_id, sha=ref.sha, state=state, name=status_name, ref=ref.short_ref,
                description=description, target_url=self.target_url(ref),
            ))
        except (Transient, Permanent) as exc:
            outcome = "retry" if isinstance(exc, Transient) else "error"
            self.store.count(metrics.STATUS_POSTS.name, metrics.STATUS_POSTS.field((ref.host, outcome)))
            if isinstance(exc, Permanent):
                self._log(ref.delivery_id, "status_failed", f"{status_name} {state} on {ref.sha[:8]}: the host refused: {exc}")
            raise
        self.store.count(metrics.STATUS_POSTS.name, metrics.STATUS_POSTS.field((ref.host, answer.value)))
        self._log(ref.delivery_id, "status_posted",
                  f"{status_name} {state} on {ref.sha[:8]}: {'posted' if answer is StatusAnswer.POSTED else 'host already had it'}"
                  f" ({description})", status=status_name, state=state.value, answer=answer.value,
                  delivery_state=state.value if status_name == ref.status_name and state is not CommitState.PENDING else None)
        log.info("status_posted", run=ref.key, status=status_name, state=state.value, answer=answer.value)
        return True

    def observe(self, obj: Mapping[str, Any], *, token: str, reported: CommitState | None | str = "annotation") -> CommitState | None:
        """Report what a PipelineRun shows now (`obj` as just read from the API); returns the state reported.

        `reported` is what the watcher saw in the run's `reported` annotation when it submitted the
        report (a hint that only skips work; the ordered claims in Redis decide). It is not re-read
        from the run: another task may have moved the annotation before this task's own post
        landed, and a retry must still post. Untrusted when the run is not cibroker's: nothing is
        posted, patched or deployed for it.
        """
        ref = self.trusted(obj)
        state = run_state(obj)
        last = ref.reported if reported == "annotation" else reported
        if not should_report(last if isinstance(last, CommitState) else None, state):
            return None
        route = self.settings.routing.route(ref.route)
        pipeline = route.pipeline if route else ref.route
        taskruns = self.cluster.list_taskruns(namespace=ref.namespace, pipelinerun=ref.name) if state is CommitState.FAILED else []
        reported_now = self.report(ref, state, describe(obj, taskruns=taskruns, pipeline=pipeline), token=token)
        claimed = parse_state(self.store.reported(ref.key).get(ref.status_name))
        if claimed is not state:
            return None  # a later state was reported meanwhile; its own report converges the annotation
        if state is CommitState.SUCCESS and ref.deploy:
            self.on_success(ref)
        self.cluster.patch_pipelinerun(namespace=ref.namespace, name=ref.name,
                                       patch={"metadata": {"annotations": {pr.A_REPORTED: state.value}}})
        if is_final(state) and reported_now:
            self._count_final(ref, state, obj)
            if route is not None and route.max_keep_runs is not None:
                self.prune(route, namespace=ref.namespace)
        return state

    def _count_final(self, ref: RunRef, state: CommitState, obj: Mapping[str, Any]) -> None:
        status = obj.get("status") or {}
        took = duration(status.get("startTime"), status.get("completionTime"), now=self.clock())
        increments = [(metrics.RUNS.name, metrics.RUNS.field((ref.route, state.value)), 1.0)]
        if took is not None and status.get("completionTime"):
            increments += [(metrics.RUN_DURATION.name, field, by)
                           for field, by in metrics.histogram_increments(metrics.RUN_DURATION, (ref.route,), took)]
        self.store.count_many(increments)

    def prune(self, route: Route, *, namespace: str) -> list[str]:
        """Delete this route's finished PipelineRuns beyond its max_keep_runs, oldest first."""
        assert route.max_keep_runs is not None
        items, _ = self.cluster.list_pipelineruns(namespace=namespace, selector=f"{pr.SELECTOR},{pr.L_ROUTE}={route.name}")
        finished = [o for o in items if is_final(run_state(o))]
        finished.sort(key=lambda o: ((o.get("status") or {}).get("completionTime") or "", o["metadata"]["name"]), reverse=True)
        pruned = []
        for obj in finished[route.max_keep_runs:]:
            name = obj["metadata"]["name"]
            self.cluster.delete_pipelinerun(namespace=namespace, name=name)
            pruned.append(name)
        if pruned:
            log.info("pipelineruns_pruned", route=route.name, namespace=namespace, pruned=len(pruned), kept=route.max_keep_runs)
        return pruned

    # ---- deploy --------------------------------------------------------------------------

    def deploy_targets(self, ref: RunRef) -> list[DeployTarget]:
        route = self.route(ref.route)
        return [d for d in route.deploy if d.environment in ref.deploy]

    def deploy_image(self, ref: RunRef, obj: Mapping[str, Any]) -> tuple[str, str | None]:
        """(image to set, digest or None): `<route's repository>@sha256:...` from the run's results, or the tag.

        The repository always comes from the routing file; only the digest is read off the run,
        and only in its strict form. Permanent when the route deploys by digest and the run
        reports none.
        """
        route = self.route(ref.route)
        digest = image_digest(obj)
        if route.deploy_by == "tag":
            return ref.image, digest
        if digest is None:
            raise Permanent(f"not deployed: route {route.name} deploys by digest and PipelineRun {ref.key} reports no valid "
                            "image digest (pipeline result image-digest = sha256:<64 hex>); set deploy_by: tag to deploy the tag")
        return f"{repository_of(ref.image)}@{digest}", digest

    def request(self, request_id: str, *, action: str, namespace: str, name: str, environment: str = "",
                attempt: int | None = None) -> PersonRequest:
        """A person's signed request, checked against what the task says it is for; Untrusted otherwise."""
        request = verify_request(self.key, self.store.get_request(request_id), request_id=request_id)
        wanted = {"action": action, "namespace": namespace, "name": name}
        if action == "deploy":
            wanted.update(environment=environment, attempt=attempt)
        got = {k: getattr(request, k) for k in wanted}
        if got != wanted:
            differ = ", ".join(f"{k} {got[k]!r} != {wanted[k]!r}" for k in wanted if got[k] != wanted[k])
            raise Untrusted(f"request {request_id[:40]!r} was signed for another action ({differ})")
        return request

    def deploy(self, ref: RunRef, environment: str, *, token: str, obj: Mapping[str, Any], attempt: int = 1,
               request: PersonRequest | None = None, give_up: bool = True) -> str | None:
        """Roll the run's image out to `environment`; returns the deployment to watch, or None when done.

        `attempt` > 1 is a person's re-deploy (its statuses start a new history) and comes with
        their signed `request`; only that request's `force` skips the ancestry guard (a person
        deploying an older build on purpose, a rollback, means it). The guard fails closed:
        when it cannot tell (git error, unreadable remote, no credential), the deploy is refused.
        `give_up` False lets a Transient git error be retried by the task first.
        """
        scope = deploy_scope(attempt)
        force = request is not None and request.force
        target = next((d for d in self.deploy_targets(ref) if d.environment == environment), None)
        if target is None:
            raise Permanent(f"route {ref.route} has no deploy to {environment!r} for {ref.ref}")
        status = f"deploy/{environment}"
        image, digest = self.deploy_image(ref, obj)
        label = image_label(ref.image, digest)
        deployment = self.cluster.get_deployment(namespace=target.namespace, name=target.deployment)
        if deployment is None:
            raise Permanent(f"deployment {target.namespace}/{target.deployment} not found")
        current_image = container_image(deployment, target.container)
        if current_image is None:
            raise Permanent(f"deployment {target.namespace}/{target.deployment} has no container {target.container!r}")
        deployed = ((deployment.get("metadata") or {}).get("annotations") or {}).get(A_DEPLOYED_SHA, "")
        if current_image == image:
            return target.deployment  # already patched (by us before a crash, or an earlier run): follow the rollout
        if deployed and deployed != ref.sha and not force:
            older = self._older_than_deployed(ref, deployed, environment, give_up=give_up)
            if older is None or older:
                if older:
                    reason = f"not deployed: {ref.sha[:8]} is older than {deployed[:8]}, which {environment} already runs"
                    state = CommitState.CANCELED
                else:
                    reason = (f"not deployed: cannot tell whether {ref.sha[:8]} is older than {deployed[:8]}, which "
                              f"{environment} runs; fix git access or re-deploy with --deploy-only --force")
                    state = CommitState.FAILED
                self.report(ref, state, reason[:250], token=token, name=status, scope=scope)
                self._log(ref.delivery_id, "deploy_refused", reason)
                self._count_deploy(environment, "refused")
                return None
        if force and deployed and deployed != ref.sha:
            assert request is not None
            self._log(ref.delivery_id, "deploy_forced", f"{environment}: deploying {ref.sha[:8]} over {deployed[:8]} on "
                      f"{request.actor}'s request via {request.channel} (the ancestry guard does not apply to a person's "
                      "forced re-deploy)" + (f": {request.reason}" if request.reason else ""), by=request.actor)
        self.report(ref, CommitState.RUNNING, f"rolling {target.deployment} out to {ref.sha[:8]} ({label})"[:250],
                    token=token, name=status, scope=scope)
        self.cluster.patch_deployment(namespace=target.namespace, name=target.deployment, patch=set_image_patch(
            container=target.container, image=image,
            change_cause=f"cibroker: {ref.repo}@{ref.sha[:8]} ({ref.short_ref}) from PipelineRun {ref.key}",
            annotations={A_DEPLOYED_SHA: ref.sha, A_PREVIOUS_IMAGE: current_image, A_PREVIOUS_SHA: deployed},
        ))
        self._log(ref.delivery_id, "deploy_started",
                  f"{environment}: {target.namespace}/{target.deployment} container {target.container} {current_image} -> "
                  f"{image} ({label})", image=image, tag=ref.image, digest=digest or "")
        return target.deployment

    def _older_than_deployed(self, ref: RunRef, deployed: str, environment: str, *, give_up: bool) -> bool | None:
        """Is the run's commit an ancestor of the deployed one? None when git cannot tell (the caller refuses)."""
        try:
            return self.resolver.is_ancestor(clone_url=ref.clone_url, ancestor=ref.sha, descendant=deployed,
                                             auth=self.git_auth(ref.host, ref.clone_url))
        except Transient as exc:
            if not give_up:
                raise
            problem = exc
        except Permanent as exc:
            problem = exc
        self._log(ref.delivery_id, "ancestry_unknown",
                  f"{environment}: cannot tell whether {ref.sha[:8]} is older than {deployed[:8]} ({problem}); refusing")
        return None

    def check_rollout(self, ref: RunRef, environment: str, *, deadline: float, token: str, obj: Mapping[str, Any],
                      attempt: int = 1) -> bool:
        """True when the rollout is over (reported success, or failed and rolled back)."""
        scope = deploy_scope(attempt)
        target = next((d for d in self.deploy_targets(ref) if d.environment == environment), None)
        if target is None:
            raise Permanent(f"route {ref.route} has no deploy to {environment!r} for {ref.ref}")
        status = f"deploy/{environment}"
        image, digest = self.deploy_image(ref, obj)
        deployment = self.cluster.get_deployment(namespace=target.namespace, name=target.deployment)
        if deployment is None:
            raise Permanent(f"deployment {target.namespace}/{target.deployment} disappeared during the rollout")
        current = container_image(deployment, target.container)
        if current != image:
            # A newer deploy (or a person) changed the image while this one rolled out: this rollout is over,
            # and following the Deployment any further would report on somebody else's image.
            newer = ((deployment.get("metadata") or {}).get("annotations") or {}).get(A_DEPLOYED_SHA, "")
            reason = f"{environment}: superseded by {newer[:8] or current} before its rollout finished"
            if self.report(ref, CommitState.CANCELED, reason, token=token, name=status, scope=scope):
                self._count_deploy(environment, "superseded")
            self._log(ref.delivery_id, "deploy_superseded", reason)
            return True
        rollout = rollout_status(deployment)
        if rollout.state is Rollout.COMPLETE:
            if self.report(ref, CommitState.SUCCESS, f"{environment} runs {ref.sha[:8]} ({image_label(ref.image, digest)}): "
                           f"{rollout.message}"[:250], token=token, name=status, scope=scope):
                self._count_deploy(environment, "success")
            self._log(ref.delivery_id, "deploy_succeeded", f"{environment}: {rollout.message}")
            return True
        if rollout.state is Rollout.PROGRESSING and self.clock() < deadline:
            return False
        reason = rollout.message if rollout.state is not Rollout.PROGRESSING else f"rollout timed out: {rollout.message}"
        annotations = (deployment.get("metadata") or {}).get("annotations") or {}
        previous = annotations.get(A_PREVIOUS_IMAGE)
        outcome = "failed"
        if previous and container_image(deployment, target.container) == image:
            outcome = "rolled_back"
            self.cluster.patch_deployment(namespace=target.namespace, name=target.deployment, patch=set_image_patch(
                container=target.container, image=previous,
                change_cause=f"cibroker: rolled back from {ref.sha[:8]}: {reason}"[:250],
                annotations={A_DEPLOYED_SHA: annotations.get(A_PREVIOUS_SHA, ""), A_PREVIOUS_IMAGE: "", A_PREVIOUS_SHA: ""},
            ))
            reason = f"{reason}; rolled back to {previous}"
        if self.report(ref, CommitState.FAILED, f"{environment}: {reason}"[:250], token=token, name=status, scope=scope):
            self._count_deploy(environment, outcome)
        self._log(ref.delivery_id, "deploy_failed", f"{environment}: {reason}")
        return True

    # ---- a person's cancel (cibroker.cancel_run) ------------------------------------------------

    def cancel_run(self, request: PersonRequest) -> str:
        """Cancel the run a verified cancel request names; returns the spec.status set. Refuses what is not ours or finished."""
        obj = self.cluster.get_pipelinerun(namespace=request.namespace, name=request.name)
        if obj is None:
            raise Permanent(f"PipelineRun {request.run} is not in the cluster (deleted?)")
        ref = self.trusted(obj)
        if is_final(run_state(obj)):
            raise Permanent(f"PipelineRun {request.run} already ended ({run_state(obj).value})")
        route = self.route(ref.route)
        self.cluster.patch_pipelinerun(namespace=ref.namespace, name=ref.name, patch={
            "spec": {"status": route.cancel_status},
            "metadata": {"annotations": cancelled(by=request.actor, reason=request.reason)},
        })
        self._log(ref.delivery_id, "cancel_requested", f"PipelineRun {ref.key} cancelled ({route.cancel_status}) by "
                  f"{request.actor} via {request.channel}" + (f": {request.reason}" if request.reason else ""),
                  by=request.actor, channel=request.channel)
        return route.cancel_status

    def _count_deploy(self, environment: str, outcome: str) -> None:
        self.store.count(metrics.DEPLOYS.name, metrics.DEPLOYS.field((environment, outcome)))


def image_label(tag_image: str, digest: str | None) -> str:
    """`tag 1111aaaa, digest sha256:...`: what a deploy's status and log say it rolled out."""
    tag = tag_image.rsplit("/", 1)[-1].split(":", 1)[-1]
    return f"tag {tag[:40]}" + (f", digest {digest}" if digest else ", no digest")


def deploy_scope(attempt: int) -> str:
    """Claim scope of a deploy's statuses: the automatic deploy has none, a person's re-deploy N its own."""
    return "" if attempt <= 1 else f"#deploy{attempt}"
