-- wrk script: like infer_jitter.lua (every request a new row), but the requests take turns among
-- several API keys (BASTION_BENCH_KEYS, comma-separated): several principals, as a server with
-- workers or replicas sees, so per-principal state (quotas, query-auditing histories) is spread.
local f = assert(io.open(os.getenv("BASTION_BENCH_BODY"), "r"))
local template = f:read("*a")
f:close()
local keys = {}
for key in string.gmatch(os.getenv("BASTION_BENCH_KEYS") or "", "[^,]+") do
  keys[#keys + 1] = key
end
local turn = 0
math.randomseed(os.time())
request = function()
  turn = turn + 1
  local headers = { ["Content-Type"] = "application/json" }
  if #keys > 0 then
    headers["Authorization"] = "Bearer " .. keys[(turn % #keys) + 1]
  end
  local body = template:gsub("__X__", string.format("%.6f", 17.5 + math.random()))
  return wrk.format("POST", nil, headers, body)
end

-- Answers counted by status, printed at the end as "status <code> <count>" lines: a non-2xx count
-- then says what it was (429, 503, ...).
local threads = {}
function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  counts = {}
end

function response(status, headers, body)
  counts[status] = (counts[status] or 0) + 1
  if status >= 300 and first_error == nil then
    first_error = string.sub(body, 1, 300)  -- the error's JSON: its code says which defense refused
  end
end

function done(summary, latency, requests)
  for _, thread in ipairs(threads) do
    for code, n in pairs(thread:get("counts")) do
      io.write(string.format("status %d %d\n", code, n))
    end
    local first = thread:get("first_error")
    if first ~= nil then
      io.write("first error: " .. first .. "\n")
    end
  end
end
