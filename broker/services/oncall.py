"""On-call operations: look at deliveries and runs, re-run, cancel. One service, three doors.

The CLI (local mode), the HTTP API and the dashboard all call these methods, so a
re-run from the browser and one from a terminal do exactly the same thing. Nothing
here creates, patches or deletes a PipelineRun itself (the on-call service account may
only read them):

- a re-run is a new delivery record (who, why, of what) plus the same Celery task a
  webhook queues, so the worker's one code path (resolve, render, preflight, create,
  report, supersede) is the only way runs are made;
- a deploy-only re-run and a cancel are a person's request, signed with the broker's key
  (broker.core.trust) and stored in Redis, plus a task that names only the run and the
  request's id. The worker verifies the request before acting, so a message pushed onto
  the queue by anyone else can never force a deploy or cancel a run.

What a PipelineRun's labels and annotations say is input, not fact: anyone who can write
a PipelineRun can write them. A run whose labels do not parse is shown as "unreadable"
(naming the field) and nothing is re-run or re-deployed from it; a re-run never leaves
the route it names (host, repo glob, branch/tag filters), and the repo, ref and commit
people type go through the webhook edge's own validators.

Every action is written to the audit log (who, when, what, why) before it is done.
"""

from __future__ import annotations

import calendar
import json
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from broker.core import metrics
from broker.core import records as delivery
from broker.core import pipelinerun as pr
from broker.core.errors import ConfigError, Permanent, Rejected
from broker.core.events import RefKind
from broker.logging import get_logger
from broker.core.status import CommitState
from broker.ports import Cluster, CommitResolver, OncallStore
from broker.core.runlabels import DELIVERY_ID, NAME, RunReader
from broker.core.reporting import describe, failing_task, is_final, run_state, succeeded_condition
from broker.core.routing import glob_match, ref_selected
from broker.core.sources.common import commit_id, repo_path, split_ref
from broker.core.trust import PersonRequest, sign_request
from config.routing import Route
from config.settings import Settings

GIT_USERNAMES = {"gitlab": "oauth2", "github": "x-access-token", "gitea": "cibroker"}
ATTEMPT_TTL = 90 * 86400
SCAN_LIMIT = 20_000  # filtered listings look at most this many recent deliveries
log = get_logger("cibroker.operations")


class NotFound(Permanent):
    """The delivery, run or commit asked about does not exist (or is past retention)."""


class Refused(Permanent):
    """The action makes no sense in the current state (e.g. cancel a finished run)."""


class NoCluster(Permanent):
    """The action needs Kubernetes and this process has no cluster configured."""


class NotConfigured(Permanent):
    """The action needs a setting this process lacks (the broker's signing key)."""


class BadField(Permanent):
    """A field a person gave (repo, ref, sha, run) is not valid; `field` names it."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(reason)
        self.field = field


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


class _Reader(RunReader):
    """The run codec's reader, and the status times the views show."""

    def time(self, value: object, where: str) -> str | None:
        if value is None or value == "":
            return None
        if not isinstance(value, str) or epoch(value) is None:
            self.problems.append(f"{where} is not a time")
            return None
        return value


def summarize_run(obj: Mapping[str, Any], *, now: float) -> dict[str, Any]:
    """The one-line view of a PipelineRun that lists and the dashboard show.

    Never raises on what a run says about itself: a label or annotation that does not parse
    (a non-numeric attempt, a deploy list that is not JSON, a value that is not a string, a
    label that is missing) becomes "" / a default here, and `unreadable` names each such field.
    """
    read = _Reader(obj)
    namespace, name, ref = read.namespace(), read.name(), read.ref()
    environments = read.environments()
    summary = {
        "run": f"{namespace}/{name}",
        "namespace": namespace,
        "name": name,
        "route": read.route(),
        "host": read.host(),
        "repo": read.repo(),
        "ref": ref,
        "ref_name": ref.removeprefix("refs/heads/").removeprefix("refs/tags/"),
        "sha": read.sha(),
        "delivery_id": read.delivery_id(),
        "attempt": read.attempt(),
        "image": read.image(),
        "reported": read.reported(),
        "superseded_by": read.superseded_by(),
        "cancelled_by": read.cancelled_by(),
        "created": read.time(read.meta.get("creationTimestamp"), "metadata.creationTimestamp")
        or read.time(read.annotations.get(pr.A_RECEIVED), f"annotation {pr.A_RECEIVED}") or "",
        "started": read.time(read.status.get("startTime"), "status.startTime"),
        "finished": read.time(read.status.get("completionTime"), "status.completionTime"),
        "environments": environments,
        "deploy": json.dumps(environments),
    }
    clean = read.clean()
    cond = succeeded_condition(clean) or {}
    summary.update(
        state=run_state(clean).value, reason=cond.get("reason", ""), message=cond.get("message", ""),
        duration_seconds=duration(summary["started"], summary["finished"], now=now),
        unreadable="; ".join(dict.fromkeys(read.problems)),
    )
    return summary


def refuse_unreadable(summary: Mapping[str, Any], doing: str) -> None:
    """Refused when the run's labels do not parse: nothing is decided from such a run."""
    if summary["unreadable"]:
        raise Refused(f"PipelineRun {summary['run']} is unreadable ({summary['unreadable']}); "
                      f"cannot {doing} from it: use its delivery (--delivery) or --repo/--sha instead")


def route_mismatch(route: Route, *, host: str, repo: str, kind: RefKind, name: str) -> str | None:
    """Why `route` would not have taken a push of `repo` `kind` `name` on `host`, or None when it would."""
    if route.host != host:
        return f"route {route.name} takes host {route.host!r}, not {host!r}"
    if not glob_match(route.repo, repo, ignore_case=True):
        return f"route {route.name} takes repos {route.repo!r}, not {repo!r}"
    if not ref_selected(route.events, kind, name):
        patterns = route.events.branches if kind is RefKind.BRANCH else route.events.tags
        return (f"route {route.name} does not build {kind.value} {name!r} (its {kind.value} filters: "
                f"{', '.join(patterns) or 'none'})")
    return None


def validate_target(*, repo: str | None = None, ref: str | None = None, sha: str | None = None,
                    run: str | None = None) -> tuple[str | None, str | None, str | None]:
    """(repo, full ref, sha) a person typed, through the webhook edge's own validators; BadField naming the field."""
    def bad(field: str, exc: Rejected) -> BadField:
        return BadField(field, f"{field}: {exc.reason.replace('payload field', 'field', 1)}")

    if repo is not None:
        try:
            repo_path(repo, name="repo")
        except Rejected as exc:
            raise bad("repo", exc) from None
    full = None
    if ref is not None:
        full = ref if ref.startswith("refs/") else f"refs/heads/{ref}"
        try:
            split_ref(full)
        except Rejected as exc:
            raise bad("ref", exc) from None
    if sha is not None:
        try:
            sha = commit_id(sha.lower(), name="sha")
        except Rejected as exc:
            raise bad("sha", exc) from None
    if run is not None:
        namespace, _, name = run.rpartition("/")
        if not NAME.match(name) or (namespace and not NAME.match(namespace)):
            raise BadField("run", "run: field 'run' is not namespace/name or a name (DNS-1123 labels)")
    return repo, full, sha


def summarize_taskrun(obj: Mapping[str, Any], *, now: float) -> dict[str, Any]:
    """One TaskRun's row; a TaskRun whose fields are garbage is a row saying so, never an error."""
    try:
        found = _summarize_taskrun(obj, now=now)
        if all(isinstance(found[k], str) for k in ("name", "task", "reason", "message", "pod", "failed_step")):
            return found
    except (AttributeError, TypeError, ValueError):
        pass
    name = (obj.get("metadata") or {}).get("name") if isinstance(obj.get("metadata"), Mapping) else None
    return {"name": name if isinstance(name, str) else "", "task": name if isinstance(name, str) else "?", "state": "unreadable",
            "reason": "unreadable", "message": "this TaskRun's metadata or status does not parse", "pod": "", "started": None,
            "finished": None, "duration_seconds": None, "failed_step": ""}


def _summarize_taskrun(obj: Mapping[str, Any], *, now: float) -> dict[str, Any]:
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


@contextmanager
def _refusals_logged(action: str, actor: Actor, *, target: str) -> Iterator[None]:
    """One warning line per refused action, with the reason the person was given."""
    try:
        yield
    except (Refused, BadField, NotConfigured) as exc:
        log.warning(f"{action}_refused", by=actor.who, channel=actor.channel, target=str(target)[:200], reason=str(exc)[:500],
                    field=getattr(exc, "field", None))
        raise


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
    store: OncallStore
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
        route = self.settings.routing.route(name)
        if route is not None:
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
        found = self.store.get(delivery_id) if DELIVERY_ID.match(delivery_id) else None
        if found is None:
            raise NotFound(f"no delivery {delivery_id[:40]} (unknown, or older than the retention period)")
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
        if route and not NAME.match(route):
            raise BadField("route", "route: field 'route' is not a route name (a DNS-1123 label)")
        selector = f"{pr.L_ROUTE}={route}" if route else ""
        found = self._runs_with(selector)
        if repo:
            found = [r for r in found if r["repo"] == repo]
        if state:
            found = [r for r in found if r["state"] == state]
        return found[:limit]

    def _locate(self, run: str) -> tuple[str, str, Mapping[str, Any]]:
        """(namespace, name, object) of a managed run, as the API server has it now."""
        validate_target(run=run)
        cluster = self._cluster()
        namespace, _, name = run.rpartition("/")
        for ns in [namespace] if namespace else self.namespaces:
            obj = cluster.get_pipelinerun(namespace=ns, name=name)
            if obj is not None:
                if _Reader(obj).labels.get(pr.MANAGED_BY[0]) != pr.MANAGED_BY[1]:
                    raise Refused(f"PipelineRun {ns}/{name} is not managed by cibroker")
                return ns, name, obj
        where = f"namespace {namespace!r}" if namespace else f"namespaces {', '.join(self.namespaces)}"
        raise NotFound(f"no PipelineRun {name!r} in {where}")

    def _find_run(self, run: str) -> Mapping[str, Any]:
        return self._locate(run)[2]

    def _summary(self, run: str) -> tuple[dict[str, Any], Mapping[str, Any]]:
        """The run's summary (named by where it was found, whatever its metadata says) and the object."""
        namespace, name, obj = self._locate(run)
        summary = summarize_run(obj, now=self.clock())
        summary.update(namespace=namespace, name=name, run=f"{namespace}/{name}")
        return summary, obj

    def run(self, run: str) -> dict[str, Any]:
        """One run with its TaskRuns, the failing task and reason, and how to read its logs."""
        summary, obj = self._summary(run)
        now = self.clock()
        ns, name = summary["namespace"], summary["name"]
        taskruns = [t for t in self._cluster().list_taskruns(namespace=ns, pipelinerun=name) if isinstance(t, Mapping)]
        summary["taskruns"] = sorted((summarize_taskrun(t, now=now) for t in taskruns), key=lambda t: t["started"] or "")
        try:
            failing = failing_task(taskruns)
        except (AttributeError, TypeError):  # a TaskRun whose metadata is garbage names no task
            failing = None
        summary["failing"] = None if failing is None else {"task": failing[0], "reason": failing[1], "message": failing[2]}
        route = self.settings.routing.route(summary["route"])
        clean = _Reader(obj).clean()
        try:
            summary["description"] = describe(clean, taskruns=taskruns, pipeline=route.pipeline if route else summary["route"])
        except (AttributeError, TypeError):
            summary["description"] = describe(clean, pipeline=route.pipeline if route else summary["route"])
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
            summary, _ = self._summary(run)
            return self._source_of_run(summary, route, f"PipelineRun {summary['run']}")
        if delivery_id:
            found = self.store.get(delivery_id) if DELIVERY_ID.match(delivery_id) else None
            if found is None:
                raise NotFound(f"no delivery {delivery_id[:40]} (unknown, or older than the retention period)")
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

    def _host_of(self, label: str) -> str:
        """The routing file's host id behind a run's host label (a slug of the id); NotFound when none is."""
        found = [h for h in self.settings.routing.hosts if pr.slug(h, 63) == label]
        if len(found) != 1:
            raise NotFound(f"host {label!r} (as the run's label names it) is not in the routing file")
        return found[0]

    def _push_of_run(self, summary: Mapping[str, Any]) -> dict[str, Any]:
        """The push a run was made for: its stored delivery's, or (past retention) what its labels say."""
        refuse_unreadable(summary, "re-run")
        record = self.store.get(summary["delivery_id"])
        if record is not None and record.get("push"):
            push = dict(record["push"])
            if (push.get("repo"), push.get("ref"), push.get("sha")) != (summary["repo"], summary["ref"], summary["sha"]):
                raise Refused(f"PipelineRun {summary['run']} says {summary['repo']} {summary['ref']} {summary['sha'][:8]}, "
                              f"but its delivery {summary['delivery_id']} was {push.get('repo')} {push.get('ref')} "
                              f"{str(push.get('sha'))[:8]}: its labels were changed; re-run the delivery instead")
            return push
        ref = summary["ref"]
        kind = RefKind.TAG if ref.startswith("refs/tags/") else RefKind.BRANCH
        host_id = self._host_of(summary["host"])
        return {
            "host": host_id, "host_kind": self.settings.routing.hosts[host_id].kind, "repo": summary["repo"],
            "repo_id": summary["repo"], "ref": ref, "kind": kind.value, "name": summary["ref_name"], "sha": summary["sha"],
            "pushed": summary["sha"], "web_url": "",
        }

    def _source_of_run(self, summary: Mapping[str, Any], route: str | None, what: str) -> Source:
        return Source(self._push_of_run(summary), [route or summary["route"]], what, summary["delivery_id"] or None)

    def _push_of_commit(self, repo: str, sha: str, route: str | None) -> Source:
        if self.cluster is not None:
            runs = [r for r in self._runs_with(f"{pr.L_SHA}={sha}")
                    if r["repo"] == repo and not r["unreadable"] and (not route or r["route"] == route)]
            if runs:
                summary, _ = self._summary(runs[0]["run"])
                return self._source_of_run(summary, route, f"{repo}@{sha[:8]} (as PipelineRun {runs[0]['run']})")
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
        if route_name is not None:  # a named route must take this repo and ref, exactly as for a push
            named = self._route(route_name)
            why = route_mismatch(named, host=named.host, repo=repo, kind=kind, name=name)
            if why:
                raise Refused(f"cannot build {repo} {kind.value} {name!r} on route {route_name}: {why}")
            routes = [named]
        else:
            routes = [r for r in self.settings.routing.routes
                      if glob_match(r.repo, repo, ignore_case=True) and ref_selected(r.events, kind, name)]
        if not routes:
            raise NotFound(f"no route builds {repo} {kind.value} {name!r}")
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
              deploy_only: bool = False, force: bool = False, dry_run: bool = False) -> dict[str, Any]:
        """Run the same commit and route again (a new PipelineRun), or only its deploy stage.

        `force` (with `deploy_only` only) asks the worker to skip the ancestry guard ("never deploy a
        commit older than the one running"); without it the guard applies to a person's re-deploy too.
        """
        action = "redeploy" if deploy_only else "rerun"
        with _refusals_logged(action, actor, target=run or delivery_id or f"{repo} {sha or ref}"):
            plan = self._rerun(actor=actor, reason=reason, delivery_id=delivery_id, run=run, repo=repo, sha=sha, ref=ref,
                               route=route, deploy_only=deploy_only, force=force, dry_run=dry_run)
        if not dry_run:
            log.info(f"{action}_requested", by=actor.who, channel=actor.channel, of=plan["of"], force=force,
                     requests=plan.get("requests"), delivery_id=plan.get("delivery_id"))
        return plan

    def _rerun(self, *, actor: Actor, reason: str, delivery_id: str | None, run: str | None, repo: str | None,
               sha: str | None, ref: str | None, route: str | None, deploy_only: bool, force: bool,
               dry_run: bool) -> dict[str, Any]:
        repo, ref, sha = validate_target(repo=repo, ref=ref, sha=sha, run=run)
        if route is not None and not NAME.match(route):
            raise BadField("route", "route: field 'route' is not a route name (a DNS-1123 label)")
        if force and not deploy_only:
            raise BadField("force", "force: only a deploy-only re-run can be forced (--deploy-only --force)")
        if force and not reason.strip():
            raise BadField("reason", "reason: a forced deploy skips the ancestry guard; say why (--reason)")
        if deploy_only:
            return self._redeploy(actor=actor, reason=reason, delivery_id=delivery_id, run=run, repo=repo, sha=sha, route=route,
                                  force=force, dry_run=dry_run)
        source = self._source(delivery_id=delivery_id, run=run, repo=repo, sha=sha, ref=ref, route=route)
        push, route_names, what = source.push, source.routes, source.what
        routes = [self._route(name) for name in route_names]
        host_id = push.get("host") or routes[0].host
        host = self.settings.routing.hosts.get(host_id)
        if host is None:
            raise NotFound(f"host {host_id!r} is no longer in the routing file")
        kind = RefKind(push["kind"])
        for r in routes:  # a re-run stays inside the route: the one a push of this commit would have matched
            why = route_mismatch(r, host=host_id, repo=push["repo"], kind=kind, name=push["name"])
            if why:
                raise Refused(f"cannot re-run {what} on route {r.name}: {why}")
        counter = f"{host_id}:{push['repo']}:{push['ref']}:{push['sha']}"
        attempt = self.store.peek_attempt(counter) if dry_run else self.store.next_attempt(counter, ttl=ATTEMPT_TTL)
        now = self.clock()
        new_id = delivery.new_delivery_id(now)
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
        self._queue_rerun(plan, actor=actor, reason=reason, source=source, host_id=host_id, host_kind=host.kind, now=now)
        plan.pop("pipelineruns")
        return plan

    def _queue_rerun(self, plan: dict[str, Any], *, actor: Actor, reason: str, source: Any, host_id: str, host_kind: str,
                     now: float) -> None:
        """Store the re-run as a delivery of its own (made by a person) and queue its task, in one transaction."""
        what, new_id, attempt, push = plan["of"], plan["delivery_id"], plan["attempt"], source.push
        self._audit(actor, "rerun", target=what, reason=reason, result=f"delivery {new_id}, attempt {attempt}")
        said = f"re-run of {what} requested by {actor.who} via {actor.channel}" + (f": {reason}" if reason else "")
        record = delivery.record(
            delivery_id=new_id, host_id=host_id, host_kind=host_kind, event=None, event_name="rerun", decision="accepted",
            reason=said, code="rerun", received_at=now, headers={}, authenticated_by=f"{actor.channel} ({actor.who})",
            routes=tuple(plan["routes"]),
        )
        record.update(push=push, rerun_of=what, requested_by=actor.who, attempt=attempt)
        entries = [
            delivery.log_entry("rerun_requested", said, at=now, by=actor.who, channel=actor.channel),
            delivery.log_entry("matched", f"route(s) {', '.join(plan['routes'])}; attempt {attempt}: "
                               f"{', '.join(plan['runs'])}", at=now, routes=plan["routes"]),
            delivery.log_entry("queued", "queued for a worker", at=now),
        ]
        call = delivery.TaskCall(delivery.PROCESS_TASK, new_id, (new_id, attempt), origin=f"cibroker-{actor.channel}")
        self.store.add_delivery(record=record, log=entries, queue=self.settings.env.queue, call=call,
                                ttl=self.settings.env.retention_days * 86400)
        if source.delivery_id and self.store.get(source.delivery_id) is not None:
            self.store.append_log(source.delivery_id, delivery.log_entry(
                "rerun_requested", f"re-run as delivery {new_id} by {actor.who}" + (f": {reason}" if reason else ""), at=now))

    def _redeploy(self, *, actor: Actor, reason: str, delivery_id: str | None, run: str | None, repo: str | None,
                  sha: str | None, route: str | None, force: bool, dry_run: bool) -> dict[str, Any]:
        """Ask a worker, by a signed request per environment, to deploy again what a succeeded run built."""
        summary = self._built_run(delivery_id=delivery_id, run=run, repo=repo, sha=sha, route=route)
        refuse_unreadable(summary, "deploy")
        if route and summary["route"] != route:
            raise Refused(f"PipelineRun {summary['run']} was built by route {summary['route']}, not {route}")
        if summary["state"] != CommitState.SUCCESS.value:
            raise Refused(f"PipelineRun {summary['run']} is {summary['state']}, not succeeded: nothing built to deploy")
        # Where to deploy comes from the routing file (the run's route, ref and host must still fit it), never
        # from the run's own deploy annotation.
        the_route = self._route(summary["route"])
        kind = RefKind.TAG if summary["ref"].startswith("refs/tags/") else RefKind.BRANCH
        why = route_mismatch(the_route, host=self._host_of(summary["host"]), repo=summary["repo"], kind=kind,
                             name=summary["ref_name"])
        if why:
            raise Refused(f"cannot deploy PipelineRun {summary['run']}: {why}")
        environments = [d.environment for d in the_route.deploy if d.when is None or ref_selected(d.when, kind, summary["ref_name"])]
        if not environments:
            raise Refused(f"route {the_route.name} deploys nothing for {summary['ref_name']!r}")
        what = f"the deploy of PipelineRun {summary['run']} ({summary['image']})"
        plan = {"action": "redeploy", "dry_run": dry_run, "of": what, "run": summary["run"], "environments": environments,
                "image": summary["image"], "sha": summary["sha"], "attempt": None, "force": force, "requests": []}
        if dry_run:
            return plan
        self._request_deploys(plan, summary, actor=actor, reason=reason, force=force)
        return plan

    def _request_deploys(self, plan: dict[str, Any], summary: dict[str, Any], *, actor: Actor, reason: str, force: bool) -> None:
        """One signed request per environment, stored, audited, logged, and a deploy task queued for each."""
        what, environments = plan["of"], plan["environments"]
        key = self._signing_key()
        attempt = self.store.next_attempt(f"deploy:{summary['run']}", ttl=ATTEMPT_TTL)
        now = self.clock()
        requests = [PersonRequest(request_id=uuid.uuid4().hex, action="deploy", namespace=summary["namespace"],
                                  name=summary["name"], actor=actor.who, channel=actor.channel, reason=reason, at=delivery.iso(now),
                                  environment=environment, attempt=attempt, force=force) for environment in environments]
        for request in requests:
            self.store.put_request(sign_request(key, request), ttl=self._retention)
        ids = [r.request_id for r in requests]
        plan.update(attempt=attempt, requests=ids)
        forced = "forced (no ancestry check) " if force else ""
        self._audit(actor, "redeploy", target=what, reason=reason,
                    result=f"{forced}deploy to {', '.join(environments)} requested, attempt {attempt}, request(s) {', '.join(ids)}",
                    force=force, requests=ids)
        if summary["delivery_id"] and self.store.get(summary["delivery_id"]) is not None:
            self.store.append_log(summary["delivery_id"], delivery.log_entry(
                "redeploy_requested", f"{forced}deploy of {summary['image']} to {', '.join(environments)} requested by "
                f"{actor.who} via {actor.channel}" + (f": {reason}" if reason else "") + "; queued for a worker",
                at=now, by=actor.who, force=force, requests=ids))
        for request in requests:
            call = delivery.TaskCall(delivery.DEPLOY_TASK, request.request_id,
                                     (request.namespace, request.name, request.environment, attempt, request.request_id),
                                     origin=f"cibroker-{actor.channel}")
            self.store.enqueue(queue=self.settings.env.queue, call=call)

    def _built_run(self, *, delivery_id: str | None, run: str | None, repo: str | None, sha: str | None,
                   route: str | None) -> dict[str, Any]:
        """The run to deploy from: the one named, else the newest succeeded run of the delivery or commit."""
        if run:
            return self._summary(run)[0]
        if delivery_id:
            if not DELIVERY_ID.match(delivery_id):
                raise NotFound(f"no delivery {delivery_id[:40]} (ids are 26 lower-case hex characters)")
            selector = f"{pr.L_DELIVERY}={delivery_id}"
        elif repo and sha:
            selector = f"{pr.L_SHA}={sha}"
        else:
            raise Permanent("--deploy-only needs a run, --delivery ID or --repo R --sha SHA (a commit already built)")
        built = [r for r in self._runs_with(selector) if r["state"] == CommitState.SUCCESS.value and not r["unreadable"]
                 and (not repo or r["repo"] == repo) and (not route or r["route"] == route)]
        if not built:
            raise NotFound("no succeeded PipelineRun of that commit is left in the cluster to deploy from; re-run the build")
        return self._summary(built[0]["run"])[0]

    # ---- cancel ------------------------------------------------------------------------------

    def cancel(self, run: str, *, actor: Actor, reason: str = "") -> dict[str, Any]:
        """Ask a worker, by a signed request, to cancel a run in progress; the watcher then reports it `canceled`.

        The on-call side only reads the run (to refuse one that already ended); a worker re-reads it,
        sets spec.status and records who and why.
        """
        with _refusals_logged("cancel", actor, target=run):
            done = self._cancel(run, actor=actor, reason=reason)
        log.info("cancel_requested", by=actor.who, channel=actor.channel, run=done["run"], request_id=done["request_id"])
        return done

    def _cancel(self, run: str, *, actor: Actor, reason: str) -> dict[str, Any]:
        summary, _ = self._summary(run)
        if is_final(CommitState(summary["state"])):
            raise Refused(f"PipelineRun {summary['run']} already ended ({summary['state']}, {summary['reason']})")
        key = self._signing_key()
        route = self.settings.routing.route(summary["route"])
        cancel_status = route.cancel_status if route else "Cancelled"
        now = self.clock()
        request = PersonRequest(request_id=uuid.uuid4().hex, action="cancel", namespace=summary["namespace"],
                                name=summary["name"], actor=actor.who, channel=actor.channel, reason=reason, at=delivery.iso(now))
        self.store.put_request(sign_request(key, request), ttl=self._retention)
        self._audit(actor, "cancel", target=f"PipelineRun {summary['run']}", reason=reason,
                    result=f"requested ({cancel_status}), request {request.request_id}", requests=[request.request_id])
        if summary["delivery_id"] and self.store.get(summary["delivery_id"]) is not None:
            self.store.append_log(summary["delivery_id"], delivery.log_entry(
                "cancel_requested", f"cancel of PipelineRun {summary['run']} ({cancel_status}) requested by {actor.who} via "
                f"{actor.channel}" + (f": {reason}" if reason else "") + "; queued for a worker",
                at=now, by=actor.who, requests=[request.request_id]))
        call = delivery.TaskCall(delivery.CANCEL_TASK, request.request_id, (request.request_id,), origin=f"cibroker-{actor.channel}")
        self.store.enqueue(queue=self.settings.env.queue, call=call)
        return {"action": "cancel", "run": summary["run"], "requested": True, "request_id": request.request_id,
                "spec_status": cancel_status, "by": actor.who, "reason": reason, "state": summary["state"]}

    @property
    def _retention(self) -> int:
        return self.settings.env.retention_days * 86400

    def _signing_key(self) -> bytes:
        try:
            return self.settings.require_signing_key()
        except ConfigError as exc:
            raise NotConfigured(str(exc)) from None

    def _audit(self, actor: Actor, action: str, *, target: str, reason: str, result: str, **extra: Any) -> None:
        self.store.audit({"who": actor.who, "channel": actor.channel, "action": action, "target": target, "reason": reason,
                          "result": result, **extra}, retention_seconds=self._retention)
        self.store.count(metrics.ACTIONS.name, metrics.ACTIONS.field((action, actor.channel)))

    def audit_log(self, *, limit: int = 100) -> list[dict[str, Any]]:
        return self.store.audit_log(limit=limit)
