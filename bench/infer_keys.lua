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
