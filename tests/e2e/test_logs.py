"""The server's log from the attacker's side: `bastion serve` as a subprocess, attack traffic over HTTP
and raw sockets, then every line of its stdout and stderr read back.

Each line must be one JSON object (the default `[logging] format`), uvicorn's lines included (its
loggers are routed through the same chain), and no key, token, password or payload value may appear.
"""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import socket
from pathlib import Path

import numpy as np
import pytest

from bastion.demo import infer_request
from tests.helpers import create_key, start_server, write_test_deployment

pytestmark = pytest.mark.slow

MARKER = "PAYLOADMARKER7f3a"  # a payload value: in bodies, never in a log line


def _forged_jwt(claims: dict[str, object], alg: str = "none") -> str:
    def part(doc: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()

    return f"{part({'alg': alg, 'typ': 'JWT'})}.{part(claims)}.{secrets.token_urlsafe(32)}"


def _raw(port: int, data: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        with contextlib.suppress(OSError):
            s.recv(65536)


def _attack(base_url: str, port: int, keys: dict[str, str], features: np.ndarray) -> set[str]:
    """Send the attack traffic; returns every secret and payload value it carried."""
    import httpx

    analyst, admin = keys["analyst"], keys["admin"]
    key_id = analyst.split("_")[1]
    forged_keys = [
        f"bst_{secrets.token_hex(8)}_{secrets.token_urlsafe(32)}",  # an unknown key
        f"bst_{key_id}_{secrets.token_urlsafe(32)}",  # a known id, a wrong secret
        analyst[:-5],  # the real key cut short
        analyst + "x",
    ]
    forged_tokens = [
        _forged_jwt({"sub": key_id, "aud": "bastion", "iss": "bastion", "exp": 4_000_000_000}),
        _forged_jwt({"sub": key_id, "scope": "infer:*"}, alg="EdDSA"),
        _forged_jwt({"sub": key_id}, alg="HS256"),
    ]
    password = f"hunter2-{secrets.token_hex(6)}"
    needles = {*forged_keys, *forged_tokens, analyst, admin, password, MARKER}
    needles |= {k.split("_", 2)[2] for k in (analyst, admin)}
    needles |= {t.split(".")[2] for t in forged_tokens}
    row = infer_request(features[:1])
    with httpx.Client(base_url=base_url, timeout=30) as c:
        path = "/v2/models/breast-cancer/infer"
        for key in forged_keys:
            c.post(path, json=row, headers={"Authorization": f"Bearer {key}"})
            c.post(path, json=row, headers={"Authorization": key})  # no scheme
            c.get("/v2/models/breast-cancer", headers={"X-Api-Key": key, "Authorization": f"Bearer {key}"})
        for token in forged_tokens:
            c.post(path, json=row, headers={"Authorization": f"Bearer {token}"})
            c.post(
                "/v2/auth/token",
                json={"scope": [f"infer:{MARKER}"]},
                headers={"Authorization": f"Bearer {token}"},
            )
        basic = base64.b64encode(f"admin:{password}".encode()).decode()
        c.post(path, json=row, headers={"Authorization": f"Basic {basic}"})
        # A real token, then a real token tampered with.
        issued = c.post("/v2/auth/token", json={}, headers={"Authorization": f"Bearer {analyst}"})
        if issued.status_code == 200:
            token = issued.json()["access_token"]
            needles |= {token, token.split(".")[2]}
            c.post(path, json=row, headers={"Authorization": f"Bearer {token}"})
            c.post(path, json=row, headers={"Authorization": f"Bearer {token[:-4]}AAAA"})
        auth = {"Authorization": f"Bearer {analyst}"}
        # Malformed bodies carrying payload values.
        for body in [
            b'{"inputs": [{"name": "' + MARKER.encode() + b'", "data": [1]}',
            json.dumps(
                {
                    "inputs": [
                        {"name": "features", "datatype": "FP32", "shape": [1, 30], "data": [MARKER] * 30}
                    ]
                }
            ).encode(),
            json.dumps(
                {
                    "inputs": [
                        {"name": "features", "datatype": "FP32", "shape": [1, 30], "data": [1e308] * 30}
                    ],
                    "password": password,
                }
            ).encode(),
            b"\xff\xfe" + MARKER.encode() * 10,
        ]:
            c.post(path, content=body, headers={**auth, "content-type": "application/json"})
        c.post(f"/v2/models/{MARKER}/infer", json=row, headers=auth)  # an unknown model name
        c.post(path, content=b"[" + (MARKER.encode() + b",") * 100_000 + b"1]", headers=auth)  # oversize
        # Extraction probes: near-duplicate queries from one key until query auditing acts.
        rng = np.random.default_rng(0)
        for _ in range(120):
            probe = features[:1] + rng.normal(scale=1e-3, size=features[:1].shape)
            r = c.post(path, json=infer_request(probe.astype(np.float32)), headers=auth)
            if r.status_code == 403:
                break
    # Below HTTP: requests the front end cannot frame, a key in each (uvicorn / httptools log these).
    _raw(
        port,
        f"GET /v2/models HTTP/1.1\r\nAuthorization: Bearer {admin}\r\nContent-Length: x\r\n\r\n".encode(),
    )
    _raw(port, f"POST /v2/models/x/infer?password={password} HTTP/9.9\r\nHost: {MARKER}\r\n\r\n".encode())
    _raw(port, b"\x16\x03\x01" + MARKER.encode() + b"\r\n\r\n")  # TLS to a plaintext port
    _raw(
        port,
        f"GET / HTTP/1.1\r\n{'X-Pad: ' + 'a' * 40000}\r\nAuthorization: Bearer {analyst}\r\n\r\n".encode(),
    )
    return needles


def _serve_and_attack(tmp_path: Path, extra: str = "") -> tuple[list[str], set[str]]:
    config, build = write_test_deployment(tmp_path / "d", extra=extra)
    keys = {role: create_key(config, role) for role in ("analyst", "admin")}
    log_path = tmp_path / "server.log"
    server = start_server(config, log_path)
    try:
        port = int(server.base_url.rsplit(":", 1)[1])
        needles = _attack(server.base_url, port, keys, np.asarray(build.features, dtype=np.float32))
    finally:
        server.stop()
    return log_path.read_text().splitlines(), needles


def test_attack_traffic_leaves_only_redacted_json_lines(tmp_path: Path) -> None:
    lines, needles = _serve_and_attack(tmp_path)
    assert len(lines) >= 5
    records = []
    for line in lines:
        record = json.loads(line)  # every line, uvicorn's too, is one JSON object
        assert isinstance(record, dict) and {"ts", "level", "logger", "message"} <= record.keys(), line
        records.append(record)
    loggers = {r["logger"] for r in records}
    assert "uvicorn.error" in loggers, loggers  # uvicorn's own lines came through the chain
    assert any(r["logger"].startswith("bastion") for r in records), loggers
    text = "\n".join(lines)
    for needle in needles:
        assert needle not in text, f"{needle[:12]}... in the server's log"


def test_text_format_is_one_readable_line_per_record_and_as_redacted(tmp_path: Path) -> None:
    lines, needles = _serve_and_attack(tmp_path, extra='[logging]\nformat = "text"\n\n')
    assert lines and not any(line.startswith("{") for line in lines)
    assert any(" INFO uvicorn.error: " in line for line in lines)
    text = "\n".join(lines)
    for needle in needles:
        assert needle not in text, f"{needle[:12]}... in the server's log"
