"""Engine outputs -> OpenAI response objects (whole responses and stream chunks)."""

from __future__ import annotations

import json
import time

from engine.outputs import TokenLogprob


class TokenText:
    """How a token id is written in logprobs: its text, or `token_id:N` when asked."""

    def __init__(self, tokenizer, as_ids: bool):
        self.tokenizer, self.as_ids = tokenizer, as_ids

    def __call__(self, token_id: int) -> str:
        if self.as_ids:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


FLOOR = -9999.0  # JSON has no -inf: an impossible token's logprob is written as this (vLLM's choice)


def finite(logprob: float) -> float:
    return logprob if logprob >= FLOOR else FLOOR  # also maps NaN to the floor


def chat_logprobs(items: list[TokenLogprob], text_of: TokenText) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        s = text_of(token_id)
        return {"token": s, "logprob": finite(logprob), "bytes": list(s.encode("utf-8"))}

    return {"content": [entry(lp.token_id, lp.logprob) | {"top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in items]}


def completion_logprobs(items: list[TokenLogprob], text_of: TokenText, offset: int) -> dict:
    tokens = [text_of(lp.token_id) for lp in items]
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": [finite(lp.logprob) for lp in items],
            "top_logprobs": [{text_of(t): finite(v) for t, v in lp.top} for lp in items], "text_offset": offsets}


def echo_text(tokenizer, ids: list[int]) -> tuple[str, list[int]]:
    """The prompt as echoed (special tokens left out) and each token's offset in it: the text
    is built token by token, so every offset points where that token's text begins."""
    from engine.detokenizer import IncrementalDetokenizer

    detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True)
    text, offsets = "", []
    for t in ids:
        offsets.append(len(text))
        text += detok.add(t)
    return text, offsets


def prompt_entries(ids: list[int], entries, text_of: TokenText, offsets: list[int]) -> dict:
    """The prompt's part of a completion's `logprobs` with echo: the first token has none; each
    other has its logprob and, in `top_logprobs`, itself and the best alternatives."""
    top = [None] + [{text_of(e.token_id): finite(e.logprob)} | {text_of(t): finite(v) for t, v in e.top}
                    for e in entries[1:]]
    return {"tokens": [text_of(t) for t in ids], "token_logprobs": [None] + [finite(e.logprob) for e in entries[1:]],
            "top_logprobs": top, "text_offset": list(offsets)}


def join_logprobs(a: dict, b: dict) -> dict:
    return {k: a[k] + b[k] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


def vllm_prompt_logprobs(entries, text_of: TokenText) -> list:
    """vLLM's `prompt_logprobs`: per prompt token, None for the first, else {token id: {logprob,
    rank, decoded_token}} for the token itself and its best alternatives."""
    out = [None]
    for e in entries[1:]:
        d = {str(e.token_id): {"logprob": finite(e.logprob), "rank": e.rank, "decoded_token": text_of(e.token_id)}}
        for r, (t, v) in enumerate(e.top, start=1):
            d.setdefault(str(t), {"logprob": finite(v), "rank": r, "decoded_token": text_of(t)})
        out.append(d)
    return out


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def envelope(rid: str, obj: str, model: str, created: int | None = None) -> dict:
    return {"id": rid, "object": obj, "created": created or int(time.time()), "model": model}


def sse(payload: dict) -> str:
    # ASCII-only JSON: a raw U+2028, U+0085 or other Unicode line break inside the text would
    # end the `data:` line for clients that split lines the way str.splitlines does
    return f"data: {json.dumps(payload)}\n\n"


DONE = "data: [DONE]\n\n"
