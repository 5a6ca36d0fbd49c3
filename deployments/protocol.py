"""OpenAI request bodies (pydantic, at the HTTP boundary) and their translation to the engine.

Field names, defaults and ranges follow the OpenAI API, with vLLM's extras (`top_k`, `min_p`,
`ignore_eos`, `min_tokens`, `repetition_penalty`, `return_tokens_as_token_ids`, ...).
Unknown fields are refused (a 400 naming the field) rather than ignored: a client that sends
`tools` or `response_format` must not get unconstrained text back as if they were honoured.
Counts and lengths are bounded by the app's `Limits` and token ids by the vocabulary, both
passed as pydantic's validation context (`{"limits": Limits, "vocab": int}`); invalid values
raise a `ValidationError` that the ingress turns into a 400 naming the parameter.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from deployments.limits import Limits
from moe_parallel.sampling_params import SamplingParams


def _limits(info: ValidationInfo) -> Limits:
    return (info.context or {}).get("limits") or Limits()


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


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None  # OpenAI's participant name: accepted, not shown to the model

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


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

    def sampling(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        return SamplingParams(
            n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            seed=self.seed, presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, max_tokens=max_tokens, min_tokens=self.min_tokens,
            stop=self.stops, stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos,
            logprobs=logprobs, include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            logit_bias=tuple((int(k), float(b)) for k, b in (self.logit_bias or {}).items()))


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
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
        if v is not None and v > _limits(info).max_logprobs:
            raise ValueError(f"must be at most {_limits(info).max_logprobs}")
        return v

    def to_sampling(self) -> SamplingParams:
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self.sampling(limit, (self.top_logprobs or 0) if self.logprobs else None)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
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
        if v is not None and v > _limits(info).max_logprobs:
            raise ValueError(f"must be at most {_limits(info).max_logprobs}")
        return v

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

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)

    def to_sampling(self) -> SamplingParams:
        return self.sampling(self.max_tokens, self.logprobs)
