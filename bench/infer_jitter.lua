-- wrk script: like infer.lua, but every request carries a fresh value in its first feature
-- (the body file holds the placeholder __X__), so no two requests are identical: the keyed
-- answer cache of dp_scores cannot serve them, and each pays for its noise and its budget.
local f = assert(io.open(os.getenv("BASTION_BENCH_BODY"), "r"))
local template = f:read("*a")
f:close()
local headers = { ["Content-Type"] = "application/json" }
local key = os.getenv("BASTION_BENCH_KEY")
if key ~= nil and key ~= "" then
  headers["Authorization"] = "Bearer " .. key
end
math.randomseed(os.time())
request = function()
  -- Near the first row's own value (17.99), so that the row stays plausible and passes the
  -- out-of-distribution screen: 17.5 to 18.5 in steps of 1e-6 is a new question every time.
  local body = template:gsub("__X__", string.format("%.6f", 17.5 + math.random()))
  return wrk.format("POST", nil, headers, body)
end
