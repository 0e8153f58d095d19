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
  local body = template:gsub("__X__", string.format("%.6f", 10 + math.random() * 5))
  return wrk.format("POST", nil, headers, body)
end
