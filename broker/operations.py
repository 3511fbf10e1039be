"""On-call operations: look at deliveries and runs, re-run, cancel. One service, three doors.

The CLI (local mode), the HTTP API and the dashboard all call these methods, so a
re-run from the browser and one from a terminal do exactly the same thing. Nothing
here creates a PipelineRun itself: a re-run is a new delivery record (who, why, of
what) plus the same Celery task a webhook queues, so the worker's one code path
(resolve, render, preflight, create, report, supersede) is the only way runs are
made. A deploy-only re-run queues the deploy task for an already built run.
Cancelling patches `spec.status` like superseding does; the watcher reports it.

Every action is written to the audit log (who, when, what, why) before it is done.
"""

from __future__ import annotations

import calendar
import json
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from broker import delivery, metrics
from broker import pipelinerun as pr
from broker.errors import Permanent
from broker.events import RefKind
from broker.ports import Cluster, CommitResolver, CommitState
from broker.reporting import describe, failing_task, is_final, run_state, succeeded_condition
from broker.routing import glob_match, ref_selected
from broker.store import SyncStore
from broker.taskmessage import task_message
from config.routing import Route
from config.settings import Settings

A_CANCELLED_BY = f"{pr.GROUP}/cancelled-by"
A_CANCEL_REASON = f"{pr.GROUP}/cancel-reason"
GIT_USERNAMES = {"gitlab": "oauth2", "github": "x-access-token", "gitea": "cibroker"}
ATTEMPT_TTL = 90 * 86400
SCAN_LIMIT = 20_000  # filtered listings look at most this many recent deliveries


class NotFound(Permanent):
    """The delivery, run or commit asked about does not exist (or is past retention)."""


class Refused(Permanent):
    """The action makes no sense in the current state (e.g. cancel a finished run)."""


class NoCluster(Permanent):
    """The action needs Kubernetes and this process has no cluster configured."""


@dataclass(frozen=True, slots=True)
class Actor:
    """Who asked: a person's name (or the API token's label) and the door they came through."""

    who: str
    channel: str  # cli | api | dashboard


def git_auth(settings: Settings, host_id: str) -> tuple[str, str] | None:
    """(username, token) for git over HTTPS to `host_id`, when the host has an API token."""
    creds = settings.credentials.get(host_id)
    host = settings.routing.hosts.get(host_id)
    if creds is None or creds.token is None or host is None:
        return None
    return GIT_USERNAMES[host.kind], creds.token.get_secret_value()


def epoch(iso_time: str | None) -> float | None:
    """Seconds since the epoch of a Kubernetes / delivery-record UTC time (`2026-11-22T10:01:02...`), or None."""
    if not iso_time:
        return None
    try:
        return float(calendar.timegm(time.strptime(iso_time[:19], "%Y-%m-%dT%H:%M:%S")))
    except ValueError:
        return None


def span(value: float | None, *, missing: str = "-") -> str:
    """12s, 3m05s, 2h10m, 3d04h: a duration short enough for a table cell."""
    if value is None:
        return missing
    value = max(0, int(value))
    if value < 120:
        return f"{value}s"
    if value < 7200:
        return f"{value // 60}m{value % 60:02d}s"
    if value < 172800:
        return f"{value // 3600}h{value % 3600 // 60:02d}m"
    return f"{value // 86400}d{value % 86400 // 3600:02d}h"


def duration(start: str | None, end: str | None, *, now: float) -> float | None:
    begun = epoch(start)
    if begun is None:
        return None
    ended = epoch(end)
    return round((ended if ended is not None else now) - begun, 1)


def summarize_run(obj: Mapping[str, Any], *, now: float) -> dict[str, Any]:
    """The one-line view of a PipelineRun that lists and the dashboard show."""
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    ann = meta.get("annotations") or {}
    status = obj.get("status") or {}
    cond = succeeded_condition(obj) or {}
    ref = ann.get(pr.A_REF, "")
    return {
        "run": f"{meta.get('namespace', '')}/{meta.get('name', '')}",
        "namespace": meta.get("namespace", ""),
        "name": meta.get("name", ""),
        "route": labels.get(pr.L_ROUTE, ""),
        "host": labels.get(pr.L_HOST, ""),
        "repo": ann.get(pr.A_REPO, ""),
        "ref": ref,
        "ref_name": ref.removeprefix("refs/heads/").removeprefix("refs/tags/"),
        "sha": labels.get(pr.L_SHA, ""),
        "delivery_id": labels.get(pr.L_DELIVERY, ""),
        "attempt": int(ann.get(pr.A_ATTEMPT) or 1),
        "image": ann.get(pr.A_IMAGE, ""),
        "state": run_state(obj).value,
        "reason": cond.get("reason", ""),
        "message": cond.get("message", ""),
        "reported": ann.get(pr.A_REPORTED, ""),
        "superseded_by": ann.get(pr.A_SUPERSEDED_BY, ""),
        "cancelled_by": ann.get(A_CANCELLED_BY, ""),
        "created": meta.get("creationTimestamp") or ann.get(pr.A_RECEIVED, ""),
        "started": status.get("startTime"),
        "finished": status.get("completionTime"),
        "duration_seconds": duration(status.get("startTime"), status.get("completionTime"), now=now),
        "deploy": ann.get(pr.A_DEPLOY, "[]"),
    }


def summarize_taskrun(obj: Mapping[str, Any], *, now: float) -> dict[str, Any]:
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    status = obj.get("status") or {}
    cond = succeeded_condition(obj) or {}
    state = {"True": "succeeded", "False": "failed"}.get(str(cond.get("status")), "running" if status.get("startTime") else "pending")
    if state == "failed" and cond.get("reason") in ("TaskRunCancelled", "Cancelled"):
        state = "canceled"
    failed_step = next((s for s in status.get("steps") or []
                        if (s.get("terminated") or {}).get("exitCode") not in (None, 0)), None)
    return {
        "name": meta.get("name", ""),
        "task": labels.get("tekton.dev/pipelineTask", meta.get("name", "")),
        "state": state,
        "reason": cond.get("reason", ""),
        "message": cond.get("message", ""),
        "pod": status.get("podName", ""),
        "started": status.get("startTime"),
        "finished": status.get("completionTime"),
        "duration_seconds": duration(status.get("startTime"), status.get("completionTime"), now=now),
        "failed_step": (failed_step or {}).get("name") or (failed_step or {}).get("container", ""),
    }


@dataclass(frozen=True, slots=True)
class Source:
    """What a re-run re-runs: the push, the routes, how to say it, and the delivery it came from (if known)."""

    push: dict[str, Any]
    routes: list[str]
    what: str
    delivery_id: str | None


@dataclass
class Operations:
    settings: Settings
    store: SyncStore
    cluster: Cluster | None = None
    resolver: CommitResolver | None = None
    clock: Callable[[], float] = time.time

    # ---- lookups ---------------------------------------------------------------------------

    @property
    def namespaces(self) -> list[str]:
        routing = self.settings.routing
        return sorted({r.namespace or routing.defaults.namespace for r in routing.routes})

    def _cluster(self) -> Cluster:
        if self.cluster is None:
            raise NoCluster("no Kubernetes cluster configured here (KUBECONFIG or in-cluster); runs cannot be read or changed")
        return self.cluster

    def _route(self, name: str) -> Route:
        for route in self.settings.routing.routes:
            if route.name == name:
                return route
        raise NotFound(f"no route {name!r} in the routing file ({self.settings.source})")

    def deliveries(self, *, limit: int = 50, repo: str | None = None, state: str | None = None) -> list[dict[str, Any]]:
        """Recent deliveries, newest first, optionally only one repo's or one state's."""
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        scanned = 0
        while len(out) < limit and scanned < SCAN_LIMIT:
            page = self.store.recent(limit=200, offset=scanned)
            if not page:
                break
            scanned += len(page)
            for found in page:
                if found is None or found["delivery_id"] in seen:  # expired; or newer deliveries shifted the offsets
                    continue
                seen.add(found["delivery_id"])
                push = found.get("push") or {}
                if repo and push.get("repo") != repo:
                    continue
                if state and state not in (found.get("state"), found.get("decision")):
                    continue
                out.append(found)
        return out[:limit]

    def delivery(self, delivery_id: str) -> dict[str, Any]:
        """A delivery's record, decision log and (when a cluster is configured) its PipelineRuns."""
        found = self.store.get(delivery_id)
        if found is None:
            raise NotFound(f"no delivery {delivery_id} (unknown, or older than the retention period)")
        found["runs"] = None
        if self.cluster is not None:
            found["runs"] = self._runs_with(f"{pr.L_DELIVERY}={delivery_id}")
        return found

    def _runs_with(self, selector: str) -> list[dict[str, Any]]:
        now = self.clock()
        runs = []
        for namespace in self.namespaces:
            items, _ = self._cluster().list_pipelineruns(namespace=namespace, selector=f"{pr.SELECTOR},{selector}" if selector else pr.SELECTOR)
            runs.extend(summarize_run(o, now=now) for o in items)
        runs.sort(key=lambda r: r["created"] or "", reverse=True)
        return runs

    def runs(self, *, repo: str | None = None, state: str | None = None, route: str | None = None,
             limit: int = 50) -> list[dict[str, Any]]:
        """Managed PipelineRuns in every routed namespace, newest first."""
        selector = f"{pr.L_ROUTE}={route}" if route else ""
        found = self._runs_with(selector)
        if repo:
            found = [r for r in found if r["repo"] == repo]
        if state:
            found = [r for r in found if r["state"] == state]
        return found[:limit]

    def _find_run(self, run: str) -> Mapping[str, Any]:
        cluster = self._cluster()
        namespace, _, name = run.rpartition("/")
        for ns in [namespace] if namespace else self.namespaces:
            obj = cluster.get_pipelinerun(namespace=ns, name=name)
            if obj is not None:
                labels = (obj.get("metadata") or {}).get("labels") or {}
                if labels.get(pr.MANAGED_BY[0]) != pr.MANAGED_BY[1]:
                    raise Refused(f"PipelineRun {ns}/{name} is not managed by cibroker")
                return obj
        where = f"namespace {namespace!r}" if namespace else f"namespaces {', '.join(self.namespaces)}"
        raise NotFound(f"no PipelineRun {name!r} in {where}")

    def run(self, run: str) -> dict[str, Any]:
        """One run with its TaskRuns, the failing task and reason, and how to read its logs."""
        obj = self._find_run(run)
        now = self.clock()
        summary = summarize_run(obj, now=now)
        taskruns = self._cluster().list_taskruns(namespace=summary["namespace"], pipelinerun=summary["name"])
        summary["taskruns"] = sorted((summarize_taskrun(t, now=now) for t in taskruns), key=lambda t: t["started"] or "")
        failing = failing_task(taskruns)
        summary["failing"] = None if failing is None else {"task": failing[0], "reason": failing[1], "message": failing[2]}
        route = next((r for r in self.settings.routing.routes if r.name == summary["route"]), None)
        summary["description"] = describe(obj, taskruns=taskruns, pipeline=route.pipeline if route else summary["route"])
        ns, name = summary["namespace"], summary["name"]
        summary["logs"] = [f"tkn pipelinerun logs {name} -n {ns}"] + [
            f"kubectl logs -n {ns} {t['pod']} --all-containers" + (f"  # failed step: {t['failed_step']}" if t["failed_step"] else "")
            for t in summary["taskruns"] if t["pod"]
        ]
        summary["statuses"] = self.store.reported(f"{ns}/{name}")
        return summary

    # ---- re-run ------------------------------------------------------------------------------

    def _source(self, *, delivery_id: str | None, run: str | None, repo: str | None, sha: str | None,
                ref: str | None, route: str | None) -> Source:
        """What the forms of `cibroker rerun` point at."""
        if run:
            return self._source_of_run(self._find_run(run), route, f"PipelineRun {run}")
        if delivery_id:
            found = self.store.get(delivery_id)
            if found is None:
                raise NotFound(f"no delivery {delivery_id} (unknown, or older than the retention period)")
            if found["decision"] != "accepted" or not found.get("push"):
                raise Refused(f"delivery {delivery_id} was {found['decision']} ({found['reason']}); nothing to re-run")
            return Source(dict(found["push"]), [route] if route else list(found["routes"]), f"delivery {delivery_id}",
                          delivery_id)
        if not repo:
            raise Permanent("say what to re-run: --delivery ID, a run, --repo R --sha SHA, or --repo R --ref REF")
        if sha:
            return self._push_of_commit(repo, sha.lower(), route)
        if ref:
            return self._push_of_ref(repo, ref, route)
        raise Permanent("--repo needs --sha SHA or --ref REF")

    @staticmethod
    def _push_of_run(obj: Mapping[str, Any]) -> dict[str, Any]:
        meta = obj.get("metadata") or {}
        labels, ann = meta.get("labels") or {}, meta.get("annotations") or {}
        ref = ann.get(pr.A_REF, "")
        kind = RefKind.TAG if ref.startswith("refs/tags/") else RefKind.BRANCH
        return {
            "host": labels.get(pr.L_HOST, ""), "host_kind": ann.get(pr.A_HOST_KIND, ""), "repo": ann.get(pr.A_REPO, ""),
            "repo_id": ann.get(pr.A_REPO_ID, ""), "ref": ref, "kind": kind.value,
            "name": ref.removeprefix("refs/heads/").removeprefix("refs/tags/"), "sha": labels.get(pr.L_SHA, ""),
            "pushed": labels.get(pr.L_SHA, ""), "web_url": "",
        }

    def _source_of_run(self, obj: Mapping[str, Any], route: str | None, what: str) -> Source:
        summary = summarize_run(obj, now=0)
        return Source(self._push_of_run(obj), [route or summary["route"]], what, summary["delivery_id"] or None)

    def _push_of_commit(self, repo: str, sha: str, route: str | None) -> Source:
        if self.cluster is not None:
            runs = [r for r in self._runs_with(f"{pr.L_SHA}={sha}") if r["repo"] == repo and (not route or r["route"] == route)]
            if runs:
                return self._source_of_run(self._find_run(runs[0]["run"]), route,
                                           f"{repo}@{sha[:8]} (as PipelineRun {runs[0]['run']})")
        for found in self.deliveries(limit=2000):
            push = found.get("push") or {}
            if found["decision"] == "accepted" and push.get("repo") == repo and push.get("sha") == sha:
                return Source(dict(push), [route] if route else list(found["routes"]),
                              f"{repo}@{sha[:8]} (as delivery {found['delivery_id']})", found["delivery_id"])
        raise NotFound(f"no run or delivery of {repo} at {sha[:12]} is known here; re-run by --ref to build a branch head")

    def _push_of_ref(self, repo: str, ref: str, route_name: str | None) -> Source:
        kind = RefKind.TAG if ref.startswith("refs/tags/") else RefKind.BRANCH
        name = ref.removeprefix("refs/heads/").removeprefix("refs/tags/")
        full = f"refs/{'tags' if kind is RefKind.TAG else 'heads'}/{name}"
        candidates = [r for r in self.settings.routing.routes
                      if glob_match(r.repo, repo, ignore_case=True) and (route_name is None or r.name == route_name)]
        routes = [r for r in candidates if ref_selected(r.events, kind, name)] or (candidates if route_name else [])
        if not routes:
            raise NotFound(f"no route builds {repo} {kind.value} {name!r}" + (f" (route {route_name})" if route_name else ""))
        hosts = {r.host for r in routes}
        if len(hosts) > 1:
            raise Permanent(f"routes on several hosts match {repo}: {sorted(hosts)}; pick one with --route")
        first = routes[0]
        host = self.settings.routing.hosts[first.host]
        known = next((d.get("push") for d in self.deliveries(limit=500, repo=repo) if d.get("push")), None) or {}
        git_url = pr.clone_url(first, repo=repo, host=host)
        if self.resolver is None:
            raise Permanent("resolving a ref needs git; this process has no commit resolver")
        auth = git_auth(self.settings, first.host) if pr.token_allowed(git_url) else None
        if kind is RefKind.TAG:
            sha = self.resolver.resolve_tag(clone_url=git_url, tag=name, auth=auth)
        else:
            sha = self.resolver.resolve_branch(clone_url=git_url, branch=name, auth=auth)
        push = {
            "host": first.host, "host_kind": host.kind, "repo": repo, "repo_id": known.get("repo_id") or repo, "ref": full,
            "kind": kind.value, "name": name, "sha": sha, "pushed": sha, "web_url": known.get("web_url", ""),
        }
        return Source(push, [r.name for r in routes], f"the head of {repo} {name} ({sha[:8]}, read with git ls-remote)", None)

    def rerun(self, *, actor: Actor, reason: str = "", delivery_id: str | None = None, run: str | None = None,
              repo: str | None = None, sha: str | None = None, ref: str | None = None, route: str | None = None,
              deploy_only: bool = False, dry_run: bool = False) -> dict[str, Any]:
        """Run the same commit and route again (a new PipelineRun), or only its deploy stage."""
        if deploy_only:
            return self._redeploy(actor=actor, reason=reason, delivery_id=delivery_id, run=run, repo=repo, sha=sha, route=route,
                                  dry_run=dry_run)
        source = self._source(delivery_id=delivery_id, run=run, repo=repo, sha=sha, ref=ref, route=route)
        push, route_names, what = source.push, source.routes, source.what
        routes = [self._route(name) for name in route_names]
        host_id = push.get("host") or routes[0].host
        host = self.settings.routing.hosts.get(host_id)
        if host is None:
            raise NotFound(f"host {host_id!r} is no longer in the routing file")
        counter = f"{host_id}:{push['repo']}:{push['ref']}:{push['sha']}"
        attempt = self.store.peek_attempt(counter) if dry_run else self.store.next_attempt(counter, ttl=ATTEMPT_TTL)
        now = self.clock()
        new_id = delivery.new_delivery_id(now)
        kind = RefKind(push["kind"])
        req = pr.RunRequest(delivery_id=new_id, host=host_id, host_kind=host.kind, repo=push["repo"], repo_id=push["repo_id"],
                            ref=push["ref"], kind=kind, name=push["name"], sha=push["sha"], attempt=attempt,
                            received_at=delivery.iso(now))
        rendered = []
        for r in routes:
            git_url = pr.clone_url(r, repo=push["repo"], host=host)
            rendered.append(pr.render(self.settings.routing, r, req, git_url=git_url, api_version=self.settings.env.tekton_api_version))
        plan = {
            "action": "rerun", "dry_run": dry_run, "of": what, "delivery_id": None if dry_run else new_id, "attempt": attempt,
            "repo": push["repo"], "ref": push["ref"], "sha": push["sha"], "routes": [r.name for r in routes],
            "pipelineruns": rendered, "runs": [f"{b['metadata']['namespace']}/{b['metadata']['name']}" for b in rendered],
        }
        if dry_run:
            return plan
        self._audit(actor, "rerun", target=what, reason=reason, result=f"delivery {new_id}, attempt {attempt}")
        said = f"re-run of {what} requested by {actor.who} via {actor.channel}" + (f": {reason}" if reason else "")
        record = delivery.record(
            delivery_id=new_id, host_id=host_id, host_kind=host.kind, event=None, event_name="rerun", decision="accepted",
            reason=said, code="rerun", received_at=now, headers={}, authenticated_by=f"{actor.channel} ({actor.who})",
            routes=tuple(r.name for r in routes),
        )
        record.update(push=push, rerun_of=what, requested_by=actor.who, attempt=attempt)
        entries = [
            delivery.log_entry("rerun_requested", said, at=now, by=actor.who, channel=actor.channel),
            delivery.log_entry("matched", f"route(s) {', '.join(plan['routes'])}; attempt {attempt}: "
                               f"{', '.join(plan['runs'])}", at=now, routes=plan["routes"]),
            delivery.log_entry("queued", "queued for a worker", at=now),
        ]
        message = task_message(task=delivery.PROCESS_TASK, task_id=new_id, args=[new_id, attempt], queue=self.settings.env.queue,
                               origin=f"cibroker-{actor.channel}")
        self.store.add_delivery(record=record, log=entries, queue=self.settings.env.queue, message=message,
                                ttl=self.settings.env.retention_days * 86400)
        if source.delivery_id and self.store.get(source.delivery_id) is not None:
            self.store.append_log(source.delivery_id, delivery.log_entry(
                "rerun_requested", f"re-run as delivery {new_id} by {actor.who}" + (f": {reason}" if reason else ""), at=now))
        plan.pop("pipelineruns")
        return plan

    def _redeploy(self, *, actor: Actor, reason: str, delivery_id: str | None, run: str | None, repo: str | None,
                  sha: str | None, route: str | None, dry_run: bool) -> dict[str, Any]:
        """Queue the deploy stage again for a run that already built the commit."""
        if run:
            obj = self._find_run(run)
        else:
            if delivery_id:
                selector = f"{pr.L_DELIVERY}={delivery_id}"
            elif repo and sha:
                selector = f"{pr.L_SHA}={sha.lower()}"
            else:
                raise Permanent("--deploy-only needs a run, --delivery ID or --repo R --sha SHA (a commit already built)")
            built = [r for r in self._runs_with(selector) if r["state"] == CommitState.SUCCESS.value
                     and (not repo or r["repo"] == repo) and (not route or r["route"] == route)]
            if not built:
                raise NotFound("no succeeded PipelineRun of that commit is left in the cluster to deploy from; re-run the build")
            obj = self._find_run(built[0]["run"])
        summary = summarize_run(obj, now=self.clock())
        if summary["state"] != CommitState.SUCCESS.value:
            raise Refused(f"PipelineRun {summary['run']} is {summary['state']}, not succeeded: nothing built to deploy")
        environments = json.loads(summary["deploy"] or "[]")
        if not environments:
            raise Refused(f"route {summary['route']} deploys nothing for {summary['ref_name']!r}")
        what = f"the deploy of PipelineRun {summary['run']} ({summary['image']})"
        plan = {"action": "redeploy", "dry_run": dry_run, "of": what, "run": summary["run"], "environments": environments,
                "image": summary["image"], "sha": summary["sha"], "attempt": None}
        if dry_run:
            return plan
        attempt = self.store.next_attempt(f"deploy:{summary['run']}", ttl=ATTEMPT_TTL)
        plan["attempt"] = attempt
        self._audit(actor, "redeploy", target=what, reason=reason, result=f"environments {environments}, attempt {attempt}")
        for environment in environments:
            message = task_message(task=delivery.DEPLOY_TASK, task_id=uuid.uuid4().hex,
                                   args=[pr.snapshot(obj), environment, attempt, True], queue=self.settings.env.queue,
                                   origin=f"cibroker-{actor.channel}")
            self.store.enqueue(queue=self.settings.env.queue, message=message)
        if summary["delivery_id"] and self.store.get(summary["delivery_id"]) is not None:
            self.store.append_log(summary["delivery_id"], delivery.log_entry(
                "redeploy_requested", f"deploy of {summary['image']} to {', '.join(environments)} queued again by {actor.who}"
                + (f": {reason}" if reason else ""), at=self.clock()))
        return plan

    # ---- cancel ------------------------------------------------------------------------------

    def cancel(self, run: str, *, actor: Actor, reason: str = "") -> dict[str, Any]:
        """Cancel a run in progress; the watcher reports it `canceled` with who and why."""
        obj = self._find_run(run)
        summary = summarize_run(obj, now=self.clock())
        if is_final(run_state(obj)):
            raise Refused(f"PipelineRun {summary['run']} already ended ({summary['state']}, {summary['reason']})")
        route = next((r for r in self.settings.routing.routes if r.name == summary["route"]), None)
        cancel_status = route.cancel_status if route else "Cancelled"
        self._audit(actor, "cancel", target=f"PipelineRun {summary['run']}", reason=reason, result=cancel_status)
        self._cluster().patch_pipelinerun(namespace=summary["namespace"], name=summary["name"], patch={
            "spec": {"status": cancel_status},
            "metadata": {"annotations": {A_CANCELLED_BY: actor.who, A_CANCEL_REASON: reason[:200]}},
        })
        if summary["delivery_id"] and self.store.get(summary["delivery_id"]) is not None:
            self.store.append_log(summary["delivery_id"], delivery.log_entry(
                "cancel_requested", f"PipelineRun {summary['run']} cancelled ({cancel_status}) by {actor.who} via {actor.channel}"
                + (f": {reason}" if reason else ""), at=self.clock()))
        return {"action": "cancel", "run": summary["run"], "spec_status": cancel_status, "by": actor.who, "reason": reason}

    def _audit(self, actor: Actor, action: str, *, target: str, reason: str, result: str) -> None:
        self.store.audit({"who": actor.who, "channel": actor.channel, "action": action, "target": target, "reason": reason,
                          "result": result}, retention_seconds=self.settings.env.retention_days * 86400)
        self.store.count(metrics.ACTIONS.name, metrics.ACTIONS.field((action, actor.channel)))

    def audit_log(self, *, limit: int = 100) -> list[dict[str, Any]]:
        return self.store.audit_log(limit=limit)
