"""Status-report claims in Redis: forward only, and one post in flight at a time per commit status."""

from __future__ import annotations

from broker.adapters.redis_store import SyncStore

RUN, NAME = "ci/run-1", "cibroker/build-test-push"


def claim(store: SyncStore, state: str, rank: int, token: str, lease: float = 30.0) -> int:
    return store.claim_report(RUN, NAME, state=state, rank=rank, token=token, ttl=60, lease_seconds=lease)


def test_a_later_state_waits_while_the_earlier_post_is_in_flight(redis_url: str) -> None:
    """running is not posted while pending's POST has no answer yet, so the host sees them in order."""
    store = SyncStore(redis_url, timeout=2)
    assert claim(store, "pending", 1, "worker-task") == 1
    assert claim(store, "running", 2, "report-task") == -1  # pending is still on the wire
    store.release_report(RUN, NAME, state="pending", token="worker-task")
    assert claim(store, "running", 2, "report-task") == 1
    assert claim(store, "pending", 1, "worker-task") == 0  # a retry of pending now would go backwards
    assert store.reported(RUN) == {NAME: "running"}


def test_a_retry_of_the_same_post_may_claim_again_and_a_dead_posters_lease_runs_out(redis_url: str) -> None:
    store = SyncStore(redis_url, timeout=2)
    assert claim(store, "pending", 1, "t1", lease=0) == 1  # its poster dies without releasing; the lease is over
    assert claim(store, "pending", 1, "t1") == 1  # the redelivered task (same id) claims again
    assert claim(store, "success", 3, "t2") == -1
    store.release_report(RUN, NAME, state="pending", token="someone-else")  # only the holder releases
    assert claim(store, "success", 3, "t2") == -1
    store.release_report(RUN, NAME, state="pending", token="t1")
    assert claim(store, "success", 3, "t2") == 1
    assert claim(store, "failed", 3, "t3") == 0  # a final state is never replaced
