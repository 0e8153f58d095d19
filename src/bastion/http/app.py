"""Open Inference Protocol V2 over HTTP, as a small ASGI application.

It only maps paths to routes, reads the body under a cap and turns outcomes
into JSON responses; every decision is made by the service's pipelines.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

import orjson

from bastion import dashboard
from bastion.certs import CLIENT_CERTIFICATE, ClientCertificate
from bastion.context import RequestContext, SessionCredentials
from bastion.errors import BadRequest, ErrorCode, MethodNotAllowed, PayloadTooLarge
from bastion.http import openai
from bastion.protocol_binary import decoder as binary_decoder
from bastion.protocol_binary import encode_response
from bastion.routes import ROUTE_ACTIONS, Match, Route, Router
from bastion.service import Bastion, Outcome, error_outcome
from bastion.sessions import COOKIE_NAME, CSRF_HEADER, SECURE_COOKIE_NAME

if TYPE_CHECKING:
    from bastion.grpc.server import GrpcServer
    from bastion.tls import ServerTls

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

log = logging.getLogger("bastion.http")

_ROUTER = Router()
_HEALTH = (Route.LIVE, Route.READY)
_JSON = b"application/json"


class BastionApp:
    def __init__(self, service: Bastion, *, tls: ServerTls | None = None) -> None:
        """`tls`: the server's TLS ([server.tls]), which this app reloads (its timer, SIGHUP) and
        gives gRPC; None serves plaintext."""
        self.service = service
        self.tls = tls
        self._reload_task: asyncio.Task[None] | None = None
        self._tls_watch: asyncio.Task[None] | None = None
        self._grpc: GrpcServer | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        method: str = scope["method"]
        match = _ROUTER.match(path, method)
        # Liveness and readiness answer anyone: orchestrators probe them without credentials; with the
        # route table's method only. Another is 405 here (the paths are public, so is their method;
        # through the pipeline it would be an audited run that load shedding does not count).
        if match is not None and match.spec.route in _HEALTH:
            # HEAD is GET without the body (RFC 9110; uvicorn sends no body): load balancers probe with it.
            if not match.method_allowed and not (method == "HEAD" and match.spec.method == "GET"):
                allowed = ", ".join(_ROUTER.allowed_methods(path))
                wrong = MethodNotAllowed(f"use {allowed} on this path", allowed=allowed)
                await _send(send, error_outcome(wrong), None)
            elif match.spec.route is Route.LIVE:
                await _send(send, Outcome(200, {"live": True}, {}), None)
            else:
                ready = await self.service.is_ready()
                await _send(send, Outcome(200 if ready else 503, {"ready": ready}, {}), None)
            return
        # The dashboard's login page, script and style sheet: fixed files with no data, for anyone (the
        # route table's paths and method; tests/unit/test_routes.py checks each has its file).
        public_file = (
            dashboard.asset(path)
            if match is not None and match.method_allowed and match.spec.route is Route.DASHBOARD_ASSET
            else None
        )
        if public_file is not None:
            await _send(send, Outcome(200, public_file[0], {"Content-Type": public_file[1], **_PAGE}), None)
            return
        if match is None:
            route = Route.NOT_FOUND
        elif not match.method_allowed:
            route = Route.WRONG_METHOD
        else:
            route = match.spec.route
        ctx = self._context(scope, receive, route, match)
        if route is Route.WRONG_METHOD:
            ctx.allowed_methods = ", ".join(_ROUTER.allowed_methods(path))
        outcome = await self.service.handle(route, ctx)
        if match is not None and (match.spec.session or route is Route.SESSION):
            _session_headers(outcome, ctx, secure=scope.get("scheme") == "https")
        if route is Route.DASHBOARD and outcome.status == 401 and _wants_html(scope):
            # A browser without a session (ended or expired) goes to the login page, not raw JSON;
            # an API client still reads the 401.
            outcome.status, outcome.body = 303, {"error": "sign in first", "code": "unauthenticated"}
            outcome.headers["Location"] = "/dashboard/login"
        if (match is not None and match.spec.openai) or path.startswith("/v1/"):
            if outcome.stream is not None:
                await openai.send_stream(send, receive, outcome, ctx)
            else:
                await _send(send, openai.encode(route, outcome, ctx), ctx.request_id)
            return
        # Raw output bytes only when an answer's outputs were asked for so (the binary extension).
        binary = (
            ctx.request.binary_outputs if route is Route.INFER and ctx.request is not None else frozenset()
        )
        await _send(send, outcome, ctx.request_id, binary)

    def _context(self, scope: Scope, receive: Receive, route: Route, match: Match | None) -> RequestContext:
        auth = declared = header_length = traceparent = encoding = None
        for k, v in scope["headers"]:  # the first of each wins; no other header is read
            if k == b"authorization" and auth is None:
                auth = v
            elif k == b"content-encoding" and encoding is None:
                encoding = v
            elif k == b"traceparent" and traceparent is None:
                traceparent = v
            elif k == b"content-length" and declared is None:
                declared = v
            elif k == b"inference-header-content-length" and header_length is None:
                header_length = v
        client = scope.get("client")

        async def read_body(limit: int) -> bytes:
            if encoding is not None and encoding.strip().lower() not in (b"", b"identity"):
                # tritonclient's request_compression_algorithm: read as JSON, the body was "not JSON".
                raise BadRequest(
                    "a compressed request body (Content-Encoding) is not supported: send it uncompressed",
                    code=ErrorCode.UNSUPPORTED_CONTENT_ENCODING,
                )
            if declared is not None:
                if not declared.isdigit():
                    raise BadRequest("invalid Content-Length", code=ErrorCode.BAD_CONTENT_LENGTH)
                if int(declared) > limit:
                    raise PayloadTooLarge(f"body larger than {limit} bytes")
            chunks, size = [], 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise BadRequest("client disconnected", code=ErrorCode.CLIENT_DISCONNECTED)
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"body larger than {limit} bytes")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)

        now = self.service.clock()
        return RequestContext(
            request_id=os.urandom(8).hex(),
            action=ROUTE_ACTIONS[route],
            now=now,
            credentials=auth.decode("latin-1") if auth is not None else None,
            read_body=read_body,
            client=client[0] if client else None,
            model_name=match.model_name if match is not None else None,
            model_version=match.model_version if match is not None else None,
            resource_id=match.resource_id if match is not None else None,
            # The binary tensor extension: a JSON header, then raw tensor bytes (checked when decoded).
            decode=binary_decoder(header_length) if header_length is not None else None,
            # Only the dashboard and /v2/admin/* read the session cookie.
            session=_session_credentials(scope, scope["method"])
            if match is not None and match.spec.session and match.method_allowed
            else None,
            traceparent=traceparent.decode("latin-1") if traceparent is not None else None,
            # Re-checked per request, not once per connection (a kept-alive one outlives its certificate).
            client_certificate=self.tls.recheck(_client_certificate(scope), now)
            if self.tls is not None
            else None,
        )

    def _on_sighup(self) -> None:
        if self.tls is not None:
            self.tls.reload()  # certificate files first: a renewed certificate needs no policy change
        self._reload_task = asyncio.get_running_loop().create_task(self.service.reload())

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                # Models and libraries make a large, long-lived heap; a full collection walking it
                # stalled requests for tens of milliseconds (measured: p99 70 ms under load). Freeze it.
                await self.service.startup()
                if self.service.config.grpc.enabled:
                    # V2 over gRPC on its own port, on this loop and these pipelines ([grpc] in the policy file).
                    from bastion.grpc.server import GrpcServer

                    grpc_server = GrpcServer(self.service, self.service.config.grpc, tls=self.tls)
                    try:
                        await grpc_server.start()
                    except OSError as e:
                        await send({"type": "lifespan.startup.failed", "message": str(e)})
                        return
                    self._grpc = grpc_server
                if self.tls is not None:  # new certificate files are picked up on a timer (bastion.tls)
                    self._tls_watch = asyncio.get_running_loop().create_task(self.tls.watch())
                # SIGHUP re-reads the policy file and re-verifies the models without dropping requests.
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._on_sighup)
                gc.collect()
                gc.freeze()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._tls_watch is not None:
                    self._tls_watch.cancel()
                if self._grpc is not None:  # its RPCs finish before the service closes under them
                    await self._grpc.stop()
                await self.service.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _send(
    send: Send, outcome: Outcome, request_id: str | None, binary: frozenset[str] = frozenset()
) -> None:
    """`binary`: the outputs to send as raw bytes after the JSON header; errors are always JSON."""
    header_length = None
    if isinstance(outcome.body, bytes):
        page_type = outcome.headers.pop("Content-Type", None)  # the dashboard's page and files
        body = outcome.body
        content_type = page_type.encode() if page_type else b"text/plain; version=0.0.4; charset=utf-8"
    elif binary and outcome.status == 200:
        body, header_length = encode_response(outcome.body, binary)
        content_type = _JSON if header_length is None else b"application/octet-stream"
    else:
        body, content_type = orjson.dumps(outcome.body), _JSON
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        (b"x-content-type-options", b"nosniff"),
    ]
    if header_length is not None:
        headers.append((b"inference-header-content-length", str(header_length).encode()))
    if request_id is not None:
        headers.append((b"x-request-id", request_id.encode()))
    headers.extend((k.lower().encode(), v.encode()) for k, v in outcome.headers.items())
    await send({"type": "http.response.start", "status": outcome.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# The dashboard's page and files: scripts and styles from this origin only (no inline script, no
# inline style), never framed, no referrer.
_PAGE = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


def _client_certificate(scope: Scope) -> ClientCertificate | None:
    """The verified client certificate the front end put in the scope (mTLS), if any."""
    tls = scope.get("extensions", {}).get("tls")
    found = tls.get(CLIENT_CERTIFICATE) if tls is not None else None
    return found if isinstance(found, ClientCertificate) else None


_MAX_SESSION_COOKIES = 4  # of one name in a request: the real one behind a few tossed ones


def _session_credentials(scope: Scope, method: str) -> SessionCredentials | None:
    """The dashboard session's cookie, if sent (`__Host-` name over TLS), with the CSRF header and
    the browser's Sec-Fetch-Site; None without the cookie."""
    name = (SECURE_COOKIE_NAME if scope.get("scheme") == "https" else COOKIE_NAME).encode()
    cookies: list[str] = []  # every value of that name (a tossed one may come first), a few at most
    csrf = site = None
    for k, v in scope["headers"]:
        if k == b"cookie":
            for pair in v.split(b";"):
                key, sep, value = pair.strip().partition(b"=")
                if sep and key == name and len(cookies) < _MAX_SESSION_COOKIES:
                    cookies.append(value.decode("latin-1"))
        elif k == CSRF_HEADER.encode() and csrf is None:
            csrf = v.decode("latin-1")
        elif k == b"sec-fetch-site" and site is None:
            site = v
    if not cookies:
        return None
    return SessionCredentials(
        cookies[0],
        csrf,
        state_changing=method not in ("GET", "HEAD"),
        cross_site=site in (b"cross-site", b"same-site"),
        others=tuple(cookies[1:]),
    )


def _session_headers(outcome: Outcome, ctx: RequestContext, *, secure: bool) -> None:
    """The session cookie set (a new session) or cleared (logout); the page's headers."""
    name = SECURE_COOKIE_NAME if secure else COOKIE_NAME
    attributes = "; Path=/; HttpOnly; SameSite=Strict" + ("; Secure" if secure else "")
    if ctx.session_issued is not None and outcome.status == 200:
        issued = ctx.session_issued
        outcome.headers["Set-Cookie"] = f"{name}={issued.cookie_value}; Max-Age={issued.max_age}{attributes}"
    elif ctx.session_ended or (
        outcome.status == 401 and ctx.session is not None and not ctx.session.state_changing
    ):
        # Ended, expired, forged or from another server: the browser drops it. Not on a refused POST:
        # one without the CSRF token must not log the operator out.
        outcome.headers["Set-Cookie"] = f"{name}=; Max-Age=0{attributes}"
    if isinstance(outcome.body, bytes) and outcome.status == 200:
        outcome.headers.update({"Content-Type": dashboard.PAGE_TYPE, **_PAGE})


def _wants_html(scope: Scope) -> bool:
    """A browser's navigation (its Accept names text/html), not an API client."""
    return any(k == b"accept" and b"text/html" in v for k, v in scope["headers"])
