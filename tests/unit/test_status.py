"""`bastion status` against a stub server: what it derives from the admin API's answers."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from bastion.status import fetch_status, render

ANSWERS: dict[str, Any] = {
    "/v2/health/live": {"live": True},
    "/v2/health/ready": {"ready": True},
    "/v2": {"name": "bastion", "version": "0.1.0"},
    "/v2/admin/incidents": {
        "incidents": [
            {"id": 2, "principal": "cert:scorer", "model": "m", "state": "contained"},
            {"id": 1, "principal": "key:0123456789abcdef", "model": "m", "state": "investigating"},
        ],
        "counts": {"contained": 1, "investigating": 1},
    },
    "/v2/admin/summary": {
        "quarantined_keys": [
            {"key_id": "0123456789abcdef", "name": "thief"},
            {"key_id": "cert:scorer", "name": "cert:scorer"},
        ],
        "contained": [],
        "models": {"served": []},
    },
    "/v1/models": {"data": []},
}


@pytest.fixture
def stub() -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                body, kind = b"", "text/plain"
            else:
                body, kind = json.dumps(ANSWERS.get(self.path, {})).encode(), "application/json"
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_quarantined_service_identity_is_named_as_itself(stub: str) -> None:
    """Red team of issue 12, second pass: a quarantined `cert:<name>` was shown as `key:cert:<name>`
    with no incident (its incidents are under `cert:<name>`)."""
    status = fetch_status(stub, "bst_0000000000000000_x")
    assert [(q["principal"], q["incident"], q["state"]) for q in status.quarantined_keys] == [
        ("key:0123456789abcdef", 1, "investigating"),
        ("cert:scorer", 2, "contained"),
    ]
    assert "quarantined  cert:scorer on m (incident 2, contained)" in render(status)
