"""The on-call verbs of `cibroker`: deliveries, runs, rerun, cancel, explain, audit.

Each verb works locally (Redis and the cluster, through `broker.services.oncall`) or
remotely (`--server URL` with a bearer token, through `broker.cli.remote`), with the same
answers. Output: coloured tables on a terminal, plain aligned text when piped,
`--json` for programs. Errors are one line; exit codes: 0 ok, 1 not found / refused
/ the followed run failed, 2 usage or configuration, 3 Redis, Kubernetes or the
server unavailable.
"""

from __future__ import annotations

import getpass
import json
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.table import Table

from broker.core.errors import Permanent, StoreUnavailable, Transient
from broker.services.oncall import Actor, NoCluster, NotFound, Refused, epoch, span

COLOURS = {"success": "green", "failed": "red", "canceled": "yellow", "running": "cyan", "pending": "bright_black",
           "accepted": "green", "ignored": "bright_black", "queued": "cyan"}
FINAL = {"success", "failed", "canceled"}
DEPLOY_DONE = {"deploy_succeeded", "deploy_failed", "deploy_refused"}

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="Routing file (default: $CIBROKER_CONFIG, else the embedded defaults).")
]
ServerOption = Annotated[str | None, typer.Option("--server", envvar="CIBROKER_SERVER",
                                                  help="Talk to this broker's API instead of Redis and the cluster.")]
TokenOption = Annotated[str | None, typer.Option("--token", envvar="CIBROKER_API_TOKEN", show_default=False,
                                                 help="Bearer token for --server (default: $CIBROKER_API_TOKEN).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _out() -> Console:
    return Console(highlight=False, soft_wrap=True)


def table(columns: list[str], rows: list[list[str]], *, state_column: str | None = None) -> None:
    """A coloured table on a terminal; aligned plain text otherwise (stable for grep and awk)."""
    console = _out()
    if console.is_terminal:
        t = Table(*columns, header_style="bold", box=None, pad_edge=False)
        index = columns.index(state_column) if state_column in columns else None
        for row in rows:
            cells = list(row)
            if index is not None and cells[index] in COLOURS:
                cells[index] = f"[{COLOURS[cells[index]]}]{cells[index]}[/]"
            t.add_row(*cells)
        console.print(t)
        return
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
    for row in [columns, *rows]:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def age(iso_time: str | None, *, now: float) -> str:
    then = epoch(iso_time)
    return "-" if then is None else seconds(now - then)


seconds = span


class Backend:
    """Builds the service once per command: local Operations, or the API client for --server."""

    def __init__(self, *, config: Path | None, server: str | None, token: str | None,
                 settings_for: Callable[[Path | None], Any], with_store: Callable[[Any], Any]) -> None:
        self.actor = Actor(who=f"{getpass.getuser()}@{socket.gethostname()}", channel="cli")
        if server is not None:
            from broker.cli.remote import ApiClient

            self.service: Any = ApiClient(server, token=token, actor=self.actor.who)
            return
        from broker.logging import configure
        from broker import bootstrap

        settings = settings_for(config)
        # "error": a refused action is already the one line `errors()` prints; its warning log line is for servers.
        configure(fmt=settings.env.log_format, level="error")
        settings, _ = with_store(settings)
        self.service = bootstrap.operations(settings)


@contextmanager
def errors() -> Iterator[None]:
    """Service errors as one line and an exit code."""
    try:
        yield
    except (NotFound, Refused) as exc:
        typer.echo(f"cibroker: {exc}", err=True)
        raise typer.Exit(1) from None
    except NoCluster as exc:
        typer.echo(f"cibroker: {exc}", err=True)
        raise typer.Exit(3) from None
    except Permanent as exc:
        typer.echo(f"cibroker: {exc}", err=True)
        raise typer.Exit(2) from None
    except (StoreUnavailable, Transient) as exc:
        typer.echo(f"cibroker: {exc}", err=True)
        raise typer.Exit(3) from None


def register(app: typer.Typer, *, settings_for: Callable[[Path | None], Any], with_store: Callable[[Any], Any],
             deliveries_app: typer.Typer) -> None:
    """Add the on-call verbs to the `cibroker` app."""
    runs_app = typer.Typer(no_args_is_help=True, help="Look at PipelineRuns made by cibroker.")
    app.add_typer(runs_app, name="runs")

    def backend(config: Path | None, server: str | None, token: str | None) -> Backend:
        return Backend(config=config, server=server, token=token, settings_for=settings_for, with_store=with_store)

    # ---- deliveries ------------------------------------------------------------------------

    @deliveries_app.command("list")
    def deliveries_list(
        config: ConfigOption = None, repo: Annotated[str | None, typer.Option(help="Only this repo (group/project).")] = None,
        state: Annotated[str | None, typer.Option(help="Only this state or decision (accepted, ignored, queued...).")] = None,
        limit: Annotated[int, typer.Option(min=1, max=1000)] = 30, server: ServerOption = None, token: TokenOption = None,
        as_json: JsonOption = False,
    ) -> None:
        """Recent deliveries, newest first."""
        with errors():
            found = backend(config, server, token).service.deliveries(limit=limit, repo=repo, state=state)
        if as_json:
            typer.echo(json.dumps(found, indent=2))
            return
        now = time.time()
        rows = []
        for d in found:
            push = d.get("push") or {}
            rows.append([d["delivery_id"], age(d["received_at"], now=now), d["host"], push.get("repo", "-"), push.get("name", "-"),
                         (push.get("sha") or "-")[:8], d["decision"], d.get("state", ""), d["reason"][:60]])
        table(["DELIVERY", "AGE", "HOST", "REPO", "REF", "SHA", "DECISION", "STATE", "REASON"], rows, state_column="DECISION")

    @deliveries_app.command("show")
    def deliveries_show(
        delivery_id: Annotated[str, typer.Argument(help="Delivery id (from the webhook answer).")],
        config: ConfigOption = None, server: ServerOption = None, token: TokenOption = None,
        as_json: Annotated[bool, typer.Option("--json", help="The stored record as JSON.")] = False,
    ) -> None:
        """A delivery's decision log: received, each decision and why, runs, statuses, deploys."""
        with errors():
            found = backend(config, server, token).service.delivery(delivery_id)
        if as_json:
            typer.echo(json.dumps(found, indent=2))
            return
        print_delivery(found)

    # ---- runs --------------------------------------------------------------------------------

    @runs_app.command("list")
    def runs_list(
        config: ConfigOption = None, repo: Annotated[str | None, typer.Option(help="Only this repo.")] = None,
        state: Annotated[str | None, typer.Option(help="pending, running, success, failed or canceled.")] = None,
        route: Annotated[str | None, typer.Option(help="Only this route.")] = None,
        limit: Annotated[int, typer.Option(min=1, max=1000)] = 30, server: ServerOption = None, token: TokenOption = None,
        as_json: JsonOption = False,
    ) -> None:
        """PipelineRuns made by cibroker, newest first, in every routed namespace."""
        with errors():
            found = backend(config, server, token).service.runs(repo=repo, state=state, route=route, limit=limit)
        if as_json:
            typer.echo(json.dumps(found, indent=2))
            return
        now = time.time()
        rows = [[r["run"], "unreadable" if r["unreadable"] else r["state"], r["route"] or "-", r["repo"] or "-",
                 r["ref_name"] or "-", r["sha"][:8] or "-", str(r["attempt"]), age(r["created"], now=now),
                 seconds(r["duration_seconds"])] for r in found]
        table(["RUN", "STATE", "ROUTE", "REPO", "REF", "SHA", "#", "AGE", "DURATION"], rows, state_column="STATE")
        for r in found:  # on stderr, so the table stays one row per run for grep and awk
            if r["unreadable"]:
                typer.echo(f"cibroker: {r['run']} is unreadable ({r['state']} in Tekton): {r['unreadable']}", err=True)

    @runs_app.command("show")
    def runs_show(
        run: Annotated[str, typer.Argument(help="namespace/name, or a name (looked up in every routed namespace).")],
        config: ConfigOption = None, server: ServerOption = None, token: TokenOption = None, as_json: JsonOption = False,
    ) -> None:
        """One run: TaskRuns with states and durations, the failing task and why, how to read its logs."""
        with errors():
            found = backend(config, server, token).service.run(run)
        if as_json:
            typer.echo(json.dumps(found, indent=2))
            return
        print_run(found)

    # ---- actions -----------------------------------------------------------------------------

    @app.command()
    def rerun(
        delivery: Annotated[str | None, typer.Option("--delivery", help="Re-run this delivery's commit and routes.")] = None,
        run: Annotated[str | None, typer.Option("--run", help="Re-run this PipelineRun's commit and route.")] = None,
        repo: Annotated[str | None, typer.Option(help="With --sha or --ref.")] = None,
        sha: Annotated[str | None, typer.Option(help="Re-run this commit (as built before).")] = None,
        ref: Annotated[str | None, typer.Option(help="Build the current head of this branch (or tag), read with git ls-remote.")] = None,
        route: Annotated[str | None, typer.Option(help="Only this route.")] = None,
        deploy_only: Annotated[bool, typer.Option("--deploy-only", help="Only the deploy stage of an already built commit.")] = False,
        force: Annotated[bool, typer.Option("--force", help="With --deploy-only: skip the ancestry guard (deploy even a commit "
                                                            "older than the one running, e.g. a rollback); needs --reason.")] = False,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what would be created; change nothing.")] = False,
        follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream progress until the end.")] = False,
        reason: Annotated[str, typer.Option(help="Why (kept in the audit log and the decision log).")] = "",
        timeout: Annotated[int, typer.Option(help="Seconds --follow waits before giving up.")] = 3600,
        config: ConfigOption = None, server: ServerOption = None, token: TokenOption = None, as_json: JsonOption = False,
    ) -> None:
        """Run a commit again: a new PipelineRun (attempt + 1) for the same commit and route, or only its deploy."""
        if sum(x is not None for x in (delivery, run, repo)) != 1 or (repo is not None and (sha is None) == (ref is None)):
            typer.echo("cibroker: give one of --delivery ID, --run RUN, --repo R --sha SHA, --repo R --ref REF", err=True)
            raise typer.Exit(2)
        if force and not deploy_only:
            typer.echo("cibroker: --force goes with --deploy-only only (it skips the deploy's ancestry guard)", err=True)
            raise typer.Exit(2)
        b = backend(config, server, token)
        with errors():
            plan = b.service.rerun(actor=b.actor, reason=reason, delivery_id=delivery, run=run, repo=repo, sha=sha, ref=ref,
                                   route=route, deploy_only=deploy_only, force=force, dry_run=dry_run)
        if as_json and not follow:
            typer.echo(json.dumps(plan, indent=2))
            return
        print_plan(plan)
        if follow and not dry_run:
            outcome = follow_up(b.service, plan, timeout=timeout)
            raise typer.Exit(0 if outcome == "success" else 1)

    @app.command()
    def cancel(
        run: Annotated[str, typer.Argument(help="namespace/name, or a name.")],
        reason: Annotated[str, typer.Option(help="Why (shown on the commit status and kept in the audit log).")] = "",
        wait: Annotated[bool, typer.Option("--wait", help="Wait until the run has stopped (exit 0 when canceled).")] = False,
        timeout: Annotated[int, typer.Option(help="Seconds --wait waits before giving up.")] = 600,
        config: ConfigOption = None, server: ServerOption = None, token: TokenOption = None, as_json: JsonOption = False,
    ) -> None:
        """Request the cancel of a run in progress; a worker stops it, and its commit status becomes `canceled` with who and why."""
        b = backend(config, server, token)
        with errors():
            done = b.service.cancel(run, actor=b.actor, reason=reason)
        if as_json and not wait:
            typer.echo(json.dumps(done, indent=2))
            return
        if not as_json:
            typer.echo(f"cancel of {done['run']} requested (request {done['request_id']}): queued for a worker, which sets "
                       f"spec.status {done['spec_status']}; the watcher then reports it as canceled")
        if wait:
            with errors():
                state = wait_for_end(b.service, done["run"], timeout=timeout)
            if as_json:
                typer.echo(json.dumps({**done, "final_state": state}, indent=2))
            else:
                typer.echo(f"{done['run']}: {state}" if state != "timeout" else
                           f"cibroker: gave up waiting after {timeout} s; the cancel is still queued (cibroker runs show {done['run']})")
            raise typer.Exit(0 if state == "canceled" else 1)

    @app.command()
    def audit(
        limit: Annotated[int, typer.Option(min=1, max=1000)] = 50, config: ConfigOption = None, server: ServerOption = None,
        token: TokenOption = None, as_json: JsonOption = False,
    ) -> None:
        """Who re-ran or cancelled what, when and why."""
        with errors():
            entries = backend(config, server, token).service.audit_log(limit=limit)
        if as_json:
            typer.echo(json.dumps(entries, indent=2))
            return
        table(["WHEN", "WHO", "VIA", "ACTION", "TARGET", "REASON", "RESULT"],
              [[e["at"], e["who"], e["channel"], e["action"], e["target"], e["reason"], e["result"]] for e in entries])

    @app.command()
    def explain(
        payload: Annotated[Path, typer.Argument(help="A captured webhook body (JSON).")],
        headers: Annotated[Path | None, typer.Option(help="The request's headers as a JSON object (else guessed from the payload).")] = None,
        host: Annotated[str | None, typer.Option(help="Host id from the routing file (else guessed).")] = None,
        check: Annotated[bool, typer.Option("--check", help="Exit 1 unless the payload would be accepted (for CI).")] = False,
        config: ConfigOption = None, as_json: JsonOption = False,
    ) -> None:
        """The whole decision path for a payload, with no side effects: auth, route, commit, image, PipelineRun YAML."""
        from broker.services.explain import explain as run_explain

        settings = settings_for(config)
        try:
            body = payload.read_bytes()
            given = json.loads(headers.read_text(encoding="utf-8")) if headers else None
        except (OSError, ValueError) as exc:
            typer.echo(f"cibroker: cannot read input: {exc}", err=True)
            raise typer.Exit(2) from None
        if given is not None and not (isinstance(given, dict) and all(isinstance(v, str) for v in given.values())):
            typer.echo("cibroker: --headers must be a JSON object of strings", err=True)
            raise typer.Exit(2)
        with errors():
            report = run_explain(settings, body=body, headers=given, host_id=host)
        if as_json:
            typer.echo(json.dumps(report, indent=2))
        else:
            print_explain(report)
        if check and report["decision"] != "accepted":
            raise typer.Exit(1)


# ---- printing ------------------------------------------------------------------------------


def _state(text: str) -> str:
    console = _out()
    return f"[{COLOURS[text]}]{text}[/]" if console.is_terminal and text in COLOURS else text


def _print(line: str) -> None:
    console = _out()
    if console.is_terminal:
        console.print(line)
    else:
        typer.echo(line)


def wait_for_end(service: Any, run: str, *, timeout: int, poll: float = 1.0) -> str:
    """Poll a run until Tekton says it ended; its final state, or "timeout"."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = service.run(run)["state"]
        if state in FINAL:
            return state
        time.sleep(poll)
    return "timeout"


def print_delivery(found: dict[str, Any]) -> None:
    push = found.get("push") or {}
    _print(f"delivery {found['delivery_id']}  {_state(found['decision'])}  state={found['state']}")
    _print(f"  host {found['host']} ({found['host_kind']})  event {found['event']!r}  received {found['received_at']}")
    if push:
        _print(f"  {push['repo']}  {push['kind']} {push['name']}  sha {push['sha']}")
    if found.get("identity"):
        _print(f"  delivery identity: {found['identity']['source']} {found['identity']['value']}")
    _print(f"  reason: {found['reason']}")
    if found.get("duplicates"):
        _print(f"  duplicates received: {found['duplicates']}")
    for entry in found["log"]:
        extra = f"  [{entry['answer']}]" if "answer" in entry else ""
        _print(f"  {entry['at']}  {entry['step']:<17} {entry['detail']}{extra}")
        if entry.get("pipelinerun"):  # a dry run recorded the object it would have created
            typer.echo("    " + yaml.safe_dump(entry["pipelinerun"], sort_keys=False).rstrip().replace("\n", "\n    "))
    runs = found.get("runs")
    if runs:
        _print("  runs:")
        for r in runs:
            unreadable = f"  unreadable: {r['unreadable']}" if r.get("unreadable") else ""
            _print(f"    {r['run']}  {_state(r['state'])}  {r['reason']}{unreadable}  (cibroker runs show {r['run']})")
    elif runs is None and found["decision"] == "accepted":
        _print("  runs: not shown (no cluster configured here)")


def print_run(r: dict[str, Any]) -> None:
    _print(f"run {r['run']}  {_state(r['state'])}  {r['reason']}")
    if r.get("unreadable"):
        _print(f"  unreadable: {r['unreadable']} (what its labels say below is not trusted; nothing is re-run or deployed from it)")
    _print(f"  {r['repo']}  {r['ref']}  sha {r['sha']}  attempt {r['attempt']}  route {r['route']}")
    _print(f"  image {r['image']}   delivery {r['delivery_id']} (cibroker deliveries show {r['delivery_id']})")
    _print(f"  started {r['started'] or '-'}  finished {r['finished'] or '-'}  duration {seconds(r['duration_seconds'])}")
    _print(f"  commit status: {r['description']}")
    if r.get("superseded_by"):
        _print(f"  superseded by {r['superseded_by']}")
    if r.get("cancelled_by"):
        _print(f"  cancelled by {r['cancelled_by']}")
    if r["taskruns"]:
        table(["TASK", "STATE", "REASON", "DURATION", "POD", "FAILED STEP"],
              [[t["task"], t["state"], t["reason"], seconds(t["duration_seconds"]), t["pod"] or "-", t["failed_step"] or "-"]
               for t in r["taskruns"]], state_column="STATE")
    if r.get("failing"):
        f = r["failing"]
        _print(f"  failing task: {f['task']} ({f['reason']}): {f['message']}")
    if r.get("statuses"):
        _print("  statuses reported: " + ", ".join(f"{k}={v}" for k, v in sorted(r["statuses"].items())))
    _print("  logs:")
    for command in r["logs"]:
        _print(f"    {command}")


def print_plan(plan: dict[str, Any]) -> None:
    verb = "would queue" if plan["dry_run"] else "queued"
    if plan["action"] == "redeploy":
        forced = " (forced: no ancestry check)" if plan.get("force") else " (the ancestry guard applies; --force skips it)"
        _print(f"{verb} {plan['of']} to {', '.join(plan['environments'])}"
               + (f" (re-deploy #{plan['attempt']})" if plan.get("attempt") else "") + forced)
        for request_id in plan.get("requests") or []:
            _print(f"  signed request {request_id}")
        return
    _print(f"{verb} a re-run of {plan['of']}: {plan['repo']} {plan['ref']} {plan['sha'][:12]}, attempt {plan['attempt']}")
    if plan.get("delivery_id"):
        _print(f"  delivery {plan['delivery_id']}  (cibroker deliveries show {plan['delivery_id']})")
    for name in plan["runs"]:
        _print(f"  PipelineRun {name}")
    if plan["dry_run"]:
        for body in plan.get("pipelineruns", []):
            typer.echo("---")
            typer.echo(yaml.safe_dump(body, sort_keys=False).rstrip())


def print_explain(report: dict[str, Any]) -> None:
    _print(f"host {report['host']}: {_state(report['decision'])}"
           + (f"  (headers guessed: {', '.join(report['headers_guessed'])})" if report["headers_guessed"] else ""))
    for step in report["steps"]:
        _print(f"  {step['step']:<12} {step['result']:<12} {step['detail']}")
    for run in report.get("runs", []):
        _print(f"route {run['route']}: commit {run['commit']}")
        if run.get("commit_note"):
            _print(f"  {run['commit_note']}")
        if run.get("error"):
            _print(f"  {run['error']}")
            continue
        _print(f"  image {run['image']}   deploy: {', '.join(run['deploy']) or 'none'}")
        typer.echo("---")
        typer.echo(yaml.safe_dump(run["pipelinerun"], sort_keys=False).rstrip())


def follow_up(service: Any, plan: dict[str, Any], *, timeout: int, poll: float = 1.0) -> str:
    """Stream a re-run's decision log and run states until it ends; returns the final outcome."""
    console = _out()
    deadline = time.monotonic() + timeout
    if plan["action"] == "redeploy":
        delivery_id = service.run(plan["run"])["delivery_id"]
        wanted_deploys = len(plan["environments"])
    else:
        delivery_id = plan["delivery_id"]
        wanted_deploys = -1  # known once the runs succeed
    seen_log = len(service.delivery(delivery_id)["log"]) if plan["action"] == "redeploy" else 0
    states: dict[str, str] = {}
    deploys: list[str] = []
    status_line = console.status("waiting for a worker...") if console.is_terminal else None
    if status_line is not None:
        status_line.start()
    try:
        while time.monotonic() < deadline:
            found = service.delivery(delivery_id)
            for entry in found["log"][seen_log:]:
                _print(f"  {entry['at']}  {entry['step']:<17} {entry['detail']}")
                if entry["step"] in DEPLOY_DONE:
                    deploys.append(entry["step"])
            seen_log = len(found["log"])
            runs = found.get("runs") or []
            for r in runs:
                if states.get(r["run"]) != r["state"]:
                    states[r["run"]] = r["state"]
                    _print(f"  run {r['run']}: {_state(r['state'])} {r['reason']}")
            if status_line is not None:
                summary = ", ".join(f"{name.split('/')[-1]} {state}" for name, state in states.items()) or "waiting for a worker"
                status_line.update(summary)
            if plan["action"] == "redeploy":
                if len(deploys) >= wanted_deploys:
                    return "success" if all(d == "deploy_succeeded" for d in deploys) else "failed"
            elif runs and all(r["state"] in FINAL and r["reported"] == r["state"] for r in runs):
                expected = sum(len(json.loads(r["deploy"] or "[]")) for r in runs if r["state"] == "success")
                if len(deploys) >= expected:
                    if all(r["state"] == "success" for r in runs) and all(d == "deploy_succeeded" for d in deploys):
                        return "success"
                    return "failed"
            elif found["state"] == "failed" or any(e["step"] == "failed" for e in found["log"]):
                return "failed"
            time.sleep(poll)
    finally:
        if status_line is not None:
            status_line.stop()
    typer.echo(f"cibroker: gave up following after {timeout} s; the run goes on (cibroker deliveries show {delivery_id})",
               err=True)
    return "timeout"

