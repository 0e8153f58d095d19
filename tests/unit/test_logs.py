"""The redacting chain (bastion.logs) in process: records from several loggers, the way libraries
make them (format args, extras, exceptions, warnings), written to a buffer and read back."""

from __future__ import annotations

import io
import json
import logging
import secrets
import warnings
from collections.abc import Iterator

import pytest

from bastion.logs import REDACTED, configure, redact

KEY = f"bst_{secrets.token_hex(8)}_{secrets.token_urlsafe(32)}"
JWT = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiIwMTIzIn0." + secrets.token_urlsafe(43)
PASSWORD = f"pw-{secrets.token_hex(8)}"
OPAQUE = secrets.token_urlsafe(24)  # a bearer credential of no known shape
SESSION = f"{secrets.token_urlsafe(16)}.{secrets.token_urlsafe(32)}"  # a dashboard cookie: id.secret


LOGGERS = ["uvicorn.error", "httpx", "bastion", "somelib", "grpc._server", "py.warnings"]


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    # Other tests in this process may have quietened these loggers (a level, dictConfig's disabling).
    saved = {name: (logging.getLogger(name).level, logging.getLogger(name).disabled) for name in LOGGERS}
    for name in LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)
        logging.getLogger(name).disabled = False
    stream = io.StringIO()
    handler = configure("json", stream=stream)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        for name, (old_level, disabled) in saved.items():
            logging.getLogger(name).setLevel(old_level)
            logging.getLogger(name).disabled = disabled
        assert root.handlers == handlers  # the handlers it found are left alone
        logging.captureWarnings(False)


def _records(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_every_logger_goes_through_the_filter_and_comes_out_as_json(lines: io.StringIO) -> None:
    logging.getLogger("uvicorn.error").warning("Invalid request from %s: %r", "1.2.3.4", f"Bearer {OPAQUE}")
    logging.getLogger("httpx").info("HTTP Request: POST https://up.example/v1?api_key=%s", PASSWORD)
    logging.getLogger("bastion").info(
        "upstream refused", extra={"password": PASSWORD, "headers": {"Authorization": f"Bearer {JWT}"}}
    )
    logging.getLogger("somelib").error("config: {'client_secret': '%s', 'retries': 3}", PASSWORD)
    logging.getLogger("somelib").info("bad format %d", KEY)  # a library's bug: the line is kept
    try:
        raise ValueError(f"could not parse token {JWT} for key {KEY}")
    except ValueError:
        logging.getLogger("grpc._server").exception("handler failed")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        logging.captureWarnings(False)  # pytest's own catch_warnings replaced showwarning: capture anew
        logging.captureWarnings(True)
        warnings.warn(f"deprecated: passing password={PASSWORD}", DeprecationWarning, stacklevel=1)
    text = lines.getvalue()
    records = _records(lines)
    assert [r["logger"] for r in records] == [
        "uvicorn.error",
        "httpx",
        "bastion",
        "somelib",
        "somelib",
        "grpc._server",
        "py.warnings",
    ]
    for secret in (KEY, KEY.split("_", 2)[2], JWT, PASSWORD, OPAQUE):
        assert secret not in text
    assert records[0]["message"] == f"Invalid request from 1.2.3.4: 'Bearer {REDACTED}'"
    assert records[2]["password"] == REDACTED and records[2]["headers"] == {"Authorization": REDACTED}
    assert records[3]["message"] == f"config: {{'client_secret': {REDACTED}, 'retries': 3}}"
    assert "unformattable" in str(records[4]["message"])
    assert "Traceback" in str(records[5]["exc"]) and "ValueError" in str(records[5]["exc"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"key {KEY} used", f"key {REDACTED} used"),
        (f"cut short: {KEY[:30]}", f"cut short: {REDACTED}"),
        (f"authorization: Bearer {OPAQUE}", f"authorization: {REDACTED} {REDACTED}"),
        (f"token={JWT}&x=1", f"token={REDACTED}&x=1"),
        (f'{{"api_key": "{PASSWORD}", "max_tokens": 5}}', f'{{"api_key": {REDACTED}, "max_tokens": 5}}'),
        (f"DB_PASSWORD={PASSWORD} user=bob", f"DB_PASSWORD={REDACTED} user=bob"),
        # What is not a secret stays readable: counts, public ids, digests, prose.
        (
            "max_tokens=512 prompt_tokens=12 token budget left",
            "max_tokens=512 prompt_tokens=12 token budget left",
        ),
        ("key id 0123456789abcdef quarantined", "key id 0123456789abcdef quarantined"),
        (f"GET /?k={KEY.replace('_', '%5F')} 200", f"GET /?k={REDACTED} 200"),
        ("cookie gAAAAABnXyz0123456789abcdefghijklmnop_- end", f"cookie {REDACTED} end"),
        ("serving m version 1 (sha256:" + "ab" * 32 + ")", "serving m version 1 (sha256:" + "ab" * 32 + ")"),
        # The dashboard's cookie as it is now (<id>.<secret>, not a Fernet token), by name or alone;
        # a URL's userinfo (red team of issue 12, F6).
        (f"set bastion_session={SESSION}; Path=/", f"set bastion_session={REDACTED}; Path=/"),
        (f"value {SESSION} end", f"value {REDACTED} end"),
        ("GET http://ops:s3cretPW@127.0.0.1:8000/v2 200", f"GET http://{REDACTED}@127.0.0.1:8000/v2 200"),
    ],
    # Fixed ids: the cases hold random keys, and a test id must not hold a secret nor differ between runs.
    ids=[
        "key",
        "cut-key",
        "bearer",
        "jwt-query",
        "json-field",
        "env-assignment",
        "counts",
        "key-id",
        "url-encoded-key",
        "session-cookie",
        "digest",
        "session-cookie-named",
        "session-cookie-alone",
        "url-userinfo",
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_text_format_is_redacted_too() -> None:
    root = logging.getLogger()
    level = root.level
    stream = io.StringIO()
    handler = configure("text", stream=stream)
    try:
        logging.getLogger("uvicorn.access").warning("GET /?password=%s with %s", PASSWORD, KEY)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        logging.captureWarnings(False)
    line = stream.getvalue().strip()
    assert line.endswith(f"WARNING uvicorn.access: GET /?password={REDACTED} with {REDACTED}")


def test_the_cli_logs_through_the_redacting_chain(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`bastion status --url http://user:pw@host` printed the password in httpx's INFO lines (red team
    of issue 12, F6): the CLI's lines go through the same filter, and httpx's request lines are off."""
    import http.server
    import threading

    from bastion.cli import main

    class Server(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    import bastion.status

    fetch = bastion.status.fetch_status

    def logging_fetch(url: str, key: str, **kw: object) -> bastion.status.ServerStatus:
        # A line a library might write while the command runs: the command's handler must redact it.
        logging.getLogger("bastion.test").warning("url %s and %s", url, key)
        return fetch(url, key, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(bastion.status, "fetch_status", logging_fetch)
    server = http.server.HTTPServer(("127.0.0.1", 0), Server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        import os

        os.environ["BASTION_TEST_STATUS_KEY"] = KEY
        main(
            [
                "status",
                "--url",
                f"http://ops:{PASSWORD}@127.0.0.1:{server.server_address[1]}",
                "--key",
                "env:BASTION_TEST_STATUS_KEY",
            ]
        )
    finally:
        server.shutdown()
        os.environ.pop("BASTION_TEST_STATUS_KEY", None)
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)
        logging.captureWarnings(False)
    out = capsys.readouterr()
    assert PASSWORD not in out.out + out.err and KEY not in out.out + out.err
    assert "HTTP Request" not in out.err
    assert f"url http://{REDACTED}@127.0.0.1:{server.server_address[1]} and {REDACTED}" in out.err
