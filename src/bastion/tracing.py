"""OpenTelemetry traces of the request path (`[tracing]` in the policy file; off by default).

One span per request (`bastion.request`, kind SERVER), one child span per pipeline stage (named
after the stage's class) and one for the audit write (`audit.write`). The caller's W3C `traceparent`
(REST header or gRPC metadata) is continued; a malformed one is ignored (a new trace starts), never
refused: the SDK's propagator returns an empty context for anything that is not a valid header.

Attributes are limited to ids, decisions, codes and timings: request id, route, the served model's
name and version, the principal's id (`key:<key id>`, public), status, decision, error code. Never
a credential, a payload, a prompt or an answer, nor a model name a client asked for and that is not
served (it is the client's text).

Off, this module is not even imported: `Bastion` keeps `tracing = None`, its pipelines are the
stages themselves and no span object is ever made (bench/RESULTS.md measures it).

The exporter is OTLP over HTTP (`opentelemetry-exporter-otlp-proto-http`, the `otlp` extra), behind
a BatchSpanProcessor: spans leave on its thread, and when its queue is full they are dropped, not
waited for.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from bastion.config import TracingSettings
from bastion.errors import BastionError, ConfigError

if TYPE_CHECKING:
    from bastion.context import RequestContext
    from bastion.routes import Route
    from bastion.service import Outcome
    from bastion.stages import Stage

_PROPAGATOR = TraceContextTextMapPropagator()
_LONGEST_TRACEPARENT = 55  # version 00: 2 + 1 + 32 + 1 + 16 + 1 + 2 characters


def otlp_exporter(endpoint: str) -> SpanExporter:
    """The OTLP/HTTP (protobuf) exporter to `endpoint`, the collector's traces URL. Raises
    ConfigError when the `otlp` extra is not installed."""
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        raise ConfigError(
            "tracing.otlp_endpoint: the OTLP exporter is not installed: pip install 'bastion-serve[otlp]'"
        ) from None
    return OTLPSpanExporter(endpoint=endpoint, timeout=10)


class _DrawnRatio(Sampler):
    """Samples `ratio` of the spans by a draw of its own, never by the trace id: for a caller's trace
    (a remote parent), whose id the caller chose. `TraceIdRatioBased` decides on the id's low 64 bits,
    so a caller picking ids could keep all of its requests out of traces, or have all of them
    exported past the ratio (red team of issue 12, F2)."""

    def __init__(self, ratio: float) -> None:
        self._ratio = ratio
        self._bound = round(ratio * (1 << 56))

    def should_sample(
        self,
        parent_context: Any,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Any = None,
        links: Sequence[Link] | None = None,
        trace_state: Any = None,
    ) -> SamplingResult:
        if int.from_bytes(os.urandom(7), "big") < self._bound:
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)
        return SamplingResult(Decision.DROP)

    def get_description(self) -> str:
        return f"DrawnRatio{{{self._ratio}}}"


class Tracing:
    """The tracer of one service. `exporter` replaces the OTLP one (tests: the SDK's in-memory
    exporter). `provider.force_flush()` exports the spans queued; `provider.shutdown()` ends it."""

    def __init__(self, settings: TracingSettings, *, exporter: SpanExporter | None = None) -> None:
        if exporter is None:
            assert settings.otlp_endpoint is not None  # the config refuses enabled without it
            exporter = otlp_exporter(settings.otlp_endpoint)
        # Its own provider, not the global one: nothing else in the process traces through it.
        self.provider = TracerProvider(
            # The caller's trace id is continued, but neither its sampled flag nor the id itself decides
            # (a draw does): a caller must not keep its requests out of traces, nor flood the exporter
            # past the ratio. Our own new traces have random ids: the ratio on them is fair.
            sampler=ParentBased(
                TraceIdRatioBased(settings.sample_ratio),
                remote_parent_sampled=_DrawnRatio(settings.sample_ratio),
                remote_parent_not_sampled=_DrawnRatio(settings.sample_ratio),
            ),
            resource=Resource.create({"service.name": "bastion"}),
        )
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("bastion")

    def wrap_pipelines(self, pipelines: dict[Route, list[Stage]]) -> dict[Route, list[Stage]]:
        """Each stage in a child span of its own, named after its class."""
        return {route: [_TracedStage(self.tracer, s) for s in stages] for route, stages in pipelines.items()}

    async def request(
        self, route: Route, ctx: RequestContext, handle: Callable[[Route, RequestContext], Awaitable[Outcome]]
    ) -> Outcome:
        """`handle(route, ctx)` inside the request's span, continuing the caller's trace if any."""
        parent = None
        if ctx.traceparent is not None and len(ctx.traceparent) <= _LONGEST_TRACEPARENT:
            parent = _PROPAGATOR.extract({"traceparent": ctx.traceparent})
        with self.tracer.start_as_current_span(
            "bastion.request",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"bastion.request_id": ctx.request_id, "bastion.route": route.value},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            outcome = await handle(route, ctx)
            if span.is_recording():
                span.set_attributes(_request_attributes(ctx, outcome))
                if outcome.status >= 500:
                    span.set_status(Status(StatusCode.ERROR))
            return outcome

    async def audit_write(
        self, record: Callable[..., Awaitable[Outcome]], *args: Any, **kwargs: Any
    ) -> Outcome:
        """The audit write (`Bastion._record`) in its own span, with the status it let through."""
        with self.tracer.start_as_current_span("audit.write", record_exception=False) as span:
            outcome = await record(*args, **kwargs)
            span.set_attribute("bastion.status", outcome.status)
            return outcome


def _request_attributes(ctx: RequestContext, outcome: Outcome) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "bastion.status": outcome.status,
        "bastion.decision": "allow" if outcome.status < 400 else "deny",
    }
    if ctx.principal is not None:
        attributes["bastion.principal"] = ctx.principal.id
    # Only a served model's name: a name the client asked for and that is not served is its text.
    model = ctx.model if ctx.model is not None else ctx.chat.model if ctx.chat is not None else None
    if model is not None:
        attributes["bastion.model"] = model.name
        version = getattr(model, "version", None)
        if version is not None:
            attributes["bastion.model_version"] = version
    if outcome.status >= 400 and isinstance(outcome.body, dict):
        code = outcome.body.get("code")
        if code is not None:
            attributes["bastion.error_code"] = str(code)
    return attributes


class _TracedStage:
    """A stage run in a child span: its name, its duration, and the error code it refused with."""

    __slots__ = ("_name", "_stage", "_tracer")

    def __init__(self, tracer: trace.Tracer, stage: Stage) -> None:
        self._tracer, self._stage, self._name = tracer, stage, type(stage).__name__

    async def __call__(self, ctx: RequestContext) -> None:
        with self._tracer.start_as_current_span(
            self._name, record_exception=False, set_status_on_exception=False
        ) as span:
            began = time.perf_counter()
            try:
                await self._stage(ctx)
            except BastionError as e:
                # The stable code and status only: the message may quote the client's input.
                span.set_attributes({"bastion.error_code": e.code.value, "bastion.status": e.status})
                span.set_status(Status(StatusCode.ERROR))
                raise
            except Exception as e:
                span.set_attributes(
                    {"bastion.error_code": "internal_error", "bastion.exception": type(e).__name__}
                )
                span.set_status(Status(StatusCode.ERROR))
                raise
            finally:
                span.set_attribute("bastion.stage_ms", round((time.perf_counter() - began) * 1000, 3))
