"""The embedded store for a laptop: a `redis-server` child, or an in-memory fallback.

Used only when CIBROKER_REDIS_URL is not set. The child listens on a Unix socket in
the state directory with AOF on, so deliveries survive a restart of the broker. When
no `redis-server` binary exists, fakeredis serves on a loopback port instead: it
works, but it is not durable and the first log line says so.
"""

from __future__ import annotations

import atexit
import ctypes
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EmbeddedRedis:
    url: str
    description: str
    durable: bool


def _answers(sock_path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            s.connect(str(sock_path))
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def start(state_dir: Path, *, timeout: float = 10.0) -> EmbeddedRedis:
    """Start (or reuse, when another cibroker process already started it) the embedded store."""
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    sock = state_dir / "redis.sock"
    url = f"unix://{sock}"
    if _answers(sock):
        return EmbeddedRedis(url=url, description=f"embedded redis-server (shared, unix socket {sock}, AOF on)", durable=True)
    binary = shutil.which("redis-server")
    if binary is None:
        return _fallback()
    proc = subprocess.Popen(
        [binary, "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700", "--dir", str(state_dir),
         "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--daemonize", "no",
         "--logfile", str(state_dir / "redis.log")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    atexit.register(_stop, proc)
    deadline = time.monotonic() + timeout
    while not _answers(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"embedded redis-server did not start; see {state_dir / 'redis.log'}")
        time.sleep(0.05)
    return EmbeddedRedis(url=url, description=f"embedded redis-server (pid {proc.pid}, unix socket {sock}, AOF on)", durable=True)


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM when the broker exits however it exits.

    atexit is not enough: uvicorn re-raises SIGTERM after its graceful shutdown, and
    kill -9 runs nothing. Redis shuts down cleanly on SIGTERM (the AOF is flushed).
    """
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()


def _fallback() -> EmbeddedRedis:
    try:
        import threading

        from fakeredis import TcpFakeServer
    except ImportError as exc:
        raise RuntimeError(
            "no redis-server binary and no fakeredis: install redis-server (apt-get install redis-server), "
            "or pip install 'cibroker[laptop]', or set CIBROKER_REDIS_URL"
        ) from exc
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = TcpFakeServer(("127.0.0.1", port), server_type="redis")
    threading.Thread(target=server.serve_forever, daemon=True, name="fakeredis").start()
    return EmbeddedRedis(
        url=f"redis://127.0.0.1:{port}/0",
        description=f"in-memory fakeredis on 127.0.0.1:{port} (no redis-server binary found): NOT durable, deliveries are lost on exit",
        durable=False,
    )


def kombu_url(redis_url: str) -> str:
    """Celery/kombu spell a Unix-socket Redis URL differently from redis-py."""
    if redis_url.startswith("unix://"):
        return "redis+socket://" + redis_url[len("unix://"):]
    return redis_url
