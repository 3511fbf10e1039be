"""The one error tree cibroker owns.

    CibrokerError
    ├── Rejected     a request we refuse: bad signature, unparseable or oversized body.
    │                Carries the HTTP status and a short reason a person can act on.
    ├── Permanent    work that cannot succeed by retrying: report it and stop.
    │   └── Untrusted          input that fails an authenticity check: ignore it, log why.
    ├── Transient    work that may succeed later: retry with backoff (honour retry_after).
    │   ├── StoreUnavailable   Redis could not take or give a record.
    │   └── Expired            a watch resourceVersion is gone (410): relist.
    ConfigError      the routing file or the environment is wrong; lists every problem.
                     Defined in config.errors (config imports nothing from broker), so it is
                     not a CibrokerError: it ends a process at start-up, never a task.

An ignored event is a value (`broker.core.events.Ignored`), never an exception.
Adapters translate library exceptions at the boundary with ``raise ... from exc``.
"""

from __future__ import annotations

from config.errors import ConfigError

__all__ = ["CibrokerError", "ConfigError", "Expired", "Permanent", "Rejected", "StoreUnavailable", "Transient", "Untrusted"]


class CibrokerError(Exception):
    """Base of every error cibroker raises on purpose."""


class Rejected(CibrokerError):
    """A webhook or API request we refuse, with the HTTP status to answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Permanent(CibrokerError):
    """Retrying will not help; report the failure with this reason."""


class Transient(CibrokerError):
    """Retrying later may help."""

    def __init__(self, reason: str, *, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class StoreUnavailable(Transient):
    """The delivery store (Redis) did not answer."""


class Expired(Transient):
    """A watch's resourceVersion is too old (HTTP 410 Gone): list again and resume."""


class Untrusted(Permanent):
    """Input that fails an authenticity check (a forged run, a forged or altered request).

    Never retried and never acted on: the caller logs one warning with the reason, counts
    it, and moves on.
    """
