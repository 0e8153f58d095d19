from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from bastion.errors import AuthenticationFailed
from bastion.keys import KeyStore, parse_key


def test_key_has_256_bits_and_only_its_hash_is_stored(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.db")
    new = store.create(name="a", roles=["analyst"], now=100.0)
    secret_part = new.secret.split("_", 2)[2]
    assert len(secret_part) >= 43  # 32 random bytes, base64url
    assert parse_key(new.secret) == (new.record.key_id, new.secret)
    store.close()
    raw = (tmp_path / "keys.db").read_bytes()
    assert secret_part.encode() not in raw and new.secret.encode() not in raw
    assert oct((tmp_path / "keys.db").stat().st_mode & 0o777) == "0o600"
    row = sqlite3.connect(tmp_path / "keys.db").execute("SELECT secret_hash FROM api_keys").fetchone()
    assert len(row[0]) == 32


def test_authenticate_states(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.db")
    new = store.create(name="a", roles=["r"], now=100.0, expires_at=200.0)
    assert store.authenticate(new.secret, now=150.0).roles == ("r",)
    with pytest.raises(AuthenticationFailed) as err:
        store.authenticate(new.secret, now=200.0)
    assert err.value.reason == "key_expired"
    with pytest.raises(AuthenticationFailed) as err:
        store.authenticate(new.secret[:-1] + ("A" if new.secret[-1] != "A" else "B"), now=150.0)
    assert err.value.reason == "wrong_secret"
    assert store.revoke(new.record.key_id, now=160.0)
    assert not store.revoke(new.record.key_id, now=161.0)  # once
    with pytest.raises(AuthenticationFailed) as err:
        store.authenticate(new.secret, now=170.0)
    assert err.value.reason == "key_revoked"
    for bad in ("", "bst_", "bst_XYZ_abc", "bst_0123456789abcdefXabc", "sk-" + "a" * 40):
        with pytest.raises(AuthenticationFailed):
            store.authenticate(bad, now=150.0)


def test_revocation_by_another_process_is_seen_at_once(tmp_path: Path) -> None:
    server = KeyStore(tmp_path / "keys.db")
    cli = KeyStore(tmp_path / "keys.db")
    new = cli.create(name="a", roles=["r"], now=1.0)
    assert server.authenticate(new.secret, now=2.0)
    cli.revoke(new.record.key_id, now=3.0)
    with pytest.raises(AuthenticationFailed):
        server.authenticate(new.secret, now=4.0)


def test_authentication_failures_are_opaque_to_clients() -> None:
    # Every reason reads the same to the caller; the reason is for the audit log only.
    assert str(AuthenticationFailed("key_revoked")) == str(AuthenticationFailed("unknown_key"))
