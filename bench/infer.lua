-- wrk script: POST the same V2 inference request with a bearer credential taken from the environment.
wrk.method = "POST"
local f = assert(io.open(os.getenv("BASTION_BENCH_BODY"), "r"))
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
local key = os.getenv("BASTION_BENCH_KEY")
if key ~= nil and key ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. key
end
