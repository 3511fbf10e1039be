"""Tekton conditions to commit states, failure descriptions, and reports that only move forward."""

from __future__ import annotations

import json

import pytest
import yaml

from broker.core.status import CommitState
from broker.core.reporting import describe, run_state, should_report
from tests.support import CORPUS

TEKTON = CORPUS / "tekton"
REASONS = json.loads((TEKTON / "reasons-v1.json").read_text())


def load(name: str) -> dict:
    text = (TEKTON / name).read_text()
    return json.loads(text) if name.endswith(".json") else yaml.safe_load(text)


def with_condition(status: str, reason: str, message: str = "") -> dict:
    return {"status": {"conditions": [{"type": "Succeeded", "status": status, "reason": reason, "message": message}]}}


@pytest.mark.parametrize(
    ("fixture", "state"),
    [
        ("pipelinerun-running-remote-resolver.json", CommitState.RUNNING),
        ("pipelinerun-v1-running-before-failure.yaml", CommitState.RUNNING),
        ("pipelinerun-v1-running-customrun-childref.yaml", CommitState.RUNNING),
        ("pipelinerun-v1-succeeded-childrefs.json", CommitState.SUCCESS),
        ("pipelinerun-succeeded-embedded-taskruns.json", CommitState.SUCCESS),
        ("pipelinerun-v1-failed-task-failed.yaml", CommitState.FAILED),
        ("pipelinerun-v1-failed-validation-childrefs.yaml", CommitState.FAILED),
        ("pipelinerun-v1beta1-pending-pac.yaml", CommitState.PENDING),
    ],
)
def test_corpus_pipelineruns_map_to_their_commit_state(fixture: str, state: CommitState) -> None:
    assert run_state(load(fixture)) is state


def test_every_cancel_reason_is_canceled_and_every_other_false_is_failed() -> None:
    """From Tekton's own reason list: cancel reasons → canceled; timeouts and the rest → failed."""
    for reason in REASONS["pipelinerun_cancel_reasons"]:
        assert run_state(with_condition("False", reason)) is CommitState.CANCELED, reason
    for reason in REASONS["pipelinerun_timeout_reasons"] + ["Failed", "CouldntGetPipeline", "PipelineValidationFailed"]:
        assert run_state(with_condition("False", reason)) is CommitState.FAILED, reason
    for reason in REASONS["pipelinerun_success_reasons"]:
        assert run_state(with_condition("True", reason)) is CommitState.SUCCESS


def test_unknown_condition_is_running_unless_pending() -> None:
    assert run_state(with_condition("Unknown", "Running")) is CommitState.RUNNING
    assert run_state(with_condition("Unknown", "Started")) is CommitState.RUNNING
    assert run_state(with_condition("Unknown", "PipelineRunPending")) is CommitState.PENDING
    assert run_state({"metadata": {"name": "new"}}) is CommitState.PENDING


def test_failure_description_names_the_failing_task_and_reason() -> None:
    run = with_condition("False", "Failed", "Tasks Completed: 2 (Failed: 1, Cancelled 0), Skipped: 0")
    taskruns = [
        {"metadata": {"name": "r-checkout", "labels": {"tekton.dev/pipelineTask": "checkout"}}, **with_condition("True", "Succeeded")},
        {"metadata": {"name": "r-build", "labels": {"tekton.dev/pipelineTask": "build"}},
         **with_condition("False", "Failed", '"step-build" exited with code 1')},
    ]
    assert describe(run, taskruns=taskruns, pipeline="build-test-push") == \
        'build-test-push: task build failed (Failed): "step-build" exited with code 1'
    assert describe(run, pipeline="p").startswith("p: failed (Failed): Tasks Completed: 2")


def test_cancel_description_says_who_superseded_it() -> None:
    run = {"metadata": {"annotations": {"cibroker.dev/superseded-by": "ab12cd34"}}, **with_condition("False", "Cancelled")}
    assert describe(run, pipeline="p") == "p: canceled, superseded by ab12cd34"


def test_timed_out_run_says_so() -> None:
    assert describe(with_condition("False", "PipelineRunTimeout"), pipeline="p") == "p: timed out"


@pytest.mark.parametrize(
    ("last", "new", "report"),
    [
        (None, CommitState.PENDING, True),
        (None, CommitState.SUCCESS, True),
        (CommitState.PENDING, CommitState.RUNNING, True),
        (CommitState.PENDING, CommitState.PENDING, False),
        (CommitState.RUNNING, CommitState.PENDING, False),
        (CommitState.RUNNING, CommitState.RUNNING, False),
        (CommitState.RUNNING, CommitState.FAILED, True),
        (CommitState.SUCCESS, CommitState.RUNNING, False),
        (CommitState.SUCCESS, CommitState.FAILED, False),
        (CommitState.CANCELED, CommitState.SUCCESS, False),
    ],
)
def test_reports_only_move_forward(last: CommitState | None, new: CommitState, report: bool) -> None:
    """A late `running` never overwrites `success`; a final state is never replaced."""
    assert should_report(last, new) is report
