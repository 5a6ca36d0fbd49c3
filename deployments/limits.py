"""The bounds every request is held to at the edge (`limits:` in the app args).

A request over any of them gets a 400 naming the field (413 for the body), before it costs the
engine anything. The defaults leave every ordinary OpenAI or vLLM client untouched; README's
"Limits" table lists them.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

MIB = 1024**2


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_body_bytes: int = Field(default=8 * MIB, ge=1024, description="request body size (413 above it)")
    max_prompts: int = Field(default=64, ge=1, description="prompts in one /v1/completions request")
    max_messages: int = Field(default=1024, ge=1, description="messages in one chat request")
    max_n: int = Field(default=16, ge=1, description="completions per prompt (n, best_of)")
    max_stop_sequences: int = Field(default=16, ge=0, description="stop strings")
    max_stop_length: int = Field(default=256, ge=1, description="characters in one stop string")
    max_stop_token_ids: int = Field(default=64, ge=0, description="stop_token_ids")
    max_logit_bias: int = Field(default=300, ge=0, description="logit_bias entries")
    max_logprobs: int = Field(default=20, ge=0, le=20, description="logprobs / top_logprobs")
    max_tools: int = Field(default=128, ge=0, description="tools in one chat request")
    max_bad_words: int = Field(default=64, ge=0, description="bad_words")
    max_choices: int = Field(default=256, ge=1, description="structured_outputs choices")
