"""What a PipelineRun's state means for the commit, and what may be reported next.

Pure. Tekton's Succeeded condition maps to a commit state; a description names the
failing task and reason. Reports only move forward: pending < running < a final
state, and a final state is never replaced, so a late `running` never overwrites
`success` (on GitHub, which has no state machine, that would show a lie).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from broker.core.runlabels import A_CANCEL_REASON, A_CANCELLED_BY, A_SUPERSEDED_BY
from broker.core.status import CommitState

SUCCESS_REASONS = {"Succeeded", "Completed"}
CANCEL_REASONS = {"Cancelled", "CancelledRunFinally", "StoppedRunFinally", "PipelineRunCancelled"}
TIMEOUT_REASONS = {"PipelineRunTimeout"}
PENDING_REASONS = {"PipelineRunPending", "ResolvingPipelineRef"}
FINAL = {CommitState.SUCCESS, CommitState.FAILED, CommitState.CANCELED}
RANK = {None: 0, CommitState.PENDING: 1, CommitState.RUNNING: 2, CommitState.SUCCESS: 3, CommitState.FAILED: 3, CommitState.CANCELED: 3}


def succeeded_condition(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if isinstance(cond, Mapping) and cond.get("type") == "Succeeded":
            return cond
    return None


def run_state(pipelinerun: Mapping[str, Any]) -> CommitState:
    """The commit state a PipelineRun stands for right now."""
    cond = succeeded_condition(pipelinerun)
    if cond is None:
        return CommitState.PENDING
    status, reason = cond.get("status"), cond.get("reason", "")
    if status == "True":
        return CommitState.SUCCESS
    if status == "False":
        return CommitState.CANCELED if reason in CANCEL_REASONS else CommitState.FAILED
    return CommitState.PENDING if reason in PENDING_REASONS else CommitState.RUNNING


def describe(pipelinerun: Mapping[str, Any], *, taskruns: list[Mapping[str, Any]] = (), pipeline: str = "") -> str:  # type: ignore[assignment]
    """One line for the commit status: what happened, and for failures which task and why."""
    state = run_state(pipelinerun)
    cond = succeeded_condition(pipelinerun) or {}
    reason, message = str(cond.get("reason", "")), str(cond.get("message", "")).strip()
    label = pipeline or "pipeline"
    if state is CommitState.PENDING:
        return f"{label}: queued"
    if state is CommitState.RUNNING:
        return f"{label}: running"
    if state is CommitState.SUCCESS:
        return f"{label}: succeeded"
    if state is CommitState.CANCELED:
        annotations = (pipelinerun.get("metadata") or {}).get("annotations") or {}
        superseded = annotations.get(A_SUPERSEDED_BY)
        if superseded:
            return f"{label}: canceled, superseded by {superseded}"
        by, why = annotations.get(A_CANCELLED_BY), annotations.get(A_CANCEL_REASON)
        if by:
            return f"{label}: canceled by {by}" + (f": {why}" if why else "")
        return f"{label}: canceled ({reason})"
    failing = failing_task(taskruns)
    if reason in TIMEOUT_REASONS:
        return f"{label}: timed out" + (f" in task {failing[0]}" if failing else "")
    if failing:
        task, task_reason, task_message = failing
        return f"{label}: task {task} failed ({task_reason}): {task_message}"[:250]
    return f"{label}: failed ({reason}): {message}"[:250]


def failing_task(taskruns: list[Mapping[str, Any]]) -> tuple[str, str, str] | None:
    """(pipeline task name, reason, message) of the first failed TaskRun, if any."""
    for tr in taskruns:
        cond = succeeded_condition(tr)
        if cond and cond.get("status") == "False":
            labels = (tr.get("metadata") or {}).get("labels") or {}
            task = labels.get("tekton.dev/pipelineTask") or (tr.get("metadata") or {}).get("name", "?")
            return str(task), str(cond.get("reason", "")), str(cond.get("message", "")).strip()
    return None


def is_final(state: CommitState | None) -> bool:
    return state in FINAL


def should_report(last: CommitState | None, new: CommitState) -> bool:
    """True when `new` moves the commit forward from what was last reported."""
    return RANK[new] > RANK[last]


def parse_state(value: str | None) -> CommitState | None:
    try:
        return CommitState(value) if value else None
    except ValueError:
        return None
