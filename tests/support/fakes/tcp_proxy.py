"""A TCP proxy that tests put between a process and Redis, to break the wire on purpose.

Bytes pass unchanged (it speaks no protocol), so whatever crosses it is what Redis and
the client really said. Modes, switched at any time from the test:

    proxy.passing()       forward both ways (the start)
    proxy.hold_replies()  forward requests, keep the server's answers back: Redis has done
                          the work but the client waits (to kill a client between the two)
    proxy.hold_requests() keep requests back: Redis sees nothing yet
    proxy.unreachable()   reset every open connection and refuse new ones
    proxy.passing()       again: held bytes flow on, new connections are served

`proxy.url` is the redis:// URL clients use; `proxy.held` counts bytes held back.
"""

from __future__ import annotations

import selectors
import socket
import threading
from dataclasses import dataclass, field


@dataclass(eq=False)
class _Pair:
    client: socket.socket
    server: socket.socket
    to_server: bytearray = field(default_factory=bytearray)  # held requests
    to_client: bytearray = field(default_factory=bytearray)  # held replies


class TcpProxy:
    def __init__(self, upstream_port: int, *, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.mode = "pass"
        self._lock = threading.Lock()
        self._pairs: list[_Pair] = []
        self._listener: socket.socket | None = None
        self.port = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = socket.socketpair()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def held(self) -> int:
        with self._lock:
            return sum(len(p.to_client) + len(p.to_server) for p in self._pairs)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> TcpProxy:
        self._listen()
        self._thread = threading.Thread(target=self._run, name="tcp-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            for pair in self._pairs:
                _close(pair.client, pair.server)
            self._pairs.clear()
            if self._listener is not None:
                self._listener.close()
                self._listener = None
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- modes -------------------------------------------------------------------------------

    def passing(self) -> None:
        with self._lock:
            if self._listener is None:
                self._listen()
            self.mode = "pass"
        self._wake()

    def hold_replies(self) -> None:
        self._set("hold_replies")

    def hold_requests(self) -> None:
        self._set("hold_requests")

    def unreachable(self) -> None:
        """Reset every connection (RST, like a host that went away) and refuse new ones."""
        with self._lock:
            self.mode = "down"
            for pair in self._pairs:
                for sock in (pair.client, pair.server):
                    try:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    except OSError:
                        pass
                _close(pair.client, pair.server)
            self._pairs.clear()
            if self._listener is not None:
                self._listener.close()
                self._listener = None
        self._wake()

    def _set(self, mode: str) -> None:
        with self._lock:
            self.mode = mode
        self._wake()

    # -- the loop ----------------------------------------------------------------------------

    def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        listener.setblocking(False)
        self.port = listener.getsockname()[1]
        self._listener = listener

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _run(self) -> None:
        while not self._stop.is_set():
            sel = selectors.DefaultSelector()
            sel.register(self._wake_r, selectors.EVENT_READ, None)
            with self._lock:
                if self._listener is not None:
                    sel.register(self._listener, selectors.EVENT_READ, "accept")
                for pair in self._pairs:
                    sel.register(pair.client, selectors.EVENT_READ, (pair, "c"))
                    sel.register(pair.server, selectors.EVENT_READ, (pair, "s"))
            for key, _ in sel.select(timeout=0.2):
                if key.data is None:
                    self._wake_r.recv(4096)
                elif key.data == "accept":
                    self._accept()
                else:
                    self._pump(*key.data)
            sel.close()
            self._flush()

    def _accept(self) -> None:
        with self._lock:
            if self._listener is None:
                return
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
        try:
            server = socket.create_connection(self.upstream, timeout=2)
        except OSError:
            client.close()
            return
        for sock in (client, server):
            sock.setblocking(True)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._pairs.append(_Pair(client, server))

    def _pump(self, pair: _Pair, side: str) -> None:
        source = pair.client if side == "c" else pair.server
        try:
            data = source.recv(65536)
        except OSError:
            data = b""
        with self._lock:
            if pair not in self._pairs:
                return
            if not data:
                _close(pair.client, pair.server)
                self._pairs.remove(pair)
                return
            (pair.to_server if side == "c" else pair.to_client).extend(data)

    def _flush(self) -> None:
        with self._lock:
            for pair in list(self._pairs):
                try:
                    if pair.to_server and self.mode in ("pass", "hold_replies"):
                        pair.server.sendall(pair.to_server)
                        pair.to_server.clear()
                    if pair.to_client and self.mode in ("pass", "hold_requests"):
                        pair.client.sendall(pair.to_client)
                        pair.to_client.clear()
                except OSError:
                    _close(pair.client, pair.server)
                    self._pairs.remove(pair)


def _close(*socks: socket.socket) -> None:
    for sock in socks:
        try:
            sock.close()
        except OSError:
            pass
