"""Tool calls without a server: Mistral's text format for templates that do not know tools,
templates that do, and parsing of `auto` output, whole and streamed in any split."""

from __future__ import annotations

import json

import pytest

from deployments.protocol import ChatCompletionRequest
from deployments.tools import MARKER, ToolPlan, ToolStream, render_messages
from engine.factory import load_tokenizer

TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}]


def request(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "2+3?"}],
                                                 "tools": TOOLS} | kw)


def test_template_without_tools_gets_mistral_text(tiny_ckpt):
    tok = load_tokenizer(tiny_ckpt)
    call = {"id": "abcdefghi", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
    body = request(messages=[{"role": "user", "content": "2+3?"},
                             {"role": "assistant", "content": None, "tool_calls": [call]},
                             {"role": "tool", "tool_call_id": "abcdefghi", "content": "5"},
                             {"role": "user", "content": "thanks"}])
    text = render_messages(body, tok)
    assert text.count("[INST]") == 2  # the tool result joined the next user turn
    assert f'{MARKER} [{{"name": "add", "arguments": {{"a": 2, "b": 3}}, "id": "abcdefghi"}}]</s>' in text
    assert '[TOOL_RESULTS] {"call_id": "abcdefghi", "content": "5"} [/TOOL_RESULTS]\nthanks' in text
    assert text.index("[AVAILABLE_TOOLS]") > text.rindex("[INST]")  # in the last user turn
    assert "[AVAILABLE_TOOLS]" not in render_messages(request(tool_choice="none"), tok)


def test_template_with_tools_renders_them_itself(tiny_ckpt):
    tok = load_tokenizer(tiny_ckpt)
    tok.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                         "{% if tools %}<tools>{{ tools | map(attribute='function.name') | join(',') }}{% endif %}")
    assert render_messages(request(), tok) == "<user>2+3?<tools>add"


CALLS = MARKER + ' [{"name": "add", "arguments": {"a": 2, "b": 3}}, {"name": "add", "arguments": {"a": 1, "b": 1}}]'


@pytest.mark.parametrize(("text", "calls", "content"), [
    (CALLS, [("add", {"a": 2, "b": 3}), ("add", {"a": 1, "b": 1})], None),
    ("  " + MARKER + '{"name": "add", "arguments": {"a": 7, "b": 0}}', [("add", {"a": 7, "b": 0})], None),
    ("plain words", [], "plain words"),
    (MARKER + " [{broken", [], MARKER + " [{broken"),
    (MARKER + ' [{"name": "nope", "arguments": {}}]', [], MARKER + ' [{"name": "nope", "arguments": {}}]'),
    ("[TOOL", [], "[TOOL"),
])
def test_auto_output_is_parsed_whole_and_streamed(text, calls, content):
    plan = ToolPlan(request())
    got_content, got_calls = plan.parse(text)
    assert got_content == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got_calls] == calls
    for step in (1, 3, 7):  # streamed in pieces of any size: the same result
        ts, deltas = ToolStream(plan), []
        for i in range(0, len(text), step):
            deltas.append(ts.delta(text[i:i + step]))
        last, finish = ts.close("stop")
        deltas.append(last)
        streamed = "".join(d.get("content", "") for d in deltas if d)
        tool_calls = [tc for d in deltas if d for tc in d.get("tool_calls", [])]
        assert (streamed or None) == content
        assert [(tc["function"]["name"], json.loads(tc["function"]["arguments"])) for tc in tool_calls] == calls
        assert finish == ("tool_calls" if calls else "stop")


def test_no_parallel_calls_keeps_the_first():
    plan = ToolPlan(request(parallel_tool_calls=False))
    _, calls = plan.parse(CALLS)
    assert len(calls) == 1 and json.loads(calls[0]["function"]["arguments"]) == {"a": 2, "b": 3}
