"""Validate objects against the Tekton CRD schemas in tests/fixtures/corpus/tekton/crds."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import jsonschema
import yaml

from tests.support import CORPUS


@lru_cache
def crd_schema(plural: str, version: str) -> dict[str, Any]:
    crd = yaml.safe_load((CORPUS / "tekton" / "crds" / f"300-{plural[:-1]}.yaml").read_text())
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return v["schema"]["openAPIV3Schema"]
    raise KeyError(version)


def pruned_fields(obj: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields the API server would silently drop (structural-schema pruning): typos show up here."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    out: list[str] = []
    if isinstance(obj, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, value in obj.items():
            if props is not None and key in props:
                out += pruned_fields(value, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                out += pruned_fields(value, extra, f"{path}.{key}")
            elif props is not None and path not in ("", ".metadata") and not path.startswith(".metadata."):
                out.append(f"{path}.{key}")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            out += pruned_fields(item, schema["items"], f"{path}[{i}]")
    return out


def validate(obj: dict[str, Any], plural: str = "pipelineruns") -> None:
    version = obj["apiVersion"].split("/")[1]
    schema = crd_schema(plural, version)
    jsonschema.validate(obj, schema)
    pruned = pruned_fields(obj, schema)
    assert not pruned, f"fields the API server would prune: {pruned}"
