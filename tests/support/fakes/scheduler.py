"""A one-thread timer queue for the simulators: controllers act later, off the writer's thread."""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from typing import Any


class Scheduler:
    """Runs callbacks after a delay on one background thread; the first error is re-raised by stop()."""

    def __init__(self, name: str) -> None:
        self._queue: list[tuple[float, int, Callable[..., Any], tuple[Any, ...]]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._stopped = False
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> None:
        with self._wake:
            heapq.heappush(self._queue, (time.monotonic() + delay, next(self._order), fn, args))
            self._wake.notify()

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(5)
        if self.errors:
            raise self.errors[0]

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopped and (not self._queue or self._queue[0][0] > time.monotonic()):
                    self._wake.wait(self._queue[0][0] - time.monotonic() if self._queue else None)
                if self._stopped:
                    return
                _, _, fn, args = heapq.heappop(self._queue)
            try:
                fn(*args)
            except Exception as exc:  # kept for stop() to re-raise in the test's thread
                self.errors.append(exc)
