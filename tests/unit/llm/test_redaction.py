"""PII and secrets redaction: each type found and replaced, values nowhere in the result or the logs,
ordinary text left alone, nothing fetched from the network, bad configuration refused."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from bastion.errors import ConfigError
from bastion.llm.redaction import ENTITIES, SECRET, Redacted, Redactor, _blank_english

ROOT = Path(__file__).resolve().parents[3]

PII_CASES = [
    ("EMAIL", "Please write to maria.garcia@example.org today.", "maria.garcia@example.org"),
    ("CREDIT_CARD", "Charge 4111 1111 1111 1111, expiry 09/27.", "4111 1111 1111 1111"),
    ("CREDIT_CARD", "Amex 378282246310005 on file", "378282246310005"),
    ("PHONE_NUMBER", "Call me at (212) 555-0143 after lunch.", "(212) 555-0143"),
    ("PHONE_NUMBER", "London office: +44 20 7946 0958.", "+44 20 7946 0958"),
    ("IBAN", "Wire it to DE89 3704 0044 0532 0130 00 please.", "DE89 3704 0044 0532 0130 00"),
    ("IBAN", "IBAN: GB82WEST12345698765432", "GB82WEST12345698765432"),
    ("US_SSN", "My SSN is 536-22-8473.", "536-22-8473"),
    ("IP_ADDRESS", "The server at 203.0.113.7 refused us.", "203.0.113.7"),
    ("IP_ADDRESS", "gateway 2001:db8:85a3::8a2e:370:7334 is down", "2001:db8:85a3::8a2e:370:7334"),
]

JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0"
    "IjoxNTE2MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)
PEM_BODY = "MIIEpAIBAAKCAQEA0Z3VS5JJcds3xfn/ygWyF8PbnGy0AHB7MhgHcTz6sE2I2yPB"
SECRET_CASES = [
    ("aws access key", "aws_access_key_id = AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE"),
    (
        "aws secret key",
        'aws_secret_access_key = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"',
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    ),
    (
        "private key",
        f"why?\n-----BEGIN RSA PRIVATE KEY-----\n{PEM_BODY}\nabcd\n-----END RSA PRIVATE KEY-----\nthanks",
        PEM_BODY,
    ),
    ("jwt", f"Authorization: Bearer {JWT}", JWT),
    (
        "github",
        "my token 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, debug CI",
        "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",
    ),
    (
        "slack",
        "SLACK_BOT_TOKEN=xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
        "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
    ),
    ("high entropy", 'cfg = {"client_secret": "Xy7Qm2pL9vB4nR8tK1wZ6cJ3"}', "Xy7Qm2pL9vB4nR8tK1wZ6cJ3"),
    ("quoted hex", 'digest_key = "9f8e7d6c5b4a39281706f5e4d3c2b1a0"', "9f8e7d6c5b4a39281706f5e4d3c2b1a0"),
    ("keyword", 'password = "hunter2-but-longer"', "hunter2-but-longer"),
    ("config keyword", "api_key: 9f8e7d6c5b4a3928", "9f8e7d6c5b4a3928"),
    ("basic auth url", "DB=postgres://app:s3cr3tpw@db.internal:5432/prod", "s3cr3tpw"),
    ("url password with !", "DB=postgres://app:Zq8!mK2vR9@db.internal/prod", "Zq8!mK2vR9"),
]

NEGATIVES = [
    "We upgraded to Python 3.11.7 and numpy 2.4.6 last week.",
    "Build 10.0.19045.3803 of Windows fixed it.",
    "The meeting moved from 2024-05-01 to 05/14/2024 at 10:30.",
    "Order #123456789 shipped; tracking 1Z999AA10123456784.",
    "Your order number is 4111-2222-3333, keep it for returns.",
    "Request id 550e8400-e29b-41d4-a716-446655440000 failed with 502.",
    "The commit a94a8fe5ccb19ba61c4c0873d391e987982fbbd3 broke the build.",
    "Invalid card 4111 1111 1111 1112 was rejected by Luhn.",
    "How do I reset my password if I forgot it?",
    "api_key = os.environ['API_KEY']",
    "password: ${DB_PASSWORD}",
    "Revenue was $1,234,567.89 in Q3, up 12.5%.",
    "Use semver like 1.2.3 and tags like v2.0.0-rc.1.",
]


@pytest.fixture(scope="module")
def redactor() -> Redactor:
    return Redactor()


@pytest.mark.parametrize(("entity", "text", "value"), PII_CASES)
def test_each_pii_type_is_found_and_replaced(entity: str, text: str, value: str) -> None:
    out = Redactor(entities={entity}, secrets=False).redact(text)
    assert value not in out.text
    assert f"[{entity}]" in out.text
    assert dict(out.counts) == {entity: 1}


@pytest.mark.parametrize(("kind", "text", "value"), SECRET_CASES, ids=[c[0] for c in SECRET_CASES])
def test_each_secret_kind_is_found_and_replaced(redactor: Redactor, kind: str, text: str, value: str) -> None:
    out = redactor.redact(text)
    assert value not in out.text
    assert "[SECRET]" in out.text
    assert set(out.counts) == {SECRET}


def test_pem_block_is_replaced_whole_and_the_prose_around_it_kept(redactor: Redactor) -> None:
    text = SECRET_CASES[2][1]
    out = redactor.redact(text)
    assert out.text == "why?\n[SECRET]\nthanks"
    # A key cut off before its footer (a truncated paste) is still replaced to the end.
    cut = redactor.redact(f"-----BEGIN PRIVATE KEY-----\n{PEM_BODY}\nMIIB")
    assert cut.text == "[SECRET]"


def test_secrets_only_when_asked(redactor: Redactor) -> None:
    text = "password = 'hunter2-but-longer' and mail ann@example.com"
    pii_only = Redactor(secrets=False).redact(text)
    assert "hunter2-but-longer" in pii_only.text
    assert dict(pii_only.counts) == {"EMAIL": 1}
    secrets_only = Redactor(entities=(), secrets=True).redact(text)
    assert "ann@example.com" in secrets_only.text
    assert dict(secrets_only.counts) == {SECRET: 1}


def test_a_type_not_chosen_is_left(redactor: Redactor) -> None:
    out = Redactor(entities={"EMAIL"}, secrets=False).redact("ann@example.com, 203.0.113.7")
    assert out.text == "[EMAIL], 203.0.113.7"


@pytest.mark.parametrize("text", NEGATIVES)
def test_ordinary_text_is_left_alone(redactor: Redactor, text: str) -> None:
    out = redactor.redact(text)
    assert out.text == text
    assert dict(out.counts) == {}
    assert out.total == 0


def test_values_never_in_repr_or_counts(redactor: Redactor) -> None:
    values = [v for _, _, v in PII_CASES] + [v for _, _, v in SECRET_CASES]
    text = "\n".join([t for _, t, _ in PII_CASES] + [t for _, t, _ in SECRET_CASES])
    out = redactor.redact(text)
    shown = repr(out) + str(out) + json.dumps(dict(out.counts))
    for value in values:
        assert value not in out.text
        assert value not in shown
    assert "Please write" not in repr(out)  # the rest of the prompt stays out of logs too
    assert all(isinstance(n, int) for n in out.counts.values())
    assert set(out.counts) <= ENTITIES | {SECRET}
    assert out.total == sum(out.counts.values()) >= len(values) - 2  # the two cards share a type


def test_counts_are_read_only_and_the_result_frozen(redactor: Redactor) -> None:
    out = redactor.redact("ann@example.com")
    with pytest.raises(TypeError):
        out.counts["EMAIL"] = 0  # type: ignore[index]
    with pytest.raises(AttributeError):
        out.text = "x"  # type: ignore[misc]


def test_every_occurrence_is_replaced(redactor: Redactor) -> None:
    token = "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"
    out = redactor.redact(f"{token} then again {token}\nand {token}")
    assert token not in out.text
    assert out.counts == {SECRET: 3}


def test_overlapping_findings_become_one_placeholder(redactor: Redactor) -> None:
    # A card number inside a password: one span, nothing of either left.
    out = redactor.redact('password = "pw 4111 1111 1111 1111 Xy7Q"')
    assert out.text == 'password = "[SECRET]"'
    assert out.counts == {SECRET: 1}


def test_placeholders_in_the_input_are_not_counted(redactor: Redactor) -> None:
    # An attacker cannot inflate or forge audit counts by writing placeholders.
    out = redactor.redact("[EMAIL] [SECRET] [CREDIT_CARD]")
    assert out.text == "[EMAIL] [SECRET] [CREDIT_CARD]"
    assert out.counts == {}


def test_text_of_unseen_words_does_not_grow_the_vocabulary(redactor: Redactor) -> None:
    # spaCy keeps every new token string for good unless it is read inside a memory zone: an
    # attacker's random words would otherwise grow the server's memory without bound.
    strings = _blank_english().vocab.strings
    redactor.redact("warm up: a@b.example 4111 1111 1111 1111")
    before = len(strings)
    for i in range(80):
        text = " ".join(f"zq{i}x{j}{os.urandom(4).hex()}" for j in range(25))
        assert redactor.redact(f"{text} mail ann@example.org").counts == {"EMAIL": 1}
    assert len(strings) - before < 50  # 2,000 unseen words went through


def test_library_logs_never_carry_the_text(redactor: Redactor, caplog: pytest.LogCaptureFixture) -> None:
    # Presidio logs context words (the value among them) at DEBUG and a bad IBAN at ERROR.
    caplog.set_level(logging.DEBUG)
    for name in ("presidio-analyzer", "presidio-anonymizer"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    text = "card 4111 1111 1111 1111 mail maria.garcia@example.org iban DE89 3704 0044 0532 0130 0X"
    redactor.redact(text)
    logged = " ".join(r.getMessage() for r in caplog.records)
    for value in ("4111", "maria", "DE89"):
        assert value not in logged


class _NetworkTrap:
    """Socket calls recorded and refused: nothing in redaction may reach the network."""

    def __init__(self) -> None:
        self.attempts: list[str] = []

    def __call__(self, name: str) -> Any:
        def refuse(*args: object, **kwargs: object) -> Any:
            self.attempts.append(name)
            raise OSError("network blocked by the test")

        return refuse


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> _NetworkTrap:
    trap = _NetworkTrap()
    monkeypatch.setattr(socket.socket, "connect", trap("connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", trap("connect_ex"))
    monkeypatch.setattr(socket, "create_connection", trap("create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", trap("getaddrinfo"))
    return trap


def test_redaction_touches_no_network(no_network: _NetworkTrap) -> None:
    redactor = Redactor()  # built with the network blocked, as on a server with none
    text = "\n".join(t for _, t, _ in PII_CASES + SECRET_CASES)
    out = redactor.redact(text)
    assert out.counts["EMAIL"] == 1  # the email check (tldextract) ran
    assert out.counts[SECRET] >= len(SECRET_CASES)  # and every secret plugin, verify never called
    assert no_network.attempts == []


_FRESH_PROCESS = textwrap.dedent(
    """
    import json, socket, sys
    attempts = []
    def refuse(name):
        def f(*a, **k):
            attempts.append(name)
            raise OSError("blocked")
        return f
    socket.socket.connect = refuse("connect")
    socket.create_connection = refuse("create_connection")
    socket.getaddrinfo = refuse("getaddrinfo")

    # The trap works: tldextract's default extractor tries to fetch the suffix list.
    import tldextract
    tldextract.TLDExtract(cache_dir=None)("a.example.co.uk")
    control = list(attempts)
    attempts.clear()

    from bastion.llm.redaction import Redactor
    out = Redactor().redact("write to maria.garcia@example.co.uk or ann@example.com")
    models = sorted(m for m in sys.modules if m.startswith(("en_core", "spacy_transformers")))
    print(json.dumps({"control": control, "attempts": attempts, "counts": dict(out.counts),
                      "models": models}))
    """
)


@pytest.mark.slow
def test_fresh_process_fetches_no_suffix_list_and_loads_no_model(tmp_path: Path) -> None:
    # A fresh interpreter, with an empty home and cache, so no list cached by an earlier run can
    # hide a fetch; the same trap is shown to catch tldextract's default fetch first.
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "PYTHONPATH": str(ROOT / "src"),
    }
    done = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["control"], "the trap did not see tldextract's default fetch"
    assert report["attempts"] == []
    assert report["counts"] == {"EMAIL": 2}
    assert report["models"] == []
    assert not (tmp_path / "cache" / "python-tldextract").exists()


def test_unknown_entity_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="'PASSPORT'") as info:
        Redactor(entities={"EMAIL", "PASSPORT"})
    assert "EMAIL" in str(info.value)  # the known names are listed for the operator


def test_one_string_instead_of_a_list_is_refused() -> None:
    with pytest.raises(ConfigError, match="one string"):
        Redactor(entities="EMAIL")


def test_nothing_to_find_is_refused() -> None:
    with pytest.raises(ConfigError, match="no entity"):
        Redactor(entities=(), secrets=False)


@pytest.mark.parametrize("regions", [("UK",), ()])
def test_bad_phone_regions_are_refused(regions: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError, match="phone_regions"):
        Redactor(phone_regions=regions)


@pytest.mark.parametrize("threshold", [-0.1, 1.5])
def test_bad_threshold_is_refused(threshold: float) -> None:
    with pytest.raises(ConfigError, match="score_threshold"):
        Redactor(score_threshold=threshold)


def test_a_national_number_of_an_added_region_is_found() -> None:
    text = "Ruf an: 030 901820"
    assert Redactor(entities={"PHONE_NUMBER"}, secrets=False).redact(text).text == text
    out = Redactor(entities={"PHONE_NUMBER"}, secrets=False, phone_regions=("US", "GB", "DE")).redact(text)
    assert out.text == "Ruf an: [PHONE_NUMBER]"


def test_redacted_total() -> None:
    assert Redacted(text="", counts={"EMAIL": 2, SECRET: 1}).total == 3
