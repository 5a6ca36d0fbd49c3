"""OpenAI request bodies (pydantic, at the HTTP boundary) and their translation to the engine.

Field names, defaults and ranges follow the OpenAI API, with vLLM's extras (`top_k`, `min_p`,
`ignore_eos`, `min_tokens`, `repetition_penalty`, `return_tokens_as_token_ids`, ...).
Structured outputs (`response_format`, vLLM's `structured_outputs`), tools and `bad_words` are
honoured (see `moe_parallel/sampling/guided.py`, `deployments/tools.py`); unknown fields are refused (a
400 naming the field) rather than ignored, so nothing a client asks for is silently dropped.
Counts and lengths are bounded by the app's `Limits` and token ids by the vocabulary, both
passed as pydantic's validation context (`{"limits": Limits, "vocab": int}`); invalid values
raise a `ValidationError` that the ingress turns into a 400 naming the parameter.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from deployments.limits import Limits
from moe_parallel.contract import Guided, SamplingParams


def _limits(info: ValidationInfo) -> Limits:
    return (info.context or {}).get("limits") or Limits()


def _within_max_logprobs(v, info: ValidationInfo):
    if v is not None and v > _limits(info).max_logprobs:
        raise ValueError(f"must be at most {_limits(info).max_logprobs}")
    return v


def _format_constrains(info: ValidationInfo) -> bool:
    """Whether the request's response_format (validated before the field at hand) asks for JSON."""
    fmt = info.data.get("response_format")
    return fmt is not None and fmt.type != "text"


def _check_ids(ids, info: ValidationInfo) -> None:
    vocab = (info.context or {}).get("vocab")
    if vocab is not None:
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab})")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None  # OpenAI's participant name: accepted, not shown to the model
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool result: which call it answers
    refusal: str | None = None  # echoed back by some clients with an assistant turn; not shown to the model

    @model_validator(mode="after")
    def _roles(self):
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        if self.tool_call_id and self.role != "tool":
            raise ValueError("only tool messages carry a tool_call_id")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class FunctionDef(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict | None = None  # a JSON schema of the arguments (none: no arguments)
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class ToolChoiceFunction(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    json_schema: dict | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object")
        return self


class StructuredOutputs(_Strict):
    """vLLM's structured_outputs: exactly one of json, regex, choice, grammar, json_object."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    json_spec: dict | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # Lark, or GBNF (rules written with ::=)
    json_object: bool | None = None

    @model_validator(mode="after")
    def _one(self):
        given = [k for k in ("json_spec", "regex", "choice", "grammar", "json_object") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar, json_object")
        if self.choice is not None and (not self.choice or any(not c for c in self.choice)):
            raise ValueError("choice must be a list of non-empty strings")
        return self


class _Common(_Strict):
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    user: str | None = None  # OpenAI's end-user id: accepted, not used
    logit_bias: dict[str, float] | None = None
    # vLLM's extras
    top_k: int = Field(default=0, ge=-1)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=20.0)
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    return_tokens_as_token_ids: bool = False
    prompt_logprobs: int | None = Field(default=None, ge=0)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    bad_words: list[str] | None = None

    @field_validator("bad_words")
    @classmethod
    def _bad_words(cls, v, info: ValidationInfo):
        if v is not None:
            if len(v) > _limits(info).max_bad_words:
                raise ValueError(f"at most {_limits(info).max_bad_words} bad words are allowed")
            if any(not w.strip() for w in v):
                raise ValueError("bad words must not be empty")
        return v

    @field_validator("structured_outputs")
    @classmethod
    def _structured(cls, v, info: ValidationInfo):
        if v is not None and v.choice is not None and len(v.choice) > _limits(info).max_choices:
            raise ValueError(f"at most {_limits(info).max_choices} choices are allowed")
        if v is not None and _format_constrains(info):
            raise ValueError("give response_format or structured_outputs, not both")
        return v

    def guided(self) -> Guided | None:
        """The constraint the request puts on its output, if any."""
        f, so = self.response_format, self.structured_outputs
        if f is not None and f.type == "json_object":
            return Guided("json_object", "")
        if f is not None and f.type == "json_schema":
            return Guided("json", json.dumps(f.json_schema.json_schema or {}, sort_keys=True))
        if so is None:
            return None
        if so.json_spec is not None:
            spec = so.json_spec if isinstance(so.json_spec, str) else json.dumps(so.json_spec, sort_keys=True)
            return Guided("json", spec)
        if so.regex is not None:
            return Guided("regex", so.regex)
        if so.choice is not None:
            return Guided("choice", json.dumps(so.choice))
        if so.grammar is not None:
            return Guided("lark", so.grammar)
        return Guided("json_object", "")

    @field_validator("prompt_logprobs")
    @classmethod
    def _prompt_logprobs(cls, v, info: ValidationInfo):
        return _within_max_logprobs(v, info)

    @field_validator("n")
    @classmethod
    def _n(cls, v, info: ValidationInfo):
        if v > _limits(info).max_n:
            raise ValueError(f"at most {_limits(info).max_n} completions per prompt")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v, info: ValidationInfo):
        limits, stops = _limits(info), [v] if isinstance(v, str) else (v or [])
        if len(stops) > limits.max_stop_sequences:
            raise ValueError(f"at most {limits.max_stop_sequences} stop sequences are allowed")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        if any(len(s) > limits.max_stop_length for s in stops):
            raise ValueError(f"stop sequences may be at most {limits.max_stop_length} characters long")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, v, info: ValidationInfo):
        if v is not None:
            if len(v) > _limits(info).max_stop_token_ids:
                raise ValueError(f"at most {_limits(info).max_stop_token_ids} stop token ids are allowed")
            _check_ids(v, info)
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v, info: ValidationInfo):
        if v is None:
            return v
        if len(v) > _limits(info).max_logit_bias:
            raise ValueError(f"at most {_limits(info).max_logit_bias} entries are allowed")
        ids = []
        for key, bias in v.items():
            if not key.strip().lstrip("-").isdigit():
                raise ValueError(f"keys must be token ids, got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"biases must be between -100 and 100, got {bias}")
            ids.append(int(key))
        _check_ids(ids, info)
        return v

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def sampling(self, max_tokens: int | None, logprobs: int | None,
                 prompt_logprobs: int | None = None) -> SamplingParams:
        return SamplingParams(
            n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            seed=self.seed, presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, max_tokens=max_tokens, min_tokens=self.min_tokens,
            stop=self.stops, stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos,
            logprobs=logprobs, include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            logit_bias=tuple((int(k), float(b)) for k, b in (self.logit_bias or {}).items()),
            prompt_logprobs=prompt_logprobs)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None
    parallel_tool_calls: bool = True

    @field_validator("tools")
    @classmethod
    def _tools(cls, v, info: ValidationInfo):
        if v is not None:
            if len(v) > _limits(info).max_tools:
                raise ValueError(f"at most {_limits(info).max_tools} tools are allowed")
            names = [t.function.name for t in v]
            if len(set(names)) != len(names):
                raise ValueError("tool function names must be unique")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v, info: ValidationInfo):
        tools = info.data.get("tools") or []
        if isinstance(v, ToolChoiceFunction) and v.function.name not in {t.function.name for t in tools}:
            raise ValueError(f"the function {v.function.name!r} is not among the request's tools")
        if v in ("required",) and not tools:
            raise ValueError("'required' needs tools")
        if v not in (None, "none") and (_format_constrains(info) or info.data.get("structured_outputs") is not None):
            raise ValueError("tool calls cannot be combined with response_format or structured_outputs")
        return v
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @field_validator("messages")
    @classmethod
    def _messages(cls, v, info: ValidationInfo):
        if len(v) > _limits(info).max_messages:
            raise ValueError(f"at most {_limits(info).max_messages} messages are allowed")
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, v, info: ValidationInfo):
        if v and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return _within_max_logprobs(v, info)

    def to_sampling(self) -> SamplingParams:
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self.sampling(limit, (self.top_logprobs or 0) if self.logprobs else None, self.prompt_logprobs)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    max_tokens: int | None = Field(default=16, ge=0)  # 0: a scoring call (echo with logprobs); after echo,
    # so that its check sees both
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v, info: ValidationInfo):
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        if isinstance(v, list) and any(isinstance(p, list) and not p for p in v):
            raise ValueError("token-id prompts must not be empty")
        nested = isinstance(v, list) and v and not isinstance(v[0], int)
        if nested and len(v) > _limits(info).max_prompts:
            raise ValueError(f"at most {_limits(info).max_prompts} prompts per request")
        if isinstance(v, list):
            _check_ids([t for p in v for t in (p if isinstance(p, list) else [p] if isinstance(p, int) else [])],
                       info)
        return v

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v, info: ValidationInfo):
        return _within_max_logprobs(v, info)

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v):
        if v is not None:
            raise ValueError("suffix is not supported by this model")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v, info):
        if v is not None and v != info.data.get("n", 1):
            raise ValueError("best_of other than n is not supported")
        return v

    @field_validator("max_tokens")
    @classmethod
    def _scoring(cls, v, info: ValidationInfo):
        d = info.data
        if v == 0 and not ((d.get("echo") and d.get("logprobs") is not None) or d.get("prompt_logprobs") is not None):
            raise ValueError("0 is only for a scoring call, which needs echo with logprobs (or prompt_logprobs)")
        return v

    @property
    def scores_prompt(self) -> bool:
        return (self.echo and self.logprobs is not None) or self.prompt_logprobs is not None

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)

    def to_sampling(self) -> SamplingParams:
        wanted = [k for k in (self.logprobs if self.echo else None, self.prompt_logprobs) if k is not None]
        return self.sampling(self.max_tokens, self.logprobs, max(wanted) if wanted else None)


# -- OpenAI's Responses API (POST /v1/responses), answered through the chat path ------------------


class InputText(_Strict):
    type: Literal["input_text", "output_text"]  # output_text: an earlier assistant turn sent back
    text: str
    annotations: list | None = None  # on output_text parts a client echoes back; not shown to the model
    logprobs: list | None = None


class _Item(_Strict):
    id: str | None = None  # set on an earlier output item that a client sends back
    status: str | None = None


class InputMessage(_Item):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(_Item):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(_Item):
    type: Literal["function_call_output"]
    call_id: str
    output: str


class ResponsesTool(_Strict):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class ResponsesToolChoice(_Strict):
    type: Literal["function"]
    name: str


class TextFormat(_Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(default=None, min_length=1, max_length=64)
    description: str | None = None
    json_schema: dict | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema(self):
        if self.type == "json_schema" and (self.json_schema is None or self.name is None):
            raise ValueError("type json_schema needs a name and a schema")
        return self


class TextConfig(_Strict):
    format: TextFormat | None = None


class ResponsesRequest(_Strict):
    """The fields of `client.responses.create` this server answers; a stateless server, so
    `store` and `previous_response_id` are refused naming the field rather than ignored."""

    model: str
    input: str | list[InputMessage | FunctionCallItem | FunctionCallOutputItem]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    text: TextConfig | None = None
    tools: list[ResponsesTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ResponsesToolChoice | None = None
    parallel_tool_calls: bool = True
    store: bool | None = None
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    truncation: Literal["disabled"] | None = None

    @field_validator("input")
    @classmethod
    def _input(cls, v):
        if (isinstance(v, str) and not v) or (isinstance(v, list) and not v):
            raise ValueError("input must not be empty")
        return v

    @field_validator("store")
    @classmethod
    def _store(cls, v):
        if v:
            raise ValueError("this server keeps no responses: send store=false or leave it out")
        return v

    @field_validator("previous_response_id")
    @classmethod
    def _previous(cls, v):
        if v is not None:
            raise ValueError("this server keeps no responses to continue from: send the whole "
                             "conversation as input")
        return v

    def chat_fields(self, system_role: bool = True) -> dict:
        """The same request as a chat completion's fields (validated as one by the caller).
        `instructions` become the system turn; where the chat template has no system role
        (Mixtral's), they and any leading system or developer items open the first user turn
        instead, separated by a blank line, as Mistral's own templates place a system prompt."""
        messages: list[dict] = []
        if self.instructions:
            messages.append({"role": "system", "content": self.instructions})
        items = [InputMessage(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        if not system_role:
            items = list(items)
            while items and isinstance(items[0], InputMessage) and items[0].role in ("system", "developer"):
                messages.append({"role": "system", "content": items.pop(0).text()})
            system = "\n\n".join(m["content"] for m in messages)
            messages = []
            if system:
                if items and isinstance(items[0], InputMessage) and items[0].role == "user":
                    first = items.pop(0)
                    messages.append({"role": "user", "content": f"{system}\n\n{first.text()}"})
                else:
                    messages.append({"role": "user", "content": system})
        for item in items:
            if isinstance(item, InputMessage):
                messages.append({"role": item.role, "content": item.text()})
            elif isinstance(item, FunctionCallItem):
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}}
                last = messages[-1] if messages else None
                if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                    last["tool_calls"].append(call)  # parallel calls of one turn
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            else:
                messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        fields = {"model": self.model, "messages": messages, "temperature": self.temperature, "top_p": self.top_p,
                  "stream": self.stream, "parallel_tool_calls": self.parallel_tool_calls, "user": self.user}
        if self.max_output_tokens is not None:
            fields["max_tokens"] = self.max_output_tokens
        fmt = self.text.format if self.text is not None else None
        if fmt is not None and fmt.type == "json_schema":
            fields["response_format"] = {"type": "json_schema", "json_schema": {
                "name": fmt.name, "description": fmt.description, "schema": fmt.json_schema, "strict": fmt.strict}}
        elif fmt is not None:
            fields["response_format"] = {"type": fmt.type}
        if self.tools:
            fields["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                               for t in self.tools]
        if isinstance(self.tool_choice, ResponsesToolChoice):
            fields["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice.name}}
        elif self.tool_choice is not None:
            fields["tool_choice"] = self.tool_choice
        return fields


# the chat request's names for what a Responses request calls otherwise (errors name the latter)
RESPONSES_PARAMS = {"messages": "input", "max_tokens": "max_output_tokens", "response_format": "text.format"}


# -- vLLM's /tokenize and /detokenize ------------------------------------------------------------


class TokenizeCompletion(_Strict):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChat(_Strict):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool = False
    tools: list[Tool] | None = None

    @model_validator(mode="after")
    def _one_ending(self):
        if self.add_generation_prompt and self.continue_final_message:
            raise ValueError("add_generation_prompt and continue_final_message cannot both be true")
        return self


class Detokenize(_Strict):
    model: str | None = None
    tokens: list[int]

    @field_validator("tokens")
    @classmethod
    def _tokens(cls, v, info: ValidationInfo):
        _check_ids(v, info)
        return v
