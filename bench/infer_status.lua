-- wrk script: POST the V2 inference request in BASTION_BENCH_BODY, each request with the next of the
-- bearer keys in BASTION_BENCH_KEYS (comma-separated; none for a server without authentication),
-- as many clients would; count the answers by status and print them at the end as
-- "status <code> <count>" lines (so that a non-2xx count says what it was: 429, 503, ...).
local f = assert(io.open(os.getenv("BASTION_BENCH_BODY"), "r"))
local body = f:read("*a")
f:close()
local keys = {}
for key in string.gmatch(os.getenv("BASTION_BENCH_KEYS") or "", "[^,]+") do
  table.insert(keys, key)
end

local threads = {}
function setup(thread)
  table.insert(threads, thread)
end

-- The requests are built here, not when the script loads: wrk.format takes the Host header from
-- wrk.headers, which wrk fills in only after loading the script (a request without Host is
-- refused by strict HTTP/1.1 parsers such as MLServer's).
function init(args)
  counts = {}
  next_request = 0
  requests = {}
  for _, key in ipairs(keys) do
    local headers = { ["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. key }
    table.insert(requests, wrk.format("POST", nil, headers, body))
  end
  if #requests == 0 then
    table.insert(requests, wrk.format("POST", nil, { ["Content-Type"] = "application/json" }, body))
  end
end

function request()
  next_request = next_request % #requests + 1
  return requests[next_request]
end

function response(status, headers, body)
  counts[status] = (counts[status] or 0) + 1
end

function done(summary, latency, requests)
  local total = {}
  for _, thread in ipairs(threads) do
    for code, n in pairs(thread:get("counts")) do
      total[code] = (total[code] or 0) + n
    end
  end
  for code, n in pairs(total) do
    io.write(string.format("status %d %d\n", code, n))
  end
end
