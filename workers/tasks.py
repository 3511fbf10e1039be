"""Celery tasks: thin and idempotent, ids in and out; the work lives in services.

`process_delivery` is where orchestration (PipelineRun creation, issue 3) will start.
Today it records, in the delivery's decision log, that a worker took the delivery:
the ingest path (edge -> Redis -> worker) is complete, the orchestration is not.
"""

from __future__ import annotations

import socket
import time

from celery import Celery

from broker.delivery import PROCESS_TASK, log_entry
from broker.logging import get_logger
from broker.store import SyncStore

log = get_logger("cibroker.worker")


def register(app: Celery, *, store: SyncStore) -> None:
    worker_name = socket.gethostname()

    @app.task(name=PROCESS_TASK, acks_late=True, reject_on_worker_lost=True, shared=False)
    def process_delivery(delivery_id: str) -> None:
        found = store.get(delivery_id)
        if found is None:
            log.warning("delivery_missing", delivery_id=delivery_id)
            return
        if found["state"] != "queued":
            log.info("delivery_already_taken", delivery_id=delivery_id, state=found["state"])
            return
        store.append_log(
            delivery_id,
            log_entry("picked_up", f"worker {worker_name} took the delivery; PipelineRun orchestration is not built yet", at=time.time()),
            state="picked_up",
        )
        log.info("delivery_picked_up", delivery_id=delivery_id, repo=(found.get("push") or {}).get("repo"))
