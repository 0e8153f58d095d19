"""A credential pasted where a model name goes is not written to the audit log (red team #9 F13).

The audit keeps a requested-but-unknown model name (64 characters) for forensics; a full API key is
64 characters, so `/v2/models/<key>/infer` (a key pasted into the URL by mistake) wrote the whole
secret into the audit chain, which is kept, exported and shipped. No secret in any log.
"""

from __future__ import annotations

from pathlib import Path

from tests.helpers import create_key, run_cli, start_server, write_test_deployment


def test_a_key_or_token_in_the_model_path_is_redacted_in_the_audit(tmp_path: Path) -> None:
    config, _ = write_test_deployment(tmp_path)
    key = create_key(config, "admin")
    pasted = create_key(config, "analyst")
    server = start_server(config, tmp_path / "server.log")
    try:
        with server.client(key) as c:
            token = c.post("/v2/auth/token", json={"scope": ["metadata:*"]}).json()["access_token"]
            assert c.post(f"/v2/models/{pasted}/infer", json={}).status_code == 404
            assert c.get(f"/v2/models/{pasted}").status_code == 404
            assert c.get(f"/v2/models/{token}/ready").status_code == 404
            assert c.get("/v2/models/no-such-model").status_code == 404
    finally:
        server.stop()
    audit = run_cli("audit", "export", "--config", config).stdout
    assert pasted.split("_", 2)[2][:12] not in audit
    assert token.split(".")[1][:12] not in audit
    assert '"model":"no-such-model"' in audit.replace(" ", "")  # a plain name is still kept
