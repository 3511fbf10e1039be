"""The RBAC permission (group, resource, verb) a request to the fake API server needs."""

from __future__ import annotations

import re

from tests.support.fakes.kube_api import Request


def permission(request: Request) -> tuple[str, str, str]:
    match = re.match(r"^/apis?/(?:(?P<group>[^/]+)/)?v1\w*/namespaces/[^/]+/(?P<resource>[^/]+)(?P<item>/[^/]+)?",
                     request.path)
    assert match, request.path
    group = "" if request.path.startswith("/api/") else match["group"]
    verb = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}.get(request.method)
    if verb is None:
        verb = "watch" if request.is_watch else "get" if match["item"] else "list"
    return group, match["resource"], verb
