"""The HTTP front end's own limits, enforced before the application runs.

uvicorn's httptools protocol (llhttp underneath) parses; this subclass meters every byte a
client sends before the parser sees it, and keeps one deadline per connection for what it reads
(and one for what it writes):

- idle: an open connection with no request under way is closed after `keep_alive` seconds
  (a fresh connection after `head_timeout`); it is never counted against load shedding;
- head: the request line and header fields must fit in `max_header_bytes` and
  `max_header_fields` (else 431) and arrive within `head_timeout` (else 408);
- body: the body must arrive within `body_timeout` of the head's end (else 408), and the whole
  request, framing included (chunk sizes, chunk extensions, trailers), must fit in
  `max_request_bytes` (else 413);
- connections: beyond `max_connections` the oldest connection that is idle or still sending
  its head is closed to make room, else the oldest still sending its body; if the application is
  answering on every one, the new one is;
- an answer given before its request's body has arrived (401, 429, 404...) carries
  `connection: close` and the connection closes after it (lingering): nothing reads that body;
- send: a client that does not take its answers (the transport's writing paused because the
  socket's buffers are full), or a connection closed with answers still unsent, is aborted after
  `send_timeout` seconds; the answer's pending `send` returns, and its request stops counting as
  load. Without it, the app's `send` waited for a drain that never came, holding a load-shedding
  slot for ever, and a close waited for a flush that never came, holding a descriptor.

A write to a connection already closed (by the client, or by a refusal or deadline here) is
dropped, not raised into the application: a client going away is not an application error.

Every refusal is JSON `{"error": ..., "code": ...}` with `connection: close`, and the
connection is closed. httptools buffers a header value in Python bytes until its end, so the
head is fed to the parser in slices that never pass the limit.

This depends on uvicorn's HttpToolsProtocol internals; pyproject.toml pins uvicorn tightly.
"""

from __future__ import annotations

import asyncio
import enum
import http
import logging
import resource
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import httptools
import orjson
from uvicorn._types import ASGI3Application, ASGIReceiveCallable, ASGISendCallable, ASGISendEvent, Scope
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from bastion.certs import CLIENT_CERTIFICATE, ClientCertificate, read_certificate
from bastion.errors import (
    BadRequest,
    BastionError,
    BastionException,
    ConfigError,
    ErrorCode,
    HeadersTooLarge,
    PayloadTooLarge,
    RequestTimeout,
)

log = logging.getLogger("bastion.http")

# Chunk-size lines and CRLFs of an honest chunked body, and its trailers, on top of the body limit.
FRAMING_SLACK_BYTES = 16_384
# Requests parsed ahead of their turn on one connection; a client pipelining deeper is closed.
MAX_PIPELINED = 16
# File descriptors kept for everything but client connections (models, state, audit, logs).
RESERVED_FDS = 256
# Lingering close (as nginx's lingering_close): after a refusal the server stops writing but reads
# and discards what the client is still sending, for at most LINGER_SECONDS (LINGER_IDLE_SECONDS
# after the last byte) and LINGER_MAX_BYTES. Closing with unread bytes makes the kernel send a
# reset, and a client still uploading a moderately oversized body would then see "connection
# reset" instead of the 413 written for it; a flood past these bounds is cut off.
LINGER_SECONDS = 2.0
LINGER_IDLE_SECONDS = 0.5
LINGER_MAX_BYTES = 2 << 20


class _LogBudget:
    """At most `per_window` lines of each message per window; the rest are counted, and the count is
    logged with the first line of the next window. The front end's refusals and aborts cost no
    credential: one line each grew the log at the rate of an anonymous flood (red team #9 F4)."""

    def __init__(self, per_window: int = 10, window: float = 10.0) -> None:
        self.per_window = per_window
        self.window = window
        self._counts: dict[str, tuple[float, int]] = {}  # message -> (window start, lines in it)

    def log(self, level: int, message: str) -> None:
        now = time.monotonic()
        start, count = self._counts.get(message, (now, 0))
        if now - start >= self.window:
            suppressed = count - self.per_window
            if suppressed > 0:
                log.log(level, "%s (and %d more in the last %.1f s)", message, suppressed, now - start)
                self._counts[message] = (now, 1)  # this line is the new window's first
                return
            start, count = now, 0
        self._counts[message] = (start, count + 1)
        if count < self.per_window:
            log.log(level, "%s", message)


# One per process: the messages are a handful of fixed strings (error codes, one abort, one refusal).
_LOG_BUDGET = _LogBudget()


@dataclass(frozen=True, kw_only=True)
class FrontendLimits:
    """Limits per connection and request. Sizes in bytes, times in seconds."""

    max_header_bytes: int
    max_header_fields: int
    head_timeout: float
    body_timeout: float
    keep_alive: float
    send_timeout: float  # writing paused (answers not taken), or a close not flushed, this long: abort
    max_body_bytes: int
    max_connections: int

    @property
    def max_request_bytes(self) -> int:
        return self.max_header_bytes + self.max_body_bytes + FRAMING_SLACK_BYTES


class _Phase(enum.Enum):
    IDLE = "idle"  # no request under way: keep-alive deadline
    HEAD = "head"  # a request's first byte has arrived, its head has not ended: head deadline
    BODY = "body"  # head ended, body not: body deadline
    WAIT = "wait"  # request complete, the application is answering: no deadline (but the send deadline)


class _PipelineTooDeep(BastionException):
    """More pipelined requests than the front end buffers; the connection is closed."""


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with Bastion's front-end limits. Use `protocol_class(limits)`."""

    limits: ClassVar[FrontendLimits]
    # Every open connection of this server, oldest first (for eviction at max_connections).
    open_connections: ClassVar[OrderedDict[LimitedHttpToolsProtocol, None]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase = _Phase.IDLE
        self._deadline: asyncio.TimerHandle | None = None
        self._fed = 0  # bytes fed to the parser on this connection
        self._slice_start = 0  # _fed before the slice being parsed
        self._message_start = 0  # _fed when the current request's first byte arrived
        self._fields = 0
        self._error: BastionError | _PipelineTooDeep | None = None
        self._linger_left = 0  # > 0 while lingering: bytes still to discard before closing
        self._linger_end = 0.0  # loop time at which a lingering close ends whatever comes
        self._send_deadline: asyncio.TimerHandle | None = None
        self._send_deadline_sticky = False  # armed by a close: resuming writing does not cancel it
        self._writes_closed = False  # closed or half-closed here: nothing more can be written
        self._running: RequestResponseCycle | None = None  # the cycle whose application runs
        # TLS with a client certificate: read once per connection, after the handshake verified it.
        self._client_certificate: ClientCertificate | None = None

    # Connection lifetime

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # Over TLS this runs once the handshake has ended (a handshake has its own deadline: bastion.tls).
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            der = ssl_object.getpeercert(binary_form=True)
            self._client_certificate = read_certificate(der) if der else None
        registry = self.open_connections
        if len(registry) >= self.limits.max_connections:
            # The oldest connection the server is waiting on (idle, still sending its head, or closing:
            # answered and lingering), else the oldest still sending its body: a connection that holds
            # only the client's own bytes never keeps a new one, a health probe included, out. Only one
            # the application is answering is kept.
            victim = next(
                (c for c in registry if c._phase in (_Phase.IDLE, _Phase.HEAD) or c._writes_closed), None
            )
            if victim is None:
                victim = next((c for c in registry if c._phase is _Phase.BODY), None)
            if victim is None:
                _LOG_BUDGET.log(
                    logging.WARNING,
                    "connection limit reached and every connection is busy: refusing a new one",
                )
                self.transport.close()
                return
            victim._close()
        registry[self] = None
        # A fresh connection owes its head within head_timeout.
        self._arm(self.limits.head_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.open_connections.pop(self, None)
        self._cancel()
        self._cancel_send_deadline()
        self._disconnect_cycles()  # uvicorn marks only the newest cycle, not a pipelined one's predecessor
        super().connection_lost(exc)

    def _close(self, *, linger: bool = False) -> None:
        self._cancel()
        self._disconnect_cycles()
        self._writes_closed = True
        if linger and not self.transport.is_closing() and self.transport.can_write_eof():
            # Half-close: the answer and then FIN go out; what the client still sends is read and dropped.
            self._linger_left = LINGER_MAX_BYTES
            self._linger_end = self.loop.time() + LINGER_SECONDS
            self.transport.write_eof()
            self.flow.resume_reading()
            self._linger()
        else:
            self.transport.close()
        self._flush_by_deadline()

    def _disconnect_cycles(self) -> None:
        """Tell the running request and the newest one (pipelined) that their client is gone."""
        for cycle in (self._running, self.cycle):
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()

    # Answers out

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        self._running = cycle
        protocol = self

        async def send(message: ASGISendEvent) -> None:
            if (
                message["type"] == "http.response.start"
                and cycle is protocol.cycle
                and protocol._phase is _Phase.BODY
            ):
                # Answered before its body has arrived (401, 429, 404, ...): nothing will read the rest,
                # so the connection ends with the answer (`connection: close`), and the close lingers so
                # that a client still uploading reads it. Kept alive, a client with no credentials held
                # the connection in its body phase for body_timeout by dripping the body it declared.
                cycle.transport = _LingeringClose(protocol)  # type: ignore[assignment]
                cycle.keep_alive = False
            if protocol.flow.write_paused and not cycle.disconnected:
                await protocol.flow.drain()  # returns at the latest when the send deadline aborts
            if protocol._writes_closed or protocol.transport.is_closing():
                # The client went away (the transport saw a reset before connection_lost ran) or the
                # front end closed the connection: the answer has nowhere to go. uvloop would raise.
                cycle.disconnected = True
            await cycle.send(message)

        async def guarded(scope: Scope, receive: ASGIReceiveCallable, _send: ASGISendCallable) -> None:
            await app(scope, receive, send)

        super()._start_asgi_task(cycle, guarded)

    def pause_writing(self) -> None:
        super().pause_writing()
        self._arm_send_deadline()

    def resume_writing(self) -> None:
        super().resume_writing()
        if not self._send_deadline_sticky:
            self._cancel_send_deadline()

    def _flush_by_deadline(self) -> None:
        """A close waits for unsent bytes to flush: at most send_timeout, as a paused write does."""
        if self.transport.get_write_buffer_size() > 0:
            self._send_deadline_sticky = True
            self._arm_send_deadline()

    def _arm_send_deadline(self) -> None:
        if self._send_deadline is None:
            self._send_deadline = self.loop.call_later(self.limits.send_timeout, self._on_send_deadline)

    def _cancel_send_deadline(self) -> None:
        if self._send_deadline is not None:
            self._send_deadline.cancel()
            self._send_deadline = None

    def _on_send_deadline(self) -> None:
        self._send_deadline = None
        _LOG_BUDGET.log(
            logging.INFO, f"a client took no answer for {self.limits.send_timeout:.0f} s: connection aborted"
        )
        self._cancel()
        self._disconnect_cycles()
        self._writes_closed = True
        # abort, not close: close would wait for the flush that is not coming. connection_lost follows,
        # and wakes the answer's pending send (FlowControl.resume_writing).
        self.transport.abort()

    # Deadlines

    def _linger(self) -> None:
        """(Re)arm the lingering close: LINGER_IDLE_SECONDS from now, never past its end."""
        self._cancel()
        wait = min(LINGER_IDLE_SECONDS, self._linger_end - self.loop.time())
        self._deadline = self.loop.call_later(max(wait, 0.0), self.transport.close)

    def _arm(self, seconds: float) -> None:
        self._cancel()
        self._deadline = self.loop.call_later(seconds, self._on_deadline)

    def _cancel(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _on_deadline(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self._phase is _Phase.HEAD and self._fed > self._message_start:
            self._refuse(RequestTimeout("request head not received in time"))
        elif self._phase is _Phase.BODY:
            self._refuse(RequestTimeout("request body not received in time"))
        else:
            self._close()

    # Bytes in

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        if self.transport.is_closing():
            return
        if self._linger_left > 0:
            self._linger_left -= len(data)
            if self._linger_left <= 0:
                self.transport.close()
            else:
                self._linger()
            return
        if self._phase is _Phase.IDLE:
            self._start_message(self._fed)
        limits = self.limits
        view = memoryview(data)
        while view:
            if self._phase is _Phase.HEAD:
                room = limits.max_header_bytes - (self._fed - self._message_start)
                if room <= 0:
                    self._refuse(HeadersTooLarge(f"request head larger than {limits.max_header_bytes} bytes"))
                    return
                piece, view = view[:room], view[room:]
            else:
                piece, view = view, view[len(view) :]
            self._slice_start = self._fed
            self._fed += len(piece)
            try:
                self.parser.feed_data(piece)
            except httptools.HttpParserCallbackError:
                error, self._error = self._error, None
                if isinstance(error, BastionError):
                    self._refuse(error)
                else:
                    self._close()  # pipelined too deep, or a callback failed: no well-ordered answer possible
                return
            except httptools.HttpParserUpgrade:
                # No upgrade is supported (ws="none"): the request is answered as plain HTTP, as
                # uvicorn does, and the connection closes after it (the parser stops at the upgrade).
                if self.cycle is not None:
                    self.cycle.keep_alive = False
                return
            except httptools.HttpParserError:
                self.send_400_response("Invalid HTTP request received.")
                return
            if self.transport.is_closing():
                return
            under_way = self._phase in (_Phase.HEAD, _Phase.BODY)
            if under_way and self._fed - self._message_start > limits.max_request_bytes:
                self._refuse(PayloadTooLarge(f"request larger than {limits.max_request_bytes} bytes"))
                return

    def _start_message(self, start: int) -> None:
        self._phase = _Phase.HEAD
        self._message_start = start
        self._fields = 0
        self._arm(self.limits.head_timeout)

    # Parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._client_certificate is not None:
            self.scope["extensions"] = {"tls": {CLIENT_CERTIFICATE: self._client_certificate}}
        if self._phase in (_Phase.IDLE, _Phase.WAIT):
            # A pipelined request: counted from the start of the slice it began in (never fewer bytes).
            self._start_message(self._slice_start)
        self._fields = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields += 1
        if self._fields > self.limits.max_header_fields:
            self._error = HeadersTooLarge(f"more than {self.limits.max_header_fields} header fields")
            raise self._error
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if (
            self.cycle is not None
            and not self.cycle.response_complete
            and len(self.pipeline) >= MAX_PIPELINED
        ):
            self._error = _PipelineTooDeep()
            raise self._error
        if any(
            name == b"transfer-encoding" and value.strip().lower() != b"chunked"
            for name, value in self.headers
        ):
            # llhttp accepts `gzip, chunked` and hands over the body de-chunked but still coded: a coding
            # accepted and ignored. Only chunked is supported (red team #9 F6).
            self._error = BadRequest("a Transfer-Encoding other than chunked", code=ErrorCode.MALFORMED_HTTP)
            raise self._error
        declared = _content_length(self.headers)
        if declared is not None and declared > self.limits.max_body_bytes:
            # Refused here, with `connection: close`, before the application answers it as a kept-alive
            # connection that the byte limit then cuts mid-upload (the client would reuse a dead one).
            self._error = PayloadTooLarge(f"body larger than {self.limits.max_body_bytes} bytes")
            raise self._error
        super().on_headers_complete()
        self._phase = _Phase.BODY
        self._arm(self.limits.body_timeout)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self.cycle.response_complete and not self.pipeline:
            self._go_idle()  # answered before its body ended (e.g. 401): the connection is idle now
        else:
            self._phase = _Phase.WAIT
            self._cancel()

    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)
        super().on_response_complete()
        self._unset_keepalive_if_required()  # one deadline per connection, ours
        if self.transport.is_closing():  # uvicorn closed it after a `connection: close` answer
            self._writes_closed = True
            self._flush_by_deadline()
        if self._phase is _Phase.WAIT and not pipelined and not self.transport.is_closing():
            self._go_idle()

    def _go_idle(self) -> None:
        self._phase = _Phase.IDLE
        self._arm(self.limits.keep_alive)

    # Refusals

    def send_400_response(self, msg: str) -> None:
        """The parser's own refusals (an unknown method, a malformed request line, header or chunk):
        a JSON error like every other answer, instead of uvicorn's plain text."""
        self._refuse(BadRequest("malformed HTTP request", code=ErrorCode.MALFORMED_HTTP))

    def _refuse(self, error: BastionError) -> None:
        """Answer `error` as JSON and close, unless an answer to this request has already begun."""
        cycle = self.cycle
        if self.pipeline:
            can_answer = False  # an earlier request's answer is owed first
        elif self._phase is _Phase.HEAD:
            can_answer = cycle is None or cycle.response_complete
        else:
            can_answer = not cycle.response_started
        if can_answer and not self.transport.is_closing():
            body = orjson.dumps({"error": error.message, "code": error.code})
            phrase = http.HTTPStatus(error.status).phrase
            self.transport.write(
                f"HTTP/1.1 {error.status} {phrase}\r\n".encode()
                + b"content-type: application/json\r\n"
                + b"cache-control: no-store\r\n"
                + b"x-content-type-options: nosniff\r\n"
                + f"content-length: {len(body)}\r\n".encode()
                + b"connection: close\r\n\r\n"
                + body
            )
        _LOG_BUDGET.log(logging.INFO, f"front end refused a request: {error.code}")
        self._close(linger=True)


class _LingeringClose:
    """The transport a cycle answered before its body ended writes through: its close (uvicorn's, after
    a `connection: close` answer) is the front end's lingering close instead of an abrupt one."""

    def __init__(self, protocol: LimitedHttpToolsProtocol) -> None:
        self._protocol = protocol

    def close(self) -> None:
        if not self._protocol.transport.is_closing() and not self._protocol._writes_closed:
            self._protocol._close(linger=True)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._protocol.transport, name)


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The declared Content-Length (llhttp has refused a malformed or conflicting one already)."""
    for name, value in headers:
        if name == b"content-length" and value.strip().isdigit():
            return int(value)
    return None


def protocol_class(limits: FrontendLimits) -> type[LimitedHttpToolsProtocol]:
    """A protocol class bound to `limits`, for `uvicorn.Config(http=...)`; one per server."""
    return type(
        "BastionHttpProtocol",
        (LimitedHttpToolsProtocol,),
        {"limits": limits, "open_connections": OrderedDict()},
    )


def raise_fd_limit(max_connections: int, config_path: Path) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return it.

    Raises ConfigError (naming the file and field) if even the hard limit cannot hold
    `max_connections` plus RESERVED_FDS descriptors.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft != resource.RLIM_INFINITY and soft < max_connections + RESERVED_FDS:
        raise ConfigError(
            f"{config_path}: [server] max_connections = {max_connections} needs {max_connections + RESERVED_FDS} "
            f"file descriptors; the hard limit (ulimit -Hn) is {hard}"
        )
    return soft
