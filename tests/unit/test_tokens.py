from __future__ import annotations

import base64
import json

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from joserfc.jwk import OKPKey

from bastion.config import Action, OutputDetail
from bastion.errors import AuthenticationFailed
from bastion.policy import TokenScope
from bastion.tokens import MAX_TOKEN_CHARS, TokenAuthority, load_or_create_signing_key

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


# Fuzzing the parser and verifier: whatever arrives, the answer is AuthenticationFailed, never another
# exception, and nothing but the exact token the server issued is accepted.

_KEY = OKPKey.generate_key("Ed25519")
_NOW = 1000.0
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _issued() -> tuple[TokenAuthority, str]:
    """An authority that has issued and verified one token (its cache is warm with it)."""
    auth = _authority(_KEY)
    token, _ = auth.issue(key_id="k1", scope=SCOPE, now=_NOW)
    auth.verify(token, now=_NOW + 1)
    return auth, token


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _refused(token: str) -> None:
    for auth in (_issued()[0], _authority(_KEY)):  # a warm cache and a cold one
        with pytest.raises(AuthenticationFailed):
            auth.verify(token, now=_NOW + 1)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        # Any code point; lone surrogates (not UTF-8 encodable) drawn often enough to be found.
        st.text(
            st.characters(exclude_categories=()) | st.sampled_from(["\ud800", "\udfff", "."]), max_size=300
        ),
        st.binary(max_size=300).map(lambda b: b.decode("latin-1")),  # what an HTTP header can carry
        st.lists(st.text(_B64, max_size=80), min_size=1, max_size=6).map(".".join),  # JWS-shaped
    )
)
@pytest.mark.slow
def test_arbitrary_strings_are_refused(text: str) -> None:
    _refused(text)


@st.composite
def _mutated(draw: st.DrawFn) -> str:
    _, token = _issued()
    head, payload, sig = token.split(".")
    kind = draw(
        st.sampled_from(
            ["replace", "insert", "delete", "truncate", "swap", "header", "claims", "huge", "pad", "segments"]
        )
    )
    if kind == "replace":  # one character changed (a flipped bit in base64 or any other character)
        i = draw(st.integers(0, len(token) - 1))
        c = draw(st.sampled_from(_B64) | st.characters(max_codepoint=0x2FF))
        mutated = token[:i] + c + token[i + 1 :]
    elif kind == "insert":
        i = draw(st.integers(0, len(token)))
        mutated = token[:i] + draw(st.sampled_from([*_B64, ".", "=", " ", "\x00"])) + token[i:]
    elif kind == "delete":
        i = draw(st.integers(0, len(token) - 1))
        mutated = token[:i] + token[i + 1 :]
    elif kind == "truncate":
        mutated = token[: draw(st.integers(0, len(token) - 1))]
    elif kind == "swap":
        order = draw(st.permutations([head, payload, sig]))
        mutated = ".".join(order)
    elif kind == "header":  # re-encoded header: other algorithms, extra or missing fields, other spacing
        header = json.loads(_unb64(head))
        change = draw(
            st.sampled_from(
                ["none", "HS256", "RS256", "EdDSA", "ES256", "drop_alg", "crit", "kid", "jku", "zip"]
            )
        )
        if change == "drop_alg":
            del header["alg"]
        elif change in ("crit", "kid", "jku", "zip"):
            header[change] = {"crit": ["exp"], "kid": "../../x", "jku": "http://evil/jwks", "zip": "DEF"}[
                change
            ]
        else:
            header["alg"] = change
        separators = draw(st.sampled_from([(",", ":"), (", ", ": ")]))
        mutated = f"{_b64(json.dumps(header, separators=separators).encode())}.{payload}.{sig}"
    elif kind == "claims":  # the same signature over other claims: wider scope, longer life, other key
        claims = json.loads(_unb64(payload))
        change = draw(st.sampled_from(["scope", "exp", "sub", "output", "aud", "same"]))
        if change == "scope":
            claims["scope"] = ["infer:*", "admin:*"]
        elif change == "exp":
            claims["exp"] += 10**6
        elif change == "sub":
            claims["sub"] = "k2"
        elif change == "output":
            claims["output"] = "probabilities"
        elif change == "aud":
            claims["aud"] = "other"
        mutated = f"{head}.{_b64(json.dumps(claims).encode())}.{sig}"  # "same": only re-spaced
    elif kind == "huge":  # one segment blown up, or an extra one
        n = draw(st.sampled_from([10**3, 10**4, 10**5, 10**6]))
        which = draw(st.integers(0, 3))
        parts = [head, payload, sig, "A"]
        parts[which] = parts[which] + "A" * n
        mutated = ".".join(parts[:3] if which < 3 else parts)
    elif kind == "pad":
        mutated = draw(st.sampled_from([f"{token}=", f"{token}==", f" {token}", f"{token}\n", f"{token}."]))
    else:  # JWE-like five segments, or one repeated
        mutated = draw(st.sampled_from([f"{token}.{sig}.{sig}", f"{head}.{head}.{sig}", f"{head}.{payload}"]))
    assume(mutated != token)
    return mutated


@pytest.mark.slow
@settings(max_examples=500, deadline=None)
@given(_mutated())
def test_mutated_tokens_are_refused(token: str) -> None:
    _refused(token)


def test_the_unmutated_token_is_still_accepted() -> None:
    # The mutation test above would pass on a verifier that refuses everything: this is its control.
    auth, token = _issued()
    assert auth.verify(token, now=_NOW + 2).key_id == "k1"
    assert _authority(_KEY).verify(token, now=_NOW + 2).key_id == "k1"


def test_oversized_or_non_ascii_tokens_are_refused_unparsed() -> None:
    _, token = _issued()
    for bad in (token + "A" * MAX_TOKEN_CHARS, "\ud800", token + "\u00e9", f" {token}"):
        with pytest.raises(AuthenticationFailed) as err:
            _authority(_KEY).verify(bad, now=_NOW + 1)
        assert err.value.reason == "token_malformed"
