"""Privacy budgets from the attacker's side, over HTTP, on a throwaway deployment.

1. global_privacy_budget set on one role's dp_scores grant (5 a day on diabetes) and a second role
   with a dp_scores grant on the same model and no global budget: does the second role's spending
   count toward the model's global budget?  (Expected by the README: "a row per (model, unit, window)
   that every principal spends together".)
2. Two dp_scores grants of one role on two models with different windows, interleaved: each grant
   answers exactly budget/epsilon (the issue's instance).
3. Aggregates under a global budget.

Usage: budgets.py [sqlite|redis|postgres]
"""

import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.helpers import create_key, start_server, write_test_deployment

backend = sys.argv[1] if len(sys.argv) > 1 else "sqlite"
ROLES = """
[roles.globalrole]
rate = 1000
burst = 1000
[[roles.globalrole.grants]]
models = ["diabetes"]
actions = ["infer", "aggregate"]
output = "dp_scores"
epsilon = 1.0
privacy_budget = 100.0
global_privacy_budget = 5.0

[roles.noglobal]
rate = 1000
burst = 1000
[[roles.noglobal.grants]]
models = ["diabetes"]
actions = ["infer"]
output = "dp_scores"
epsilon = 1.0
privacy_budget = 100.0

[roles.twogrants]
rate = 1000
burst = 1000
[[roles.twogrants.grants]]
models = ["breast-cancer"]
actions = ["infer"]
output = "dp_scores"
epsilon = 1.0
privacy_budget = 3.0
budget_window_seconds = 3600
[[roles.twogrants.grants]]
models = ["breast-cancer-skops"]
actions = ["infer"]
output = "dp_scores"
epsilon = 1.0
privacy_budget = 3.0
budget_window_seconds = 86400
"""
root = Path(tempfile.mkdtemp(prefix="rt9-budget-"))
extra = ""
state = ""
if backend == "redis":
    state = (
        '[state]\nbackend = "redis"\nredis_url = "redis://127.0.0.1:6379/15"\nredis_prefix = "rt9:%s:"\n'
        % root.name
    )
elif backend == "postgres":
    state = '[state]\nbackend = "postgres"\npostgres_table = "rt9_%s"\n' % root.name.replace("-", "_").lower()
config, _ = write_test_deployment(root, extra=extra)
text = config.read_text()
if state:
    text = text.replace('[state]\nbackend = "sqlite"\n', state)
config.write_text(text + ROLES)
keys = {r: create_key(config, r) for r in ("globalrole", "noglobal", "twogrants")}
server = start_server(config, root / "server.log")
n = [0]


def row(c: int) -> list[float]:
    n[0] += 1
    return [0.01 * ((n[0] * 7 + i) % 5) for i in range(c)]  # a new question each time: no cache hit


def infer(key: str, model: str, c: int) -> int:
    body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, c], "data": row(c)}]}
    with server.client(key) as cl:
        return cl.post(f"/v2/models/{model}/infer", json=body).status_code


try:
    # Within range inputs: take the demo request's first row.
    import json

    from bastion.demo import build_demo  # noqa: F401

    req = json.loads((root / "request.json").read_text())
    bc_row = req["inputs"][0]["data"][:30]
    dreq = json.loads((root / "diabetes-request.json").read_text())
    d_row = dreq["inputs"][0]["data"][:10]

    def infer_row(key, model, base):
        n[0] += 1
        data = list(base)
        data[0] = data[0] * (1 + 1e-4 * n[0])
        body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, len(base)], "data": data}]}
        with server.client(key) as cl:
            r = cl.post(f"/v2/models/{model}/infer", json=body)
            return r.status_code, r.text[:120]

    g = [infer_row(keys["globalrole"], "diabetes", d_row)[0] for _ in range(3)]
    ng = [infer_row(keys["noglobal"], "diabetes", d_row)[0] for _ in range(10)]
    g2 = [infer_row(keys["globalrole"], "diabetes", d_row) for _ in range(3)]
    total = g.count(200) + ng.count(200) + [s for s, _ in g2].count(200)
    print(f"1. global 5 on diabetes: globalrole {g} then noglobal {ng} then globalrole {[s for s, _ in g2]}")
    print(
        f"   answers with DP noise on diabetes in the window, all principals: {total} (global budget 5 allows 5)"
    )
    a, b = [], []
    for _ in range(8):
        a.append(infer_row(keys["twogrants"], "breast-cancer", bc_row)[0])
        b.append(infer_row(keys["twogrants"], "breast-cancer-skops", bc_row)[0])
    print(
        f"2. two grants interleaved: breast-cancer {a.count(200)} answers, skops {b.count(200)} (3 each expected)"
    )
finally:
    server.stop()
    shutil.rmtree(root, ignore_errors=True)
