-- wrk script for bench/ingest.sh: POST the JSON body named by $BENCH_BODY
-- (default bench/payload.json, trailing newline stripped) and print one
-- machine-readable line at the end. Latencies are in microseconds.
-- "non2xx" is wrk's own count of responses with a status >= 400 or < 200
-- (it calls them "Non-2xx or 3xx responses"); 3xx never happens here.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local path = os.getenv("BENCH_BODY") or "bench/payload.json"
local f = assert(io.open(path, "rb"))
wrk.body = (f:read("*a"):gsub("%s+$", ""))
f:close()

-- BENCH_STOP_AFTER=N: each wrk thread stops after N responses (a fixed
-- number of events stored rather than a fixed time; bench/postgres.sh).
local stop_after = tonumber(os.getenv("BENCH_STOP_AFTER") or "")
if stop_after then
  local seen = 0
  function response(status, headers, body)
    seen = seen + 1
    if seen >= stop_after then wrk.thread:stop() end
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d bytes=%d p50_us=%d p90_us=%d p99_us=%d p999_us=%d max_us=%d mean_us=%.0f non2xx=%d connect_err=%d read_err=%d write_err=%d timeouts=%d body_bytes=%d\n",
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.max, latency.mean, e.status, e.connect, e.read, e.write, e.timeout, #wrk.body))
end
