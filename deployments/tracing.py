"""OpenTelemetry traces of a request, off unless the app has an OTLP endpoint (vLLM's
`--otlp-traces-endpoint`; app arg `otlp_traces_endpoint`, OTLP over HTTP, e.g.
`http://collector:4318/v1/traces`).

    moe-serve.request   (ingress, SERVER)   route, model, request id, status, token counts
      engine.generate   (engine replica)    one per prompt and completion stream
        engine.queue_and_prefill            arrival to the first output (queue, prefill step)
        engine.decode                       first output to the last (the decode steps)

The request id is the one in the ingress's log line and the response (`moe_serve.request_id`).
The context crosses from the ingress to the engine replica as a W3C `traceparent` in the call.
Spans leave each process through a batch processor, so no request waits on the collector.
"""

from __future__ import annotations

import time

from opentelemetry import trace
from opentelemetry.propagate import inject
from opentelemetry.trace import NoOpTracer, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

SERVICE = "moe-serve"
_providers: dict[str, object] = {}


def tracer(endpoint: str | None, component: str):
    """This process's tracer for `component` (the no-op tracer without an endpoint)."""
    if not endpoint:
        return NoOpTracer()
    provider = _providers.get(endpoint)
    if provider is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider(resource=Resource.create({"service.name": SERVICE}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint), schedule_delay_millis=500))
        _providers[endpoint] = provider
    return provider.get_tracer(f"{SERVICE}.{component}")


def carrier(span) -> dict[str, str]:
    """`span`'s context, to send with a call (W3C trace context)."""
    out: dict[str, str] = {}
    inject(out, context=trace.set_span_in_context(span))
    return out


def context_of(headers: dict[str, str] | None):
    return TraceContextTextMapPropagator().extract(headers or {})


def start_request(t, rid: str, route: str, model: str, headers: dict | None = None):
    """The ingress's span of one client request (a caller's own `traceparent` is its parent);
    ended by `finish` when the response is done."""
    return t.start_span("moe-serve.request", kind=SpanKind.SERVER, context=context_of(headers),
                        attributes={"moe_serve.request_id": rid, "http.route": route, "gen_ai.request.model": model})


def finish(span, status: int, prompt_tokens: int, completion_tokens: int) -> None:
    span.set_attributes({"http.response.status_code": status, "gen_ai.usage.input_tokens": prompt_tokens,
                         "gen_ai.usage.output_tokens": completion_tokens})
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))
    span.end()


class EngineSpans:
    """The engine replica's spans of one stream: generate, and its two phases."""

    def __init__(self, t, request_id: str, headers: dict | None, prompt_tokens: int, completions=(0,)):
        self.t, self.start = t, time.time_ns()
        self.pending = set(completions)  # the indices still running; the span ends with the last
        self.ended = False
        self.span = t.start_span("engine.generate", context=context_of(headers),
                                 attributes={"moe_serve.request_id": request_id,
                                             "gen_ai.usage.input_tokens": prompt_tokens})
        self.first: int | None = None
        self.tokens = 0

    def outputs(self, chunk) -> bool:
        """Note one chunk of outputs; True when it finished the stream's last completion (the
        caller then ends the spans before handing the chunk on, so they close before the
        ingress's span, which the chunk lets finish)."""
        now = time.time_ns()
        if self.first is None and chunk:
            self.first = now
            parent = trace.set_span_in_context(self.span)
            self.t.start_span("engine.queue_and_prefill", context=parent, start_time=self.start).end(end_time=now)
        self.tokens += sum(len(out.token_ids) for out in chunk)
        self.pending.difference_update(out.index for out in chunk if out.finished)
        return not self.pending

    def end(self, error: BaseException | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        now = time.time_ns()
        if self.first is not None:
            parent = trace.set_span_in_context(self.span)
            self.t.start_span("engine.decode", context=parent, start_time=self.first).end(end_time=now)
        self.span.set_attribute("gen_ai.usage.output_tokens", self.tokens)
        if error is not None:
            self.span.record_exception(error)
            self.span.set_status(Status(StatusCode.ERROR))
        self.span.end(end_time=now)
