"""The three patch formats the API server applies, as pure functions over JSON values.

- JSON merge patch (RFC 7386): objects merge, `null` deletes, lists are replaced.
- Strategic merge patch (built-in kinds only): like a merge patch, but lists whose Go
  type declares `patchStrategy: merge` merge item by item on their `patchMergeKey`
  (containers by `name`, which is what `kubectl set image` relies on). `$patch: delete`
  on a list item removes it; `$setElementOrder/...` directives are accepted and ignored.
- JSON patch (RFC 6902): add, remove, replace, test.
"""

from __future__ import annotations

import copy
from typing import Any

# Field name -> merge key, from the patchMergeKey tags of k8s.io/api core/v1 and apps/v1.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
    "conditions": "type",
    "tolerations": "key",
}


class PatchError(ValueError):
    """The patch cannot be applied; the API answers 422 (or 409 for a failed JSON-patch test)."""


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: apply `patch` to a copy of `target`."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """Strategic merge: `merge_patch`, except lists named in MERGE_KEYS merge by key."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$setElementOrder/") or key == "$retainKeys":
            continue
        if value is None:
            result.pop(key, None)
        elif key in MERGE_KEYS and isinstance(value, list):
            result[key] = _merge_list(result.get(key) or [], value, MERGE_KEYS[key])
        else:
            result[key] = strategic_merge_patch(result.get(key), value)
    return result


def _merge_list(current: list[Any], patch: list[Any], merge_key: str) -> list[Any]:
    merged = copy.deepcopy(current)
    for item in patch:
        if not isinstance(item, dict) or merge_key not in item:
            raise PatchError(f"map in a merge list is missing its merge key {merge_key!r}: {item!r}")
        index = next((i for i, old in enumerate(merged) if old.get(merge_key) == item[merge_key]), None)
        directive = item.get("$patch")
        if directive == "delete":
            if index is not None:
                del merged[index]
        elif index is None:
            merged.append({k: v for k, v in item.items() if k != "$patch"})
        else:
            merged[index] = strategic_merge_patch(merged[index], item)
    return merged


def json_patch(target: Any, operations: list[dict[str, Any]]) -> Any:
    """RFC 6902 add/remove/replace/test over a copy of `target`."""
    doc = copy.deepcopy(target)
    for op in operations:
        parent, last = _walk(doc, op.get("path", ""))
        kind = op.get("op")
        if kind == "test":
            if _get(parent, last) != op.get("value"):
                raise PatchError(f"test operation failed at {op['path']!r}")
        elif kind == "remove":
            _get(parent, last)
            del parent[int(last) if isinstance(parent, list) else last]
        elif kind == "replace":
            _get(parent, last)
            parent[int(last) if isinstance(parent, list) else last] = copy.deepcopy(op["value"])
        elif kind == "add":
            if isinstance(parent, list):
                parent.insert(len(parent) if last == "-" else int(last), copy.deepcopy(op["value"]))
            else:
                parent[last] = copy.deepcopy(op["value"])
        else:
            raise PatchError(f"unsupported JSON patch operation {kind!r}")
    return doc


def _walk(doc: Any, pointer: str) -> tuple[Any, str]:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in pointer.split("/")[1:]]
    if not parts:
        raise PatchError("JSON patch on the whole document is not supported")
    node = doc
    for part in parts[:-1]:
        node = _get(node, part)
    return node, parts[-1]


def _get(node: Any, key: str) -> Any:
    try:
        return node[int(key)] if isinstance(node, list) else node[key]
    except (KeyError, IndexError, ValueError, TypeError) as exc:
        raise PatchError(f"path element {key!r} does not exist") from exc
