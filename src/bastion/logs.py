"""The server's log lines: one redacting chain for every logger (Bastion's, uvicorn's, the libraries').

Standard-library `logging`, not structlog: uvicorn, grpc, asyncio, httpx and Presidio all log through
it, and a filter on the one root handler sees each of their records whatever logger made it; structlog
would need this same stdlib bridge for them and adds a dependency for nothing more.

The chain, in order, on the root handler (`configure`):

1. `RedactingFilter`: the formatted message, the exception text and every extra field are rewritten:
   API keys (`bst_<16 hex>_<secret>`), bearer credentials, JWTs (three base64url parts, the first
   `eyJ`), dashboard session cookies, a URL's `user:password@`, and the value of any field whose
   name says secret (`password=…`, `"api_key": "…"`, an `extra={"token": …}`) become `[REDACTED]`.
2. `JsonFormatter` (one JSON object a line: `ts`, `level`, `logger`, `message`, `exc`, extras) or
   the text formatter, as `[logging] format` says.

Redaction is the last line of defense, not the first: Bastion's own code logs no payload, prompt or
credential; this catches what a library quotes (a header in an error, a URL with a token).
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any, Literal, TextIO

import orjson

REDACTED = "[REDACTED]"

# A field name that says its value is a secret (password, api_key, x-api-key, client_secret, token…).
_CONFIDENTIAL_NAME = (
    r"[A-Za-z0-9_.-]*(?:pass(?:word|wd|phrase)|secret|token(?!s)|api[_-]?key|credential|authorization"
    r"|cookie|private[_-]?key)[A-Za-z0-9_.-]*"
)
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # Bastion's API keys, also cut short or inside a longer word: the secret part after the id.
    (re.compile(r"bst_[0-9a-fA-F]{16}_[A-Za-z0-9_-]*"), REDACTED),
    (re.compile(r"bst_[0-9a-fA-F]{16}"), REDACTED),  # the id alone is public, but never needed here
    (re.compile(r"(?i)bst%5F[0-9a-f]{16}(?:%5F[A-Za-z0-9_%-]*)?"), REDACTED),  # the same, URL-encoded
    # A Fernet token (version byte 0x80, so base64url "gAAAAA"): the dashboard's cookie was one once.
    (re.compile(r"gAAAAA[A-Za-z0-9_=-]{20,}"), REDACTED),
    # The dashboard's session cookie: <id>.<secret>, token_urlsafe(16) . token_urlsafe(32).
    (re.compile(r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{22}\.[A-Za-z0-9_-]{43}(?![A-Za-z0-9_-])"), REDACTED),
    # A URL's userinfo (scheme://user:password@host): both parts.
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@:]+:[^/\s@]*@"), rf"\1{REDACTED}@"),
    # JWTs (JWS compact form: header.payload.signature; the header is base64url JSON, so "eyJ").
    (re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.?[A-Za-z0-9_-]*"), REDACTED),
    # An authorization scheme and its credential, whatever the credential looks like.
    (re.compile(r"(?i)\b(bearer|basic)(\s+)[^\s,;\"'}\]]+"), rf"\1\2{REDACTED}"),
    # name=value, name: value, "name": "value", 'name': 'value' with a secret-like name.
    (
        re.compile(
            rf"(?i)([\"']?{_CONFIDENTIAL_NAME}[\"']?\s*[:=]\s*)(\[REDACTED\]|\"[^\"]*\"|'[^']*'|b'[^']*'|[^\s,;&}}\]]+)"
        ),
        rf"\1{REDACTED}",
    ),
)
_CONFIDENTIAL_FIELD = re.compile(rf"(?i)^{_CONFIDENTIAL_NAME}$")

# The attributes every LogRecord has: anything else on a record came from `extra=`. uvicorn's
# `color_message` (the message again, with terminal colours) is left out too.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "color_message",
}


def redact(text: str) -> str:
    """`text` with keys, bearer credentials, JWTs and secret-named values replaced by `[REDACTED]`."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, bytes):
        return redact(value.decode("utf-8", "replace"))
    if isinstance(value, dict):
        return {
            k: REDACTED if _CONFIDENTIAL_FIELD.match(str(k)) else _redact_value(v) for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(v) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return redact(repr(value))


class RedactingFilter(logging.Filter):
    """Rewrites each record in place (never drops one): its message formatted once and redacted, its
    args cleared, its exception and stack text redacted, every extra field redacted (a secret-named
    one replaced whole). On a handler, it sees every record that handler writes, whatever logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a library's bad format string must not lose the line, nor crash the server
            message = f"{record.msg!s} (unformattable args)"
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.exc_info = None  # the text below is the only form that reaches a formatter
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        for name in set(record.__dict__) - _STANDARD:
            value = record.__dict__[name]
            record.__dict__[name] = REDACTED if _CONFIDENTIAL_FIELD.match(name) else _redact_value(value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: `ts` (Unix seconds), `level`, `logger`, `message`, then `exc` and
    `stack` when present, then the record's extra fields (already redacted by the filter)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = record.stack_info
        for name in sorted(set(record.__dict__) - _STANDARD):
            line.setdefault(name, record.__dict__[name])
        return orjson.dumps(line, default=repr).decode()


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Loggers that install their own handlers when left alone: sent to the root handler instead.
_ROUTED = ("uvicorn", "uvicorn.error", "uvicorn.access", "py.warnings")


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The one handler `configure` installs (recognised, and replaced, by a second call)."""


def configure(
    fmt: Literal["json", "text"] = "text",
    *,
    level: int = logging.INFO,
    stream: TextIO | None = None,
    replace_all: bool = False,
) -> logging.Handler:
    """Send every log record through the redacting filter to `stream` (stderr), as JSON or text.

    Replaces a handler this function installed before, and with `replace_all` (the server process,
    which owns its logging) every other root handler too, so that no line leaves unredacted; the
    loggers in `_ROUTED` lose their own handlers and propagate to root, and Python's warnings become
    log records. Returns the handler."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if replace_all or isinstance(h, _Handler)]:
        root.removeHandler(old)
    handler = _Handler(stream if stream is not None else sys.stderr)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    for name in _ROUTED:
        routed = logging.getLogger(name)
        routed.handlers.clear()
        routed.propagate = True
    logging.captureWarnings(False)  # re-captured below even if someone captured them before
    logging.captureWarnings(True)
    return handler
