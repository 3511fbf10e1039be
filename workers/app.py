"""The Celery application, built from Settings (never at import time).

Tasks must not be lost: acks_late with reject_on_worker_lost, so a killed worker's
task is redelivered after the visibility timeout; prefetch 1, so a worker holds no
task it is not running.
"""

from __future__ import annotations

from celery import Celery

from broker.embedded import kombu_url
from broker.store import SyncStore
from config.settings import Settings
from workers import tasks

VISIBILITY_TIMEOUT_SECONDS = 3600


def create_celery(settings: Settings) -> Celery:
    env = settings.env
    assert env.redis_url is not None, "resolve the Redis URL (or start the embedded one) first"
    url = env.redis_url.get_secret_value()
    app = Celery("cibroker", broker=kombu_url(url), set_as_current=False)
    app.conf.update(
        task_default_queue=env.queue,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_SECONDS},
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        accept_content=["json"],
        task_serializer="json",
    )
    store = SyncStore(url, timeout=env.redis_timeout_seconds)
    tasks.register(app, store=store)
    return app
