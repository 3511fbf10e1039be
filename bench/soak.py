"""Soak: thousands of deliveries with random worker kills, then count what the promise lost.

Real `cibroker serve`, `cibroker worker` and `cibroker watcher` processes (tests/support/stack.py's
Stack), a real redis-server (AOF, fsync always), the fake Kubernetes API moved by the Tekton
and rollout simulators, the fake GitLab that enforces GitLab's commit-status state machine.

Deliveries are sent open-loop at --rate/s from a thread pool: mostly new pushes to one of
--branches branches (b/<n>, with every 50th push to main, which deploys to staging), and
--resend-share of them a resend of an earlier delivery with the same Idempotency-Key (GitLab
does that after a timeout): those must be answered `duplicate`. A 503 or a refused
connection is resent later with the same key, as GitLab would. Every --kill-every seconds
(jittered) the worker is killed with SIGKILL and started again.

After the last delivery it waits (up to --drain s) for every run to end and be reported, then
counts from the outside (tests/support/stack.py `measure`): deliveries accepted, PipelineRuns, runs
duplicated, deliveries lost (accepted, no run), commits left pending (a run ended, its commit
status did not), statuses out of order, and accept latency percentiles.

    .venv/bin/python bench/soak.py [--quick] [--deliveries 10000] [--rate 40] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from tests.support.fakes.githost_api import FakeGitLab  # noqa: E402
from tests.support.fakes.kube_api import FakeKubeAPI  # noqa: E402
from tests.support.fakes.rollout import RolloutSimulator  # noqa: E402
from tests.support.fakes.tekton import TektonSimulator  # noqa: E402
from tests.support.stack import Stack, hook_headers, measure, push_body  # noqa: E402
from tests.support import GitOrigin, RedisServer  # noqa: E402


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


class Sender:
    """Sends deliveries as GitLab would: resends on 503 / connection errors, with the same key."""

    def __init__(self, stack: Stack, *, workers: int = 16) -> None:
        self.stack = stack
        self.client = httpx.Client(base_url=stack.url, timeout=15, limits=httpx.Limits(max_connections=workers))
        self.pool = ThreadPoolExecutor(workers)
        self.lock = threading.Lock()
        self.accepted: dict[str, str] = {}  # key -> delivery id
        self.answers: Counter[str] = Counter()
        self.latency: list[float] = []
        self.retries = 0
        self.problems: list[str] = []

    def send(self, key: str, body: bytes, *, expect_duplicate: bool) -> None:
        for _attempt in range(30):
            started = time.perf_counter()
            try:
                r = self.client.post("/hooks/gitlab", content=body, headers=hook_headers(key))
            except httpx.TransportError:
                with self.lock:
                    self.answers["transport error"] += 1
                    self.retries += 1
                time.sleep(1)
                continue
            took = time.perf_counter() - started
            with self.lock:
                self.answers[str(r.status_code)] += 1
                if r.status_code == 503:
                    self.retries += 1
                elif r.status_code == 202:
                    self.latency.append(took)
                    self.accepted[key] = r.json()["delivery_id"]
                    if expect_duplicate:
                        self.problems.append(f"resend of {key} accepted as new")
                elif r.status_code == 200 and r.json().get("decision") == "duplicate":
                    self.answers["duplicate"] += 1
                    if not expect_duplicate and key not in self.accepted:
                        self.accepted[key] = r.json()["delivery_id"]  # an earlier attempt was stored, its answer lost
                else:
                    self.problems.append(f"{key}: {r.status_code} {r.text[:200]}")
            if r.status_code != 503:
                return
            time.sleep(1)
        with self.lock:
            self.problems.append(f"{key}: gave up after 30 attempts")

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.client.close()


def killer(stack: Stack, stop: threading.Event, every: float, kills: list[float]) -> None:
    rng = random.Random(7)
    while not stop.wait(every * rng.uniform(0.5, 1.5)):
        stack.kill("worker")
        stack.start("worker", concurrency=4)
        kills.append(time.time())


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deliveries", type=int, default=10_000)
    ap.add_argument("--rate", type=float, default=40.0, help="deliveries per second (open loop)")
    ap.add_argument("--branches", type=int, default=400)
    ap.add_argument("--resend-share", type=float, default=0.15)
    ap.add_argument("--kill-every", type=float, default=20.0, help="seconds between worker kill -9s (jittered)")
    ap.add_argument("--drain", type=float, default=600.0)
    ap.add_argument("--quick", action="store_true", help="600 deliveries, a kill every 8 s")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.quick:
        args.deliveries, args.kill_every, args.drain = 600, 8.0, 180.0
    rng = random.Random(42)
    tmp = Path(tempfile.mkdtemp(prefix="cibroker-soak-"))
    server = RedisServer(workdir=tmp / "redis")
    server.start()
    kube = FakeKubeAPI(bookmark_interval=1.0).start()
    gitlab = FakeGitLab(projects={42: "acme/shop-api"})
    gitlab.start()
    # The Git host's repository: one commit per delivery in one line of history (one `git fast-import`), no
    # branch yet. Each push first moves its branch to its commit (`git push`), so every worker's check that the
    # commit is real (one ls-remote; ancestry in its mirror when the branch moved on since) meets real git.
    origin = GitOrigin.create(tmp / "origin.git", commits=args.deliveries, branches={})
    # Visibility timeout above the retry countdowns that occur here: kombu redelivers an ETA task held
    # longer than it (each sweep), which multiplies copies of long-countdown retries.
    # The watcher's resync at its production default (60 s; the test stack uses 5 s): each resync
    # lists every run, and here there are thousands.
    stack = Stack(tmp, server.url, kube, gitlab, origin=origin, CIBROKER_LOG_LEVEL="warning",
                  CIBROKER_VISIBILITY_TIMEOUT_SECONDS="30", CIBROKER_RESYNC_SECONDS="60")
    tekton = TektonSimulator(kube, auto_start=0.3, auto_finish=1.5)
    rollout = RolloutSimulator(kube)
    stop = threading.Event()
    kills: list[float] = []
    result: dict[str, Any] = {}
    try:
        stack.start("serve")
        stack.start("worker", concurrency=4)
        stack.start("watcher")
        sender = Sender(stack)
        kill_thread = threading.Thread(target=killer, args=(stack, stop, args.kill_every, kills), daemon=True)
        kill_thread.start()
        sent_keys: list[str] = []
        bodies: dict[str, bytes] = {}
        heads: dict[str, str] = {}
        started = time.monotonic()
        for i in range(args.deliveries):
            due = started + i / args.rate
            if (wait := due - time.monotonic()) > 0:
                time.sleep(wait)
            if sent_keys and rng.random() < args.resend_share:
                key = rng.choice(sent_keys)
                sender.pool.submit(sender.send, key, bodies[key], expect_duplicate=True)
                continue
            branch = "main" if i % 50 == 0 else f"b/{rng.randrange(args.branches)}"
            sha = origin.sha(i + 1)
            key = f"soak-{i}"
            body = push_body(sha=sha, ref=f"refs/heads/{branch}", before=heads.get(branch, "0" * 40))
            heads[branch] = sha
            origin.move(branch, sha)
            bodies[key] = body
            sent_keys.append(key)
            sender.pool.submit(sender.send, key, body, expect_duplicate=False)
        send_seconds = time.monotonic() - started
        sender.close()
        stop.set()
        kill_thread.join()
        ids = list(sender.accepted.values())
        records: dict[str, Any] = {}
        with ThreadPoolExecutor(16) as pool:
            for delivery_id, record in zip(ids, pool.map(stack.delivery, ids)):
                records[delivery_id] = record
        drain_started = time.monotonic()
        while True:
            outcome = measure(stack, ids, records=records)
            if not outcome.problems or time.monotonic() - drain_started > args.drain:
                break
            time.sleep(15)  # each check lists every run and status: not too often while the workers drain
        drained = time.monotonic() - drain_started
        time.sleep(3)
        outcome = measure(stack, ids, records=records)
        distinct = len({(r["push"]["ref"], r["push"]["sha"]) for r in records.values()})
        result = {
            "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}",
            "command": "bench/soak.py " + " ".join(argv),
            "deliveries_sent": args.deliveries, "send_seconds": round(send_seconds, 1), "rate": args.rate,
            "answers": dict(sender.answers), "resends_after_503_or_error": sender.retries,
            "accepted": len(ids), "distinct_pushes": distinct, "worker_kills": len(kills),
            "pipelineruns": outcome.runs, "duplicated": outcome.duplicated_runs, "lost": outcome.lost,
            "left_pending": outcome.pending, "out_of_order": outcome.out_of_order, "run_states": dict(outcome.by_state),
            "deploys": outcome.deploys, "statuses_posted": outcome.statuses_posted,
            "accept_p50_ms": round((pct(sender.latency, 50) or 0) * 1000, 1),
            "accept_p99_ms": round((pct(sender.latency, 99) or 0) * 1000, 1),
            "accept_max_ms": round(max(sender.latency, default=0) * 1000, 1),
            "drain_seconds": round(drained, 1), "problems": (sender.problems + outcome.problems)[:20],
            "problem_count": len(sender.problems) + len(outcome.problems),
        }
    finally:
        stop.set()
        stack.stop()
        tekton.stop()
        rollout.stop()
        kube.stop()
        gitlab.stop()
        server.stop()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if result and not result["problem_count"] else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
