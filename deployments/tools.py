"""Tool calls on /v1/chat/completions: how tools reach the prompt and calls come back out.

Prompt: a chat template that knows tools (its source uses `tools`) renders them itself, and the
messages go in OpenAI's shape (arguments parsed to objects, as Hugging Face templates expect).
Otherwise (Mixtral-8x7B-Instruct's template knows only user/assistant turns) they are written
in Mistral's tool format as text: `[AVAILABLE_TOOLS] [...] [/AVAILABLE_TOOLS]` before the last
user turn, an assistant's calls as `[TOOL_CALLS] [...]`, tool results as
`[TOOL_RESULTS] {...} [/TOOL_RESULTS]` in a user turn.

Output, by `tool_choice`:

| tool_choice          | decoding                                               | finish_reason |
| -------------------- | ------------------------------------------------------ | ------------- |
| none (or no tools)   | plain                                                  | stop / length |
| auto (default)       | plain; `[TOOL_CALLS]` + JSON at the start is parsed    | tool_calls    |
| required             | constrained to a JSON list of calls of the tools       | tool_calls    |
| {"function": name}   | constrained to that function's arguments schema        | stop          |

`parallel_tool_calls: false` limits `required` to one call (and `auto` keeps the first).
"""

from __future__ import annotations

import json
import secrets
import string

from moe_parallel.contract import Guided

MARKER = "[TOOL_CALLS]"
ANY_OBJECT = {"type": "object"}
_ID_CHARS = string.ascii_letters + string.digits


def call_id() -> str:
    """A tool-call id: 9 letters and digits (the form Mistral's templates check)."""
    return "".join(secrets.choice(_ID_CHARS) for _ in range(9))


def _arguments(text: str):
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text


def render_messages(body, tokenizer, add_generation_prompt: bool = True, continue_final_message: bool = False) -> str:
    """The chat prompt text, tools included (a generation prompt after it, unless the last
    message is to be continued instead, as /tokenize may ask)."""
    choice = getattr(body, "tool_choice", None)
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools and choice != "none" else None
    ending = {"add_generation_prompt": add_generation_prompt, "continue_final_message": continue_final_message}
    template = tokenizer.chat_template or ""
    if "tools" in template:
        messages = []
        for m in body.messages:
            d = {"role": m.role, "content": m.text()}
            if m.tool_calls:
                d["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                    "name": c.function.name, "arguments": _arguments(c.function.arguments)}} for c in m.tool_calls]
            if m.tool_call_id:
                d["tool_call_id"] = m.tool_call_id
            messages.append(d)
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, **ending)
    return tokenizer.apply_chat_template(_as_plain_turns(body.messages, tools), tokenize=False, **ending)


def _as_plain_turns(messages, tools: list[dict] | None) -> list[dict]:
    """Mistral's tool format written as text into user/assistant turns (tool results join the
    user turn that follows them)."""
    turns: list[dict] = []
    for m in messages:
        if m.role == "tool":
            text = f"[TOOL_RESULTS] {json.dumps({'call_id': m.tool_call_id, 'content': m.text()})} [/TOOL_RESULTS]"
            role = "user"
        elif m.role == "assistant" and m.tool_calls:
            calls = [{"name": c.function.name, "arguments": _arguments(c.function.arguments), "id": c.id}
                     for c in m.tool_calls]
            text, role = (m.text() + " " if m.text() else "") + f"{MARKER} {json.dumps(calls)}", "assistant"
        else:
            text, role = m.text(), m.role
        if turns and turns[-1]["role"] == role == "user":
            turns[-1]["content"] += "\n" + text
        else:
            turns.append({"role": role, "content": text})
    if tools:
        last = max((i for i, t in enumerate(turns) if t["role"] == "user"), default=None)
        if last is not None:
            turns[last]["content"] = f"[AVAILABLE_TOOLS] {json.dumps(tools)} [/AVAILABLE_TOOLS]" + \
                turns[last]["content"]
    return turns


class ToolPlan:
    """What a chat request's tools ask of decoding and of the response."""

    def __init__(self, body):
        tools = body.tools or []
        choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
        self.tools = {t.function.name: t.function for t in tools}
        self.parallel = body.parallel_tool_calls
        if not tools or choice == "none":
            self.mode, self.name = "none", None
        elif isinstance(choice, str):
            self.mode, self.name = choice, None
        else:
            self.mode, self.name = "named", choice.function.name

    @property
    def active(self) -> bool:
        return self.mode != "none"

    def guided(self) -> Guided | None:
        """The grammar that `required` and a named function decode under."""
        if self.mode == "named":
            return Guided("json", json.dumps(self.tools[self.name].parameters or ANY_OBJECT, sort_keys=True))
        if self.mode == "required":
            calls = [{"type": "object", "properties": {"name": {"const": name},
                                                       "arguments": f.parameters or ANY_OBJECT},
                      "required": ["name", "arguments"], "additionalProperties": False}
                     for name, f in self.tools.items()]
            schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
            if not self.parallel:
                schema["maxItems"] = 1
            return Guided("json", json.dumps(schema, sort_keys=True))
        return None

    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        """The model's text -> (content, OpenAI tool_calls); unparseable output stays content."""
        if self.mode == "named":
            return None, [_call(self.name, text)]
        body = text.strip()
        if self.mode == "auto":
            if not body.startswith(MARKER):
                return text, []
            body = body[len(MARKER):].strip()
        try:
            value, _ = json.JSONDecoder().raw_decode(body)
        except ValueError:
            return text, []
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(i, dict) and i.get("name") in self.tools for i in items):
            return text, []
        if not self.parallel:
            items = items[:1]
        return None, [_call(i["name"], json.dumps(i.get("arguments", {}))) for i in items]

    def finish_reason(self, calls: list[dict], reason: str | None) -> str | None:
        if calls and self.mode != "named" and reason == "stop":
            return "tool_calls"
        return reason


def _call(name: str, arguments: str) -> dict:
    return {"id": call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


class ToolStream:
    """One streamed choice under a ToolPlan: turns text deltas into OpenAI's chat deltas."""

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.held = ""  # text not sent yet: a possible start of the marker, or calls being written
        self.buffering = plan.mode == "required"
        self.named_id: str | None = None

    def delta(self, text: str) -> dict | None:
        """The delta for new text (None: nothing to send yet)."""
        p = self.plan
        if p.mode == "named":
            if self.named_id is None:
                self.named_id = call_id()
                return {"tool_calls": [{"index": 0, "id": self.named_id, "type": "function",
                                        "function": {"name": p.name, "arguments": text}}]}
            return {"tool_calls": [{"index": 0, "function": {"arguments": text}}]} if text else None
        if p.mode == "auto" and not self.buffering:
            self.held += text
            start = self.held.lstrip()
            if start.startswith(MARKER):
                self.buffering = True
                return None
            if MARKER.startswith(start):  # could still become the marker
                return None
            out, self.held = self.held, ""
            return {"content": out} if out else None
        if self.buffering:
            self.held += text
            return None
        return {"content": text} if text else None

    def close(self, reason: str | None) -> tuple[dict | None, str | None]:
        """At the end of the choice: the held-back delta (the parsed calls), and the finish reason."""
        p = self.plan
        if p.mode == "named":
            return None, reason
        if not self.held:
            return None, reason
        if not self.buffering:
            return {"content": self.held}, reason
        content, calls = p.parse(self.held)
        if not calls:
            return {"content": content}, reason
        return ({"tool_calls": [c | {"index": i} for i, c in enumerate(calls)]}, p.finish_reason(calls, reason))
