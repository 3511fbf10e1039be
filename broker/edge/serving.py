"""How `cibroker serve` runs uvicorn: bounded before a request is even read.

uvicorn closes idle keep-alive connections (`timeout_keep_alive`) and caps connections
(`limit_concurrency`, 503 beyond it), but it has no deadline for a request's headers and,
with httptools, no cap on their size: a client that sends one header byte a second holds
its connection and its buffer for as long as it likes. `BoundedHttpToolsProtocol` adds both:
the headers of each request must be complete within `header_timeout` seconds of its first
byte (or of the connection opening), and within `MAX_HEADER_BYTES`; otherwise the client gets
408 / 431 and the connection is closed.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEADER_BYTES = 64 * 1024  # request line + headers; uvicorn's h11 default is 16 KiB, GitLab's are < 4 KiB
LIMIT_CONCURRENCY = 2048  # open connections + tasks per process before uvicorn answers 503
HEADER_TIMEOUT_SECONDS = 10.0  # overridden by CIBROKER_HEADER_TIMEOUT_SECONDS through `configure`

_settings = {"header_timeout": HEADER_TIMEOUT_SECONDS}


def configure(*, header_timeout: float) -> None:
    """Set the header deadline for protocols created from now on in this process."""
    _settings["header_timeout"] = header_timeout


def _answer(status: str, reason: str) -> bytes:
    body = ('{"error": "%s"}' % reason).encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a size cap on each request's headers."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        self._in_headers = True

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(_settings["header_timeout"], self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _refuse(self, answer: bytes) -> None:
        self._disarm()
        if not self.transport.is_closing():
            self.transport.write(answer)
            self.transport.close()

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self._in_headers:
            self._refuse(_answer("408 Request Timeout", "request headers not received in time"))

    def data_received(self, data: bytes) -> None:
        counting = self._in_headers
        if counting:
            self._header_bytes += len(data)
        super().data_received(data)
        # Still in the headers after this read: everything so far was request line and headers. (A read that
        # completes them may carry body bytes too, so it is not counted against the cap; reads are bounded.)
        if counting and self._in_headers and self._header_bytes > MAX_HEADER_BYTES:
            self._refuse(_answer("431 Request Header Fields Too Large", "request headers are too large"))

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        self._arm()  # a keep-alive connection's next request: its own deadline from its first byte

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._disarm()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._in_headers = True  # between requests uvicorn's keep-alive timeout applies; the next one re-arms
        self._header_bytes = 0

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def uvicorn_options(*, keep_alive: float) -> dict[str, Any]:
    """The uvicorn options every `cibroker serve` process uses (also the ingest benchmark's)."""
    return {"http": "broker.edge.serving:BoundedHttpToolsProtocol", "timeout_keep_alive": keep_alive,
            "limit_concurrency": LIMIT_CONCURRENCY, "h11_max_incomplete_event_size": MAX_HEADER_BYTES}
