"""Kubernetes label selectors, parsed and matched the way the API server does.

Supports the set-based grammar the API accepts in `?labelSelector=`: `k=v`, `k==v`,
`k!=v`, `k`, `!k`, `k in (a,b)`, `k notin (a,b)`, joined by commas (AND).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

Requirement = Callable[[Mapping[str, str]], bool]

_KEY = r"[A-Za-z0-9][-A-Za-z0-9_./]*"
_VALUE = r"[-A-Za-z0-9_.]*"
_PATTERNS: list[tuple[re.Pattern[str], Callable[[re.Match[str]], Requirement]]] = [
    (re.compile(rf"^({_KEY})\s+in\s+\(([^)]*)\)$"), lambda m: _in(m[1], _values(m[2]))),
    (re.compile(rf"^({_KEY})\s+notin\s+\(([^)]*)\)$"), lambda m: _notin(m[1], _values(m[2]))),
    (re.compile(rf"^({_KEY})\s*!=\s*({_VALUE})$"), lambda m: _notin(m[1], {m[2]})),
    (re.compile(rf"^({_KEY})\s*==?\s*({_VALUE})$"), lambda m: _in(m[1], {m[2]})),
    (re.compile(rf"^!\s*({_KEY})$"), lambda m: lambda labels: m[1] not in labels),
    (re.compile(rf"^({_KEY})$"), lambda m: lambda labels: m[1] in labels),
]


class SelectorError(ValueError):
    """The selector does not parse; the API answers 400 BadRequest."""


def parse(selector: str | None) -> Requirement:
    """A predicate over an object's labels; an empty selector matches everything."""
    requirements = [_requirement(part.strip()) for part in _split(selector or "") if part.strip()]
    return lambda labels: all(r(labels) for r in requirements)


def _split(selector: str) -> list[str]:
    """Split on commas that are not inside `in (...)` value lists."""
    parts, depth, current = [], 0, ""
    for char in selector:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [*parts, current]


def _requirement(text: str) -> Requirement:
    for pattern, build in _PATTERNS:
        if match := pattern.match(text):
            return build(match)
    raise SelectorError(f"unable to parse requirement: {text!r}")


def _values(text: str) -> set[str]:
    return {v.strip() for v in text.split(",")}


def _in(key: str, values: set[str]) -> Requirement:
    return lambda labels: key in labels and labels[key] in values


def _notin(key: str, values: set[str]) -> Requirement:
    return lambda labels: labels.get(key) not in values
