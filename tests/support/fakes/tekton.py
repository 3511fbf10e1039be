"""A Tekton Pipelines controller stand-in: moves PipelineRuns through real v1 status shapes.

Reason and message strings are Tekton's (tests/fixtures/corpus/tekton/reasons-v1.json and
the pipelinerun-*/taskrun-* shapes beside it). Steps are explicit by default, so a test
says when a run starts, succeeds, fails or times out:

    sim = TektonSimulator(api)
    sim.start("ci", "run-1")      # Unknown/Running, startTime, first TaskRun + childReferences
    sim.succeed("ci", "run-1")    # True/Succeeded, completionTime, every TaskRun Succeeded, pipeline results
    sim.fail("ci", "run-1", task="build")   # False/Failed, the build TaskRun False/Failed
    sim.time_out("ci", "run-1")   # False/PipelineRunTimeout

Like the real controller it also reacts, on its own thread, to what others write:
`spec.status` Cancelled / CancelledRunFinally / StoppedRunFinally ends the run False/Cancelled,
PipelineRunPending holds it until the field is cleared, and with `auto_start` set every
new PipelineRun starts after that many seconds and finishes (`outcome`) `auto_finish`
seconds later. Tests await those with `api.wait_for(...)`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from tests.support.fakes.kube_api import FakeKubeAPI
from tests.support.fakes.kube_store import Change, Obj, now
from tests.support.fakes.scheduler import Scheduler

CANCEL_SPEC_VALUES = ("Cancelled", "CancelledRunFinally", "StoppedRunFinally")
PENDING = "PipelineRunPending"


def digest_of(image: str) -> str:
    """The digest the fake registry gives the image a run pushed: deterministic per image reference."""
    return "sha256:" + hashlib.sha256(image.encode()).hexdigest()


def results_of(pr: Obj) -> list[dict[str, str]]:
    """What the shipped Pipelines (deploy/tekton/pipelines) report on success: `commit` and `image-digest`."""
    params = {p.get("name"): p.get("value") for p in (pr.get("spec") or {}).get("params") or []}
    out = []
    if params.get("git-revision"):
        out.append({"name": "commit", "value": str(params["git-revision"])})
    if params.get("image"):
        out.append({"name": "image-digest", "value": digest_of(str(params["image"]))})
    return out


def condition(obj: Obj) -> Obj:
    """The Succeeded condition of a PipelineRun or TaskRun ({} before the controller saw it)."""
    return next((c for c in (obj.get("status") or {}).get("conditions", []) if c.get("type") == "Succeeded"), {})


def is_done(obj: Obj) -> bool:
    return condition(obj).get("status") in ("True", "False")


class TektonSimulator:
    def __init__(self, api: FakeKubeAPI, *, tasks: Sequence[str] = ("clone", "build"),
                 auto_start: float | None = None, auto_finish: float = 0.05, outcome: str = "succeed",
                 fail_task: str = "build") -> None:
        self.api = api
        self.tasks = tuple(tasks)
        self.auto_start, self.auto_finish, self.outcome, self.fail_task = auto_start, auto_finish, outcome, fail_task
        self._scheduler = Scheduler("tekton-simulator")
        self._stopped = False
        api.on_change(self._on_change)

    def __enter__(self):  # type: ignore[no-untyped-def]
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop reacting; re-raises the first error the controller thread hit."""
        self._stopped = True
        self._scheduler.stop()

    # -- explicit steps --------------------------------------------------------------------

    def start(self, namespace: str, name: str) -> Obj:
        pr = self._get(namespace, name)
        if is_done(pr) or pr.get("status", {}).get("startTime"):
            return pr
        self._ensure_taskrun(pr, self._tasks_of(pr)[0])

        def running(pr: Obj) -> None:
            pipeline = (pr.get("spec", {}).get("pipelineRef") or {}).get("name")
            if pipeline:
                pr["metadata"].setdefault("labels", {})["tekton.dev/pipeline"] = pipeline
            pr.setdefault("status", {})["startTime"] = now()
            _set_condition(pr, "Unknown", "Running", _progress(done=0, failed=0, incomplete=len(self._tasks_of(pr))))
        return self._write(namespace, name, running)

    def succeed(self, namespace: str, name: str) -> Obj:
        pr = self.start(namespace, name)
        if is_done(pr):
            return pr
        tasks = self._tasks_of(pr)
        for task in tasks:
            self._finish_taskrun(pr, task, "True", "Succeeded", "All Steps have completed executing")

        def succeeded(pr: Obj) -> None:
            # Tekton v1 reports pipeline results in status.results, v1beta1 in status.pipelineResults.
            field = "results" if pr.get("apiVersion", "").endswith("/v1") else "pipelineResults"
            if results := results_of(pr):
                pr.setdefault("status", {})[field] = results
            _finish(pr, "True", "Succeeded", _progress(done=len(tasks), failed=0))
        return self._write(namespace, name, succeeded)

    def fail(self, namespace: str, name: str, *, task: str | None = None, reason: str = "Failed",
             message: str | None = None) -> Obj:
        """End False/`reason`: tasks before `task` succeeded, `task` failed, later ones were skipped."""
        pr = self.start(namespace, name)
        if is_done(pr):
            return pr
        tasks = self._tasks_of(pr)
        failing = task or (self.fail_task if self.fail_task in tasks else tasks[-1])
        position = tasks.index(failing)
        for earlier in tasks[:position]:
            self._finish_taskrun(pr, earlier, "True", "Succeeded", "All Steps have completed executing")
        self._finish_taskrun(pr, failing, "False", "Failed", f'"step-{failing}" exited with code 1')
        text = message or _progress(done=position + 1, failed=1, skipped=len(tasks) - position - 1)
        return self._write(namespace, name, lambda pr: _finish(pr, "False", reason, text))

    def time_out(self, namespace: str, name: str) -> Obj:
        pr = self.start(namespace, name)
        if is_done(pr):
            return pr
        self._cancel_taskruns(pr, "TaskRun cancelled as the PipelineRun it belongs to has timed out.")
        limit = (pr.get("spec", {}).get("timeouts") or {}).get("pipeline", "1h0m0s")
        return self._write(namespace, name, lambda pr: _finish(
            pr, "False", "PipelineRunTimeout", f'PipelineRun "{name}" failed to finish within "{limit}"'))

    def cancel(self, namespace: str, name: str) -> Obj:
        """What the controller does once it sees a cancelling spec.status."""
        pr = self._get(namespace, name)
        if is_done(pr):
            return pr
        self._cancel_taskruns(pr, None)
        return self._write(namespace, name, lambda pr: _finish(
            pr, "False", "Cancelled", f'PipelineRun "{name}" was cancelled'))

    # -- reacting to writes ----------------------------------------------------------------

    def _on_change(self, change: Change) -> None:
        if self._stopped or change.plural != "pipelineruns" or change.type == "DELETED":
            return
        was = ((change.old or {}).get("spec") or {}).get("status")
        wanted = (change.new.get("spec") or {}).get("status")
        key = (change.namespace, change.new["metadata"]["name"])
        if wanted in CANCEL_SPEC_VALUES and was != wanted:
            self._scheduler.call_later(0, self.cancel, *key)
        elif wanted == PENDING and change.type == "ADDED":
            self._scheduler.call_later(0, self._hold, *key)
        elif self.auto_start is not None and not wanted and (change.type == "ADDED" or was == PENDING):
            self._scheduler.call_later(self.auto_start, self._auto_run, *key)

    def _hold(self, namespace: str, name: str) -> None:
        pr = self._get(namespace, name)
        if not condition(pr) and (pr.get("spec") or {}).get("status") == PENDING:
            self._write(namespace, name, lambda pr: _set_condition(
                pr, "Unknown", "PipelineRunPending", f'PipelineRun "{name}" is pending'))

    def _auto_run(self, namespace: str, name: str) -> None:
        pr = self.api.get("pipelineruns", namespace, name)
        if pr is None or is_done(pr) or (pr.get("spec") or {}).get("status"):
            return
        self.start(namespace, name)
        self._scheduler.call_later(self.auto_finish, self._auto_finish, namespace, name)

    def _auto_finish(self, namespace: str, name: str) -> None:
        pr = self.api.get("pipelineruns", namespace, name)
        if pr is None or is_done(pr):
            return
        if self.outcome == "succeed":
            self.succeed(namespace, name)
        elif self.outcome == "fail":
            self.fail(namespace, name)
        elif self.outcome == "timeout":
            self.time_out(namespace, name)

    # -- TaskRuns --------------------------------------------------------------------------

    def _ensure_taskrun(self, pr: Obj, task: str) -> Obj:
        meta = pr["metadata"]
        name = _child_name(meta["name"], task)
        existing = self.api.get("taskruns", meta["namespace"], name)
        if existing is not None:
            return existing
        pipeline = (pr.get("spec", {}).get("pipelineRef") or {}).get("name")
        labels = {**(meta.get("labels") or {}), "tekton.dev/pipelineRun": meta["name"],
                  "tekton.dev/pipelineTask": task, "app.kubernetes.io/managed-by": "tekton-pipelines"}
        if pipeline:
            labels["tekton.dev/pipeline"] = pipeline
        taskrun = self.api.put({
            "apiVersion": pr["apiVersion"], "kind": "TaskRun",
            "metadata": {"name": name, "namespace": meta["namespace"], "labels": labels,
                         "annotations": dict(meta.get("annotations") or {}),
                         "ownerReferences": [{"apiVersion": pr["apiVersion"], "kind": "PipelineRun",
                                              "name": meta["name"], "uid": meta["uid"], "controller": True,
                                              "blockOwnerDeletion": True}]},
            "spec": {"taskRef": {"name": task, "kind": "Task"}, "timeout": "1h0m0s",
                     "serviceAccountName": _service_account(pr)},
            "status": {"podName": f"{name}-pod", "startTime": now(), "conditions": [{
                "type": "Succeeded", "status": "Unknown", "reason": "Running",
                "message": "Not all Steps in the Task have finished executing", "lastTransitionTime": now()}]},
        })
        ref = {"apiVersion": pr["apiVersion"], "kind": "TaskRun", "name": name, "pipelineTaskName": task}

        def add_child(pr: Obj) -> None:
            children = pr.setdefault("status", {}).setdefault("childReferences", [])
            if ref not in children:
                children.append(ref)
        self._write(meta["namespace"], meta["name"], add_child)
        return taskrun

    def _finish_taskrun(self, pr: Obj, task: str, status: str, reason: str, message: str) -> None:
        taskrun = self._ensure_taskrun(pr, task)
        if not is_done(taskrun):
            self.api.mutate("taskruns", pr["metadata"]["namespace"], taskrun["metadata"]["name"],
                            lambda tr: _finish(tr, status, reason, message))

    def _cancel_taskruns(self, pr: Obj, message: str | None) -> None:
        for ref in (pr.get("status") or {}).get("childReferences", []):
            taskrun = self.api.get("taskruns", pr["metadata"]["namespace"], ref["name"])
            if taskrun is not None and not is_done(taskrun):
                text = message or f'TaskRun "{ref["name"]}" was cancelled. '
                self.api.mutate("taskruns", pr["metadata"]["namespace"], ref["name"],
                                lambda tr, text=text: _finish(tr, "False", "TaskRunCancelled", text))

    # -- helpers ---------------------------------------------------------------------------

    def _tasks_of(self, pr: Obj) -> tuple[str, ...]:
        declared = ((pr.get("spec") or {}).get("pipelineSpec") or {}).get("tasks") or []
        return tuple(t["name"] for t in declared) or self.tasks

    def _get(self, namespace: str, name: str) -> Obj:
        pr = self.api.get("pipelineruns", namespace, name)
        assert pr is not None, f"no PipelineRun {namespace}/{name}"
        return pr

    def _write(self, namespace: str, name: str, change: Any) -> Obj:
        return self.api.mutate("pipelineruns", namespace, name, change)


def _progress(*, done: int, failed: int, incomplete: int = 0, skipped: int = 0, cancelled: int = 0) -> str:
    """Tekton's condition message (`Incomplete: n` only while tasks are still to run)."""
    middle = f", Incomplete: {incomplete}" if incomplete else ""
    return f"Tasks Completed: {done} (Failed: {failed}, Cancelled {cancelled}){middle}, Skipped: {skipped}"


def _set_condition(obj: Obj, status: str, reason: str, message: str) -> None:
    status_ = obj.setdefault("status", {})
    old = condition(obj)
    changed = old.get("status") != status
    status_["conditions"] = [c for c in status_.get("conditions", []) if c.get("type") != "Succeeded"] + [{
        "type": "Succeeded", "status": status, "reason": reason, "message": message,
        "lastTransitionTime": now() if changed or not old else old.get("lastTransitionTime", now())}]


def _finish(obj: Obj, status: str, reason: str, message: str) -> None:
    _set_condition(obj, status, reason, message)
    obj["status"]["completionTime"] = now()


def _service_account(pr: Obj) -> str:
    spec = pr.get("spec") or {}
    return (spec.get("taskRunTemplate") or {}).get("serviceAccountName") or spec.get("serviceAccountName") or "default"


def _child_name(run: str, task: str) -> str:
    """`<run>-<task>`, shortened with a hash suffix past 63 characters, as Tekton names children."""
    name = f"{run}-{task}"
    if len(name) <= 63:
        return name
    return f"{name[:57]}-{hashlib.sha256(name.encode()).hexdigest()[:5]}"
