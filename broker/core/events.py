"""Host-neutral events: what a webhook means once its host's dialect is removed.

Everything after the webhook source (routing, dedup, records, workers) speaks only
these frozen values. Nothing here does I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from typing import Any

ZERO_SHA = "0" * 40


class RefKind(enum.StrEnum):
    BRANCH = "branch"
    TAG = "tag"


@dataclass(frozen=True, slots=True)
class PushEvent:
    """A branch or tag push that may be built.

    `sha` is the commit to build. For GitLab it is `checkout_sha`: for an annotated
    tag `pushed` (the payload's `after`) is the tag object, not the commit.
    `sha_source` says which payload field `sha` came from, so a worker knows whether
    it still has to peel a tag.
    """

    host: str
    host_kind: str
    event: str
    kind: RefKind
    repo: str
    repo_id: str
    ref: str
    name: str
    before: str
    sha: str
    sha_source: str
    pushed: str
    sender: str = ""
    head_title: str = ""
    total_commits: int | None = None
    skip_reason: str | None = None
    web_url: str = ""

    @property
    def short_sha(self) -> str:
        return self.sha[:8]

    @property
    def created(self) -> bool:
        return self.before == ZERO_SHA

    def as_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it deep-copies, and this runs once per webhook on the hot path.
        data = {name: getattr(self, name) for name in _PUSH_FIELDS}
        data["kind"] = str(self.kind)
        return data


_PUSH_FIELDS = tuple(f.name for f in fields(PushEvent))


@dataclass(frozen=True, slots=True)
class Ignored:
    """An event we answer 200 to and do nothing with, and why.

    `code` is a stable snake_case word for metrics and filters; `reason` is for people.
    """

    code: str
    reason: str
    event: str = ""
    push: PushEvent | None = field(default=None)


@dataclass(frozen=True, slots=True)
class Identity:
    """How the host identifies one delivery, for deduplication.

    `source` names the header(s) used, `value` is what they said (shortened, for
    people), `key` is the digest the deduplication key is built from.
    """

    source: str
    value: str
    key: str
