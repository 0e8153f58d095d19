"""PII and secrets redaction for language-model traffic: prompts before an upstream, answers by policy.

`Redactor(entities=..., secrets=...)` finds personal data with Presidio's pattern recognizers
(regular expressions plus checksums: Luhn for cards, ISO 13616 mod-97 for IBAN, Google's
`phonenumbers` for phones) and credentials with Yelp's `detect-secrets` plugins, and replaces each
finding with a typed placeholder (`[EMAIL]`, `[CREDIT_CARD]`, `[SECRET]`). It returns the new text
and a count per type for the audit record; the values found are never kept, logged or raised.

Offline by construction:
- Presidio runs on a blank spaCy pipeline (`spacy.blank("en")`: a tokenizer, no model, nothing to
  download) through `_BlankSpacyEngine`; no NER recognizer is registered.
- Presidio's email recognizer asks `tldextract` whether a domain has a public suffix; the module's
  default extractor would fetch the Public Suffix List over HTTP on first use. `_EmailRecognizer`
  asks an extractor of its own built on tldextract's bundled snapshot with no URL and no disk cache.
- `detect-secrets` is used through its plugins' `analyze_string` on the string itself: no file, no
  baseline, no global settings, and never its `verify` step (which calls the vendors' APIs).
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import phonenumbers
import spacy
import tldextract
from detect_secrets.filters import heuristic
from detect_secrets.plugins.aws import AWSKeyDetector
from detect_secrets.plugins.azure_storage_key import AzureStorageKeyDetector
from detect_secrets.plugins.base import BasePlugin, RegexBasedDetector
from detect_secrets.plugins.basic_auth import BasicAuthDetector
from detect_secrets.plugins.discord import DiscordBotTokenDetector
from detect_secrets.plugins.github_token import GitHubTokenDetector
from detect_secrets.plugins.gitlab_token import GitLabTokenDetector
from detect_secrets.plugins.high_entropy_strings import (
    Base64HighEntropyString,
    HexHighEntropyString,
    HighEntropyStringsPlugin,
)
from detect_secrets.plugins.jwt import JwtTokenDetector
from detect_secrets.plugins.keyword import (
    CONFIG_DENYLIST_REGEX_TO_GROUP,
    QUOTES_REQUIRED_DENYLIST_REGEX_TO_GROUP,
    KeywordDetector,
)
from detect_secrets.plugins.mailchimp import MailchimpDetector
from detect_secrets.plugins.npm import NpmDetector
from detect_secrets.plugins.openai import OpenAIDetector
from detect_secrets.plugins.private_key import PrivateKeyDetector
from detect_secrets.plugins.pypi_token import PypiTokenDetector
from detect_secrets.plugins.sendgrid import SendGridDetector
from detect_secrets.plugins.slack import SlackDetector
from detect_secrets.plugins.square_oauth import SquareOAuthDetector
from detect_secrets.plugins.stripe import StripeDetector
from detect_secrets.plugins.telegram_token import TelegramBotTokenDetector
from detect_secrets.plugins.twilio import TwilioKeyDetector
from presidio_analyzer import AnalyzerEngine, EntityRecognizer, RecognizerRegistry
from presidio_analyzer.nlp_engine import NlpArtifacts, SpacyNlpEngine
from presidio_analyzer.predefined_recognizers import (
    CreditCardRecognizer,
    EmailRecognizer,
    IbanRecognizer,
    IpRecognizer,
    PhoneRecognizer,
    UsSsnRecognizer,
)
from presidio_anonymizer import AnonymizerEngine
from presidio_anonymizer.entities import OperatorConfig, RecognizerResult
from spacy.tokens import Doc

from bastion.errors import ConfigError


class _WithholdText(logging.Filter):
    """Keeps the libraries' logs free of the text being scanned.

    Presidio logs, at DEBUG, the context words around each finding (the value among them) and, at
    ERROR, an IBAN candidate that failed to parse. This filter, on their loggers, drops records
    below WARNING and keeps the rest as their message template alone: no arguments, no traceback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return False
        record.args = None
        record.exc_info = None
        record.exc_text = None
        return True


_LIBRARY_LOGGERS = ("presidio-analyzer", "presidio-anonymizer", "decision_process", "detect-secrets")
for _name in _LIBRARY_LOGGERS:
    _logger = logging.getLogger(_name)
    if not any(isinstance(f, _WithholdText) for f in _logger.filters):
        _logger.addFilter(_WithholdText())

SECRET = "SECRET"  # noqa: S105  # the placeholder type of credentials, not one

ENTITIES: frozenset[str] = frozenset({"EMAIL", "CREDIT_CARD", "PHONE_NUMBER", "IBAN", "US_SSN", "IP_ADDRESS"})
"""Every PII entity name a `Redactor` accepts; its placeholder is the name in brackets."""

DEFAULT_ENTITIES: frozenset[str] = ENTITIES

# Presidio scores a match 0..1: a checksum-validated card or IBAN scores 1.0, an SSN shape alone
# 0.05-0.5, a phone 0.4 (raised by context words such as "call" or "phone"). 0.4 keeps the phone
# and the dashed SSN and drops the bare 9-digit runs that are order numbers far more often
# (bench/REDACTION.md has precision and recall at this threshold).
DEFAULT_SCORE_THRESHOLD = 0.4

# National-format phone numbers are read as numbers of these regions; a number written with its
# "+" country code is found whatever the list. Each region costs about 5 ms per 4 KB of text
# (phonenumbers tries every candidate against each), so the default is short.
DEFAULT_PHONE_REGIONS: tuple[str, ...] = ("US", "GB")

# A PEM private key spans lines; detect-secrets flags its header line only, so the whole block
# (header to footer, or to the end of the text if cut) is replaced.
_PEM_BLOCK = re.compile(
    r"-----BEGIN[ A-Z0-9]*PRIVATE KEY(?: BLOCK)?-----.*?(?:-----END[ A-Z0-9]*PRIVATE KEY(?: BLOCK)?-----|\Z)",
    re.DOTALL,
)


# A token goes on past a detector's match (a JWT's signature after its lazy regex, a GitHub
# token after its prefix group) to the end of the run of token characters; a final "." is prose.
_TOKEN_TAIL = re.compile(r"[A-Za-z0-9_\-+/=]+(?:\.[A-Za-z0-9_\-+/=]+)*")


# The password of a URL's userinfo (`scheme://user:pass@host`). detect-secrets' BasicAuthDetector
# refuses one holding RFC 3986 sub-delimiters ("!", "$", "&", ...), which real passwords do hold.
_URL_PASSWORD = re.compile(r"://[^\s/:@]+:([^\s/@]+)@")


@dataclass(frozen=True, slots=True)
class Redacted:
    """The outcome of `Redactor.redact`.

    `text`: the input with each finding replaced by `[TYPE]`; it is the caller's text otherwise, so
    it stays out of `repr` (logs). `counts`: findings per type (`{"EMAIL": 2, "SECRET": 1}`), types
    with none left out; this is what goes to the audit record. Never holds a value found.
    """

    text: str = field(repr=False)
    counts: Mapping[str, int]

    @property
    def total(self) -> int:
        """How many spans were replaced."""
        return sum(self.counts.values())


@functools.cache
def _blank_english() -> spacy.language.Language:
    """One tokenizer a process (building one takes ~0.15 s), shared by every redactor: its text is
    read inside memory zones, so its vocabulary stays as built."""
    return spacy.blank("en")


_ZONE_LOCK = threading.Lock()  # memory zones on one pipeline must not overlap


class _BlankSpacyEngine(SpacyNlpEngine):
    """Presidio's spaCy engine over `spacy.blank("en")`: tokens and stop words, no model, no NER.

    Presidio's context enhancer matches context words ("phone", "ssn", "card") against lemmas; a
    blank pipeline has no lemmatizer, so the lower-cased token stands in for the lemma.
    """

    def __init__(self) -> None:
        super().__init__(models=[{"lang_code": "en", "model_name": "blank:en"}])
        self.load()

    def load(self) -> None:
        self.nlp = {"en": _blank_english()}  # type: ignore[assignment]  # declared None upstream

    def get_supported_entities(self) -> list[str]:
        return []

    def _doc_to_nlp_artifact(self, doc: Doc, language: str) -> NlpArtifacts:
        return NlpArtifacts(
            entities=[],
            tokens=doc,
            tokens_indices=[token.idx for token in doc],
            lemmas=[token.lower_ for token in doc],
            nlp_engine=self,
            language=language,
            scores=[],
        )


# The Public Suffix List as bundled in the installed tldextract: no URL to fetch, no cache on disk.
_OFFLINE_TLD = tldextract.TLDExtract(cache_dir=None, suffix_list_urls=(), fallback_to_snapshot=True)


class _EmailRecognizer(EmailRecognizer):
    """Presidio's email recognizer, its domain check on the bundled suffix list (never fetched)."""

    def validate_result(self, pattern_text: str) -> bool:
        return _OFFLINE_TLD(pattern_text).fqdn != ""


def _recognizer(name: str, phone_regions: tuple[str, ...]) -> EntityRecognizer:
    # Each reports its finding under our entity name, which is also the placeholder.
    if name == "EMAIL":
        return _EmailRecognizer(supported_entity=name)
    if name == "CREDIT_CARD":  # Luhn-checked
        return CreditCardRecognizer(supported_entity=name)
    if name == "PHONE_NUMBER":  # parsed and validated by phonenumbers
        return PhoneRecognizer(supported_entity=name, supported_regions=phone_regions)
    if name == "IBAN":  # mod-97 check digits and per-country length
        return IbanRecognizer(supported_entity=name)
    if name == "US_SSN":  # shape, context words, and the SSA's never-issued ranges
        return UsSsnRecognizer(supported_entity=name)
    assert name == "IP_ADDRESS"
    return IpRecognizer(supported_entity=name)


def _secret_plugins() -> tuple[BasePlugin, ...]:
    # The vendor-token detectors of detect-secrets' default set, less IPPublicDetector (IPs are PII
    # here, `IP_ADDRESS`) and those whose patterns are vague enough to hit prose (Artifactory's
    # "AP" prefix, IBM's and Cloudant's keyword-only rules, Softlayer).
    return (
        AWSKeyDetector(),
        AzureStorageKeyDetector(),
        BasicAuthDetector(),
        DiscordBotTokenDetector(),
        GitHubTokenDetector(),
        GitLabTokenDetector(),
        JwtTokenDetector(),
        MailchimpDetector(),
        NpmDetector(),
        OpenAIDetector(),
        PrivateKeyDetector(),
        PypiTokenDetector(),
        SendGridDetector(),
        SlackDetector(),
        SquareOAuthDetector(),
        StripeDetector(),
        TelegramBotTokenDetector(),
        TwilioKeyDetector(),
        Base64HighEntropyString(),  # quoted strings only, entropy > 4.5 bits a character
        HexHighEntropyString(),  # quoted strings only, entropy > 3.0
    )


class Redactor:
    """Replaces PII and secrets in text with typed placeholders.

    `entities`: PII types to find, a subset of `ENTITIES` (EMAIL, CREDIT_CARD, PHONE_NUMBER, IBAN,
    US_SSN, IP_ADDRESS); `secrets`: also find credentials (placeholder `[SECRET]`);
    `score_threshold`: Presidio's score (0..1) a finding needs; `phone_regions`: ISO 3166 codes
    for national-format phone numbers. Raises `ConfigError` naming an unknown entity or region, a
    threshold outside [0, 1], or nothing at all to find. Build one per
    policy at start-up (0.1 to 0.3 s after a 1 to 1.5 s import) and share it. `redact` is
    synchronous and CPU-bound: about 1.5 ms for 200 characters and 18 ms for 4 KB, growing faster
    than the length beyond that (bench/REDACTION.md), so cap the text and run long ones in a
    worker thread.
    """

    def __init__(
        self,
        *,
        entities: Iterable[str] = DEFAULT_ENTITIES,
        secrets: bool = True,
        score_threshold: float = DEFAULT_SCORE_THRESHOLD,
        phone_regions: Iterable[str] = DEFAULT_PHONE_REGIONS,
    ) -> None:
        if isinstance(entities, str):  # a bare "EMAIL" would iterate as letters
            raise ConfigError("redaction entities: expected a list of names, got one string")
        wanted = frozenset(entities)
        unknown = sorted(wanted - ENTITIES)
        if unknown:
            raise ConfigError(
                f"redaction entities: unknown {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(sorted(ENTITIES))}"
            )
        if not wanted and not secrets:
            raise ConfigError("redaction: no entity and secrets off; leave redaction out instead")
        regions = tuple(phone_regions)
        bad_regions = sorted(set(regions) - phonenumbers.SUPPORTED_REGIONS)
        if bad_regions or not regions:
            raise ConfigError(
                f"redaction phone_regions: {', '.join(map(repr, bad_regions)) or 'empty'}; "
                "expected ISO 3166 codes such as 'US', 'GB'"
            )
        if not 0.0 <= score_threshold <= 1.0:
            raise ConfigError(f"redaction score_threshold: {score_threshold} is outside [0, 1]")
        self.entities = wanted
        self.secrets = secrets
        self._threshold = score_threshold
        self._analyzer: AnalyzerEngine | None = None
        if wanted:
            recognizers = [_recognizer(name, regions) for name in sorted(wanted)]
            registry = RecognizerRegistry(recognizers=recognizers, supported_languages=["en"])
            self._analyzer = AnalyzerEngine(
                registry=registry, nlp_engine=_BlankSpacyEngine(), supported_languages=["en"]
            )
        plugins = _secret_plugins() if secrets else ()
        self._regex_plugins = tuple(p for p in plugins if isinstance(p, RegexBasedDetector))
        self._entropy_plugins = tuple(p for p in plugins if isinstance(p, HighEntropyStringsPlugin))
        self._keyword = KeywordDetector()
        self._anonymizer = AnonymizerEngine()  # type: ignore[no-untyped-call]
        self._operators = {
            name: OperatorConfig("replace", {"new_value": f"[{name}]"}) for name in (*wanted, SECRET)
        }

    def redact(self, text: str) -> Redacted:
        """`text` with every finding replaced by `[TYPE]`, and the count per type.

        Overlapping findings (a card number inside a quoted secret) become one placeholder, the
        longer or higher-scoring finding's type. Never raises on content.
        """
        findings: list[RecognizerResult] = []
        if self._analyzer is not None:
            # spaCy adds every new token string to its vocabulary for good: without a memory zone,
            # text an attacker chooses (random words) grows the process without bound. A zone frees
            # its strings on exit and must not overlap another: one at a time.
            with _ZONE_LOCK, _blank_english().memory_zone():
                findings.extend(
                    RecognizerResult(entity_type=f.entity_type, start=f.start, end=f.end, score=f.score)
                    for f in self._analyzer.analyze(
                        text=text,
                        language="en",
                        entities=sorted(self.entities),
                        score_threshold=self._threshold,
                    )
                )
        if self.secrets:
            findings.extend(
                RecognizerResult(entity_type=SECRET, start=start, end=end, score=1.0)
                for start, end in self._secret_spans(text)
            )
        if not findings:
            return Redacted(text=text, counts=MappingProxyType({}))
        result = self._anonymizer.anonymize(text=text, analyzer_results=findings, operators=self._operators)
        counts = Counter(item.entity_type for item in result.items)
        return Redacted(text=result.text, counts=MappingProxyType(dict(sorted(counts.items()))))

    def _secret_spans(self, text: str) -> Iterator[tuple[int, int]]:
        for match in _PEM_BLOCK.finditer(text):
            yield match.span()
        offset = 0
        for line in text.splitlines(keepends=True):
            for start, end in self._token_spans(line):
                yield offset + start, offset + end
            for match in _URL_PASSWORD.finditer(line):
                yield offset + match.start(1), offset + match.end(1)
            for value in self._assigned_values(line):
                start = line.find(value)
                while start != -1:  # every occurrence on the line, not only the first
                    yield offset + start, offset + start + len(value)
                    start = line.find(value, start + len(value))
            offset += len(line)

    def _token_spans(self, line: str) -> Iterator[tuple[int, int]]:
        # The vendor detectors' own regexes, read for positions rather than through
        # `analyze_string`, which returns capture groups ("ghp" of a GitHub token) or a lazy match
        # (a JWT without its signature). A span is the match's non-empty groups (the password of
        # a basic-auth URL) or the whole match, stretched to the end of its token.
        for plugin in self._regex_plugins:
            for regex in plugin.denylist:
                for match in regex.finditer(line):
                    groups = [i for i in range(1, (regex.groups or 0) + 1) if match.group(i)]
                    for start, end in [match.span(i) for i in groups] or [match.span()]:
                        stretch = _TOKEN_TAIL.match(line, end)
                        end = stretch.end() if stretch else end
                        value = line[start:end]
                        if isinstance(plugin, JwtTokenDetector) and not plugin.is_formally_valid(value):
                            continue
                        if not _filtered(value):
                            yield start, end

    def _assigned_values(self, line: str) -> set[str]:
        found: set[str] = set()
        # Quoted high-entropy strings (detect-secrets' limits: base64 > 4.5, hex > 3.0 bits/char).
        for plugin in self._entropy_plugins:
            for value in plugin.analyze_string(line):
                if plugin.calculate_shannon_entropy(value) > plugin.entropy_limit and not (
                    heuristic.is_likely_id_string(value, line, plugin)
                ):
                    found.add(value)
        # Keyword assignments (`password = "…"`, `api_key: …`), quoted or as in config files, unless
        # the value is a lookup (`key = os.environ["KEY"]`); that filter's regex is slow on long
        # lines, so it runs only on a line that has an assignment.
        assigned: set[str] = set()
        for denylist in (QUOTES_REQUIRED_DENYLIST_REGEX_TO_GROUP, CONFIG_DENYLIST_REGEX_TO_GROUP):
            assigned.update(self._keyword.analyze_string(line, denylist_regex_to_group=denylist))
        if assigned and not heuristic.is_indirect_reference(line):
            found |= assigned
        return {value for value in found if value and not _filtered(value)}


def _filtered(value: str) -> bool:
    # detect-secrets' own false-positive filters (the ones that read the value alone).
    return bool(
        heuristic.is_sequential_string(value)
        or heuristic.is_potential_uuid(value)
        or heuristic.is_templated_secret(value)
        or heuristic.is_prefixed_with_dollar_sign(value)
        or heuristic.is_not_alphanumeric_string(value)
    )
