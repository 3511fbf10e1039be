"""How the CLI prints: coloured tables on a terminal, plain aligned text when piped (stable for grep and awk)."""

from __future__ import annotations

from typing import Any

import typer
import yaml
from rich.console import Console
from rich.table import Table

from broker.services.oncall import epoch, span

COLOURS = {"success": "green", "failed": "red", "canceled": "yellow", "running": "cyan", "pending": "bright_black",
           "accepted": "green", "ignored": "bright_black", "queued": "cyan"}


def terminal() -> Console:
    return Console(highlight=False, soft_wrap=True)


def table(columns: list[str], rows: list[list[str]], *, state_column: str | None = None) -> None:
    """A coloured table on a terminal; aligned plain text otherwise (stable for grep and awk)."""
    console = terminal()
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


def state_text(text: str) -> str:
    console = terminal()
    return f"[{COLOURS[text]}]{text}[/]" if console.is_terminal and text in COLOURS else text


def say(line: str) -> None:
    console = terminal()
    if console.is_terminal:
        console.print(line)
    else:
        typer.echo(line)


def print_delivery(found: dict[str, Any]) -> None:
    push = found.get("push") or {}
    say(f"delivery {found['delivery_id']}  {state_text(found['decision'])}  state={found['state']}")
    say(f"  host {found['host']} ({found['host_kind']})  event {found['event']!r}  received {found['received_at']}")
    if push:
        say(f"  {push['repo']}  {push['kind']} {push['name']}  sha {push['sha']}")
    if found.get("identity"):
        say(f"  delivery identity: {found['identity']['source']} {found['identity']['value']}")
    say(f"  reason: {found['reason']}")
    if found.get("duplicates"):
        say(f"  duplicates received: {found['duplicates']}")
    for entry in found["log"]:
        extra = f"  [{entry['answer']}]" if "answer" in entry else ""
        say(f"  {entry['at']}  {entry['step']:<17} {entry['detail']}{extra}")
        if entry.get("pipelinerun"):  # a dry run recorded the object it would have created
            typer.echo("    " + yaml.safe_dump(entry["pipelinerun"], sort_keys=False).rstrip().replace("\n", "\n    "))
    runs = found.get("runs")
    if runs:
        say("  runs:")
        for r in runs:
            unreadable = f"  unreadable: {r['unreadable']}" if r.get("unreadable") else ""
            say(f"    {r['run']}  {state_text(r['state'])}  {r['reason']}{unreadable}  (cibroker runs show {r['run']})")
    elif runs is None and found["decision"] == "accepted":
        say("  runs: not shown (no cluster configured here)")


def print_run(r: dict[str, Any]) -> None:
    say(f"run {r['run']}  {state_text(r['state'])}  {r['reason']}")
    if r.get("unreadable"):
        say(f"  unreadable: {r['unreadable']} (what its labels say below is not trusted; nothing is re-run or deployed from it)")
    say(f"  {r['repo']}  {r['ref']}  sha {r['sha']}  attempt {r['attempt']}  route {r['route']}")
    say(f"  image {r['image']}   delivery {r['delivery_id']} (cibroker deliveries show {r['delivery_id']})")
    say(f"  started {r['started'] or '-'}  finished {r['finished'] or '-'}  duration {seconds(r['duration_seconds'])}")
    say(f"  commit status: {r['description']}")
    if r.get("superseded_by"):
        say(f"  superseded by {r['superseded_by']}")
    if r.get("cancelled_by"):
        say(f"  cancelled by {r['cancelled_by']}")
    if r["taskruns"]:
        table(["TASK", "STATE", "REASON", "DURATION", "POD", "FAILED STEP"],
              [[t["task"], t["state"], t["reason"], seconds(t["duration_seconds"]), t["pod"] or "-", t["failed_step"] or "-"]
               for t in r["taskruns"]], state_column="STATE")
    if r.get("failing"):
        f = r["failing"]
        say(f"  failing task: {f['task']} ({f['reason']}): {f['message']}")
    if r.get("statuses"):
        say("  statuses reported: " + ", ".join(f"{k}={v}" for k, v in sorted(r["statuses"].items())))
    say("  logs:")
    for command in r["logs"]:
        say(f"    {command}")


def print_plan(plan: dict[str, Any]) -> None:
    verb = "would queue" if plan["dry_run"] else "queued"
    if plan["action"] == "redeploy":
        forced = " (forced: no ancestry check)" if plan.get("force") else " (the ancestry guard applies; --force skips it)"
        say(f"{verb} {plan['of']} to {', '.join(plan['environments'])}"
               + (f" (re-deploy #{plan['attempt']})" if plan.get("attempt") else "") + forced)
        for request_id in plan.get("requests") or []:
            say(f"  signed request {request_id}")
        return
    say(f"{verb} a re-run of {plan['of']}: {plan['repo']} {plan['ref']} {plan['sha'][:12]}, attempt {plan['attempt']}")
    if plan.get("delivery_id"):
        say(f"  delivery {plan['delivery_id']}  (cibroker deliveries show {plan['delivery_id']})")
    for name in plan["runs"]:
        say(f"  PipelineRun {name}")
    if plan["dry_run"]:
        for body in plan.get("pipelineruns", []):
            typer.echo("---")
            typer.echo(yaml.safe_dump(body, sort_keys=False).rstrip())


def print_explain(report: dict[str, Any]) -> None:
    say(f"host {report['host']}: {state_text(report['decision'])}"
           + (f"  (headers guessed: {', '.join(report['headers_guessed'])})" if report["headers_guessed"] else ""))
    for step in report["steps"]:
        say(f"  {step['step']:<12} {step['result']:<12} {step['detail']}")
    for run in report.get("runs", []):
        say(f"route {run['route']}: commit {run['commit']}")
        if run.get("commit_note"):
            say(f"  {run['commit_note']}")
        if run.get("error"):
            say(f"  {run['error']}")
            continue
        say(f"  image {run['image']}   deploy: {', '.join(run['deploy']) or 'none'}")
        typer.echo("---")
        typer.echo(yaml.safe_dump(run["pipelinerun"], sort_keys=False).rstrip())
