-- wrk script for bench/ingest.py: every request is a distinct delivery.
--
-- Same method, path, headers (-H) and body for every request; only the
-- Idempotency-Key header changes: "<prefix>-<thread number>-<counter>", so no two
-- requests of one run (nor of two runs with different prefixes) share a key; and the
-- body's `before` (40 hex, a sentinel of 40 "e" in the file) becomes
-- "<16 hex of BENCH_BEFORE_PREFIX><thread, 4 digits><counter, 20 digits>", so every
-- request is also a distinct push (the broker deduplicates on the push fingerprint,
-- not on the unsigned Idempotency-Key). Same length, so Content-Length holds.
-- Environment (read by every wrk thread):
--   BENCH_BODY_FILE      file holding the request body (sent as is, but for the sentinel)
--   BENCH_KEY_PREFIX     unique per wrk invocation
--   BENCH_BEFORE_PREFIX  16 hex digits, unique per wrk invocation
-- Any answer other than 202 is counted per status; done() prints one line
--   BENCH_JSON {...}
-- with the counts, wrk's error counters, requests, duration and latency
-- percentiles (microseconds), and one BENCH_SAMPLE line per thread that saw a
-- non-202 answer (status and the start of its body).

local body_file = os.getenv("BENCH_BODY_FILE")
local key_prefix = os.getenv("BENCH_KEY_PREFIX") or "bench"
local before_prefix = os.getenv("BENCH_BEFORE_PREFIX") or "0123456789abcdef"
local SENTINEL = string.rep("e", 40)
local threads = {}          -- main Lua state only (setup and done run there)
local head, middle, tail, key_base, before_base  -- per thread: the request split around the key and `before`
local counter = 0

-- Globals, read from each thread's state by done() through thread:get.
ok202 = 0
non202 = 0
statuses = {}
sample = ""

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

function init(args)
  local f = assert(io.open(body_file, "rb"), "cannot open BENCH_BODY_FILE")
  local body = f:read("*a")
  f:close()
  wrk.method = "POST"
  wrk.body = body
  wrk.headers["Idempotency-Key"] = "@@KEY@@"
  local req = wrk.format()
  local i, j = string.find(req, "@@KEY@@", 1, true)
  local b, e = string.find(req, SENTINEL, j + 1, true)
  assert(b, "the body has no 40-e sentinel for `before`")
  head = string.sub(req, 1, i - 1)
  middle = string.sub(req, j + 1, b - 1)
  tail = string.sub(req, e + 1)
  key_base = key_prefix .. "-" .. tostring(tid) .. "-"
  before_base = before_prefix .. string.format("%04d", tid)
end

function request()
  counter = counter + 1
  return head .. key_base .. counter .. middle .. before_base .. string.format("%020d", counter) .. tail
end

function response(status, headers, body)
  if status == 202 then
    ok202 = ok202 + 1
  else
    non202 = non202 + 1
    local k = tostring(status)
    statuses[k] = (statuses[k] or 0) + 1
    if sample == "" then
      sample = k .. " " .. string.gsub(string.sub(body or "", 1, 300), "[\r\n]", " ")
    end
  end
end

function done(summary, latency, requests)
  local ok, bad, merged, samples = 0, 0, {}, {}
  for _, t in ipairs(threads) do
    ok = ok + (t:get("ok202") or 0)
    bad = bad + (t:get("non202") or 0)
    for k, v in pairs(t:get("statuses") or {}) do
      merged[k] = (merged[k] or 0) + v
    end
    local s = t:get("sample")
    if s and s ~= "" then table.insert(samples, s) end
  end
  local parts = {}
  for k, v in pairs(merged) do
    table.insert(parts, string.format('"%s":%d', k, v))
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"ok202":%d,"non202":%d,"statuses":{%s},' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"min":%.1f,"mean":%.1f,"max":%.1f,"stdev":%.1f,"p50":%.1f,"p75":%.1f,"p90":%.1f,"p99":%.1f,"p99_9":%.1f}}\n',
    summary.requests, summary.duration, summary.bytes, ok, bad, table.concat(parts, ","),
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.max, latency.stdev,
    latency:percentile(50), latency:percentile(75), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
  for _, s in ipairs(samples) do
    io.write("BENCH_SAMPLE " .. s .. "\n")
  end
end
