"""The delivery store on Redis: the only module that imports the `redis` client.

`accept` is one Lua call that checks the deduplication key and, when the delivery
is new, writes its record, its first decision-log lines, the index entry and the
Celery task message (LPUSH onto the queue list). So a delivery is either wholly
accepted and queued, or not at all; an answer lost on the way back (timeout) makes
the host's resend a duplicate, never a second run.

`AsyncStore` serves the webhook edge; `SyncStore` serves workers and the CLI.
Library exceptions become `StoreUnavailable` here.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import orjson
import redis
import redis.asyncio as aioredis

from broker.adapters.celery_wire import task_message
from broker.core.records import TaskCall, iso
from broker.core.errors import StoreUnavailable
from broker.core.events import Identity

PREFIX = "cibroker:"
INDEX_KEY = f"{PREFIX}deliveries"
AUDIT_KEY = f"{PREFIX}audit"

def dedup_key(host_id: str, identity: Identity) -> str:
    """The key of a host's signed delivery identity (GitLab webhook-id under a verified signature)."""
    return f"{PREFIX}dedup:{host_id}:{identity.key}"
def push_keys(fingerprint: str, routes: tuple[str, ...]) -> list[str]:
    """One key per matched route for a push fingerprint (broker.core.sources.common.push_fingerprint).

    A delivery is a duplicate when every route it matched already took this push; a second hook
    whose secret speaks for more routes still reaches the routes not yet taken (the run of a route
    that already has one is deduplicated by its PipelineRun name).
    """
    return [f"{PREFIX}dedup:push:{fingerprint}:{route}" for route in routes]
def record_key(delivery_id: str) -> str:
    return f"{PREFIX}delivery:{delivery_id}"
def log_key(delivery_id: str) -> str:
    return f"{PREFIX}delivery:{delivery_id}:log"

ACCEPT = """
-- KEYS: record, log, queue, index, then ARGV[4] (0 or 1) signed-identity keys, then one push-fingerprint key per route
-- ARGV: id, record, message, n_signed, log entries joined by newlines (JSON never holds a raw newline)
-- @DEDUP_TTL@, @RECORD_TTL@ and @RECORD_PREFIX@ are filled in per store (fewer arguments to pack per call).
-- A duplicate when the signed identity was seen, or when every route already took this push fingerprint.
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local nsigned = tonumber(ARGV[4])
local prior, why = nil, nil
if nsigned == 1 then
  prior = redis.call('GET', KEYS[5])
  if prior then why = 'signed delivery id' end
end
if not prior then
  local first, all = nil, true
  for i = 5 + nsigned, #KEYS do
    local p = redis.call('GET', KEYS[i])
    if p then first = first or p else all = false end
  end
  if all and first then prior, why = first, 'push fingerprint' end
end
if prior then
  local rk = '@RECORD_PREFIX@' .. prior
  if redis.call('EXISTS', rk) == 1 then
    local n = redis.call('HINCRBY', rk, 'duplicates', 1)
    redis.call('HSET', rk, 'last_duplicate_at', now_ms)
    if n <= 20 then
      redis.call('RPUSH', rk .. ':log', cjson.encode({at_ms = now_ms, step = 'duplicate',
        detail = 'the same delivery arrived again by ' .. why .. ' (' .. n .. ' so far); not run again'}))
    end
  end
  return {prior, why}
end
for i = 5, #KEYS do redis.call('SET', KEYS[i], ARGV[1], 'NX', 'EX', @DEDUP_TTL@) end
redis.call('HSET', KEYS[1], 'record', ARGV[2], 'state', 'queued', 'duplicates', 0)
redis.call('EXPIRE', KEYS[1], @RECORD_TTL@)
for entry in string.gmatch(ARGV[5], '[^\\n]+') do redis.call('RPUSH', KEYS[2], entry) end
redis.call('EXPIRE', KEYS[2], @RECORD_TTL@)
redis.call('LPUSH', KEYS[3], ARGV[3])
redis.call('ZADD', KEYS[4], now_ms, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now_ms - 1000 * @RECORD_TTL@)
return false
"""


def accept_script(*, dedup_ttl: int, record_ttl: int) -> str:
    """ACCEPT with this store's constants written in (integers and our own key prefix: nothing from a request)."""
    return (ACCEPT.replace("@DEDUP_TTL@", str(int(dedup_ttl))).replace("@RECORD_TTL@", str(int(record_ttl)))
            .replace("@RECORD_PREFIX@", record_key("")))

# Report claims keep commit statuses in order across workers and retries: a claim for a
# state succeeds only if it moves forward, or if the same task (a retry) claims it again.
# A claim also holds a lease while its POST is in flight: a later state waits (-1, retry
# shortly) until the earlier one's answer is in, so the host never receives `running`
# before `pending` even when the two posts overlap. A poster that dies frees the lease
# when it runs out.
# Field value: state|token|rank|lease-until-ms (0 once the post is done).
CLAIM_REPORT = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  local state, token, cur_rank, lease = string.match(cur, '^([^|]*)|([^|]*)|(%d+)|?(%d*)$')
  local rank = tonumber(ARGV[4])
  cur_rank = tonumber(cur_rank or '0')
  local again = (state == ARGV[2] and token == ARGV[3])
  if not (rank > cur_rank or again) then return 0 end
  if not again and lease ~= nil and lease ~= '' and tonumber(lease) > tonumber(ARGV[6]) then return -1 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. '|' .. ARGV[3] .. '|' .. ARGV[4] .. '|' .. (tonumber(ARGV[6]) + tonumber(ARGV[7])))
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""

RELEASE_REPORT = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then return 0 end
local state, token, rank = string.match(cur, '^([^|]*)|([^|]*)|(%d+)')
if state ~= ARGV[2] or token ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], state .. '|' .. token .. '|' .. rank .. '|0')
return 1
"""

# The push chain (superseding): one key per push a worker started, `after` -> `before`, per
# (host, repo id, ref). Walks back from `ours` and from each other push, at most ARGV[2] links
# each (a loop from a force push back to an old commit ends there too). Per other push: 1 when it
# is behind ours on the chain (ours is newer), -1 when ours is behind it, 0 when the chain does
# not say (a link is missing: a delivery lost, expired or not started yet; or the same commit).
# Keys are built from ARGV[1] so that one call walks any number of links.
PUSH_ORDER = """
local prefix, steps, ours = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local function behind(from)
  local seen, cur = {}, from
  for _ = 1, steps do
    local prev = redis.call('GET', prefix .. cur)
    if not prev or seen[prev] then break end
    seen[prev] = true
    cur = prev
  end
  return seen
end
local mine = behind(ours)
local out = {}
for i = 4, #ARGV do
  local other = ARGV[i]
  if other == ours then out[#out + 1] = 0
  elseif mine[other] then out[#out + 1] = 1
  elseif behind(other)[ours] then out[#out + 1] = -1
  else out[#out + 1] = 0 end
end
return out
"""

_ERRORS = (redis.exceptions.RedisError, OSError)
# uvloop raises RuntimeError ("the handler is closed") writing to a connection Redis reset; redis-py has
# already dropped that connection, so the next call reconnects: to the edge it is Redis being away (503).
_ASYNC_ERRORS = (*_ERRORS, RuntimeError)


def _message(call: TaskCall, queue: str) -> str:
    return task_message(task=call.task, task_id=call.task_id, args=list(call.args), queue=queue, origin=call.origin)


def _dumps(value: Any) -> bytes:
    return orjson.dumps(value)


def _task_id(raw: bytes, *, wrapped: bool = False) -> str:
    """The Celery task id of a queued message (or of kombu's unacked entry: [message, exchange, routing key])."""
    try:
        message = json.loads(raw)
        if wrapped:
            message = json.loads(message[0]) if isinstance(message[0], str) else message[0]
        return str(message["headers"]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        return ""


def decode_delivery(fields: Mapping[bytes, bytes], log: list[bytes]) -> dict[str, Any] | None:
    """The stored record with its state, duplicate count and decision log, or None."""
    if not fields or b"record" not in fields:
        return None
    out = json.loads(fields[b"record"])
    out["state"] = fields.get(b"state", b"").decode()
    out["duplicates"] = int(fields.get(b"duplicates", b"0"))
    entries = []
    for raw in log:
        entry = json.loads(raw)
        if "at_ms" in entry:  # written by the Lua script, which has no clock formatting
            entry = {"at": iso(entry.pop("at_ms") / 1000), **entry}
        entries.append(entry)
    out["log"] = entries
    return out


def redis_options(*, timeout: float) -> dict[str, Any]:
    return {"socket_timeout": timeout, "socket_connect_timeout": timeout, "retry_on_timeout": False}


def resp_command(args: tuple[str | bytes | int, ...]) -> bytes:
    """One command in RESP (the Redis protocol): `*<n>` then `$<len>` + bytes per argument, in one buffer.

    redis-py's pack_command grows its buffer argument by argument; for the accept call's dozen
    arguments and ~5 KB this is a quarter of the call's CPU. Strings are UTF-8, ints decimal.
    """
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode() if isinstance(arg, int) else arg.encode()
        parts.append(b"$%d\r\n" % len(data))
        parts.append(data)
        parts.append(b"\r\n")
    return b"".join(parts)


class _PackedCalls:
    """The accept call on the client's own pool, below redis-py's command layer.

    The edge makes one Redis call per webhook; redis-py's command layer (retry wrapper, response
    callbacks, its argument packing, which grows one buffer argument by argument) cost about as
    much CPU as the call itself. So the command is packed once (`resp_command`) and sent with
    `Connection.send_packed_command` / `read_response` on a connection from the pool, which owns
    every connection's life (a failed one is disconnected, and all are closed with the client).
    """

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    async def call(self, *args: str | bytes | int) -> Any:
        conn = await self._pool.get_connection()
        try:
            await conn.send_packed_command(resp_command(args), check_health=False)
            return await conn.read_response()
        except redis.exceptions.ResponseError:
            raise  # Redis answered (e.g. NOSCRIPT): the connection is fine
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        finally:
            await self._pool.release(conn)


class AsyncStore:
    def __init__(self, url: str, *, timeout: float, record_ttl: int, dedup_ttl: int, queue: str) -> None:
        self._client = aioredis.Redis.from_url(url, **redis_options(timeout=timeout))
        self._accept_text = accept_script(dedup_ttl=dedup_ttl, record_ttl=record_ttl)
        self._accept_sha = hashlib.sha1(self._accept_text.encode()).hexdigest()
        self._index_keys = (queue, INDEX_KEY)
        self._hot = _PackedCalls(self._client.connection_pool)
        self._record_ttl = record_ttl
        self._dedup_ttl = dedup_ttl
        self._queue = queue

    @asynccontextmanager
    async def _errors(self, doing: str):  # type: ignore[no-untyped-def]
        try:
            yield
        except _ASYNC_ERRORS as exc:
            raise StoreUnavailable(f"redis unavailable while {doing}: {type(exc).__name__}") from exc

    async def prepare(self) -> None:
        """Load the Lua script now, so the first webhook does not pay for (or trip over) NOSCRIPT."""
        async with self._errors("loading scripts"):
            await self._client.script_load(self._accept_text)

    async def accept(
        self, *, host_id: str, signed: Identity | None, fingerprint: str, routes: tuple[str, ...], delivery_id: str,
        record: dict[str, Any] | bytes, message: str | bytes, log: list[dict[str, Any]] | list[bytes]
    ) -> tuple[str, str] | None:
        """Store and enqueue a new delivery; None, or (id of the delivery this duplicates, by what).

        Deduplicated on the host's signed delivery identity (when there is one) and on the push
        fingerprint per matched route, in the same atomic call that stores and queues. One EVALSHA
        (the script is loaded again if Redis lost it, e.g. after a restart).
        """
        keys = [record_key(delivery_id), log_key(delivery_id), *self._index_keys]
        if signed is not None:
            keys.append(dedup_key(host_id, signed))
        keys += push_keys(fingerprint, routes)
        entries = b"\n".join(e if isinstance(e, bytes) else _dumps(e) for e in log)
        args = (delivery_id, record if isinstance(record, bytes) else _dumps(record), message, 1 if signed is not None else 0,
                entries)
        async with self._errors("accepting a delivery"):
            try:
                prior = await self._hot.call("EVALSHA", self._accept_sha, len(keys), *keys, *args)
            except redis.exceptions.NoScriptError:
                await self._client.script_load(self._accept_text)
                prior = await self._hot.call("EVALSHA", self._accept_sha, len(keys), *keys, *args)
        return (prior[0].decode(), prior[1].decode()) if prior else None

    async def record_ignored(self, *, delivery_id: str, record: dict[str, Any], log: list[dict[str, Any]]) -> None:
        async with self._errors("recording an ignored delivery"):
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hset(record_key(delivery_id), mapping={"record": _dumps(record), "state": "ignored", "duplicates": 0})
                pipe.expire(record_key(delivery_id), self._record_ttl)
                pipe.rpush(log_key(delivery_id), *[_dumps(e) for e in log])
                pipe.expire(log_key(delivery_id), self._record_ttl)
                pipe.zadd(INDEX_KEY, {delivery_id: int(time.time() * 1000)})
                await pipe.execute()

    async def get(self, delivery_id: str) -> dict[str, Any] | None:
        async with self._errors("reading a delivery"):
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.hgetall(record_key(delivery_id))
                pipe.lrange(log_key(delivery_id), 0, -1)
                fields, log = await pipe.execute()
        return decode_delivery(fields, log)

    async def counters(self, families: list[str], *, queue: str) -> tuple[dict[str, dict[str, float]], int]:
        """Cluster-wide metric counters and the queue depth, in one round trip (for /metrics)."""
        async with self._errors("reading metrics"):
            async with self._client.pipeline(transaction=False) as pipe:
                for family in families:
                    pipe.hgetall(f"{PREFIX}metrics:{family}")
                pipe.llen(queue)
                *rows, depth = await pipe.execute()
        return {f: {k.decode(): float(v) for k, v in row.items()} for f, row in zip(families, rows)}, int(depth)

    async def ping(self) -> None:
        async with self._errors("checking readiness"):
            await self._client.ping()

    async def close(self) -> None:
        await self._client.aclose()


class SyncStore:
    """What workers and the CLI need: read a delivery, append to its log, move its state."""

    def __init__(self, url: str, *, timeout: float) -> None:
        self._client = redis.Redis.from_url(url, **redis_options(timeout=timeout))
        self._claim = self._client.register_script(CLAIM_REPORT)
        self._release = self._client.register_script(RELEASE_REPORT)
        self._push_order = self._client.register_script(PUSH_ORDER)

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except _ERRORS as exc:
            raise StoreUnavailable(f"redis unavailable while {doing}: {type(exc).__name__}") from exc

    def get(self, delivery_id: str) -> dict[str, Any] | None:
        with self._errors("reading a delivery"):
            pipe = self._client.pipeline(transaction=False)
            pipe.hgetall(record_key(delivery_id))
            pipe.lrange(log_key(delivery_id), 0, -1)
            fields, log = pipe.execute()
        return decode_delivery(fields, log)

    def append_log(self, delivery_id: str, entry: dict[str, Any], *, state: str | None = None) -> None:
        with self._errors("appending to a delivery log"):
            pipe = self._client.pipeline(transaction=True)
            pipe.rpush(log_key(delivery_id), _dumps(entry))
            if state is not None:
                pipe.hset(record_key(delivery_id), "state", state)
            pipe.execute()

    def claim_report(self, run: str, status_name: str, *, state: str, rank: int, token: str, ttl: int,
                     lease_seconds: float = 30.0) -> int:
        """Claim the right to report `state` for (run, status name).

        1: go ahead (and call `release_report` once the host answered); 0: it would go
        backwards, skip it; -1: an earlier state's post is still in flight, try again shortly.
        """
        with self._errors("claiming a status report"):
            return int(self._claim(keys=[f"{PREFIX}reports:{run}"],
                                   args=[status_name, state, token, rank, ttl, int(time.time() * 1000), int(lease_seconds * 1000)]))

    def release_report(self, run: str, status_name: str, *, state: str, token: str) -> None:
        """The post of a claimed state is over (answered or failed): later states may go."""
        with self._errors("releasing a status report"):
            self._release(keys=[f"{PREFIX}reports:{run}"], args=[status_name, state, token])

    def reported(self, run: str) -> dict[str, str]:
        """{status name: state} claimed so far for a run."""
        with self._errors("reading reported states"):
            raw = self._client.hgetall(f"{PREFIX}reports:{run}")
        return {k.decode(): v.decode().split("|", 1)[0] for k, v in raw.items()}

    def claim_once(self, key: str, *, token: str, ttl: int) -> bool:
        """True for the first claimer of `key` and for its retries (same token); False for anyone else."""
        with self._errors("claiming work"):
            pipe = self._client.pipeline(transaction=True)
            pipe.set(f"{PREFIX}once:{key}", token, nx=True, ex=ttl)
            pipe.get(f"{PREFIX}once:{key}")
            _, holder = pipe.execute()
        return holder is not None and holder.decode() == token

    # ---- on-call operations (broker.services.oncall) ------------------------------------------

    def recent(self, *, limit: int, offset: int = 0) -> list[dict[str, Any] | None]:
        """Delivery records (no decision logs), newest first, from `offset`."""
        with self._errors("listing deliveries"):
            ids = self._client.zrevrange(INDEX_KEY, offset, offset + limit - 1)
            pipe = self._client.pipeline(transaction=False)
            for delivery_id in ids:
                pipe.hgetall(record_key(delivery_id.decode()))
            rows = pipe.execute()
        # An expired record leaves its index entry until the next accept trims it: None in its place.
        return [decode_delivery(fields, []) for fields in rows]

    def next_attempt(self, key: str, *, ttl: int) -> int:
        """2, 3, ... for successive re-runs of one commit (the first run, from the webhook, is attempt 1)."""
        with self._errors("numbering a re-run"):
            pipe = self._client.pipeline(transaction=True)
            pipe.set(f"{PREFIX}attempts:{key}", 1, nx=True, ex=ttl)
            pipe.incr(f"{PREFIX}attempts:{key}")
            pipe.expire(f"{PREFIX}attempts:{key}", ttl)
            return int(pipe.execute()[1])

    def peek_attempt(self, key: str) -> int:
        """The attempt number `next_attempt` would hand out now (for dry runs)."""
        with self._errors("reading re-run numbers"):
            current = self._client.get(f"{PREFIX}attempts:{key}")
        return int(current or 1) + 1

    def count_many(self, increments: list[tuple[str, str, float]]) -> None:
        """Several (family, labels, amount) additions in one round trip (e.g. a histogram observation)."""
        with self._errors("counting"):
            pipe = self._client.pipeline(transaction=False)
            for family, labels, by in increments:
                pipe.hincrbyfloat(f"{PREFIX}metrics:{family}", labels, by)
            pipe.execute()

    def add_delivery(self, *, record: dict[str, Any], log: list[dict[str, Any]], queue: str, call: TaskCall, ttl: int) -> None:
        """Store a delivery made by a person (a re-run) and queue its task, in one transaction."""
        delivery_id = record["delivery_id"]
        with self._errors("storing a re-run"):
            pipe = self._client.pipeline(transaction=True)
            pipe.hset(record_key(delivery_id), mapping={"record": _dumps(record), "state": "queued", "duplicates": 0})
            pipe.expire(record_key(delivery_id), ttl)
            pipe.rpush(log_key(delivery_id), *[_dumps(e) for e in log])
            pipe.expire(log_key(delivery_id), ttl)
            pipe.zadd(INDEX_KEY, {delivery_id: int(time.time() * 1000)})
            pipe.lpush(queue, _message(call, queue))
            pipe.execute()

    def put_request(self, request: dict[str, Any], *, ttl: int) -> None:
        """Store a person's signed request (broker.core.trust.sign_request) under its id, for the task that carries it out."""
        with self._errors("storing a request"):
            self._client.set(f"{PREFIX}request:{request['request_id']}", _dumps(request), ex=ttl)

    def get_request(self, request_id: str) -> dict[str, Any] | None:
        """A stored request as written (the caller verifies its signature), or None."""
        with self._errors("reading a request"):
            raw = self._client.get(f"{PREFIX}request:{request_id}")
        if raw is None:
            return None
        try:
            value = json.loads(raw)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    def enqueue(self, *, queue: str, call: TaskCall) -> None:
        with self._errors("queueing a task"):
            self._client.lpush(queue, _message(call, queue))

    def audit(self, entry: dict[str, Any], *, retention_seconds: int) -> None:
        """Record who did what, when and why; entries older than the retention period are dropped."""
        now_ms = int(time.time() * 1000)
        with self._errors("writing the audit log"):
            pipe = self._client.pipeline(transaction=True)
            pipe.zadd(AUDIT_KEY, {_dumps({"at": iso(now_ms / 1000), **entry}): now_ms})
            pipe.zremrangebyscore(AUDIT_KEY, "-inf", now_ms - retention_seconds * 1000)
            pipe.execute()

    def audit_log(self, *, limit: int) -> list[dict[str, Any]]:
        with self._errors("reading the audit log"):
            raw = self._client.zrevrange(AUDIT_KEY, 0, limit - 1)
        return [json.loads(item) for item in raw]

    def stranded(self, *, queue: str, older_than: float, max_queue: int = 2000, horizon: float = 6 * 3600.0) -> list[dict[str, Any]]:
        """Accepted deliveries still `queued` after `older_than` s whose task is neither queued nor taken.

        kombu's Redis transport pops a message (BRPOP) and only then records it as unacked, so a
        worker killed between the two loses it. Those deliveries are found here: still `queued`,
        and their task id is in neither the queue list nor kombu's `unacked` hash. With a long
        queue (a backlog) nothing is reported, since reading it whole would cost too much. Only the
        last `horizon` seconds are read (one state read per delivery per sweep): a sweep runs every
        resync period, so a lost task is found within minutes, not hours.
        """
        now_ms = int(time.time() * 1000)
        with self._errors("looking for stranded deliveries"):
            queued: list[str] = []
            offset, page = 0, 2000
            while True:  # every delivery of the window, a page at a time (a state read per delivery)
                ids = self._client.zrangebyscore(INDEX_KEY, now_ms - int(horizon * 1000), now_ms - int(older_than * 1000),
                                                 start=offset, num=page)
                if not ids:
                    break
                pipe = self._client.pipeline(transaction=False)
                for delivery_id in ids:
                    pipe.hget(record_key(delivery_id.decode()), "state")
                states = pipe.execute()
                queued += [d.decode() for d, st in zip(ids, states, strict=True) if st == b"queued"]
                offset += len(ids)
            if not queued or self._client.llen(queue) > max_queue:
                return []
            pipe = self._client.pipeline(transaction=False)
            pipe.lrange(queue, 0, -1)
            pipe.hvals("unacked")
            waiting, taken = pipe.execute()
            present = {_task_id(raw) for raw in waiting} | {_task_id(raw, wrapped=True) for raw in taken}
            out = []
            for delivery_id in queued:
                if delivery_id in present:
                    continue
                fields = self._client.hgetall(record_key(delivery_id))
                if fields.get(b"state") == b"queued" and b"record" in fields:  # still: not started meanwhile
                    out.append(json.loads(fields[b"record"]))
        return out

    def requeue(self, delivery_id: str, *, queue: str, call: TaskCall, entry: dict[str, Any]) -> None:
        with self._errors("requeueing a delivery"):
            pipe = self._client.pipeline(transaction=True)
            pipe.rpush(log_key(delivery_id), _dumps(entry))
            pipe.lpush(queue, _message(call, queue))
            pipe.execute()

    def queue_depth(self, queue: str) -> int:
        with self._errors("reading the queue depth"):
            return int(self._client.llen(queue))

    # ---- the push chain: which push of a branch is newer (workers only) -----------------
    # Written from stored delivery records (`before` -> `after`), which only cibroker writes, by
    # the worker that starts a push and before it creates the run: so of two pushes processed at
    # once, the one that lists second always finds the other's link. Never from run annotations.

    @staticmethod
    def _chain_prefix(host: str, repo_id: str, ref: str) -> str:
        digest = hashlib.sha256(f"{host}\0{repo_id}\0{ref}".encode()).hexdigest()[:24]
        return f"{PREFIX}chain:{digest}:"

    def link_push(self, *, host: str, repo_id: str, ref: str, after: str, before: str, ttl: int) -> None:
        """Remember that the push to `after` came from `before` on this branch (kept `ttl` s, like records)."""
        with self._errors("recording the push chain"):
            self._client.set(self._chain_prefix(host, repo_id, ref) + after, before, ex=ttl)

    def push_order(self, *, host: str, repo_id: str, ref: str, ours: str, others: list[str], max_steps: int) -> list[int]:
        """Per other push (its `after`): 1 ours is newer, -1 it is newer, 0 the chain cannot tell."""
        if not others:
            return []
        with self._errors("walking the push chain"):
            return [int(v) for v in self._push_order(args=[self._chain_prefix(host, repo_id, ref), max_steps, ours, *others])]

    def records(self, delivery_ids: list[str]) -> list[dict[str, Any] | None]:
        """Several delivery records (no decision logs) in one round trip; None for an unknown id."""
        with self._errors("reading deliveries"):
            pipe = self._client.pipeline(transaction=False)
            for delivery_id in delivery_ids:
                pipe.hgetall(record_key(delivery_id))
            rows = pipe.execute()
        return [decode_delivery(fields, []) for fields in rows]

    # ---- run ownership and rollout deadlines (issue 10: what a run may do comes from here) --

    def own_run(self, delivery_id: str, *, namespace: str, name: str, route: str, sha: str, attempt: int) -> None:
        """Record, before creating it, that this delivery owns PipelineRun namespace/name (see broker.services.provenance)."""
        entry = {"namespace": namespace, "name": name, "route": route, "sha": sha, "attempt": attempt}
        with self._errors("recording a run's owner"):
            self._client.hset(record_key(delivery_id), f"run:{namespace}/{name}", _dumps(entry))

    def delivery_run(self, delivery_id: str, namespace: str, name: str) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
        """(stored record, its ownership entry for this run or None), or None when the delivery is not stored. One round trip."""
        with self._errors("reading a run's owner"):
            record, owned = self._client.hmget(record_key(delivery_id), ["record", f"run:{namespace}/{name}"])
        if record is None:
            return None
        try:
            value = json.loads(record)
            entry = json.loads(owned) if owned is not None else None
        except ValueError:
            return {}, None
        if not isinstance(value, dict):
            return {}, None
        return value, entry if isinstance(entry, dict) else None

    def set_deadline(self, key: str, *, deadline: float, ttl: int) -> float:
        """The rollout deadline of `key`, set once (a retried deploy keeps the first); returns the one in force."""
        with self._errors("recording a rollout deadline"):
            pipe = self._client.pipeline(transaction=True)
            pipe.set(f"{PREFIX}deadline:{key}", repr(deadline), nx=True, ex=ttl)
            pipe.get(f"{PREFIX}deadline:{key}")
            _, value = pipe.execute()
        return float(value)

    def deadline(self, key: str) -> float | None:
        with self._errors("reading a rollout deadline"):
            value = self._client.get(f"{PREFIX}deadline:{key}")
        return None if value is None else float(value)

    # ---- metrics shared by every process (broker.core.metrics) -------------------------------

    def count(self, family: str, labels: str, *, by: float = 1) -> None:
        """Add to a cluster-wide counter (a Redis hash per family, one field per label set)."""
        with self._errors("counting"):
            self._client.hincrbyfloat(f"{PREFIX}metrics:{family}", labels, by)

    def counters(self, families: list[str]) -> dict[str, dict[str, float]]:
        with self._errors("reading metrics"):
            pipe = self._client.pipeline(transaction=False)
            for family in families:
                pipe.hgetall(f"{PREFIX}metrics:{family}")
            rows = pipe.execute()
        return {family: {k.decode(): float(v) for k, v in row.items()} for family, row in zip(families, rows)}

    def ping(self) -> None:
        with self._errors("pinging"):
            self._client.ping()

    def close(self) -> None:
        self._client.close()
