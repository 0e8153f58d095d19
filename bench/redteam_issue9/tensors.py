"""Degenerate V2 tensors against infer and aggregate on every demo model. Flags 5xx and non-JSON.
Usage: tensors.py URL KEY"""

import json
import os
import sys
import time
import urllib.error
import urllib.request

URL, KEY = sys.argv[1], sys.argv[2]
M = {"breast-cancer": 30, "breast-cancer-skops": 30, "diabetes": 10}


def post(path, body):
    time.sleep(float(os.environ.get("TENSORS_PACE", "0")))  # under a key's rate limit
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(
        URL + path, data=data, headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except Exception as e:
        return 0, repr(e).encode()


def t(shape, data, dt="FP32", name="features", extra=None):
    d = {"name": name, "datatype": dt, "shape": shape, "data": data}
    if extra:
        d.update(extra)
    return {"inputs": [d]}


bad = 0
for model, c in M.items():
    row = [1.0] * c
    cases = {
        "zero_rows": t([0, c], []),
        "zero_cols": t([1, 0], []),
        "zero_both": t([0, 0], []),
        "3d_zero": t([1, 0, c], []),
        "3d": t([1, 1, c], row),
        "1d": t([c], row),
        "scalar": t([], [1.0]),
        "neg": t([-1, c], row),
        "neg_neg": t([-1, -c], row),
        "huge_shape": t([2**62, 2], [1.0]),
        "overflow_product": t([2**32, 2**32], [1.0]),
        "float_shape": t([1.0, c], row),
        "bool_shape": t([True, c], row),
        "str_shape": t(["1", c], row),
        "mismatch_more": t([1, c], row + [1.0]),
        "mismatch_less": t([2, c], row),
        "nan": t([1, c], [float("nan")] + row[1:]),
        "inf": t([1, c], [float("inf")] + row[1:]),
        "nested_data": t([1, c], [row]),
        "nested_ragged": t([2, c], [row, row[:-1]]),
        "bytes_dt": t([1, c], ["a"] * c, dt="BYTES"),
        "bytes_obj": t([1, 1], [{"b64": "AAAA"}], dt="BYTES"),
        "bool_dt": t([1, c], [True] * c, dt="BOOL"),
        "int8_overflow": t([1, c], [1000] * c, dt="INT8"),
        "uint_neg": t([1, c], [-1] * c, dt="UINT8"),
        "fp16": t([1, c], row, dt="FP16"),
        "bf16": t([1, c], row, dt="BF16"),
        "fp64_huge": t([1, c], [1e308] * c, dt="FP64"),
        "int64_big": t([1, c], [2**63] * c, dt="INT64"),
        "unknown_dt": t([1, c], row, dt="COMPLEX64"),
        "two_inputs": {"inputs": [t([1, c], row)["inputs"][0], t([1, c], row)["inputs"][0]]},
        "wrong_name": t([1, c], row, name="x"),
        "empty_inputs": {"inputs": []},
        "inputs_obj": {"inputs": {}},
        "outputs_weird": {
            **t([1, c], row),
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        },
        "params_weird": {**t([1, c], row), "parameters": {"binary_data_output": True, "x": [1] * 1000}},
        "deep_json": b'{"inputs":' + b"[" * 100000 + b"]" * 100000 + b"}",
        "big_int_text": b'{"inputs":[{"name":"features","datatype":"FP32","shape":[1,'
        + str(c).encode()
        + b'],"data":['
        + b"9" * 5000
        + b"]}]}",
        "dup_keys": b'{"inputs":[{"name":"features","name":"features","datatype":"FP32","shape":[1,1],"shape":[1,'
        + str(c).encode()
        + b'],"data":'
        + json.dumps(row).encode()
        + b"}]}",
        "reference_true": {"reference": True},
        "reference_false": {"reference": False},
        "reference_plus_inputs": {"reference": True, **t([1, c], row)},
        "many_rows_small": t([257, c], row * 257),
        "id_huge": {**t([1, c], row), "id": "x" * 100000},
        "id_nonstr": {**t([1, c], row), "id": {"a": 1}},
        "nan_literal": b'{"inputs":[{"name":"features","datatype":"FP32","shape":[1,'
        + str(c).encode()
        + b'],"data":[NaN'
        + b",1" * (c - 1)
        + b"]}]}",
        "bom": b"\xef\xbb\xbf" + json.dumps(t([1, c], row)).encode(),
        "utf16": json.dumps(t([1, c], row)).encode("utf-16"),
    }
    for route in ("infer", "aggregate"):
        for name, body in cases.items():
            st, out = post(f"/v2/models/{model}/{route}", body)
            try:
                j = json.loads(out)
                isjson = isinstance(j, dict) and ("code" in j or st == 200)
            except Exception:
                isjson = False
            flag = st >= 500 or st == 0 or not isjson
            bad += flag
            if flag or "-v" in sys.argv:
                print(f"{'!!' if flag else '  '} {model} {route} {name}: {st} {out[:160]!r}")
print("flagged:", bad)
