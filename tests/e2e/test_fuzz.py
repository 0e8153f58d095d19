"""Fuzzing the live server through its own OpenAPI document (schemathesis over real HTTP).

Every documented operation is fuzzed as five principals: no key, a bad credential, a valid admin key,
a label-only key and a token minted from it. Schemathesis generates schema-valid and schema-violating
requests; half the time the model name is a served one and the tensors are shaped like its inputs, so
the deep path (guard, runtime, output policy, privacy) is reached, not only 404.

Checks on every answer: no 5xx; an answer within the timeout; status, content type, headers and
body as the document declares them; an error is `{"error": str, "code": str}` as application/json;
a 401 carries WWW-Authenticate; a valid credential is never answered 401; no credential is echoed.

`BASTION_FUZZ_EXAMPLES` sets the number of requests per principal (bench/fuzz.py raises it).
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.transport.prepare import get_exclude_headers

from bastion.routes import ROUTES
from tests.conftest import Deployment
from tests.helpers import RunningServer, create_key, start_server

EXAMPLES = int(os.environ.get("BASTION_FUZZ_EXAMPLES", "600"))
TIMEOUT = (5.0, 20.0)  # connect, read (s): a request that takes longer counts as a hang

# Limits that never refuse, so the fuzzer reaches every stage; aggregates and admin for full coverage.
FUZZ_ROLES = """

[roles.fuzzadmin]
rate = 1000000
burst = 1000000
daily_quota = 100000000
grants = [
  { models = ["*"], actions = ["infer", "metadata", "admin"], output = "probabilities", sensitive_inputs = true },
  { models = ["*"], actions = ["aggregate"], epsilon = 0.01, privacy_budget = 1e9 },
]

[roles.fuzzlabel]
rate = 1000000
burst = 1000000
daily_quota = 100000000
grants = [ { models = ["*"], actions = ["infer", "metadata"], output = "label" } ]

"""
PRINCIPALS = ["anonymous", "bad_credential", "admin", "label", "token"]
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
# A schema-violating body refused because it is over the route's body cap (413) is refused all the same.
SCHEMATHESIS_CONFIG = SchemathesisConfig.from_dict(
    {
        "checks": {
            "negative_data_rejection": {
                "expected-statuses": [
                    "400",
                    "401",
                    "403",
                    "404",
                    "405",
                    "406",
                    "409",
                    "413",
                    "415",
                    "422",
                    "428",
                    "429",
                    "5xx",
                ]
            }
        }
    }
)
# Whether a tensor fits is the model's to say (422), not the document's: schema-valid bodies may be refused.
CHECKS_WITH_BODY_SCHEMA = [*CHECKS, positive_data_acceptance]
_HEALTH = {"/v2/health/live", "/v2/health/ready"}
# The dashboard's login page, script and style sheet: fixed files for anyone (public rows of the table).
_PUBLIC_FILES = {path for spec in ROUTES if spec.public for path, _ in spec.paths()} - _HEALTH


@dataclass
class FuzzTarget:
    server: RunningServer
    schema: Any
    keys: dict[str, str]
    models: dict[str, list[dict[str, Any]]]  # model name -> its declared inputs (metadata)
    statuses: Counter[tuple[str, str, int]] = field(default_factory=Counter)


@pytest.fixture(scope="module")
def target(deployment: Deployment) -> Iterator[FuzzTarget]:
    # The shared deployment's signed bundles, served by a second server with its own state and roles.
    text = deployment.config.read_text()
    assert 'state_dir = "state"' in text
    text = text.replace('state_dir = "state"', 'state_dir = "fuzz-state"', 1)
    # Query auditing would (rightly) quarantine a key that sends random rows; the fuzzer is not a thief.
    text = text.replace(
        'trusted_keys = ["keys/release.pub"]\n',
        'trusted_keys = ["keys/release.pub"]\nextraction_watch = "off"\n',
    )
    # Crash durability is tested elsewhere; an fsync per group commit would only slow the fuzzer down.
    text = text.replace("[audit]\n", "[audit]\nfsync = false\n", 1)
    config = deployment.root / "fuzz.toml"
    config.write_text(text + FUZZ_ROLES)
    keys = {"admin": create_key(config, "fuzzadmin"), "label": create_key(config, "fuzzlabel")}
    log_path = deployment.root / "fuzz-server.log"
    server = start_server(config, log_path)
    try:
        with server.client(keys["label"]) as client:
            minted = client.post("/v2/auth/token", json={"scope": ["infer:*", "metadata:*"]})
            assert minted.status_code == 200, minted.text
            keys["token"] = minted.json()["access_token"]
        with server.client(keys["admin"]) as client:
            names = ("breast-cancer", "breast-cancer-skops", "diabetes", "loan")
            models = {name: client.get(f"/v2/models/{name}").json()["inputs"] for name in names}
        schema = schemathesis.openapi.from_url(
            f"{server.base_url}/v2/openapi.json",
            config=SCHEMATHESIS_CONFIG,
            headers={"Authorization": f"Bearer {keys['admin']}"},
        )
        yield FuzzTarget(server, schema, keys, models)
    finally:
        server.stop()
    # The fuzzer's credentials (the bad ones are near misses of these) reach neither log nor audit.
    stored = [log_path, *(deployment.root / "fuzz-state").glob("audit.db*")]
    for path in stored:
        content = path.read_bytes()
        for secret in keys.values():
            assert secret.encode() not in content, f"a credential in {path.name}"


def _bad_credentials(target: FuzzTarget) -> st.SearchStrategy[str]:
    """Authorization values that must all be refused: near misses of real credentials and junk."""
    real_id = target.keys["label"].split("_")[1]
    token = target.keys["token"]
    head, payload, sig = token.split(".")
    secret = st.text(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", min_size=0, max_size=60
    )
    hex16 = st.text("0123456789abcdef", min_size=16, max_size=16)
    return st.one_of(
        secret.map(lambda s: f"Bearer bst_{real_id}_{s}"),  # the right key id, a wrong secret
        st.tuples(hex16, secret).map(lambda t: f"Bearer bst_{t[0]}_{t[1]}"),
        st.integers(0, len(token) - 1).map(lambda i: f"Bearer {token[:i]}"),  # truncated token
        st.integers(0, len(sig) - 2).map(  # one character of the signature changed
            lambda i: f"Bearer {head}.{payload}.{sig[:i]}{'A' if sig[i] != 'A' else 'B'}{sig[i + 1 :]}"
        ),
        st.just(f"Bearer {payload}.{head}.{sig}"),  # swapped segments
        st.just(f"Bearer {head}.{payload}."),  # no signature
        st.sampled_from(["", "Bearer", "Bearer ", "Basic YTpi", "bearer", f"Token {target.keys['label']}"]),
        st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200),
    )


def _tensor_body(inputs: list[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """A request shaped like the model's inputs, with fuzzed values and row counts (zero rows included)."""
    values = st.one_of(
        st.floats(allow_nan=False, allow_infinity=False, width=32),
        st.floats(-5, 5),
        st.integers(-(2**40), 2**40),
        st.sampled_from([0, 1, 2, -1]),
    )

    def build(rows: int, data: st.DataObject) -> dict[str, Any]:
        tensors = []
        for spec in inputs:
            cols = int(spec["shape"][-1]) if len(spec["shape"]) > 1 else 1
            cells = data.draw(st.lists(values, min_size=rows * cols, max_size=rows * cols))
            tensors.append(
                {"name": spec["name"], "datatype": spec["datatype"], "shape": [rows, cols], "data": cells}
            )
        return {"inputs": tensors}

    return st.tuples(st.integers(0, 4), st.data()).map(lambda t: build(*t))


def _draw_case(target: FuzzTarget, data: st.DataObject, operations: list[Any]) -> Any:
    operation = data.draw(st.sampled_from(operations), label="operation")
    mode = data.draw(st.sampled_from([GenerationMode.POSITIVE, GenerationMode.NEGATIVE]), label="mode")
    fixed: dict[str, Any] = {}
    # Mostly a served model: random names only ever reach 404, the deep path is where faults hide.
    if "{model_name}" in operation.path and data.draw(st.integers(0, 4), label="served model") > 0:
        name = data.draw(st.sampled_from(sorted(target.models)), label="model")
        fixed["path_parameters"] = {"model_name": name}
        if "{model_version}" in operation.path:
            version = data.draw(st.sampled_from(["1", "1", "2", "1.0"]), label="version")
            fixed["path_parameters"]["model_version"] = version
        # Three in four: bodies shaped like the model's inputs reach the runtime. The rest (and every
        # request naming no served model) come from the document's schema: the slow part of generation
        # (~0.1 s a body), and the decoder's own property tests cover malformed bodies in-process.
        takes_tensors = operation.path.endswith(("/infer", "/aggregate"))
        if takes_tensors and data.draw(st.integers(0, 3), label="shaped body") > 0:
            fixed["body"] = data.draw(_tensor_body(target.models[name]), label="body")
            fixed["media_type"] = "application/json"  # the document also offers the binary extension's bytes
    return data.draw(operation.as_strategy(generation_mode=mode, **fixed), label="case")


def _credential(target: FuzzTarget, principal: str, data: st.DataObject) -> str | None:
    if principal == "anonymous":
        return None
    if principal == "bad_credential":
        # Strip: a header value's surrounding whitespace is not part of it (the client refuses to send it).
        return data.draw(_bad_credentials(target), label="credential").strip()
    return f"Bearer {target.keys[principal]}"


def _header(response: schemathesis.Response, name: str) -> str:
    values = response.headers.get(name) or [""]
    assert len(values) == 1, f"{len(values)} {name} headers"
    return values[0]


def _expect(target: FuzzTarget, principal: str, case: Any, response: schemathesis.Response) -> None:
    """Bastion's own rules, beyond what the document states."""
    where = f"{principal}: {case.method} {case.formatted_path} -> {response.status_code}"
    status, body = response.status_code, response.content
    assert status < 500 or (case.path == "/v2/health/ready" and status == 503), where
    if status >= 400:
        assert _header(response, "content-type") == "application/json", where
        doc = json.loads(body)
        if case.path.startswith("/v1/"):  # OpenAI's error shape, the same stable code inside
            assert isinstance(doc, dict) and set(doc) == {"error"}, f"{where}: {body[:300]!r}"
            doc = doc["error"]
            assert set(doc) == {"message", "type", "param", "code"}, f"{where}: {body[:300]!r}"
            doc = {"error": doc["message"], "code": doc["code"]}
        assert isinstance(doc, dict) and set(doc) == {"error", "code"}, f"{where}: {body[:300]!r}"
        assert isinstance(doc["error"], str) and isinstance(doc["code"], str), where
        assert re.fullmatch(r"[a-z][a-z0-9_]*", doc["code"]), f"{where}: code {doc['code']!r}"
    if status == 401:
        assert _header(response, "www-authenticate").startswith("Bearer"), where
    if status == 429:
        assert int(_header(response, "retry-after")) >= 1, where
    anonymous = principal in ("anonymous", "bad_credential")
    if case.path in _HEALTH:
        assert status in (200, 503), where
    elif case.path in _PUBLIC_FILES:
        assert status == 200, where
    elif anonymous:
        # Nothing but 401 (or the failed-authentication throttle) without a valid credential.
        assert status in (401, 429), f"{where}: {body[:300]!r}"
    # A token can mint neither a token nor a dashboard session (either would outlive it).
    elif not (principal == "token" and case.path in ("/v2/auth/token", "/v2/admin/session")):
        assert status != 401, f"{where}: a valid credential was refused: {body[:300]!r}"
    for secret in target.keys.values():
        assert secret.encode() not in body, f"{where}: a credential echoed in the response"


@pytest.mark.parametrize("principal", PRINCIPALS)
def test_fuzz_every_documented_operation(target: FuzzTarget, principal: str) -> None:
    operations = [result.ok() for result in target.schema.get_all_operations()]
    documented = {op.path for op in operations}
    # The document covers every route the server has (the fuzzer can only reach what is documented).
    assert {"/v2", "/v2/auth/token", "/metrics", "/v2/models/{model_name}/infer"} <= documented
    session = requests.Session()
    started = time.monotonic()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )
    @given(data=st.data())
    def fuzz(data: st.DataObject) -> None:
        case = _draw_case(target, data, operations)
        credential = _credential(target, principal, data)
        headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
        if credential is not None:
            headers["Authorization"] = credential
        case.headers = headers
        try:
            response = case.call(base_url=target.server.base_url, session=session, timeout=TIMEOUT)
        except requests.Timeout:
            pytest.fail(f"{principal}: {case.method} {case.formatted_path}: no answer within {TIMEOUT[1]} s")
        # A negative case may drop a header the document requires, the security scheme's included: then
        # the request went without the credential and is judged as an anonymous one.
        sent = principal
        if principal != "anonymous" and "authorization" in {h.lower() for h in get_exclude_headers(case)}:
            sent = "anonymous"
        target.statuses[(sent, case.operation.label, response.status_code)] += 1
        _expect(target, sent, case, response)
        model_body = case.path.endswith(("/infer", "/aggregate"))
        case.validate_response(response, checks=CHECKS if model_body else CHECKS_WITH_BODY_SCHEMA)

    fuzz()
    elapsed = time.monotonic() - started
    seen = Counter(
        status for (who, _, status), n in target.statuses.items() if who == principal for _ in range(n)
    )
    print(
        f"\n{principal}: {sum(seen.values())} requests in {elapsed:.1f} s, statuses {dict(sorted(seen.items()))}"
    )
    if principal in ("admin", "label", "token"):
        # The fuzzer got past the front door: some answers came from the models themselves.
        assert seen[200] > 0 and seen[422] > 0


def test_schema_is_served_to_every_authenticated_principal(target: FuzzTarget) -> None:
    docs = []
    for principal in ("admin", "label", "token"):
        with target.server.client(target.keys[principal]) as client:
            response = client.get("/v2/openapi.json")
            assert response.status_code == 200
            docs.append(response.json())
    assert docs[0] == docs[1] == docs[2]
    assert httpx.get(f"{target.server.base_url}/v2/openapi.json").status_code == 401


def test_integers_written_as_floats_are_integers(target: FuzzTarget) -> None:
    # Found by the fuzzer (positive_data_acceptance on POST /v2/auth/token). The kind: every field the
    # document types `integer` (ttl_seconds, shape) must take the integral float the schema allows.
    spec = target.models["diabetes"][0]
    cols = int(spec["shape"][-1])

    def infer(client: httpx.Client, shape: list[float]) -> httpx.Response:
        tensor = {"name": spec["name"], "datatype": spec["datatype"], "shape": shape, "data": [0.0] * cols}
        return client.post("/v2/models/diabetes/infer", json={"inputs": [tensor]})

    with target.server.client(target.keys["admin"]) as client:
        assert infer(client, [1, cols]).status_code != 400  # the same tensor, shape written as integers
        assert infer(client, [1.0, cols]).status_code != 400
        token = client.post("/v2/auth/token", json={"scope": ["infer:*"], "ttl_seconds": 60.0})
        assert token.status_code == 200, token.text


_SEGMENTS = st.sampled_from(
    [
        "v2",
        "models",
        "breast-cancer",
        "versions",
        "1",
        "infer",
        "aggregate",
        "ready",
        "health",
        "live",
        "auth",
    ]
) | st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="/?#%"), max_size=12)


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(
    # Methods the HTTP parser knows; others never reach the app: test_http_parser_errors_are_json_errors.
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE"]),
    segments=st.lists(_SEGMENTS, max_size=7),
    trailing=st.booleans(),
    principal=st.sampled_from(["anonymous", "label"]),
)
def test_fuzz_paths_and_methods_outside_the_document(
    target: FuzzTarget, method: str, segments: list[str], trailing: bool, principal: str
) -> None:
    # Every path and method, documented or not: 401 without a key, and with one a JSON answer, never 5xx.
    path = "/" + "/".join(segments) + ("/" if trailing and segments else "")
    headers = {"Authorization": f"Bearer {target.keys[principal]}"} if principal != "anonymous" else {}
    response = httpx.request(method, target.server.base_url + path, headers=headers, timeout=TIMEOUT[1])
    where = f"{principal}: {method} {path} -> {response.status_code}"
    assert response.status_code < 500 or path == "/v2/health/ready", where
    if path in _HEALTH or path in _PUBLIC_FILES:
        return
    if principal == "anonymous":
        assert response.status_code in (401, 429), where
    if method != "HEAD":
        assert response.headers["content-type"] == "application/json", where
        if response.status_code >= 400:
            assert set(response.json()) == {"error", "code"}, where


def _raw(target: FuzzTarget, request: bytes) -> tuple[bytes, bytes]:
    """Send bytes as they are; the answer's head and body."""
    host, port = target.server.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, body


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"FOO / HTTP/1.1\r\nHost: x\r\n\r\n",  # a method the parser does not know
        b"GET / HTTX/1.1\r\nHost: x\r\n\r\n",  # a malformed request line
        b"GET /v2 HTTP/1.1\r\nHo st: x\r\n\r\n",  # a space in a header name
        b"POST /v2/auth/token HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",  # chunk size
    ],
    ids=["unknown-method", "request-line", "header-name", "chunk-size"],
)
def test_http_parser_errors_are_json_errors(target: FuzzTarget, request_bytes: bytes) -> None:
    # Found by test_fuzz_paths_and_methods_outside_the_document (FOO / -> 400 text/plain). The kind:
    # every answer the front end gives before the app runs is a JSON error like the app's own.
    head, body = _raw(target, request_bytes)
    assert head.startswith(b"HTTP/1.1 400"), head
    assert b"content-type: application/json" in head.lower(), head
    assert set(json.loads(body)) == {"error", "code"}
