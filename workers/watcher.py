"""The watcher: follows every managed PipelineRun to its end and hands each change to a worker.

One watch stream per namespace (label selector managed-by=cibroker), resumed from
the last resourceVersion with bookmarks; 410 Gone -> list again and resume; any
stream error -> reconnect with capped, jittered backoff. Every `resync_seconds` the
stream ends and the namespace is listed again, so a missed event or a restart never
leaves a commit pending. Connections are O(namespaces), not O(runs).

The watcher itself posts nothing: it submits the id (namespace, name) of each run whose
state moved past what its annotation says was reported, and a Celery task re-reads the run
and reports it. Two watchers are safe: reports are claimed in order, so duplicates are no-ops.

Only runs that are cibroker's are submitted (`trust`: broker.services.provenance, one Redis read per
run, then cached); a forged or altered run is ignored with one warning line and a metric,
however many events it makes.

A run is submitted once per state; a resync submits it again only when that report has
not landed within `resubmit_seconds` (a report that failed for good). Resubmitting on
every resync fed back on itself: under a backlog, every resync queued another report
per lagging run (the soak saw 107,000 queued reports for 8,500 runs).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from broker.core.errors import CibrokerError, Expired
from broker.logging import get_logger
from broker.core.runlabels import A_REPORTED, SELECTOR
from broker.core.status import CommitState
from broker.ports import Counters, RunLedger, RunWatch, Stranded
from broker.services.provenance import RunVerifier, trust_filter
from broker.services.sweep import sweeper
from config.settings import Settings
from broker.core.reporting import is_final, parse_state, run_state, should_report

log = get_logger("cibroker.watcher")
BACKOFF_CAP = 30.0


class Watcher:
    def __init__(
        self,
        cluster: RunWatch,
        namespaces: Iterable[str],
        *,
        submit: Callable[[Mapping[str, Any]], None],
        resync_seconds: int = 60,
        resubmit_seconds: float | None = None,
        sleep: Callable[[float], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sweep: Callable[[], int] | None = None,
        trust: Callable[[Mapping[str, Any]], bool] | None = None,
    ) -> None:
        self.cluster = cluster
        self.namespaces = sorted(set(namespaces))
        self.submit = submit
        self.resync_seconds = resync_seconds
        self.stop = threading.Event()
        self._sleep = sleep or self.stop.wait
        self._lock = threading.Lock()
        self.resubmit_seconds = resubmit_seconds if resubmit_seconds is not None else max(300.0, 5.0 * resync_seconds)
        self._clock = clock
        self._submitted: dict[str, tuple[CommitState, float]] = {}  # run -> (state submitted, when)
        self.sweep = sweep  # every resync period: deliveries whose task was lost are queued again
        self.trust = trust  # is this run cibroker's? (it logs and counts the ones that are not)
        self.stats = {"lists": 0, "watches": 0, "events": 0, "submitted": 0, "expired": 0, "errors": 0, "untrusted": 0}

    def run(self) -> None:
        """Follow every namespace until `stop` is set (one thread per namespace)."""
        threads = [threading.Thread(target=self.follow, args=(ns,), name=f"watch-{ns}", daemon=True) for ns in self.namespaces]
        if self.sweep is not None:
            threading.Thread(target=self._sweeping, name="sweep", daemon=True).start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _sweeping(self) -> None:
        assert self.sweep is not None
        while not self.stop.wait(self.resync_seconds):
            try:
                self.sweep()
            except CibrokerError as exc:  # Redis away: the next period tries again
                log.warning("sweep_failed", error=str(exc))

    def follow(self, namespace: str) -> None:
        version, failures = "", 0
        while not self.stop.is_set():
            try:
                if not version:
                    version = self.resync(namespace)
                self.stats["watches"] += 1
                for event in self.cluster.watch_pipelineruns(
                    namespace=namespace, selector=SELECTOR, resource_version=version, timeout_seconds=self.resync_seconds
                ):
                    if self.stop.is_set():
                        return
                    self.stats["events"] += 1
                    if event.type in ("ADDED", "MODIFIED"):
                        self.consider(event.object)
                    version = event.resource_version or version  # only once handed on: a failed submit is replayed
                version = ""  # the window ended: list again (periodic resync), then watch on
                failures = 0
            except Expired:
                self.stats["expired"] += 1
                log.info("watch_expired", namespace=namespace)
                version = ""
            except CibrokerError as exc:
                self.stats["errors"] += 1
                failures += 1
                delay = random.uniform(0, min(BACKOFF_CAP, 0.5 * 2**failures))
                log.warning("watch_failed", namespace=namespace, error=str(exc), retry_in=round(delay, 2))
                self._sleep(delay)

    def resync(self, namespace: str) -> str:
        items, version = self.cluster.list_pipelineruns(namespace=namespace, selector=SELECTOR)
        self.stats["lists"] += 1
        with self._lock:  # forget runs that are gone (deleted before their end was reported)
            horizon = self._clock() - 2 * self.resubmit_seconds
            for key in [k for k, (_, at) in self._submitted.items() if k.startswith(f"{namespace}/") and at < horizon]:
                del self._submitted[key]
        for obj in items:
            self.consider(obj)
        return version

    def consider(self, obj: Mapping[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        key = f"{meta.get('namespace')}/{meta.get('name')}"
        state = run_state(obj)
        reported = parse_state((meta.get("annotations") or {}).get(A_REPORTED))
        with self._lock:
            if not should_report(reported, state):
                if is_final(reported):
                    self._submitted.pop(key, None)
                return
            now = self._clock()
            previous = self._submitted.get(key)
            if previous is not None and previous[0] is state and now - previous[1] < self.resubmit_seconds:
                return  # submitted already; its report is queued or under way
        if self.trust is not None and not self.trust(obj):  # Transient (Redis away): the stream backs off and replays
            self.stats["untrusted"] += 1
            return
        with self._lock:
            self._submitted[key] = (state, now)
        try:
            self.submit(obj)
        except CibrokerError:
            with self._lock:
                self._submitted.pop(key, None)
            raise
        self.stats["submitted"] += 1


class WatcherStore(RunLedger, Counters, Stranded, Protocol):
    """What the watcher reads and writes: run ownership (trust), counters, the stranded-delivery sweep."""


def build_watcher(settings: Settings, cluster: RunWatch, *, store: WatcherStore,
                  submit: Callable[[Mapping[str, Any]], None]) -> Watcher:
    """The watcher the `watcher` and `dev` commands run: namespaces from the routing file, runs checked for
    trust, and the stranded-delivery sweep every resync (`dev` too: kombu's window is the same on a laptop)."""
    env = settings.env
    verifier = RunVerifier(key=settings.require_signing_key(), routing=settings.routing, lookup=store.delivery_run)
    namespaces = sorted({r.namespace or settings.routing.defaults.namespace for r in settings.routing.routes})
    return Watcher(cluster, namespaces, submit=submit, resync_seconds=env.resync_seconds,
                   sweep=sweeper(store, queue=env.queue, resync_seconds=env.resync_seconds),
                   trust=trust_filter(verifier, store))
