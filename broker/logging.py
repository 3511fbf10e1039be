"""structlog set-up: JSON lines when not on a TTY, readable lines on one.

Context (delivery_id, host, repo, sha) is bound once per unit of work through
contextvars; event names are snake_case facts. Never log bodies, tokens or whole
header sets.
"""

from __future__ import annotations

import logging
import sys

import structlog


def configure(*, fmt: str = "auto", level: str = "info", always: dict[str, str] | None = None) -> None:
    """`always` adds fixed keys to every line of the process (e.g. mode=dry-run), from every thread."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    fixed = dict(always or {})

    def add_fixed(logger: object, name: str, event: dict) -> dict:  # type: ignore[type-arg]
        return {**fixed, **event} if fixed else event

    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_fixed,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)
