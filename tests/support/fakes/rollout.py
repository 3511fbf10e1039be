"""A Deployment controller stand-in, plus helpers that seed a rolled-out Deployment and a ServiceAccount.

When a Deployment's pod template changes (say `kubectl set image`, a strategic merge patch
of one container's image), the simulator does what the deployment controller does, on its
own thread, in two writes `step_seconds` apart (shapes from
tests/fixtures/corpus/kubernetes/deployment-*.yaml):

1. a new ReplicaSet `<name>-<pod-template-hash>` with the next
   `deployment.kubernetes.io/revision`; the Deployment gets that revision annotation,
   `observedGeneration` = `generation`, one updated but unavailable replica, and
   Progressing True / ReplicaSetUpdated;
2. by outcome: "complete" -> every replica updated, ready and available, old ReplicaSets
   scaled to 0, Progressing True / NewReplicaSetAvailable, Available True;
   "deadline-exceeded" -> Progressing False / ProgressDeadlineExceeded (old pods still
   serve, so Available stays True); "stuck" -> stays at step 1.

Await the result with `api.wait_for("deployments", ns, name, rollout_complete)`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from tests.support.fakes.kube_api import FakeKubeAPI
from tests.support.fakes.kube_store import Change, Obj, now
from tests.support.fakes.scheduler import Scheduler

REVISION = "deployment.kubernetes.io/revision"
OUTCOMES = ("complete", "deadline-exceeded", "stuck")
_HASH_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


def seed_service_account(api: FakeKubeAPI, *, namespace: str, name: str) -> Obj:
    return api.put({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": namespace}})


def seed_deployment(api: FakeKubeAPI, *, namespace: str, name: str = "api", container: str = "api",
                    image: str = "registry.example.com/team/api:1.0.0", replicas: int = 2,
                    sidecars: Mapping[str, str] | None = None) -> Obj:
    """A Deployment fully rolled out at revision 1, with its ReplicaSet; `sidecars` maps container name to image."""
    containers = [{"name": n, "image": i, "imagePullPolicy": "IfNotPresent", "resources": {},
                   "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File"}
                  for n, i in {container: image, **(sidecars or {})}.items()]
    containers[0]["ports"] = [{"containerPort": 8080, "protocol": "TCP"}]
    template = {"metadata": {"labels": {"app": name}}, "spec": {
        "containers": containers, "restartPolicy": "Always", "dnsPolicy": "ClusterFirst",
        "terminationGracePeriodSeconds": 30}}
    deployment = api.put({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}, "annotations": {REVISION: "1"}},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}}, "template": template},
        "status": {},
    })
    replicaset = _new_replicaset(deployment, revision=1)
    _scale(api, replicaset, replicas)
    return api.mutate("deployments", namespace, name, lambda d: _set_status(
        d, rolled_out=True, message=f'ReplicaSet "{replicaset["metadata"]["name"]}" has successfully progressed.'))


def rollout_complete(deployment: Obj) -> bool:
    """What `kubectl rollout status` waits for."""
    status, spec = deployment.get("status") or {}, deployment["spec"]
    progressing = _condition(deployment, "Progressing")
    return (status.get("observedGeneration", 0) >= deployment["metadata"]["generation"]
            and status.get("updatedReplicas") == spec.get("replicas") == status.get("availableReplicas")
            == status.get("replicas") and progressing.get("reason") == "NewReplicaSetAvailable")


def rollout_failed(deployment: Obj) -> bool:
    return _condition(deployment, "Progressing").get("reason") == "ProgressDeadlineExceeded"


class RolloutSimulator:
    def __init__(self, api: FakeKubeAPI, *, outcome: str = "complete", step_seconds: float = 0.02) -> None:
        assert outcome in OUTCOMES, outcome
        self.api = api
        self.outcome = outcome
        self.step_seconds = step_seconds
        self._outcomes: dict[tuple[str, str], str] = {}
        self._scheduler = Scheduler("rollout-simulator")
        self._stopped = False
        api.on_change(self._on_change)

    def set_outcome(self, namespace: str, name: str, outcome: str) -> None:
        """How the next rollouts of this one Deployment end."""
        assert outcome in OUTCOMES, outcome
        self._outcomes[(namespace, name)] = outcome

    def __enter__(self):  # type: ignore[no-untyped-def]
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stopped = True
        self._scheduler.stop()

    def _on_change(self, change: Change) -> None:
        if self._stopped or change.plural != "deployments" or change.type != "MODIFIED" or change.old is None:
            return
        if change.new["metadata"]["generation"] != change.old["metadata"]["generation"]:
            self._scheduler.call_later(0, self._start, change.namespace, change.new["metadata"]["name"])

    def _start(self, namespace: str, name: str) -> None:
        deployment = self.api.get("deployments", namespace, name)
        if deployment is None or (deployment.get("status") or {}).get("observedGeneration") == \
                deployment["metadata"]["generation"]:
            return
        owned = self._replicasets(deployment)
        revision = max((int(rs["metadata"]["annotations"][REVISION]) for rs in owned), default=0) + 1
        replicaset = _new_replicaset(deployment, revision=revision)
        _scale(self.api, replicaset, 1)
        generation = deployment["metadata"]["generation"]
        rs_name = replicaset["metadata"]["name"]

        def progressing(d: Obj) -> None:
            d["metadata"].setdefault("annotations", {})[REVISION] = str(revision)
            _set_status(d, rolled_out=False, message=f'ReplicaSet "{rs_name}" is progressing.', generation=generation)
        self.api.mutate("deployments", namespace, name, progressing)
        outcome = self._outcomes.get((namespace, name), self.outcome)
        if outcome != "stuck":
            self._scheduler.call_later(self.step_seconds, self._finish, namespace, name, generation, rs_name, outcome)

    def _finish(self, namespace: str, name: str, generation: int, rs_name: str, outcome: str) -> None:
        deployment = self.api.get("deployments", namespace, name)
        if deployment is None or deployment["metadata"]["generation"] != generation:
            return  # superseded by a newer rollout
        if outcome == "deadline-exceeded":
            self.api.mutate("deployments", namespace, name, lambda d: _set_status(
                d, rolled_out=False, failed=True, message=f'ReplicaSet "{rs_name}" has timed out progressing.'))
            return
        for replicaset in self._replicasets(deployment):
            if replicaset["metadata"]["name"] != rs_name:
                _scale(self.api, replicaset, 0)
        _scale(self.api, self.api.get("replicasets", namespace, rs_name) or {}, deployment["spec"]["replicas"])
        self.api.mutate("deployments", namespace, name, lambda d: _set_status(
            d, rolled_out=True, message=f'ReplicaSet "{rs_name}" has successfully progressed.'))

    def _replicasets(self, deployment: Obj) -> list[Obj]:
        uid = deployment["metadata"]["uid"]
        return [rs for rs in self.api.list("replicasets", deployment["metadata"]["namespace"])
                if any(ref.get("uid") == uid for ref in rs["metadata"].get("ownerReferences", []))]


def pod_template_hash(template: Any) -> str:
    digest = hashlib.sha256(repr(template).encode()).digest()
    return "".join(_HASH_ALPHABET[b % len(_HASH_ALPHABET)] for b in digest[:10])


def _new_replicaset(deployment: Obj, *, revision: int) -> Obj:
    """The ReplicaSet for the Deployment's current template, as the controller creates it (0 replicas)."""
    meta, spec = deployment["metadata"], deployment["spec"]
    template_hash = pod_template_hash(spec["template"])
    labels = {**(spec["template"].get("metadata", {}).get("labels") or {}), "pod-template-hash": template_hash}
    template = {**spec["template"], "metadata": {**spec["template"].get("metadata", {}), "labels": labels}}
    return {
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {"name": f"{meta['name']}-{template_hash}", "namespace": meta["namespace"], "labels": labels,
                     "annotations": {REVISION: str(revision), "deployment.kubernetes.io/desired-replicas":
                                     str(spec["replicas"]), "deployment.kubernetes.io/max-replicas":
                                     str(spec["replicas"] + 1)},
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": meta["name"],
                                          "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}]},
        "spec": {"replicas": 0, "selector": {"matchLabels": {**spec["selector"]["matchLabels"],
                                                             "pod-template-hash": template_hash}},
                 "template": template},
        "status": {"replicas": 0, "observedGeneration": 1},
    }


def _scale(api: FakeKubeAPI, replicaset: Obj, replicas: int) -> None:
    """Create the ReplicaSet if needed and set spec and status to `replicas` ready pods."""
    meta = replicaset["metadata"]
    if api.get("replicasets", meta["namespace"], meta["name"]) is None:
        api.put(replicaset)

    def scaled(rs: Obj) -> None:
        generation = rs["metadata"]["generation"] + (rs["spec"]["replicas"] != replicas)  # the write bumps it
        rs["spec"]["replicas"] = replicas
        rs["status"] = {"replicas": replicas, "fullyLabeledReplicas": replicas, "readyReplicas": replicas,
                        "availableReplicas": replicas, "observedGeneration": generation}
    api.mutate("replicasets", meta["namespace"], meta["name"], scaled)


def _set_status(deployment: Obj, *, rolled_out: bool, message: str, failed: bool = False,
                generation: int | None = None) -> None:
    replicas = deployment["spec"]["replicas"]
    status = deployment.setdefault("status", {})
    status["observedGeneration"] = generation or deployment["metadata"]["generation"]
    if rolled_out:
        status.update(replicas=replicas, updatedReplicas=replicas, readyReplicas=replicas, availableReplicas=replicas)
        status.pop("unavailableReplicas", None)
    else:
        status.update(replicas=replicas + 1, updatedReplicas=1, readyReplicas=replicas, availableReplicas=replicas,
                      unavailableReplicas=1)
    reason = "NewReplicaSetAvailable" if rolled_out else "ProgressDeadlineExceeded" if failed else "ReplicaSetUpdated"
    status["conditions"] = [
        _merge_condition(deployment, "Available", "True", "MinimumReplicasAvailable",
                         "Deployment has minimum availability."),
        _merge_condition(deployment, "Progressing", "False" if failed else "True", reason, message),
    ]


def _condition(deployment: Obj, kind: str) -> Obj:
    return next((c for c in (deployment.get("status") or {}).get("conditions", []) if c["type"] == kind), {})


def _merge_condition(deployment: Obj, kind: str, status: str, reason: str, message: str) -> Obj:
    old = _condition(deployment, kind)
    stamp = now()
    return {"lastTransitionTime": old["lastTransitionTime"] if old.get("status") == status else stamp,
            "lastUpdateTime": stamp, "message": message, "reason": reason, "status": status, "type": kind}
