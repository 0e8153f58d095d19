"""What a tritonclient user can read of a refusal: over gRPC the stable code (and Retry-After) travel
only in trailing metadata, which tritonclient.grpc's InferenceServerException does not carry.

    .venv/bin/python bench/redteam_issue10/tritonclient_codes.py

Prints, for refusals that share a gRPC status, everything the exception exposes (status, message,
debug details). The issue asks for "errors as gRPC status codes with the same stable codes in
details"; before the fix the code is in none of them, so RESOURCE_EXHAUSTED for "too many rows" (fix
the request), "rate limited" (retry after N s) and "auth throttled" cannot be told apart but by
their English text, and no client of tritonclient.grpc sees when to retry.
"""

from __future__ import annotations

import numpy as np
import tritonclient.grpc as tgrpc
from common import demo
from sklearn.datasets import load_breast_cancer
from tritonclient.utils import InferenceServerException

d = demo()
client = tgrpc.InferenceServerClient(d.grpc)
rows = load_breast_cancer().data.astype(np.float32)


def infer(x: np.ndarray, key: str) -> None:
    features = tgrpc.InferInput("features", list(x.shape), "FP32")
    features.set_data_from_numpy(x)
    client.infer("breast-cancer", [features], headers={"authorization": f"Bearer {key}"})


def show(name: str, x: np.ndarray, key: str) -> None:
    try:
        infer(x, key)
        print(f"{name:24} OK")
    except InferenceServerException as e:
        print(f"{name:24} status={e.status()} message={e.message()!r} debug={e.debug_details()!r}")


show("too many rows", np.repeat(rows[:1], 300, axis=0), d.analyst)
show("out of range (422)", rows[:1] * 1e6, d.analyst)
show("malformed (400)", rows[:1, :29], d.analyst)
for _ in range(60):  # the analyst's burst is 40
    try:
        infer(rows[:1], d.analyst)
    except InferenceServerException as e:
        print(f"{'over the rate':24} status={e.status()} message={e.message()!r} debug={e.debug_details()!r}")
        break
