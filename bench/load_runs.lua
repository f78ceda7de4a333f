-- wrk script for bench/load_runs.py: counts the answers that are not 2xx and prints the run as
-- one JSON line (prefix "wrk-json: ") for the benchmark to parse.
--
--   wrk -t1 -c64 -d10s -s bench/load_runs.lua URL [-- BODY_FILE CONTENT_TYPE]
--
-- With a body file the requests are POSTs of its bytes with that content type.

local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   non2xx = 0
   if args[1] then
      local file = assert(io.open(args[1], "rb"))
      wrk.method = "POST"
      wrk.body = file:read("*a")
      file:close()
      wrk.headers["Content-Type"] = args[2] or "application/octet-stream"
   end
end

function response(status, headers, body)
   if status < 200 or status > 299 then
      non2xx = non2xx + 1
   end
end

function done(summary, latency, requests)
   local bad = 0
   for _, thread in ipairs(threads) do
      bad = bad + thread:get("non2xx")
   end
   local e = summary.errors
   io.write(string.format(
      'wrk-json: {"requests": %d, "duration_us": %d, "bytes": %d, "non2xx": %d, '
         .. '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, '
         .. '"latency_us": {"p50": %d, "p90": %d, "p99": %d, "max": %d, "mean": %.1f}}\n',
      summary.requests, summary.duration, summary.bytes, bad,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.max, latency.mean))
end
