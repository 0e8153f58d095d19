-- wrk script: POST a V2 request in the binary tensor extension (a JSON header of
-- Inference-Header-Content-Length bytes, then raw FP32 bytes), with a bearer credential from the environment.
wrk.method = "POST"
local f = assert(io.open(os.getenv("BASTION_BENCH_BODY"), "rb"))
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/octet-stream"
wrk.headers["Inference-Header-Content-Length"] = os.getenv("BASTION_BENCH_HEADER_LENGTH")
local key = os.getenv("BASTION_BENCH_KEY")
if key ~= nil and key ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. key
end
