"""Which routes take an event: glob matching over repo paths and ref names.

Globs: `*` matches within one path segment, `**` across segments, `?` one
character, `[abc]`/`[!abc]` a class. Repo paths match case-insensitively (GitLab and
GitHub treat them so); ref names match exactly.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from broker.core.events import Ignored, PushEvent, RefKind
from config.routing import RefFilter, Route


@lru_cache(maxsize=1024)
def _compile(pattern: str, ignore_case: bool) -> re.Pattern[str]:
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and (end := pattern.find("]", i + 2)) != -1:
            body = pattern[i + 1:end]
            negate = body[:1] == "!"
            body = re.escape(body[1:] if negate else body).replace(r"\-", "-")
            # A negated class is still one character within a segment, like `?`: never `/`.
            out.append(f"[^/{body}]" if negate else f"[{body}]")
            i = end + 1
            continue
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z", re.IGNORECASE if ignore_case else 0)


def glob_match(pattern: str, value: str, *, ignore_case: bool = False) -> bool:
    return _compile(pattern, ignore_case).match(value) is not None


def ref_selected(refs: RefFilter, kind: RefKind, name: str) -> bool:
    patterns = refs.branches if kind is RefKind.BRANCH else refs.tags
    return any(glob_match(p, name) for p in patterns)


def matching_routes(event: PushEvent, routes: Iterable[Route]) -> tuple[Route, ...]:
    return tuple(
        r
        for r in routes
        if r.host == event.host and glob_match(r.repo, event.repo, ignore_case=True) and ref_selected(r.events, event.kind, event.name)
    )


@dataclass(frozen=True, slots=True)
class Accepted:
    event: PushEvent
    routes: tuple[str, ...]


def decide(event: PushEvent, routes: Iterable[Route]) -> Accepted | Ignored:
    """Build this push (on which routes), or say why not."""
    if event.skip_reason:
        return Ignored(code="skip_ci", reason=f"skipped: {event.skip_reason}", event=event.event, push=event)
    matched = matching_routes(event, routes)
    if not matched:
        return Ignored(
            code="no_route",
            reason=f"no route for {event.repo} {event.kind} {event.name!r} on host {event.host!r}",
            event=event.event,
            push=event,
        )
    return Accepted(event=event, routes=tuple(r.name for r in matched))
