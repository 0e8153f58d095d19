from __future__ import annotations

import pytest
from joserfc.jwk import OKPKey

from bastion.config import Action, OutputDetail
from bastion.errors import AuthenticationFailed
from bastion.policy import TokenScope
from bastion.tokens import TokenAuthority, load_or_create_signing_key

SCOPE = TokenScope(frozenset({(Action.INFER, "m")}), OutputDetail.LABEL)


def _authority(key: OKPKey | None = None, **kw: object) -> TokenAuthority:
    opts = {"issuer": "bastion", "audience": "bastion", "default_ttl": 900, **kw}
    return TokenAuthority(key or OKPKey.generate_key("Ed25519"), **opts)  # type: ignore[arg-type]


def test_round_trip_and_ttl_cap() -> None:
    auth = _authority()
    token, ttl = auth.issue(key_id="k1", scope=SCOPE, now=1000.0, ttl=10**6)
    assert ttl == 900  # never longer than the configured default
    verified = auth.verify(token, now=1001.0)
    assert verified.key_id == "k1" and verified.scope.pairs == SCOPE.pairs
    assert verified.scope.output is OutputDetail.LABEL


def test_expiry_is_enforced_even_from_the_cache() -> None:
    auth = _authority()
    token, _ = auth.issue(key_id="k1", scope=SCOPE, now=1000.0, ttl=60)
    auth.verify(token, now=1010.0)  # cached now
    with pytest.raises(AuthenticationFailed):
        auth.verify(token, now=1061.0)
    fresh = _authority(auth._signing_key)
    with pytest.raises(AuthenticationFailed) as err:
        fresh.verify(token, now=1061.0)
    assert "expired" in err.value.reason


def test_other_server_key_issuer_or_audience_is_refused() -> None:
    token, _ = _authority().issue(key_id="k1", scope=SCOPE, now=1000.0)
    with pytest.raises(AuthenticationFailed):
        _authority().verify(token, now=1001.0)
    key = OKPKey.generate_key("Ed25519")
    token, _ = _authority(key, audience="other").issue(key_id="k1", scope=SCOPE, now=1000.0)
    with pytest.raises(AuthenticationFailed):
        _authority(key).verify(token, now=1001.0)
    token, _ = _authority(key, issuer="other").issue(key_id="k1", scope=SCOPE, now=1000.0)
    with pytest.raises(AuthenticationFailed):
        _authority(key).verify(token, now=1001.0)


def test_signing_key_is_created_once_owner_only(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "k.jwk"
    first = load_or_create_signing_key(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert load_or_create_signing_key(path).as_dict(private=False) == first.as_dict(private=False)
