"""Traces of the request path (bastion.tracing), read with the OpenTelemetry SDK's in-memory exporter.

The service is the real one on the demo deployment; the spans are the real SDK's. The transports'
part (the REST header, gRPC metadata) goes through the real BastionApp and the real gRPC server.
"""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, Span
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from bastion.config import Action, Config, GrpcSettings, OutputDetail, TracingSettings, load_config
from bastion.context import RequestContext
from bastion.demo import DemoBuild, build_demo, infer_request
from bastion.policy import TokenScope
from bastion.routes import ROUTE_ACTIONS, Route
from bastion.service import Bastion, Outcome

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
# A distinctive first feature (within the demo's range): no span attribute may carry it.
MARKER = 17.123457


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoBuild:
    return build_demo(tmp_path_factory.mktemp("tracing") / "demo", llm=False)


def _config(demo: DemoBuild, **tracing: Any) -> Config:
    settings = TracingSettings(enabled=True, otlp_endpoint="http://127.0.0.1:9/v1/traces", **tracing)
    return load_config(demo.config_path).model_copy(update={"tracing": settings})


@pytest.fixture
def traced(demo: DemoBuild) -> Iterator[tuple[Bastion, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    service = Bastion(_config(demo), config_path=demo.config_path, span_exporter=exporter)
    yield service, exporter
    service.close()


def _context(
    route: Route, credentials: str | None, body: bytes = b"", *, traceparent: str | None = None
) -> RequestContext:
    async def read_body(limit: int) -> bytes:
        return body

    return RequestContext(
        request_id=f"t{time.perf_counter_ns()}",
        action=ROUTE_ACTIONS[route],
        now=time.time(),
        credentials=credentials,
        read_body=read_body,
        client="127.0.0.1",
        model_name="breast-cancer",
        traceparent=traceparent,
    )


def _key(service: Bastion, role: str) -> str:
    return service.keys.create(name=f"trace-{role}", roles=[role], now=time.time()).secret


def _body(demo: DemoBuild, n: int = 0) -> bytes:
    """The demo's first row with a distinct marker as its first feature (a first row in range)."""
    doc = infer_request(demo.features[:1])
    doc["inputs"][0]["data"][0] = MARKER + n / 1000
    return json.dumps(doc).encode()


def _handle(service: Bastion, *contexts: RequestContext) -> list[Outcome]:
    async def go() -> list[Outcome]:
        await service.startup()
        try:
            outcomes = [await service.handle(Route.INFER, ctx) for ctx in contexts]
            if service.tracing is not None:
                assert service.tracing.provider.force_flush()
            return outcomes
        finally:
            await service.aclose()

    return asyncio.run(go())


def _tree(spans: tuple[ReadableSpan, ...], request_id: str) -> tuple[ReadableSpan, list[ReadableSpan]]:
    """The request span with this request id, and its children in the order they started."""
    (root,) = [s for s in spans if s.attributes and s.attributes.get("bastion.request_id") == request_id]
    assert root.context is not None
    children = [s for s in spans if s.parent is not None and s.parent.span_id == root.context.span_id]
    return root, sorted(children, key=lambda s: s.start_time or 0)


def _stage_names(service: Bastion) -> list[str]:
    return [type(s._stage).__name__ for s in service.pipelines[Route.INFER]]  # type: ignore[attr-defined]


def test_an_allowed_request_is_one_span_with_a_child_per_stage_and_the_audit_write(
    traced: tuple[Bastion, InMemorySpanExporter], demo: DemoBuild
) -> None:
    service, exporter = traced
    key = _key(service, "analyst")
    ctx = _context(Route.INFER, f"Bearer {key}", _body(demo, 1))
    (outcome,) = _handle(service, ctx)
    assert outcome.status == 200
    root, children = _tree(exporter.get_finished_spans(), ctx.request_id)
    assert root.name == "bastion.request" and root.kind is SpanKind.SERVER and root.parent is None
    assert root.attributes is not None
    assert dict(root.attributes) == {
        "bastion.request_id": ctx.request_id,
        "bastion.route": "infer",
        "bastion.status": 200,
        "bastion.decision": "allow",
        "bastion.principal": f"key:{key.split('_')[1]}",
        "bastion.model": "breast-cancer",
        "bastion.model_version": outcome.headers["x-model-version"],
    }
    # Every stage of the pipeline, in its order, then the audit write: all children of the request.
    assert [s.name for s in children] == [*_stage_names(service), "audit.write"]
    assert _stage_names(service)[0] == "ThrottleFailedAuth" and "Infer" in _stage_names(service)
    assert all(s.context is not None and s.context.trace_id == root.context.trace_id for s in children)
    assert children[-1].attributes == {"bastion.status": 200}
    for stage in children[:-1]:
        assert stage.attributes is not None and set(stage.attributes) == {"bastion.stage_ms"}
        assert stage.end_time is not None and stage.start_time is not None
        assert root.start_time <= stage.start_time <= stage.end_time <= root.end_time  # type: ignore[operator]


def test_a_refused_request_ends_at_the_stage_that_refused_it_with_its_code(
    traced: tuple[Bastion, InMemorySpanExporter], demo: DemoBuild
) -> None:
    service, exporter = traced
    outsider = service.keys.create(name="trace-outsider", roles=[], now=time.time()).secret
    forged = "bst_0123456789abcdef_" + "A" * 43
    unknown = _context(Route.INFER, f"Bearer {forged}", _body(demo, 2))
    ungranted = _context(Route.INFER, f"Bearer {outsider}", _body(demo, 3))
    outcomes = _handle(service, unknown, ungranted)
    assert [o.status for o in outcomes] == [401, 403]
    spans = exporter.get_finished_spans()

    root, children = _tree(spans, unknown.request_id)
    assert root.attributes is not None and "bastion.principal" not in root.attributes
    assert root.attributes["bastion.decision"] == "deny" and root.attributes["bastion.status"] == 401
    assert (
        root.attributes["bastion.error_code"] == "unauthenticated" and "bastion.model" not in root.attributes
    )
    # Identity refused it: the stages after it never ran; the refusal was still audited.
    assert [s.name for s in children] == ["ThrottleFailedAuth", "audit.write"]
    assert children[0].attributes is not None
    assert children[0].attributes["bastion.error_code"] == "unauthenticated"
    assert children[0].attributes["bastion.status"] == 401
    assert not children[0].status.is_ok and children[-1].attributes == {"bastion.status": 401}

    root, children = _tree(spans, ungranted.request_id)
    assert root.attributes is not None and str(root.attributes["bastion.principal"]).startswith("key:")
    assert root.attributes["bastion.status"] == 403 and root.attributes["bastion.error_code"] == "forbidden"
    names = [s.name for s in children]
    assert names[-2:] == ["AuthorizeModel", "audit.write"] and "Infer" not in names
    assert (
        children[-2].attributes is not None and children[-2].attributes["bastion.error_code"] == "forbidden"
    )


def test_a_callers_traceparent_is_continued_and_a_malformed_one_ignored(
    traced: tuple[Bastion, InMemorySpanExporter], demo: DemoBuild
) -> None:
    service, exporter = traced
    key = f"Bearer {_key(service, 'analyst')}"
    continued = _context(Route.INFER, key, _body(demo, 4), traceparent=TRACEPARENT)
    malformed = [
        "00-zz-00f067aa0ba902b7-01",
        f"00-{'0' * 32}-{PARENT_ID}-01",  # an all-zero trace id is invalid
        f"ff-{TRACE_ID}-{PARENT_ID}-01",  # version ff is forbidden
        TRACEPARENT + "x" * 4000,  # over-long: not even parsed
        "",
    ]
    contexts = [
        _context(Route.INFER, key, _body(demo, 10 + j), traceparent=t) for j, t in enumerate(malformed)
    ]
    unsampled = _context(Route.INFER, key, _body(demo, 6), traceparent=f"00-{TRACE_ID}-{PARENT_ID}-00")
    outcomes = _handle(service, continued, *contexts, unsampled)
    assert [o.status for o in outcomes] == [200] * (len(malformed) + 2)  # never an error
    spans = exporter.get_finished_spans()

    root, children = _tree(spans, continued.request_id)
    assert root.context is not None and root.parent is not None and root.parent.is_remote
    assert f"{root.context.trace_id:032x}" == TRACE_ID and f"{root.parent.span_id:016x}" == PARENT_ID
    assert len(children) == len(_stage_names(service)) + 1
    for ctx in contexts:
        root, children = _tree(spans, ctx.request_id)
        assert root.parent is None and root.context is not None
        assert f"{root.context.trace_id:032x}" != TRACE_ID and children
    # The caller's sampled flag off: traced all the same (the operator's ratio decides, not the caller).
    assert [s for s in spans if s.attributes and s.attributes.get("bastion.request_id") == unsampled.request_id]


def test_no_span_attribute_carries_a_key_a_token_or_a_payload_value(
    traced: tuple[Bastion, InMemorySpanExporter], demo: DemoBuild
) -> None:
    service, exporter = traced
    key = _key(service, "analyst")
    scope = TokenScope(frozenset({(Action.INFER, "breast-cancer")}), OutputDetail.LABEL)
    token, _ = service.tokens.issue(key_id=key.split("_")[1], scope=scope, now=time.time())
    _handle(
        service,
        _context(Route.INFER, f"Bearer {key}", _body(demo, 7), traceparent=TRACEPARENT),
        _context(Route.INFER, f"Bearer {token}", _body(demo, 8)),
        _context(Route.INFER, f"Bearer {key[:-2]}xx", _body(demo, 9)),
        _context(Route.INFER, f"Bearer {key}", b'{"inputs": [{"name": "features", "data": ["17.123457"]}]'),
    )
    spans = exporter.get_finished_spans()
    assert len(spans) > 20
    values = [str(v) for s in spans for v in (s.attributes or {}).values()]
    values += [s.name for s in spans] + [str(v) for s in spans for v in s.resource.attributes.values()]
    needles = [key, key.split("_", 2)[2], token, "17.123", "features"]
    for value in values:
        for needle in needles:
            assert needle not in value, f"{needle[:10]}... in a span attribute"


def _request_spans(spans: tuple[ReadableSpan, ...]) -> list[ReadableSpan]:
    return [s for s in spans if s.name == "bastion.request"]


def test_sample_ratio_zero_traces_no_request_of_its_own_and_one_traces_each(demo: DemoBuild) -> None:
    counts = []
    for ratio in (0.0, 1.0):
        exporter = InMemorySpanExporter()
        service = Bastion(
            _config(demo, sample_ratio=ratio), config_path=demo.config_path, span_exporter=exporter
        )
        try:
            key = f"Bearer {_key(service, 'analyst')}"
            # The last one with a caller's sampled flag on: it cannot force a trace past the ratio.
            _handle(
                service,
                *(_context(Route.INFER, key, _body(demo, n)) for n in range(4, 10)),
                _context(Route.INFER, key, _body(demo, 11), traceparent=TRACEPARENT),
            )
        finally:
            service.close()
        counts.append(len(_request_spans(exporter.get_finished_spans())))
    assert counts == [0, 7]


def test_a_caller_cannot_choose_its_trace_ids_in_or_out_of_the_sample(demo: DemoBuild) -> None:
    """The ratio's choice is the server's: a trace id the caller picks so that a trace-id-ratio sampler
    always keeps it (low 64 bits 0) or always drops it (all ones) is sampled like any other request
    (red team of issue 12, second pass, F2: at 0.1, 100 of 100 forced in, 0 of 100 out)."""
    exporter = InMemorySpanExporter()
    service = Bastion(_config(demo, sample_ratio=0.5), config_path=demo.config_path, span_exporter=exporter)
    try:
        key = f"Bearer {_key(service, 'analyst')}"
        forced = {
            "in": [f"{n:016x}" + "0" * 16 for n in range(1, 41)],
            "out": [f"{n:016x}" + "f" * 16 for n in range(1, 41)],
        }
        _handle(
            service,
            *(
                _context(Route.INFER, key, _body(demo, 4), traceparent=f"00-{t}-{PARENT_ID}-01")
                for ids in forced.values()
                for t in ids
            ),
        )
        traced = {format(s.context.trace_id, "032x") for s in _request_spans(exporter.get_finished_spans())}
    finally:
        service.close()
    # Each set of 40 at 0.5: all or none of them sampled by chance has probability 2**-40.
    assert 0 < len(traced & set(forced["in"])) < 40
    assert 0 < len(traced & set(forced["out"])) < 40


def test_tracing_off_makes_no_span_object_and_leaves_the_stages_unwrapped(demo: DemoBuild) -> None:
    config = load_config(demo.config_path)
    assert config.tracing.enabled is False  # the default
    service = Bastion(config, config_path=demo.config_path)
    try:
        assert service.tracing is None
        assert all(type(s).__name__ != "_TracedStage" for p in service.pipelines.values() for s in p)
        gc.collect()
        before = sum(isinstance(o, Span) for o in gc.get_objects())
        key = f"Bearer {_key(service, 'analyst')}"
        outcomes = _handle(
            service,
            *(_context(Route.INFER, key, _body(demo, n), traceparent=TRACEPARENT) for n in range(4, 7)),
        )
        assert [o.status for o in outcomes] == [200, 200, 200]
        gc.collect()
        assert sum(isinstance(o, Span) for o in gc.get_objects()) == before
    finally:
        service.close()


def test_rest_and_grpc_callers_traceparent_reaches_the_request_span(
    traced: tuple[Bastion, InMemorySpanExporter], demo: DemoBuild
) -> None:
    from bastion.grpc import grpc_predict_v2_pb2 as pb
    from bastion.grpc.server import GrpcServer
    from bastion.http.app import BastionApp

    service, exporter = traced
    key = _key(service, "analyst")
    grpc_trace = "0af7651916cd43dd8448eb211c80319c"

    async def go() -> tuple[int, str]:
        await service.startup()
        transport = httpx.ASGITransport(app=BastionApp(service))
        async with httpx.AsyncClient(transport=transport, base_url="http://bastion") as client:
            r = await client.post(
                "/v2/models/breast-cancer/infer",
                content=_body(demo, 1),
                headers={"authorization": f"Bearer {key}", "traceparent": TRACEPARENT},
            )
        server = GrpcServer(service, GrpcSettings(enabled=True, port=0))
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                call = channel.unary_unary(
                    "/inference.GRPCInferenceService/ModelMetadata",
                    request_serializer=pb.ModelMetadataRequest.SerializeToString,
                    response_deserializer=pb.ModelMetadataResponse.FromString,
                )
                await call(
                    pb.ModelMetadataRequest(name="breast-cancer"),
                    metadata=(
                        ("authorization", f"Bearer {key}"),
                        ("traceparent", f"00-{grpc_trace}-{PARENT_ID}-01"),
                    ),
                )
        finally:
            await server.stop(0)
            assert service.tracing is not None and service.tracing.provider.force_flush()
            await service.aclose()
        return r.status_code, r.headers["x-request-id"]

    status, rest_id = asyncio.run(go())
    assert status == 200
    requests = _request_spans(exporter.get_finished_spans())
    by_trace = {f"{s.context.trace_id:032x}": s for s in requests if s.context is not None}
    assert set(by_trace) == {TRACE_ID, grpc_trace}
    assert dict(by_trace[TRACE_ID].attributes or {})["bastion.request_id"] == rest_id
    assert dict(by_trace[grpc_trace].attributes or {})["bastion.route"] == "model_metadata"
    assert all(s.parent is not None and f"{s.parent.span_id:016x}" == PARENT_ID for s in requests)


class _Collector(BaseHTTPRequestHandler):
    """A minimal OTLP/HTTP traces receiver: keeps each ExportTraceServiceRequest it is sent."""

    received: ClassVar[list[ExportTraceServiceRequest]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        if self.path == "/v1/traces" and self.headers["content-type"] == "application/x-protobuf":
            self.received.append(ExportTraceServiceRequest.FromString(body))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.mark.slow
def test_spans_reach_the_otlp_endpoint_over_http(demo: DemoBuild) -> None:
    collector = HTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=collector.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{collector.server_port}/v1/traces"
        config = load_config(demo.config_path).model_copy(
            update={"tracing": TracingSettings(enabled=True, otlp_endpoint=endpoint)}
        )
        service = Bastion(config, config_path=demo.config_path)  # the real OTLP exporter
        try:
            key = f"Bearer {_key(service, 'analyst')}"
            _handle(service, _context(Route.INFER, key, _body(demo, 1), traceparent=TRACEPARENT))
        finally:
            service.close()
    finally:
        collector.shutdown()
        collector.server_close()
    spans = [
        span
        for request in _Collector.received
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]
    names = [s.name for s in spans]
    assert "bastion.request" in names and "Infer" in names and "audit.write" in names
    assert {s.trace_id.hex() for s in spans} == {TRACE_ID}


def test_tracing_settings_are_refused_where_they_would_be_ignored(tmp_path: Path) -> None:
    from bastion.errors import ConfigError

    cases = {
        "[tracing]\nsample_ratio = 0.5\n": "sample_ratio applies to tracing, and enabled = false",
        '[tracing]\notlp_endpoint = "http://127.0.0.1:4318/v1/traces"\n': "otlp_endpoint applies to tracing",
        "[tracing]\nenabled = true\n": "needs otlp_endpoint",
        '[tracing]\nenabled = true\notlp_endpoint = "ftp://x"\n': "tracing.otlp_endpoint",
        '[logging]\nformat = "xml"\n': "logging.format",
    }
    for text, reason in cases.items():
        path = tmp_path / "bastion.toml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=reason):
            load_config(path)
