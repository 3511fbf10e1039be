"""The one error config raises: the routing file or the environment is wrong.

It lives here, not in broker.core.errors, because config imports nothing from broker;
broker.core.errors re-exports it as part of the one error tree.
"""

from __future__ import annotations


class ConfigError(Exception):
    """The configuration is invalid; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
