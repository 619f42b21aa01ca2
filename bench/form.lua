-- wrk script for bench/scale.sh: POST a unique Net-Results-like form body
-- each time (a different lead, contact and completion id), and print the
-- same machine-readable line as bench/post.lua. Latencies in microseconds.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"

local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

local n = 0
function request()
  n = n + 1
  local key = string.format("w%dr%d", tid or 0, n)
  local body = "form_id=1c051a75-f78c-4961-b8d5-b233229ae125&contact_id=" .. key
    .. "&email_address=" .. key .. "%40example.com&first_name=First&last_name=" .. key
    .. "&company=Company+" .. (n % 1000) .. "&form_completion_id=" .. key
  return wrk.format(nil, nil, nil, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d p50_us=%d p99_us=%d non2xx=%d connect_err=%d read_err=%d write_err=%d timeouts=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.status, e.connect, e.read, e.write, e.timeout))
end
