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

from broker.core.errors import Permanent, StoreUnavailable, Transient
from broker.cli.output import age, terminal, print_delivery, say, state_text, print_explain, print_plan, print_run, seconds, table
from broker.services.oncall import Actor, NoCluster, NotFound, Refused

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


_WIRING: dict[str, Callable[..., Any]] = {}  # the CLI's settings_for and with_store, set by register()


def _backend(config: Path | None, server: str | None, token: str | None) -> Backend:
    return Backend(config=config, server=server, token=token, settings_for=_WIRING["settings_for"],
                   with_store=_WIRING["with_store"])


# ---- deliveries ------------------------------------------------------------------------

def deliveries_list(
    config: ConfigOption = None, repo: Annotated[str | None, typer.Option(help="Only this repo (group/project).")] = None,
    state: Annotated[str | None, typer.Option(help="Only this state or decision (accepted, ignored, queued...).")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 30, server: ServerOption = None, token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Recent deliveries, newest first."""
    with errors():
        found = _backend(config, server, token).service.deliveries(limit=limit, repo=repo, state=state)
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

def deliveries_show(
    delivery_id: Annotated[str, typer.Argument(help="Delivery id (from the webhook answer).")],
    config: ConfigOption = None, server: ServerOption = None, token: TokenOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="The stored record as JSON.")] = False,
) -> None:
    """A delivery's decision log: received, each decision and why, runs, statuses, deploys."""
    with errors():
        found = _backend(config, server, token).service.delivery(delivery_id)
    if as_json:
        typer.echo(json.dumps(found, indent=2))
        return
    print_delivery(found)

# ---- runs --------------------------------------------------------------------------------

def runs_list(
    config: ConfigOption = None, repo: Annotated[str | None, typer.Option(help="Only this repo.")] = None,
    state: Annotated[str | None, typer.Option(help="pending, running, success, failed or canceled.")] = None,
    route: Annotated[str | None, typer.Option(help="Only this route.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 30, server: ServerOption = None, token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """PipelineRuns made by cibroker, newest first, in every routed namespace."""
    with errors():
        found = _backend(config, server, token).service.runs(repo=repo, state=state, route=route, limit=limit)
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

def runs_show(
    run: Annotated[str, typer.Argument(help="namespace/name, or a name (looked up in every routed namespace).")],
    config: ConfigOption = None, server: ServerOption = None, token: TokenOption = None, as_json: JsonOption = False,
) -> None:
    """One run: TaskRuns with states and durations, the failing task and why, how to read its logs."""
    with errors():
        found = _backend(config, server, token).service.run(run)
    if as_json:
        typer.echo(json.dumps(found, indent=2))
        return
    print_run(found)

# ---- actions -----------------------------------------------------------------------------

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
    b = _backend(config, server, token)
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

def cancel(
    run: Annotated[str, typer.Argument(help="namespace/name, or a name.")],
    reason: Annotated[str, typer.Option(help="Why (shown on the commit status and kept in the audit log).")] = "",
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the run has stopped (exit 0 when canceled).")] = False,
    timeout: Annotated[int, typer.Option(help="Seconds --wait waits before giving up.")] = 600,
    config: ConfigOption = None, server: ServerOption = None, token: TokenOption = None, as_json: JsonOption = False,
) -> None:
    """Request the cancel of a run in progress; a worker stops it, and its commit status becomes `canceled` with who and why."""
    b = _backend(config, server, token)
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

def audit(
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 50, config: ConfigOption = None, server: ServerOption = None,
    token: TokenOption = None, as_json: JsonOption = False,
) -> None:
    """Who re-ran or cancelled what, when and why."""
    with errors():
        entries = _backend(config, server, token).service.audit_log(limit=limit)
    if as_json:
        typer.echo(json.dumps(entries, indent=2))
        return
    table(["WHEN", "WHO", "VIA", "ACTION", "TARGET", "REASON", "RESULT"],
          [[e["at"], e["who"], e["channel"], e["action"], e["target"], e["reason"], e["result"]] for e in entries])

def explain(
    payload: Annotated[Path, typer.Argument(help="A captured webhook body (JSON).")],
    headers: Annotated[Path | None, typer.Option(help="The request's headers as a JSON object (else guessed from the payload).")] = None,
    host: Annotated[str | None, typer.Option(help="Host id from the routing file (else guessed).")] = None,
    check: Annotated[bool, typer.Option("--check", help="Exit 1 unless the payload would be accepted (for CI).")] = False,
    config: ConfigOption = None, as_json: JsonOption = False,
) -> None:
    """The whole decision path for a payload, with no side effects: auth, route, commit, image, PipelineRun YAML."""
    from broker.services.explain import explain as run_explain

    settings = _WIRING["settings_for"](config)
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


def register(app: typer.Typer, *, settings_for: Callable[[Path | None], Any], with_store: Callable[[Any], Any],
             deliveries_app: typer.Typer) -> None:
    """Add the on-call verbs to the `cibroker` app; `settings_for` and `with_store` are the CLI's own start-up steps."""
    _WIRING.update(settings_for=settings_for, with_store=with_store)
    runs_app = typer.Typer(no_args_is_help=True, help="Look at PipelineRuns made by cibroker.")
    app.add_typer(runs_app, name="runs")
    apps = {"app": app, "deliveries_app": deliveries_app, "runs_app": runs_app}
    apps['deliveries_app'].command("list")(deliveries_list)
    apps['deliveries_app'].command("show")(deliveries_show)
    apps['runs_app'].command("list")(runs_list)
    apps['runs_app'].command("show")(runs_show)
    apps['app'].command()(rerun)
    apps['app'].command()(cancel)
    apps['app'].command()(audit)
    apps['app'].command()(explain)




def wait_for_end(service: Any, run: str, *, timeout: int, poll: float = 1.0) -> str:
    """Poll a run until Tekton says it ended; its final state, or "timeout"."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = service.run(run)["state"]
        if state in FINAL:
            return state
        time.sleep(poll)
    return "timeout"


def follow_up(service: Any, plan: dict[str, Any], *, timeout: int, poll: float = 1.0) -> str:
    """Stream a re-run's decision log and run states until it ends; returns the final outcome."""
    console = terminal()
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
                say(f"  {entry['at']}  {entry['step']:<17} {entry['detail']}")
                if entry["step"] in DEPLOY_DONE:
                    deploys.append(entry["step"])
            seen_log = len(found["log"])
            runs = found.get("runs") or []
            for r in runs:
                if states.get(r["run"]) != r["state"]:
                    states[r["run"]] = r["state"]
                    say(f"  run {r['run']}: {state_text(r['state'])} {r['reason']}")
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

