"""The stranded-delivery sweep: queue again the deliveries whose task a dying worker took with it."""

from __future__ import annotations

import time
from collections.abc import Callable

from broker.core.records import PROCESS_TASK, TaskCall, log_entry
from broker.logging import get_logger
from broker.ports import Stranded

log = get_logger("cibroker.sweep")

STRANDED_AFTER_SECONDS = 120.0


def sweeper(store: Stranded, *, queue: str, resync_seconds: float, older_than: float | None = None) -> Callable[[], int]:
    """What the watcher runs every resync: queue again the deliveries whose task a dying worker took with it.

    kombu's Redis transport pops a message before it records it as unacked; a worker killed in
    between loses it (celery/kombu#1836 and others). Such a delivery stays `queued` with its task
    nowhere: it is queued again under its own task id, so the worker's idempotent path (one
    PipelineRun per push, ordered status claims keyed by that id) makes it happen exactly once.
    """
    if older_than is None:
        older_than = max(STRANDED_AFTER_SECONDS, 2.0 * resync_seconds)

    def sweep() -> int:
        found = store.stranded(queue=queue, older_than=older_than)
        for record in found:
            delivery_id = record["delivery_id"]
            args: list[object] = [delivery_id] if not record.get("attempt") else [delivery_id, int(record["attempt"])]
            call = TaskCall(PROCESS_TASK, delivery_id, tuple(args), origin="cibroker-watcher")
            store.requeue(delivery_id, queue=queue, call=call, entry=log_entry(
                "requeued", f"still queued after {older_than:.0f} s and its task was neither waiting nor taken "
                "(a worker died while taking it): queued again", at=time.time()))
            log.warning("delivery_requeued", delivery_id=delivery_id, waited_seconds=older_than)
        return len(found)

    return sweep
