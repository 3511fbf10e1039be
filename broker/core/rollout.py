"""Deployment rollouts: the image patch `kubectl set image` sends, and `kubectl rollout status`.

Pure. A rollout is complete when the controller has seen the latest spec
(observedGeneration >= generation), every desired replica is updated, every updated
replica is available, and no old replica is left. ProgressDeadlineExceeded is a
failure; a paused Deployment never completes and is reported as such.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

CHANGE_CAUSE = "kubernetes.io/change-cause"
A_DEPLOYED_SHA = "cibroker.dev/deployed-sha"
A_PREVIOUS_IMAGE = "cibroker.dev/previous-image"
A_PREVIOUS_SHA = "cibroker.dev/previous-sha"


class Rollout(enum.StrEnum):
    PROGRESSING = "progressing"
    COMPLETE = "complete"
    FAILED = "failed"
    PAUSED = "paused"


@dataclass(frozen=True, slots=True)
class RolloutStatus:
    state: Rollout
    message: str


def container_image(deployment: Mapping[str, Any], container: str) -> str | None:
    for c in (((deployment.get("spec") or {}).get("template") or {}).get("spec") or {}).get("containers") or []:
        if c.get("name") == container:
            return c.get("image")
    return None


def set_image_patch(*, container: str, image: str, change_cause: str, annotations: Mapping[str, str] = {}) -> dict[str, Any]:  # noqa: B006
    """Strategic merge patch: containers merge by name, so only `container` changes."""
    return {
        "metadata": {"annotations": {CHANGE_CAUSE: change_cause, **annotations}},
        "spec": {"template": {"spec": {"containers": [{"name": container, "image": image}]}}},
    }


def rollout_status(deployment: Mapping[str, Any]) -> RolloutStatus:
    meta = deployment.get("metadata") or {}
    spec = deployment.get("spec") or {}
    status = deployment.get("status") or {}
    name = meta.get("name", "deployment")
    if meta.get("generation", 0) > status.get("observedGeneration", 0):
        return RolloutStatus(Rollout.PROGRESSING, f"waiting for the controller to observe {name}'s new spec")
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            return RolloutStatus(Rollout.FAILED, f"{name} exceeded its progress deadline: {cond.get('message', '')}".strip())
    if spec.get("paused"):
        return RolloutStatus(Rollout.PAUSED, f"{name} is paused; resume it to let the rollout finish")
    desired = spec.get("replicas", 1)
    updated = status.get("updatedReplicas", 0)
    replicas = status.get("replicas", 0)
    available = status.get("availableReplicas", 0)
    if updated < desired:
        return RolloutStatus(Rollout.PROGRESSING, f"{updated} of {desired} replicas updated")
    if replicas > updated:
        return RolloutStatus(Rollout.PROGRESSING, f"{replicas - updated} old replicas pending termination")
    if available < updated:
        return RolloutStatus(Rollout.PROGRESSING, f"{available} of {updated} updated replicas available")
    return RolloutStatus(Rollout.COMPLETE, f"{name} rolled out ({updated} replicas)")
