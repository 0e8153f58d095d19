"""A caller decides whether its requests are traced, whatever sample_ratio says: TraceIdRatioBased
samples on the trace id, and the caller's trace id is continued.
usage: trace_sampling.py URL KEY_ENV SPANS_JSONL"""

import json
import os
import secrets
import sys
import time

import httpx

url, key, spans = sys.argv[1], os.environ[sys.argv[2]], sys.argv[3]
H = {"Authorization": f"Bearer {key}"}
kinds = {
    "forced_in": lambda: secrets.token_hex(8) + "0" * 16,  # low 64 bits 0: always under the bound
    "forced_out": lambda: secrets.token_hex(8) + "f" * 16,  # low 64 bits max: never under it
}
sent = {k: set() for k in kinds}
with httpx.Client(base_url=url, headers=H) as c:
    for k, make in kinds.items():
        for _ in range(100):
            tid = make()
            sent[k].add(tid)
            c.get("/v2", headers={"traceparent": f"00-{tid}-{secrets.token_hex(8)}-00"})
time.sleep(8)  # the batch processor exports every 5 s
with open(spans) as f:
    lines = [json.loads(x) for x in f]
seen = {s["traceId"] for s in lines if s["name"] == "bastion.request"}
for k, ids in sent.items():
    print(k, "traced:", len(ids & seen), "of", len(ids))
