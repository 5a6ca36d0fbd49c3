"""The engine replica's spans of a stream close with the chunk that finishes its last
completion, before that chunk reaches the ingress (whose span the chunk lets end): the
engine's spans nest inside the ingress's, whichever process finishes its work first."""

from __future__ import annotations

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from deployments.tracing import EngineSpans
from engine.outputs import RequestOutput


def piece(index: int, token: int, finish: str | None = None) -> RequestOutput:
    return RequestOutput("r", index, (token,), "x", None, finish, 3, 1)


def spans_of(exporter: InMemorySpanExporter) -> dict[str, object]:
    return {s.name: s for s in exporter.get_finished_spans()}


def test_spans_end_with_the_chunk_that_finishes_the_last_completion():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    spans = EngineSpans(provider.get_tracer("t"), "r-0", None, 3, completions=range(2))
    assert spans.outputs([piece(0, 1), piece(1, 2)]) is False
    assert spans.outputs([piece(0, 3, "length")]) is False  # completion 1 still runs
    assert "engine.generate" not in spans_of(exporter)
    assert spans.outputs([piece(1, 4, "stop")]) is True
    spans.end()
    done = spans_of(exporter)
    assert set(done) == {"engine.generate", "engine.queue_and_prefill", "engine.decode"}
    assert done["engine.generate"].attributes["gen_ai.usage.output_tokens"] == 4
    end = done["engine.generate"].end_time
    spans.end(RuntimeError("the generator's own end, later"))  # a second end changes nothing
    assert len(exporter.get_finished_spans()) == 3
    assert spans_of(exporter)["engine.generate"].end_time == end
    assert done["engine.decode"].end_time == end


def test_a_resumed_stream_waits_only_for_the_completions_it_runs():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    spans = EngineSpans(provider.get_tracer("t"), "r-0", None, 3, completions=[1])
    assert spans.outputs([piece(1, 7, "stop")]) is True
