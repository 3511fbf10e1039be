"""The two reference endpoints the ingest benchmark compares the broker with (bench/README.md).

Both are uvicorn factories, run by bench/ingest.py as
    python bench/baseline_apps.py baseline_apps:bare_app --port P --workers N
which starts uvicorn with exactly the options `cibroker serve` sets (broker.edge.serving).

- `bare_app`: POST /hooks/{host_id} reads the body and answers 202 with a small JSON
  body. What Starlette + uvicorn cost with no work at all.
- `durable_app`: the same plus ONE Redis round trip (one Lua script) that does
  `SET <delivery key> NX EX 86400` and, when the key is new,
  `XADD <stream> MAXLEN ~ 10000 * body <body>`. The least a durable,
  deduplicating edge must do before answering 202: the "durable floor".
  Needs BENCH_REDIS_URL.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

STREAM = "bench:deliveries"
DEDUP_PREFIX = "bench:dedup:"
DEDUP_TTL_SECONDS = 86400

# KEYS: dedup key, stream; ARGV: body, ttl. Returns 1 when stored, 0 for a duplicate.
ACCEPT = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[2]) then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', 10000, '*', 'body', ARGV[1])
  return 1
end
return 0
"""


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


def bare_app() -> Starlette:
    async def hook(request: Request) -> Response:
        await request.body()
        return JSONResponse({"decision": "accepted"}, status_code=202)

    return Starlette(routes=[Route("/hooks/{host_id}", hook, methods=["POST"]), Route("/healthz", healthz, methods=["GET"])])


def durable_app() -> Starlette:
    import redis.asyncio as aioredis

    url = os.environ["BENCH_REDIS_URL"]
    state: dict[str, object] = {}

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Same client options as broker.adapters.redis_store.AsyncStore (2 s timeouts, no retry on timeout).
        client = aioredis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0, retry_on_timeout=False)
        state["client"] = client
        state["accept"] = client.register_script(ACCEPT)
        try:
            yield
        finally:
            await client.aclose()

    async def hook(request: Request) -> Response:
        body = await request.body()
        key = request.headers.get("idempotency-key")
        if not key:
            return JSONResponse({"error": "missing Idempotency-Key"}, status_code=400)
        stored = await state["accept"](keys=[DEDUP_PREFIX + key, STREAM], args=[body, DEDUP_TTL_SECONDS])  # type: ignore[operator]
        if not stored:
            return JSONResponse({"decision": "duplicate"}, status_code=200)
        return JSONResponse({"decision": "accepted"}, status_code=202)

    return Starlette(
        routes=[Route("/hooks/{host_id}", hook, methods=["POST"]), Route("/healthz", healthz, methods=["GET"])],
        lifespan=lifespan,
    )


def main() -> None:
    """Serve a factory with `cibroker serve`'s uvicorn options (loop, protocol, timeouts, caps)."""
    import argparse
    from pathlib import Path

    import uvicorn

    from broker.edge import serving

    parser = argparse.ArgumentParser()
    parser.add_argument("factory")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    uvicorn.run(args.factory, factory=True, app_dir=str(Path(__file__).parent), host="127.0.0.1", port=args.port, workers=args.workers, access_log=False,
                log_level="warning", server_header=False, timeout_graceful_shutdown=10, loop="uvloop",
                **serving.uvicorn_options(keep_alive=5.0))


if __name__ == "__main__":
    main()
