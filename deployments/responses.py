"""OpenAI's Responses API shapes: the response object and its stream of typed events.

A `POST /v1/responses` runs as the chat completion it is equivalent to (`protocol.ResponsesRequest
.chat_fields`: instructions as the system turn, `text.format` as `response_format`, function
tools and calls as chat tools and tool turns); this module writes the answer as the Responses
API does. A stream is the SDK's event sequence, each an SSE `event:` with its JSON `data:`:

    response.created, response.in_progress
    response.output_item.added (message), response.content_part.added,
    response.output_text.delta ..., response.output_text.done, response.content_part.done,
    response.output_item.done
    (per tool call) response.output_item.added (function_call),
    response.function_call_arguments.delta, .done, response.output_item.done
    response.completed (or response.incomplete when max_output_tokens ran out)

While a stream waits for its first token it repeats `response.in_progress` as its keep-alive.
Every event carries a `sequence_number`; no `[DONE]` follows, as from OpenAI.
"""

from __future__ import annotations

import json
import uuid


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def usage(chat_usage: dict) -> dict:
    return {"input_tokens": chat_usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": chat_usage["prompt_tokens_details"]["cached_tokens"]},
            "output_tokens": chat_usage["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": chat_usage["total_tokens"]}


def message_item(item_id: str, text: str, status: str) -> dict:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": [part]}


def call_item(call: dict, status: str = "completed") -> dict:
    return {"type": "function_call", "id": _id("fc"), "call_id": call["id"], "name": call["function"]["name"],
            "arguments": call["function"]["arguments"], "status": status}


class Response:
    """One response's object, as it grows: `snapshot()` for the events, `done()` at the end."""

    def __init__(self, rid: str, request, model: str, created: int):
        self.rid, self.request, self.model, self.created = rid, request, model, created
        self.output: list[dict] = []
        self.status, self.incomplete, self.usage = "in_progress", None, None

    def finish(self, content: str | None, calls: list[dict], finish_reason: str | None, chat_usage: dict,
               message_id: str | None = None) -> None:
        self.status = "incomplete" if finish_reason == "length" else "completed"
        self.incomplete = {"reason": "max_output_tokens"} if finish_reason == "length" else None
        if content or not calls:
            self.output.append(message_item(message_id or _id("msg"), content or "", self.status))
        self.output += [call_item(c) for c in calls]
        self.usage = usage(chat_usage)

    def snapshot(self) -> dict:
        r = self.request
        fmt = r.text.format.model_dump(by_alias=True, exclude_none=True) if r.text and r.text.format else \
            {"type": "text"}
        tool_choice = r.tool_choice.model_dump() if hasattr(r.tool_choice, "model_dump") else (r.tool_choice or "auto")
        return {"id": self.rid, "object": "response", "created_at": self.created, "status": self.status,
                "error": None, "incomplete_details": self.incomplete, "instructions": r.instructions,
                "max_output_tokens": r.max_output_tokens, "model": self.model, "output": list(self.output),
                "parallel_tool_calls": r.parallel_tool_calls, "previous_response_id": None, "reasoning": None,
                "store": False, "temperature": r.temperature, "top_p": r.top_p, "text": {"format": fmt},
                "tool_choice": tool_choice,
                "tools": [t.model_dump(exclude_none=True) for t in r.tools or ()], "truncation": "disabled",
                "usage": self.usage, "user": r.user, "metadata": r.metadata or {}}


def from_chat(response: Response, choice: dict, chat_usage: dict) -> dict:
    """The whole response from the equivalent chat completion's one choice."""
    message = choice["message"]
    response.finish(message.get("content"), message.get("tool_calls") or [], choice["finish_reason"], chat_usage)
    return response.snapshot()


class Events:
    """The stream's events in order, numbered."""

    def __init__(self, response: Response):
        self.response, self.seq = response, 0
        self.message_id: str | None = None  # the message item, once its first text has come
        self.text = ""

    def _event(self, kind: str, **fields) -> str:
        data = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n"

    def start(self) -> list[str]:
        snap = self.response.snapshot()
        return [self._event("response.created", response=snap), self._event("response.in_progress", response=snap)]

    def waiting(self) -> str:
        return self._event("response.in_progress", response=self.response.snapshot())

    def _open_message(self) -> list[str]:
        self.message_id = _id("msg")
        item = message_item(self.message_id, "", "in_progress") | {"content": []}
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return [self._event("response.output_item.added", output_index=0, item=item),
                self._event("response.content_part.added", item_id=self.message_id, output_index=0, content_index=0,
                            part=part)]

    def delta(self, text: str) -> list[str]:
        frames = self._open_message() if self.message_id is None else []
        self.text += text
        return frames + [self._event("response.output_text.delta", item_id=self.message_id, output_index=0,
                                     content_index=0, delta=text, logprobs=[])]

    def finish(self, content: str | None, calls: list[dict], finish_reason: str | None, chat_usage: dict) -> list[str]:
        """The closing events; `content` is the whole message text (sent as one delta where it
        was not streamed: a tool-call answer is parsed once complete)."""
        frames = []
        if content and not self.text:
            frames += self.delta(content)
        elif not content and not calls and self.message_id is None:
            frames += self._open_message()
        self.response.finish(content, calls, finish_reason, chat_usage, self.message_id)
        index = 0
        if self.message_id is not None:
            item = self.response.output[0]
            part = item["content"][0]
            frames += [self._event("response.output_text.done", item_id=self.message_id, output_index=0,
                                   content_index=0, text=part["text"], logprobs=[]),
                       self._event("response.content_part.done", item_id=self.message_id, output_index=0,
                                   content_index=0, part=part),
                       self._event("response.output_item.done", output_index=0, item=item)]
            index = 1
        for i, item in enumerate(self.response.output[index:], start=index):
            frames += [self._event("response.output_item.added", output_index=i,
                                   item=item | {"arguments": "", "status": "in_progress"}),
                       self._event("response.function_call_arguments.delta", item_id=item["id"], output_index=i,
                                   delta=item["arguments"]),
                       self._event("response.function_call_arguments.done", item_id=item["id"], output_index=i,
                                   arguments=item["arguments"]),
                       self._event("response.output_item.done", output_index=i, item=item)]
        kind = "response.incomplete" if self.response.status == "incomplete" else "response.completed"
        return frames + [self._event(kind, response=self.response.snapshot())]

    def error(self, err) -> str:
        """A failure after the stream began (`err`: the APIError a client would have got)."""
        body = err.body()["error"]
        return self._event("error", code=body["code"], message=body["message"], param=body["param"])
