"""The CLI's remote mode: the same on-call verbs as `broker.services.oncall`, over the HTTP API.

`cibroker rerun --server URL` and friends talk to a broker's `/api/*` with a bearer
token instead of to Redis and the cluster; answers are the same dicts, and the API's
errors come back as the same exceptions (NotFound, Refused, NoCluster, Permanent),
so the CLI prints one clear line either way. The one httpx user on the broker side.
"""

from __future__ import annotations

from typing import Any

import httpx

from broker.core.errors import Permanent, Transient
from broker.services.oncall import Actor, NoCluster, NotConfigured, NotFound, Refused


class ApiClient:
    def __init__(self, server: str, *, token: str | None, actor: str, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        headers = {"X-Cibroker-Actor": actor, "User-Agent": "cibroker-cli"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=server.rstrip("/"), headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            answer = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise Transient(f"cannot reach {self._http.base_url}: {type(exc).__name__}: {exc}") from exc
        try:
            body = answer.json()
        except ValueError:
            body = {"error": answer.text[:200]}
        if answer.is_success:
            return body
        error = body.get("error", answer.reason_phrase) if isinstance(body, dict) else answer.reason_phrase
        message = f"{answer.status_code} from {self._http.base_url}: {error}"
        if answer.status_code == 404:
            raise NotFound(message)
        if answer.status_code == 409:
            raise Refused(message)
        if answer.status_code == 503 and "Kubernetes" in str(error):
            raise NoCluster(message)
        if answer.status_code == 503 and "SIGNING_KEY" in str(error):
            raise NotConfigured(message)
        if answer.status_code >= 500:
            raise Transient(message)
        raise Permanent(message)

    # The same verbs, names and keyword arguments as broker.services.oncall.Operations.

    def deliveries(self, *, limit: int = 50, repo: str | None = None, state: str | None = None) -> list[dict[str, Any]]:
        params = {k: v for k, v in {"limit": limit, "repo": repo, "state": state}.items() if v is not None}
        return self._call("GET", "/api/deliveries", params=params)

    def delivery(self, delivery_id: str) -> dict[str, Any]:
        return self._call("GET", f"/api/deliveries/{delivery_id}")

    def runs(self, *, repo: str | None = None, state: str | None = None, route: str | None = None,
             limit: int = 50) -> list[dict[str, Any]]:
        params = {k: v for k, v in {"limit": limit, "repo": repo, "state": state, "route": route}.items() if v is not None}
        return self._call("GET", "/api/runs", params=params)

    def run(self, run: str) -> dict[str, Any]:
        return self._call("GET", f"/api/runs/{run}")

    def rerun(self, *, actor: Actor, reason: str = "", delivery_id: str | None = None, run: str | None = None,
              repo: str | None = None, sha: str | None = None, ref: str | None = None, route: str | None = None,
              deploy_only: bool = False, force: bool = False, dry_run: bool = False) -> dict[str, Any]:
        body = {"reason": reason, "deploy_only": deploy_only, "dry_run": dry_run, "delivery_id": delivery_id, "run": run,
                "repo": repo, "sha": sha, "ref": ref, "route": route}
        if force:  # only sent when asked, so an older server (without the field) is never sent it by default
            body["force"] = True
        return self._call("POST", "/api/rerun", json={k: v for k, v in body.items() if v is not None})

    def cancel(self, run: str, *, actor: Actor, reason: str = "") -> dict[str, Any]:
        return self._call("POST", f"/api/runs/{run}/cancel", json={"reason": reason})

    def audit_log(self, *, limit: int = 100) -> list[dict[str, Any]]:
        return self._call("GET", "/api/audit", params={"limit": limit})
