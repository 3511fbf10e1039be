#!/usr/bin/env python3
"""Ingest benchmark: how close does the broker's webhook edge get to a durable floor?

One run starts a fresh redis-server (AOF everysec) and, one at a time, these
endpoints, each a uvicorn subprocess with the same options (uvloop, httptools,
no access log, log level warning, same worker count):

  bare         Starlette: read the body, answer 202 (bench/baseline_apps.py)
  durable      the same + one Redis round trip: SET key NX EX + XADD MAXLEN ~ (the durable floor)
  broker       `cibroker serve` on a routing file, CIBROKER_LOG_LEVEL=warning
  broker-info  the same at the default CIBROKER_LOG_LEVEL=info, stderr to /dev/null

and loads each with wrk (bench/distinct.lua: every request a distinct delivery,
same ~8 KB GitLab push body) at each concurrency, after a warm-up. Any answer
other than 202, any wrk error, or a queue count that does not match the 202s
answered marks the run invalid (exit code 1). See bench/README.md.

    .venv/bin/python bench/ingest.py [--duration 10] [--workers 1 2] [--out bench/results/x.json]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import hashlib
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
LUA = BENCH / "distinct.lua"
SOURCE_PAYLOAD = ROOT / "tests" / "fixtures" / "corpus" / "gitlab" / "push-14-commits-real.json"
KEEP_COMMITS = 12  # the newest 12 of the 14 commits: compact JSON of 8170 bytes
BEFORE_SENTINEL = "e" * 40  # replaced per request by distinct.lua (and by smoke()), same length
SECRET = "bench-webhook-secret"
PATH = "/hooks/gitlab"
HEADERS = {"Content-Type": "application/json", "X-Gitlab-Event": "Push Hook", "X-Gitlab-Token": SECRET}
QUEUE = "cibroker"  # the broker's default CIBROKER_QUEUE
ENDPOINTS = ("bare", "durable", "broker", "broker-info")
ROUTING = """\
# Written by bench/ingest.py: one GitLab host, one route that takes the benchmark payload.
hosts:
  gitlab:
    kind: gitlab
    api_url: https://repository.server.com/api/v4   # the benchmark payload's project is on this host
    webhook_secrets: [{env: GITLAB_WEBHOOK_SECRET}]
routes:
  - name: bench
    host: gitlab
    repo: repo-org/repo-name
    events: {branches: [master]}
    pipeline: build-test-push
    image: registry.example.com/{repo}
"""


class SetupError(Exception):
    """The benchmark could not be set up (a process did not start, a tool is missing)."""


# --------------------------------------------------------------------------- children


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it if this script dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Children:
    """Every process started here, each in its own process group; all stopped at exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], *, env: dict[str, str], stderr: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                                start_new_session=True, preexec_fn=_die_with_parent)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
        """SIGTERM the child's process group (uvicorn supervisor and workers), SIGKILL what is left."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM and SIGHUP stop the run like Ctrl-C: servers stopped, results so far written."""
    raise KeyboardInterrupt


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def group_members(pgid: int) -> Iterator[tuple[int, list[str]]]:
    """(pid, /proc/<pid>/stat fields from field 3 on) of every live process in a process group."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # fields[0] is field 3 (state) of proc(5)
        if int(fields[2]) == pgid:
            yield int(entry), fields


def cpu_seconds(pgid: int) -> float:
    """CPU time (user + system, with reaped children) of every process in a process group, from /proc."""
    ticks = sum(sum(int(f) for f in fields[11:15]) for _, fields in group_members(pgid))  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


# --------------------------------------------------------------------------- body, machine, versions


def build_body() -> bytes:
    """The real 14-commit GitLab push, trimmed to its newest KEEP_COMMITS commits, as compact JSON (~8 KB)."""
    payload = json.loads(SOURCE_PAYLOAD.read_text(encoding="utf-8"))
    payload["commits"] = payload["commits"][-KEEP_COMMITS:]
    payload["before"] = BEFORE_SENTINEL  # distinct.lua makes it unique per request: every request a new push
    assert any(c["id"] == payload["checkout_sha"] for c in payload["commits"]), "the head commit must stay"
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    json.loads(body)
    return body


def _run_text(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    return (done.stdout + done.stderr).strip()


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kb = int(Path("/proc/meminfo").read_text().splitlines()[0].split()[1])
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
        "os": _run_text(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("uvicorn", "starlette", "redis", "uvloop", "httptools", "structlog", "cibroker"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    server = _run_text(["redis-server", "--version"])
    out["redis-server"] = next((p[2:] for p in server.split() if p.startswith("v=")), server)
    out["wrk"] = _run_text(["wrk", "-v"]).splitlines()[0].split(" Copyright")[0] if shutil.which("wrk") else "not installed"
    rev = _run_text(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = _run_text(["git", "-C", str(ROOT), "status", "--porcelain"])
    out["git"] = (rev if len(rev) < 20 and " " not in rev else "no commit") + (" (uncommitted changes)" if dirty else "")
    return out


# --------------------------------------------------------------------------- redis


@dataclass
class Redis:
    children: Children
    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> redis.Redis:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SetupError("redis-server is not installed (./run bench installs it)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = self.workdir / "redis.log"
        self.proc = self.children.start(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir), "--appendonly", "yes",
             "--appendfsync", "everysec", "--save", "", "--daemonize", "no", "--logfile", str(log)],
            env=dict(os.environ), stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                return client
            except redis.exceptions.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise SetupError(f"redis-server did not start: {tail(log)}") from None
                time.sleep(0.05)


def flush(client: redis.Redis) -> None:
    """Empty Redis and compact the AOF, so every measured point starts from the same state."""
    client.flushall()
    with contextlib.suppress(redis.exceptions.ResponseError):  # "already in progress" is fine
        client.bgrewriteaof()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        info = client.info("persistence")
        if not info.get("aof_rewrite_in_progress") and not info.get("aof_rewrite_scheduled"):
            return
        time.sleep(0.1)


def settled_count(count: Any, timeout: float = 10.0) -> int:
    """A counter once it stopped moving (requests wrk cut off at the end may still be landing)."""
    last, stable, deadline = count(), 0, time.monotonic() + timeout
    while stable < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
        now = count()
        stable = stable + 1 if now == last else 0
        last = now
    return int(last)


# --------------------------------------------------------------------------- endpoints


@dataclass
class Endpoint:
    name: str
    argv: list[str]
    env: dict[str, str]
    ready_path: str
    log: Path | None  # None: stderr goes to /dev/null
    count: str | None  # how to count stored deliveries in Redis: "llen", "dbsize" or None

    def describe(self) -> str:
        return " ".join(self.argv)


def endpoints(names: list[str], *, workers: int, redis_url: str, tmp: Path) -> list[Endpoint]:
    routing = tmp / "routing.yaml"
    routing.write_text(ROUTING)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("CIBROKER_", "GITLAB_", "GITHUB_", "GITEA_"))}
    # The baselines run through baseline_apps.py's launcher with exactly `cibroker serve`'s uvicorn options
    # (broker.edge.serving: the bounded httptools protocol, keep-alive, connection cap).
    uvicorn_opts = ["--workers", str(workers)]
    cibroker = Path(sys.executable).with_name("cibroker")
    if not cibroker.exists():
        cibroker = Path(shutil.which("cibroker") or "cibroker")
    broker_env = {**base_env, "CIBROKER_REDIS_URL": redis_url, "CIBROKER_LOG_FORMAT": "json",
                  "CIBROKER_STATE_DIR": str(tmp / "cibroker-state"), "GITLAB_WEBHOOK_SECRET": SECRET}
    out = []
    for name in names:
        port = free_port()
        if name in ("bare", "durable"):
            factory = "baseline_apps:bare_app" if name == "bare" else "baseline_apps:durable_app"
            out.append(Endpoint(
                name=name,
                argv=[sys.executable, str(BENCH / "baseline_apps.py"), factory, "--port", str(port), *uvicorn_opts],
                env={**base_env, "BENCH_REDIS_URL": redis_url}, ready_path="/healthz", log=tmp / f"{name}-w{workers}.log",
                count="dbsize" if name == "durable" else None,
            ))
        else:
            level = "warning" if name == "broker" else "info"
            out.append(Endpoint(
                name=name,
                argv=[str(cibroker), "serve", "--config", str(routing), "--port", str(port), "--workers", str(workers)],
                env={**broker_env, "CIBROKER_LOG_LEVEL": level}, ready_path="/readyz",
                log=tmp / f"{name}-w{workers}.log" if name == "broker" else None, count="llen",
            ))
    return out


def port_of(endpoint: Endpoint) -> int:
    return int(endpoint.argv[endpoint.argv.index("--port") + 1])


def wait_ready(endpoint: Endpoint, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    url = f"http://127.0.0.1:{port_of(endpoint)}{endpoint.ready_path}"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SetupError(f"{endpoint.name} exited with {proc.returncode}: {tail(endpoint.log) if endpoint.log else '(stderr not kept)'}")
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise SetupError(f"{endpoint.name} not ready at {url} after {timeout:.0f} s")
        time.sleep(0.1)


def smoke(endpoint: Endpoint, body: bytes) -> None:
    """One request before the load: a readable failure when the endpoint does not answer 202."""
    url = f"http://127.0.0.1:{port_of(endpoint)}{PATH}"
    body = body.replace(BEFORE_SENTINEL.encode(), os.urandom(20).hex().encode())
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={**HEADERS, "Idempotency-Key": f"smoke-{os.urandom(8).hex()}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            status, text = answer.status, answer.read()[:300]
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read()[:300]
    if status != 202:
        raise SetupError(f"{endpoint.name}: a single request answered {status}, not 202: {text.decode(errors='replace')}")


# --------------------------------------------------------------------------- wrk


def wrk(endpoint: Endpoint, *, concurrency: int, seconds: int, body_file: Path, key_prefix: str) -> dict[str, Any]:
    threads = 1 if concurrency == 1 else 2
    argv = ["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{seconds}s", "--latency", "-s", str(LUA)]
    for name, value in HEADERS.items():
        argv += ["-H", f"{name}: {value}"]
    argv.append(f"http://127.0.0.1:{port_of(endpoint)}{PATH}")
    env = {**os.environ, "BENCH_BODY_FILE": str(body_file), "BENCH_KEY_PREFIX": key_prefix,
           "BENCH_BEFORE_PREFIX": os.urandom(8).hex()}
    children_cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=seconds + 60, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    wrk_cpu = (after.ru_utime + after.ru_stime) - (children_cpu.ru_utime + children_cpu.ru_stime)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise SetupError(f"wrk failed ({done.returncode}): {done.stderr.strip()[-1000:]} {done.stdout.strip()[-1000:]}")
    result: dict[str, Any] = json.loads(line[len("BENCH_JSON "):])
    result["samples"] = [ln[len("BENCH_SAMPLE "):] for ln in done.stdout.splitlines() if ln.startswith("BENCH_SAMPLE ")]
    result["threads"] = threads
    result["cpu_seconds"] = round(wrk_cpu, 3)
    result["connections"] = concurrency
    result["command"] = " ".join(argv)
    result["stdout"] = done.stdout
    return result


def profile(endpoint: Endpoint, pid: int, *, seconds: int, body_file: Path, nonce: str, out: Path) -> dict[str, Any]:
    """py-spy (sampling, 250 Hz, --nonblocking) on the server process while wrk loads it at c=16; top entries."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        raise SetupError("--profile needs py-spy: .venv/bin/pip install -e '.[bench]'")
    load = subprocess.Popen(  # noqa: S603 - our own wrk command line
        ["wrk", "-t2", "-c16", f"-d{seconds + 2}s", "-s", str(LUA), *sum((["-H", f"{k}: {v}"] for k, v in HEADERS.items()), []),
         f"http://127.0.0.1:{port_of(endpoint)}{PATH}"],
        env={**os.environ, "BENCH_BODY_FILE": str(body_file), "BENCH_KEY_PREFIX": f"{nonce}-profile",
             "BENCH_BEFORE_PREFIX": os.urandom(8).hex()}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1)  # let wrk connect before sampling
        subprocess.run([spy, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "250", "--nonblocking",
                        "--format", "raw", "-o", str(out)], capture_output=True, timeout=seconds + 60, check=True)
    finally:
        load.wait(timeout=seconds + 30)
    own: dict[str, int] = {}
    within: dict[str, int] = {}
    total = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_frame(f) for f in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for f in set(frames):
            within[f] = within.get(f, 0) + n
    top = lambda d: [{"share": round(v / total, 4), "frame": k} for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:25]]  # noqa: E731
    return {"raw": str(out), "samples": total, "rate_hz": 250, "seconds": seconds, "self": top(own), "inclusive": top(within)}


def _frame(frame: str) -> str:
    """py-spy's 'function (path/to/file.py:line)' as 'function (dir/file.py)'."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({'/'.join(path.split('/')[-2:])})"


def stored(client: redis.Redis, how: str | None) -> int | None:
    if how == "llen":
        return settled_count(lambda: client.llen(QUEUE))
    if how == "dbsize":  # one dedup key per accepted delivery, plus the stream
        return settled_count(lambda: max(client.dbsize() - 1, 0))
    return None


def measure(endpoint: Endpoint, client: redis.Redis, *, concurrency: int, seconds: int, warmup: int,
            body_file: Path, nonce: str, server_pgid: int, redis_pgid: int) -> dict[str, Any]:
    flush(client)
    problems: list[str] = []
    tag = f"{nonce}-{endpoint.name}-c{concurrency}"
    warm = wrk(endpoint, concurrency=concurrency, seconds=warmup, body_file=body_file, key_prefix=f"{tag}-warm") if warmup > 0 else None
    before = stored(client, endpoint.count)
    cpu_before = cpu_seconds(server_pgid), cpu_seconds(redis_pgid)
    run = wrk(endpoint, concurrency=concurrency, seconds=seconds, body_file=body_file, key_prefix=f"{tag}-run")
    after = stored(client, endpoint.count)  # also lets the requests wrk cut off finish, so their CPU is counted
    cpu_after = cpu_seconds(server_pgid), cpu_seconds(redis_pgid)
    for phase, res in (("warm-up", warm), ("measured run", run)):
        if res is None:
            continue
        if res["non202"]:
            problems.append(f"{phase}: {res['non202']} answer(s) other than 202 {res['statuses']}; first: {res['samples'][:2]}")
        errors = {k: v for k, v in res["errors"].items() if v}
        if errors:
            problems.append(f"{phase}: wrk errors {errors}")
        if res["ok202"] != res["requests"]:
            problems.append(f"{phase}: {res['requests']} responses but {res['ok202']} counted as 202")
    check: dict[str, Any] = {"counted_by": endpoint.count}
    if before is not None and after is not None:
        delta = after - before
        cut_off = delta - run["ok202"]
        check.update(stored_during_run=delta, answered_202=run["ok202"], stored_but_not_answered=cut_off)
        # wrk stops at the deadline with up to `concurrency` requests in flight: the server stores them but
        # wrk never counts their answers. More than that, or fewer stored than answered, is wrong.
        if not 0 <= cut_off <= concurrency:
            problems.append(f"stored {delta} deliveries ({endpoint.count}) but answered {run['ok202']} with 202 "
                            f"(expected between {run['ok202']} and {run['ok202'] + concurrency})")
    seconds_run = run["duration_us"] / 1e6
    handled = max(run["requests"], 1)
    return {
        "endpoint": endpoint.name,
        "concurrency": concurrency,
        "rps": round(run["requests"] / seconds_run, 1) if seconds_run else 0.0,
        "p50_ms": round(run["latency_us"]["p50"] / 1000, 3),
        "p99_ms": round(run["latency_us"]["p99"] / 1000, 3),
        "server_cpu_us_per_req": round((cpu_after[0] - cpu_before[0]) * 1e6 / handled, 1),
        "redis_cpu_us_per_req": round((cpu_after[1] - cpu_before[1]) * 1e6 / handled, 1),
        "wrk_cpu_us_per_req": round(run["cpu_seconds"] * 1e6 / handled, 1),
        "valid": not problems,
        "problems": problems,
        "store_check": check,
        "wrk": run,
        "warmup": warm,
    }


# --------------------------------------------------------------------------- report


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else ""


def table(rows: list[dict[str, Any]]) -> str:
    by_key = {(r["workers"], r["concurrency"], r["endpoint"]): r for r in rows}
    lines = ["| workers | concurrency | endpoint | req/s | p50 ms | p99 ms | (3)/(2) req/s | (3)/(1) req/s "
             "| server CPU µs/req | redis CPU µs/req | valid |",
             "|---:|---:|:---|---:|---:|---:|---:|---:|---:|---:|:---|"]
    for r in rows:
        floor = by_key.get((r["workers"], r["concurrency"], "durable"))
        bare = by_key.get((r["workers"], r["concurrency"], "bare"))
        is_broker = r["endpoint"].startswith("broker")
        lines.append(
            f"| {r['workers']} | {r['concurrency']} | {r['endpoint']} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{ratio(r['rps'], floor['rps']) if is_broker and floor else ''} | {ratio(r['rps'], bare['rps']) if is_broker and bare else ''} | "
            f"{r['server_cpu_us_per_req']:.0f} | {r['redis_cpu_us_per_req']:.0f} | {'yes' if r['valid'] else 'NO'} |"
        )
    return "\n".join(lines)


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_key = {(r["workers"], r["concurrency"], r["endpoint"]): r for r in rows}
    out = []
    for r in rows:
        if not r["endpoint"].startswith("broker"):
            continue
        floor = by_key.get((r["workers"], r["concurrency"], "durable"))
        bare = by_key.get((r["workers"], r["concurrency"], "bare"))
        out.append({
            "workers": r["workers"], "concurrency": r["concurrency"], "endpoint": r["endpoint"],
            "rps_vs_durable": round(r["rps"] / floor["rps"], 3) if floor and floor["rps"] else None,
            "rps_vs_bare": round(r["rps"] / bare["rps"], 3) if bare and bare["rps"] else None,
            "p99_ms": r["p99_ms"],
        })
    return out


def header_text(info: dict[str, Any]) -> str:
    m, v = info["machine"], info["versions"]
    return (
        f"machine: {m['nproc']} CPU(s), {m['cpu_model']}, kernel {m['kernel']}, {m['os']}, {m['memory_gib']} GiB, "
        f"load average at start {m['loadavg_at_start']}"
        + (f", at end {m['loadavg_at_end']}" if "loadavg_at_end" in m else "") + "\n"
        f"versions: Python {v['python']}, uvicorn {v['uvicorn']}, starlette {v['starlette']}, redis-py {v['redis']}, "
        f"uvloop {v['uvloop']}, httptools {v['httptools']}, redis-server {v['redis-server']}, {v['wrk']}, "
        f"cibroker {v['cibroker']} (git {v['git']})\n"
        f"load: {info['config']['duration_s']:g} s per point after a {info['config']['warmup_s']:g} s warm-up; body "
        f"{info['config']['body_bytes']} bytes (sha256 {info['config']['body_sha256'][:12]}); POST {PATH}"
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10, help="whole seconds per measured point (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="whole seconds of warm-up before each point (default 2; 0: none)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="uvicorn worker counts (default: 1 2)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64], help="wrk connections (default: 1 16 64)")
    parser.add_argument("--endpoints", nargs="+", choices=ENDPOINTS, default=list(ENDPOINTS),
                        help="endpoints to run (default: all; ratios need bare, durable and broker)")
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default: bench/results/ingest-<UTC time>.json)")
    parser.add_argument("--report", type=Path, metavar="JSON", help="print the header and table of a saved results file, run nothing")
    parser.add_argument("--profile", type=int, default=0, metavar="S",
                        help="after the broker's measured points (workers=1), load it S more seconds at c=16 under py-spy "
                             "and keep the profile's top entries in the results (not measured; needs `pip install .[bench]`)")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.warmup < 0 or any(w < 1 for w in args.workers) or any(c < 1 for c in args.concurrency):
        parser.error("--duration, --workers and --concurrency must be positive")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.report:
        saved = json.loads(args.report.read_text())
        print(header_text(saved))
        print()
        print(table(saved["results"]))
        return 0
    if shutil.which("wrk") is None:
        print("ingest: wrk is not installed (./run bench installs it)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or BENCH / "results" / f"ingest-{stamp}.json"
    body = build_body()
    info: dict[str, Any] = {
        "started_at": stamp,
        "machine": machine(),
        "versions": versions(),
        "config": {
            "duration_s": args.duration, "warmup_s": args.warmup, "workers": args.workers, "concurrency": args.concurrency,
            "endpoints": args.endpoints, "path": PATH, "headers": {**HEADERS, "X-Gitlab-Token": "<bench secret>"},
            "body_source": str(SOURCE_PAYLOAD.relative_to(ROOT)), "body_commits_kept": KEEP_COMMITS,
            "body_bytes": len(body), "body_sha256": hashlib.sha256(body).hexdigest(),
            "redis": "redis-server --appendonly yes --appendfsync everysec --save ''",
            "uvicorn": "loop uvloop, http broker.edge.serving:BoundedHttpToolsProtocol (httptools), access log off, log level "
                       "warning, no server header, keep-alive 5 s, limit_concurrency 2048 (broker.edge.serving.uvicorn_options)",
        },
    }
    print(header_text(info), flush=True)
    children = Children()
    rows: list[dict[str, Any]] = []
    failure = None
    with tempfile.TemporaryDirectory(prefix="cibroker-bench-") as tmpname:
        tmp = Path(tmpname)
        body_file = tmp / "body.json"
        body_file.write_bytes(body)
        nonce = os.urandom(4).hex()
        try:
            store = Redis(children, tmp / "redis")
            client = store.start()
            assert store.proc is not None
            redis_pid = store.proc.pid
            for workers in args.workers:
                for endpoint in endpoints(args.endpoints, workers=workers, redis_url=store.url, tmp=tmp):
                    stderr: Any = open(endpoint.log, "wb") if endpoint.log else subprocess.DEVNULL  # noqa: SIM115
                    proc = None
                    try:
                        proc = children.start(endpoint.argv, env=endpoint.env, stderr=stderr)
                        wait_ready(endpoint, proc)
                        smoke(endpoint, body)
                        for concurrency in args.concurrency:
                            row = measure(endpoint, client, concurrency=concurrency, seconds=args.duration,
                                          warmup=args.warmup, body_file=body_file, nonce=nonce,
                                          server_pgid=proc.pid, redis_pgid=redis_pid)
                            row.update(workers=workers, command=endpoint.describe())
                            rows.append(row)
                            flag = "" if row["valid"] else "  INVALID: " + "; ".join(row["problems"])
                            print(f"  workers={workers} c={concurrency:<3} {endpoint.name:<12} {row['rps']:>8.0f} req/s  "
                                  f"p50 {row['p50_ms']:7.2f} ms  p99 {row['p99_ms']:7.2f} ms  CPU/req server {row['server_cpu_us_per_req']:5.0f} µs "
                                  f"redis {row['redis_cpu_us_per_req']:4.0f} µs{flag}", flush=True)
                            if proc.poll() is not None:
                                raise SetupError(f"{endpoint.name} exited during the run ({proc.returncode})")
                        if args.profile and endpoint.name == "broker" and workers == 1:
                            info["profile"] = profile(endpoint, proc.pid, seconds=args.profile, body_file=body_file,
                                                      nonce=nonce, out=out.with_suffix(".profile.txt"))
                            print(f"  profile: {info['profile']['samples']} samples, raw stacks in {info['profile']['raw']}",
                                  flush=True)
                    finally:
                        if proc is not None:
                            children.stop(proc)
                        if endpoint.log:
                            stderr.close()
                            logged = tail(endpoint.log, 1500).strip()
                            if logged:
                                print(f"  note: {endpoint.name} wrote to stderr during the run:\n    "
                                      + logged.replace("\n", "\n    "), flush=True)
        except (SetupError, redis.exceptions.RedisError, OSError, subprocess.SubprocessError) as exc:
            failure = str(exc) if isinstance(exc, SetupError) else f"{type(exc).__name__}: {exc}"
            print(f"ingest: {failure}", file=sys.stderr)
        except KeyboardInterrupt:
            failure = "interrupted"
            print("ingest: interrupted; stopping the servers", file=sys.stderr)
        finally:
            children.stop_all()
    info["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    info["failure"] = failure
    info["results"] = rows
    info["ratios"] = ratios(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=2) + "\n")
    if rows:
        print()
        print(table(rows))
    invalid = [r for r in rows if not r["valid"]]
    for r in invalid:
        print(f"INVALID workers={r['workers']} c={r['concurrency']} {r['endpoint']}: {'; '.join(r['problems'])}", file=sys.stderr)
    print(f"\nraw results: {out}")
    if failure:
        return 130 if failure == "interrupted" else 2
    return 1 if invalid else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
