"""`inference.GRPCInferenceService` (Open Inference Protocol V2 over gRPC), on the REST pipelines.

Each RPC builds the same `RequestContext` the HTTP app builds (credentials from the `authorization`
metadata, the client address from the peer, the model from the message, the serialized message as
the body) and calls `Bastion.handle`, so identity, limits, authorization, the input guard, query
auditing, the output policy and the audit record are the REST path's own. Only the encoding differs:
an answer becomes the RPC's response message, a refusal a gRPC status (`GRPC_STATUS`) whose details
are the error message and whose trailing metadata carries `bastion-error-code` (and `retry-after`).

Messages are read as bytes and parsed here, not by grpc: grpc answers a message its deserializer
cannot parse with INTERNAL, and a client's garbage is not the server's failure. Each RPC is registered
as client-streaming so that this module, not grpc, waits for its one request message: grpc's unary
handler waits without a bound (a call that sends its headers and never its message, or ends its stream
with none, held one of `max_concurrent_rpcs` for as long as the client liked). Here the wait is bounded
(`message_timeout_seconds`) and so is the number of such calls per client address
(`max_waiting_rpcs_per_address`); both refusals come before the pipeline, like the HTTP front end's.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote

import grpc
from google.protobuf.message import DecodeError, Message

from bastion.certs import ClientCertificate, read_pem_certificate
from bastion.config import GrpcSettings
from bastion.context import InferRequest, RequestContext
from bastion.errors import GRPC_STATUS, BastionException, ErrorCode, PayloadTooLarge, grpc_status
from bastion.grpc import grpc_predict_v2_pb2 as pb
from bastion.grpc.codec import decode_model_infer, encode_model_infer, encode_model_metadata
from bastion.routes import ROUTE_ACTIONS, Route
from bastion.service import Bastion, Outcome
from bastion.stages.address_limits import address_key

if TYPE_CHECKING:
    from bastion.tls import ServerTls

log = logging.getLogger("bastion.grpc")

SERVICE = "inference.GRPCInferenceService"
_M = TypeVar("_M", bound=Message)
# The model names REST routes (bastion.routes); anything else is answered as REST answers an
# unknown path: 401 before 404.
_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")


def _valid_name(name: str, longest: int) -> bool:
    return 0 < len(name) <= longest and name[0] not in "_.-" and set(name) <= _NAME_CHARS


def peer_address(peer: str) -> str | None:
    """The client address of a grpc peer string ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000")."""
    kind, _, rest = unquote(peer).partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0] or None
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]") or None
    return None


class _Refused(BastionException):
    """A refusal already encoded as a gRPC status (raised to leave a handler)."""

    def __init__(self, code: grpc.StatusCode, details: str, metadata: tuple[tuple[str, str], ...]) -> None:
        super().__init__(details)
        self.code, self.details, self.metadata = code, details, metadata


class InferenceService:
    """The RPCs of `inference.GRPCInferenceService`; every decision is `Bastion.handle`'s."""

    def __init__(
        self, service: Bastion, tls: ServerTls | None = None, settings: GrpcSettings | None = None
    ) -> None:
        """`tls`: the server's TLS, which re-checks the client certificate on every call. `settings`:
        the bounds on a call's wait for its message (default: the service's `[grpc]`)."""
        self.service = service
        self.tls = tls
        settings = settings or service.config.grpc
        self._message_timeout = settings.message_timeout_seconds
        self._waiting_per_address = settings.max_waiting_rpcs_per_address
        self._ipv6_prefix = service.config.limits.failed_auth_ipv6_prefix
        self._waiting: dict[str, int] = {}  # client address -> its calls waiting for their message
        # The calls reading their message, by the quarter second their wait ends: one timer a quarter
        # second cancels what is left in its group (a timer per call cost ~15 µs of a call's CPU).
        self._deadlines: dict[float, set[asyncio.Task[Any]]] = {}
        self._expired: set[asyncio.Task[Any]] = set()

    def handler(self) -> grpc.GenericRpcHandler:
        def unary(fn: Callable[[bytes, grpc.aio.ServicerContext[Any, Any]], Awaitable[Message]]) -> Any:
            async def call(_: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Message:
                return await fn(await self._message(context), context)

            # Client-streaming, without a request deserializer: `_message` reads the one message as
            # bytes, within its bounds (see the module docstring).
            return grpc.stream_unary_rpc_method_handler(call, response_serializer=_serialize)

        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "ServerLive": unary(self.server_live),
                "ServerReady": unary(self.server_ready),
                "ModelReady": unary(self.model_ready),
                "ServerMetadata": unary(self.server_metadata),
                "ModelMetadata": unary(self.model_metadata),
                "ModelInfer": unary(self.model_infer),
            },
        )

    async def _message(self, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        """The call's request message, as bytes. Refused before the pipeline (not audited, as the HTTP
        front end's own refusals): RESOURCE_EXHAUSTED `too_many_in_flight` when this client address
        already has `max_waiting_rpcs_per_address` calls waiting; DEADLINE_EXCEEDED `request_timeout`
        when the message is not all there within `message_timeout_seconds`; INVALID_ARGUMENT
        `malformed_request` when the stream ends without one."""
        key = address_key(peer_address(context.peer()), self._ipv6_prefix)
        waiting = self._waiting.get(key, 0)
        if waiting >= self._waiting_per_address:
            await _refuse(
                context,
                ErrorCode.TOO_MANY_IN_FLIGHT,
                "too many calls from this address are waiting to send their request message",
            )
        self._waiting[key] = waiting + 1
        task = asyncio.current_task()
        assert task is not None
        group = self._watch(task)
        try:
            message = await context.read()
        except asyncio.CancelledError:
            if task not in self._expired:  # the call itself was cancelled: not ours to answer
                raise
            task.uncancel()
            await _refuse(
                context,
                ErrorCode.REQUEST_TIMEOUT,
                f"the request message did not arrive within {self._message_timeout:g} s",
            )
            raise  # abort raises; this line is for the type checker
        finally:
            self._deadlines.get(group, set()).discard(task)
            self._expired.discard(task)
            left = self._waiting[key] - 1
            if left:
                self._waiting[key] = left
            else:
                del self._waiting[key]
        if not isinstance(message, bytes):  # grpc.aio.EOF: the stream ended without a message
            await _refuse(context, ErrorCode.MALFORMED_REQUEST, "the call ended without its request message")
        assert isinstance(message, bytes)
        return message

    def _watch(self, task: asyncio.Task[Any]) -> float:
        """Put `task` in the group of calls whose wait for their message ends in the same quarter
        second (at most 0.25 s after `message_timeout_seconds`); the group's one timer cancels those
        still waiting then. Returns the group's time."""
        loop = asyncio.get_running_loop()
        group = math.ceil((loop.time() + self._message_timeout) * 4) / 4
        tasks = self._deadlines.get(group)
        if tasks is None:
            tasks = self._deadlines[group] = set()
            loop.call_at(group, self._expire, group)
        tasks.add(task)
        return group

    def _expire(self, group: float) -> None:
        for task in self._deadlines.pop(group, ()):
            self._expired.add(task)
            task.cancel()

    # Health: answered to anyone, like /v2/health/*, and not audited.

    async def server_live(self, body: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Message:
        await _parse(pb.ServerLiveRequest, body, context)
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, body: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Message:
        await _parse(pb.ServerReadyRequest, body, context)
        return pb.ServerReadyResponse(ready=await self.service.is_ready())

    async def server_metadata(self, body: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Message:
        await _parse(pb.ServerMetadataRequest, body, context)
        doc = await self._run(Route.SERVER_METADATA, body, context, None, None)
        return pb.ServerMetadataResponse(
            name=doc["name"], version=doc["version"], extensions=doc.get("extensions", [])
        )

    async def model_ready(self, body: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Message:
        message = await _parse(pb.ModelReadyRequest, body, context)
        doc = await self._run(Route.MODEL_READY, body, context, message.name, message.version)
        return pb.ModelReadyResponse(ready=bool(doc.get("ready")))

    async def model_metadata(self, body: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Message:
        message = await _parse(pb.ModelMetadataRequest, body, context)
        doc = await self._run(Route.MODEL_METADATA, body, context, message.name, message.version)
        return encode_model_metadata(doc)

    async def model_infer(self, body: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Message:
        message = await _parse(pb.ModelInferRequest, body, context)

        def decode(_: bytes) -> InferRequest:
            # The bytes read_body returned are `body`, parsed above into `message`.
            return decode_model_infer(message)

        doc = await self._run(
            Route.INFER, body, context, message.model_name, message.model_version, decode=decode
        )
        # Raw outputs to a client that sent raw inputs, as Triton does (tritonclient reads them).
        return encode_model_infer(doc, raw=bool(message.raw_input_contents))

    async def _run(
        self,
        route: Route,
        body: bytes,
        context: grpc.aio.ServicerContext[Any, Any],
        model_name: str | None,
        model_version: str | None,
        *,
        decode: Callable[[bytes], InferRequest] | None = None,
    ) -> dict[str, Any]:
        """Run `route`'s pipeline; its answer's document, or abort the RPC with its refusal."""
        version = model_version or None  # proto3: "" is "not given"
        if model_name is not None and (
            not _valid_name(model_name, 64) or (version is not None and not _valid_name(version, 32))
        ):
            route, model_name, version = Route.NOT_FOUND, None, None
        credentials = traceparent = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str) and credentials is None:
                credentials = value  # the first wins, as in the HTTP app
            elif key == "traceparent" and isinstance(value, str) and traceparent is None:
                traceparent = value  # W3C Trace Context over gRPC metadata (bastion.tracing)

        async def read_body(limit: int) -> bytes:
            if len(body) > limit:
                raise PayloadTooLarge(f"message larger than {limit} bytes")
            return body

        now = self.service.clock()
        # Re-checked per call: a busy channel lives on past its certificate and its CA's removal.
        certificate = self.tls.recheck(_client_certificate(context), now) if self.tls is not None else None
        ctx = RequestContext(
            request_id=os.urandom(8).hex(),
            action=ROUTE_ACTIONS[route],
            now=now,
            credentials=credentials,
            read_body=read_body,
            decode=decode,
            client=peer_address(context.peer()),
            model_name=model_name,
            model_version=version,
            traceparent=traceparent,
            client_certificate=certificate,
        )
        outcome = await self.service.handle(route, ctx)
        metadata = _metadata(outcome, ctx.request_id)
        if outcome.status >= 400 or not isinstance(outcome.body, dict):
            await _abort(context, outcome, metadata)
        context.set_trailing_metadata(metadata)
        assert isinstance(outcome.body, dict)
        return outcome.body


def _client_certificate(context: grpc.aio.ServicerContext[Any, Any]) -> ClientCertificate | None:
    """The client certificate gRPC's TLS verified (mTLS), from the call's auth context; None in plaintext."""
    pems = list(context.auth_context().get("x509_pem_cert", ()))
    return read_pem_certificate(pems[0]) if pems else None


def _metadata(outcome: Outcome, request_id: str) -> tuple[tuple[str, str], ...]:
    pairs = [("x-request-id", request_id)]
    for name, value in outcome.headers.items():
        lower = name.lower()
        if lower in ("retry-after", "x-model-version"):
            pairs.append((lower, value))
    return tuple(pairs)


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any], outcome: Outcome, metadata: tuple[tuple[str, str], ...]
) -> None:
    body = outcome.body if isinstance(outcome.body, dict) else {}
    code = str(body.get("code", "internal_error"))
    status = grpc.StatusCode[GRPC_STATUS.get(outcome.status, "INTERNAL")]
    retry_after = dict(metadata).get("retry-after")
    details = _details(str(body.get("error", "internal error")), code, retry_after)
    await context.abort(status, details, (*metadata, ("bastion-error-code", code)))


def _details(message: str, code: str, retry_after: str | None = None) -> str:
    """A refusal's status details: the REST error message, then its stable code (and, over a limit,
    when to retry) in parentheses. Clients such as tritonclient.grpc keep only the status and its
    details, not the trailing metadata, so the code must be readable here too."""
    return f"{message} ({code}; retry after {retry_after} s)" if retry_after else f"{message} ({code})"


async def _refuse(context: grpc.aio.ServicerContext[Any, Any], code: ErrorCode, details: str) -> None:
    """Abort the call with `code`'s gRPC status (one table, bastion.errors) and the stable code."""
    await context.abort(
        grpc.StatusCode[grpc_status(code)], _details(details, code.value), (("bastion-error-code", code.value),)
    )


async def _parse(cls: type[_M], body: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> _M:
    """The message, or INVALID_ARGUMENT: bytes that are not one are refused like the HTTP front end
    refuses a request it cannot frame, before the pipeline (there is no model or credential to read)."""
    try:
        return cls.FromString(body)
    except DecodeError:
        await _refuse(context, ErrorCode.MALFORMED_REQUEST, f"the message is not a valid {cls.DESCRIPTOR.name}")
        raise  # abort raises; this line is for the type checker


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


class GrpcServer:
    """The gRPC server on the HTTP server's event loop: `await start()`, then `await stop()`."""

    def __init__(self, service: Bastion, settings: GrpcSettings, *, tls: ServerTls | None = None) -> None:
        """`tls`: serve over TLS with the server's certificate (`[server.tls]`, reloads followed)."""
        self._service = service
        self._settings = settings
        self._tls = tls
        self._server: grpc.aio.Server | None = None
        self.port: int | None = None

    async def start(self) -> None:
        """Listen on `[grpc] host:port`. Raises OSError naming the address if it cannot bind."""
        s = self._settings
        receive = s.receive_limit(self._service.config.limits.max_body_bytes)
        idle_ms = int(s.idle_timeout_seconds * 1000)
        server = grpc.aio.server(
            maximum_concurrent_rpcs=s.max_concurrent_rpcs,
            options=[
                ("grpc.max_receive_message_length", receive),
                ("grpc.max_send_message_length", s.max_send_message_bytes),
                ("grpc.max_connection_idle_ms", idle_ms),
                # Even a busy connection is recycled now and then (GOAWAY, then a grace for its RPCs).
                ("grpc.max_connection_age_ms", max(idle_ms, 30 * 60 * 1000)),
                ("grpc.max_connection_age_grace_ms", 10_000),
                # A client pinging without RPCs more than once in 5 minutes is sent GOAWAY after two strikes.
                ("grpc.http2.min_ping_interval_without_data_ms", 300_000),
                ("grpc.http2.max_ping_strikes", 2),
                ("grpc.max_metadata_size", 16 * 1024),
                # Past it a new connection is closed at once: the port cannot take every descriptor.
                ("grpc.max_allowed_incoming_connections", s.max_connections),
                # Without this a second server on the same port would share it silently; the workers
                # of one supervisor share it on purpose, the kernel spreading connections (bastion.workers).
                ("grpc.so_reuseport", 1 if self._service.shares_ports else 0),
                # A connection that never completes its TLS handshake is cut off like a silent HTTP one.
                ("grpc.server_handshake_timeout_ms", int(self._service.config.server.head_timeout_seconds * 1000)),
            ],
        )
        server.add_generic_rpc_handlers((InferenceService(self._service, self._tls, s).handler(),))
        address = f"[{s.host}]:{s.port}" if ":" in s.host else f"{s.host}:{s.port}"
        try:
            if self._tls is not None:
                port = server.add_secure_port(address, self._tls.grpc_credentials())
            else:
                port = server.add_insecure_port(address)
        except RuntimeError as e:
            raise OSError(f"[grpc] cannot listen on {address}: {e}") from None
        if port == 0:
            raise OSError(f"[grpc] cannot listen on {address}")
        await server.start()
        self._server, self.port = server, port
        security = "plaintext" if self._tls is None else f"TLS, client certificates {self._tls.settings.client_auth}"
        optional = self._tls is not None and self._tls.settings.client_auth == "optional"
        if optional and self._service.config.client_certificates.identities:
            log.warning(
                'gRPC asks for no client certificate with client_auth = "optional" (its API can only '
                'require one): certificate identities apply to REST only; "require" maps them on gRPC too'
            )
        log.info("gRPC (Open Inference Protocol V2) listening on %s:%d, %s", s.host, port, security)

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting RPCs; those in progress get `grace` seconds to finish."""
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
