"""`kubectl rollout status` semantics over real Deployment shapes, and the `kubectl set image` patch."""

from __future__ import annotations

import pytest
import yaml

from broker.core.rollout import Rollout, container_image, rollout_status, set_image_patch
from tests.support import CORPUS


def deployment(name: str) -> dict:
    return yaml.safe_load((CORPUS / "kubernetes" / name).read_text())


@pytest.mark.parametrize(
    ("fixture", "state"),
    [
        ("deployment-rollout-complete.yaml", Rollout.COMPLETE),
        ("deployment-rollout-in-progress.yaml", Rollout.PROGRESSING),
        ("deployment-minimum-replicas-unavailable.yaml", Rollout.PROGRESSING),
        ("deployment-progress-deadline-exceeded.yaml", Rollout.FAILED),
        ("deployment-paused.yaml", Rollout.PAUSED),
    ],
)
def test_corpus_deployments(fixture: str, state: Rollout) -> None:
    assert rollout_status(deployment(fixture)).state is state


def test_a_spec_the_controller_has_not_seen_is_not_complete() -> None:
    """generation > observedGeneration: even with every replica updated, wait."""
    d = deployment("deployment-rollout-complete.yaml")
    d["metadata"]["generation"] = d["status"]["observedGeneration"] + 1
    status = rollout_status(d)
    assert status.state is Rollout.PROGRESSING and "observe" in status.message


def test_old_replicas_left_keep_the_rollout_progressing() -> None:
    d = deployment("deployment-rollout-complete.yaml")
    d["status"]["replicas"] = d["status"]["updatedReplicas"] + 1
    assert rollout_status(d).message.endswith("old replicas pending termination")


def test_set_image_patch_names_only_the_container() -> None:
    patch = set_image_patch(container="api", image="r/app:abc", change_cause="cibroker: deploy abc")
    assert patch["spec"]["template"]["spec"]["containers"] == [{"name": "api", "image": "r/app:abc"}]
    assert patch["metadata"]["annotations"]["kubernetes.io/change-cause"] == "cibroker: deploy abc"


def test_container_image_reads_the_named_container() -> None:
    d = deployment("deployment-rollout-complete.yaml")
    first = d["spec"]["template"]["spec"]["containers"][0]
    assert container_image(d, first["name"]) == first["image"]
    assert container_image(d, "no-such-container") is None
