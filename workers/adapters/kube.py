"""The Cluster port over the official `kubernetes` client: the only module that imports it.

Verbs are small and keyword-only; each one makes one API call (two for an AlreadyExists
create) and hands back plain JSON dicts exactly as the API server sent them, never client
model objects. Every `ApiException` and urllib3 error is translated here, with the library
exception chained as `__cause__`:

    404                       -> None / False where the port says so, else Permanent
    409 AlreadyExists (create) -> the existing object and created=False
    409 Conflict, 5xx, 0, timeouts, refused or cut connections -> Transient
    429 (and 503) with Retry-After -> Transient(retry_after=seconds)
    410 Gone, or a watch ERROR event with code 410 -> Expired (list again, watch from there)
    401, 403                  -> Permanent naming verb, resource and namespace (what RBAC lacks)
    400, 415, 422 and other 4xx -> Permanent with the API's own message

It must not retry: retrying is the caller's policy, driven by Transient. That includes
urllib3's habit of sleeping through a 429/503 Retry-After inside a GET, which
`api_client_for()` switches off.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

import kubernetes
import urllib3
from kubernetes.client.exceptions import ApiException
from kubernetes.config import incluster_config

from broker.core.errors import CibrokerError, ConfigError, Expired, Permanent, Transient
from broker.core.watch import WatchEvent

TEKTON = "tekton.dev"
FIELD_MANAGER = "cibroker"

# (API group, resource, verb) for every call this adapter can make; RBAC is derived from it.
RBAC: frozenset[tuple[str, str, str]] = frozenset({
    (TEKTON, "pipelineruns", "create"),
    (TEKTON, "pipelineruns", "get"),
    (TEKTON, "pipelineruns", "list"),
    (TEKTON, "pipelineruns", "watch"),
    (TEKTON, "pipelineruns", "patch"),
    (TEKTON, "pipelineruns", "delete"),
    (TEKTON, "taskruns", "list"),
    ("", "serviceaccounts", "get"),
    ("apps", "deployments", "get"),
    ("apps", "deployments", "patch"),
})

# The subset the on-call API and dashboard use (broker/services/oncall.py): read runs and TaskRuns, nothing
# else. A cancel or a deploy-only re-run is a signed request in Redis that a worker carries out, so
# whoever holds the on-call identity cannot patch a run (or its labels) directly.
ONCALL_RBAC: frozenset[tuple[str, str, str]] = frozenset({
    (TEKTON, "pipelineruns", "get"),
    (TEKTON, "pipelineruns", "list"),
    (TEKTON, "taskruns", "list"),
})
assert ONCALL_RBAC <= RBAC

# Reconnect a few times, re-read an idempotent GET once, and never sleep on a status code.
RETRIES = urllib3.util.Retry(total=3, connect=3, read=1, redirect=0, status=0, other=0,
                             respect_retry_after_header=False)
_CONNECT_TIMEOUT = 5.0
_WATCH_READ_SLACK = 30.0  # the server ends a watch at timeoutSeconds; give it this long to say so


class _NotFound(Permanent):
    """404. Private: verbs for which absence is an answer catch it; elsewhere it is Permanent."""


class _AlreadyExists(Permanent):
    """409 AlreadyExists. Private: create_pipelinerun turns it into (existing, False)."""


def api_client_for(configuration: kubernetes.client.Configuration) -> kubernetes.client.ApiClient:
    """An ApiClient whose transport never retries on a status code (see RETRIES)."""
    configuration.retries = RETRIES
    return kubernetes.client.ApiClient(configuration)


class KubeCluster:
    """broker.ports.Cluster for Tekton PipelineRuns, ServiceAccounts and Deployments."""

    def __init__(self, api_client: kubernetes.client.ApiClient, *, tekton_version: str = "v1",
                 request_timeout: float = 30.0) -> None:
        self.api_client = api_client
        self._custom = kubernetes.client.CustomObjectsApi(api_client)
        self._core = kubernetes.client.CoreV1Api(api_client)
        self._apps = kubernetes.client.AppsV1Api(api_client)
        self._version = tekton_version
        self._timeout = (min(_CONNECT_TIMEOUT, request_timeout), request_timeout)

    @classmethod
    def from_environment(cls, *, tekton_version: str = "v1",
                         environ: Mapping[str, str] | None = None) -> KubeCluster:
        """In-cluster config when KUBERNETES_SERVICE_HOST is set, else kubeconfig (KUBECONFIG or ~/.kube/config)."""
        environ = os.environ if environ is None else environ
        configuration = kubernetes.client.Configuration()
        try:
            if environ.get("KUBERNETES_SERVICE_HOST"):
                incluster_config.InClusterConfigLoader(
                    token_filename=incluster_config.SERVICE_TOKEN_FILENAME,
                    cert_filename=incluster_config.SERVICE_CERT_FILENAME, environ=environ,
                ).load_and_set(configuration)
            else:
                kubernetes.config.load_kube_config(config_file=environ.get("KUBECONFIG", "~/.kube/config"),
                                                   client_configuration=configuration, persist_config=False)
        except (kubernetes.config.ConfigException, OSError) as exc:
            raise ConfigError([f"kubernetes: cannot load cluster credentials: {exc}"]) from exc
        return cls(api_client_for(configuration), tekton_version=tekton_version)

    def close(self) -> None:
        self.api_client.close()

    # -- PipelineRuns ----------------------------------------------------------------------

    def create_pipelinerun(self, body: Mapping[str, Any], *, namespace: str) -> tuple[Mapping[str, Any], bool]:
        try:
            with _boundary("create", "pipelineruns", namespace):
                return _json(self._custom.create_namespaced_custom_object(
                    TEKTON, self._version, namespace, "pipelineruns", _plain(body), field_manager=FIELD_MANAGER,
                    _preload_content=False, _request_timeout=self._timeout)), True
        except _AlreadyExists as exc:
            name = body["metadata"]["name"]
            existing = self.get_pipelinerun(namespace=namespace, name=name)
            if existing is None:
                raise Transient(f"pipelinerun {namespace}/{name} already existed, then vanished") from exc
            return existing, False

    def get_pipelinerun(self, *, namespace: str, name: str) -> Mapping[str, Any] | None:
        try:
            with _boundary("get", "pipelineruns", namespace):
                return _json(self._custom.get_namespaced_custom_object(
                    TEKTON, self._version, namespace, "pipelineruns", name,
                    _preload_content=False, _request_timeout=self._timeout))
        except _NotFound:
            return None

    def list_pipelineruns(self, *, namespace: str, selector: str) -> tuple[list[Mapping[str, Any]], str]:
        with _boundary("list", "pipelineruns", namespace):
            answer = _json(self._custom.list_namespaced_custom_object(
                TEKTON, self._version, namespace, "pipelineruns", label_selector=selector or None,
                _preload_content=False, _request_timeout=self._timeout))
        return answer.get("items") or [], str(answer["metadata"]["resourceVersion"])

    def watch_pipelineruns(self, *, namespace: str, selector: str, resource_version: str,
                           timeout_seconds: int) -> Iterator[WatchEvent]:
        # Lines are read off the raw stream rather than through kubernetes.watch.Watch: same speed here,
        # but no hidden 410 retry loop, no second ApiClient, and ERROR events are ours to translate.
        # A generator: the request goes out on the first next(), and closing it closes the stream.
        with _boundary("watch", "pipelineruns", namespace):
            response = self._custom.list_namespaced_custom_object(
                TEKTON, self._version, namespace, "pipelineruns", label_selector=selector or None, watch=True,
                resource_version=resource_version or None, allow_watch_bookmarks=True,
                timeout_seconds=timeout_seconds, _preload_content=False,
                _request_timeout=(self._timeout[0], timeout_seconds + _WATCH_READ_SLACK))
        try:
            with _boundary("watch", "pipelineruns", namespace):
                for line in response:
                    if line.strip():
                        yield _watch_event(line, namespace=namespace)
        finally:
            response.close()
            response.release_conn()

    def patch_pipelinerun(self, *, namespace: str, name: str, patch: Mapping[str, Any]) -> Mapping[str, Any]:
        with _boundary("patch", "pipelineruns", namespace):
            return _json(self._custom.patch_namespaced_custom_object(
                TEKTON, self._version, namespace, "pipelineruns", name, _plain(patch), field_manager=FIELD_MANAGER,
                _content_type="application/merge-patch+json", _preload_content=False,
                _request_timeout=self._timeout))

    def delete_pipelinerun(self, *, namespace: str, name: str) -> None:
        try:
            with _boundary("delete", "pipelineruns", namespace):
                self._custom.delete_namespaced_custom_object(
                    TEKTON, self._version, namespace, "pipelineruns", name, propagation_policy="Background",
                    _preload_content=False, _request_timeout=self._timeout)
        except _NotFound:
            return

    def list_taskruns(self, *, namespace: str, pipelinerun: str) -> list[Mapping[str, Any]]:
        with _boundary("list", "taskruns", namespace):
            answer = _json(self._custom.list_namespaced_custom_object(
                TEKTON, self._version, namespace, "taskruns", label_selector=f"{TEKTON}/pipelineRun={pipelinerun}",
                _preload_content=False, _request_timeout=self._timeout))
        return answer.get("items") or []

    # -- ServiceAccounts and Deployments ---------------------------------------------------

    def service_account_exists(self, *, namespace: str, name: str) -> bool:
        try:
            with _boundary("get", "serviceaccounts", namespace):
                _json(self._core.read_namespaced_service_account(
                    name, namespace, _preload_content=False, _request_timeout=self._timeout))
                return True
        except _NotFound:
            return False

    def get_deployment(self, *, namespace: str, name: str) -> Mapping[str, Any] | None:
        try:
            with _boundary("get", "deployments", namespace):
                return _json(self._apps.read_namespaced_deployment(
                    name, namespace, _preload_content=False, _request_timeout=self._timeout))
        except _NotFound:
            return None

    def patch_deployment(self, *, namespace: str, name: str, patch: Mapping[str, Any]) -> Mapping[str, Any]:
        with _boundary("patch", "deployments", namespace):
            return _json(self._apps.patch_namespaced_deployment(
                name, namespace, _plain(patch), field_manager=FIELD_MANAGER,
                _content_type="application/strategic-merge-patch+json", _preload_content=False,
                _request_timeout=self._timeout))


# -- the boundary ---------------------------------------------------------------------------

_GROUPS = {"pipelineruns": TEKTON, "taskruns": TEKTON, "serviceaccounts": "", "deployments": "apps"}


@contextlib.contextmanager
def _boundary(verb: str, resource: str, namespace: str) -> Iterator[None]:
    """Translate the client's exceptions raised inside the block into cibroker's error tree."""
    try:
        yield
    except ApiException as exc:
        raise _from_status(exc.status or 0, _api_message(exc), verb=verb, resource=resource, namespace=namespace,
                           retry_after=_retry_after(exc), reason=_api_reason(exc)) from exc
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise Transient(f"{verb} {_qualified(resource)} in namespace {namespace!r}: "
                        f"{type(exc).__name__}: {exc}") from exc


def _from_status(code: int, message: str, *, verb: str, resource: str, namespace: str,
                 retry_after: float | None = None, reason: str = "") -> CibrokerError:
    what = f"{verb} {_qualified(resource)} in namespace {namespace!r}"
    if code == 404:
        return _NotFound(f"{what}: not found: {message}")
    if code == 409 and reason == "AlreadyExists":
        return _AlreadyExists(f"{what}: {message}")
    if code == 410:
        return Expired(f"{what}: resourceVersion expired: {message}")
    if code in (401, 403):
        return Permanent(f"{what}: {'unauthorized' if code == 401 else 'forbidden'} ({code}); the service account "
                         f"needs RBAC verb {verb!r} on {resource!r} in API group {_GROUPS[resource]!r} in namespace "
                         f"{namespace!r}: {message}")
    if code in (0, 408, 409, 429) or code >= 500:
        return Transient(f"{what}: {code} {message}", retry_after=retry_after)
    return Permanent(f"{what}: rejected ({code}): {message}")


def _watch_event(line: bytes | str, *, namespace: str) -> WatchEvent:
    try:
        event = json.loads(line)
    except ValueError as exc:
        raise Transient(f"watch pipelineruns in namespace {namespace!r}: unreadable event line") from exc
    if event.get("type") == "ERROR":
        status = event.get("object") or {}
        raise _from_status(int(status.get("code") or 0), str(status.get("message", "")), verb="watch",
                           resource="pipelineruns", namespace=namespace, reason=str(status.get("reason", "")))
    return WatchEvent(type=event["type"], object=event["object"])


def _json(response: Any) -> dict[str, Any]:
    """The body of an un-preloaded urllib3 response (reading it whole returns the connection to the pool)."""
    try:
        return json.loads(response.data)
    except ValueError as exc:
        raise Transient(f"the API server answered {response.status} with a body that is not JSON") from exc


def _plain(value: Any) -> Any:
    """Mappings and sequences as the dicts and lists the client's JSON encoder accepts."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _qualified(resource: str) -> str:
    group = _GROUPS.get(resource, "")
    return f"{resource}.{group}" if group else resource


def _status_body(exc: ApiException) -> dict[str, Any]:
    try:
        body = json.loads(exc.body or "")
    except (TypeError, ValueError):
        return {}
    return body if isinstance(body, dict) else {}


def _api_message(exc: ApiException) -> str:
    return str(_status_body(exc).get("message") or exc.reason or "")


def _api_reason(exc: ApiException) -> str:
    return str(_status_body(exc).get("reason") or "")


def _retry_after(exc: ApiException) -> float | None:
    """Seconds from the Retry-After header (delta or HTTP date), else from Status details."""
    value = (exc.headers or {}).get("Retry-After")
    if value is not None:
        try:
            return max(float(value), 0.0)
        except ValueError:
            when = email.utils.parsedate_to_datetime(value) if email.utils.parsedate_tz(value) else None
            if when is not None:
                return max(when.timestamp() - time.time(), 0.0)
    seconds = (_status_body(exc).get("details") or {}).get("retryAfterSeconds")
    return float(seconds) if isinstance(seconds, int | float) else None
