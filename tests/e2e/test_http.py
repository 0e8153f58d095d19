"""End to end: the real server over HTTP on loopback, attacked from the client's side."""

from __future__ import annotations

import base64
import json
import time

import httpx
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc import jwt
from joserfc.jwk import OctKey, OKPKey, RSAKey

from bastion.demo import infer_request
from tests.conftest import Deployment
from tests.helpers import create_key, run_cli

ONNX, SKOPS = "breast-cancer", "breast-cancer-skops"


def rows(dep: Deployment, n: int = 3, start: int = 0) -> np.ndarray:
    return np.asarray(dep.build.features[start : start + n], dtype=np.float32)


def infer_body(dep: Deployment, n: int = 3, start: int = 0) -> dict:
    body = infer_request(rows(dep, n, start), request_id="req-1")
    dep.raw_values.update(repr(v) for v in body["inputs"][0]["data"][:30])
    return body


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "code"}
    if code is not None:
        assert body["code"] == code, body
    return body


# -- identity ---------------------------------------------------------------------------------


def test_health_probes_answer_without_credentials(deployment: Deployment) -> None:
    with deployment.server.client() as c:
        assert c.get("/v2/health/live").json() == {"live": True}
        assert c.get("/v2/health/ready").json() == {"ready": True}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v2"),
        ("GET", f"/v2/models/{ONNX}"),
        ("GET", f"/v2/models/{ONNX}/ready"),
        ("GET", f"/v2/models/{ONNX}/versions/1"),
        ("POST", f"/v2/models/{ONNX}/infer"),
        ("POST", f"/v2/models/{ONNX}/versions/1/infer"),
        ("GET", "/v2/models/no-such-model"),  # no enumeration: unknown models look the same
        ("POST", "/v2/models/no-such-model/infer"),
        ("GET", "/v2/openapi.json"),
        ("GET", "/metrics"),
        ("POST", "/v2/auth/token"),
        ("GET", "/v2/models/x/infer"),  # wrong method
        ("GET", "/admin"),  # unknown path
    ],
)
def test_anonymous_calls_get_401_everywhere(deployment: Deployment, method: str, path: str) -> None:
    with deployment.server.client() as c:
        r = c.request(method, path, json={"inputs": []})
    assert_error(r, 401, "unauthenticated")
    assert r.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "credential",
    [
        "Bearer bst_0123456789abcdef_" + "A" * 43,  # well-formed, unknown id
        "Bearer nonsense",
        "Basic dXNlcjpwYXNz",
        "Bearer  x y",
    ],
)
def test_bad_credentials_get_401(deployment: Deployment, credential: str) -> None:
    with httpx.Client(base_url=deployment.server.base_url) as c:
        r = c.get(f"/v2/models/{ONNX}", headers={"Authorization": credential})
    assert_error(r, 401, "unauthenticated")


def test_right_key_id_wrong_secret_gets_401(deployment: Deployment) -> None:
    real = deployment.keys["analyst"]
    forged = real[:-4] + ("AAAA" if not real.endswith("AAAA") else "BBBB")
    with deployment.server.client(forged) as c:
        assert_error(c.get(f"/v2/models/{ONNX}"), 401)


def test_revoked_key_is_refused_on_the_next_request(deployment: Deployment) -> None:
    key = create_key(deployment.config, "analyst")
    deployment.secrets.add(key)
    with deployment.server.client(key) as c:
        assert c.get(f"/v2/models/{ONNX}").status_code == 200
        key_id = key.split("_")[1]
        out = run_cli("keys", "revoke", "--config", deployment.config, key_id)
        assert "revoked" in out.stdout
        assert_error(c.get(f"/v2/models/{ONNX}"), 401)
    listing = run_cli("keys", "list", "--config", deployment.config).stdout
    assert key_id in listing and "revoked" in listing
    assert key.split("_", 2)[2] not in listing  # the secret is never listed


def test_expired_key_gets_401(deployment: Deployment) -> None:
    key = create_key(deployment.config, "analyst", "--expires-in", "1")
    deployment.secrets.add(key)
    with deployment.server.client(key) as c:
        assert c.get(f"/v2/models/{ONNX}").status_code == 200
        time.sleep(1.2)
        assert_error(c.get(f"/v2/models/{ONNX}"), 401)


# -- tokens -----------------------------------------------------------------------------------


def _token(dep: Deployment, key: str, **body: object) -> httpx.Response:
    with dep.server.client(key) as c:
        return c.post("/v2/auth/token", json=body)


def test_token_narrows_the_key(deployment: Deployment) -> None:
    r = _token(deployment, deployment.keys["admin"], scope=[f"infer:{ONNX}"], output="label", ttl_seconds=60)
    assert r.status_code == 200, r.text
    token = r.json()["access_token"]
    deployment.secrets.add(token)
    assert r.json()["expires_in"] == 60
    with deployment.server.client(token) as c:
        ok = c.post(f"/v2/models/{ONNX}/infer", json=infer_body(deployment))
        assert ok.status_code == 200
        assert [o["name"] for o in ok.json()["outputs"]] == ["label"]  # admin's probabilities narrowed away
        assert_error(c.get(f"/v2/models/{ONNX}"), 403)  # metadata not in scope
        assert_error(c.post(f"/v2/models/{SKOPS}/infer", json=infer_body(deployment)), 403)
        assert_error(c.get("/metrics"), 403)
        # A token cannot mint a token: a stolen one cannot renew itself.
        assert_error(c.post("/v2/auth/token", json={}), 401)


def test_token_cannot_widen_the_key(deployment: Deployment) -> None:
    assert_error(_token(deployment, deployment.keys["analyst"], scope=["admin:*", f"infer:{ONNX}"]), 403)
    assert_error(_token(deployment, deployment.keys["analyst"], scope=["infer:loan", f"admin:{ONNX}"]), 403)
    assert_error(_token(deployment, deployment.keys["analyst"], scope="infer:x"), 400)
    assert_error(_token(deployment, deployment.keys["analyst"], ttl_seconds=10**9), 400)
    # Asking for everything ('*') still yields no more than the key has.
    r = _token(deployment, deployment.keys["analyst"], scope=["infer:*"])
    assert r.status_code == 200
    deployment.secrets.add(r.json()["access_token"])
    with deployment.server.client(r.json()["access_token"]) as c:
        assert_error(c.get("/metrics"), 403)
        assert_error(c.post("/v2/models/loan/infer", json={"inputs": []}), 400)  # granted, then malformed
        r2 = c.post(
            f"/v2/models/{ONNX}/infer",
            json={**infer_body(deployment), "outputs": [{"name": "probabilities"}]},
        )
        assert_error(r2, 403, "output_not_granted")


def _server_key(dep: Deployment) -> OKPKey:
    return OKPKey.import_key(json.loads((dep.root / "state" / "token_signing.jwk").read_text()))


def _claims(dep: Deployment, **over: object) -> dict:
    key_id = dep.keys["admin"].split("_")[1]
    now = int(time.time())
    claims = {
        "iss": "bastion",
        "aud": "bastion",
        "sub": key_id,
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "scope": ["infer:*", "metadata:*", "admin:*"],
    }
    claims.update(over)
    return claims


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def bad_tokens(dep: Deployment) -> dict[str, str]:
    server_key = _server_key(dep)
    public = server_key.as_dict(private=False)
    other = OKPKey.generate_key("Ed25519")
    good = jwt.encode({"alg": "Ed25519"}, _claims(dep), server_key, algorithms=["Ed25519"])
    head, payload, sig = good.split(".")
    widened = _b64({**_claims(dep), "sub": dep.keys["admin"].split("_")[1], "scope": ["admin:*"], "x": 1})
    rsa_key = RSAKey.import_key(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    return {
        "forged (another Ed25519 key)": jwt.encode(
            {"alg": "Ed25519"}, _claims(dep), other, algorithms=["Ed25519"]
        ),
        "expired": jwt.encode(
            {"alg": "Ed25519"}, _claims(dep, iat=1, nbf=1, exp=2), server_key, algorithms=["Ed25519"]
        ),
        "not yet valid": jwt.encode(
            {"alg": "Ed25519"}, _claims(dep, nbf=int(time.time()) + 3600), server_key, algorithms=["Ed25519"]
        ),
        "wrong audience": jwt.encode(
            {"alg": "Ed25519"}, _claims(dep, aud="elsewhere"), server_key, algorithms=["Ed25519"]
        ),
        "wrong issuer": jwt.encode(
            {"alg": "Ed25519"}, _claims(dep, iss="mallory"), server_key, algorithms=["Ed25519"]
        ),
        "no expiry": jwt.encode(
            {"alg": "Ed25519"},
            {k: v for k, v in _claims(dep).items() if k != "exp"},
            server_key,
            algorithms=["Ed25519"],
        ),
        "unknown key id": jwt.encode(
            {"alg": "Ed25519"}, _claims(dep, sub="ffffffffffffffff"), server_key, algorithms=["Ed25519"]
        ),
        "alg none": f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{payload}.",
        "HS256 keyed with the public key": jwt.encode(
            {"alg": "HS256"},
            _claims(dep),
            OctKey.import_key(json.dumps(public).encode()),
            algorithms=["HS256"],
        ),
        "HS256 keyed with raw public bytes": jwt.encode(
            {"alg": "HS256"},
            _claims(dep),
            OctKey.import_key(base64.urlsafe_b64decode(public["x"] + "=")),
            algorithms=["HS256"],
        ),
        "RS256 with an attacker key": jwt.encode(
            {"alg": "RS256"}, _claims(dep), rsa_key, algorithms=["RS256"]
        ),
        "payload edited, signature kept": f"{head}.{widened}.{sig}",
        "signature truncated": f"{head}.{payload}.{sig[:-6]}",
        "garbage": "eyJhbGciOiJFZDI1NTE5In0.!!!.???",
    }


def test_bad_tokens_get_401(deployment: Deployment) -> None:
    for name, token in bad_tokens(deployment).items():
        deployment.secrets.add(token)
        with deployment.server.client(token) as c:
            r = c.get(f"/v2/models/{ONNX}")
        assert r.status_code == 401, f"{name}: {r.status_code} {r.text}"
        assert r.json()["code"] == "unauthenticated", name


def test_token_dies_with_its_key(deployment: Deployment) -> None:
    key = create_key(deployment.config, "analyst")
    token = _token(deployment, key, scope=[f"metadata:{ONNX}"]).json()["access_token"]
    deployment.secrets.update({key, token})
    with deployment.server.client(token) as c:
        assert c.get(f"/v2/models/{ONNX}").status_code == 200
        run_cli("keys", "revoke", "--config", deployment.config, key.split("_")[1])
        assert_error(c.get(f"/v2/models/{ONNX}"), 401)


# -- authorization ----------------------------------------------------------------------------


def test_role_without_the_model_gets_403(deployment: Deployment) -> None:
    with deployment.server.client(deployment.keys["outsider"]) as c:
        assert_error(c.post(f"/v2/models/{ONNX}/infer", json=infer_body(deployment)), 403, "forbidden")
        assert_error(c.get(f"/v2/models/{ONNX}"), 403)
        assert_error(c.post("/v2/models/loan/infer", json={"inputs": []}), 403)  # metadata only
        assert c.get("/v2/models/loan").status_code == 200


def test_unknown_model_gets_404_after_authentication(deployment: Deployment) -> None:
    with deployment.server.client(deployment.keys["analyst"]) as c:
        assert_error(c.get("/v2/models/no-such-model"), 404, "model_not_found")
        assert_error(c.post(f"/v2/models/{ONNX}/versions/9/infer", json=infer_body(deployment)), 404)
        assert_error(c.get("/v2/nothing-here"), 404, "route_not_found")
        r = c.get(f"/v2/models/{ONNX}/infer")
        assert_error(r, 405, "method_not_allowed")
        assert r.headers["allow"] == "POST"


def test_output_detail_is_enforced_server_side(deployment: Deployment) -> None:
    body = infer_body(deployment)
    with deployment.server.client(deployment.keys["analyst"]) as c:
        r = c.post(f"/v2/models/{ONNX}/infer", json=body)
        assert [o["name"] for o in r.json()["outputs"]] == ["label"]
        asked = {**body, "outputs": [{"name": "probabilities"}]}
        assert_error(c.post(f"/v2/models/{ONNX}/infer", json=asked), 403, "output_not_granted")
        meta = c.get(f"/v2/models/{ONNX}").json()
        assert meta["parameters"]["granted_outputs"] == ["label"]


def test_sensitive_input_needs_its_grant(deployment: Deployment) -> None:
    body = {
        "inputs": [
            {"name": "income", "shape": [1, 3], "datatype": "FP32", "data": [0.5, 0.1, -0.2]},
            {"name": "region", "shape": [1, 1], "datatype": "INT64", "data": [2]},
        ]
    }
    with deployment.server.client(deployment.keys["analyst"]) as c:
        assert_error(c.post("/v2/models/loan/infer", json=body), 403, "sensitive_input_denied")
    with deployment.server.client(deployment.keys["admin"]) as c:
        r = c.post("/v2/models/loan/infer", json=body)
        assert r.status_code == 200, r.text
        bad = json.loads(json.dumps(body))
        bad["inputs"][1]["data"] = [7]
        err = assert_error(c.post("/v2/models/loan/infer", json=bad), 422, "not_a_category")
        assert "7" not in err["error"]  # a sensitive value is never echoed


# -- inference --------------------------------------------------------------------------------


@pytest.mark.parametrize("model", [ONNX, SKOPS])
def test_prediction_matches_the_model_run_locally(deployment: Deployment, model: str) -> None:
    body = infer_body(deployment, n=20, start=100)
    x = np.asarray(body["inputs"][0]["data"], dtype=np.float32).reshape(20, 30)
    expected = deployment.build.estimator.predict_proba(x)
    classes = ["malignant", "benign"]
    with deployment.server.client(deployment.keys["admin"]) as c:
        r = c.post(f"/v2/models/{model}/infer", json=body)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert r.json()["id"] == "req-1"
    assert r.json()["model_name"] == model and r.json()["model_version"] == "1"
    assert out["label"]["data"] == [classes[i] for i in expected.argmax(axis=1)]
    got = np.asarray(out["probabilities"]["data"]).reshape(out["probabilities"]["shape"])
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_versioned_paths_and_metadata(deployment: Deployment) -> None:
    with deployment.server.client(deployment.keys["analyst"]) as c:
        assert c.post(f"/v2/models/{ONNX}/versions/1/infer", json=infer_body(deployment)).status_code == 200
        assert c.get(f"/v2/models/{ONNX}/versions/1/ready").json()["ready"] is True
        meta = c.get(f"/v2/models/{ONNX}").json()
        assert meta["inputs"][0] == {
            "name": "features",
            "datatype": "FP32",
            "shape": [-1, 30],
            "parameters": {"sensitive": False},
        }
        assert meta["parameters"]["digest"].startswith("sha256:")
        assert c.get("/v2").json()["name"] == "bastion"


# -- input guard ------------------------------------------------------------------------------


def _feature_input(data: object, shape: list[int] | None = None, datatype: str = "FP32") -> dict:
    return {"inputs": [{"name": "features", "shape": shape or [1, 30], "datatype": datatype, "data": data}]}


def guard_cases(dep: Deployment) -> list[tuple[str, object, int, str]]:
    good = [round(float(v), 4) for v in dep.build.features[0]]
    out_of_range = list(good)
    out_of_range[3] = 1e6
    negative = list(good)
    negative[0] = -5.0
    return [
        ("out of range (high)", _feature_input(out_of_range), 422, "out_of_range"),
        ("out of range (low)", _feature_input(negative), 422, "out_of_range"),
        ("NaN", json.dumps(_feature_input(good)).replace(str(good[5]), "NaN", 1), 422, "not_finite"),
        (
            "Infinity",
            json.dumps(_feature_input(good)).replace(str(good[5]), "Infinity", 1),
            422,
            "not_finite",
        ),
        ("FP32 overflow", _feature_input([*good[:29], 1e39]), 422, "not_finite"),
        ("wrong shape", _feature_input(good[:29], [1, 29]), 422, "wrong_shape"),
        ("shape and data disagree", _feature_input(good, [2, 30]), 422, "shape_mismatch"),
        (
            "wrong datatype (declared)",
            _feature_input([int(v) for v in good], datatype="INT64"),
            422,
            "wrong_datatype",
        ),
        ("wrong datatype (strings)", _feature_input(["a"] * 30), 422, "wrong_datatype"),
        ("ragged data", _feature_input([[1.0, 2.0], [3.0]], [2, 2]), 422, "wrong_datatype"),
        ("unsupported datatype", _feature_input(good, datatype="BYTES"), 422, "unsupported_datatype"),
        (
            "unknown input",
            {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]},
            422,
            "unknown_input",
        ),
        ("too many rows", _feature_input(good * 300, [300, 30]), 413, "too_many_rows"),
        ("oversized body", _feature_input(good * 6000, [6000, 30]), 413, "payload_too_large"),
        ("malformed JSON", '{"inputs": [', 400, "malformed_json"),
        ("invalid UTF-8", b'{"inputs": "\xff\xfe"}', 400, "malformed_json"),
        ("deeply nested", "[" * 5000 + "]" * 5000, 400, "malformed_json"),
        ("not an object", "[1, 2, 3]", 400, "malformed_request"),
        ("no inputs", {"inputs": []}, 400, "malformed_request"),
        ("negative shape", _feature_input(good, [-1, 30]), 400, "malformed_request"),
        ("id not a string", {**_feature_input(good), "id": 5}, 400, "malformed_request"),
    ]


def test_input_guard_rejects_each_bad_request_with_json(deployment: Deployment) -> None:
    with deployment.server.client(deployment.keys["admin"]) as c:
        for name, body, status, code in guard_cases(deployment):
            if isinstance(body, dict):
                r = c.post(f"/v2/models/{ONNX}/infer", json=body)
            else:
                r = c.post(
                    f"/v2/models/{ONNX}/infer", content=body, headers={"Content-Type": "application/json"}
                )
            assert r.status_code == status, f"{name}: {r.status_code} {r.text[:200]}"
            assert r.json()["code"] == code, f"{name}: {r.json()}"
            assert "1000000" not in r.text  # the offending value is not echoed


def test_oversized_body_is_refused_without_content_length(deployment: Deployment) -> None:
    def chunks():  # chunked transfer: no Content-Length to trust
        for _ in range(40):
            yield b" " * 65536

    with deployment.server.client(deployment.keys["admin"]) as c:
        r = c.post(f"/v2/models/{ONNX}/infer", content=chunks())
    assert_error(r, 413, "payload_too_large")


# -- limits -----------------------------------------------------------------------------------


def test_burst_over_the_limit_gets_429_with_retry_after(deployment: Deployment) -> None:
    statuses = []
    with deployment.server.client(deployment.keys["tight"]) as c:
        for _ in range(6):
            r = c.get(f"/v2/models/{ONNX}")
            statuses.append(r.status_code)
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1
                assert r.json()["code"] == "rate_limited"
    assert statuses[:3] == [200, 200, 200]
    assert statuses[3:] == [429, 429, 429]


def test_daily_quota_gets_429(deployment: Deployment) -> None:
    with deployment.server.client(deployment.keys["quota"]) as c:
        got = [c.post(f"/v2/models/{ONNX}/infer", json=infer_body(deployment)).status_code for _ in range(3)]
        r = c.post(f"/v2/models/{ONNX}/infer", json=infer_body(deployment))
    assert got == [200, 200, 429]
    assert_error(r, 429, "quota_exhausted")
    assert 1 <= int(r.headers["retry-after"]) <= 86_400


# -- operations -------------------------------------------------------------------------------


def test_metrics_are_for_admins_and_carry_no_secrets(deployment: Deployment) -> None:
    with deployment.server.client(deployment.keys["analyst"]) as c:
        assert_error(c.get("/metrics"), 403)
    with deployment.server.client(deployment.keys["admin"]) as c:
        r = c.get("/metrics")
    assert r.status_code == 200
    text = r.text
    assert 'bastion_requests_total{decision="allow",model="breast-cancer",route="infer",status="200"}' in text
    assert "bastion_auth_failures_total" in text and "bastion_request_duration_seconds_bucket" in text
    assert "no-such-model" not in text  # attacker-chosen names never become label values
    for key in deployment.keys.values():
        assert key.split("_")[1] not in text and key not in text


def test_openapi_document_is_valid_and_complete(deployment: Deployment) -> None:
    from openapi_spec_validator import validate

    with deployment.server.client(deployment.keys["analyst"]) as c:
        doc = c.get("/v2/openapi.json").json()
    validate(doc)
    paths = set(doc["paths"])
    for p in (
        "/v2/health/live",
        "/v2/health/ready",
        "/v2",
        "/v2/models/{model_name}",
        "/v2/models/{model_name}/infer",
        "/v2/models/{model_name}/versions/{model_version}/infer",
        "/v2/auth/token",
        "/metrics",
    ):
        assert p in paths
