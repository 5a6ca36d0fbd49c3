"""Constrained decoding (structured outputs) with llguidance.

A request's `Guided` spec (a JSON schema, any JSON object, a regex, a list of choices or a Lark
grammar) becomes an llguidance grammar; every sequence that asks for one gets its own
`LLMatcher` on the attention rank that samples it. Each step, the matchers of the constrained
rows fill a packed token bitmask, which the sampler turns into -inf logits for the rows that
asked (unconstrained rows pay nothing); the matcher then consumes each sampled token as the
sequence's next chunk arrives, so its state follows the tokens even after a preemption (a
recomputed sequence replays them into a fresh matcher).

Why llguidance rather than xgrammar: every document it allows is valid JSON, where xgrammar's
JSON strings admit raw control characters (`python -m bench.grammar`; the README's table).

Off the step's critical path: the ingress converts and validates the spec once per distinct
spec (an LRU cache, on a worker thread; a bad one is a 400), and a rank builds a sequence's
matcher on a background thread as soon as the sequence's first chunk arrives, while the step's
forward pass runs; sampling waits only for what is not ready by then. Grammar texts are cached
per process.
"""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache

import torch

from moe_parallel.contract import Guided, InvalidRequest

KINDS = ("json", "json_object", "regex", "choice", "lark")
# compact JSON (no free whitespace): a model cannot wander off into endless blank space
JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarError(InvalidRequest):
    """The request's schema, regex, choices or grammar cannot be compiled."""


@lru_cache(maxsize=512)
def grammar_of(guided: Guided) -> str:
    """The llguidance grammar text of a spec (cached by spec). Raises GrammarError."""
    from llguidance import LLMatcher as m
    try:
        if guided.kind == "json":
            return m.grammar_from_json_schema(guided.spec, defaults=JSON_OPTIONS)
        if guided.kind == "json_object":
            return m.grammar_from_json_schema('{"type": "object"}', defaults=JSON_OPTIONS)
        if guided.kind == "regex":
            return m.grammar_from_regex(guided.spec)
        if guided.kind == "choice":
            choices = json.loads(guided.spec)
            return m.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
        if guided.kind == "lark":  # GBNF (llama.cpp's, rules written with ::=) is converted to Lark
            from llguidance.gbnf_to_lark import gbnf_to_lark

            spec = gbnf_to_lark(guided.spec) if "::=" in guided.spec else guided.spec
            return m.grammar_from_lark(spec)
    except Exception as exc:  # the converters raise their own types for a bad spec
        raise GrammarError(f"{guided.kind}: {exc}", param=_PARAM[guided.kind]) from None
    raise GrammarError(f"unknown kind of structured output {guided.kind!r}")


_PARAM = {"json": "response_format", "json_object": "response_format", "regex": "structured_outputs",
          "choice": "structured_outputs", "lark": "structured_outputs"}


class Grammars:
    """One tokenizer's view of grammars: validation (ingress) and matchers (attention ranks)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...] = ()):
        import llguidance
        import llguidance.hf

        self.ll = llguidance
        self.vocab_size = vocab_size
        eos = list(eos_token_ids) or None  # the model's end of sequence, which may not be the tokenizer's
        # The model's vocabulary may be padded past the tokenizer's: llguidance would give the
        # padding ids placeholder texts and allow them inside strings. Its vocabulary stops at
        # the tokenizer's; `unpack` disallows every id past it.
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=min(vocab_size, len(tokenizer)),
                                                      eos_token=eos)
        self._error = lru_cache(maxsize=512)(self._compile_error)  # per distinct spec, thread-safe

    def _compile_error(self, guided: Guided) -> str | None:
        try:
            is_error, messages = self.ll.LLMatcher.validate_grammar_with_warnings(grammar_of(guided), self.tokenizer)
        except GrammarError as exc:
            return str(exc)
        return " ".join(" ".join(messages).split())[:500] if is_error else None  # one line

    def check(self, guided: Guided) -> None:
        """Refuse a spec that does not compile for this tokenizer (GrammarError, a 400)."""
        error = self._error(guided)
        if error is not None:
            raise GrammarError(f"{_PARAM[guided.kind]}: the {guided.kind} cannot be compiled: {error}",
                               param=_PARAM[guided.kind])

    def matcher(self, guided: Guided):
        m = self.ll.LLMatcher(self.tokenizer, grammar_of(guided), log_level=0)
        if m.is_error():
            raise GrammarError(f"{guided.kind}: {m.get_error()}", param=_PARAM[guided.kind])
        return m


class GuidedRows:
    """The attention rank's matchers, one per constrained sequence, and their masks."""

    def __init__(self, tokenizer_dir: str, vocab_size: int, eos_token_ids: tuple[int, ...], device: torch.device):
        from transformers import AutoTokenizer

        self.grammars = Grammars(AutoTokenizer.from_pretrained(tokenizer_dir), vocab_size, eos_token_ids)
        self.vocab_size, self.device = vocab_size, device
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="grammar")
        self.pending: dict[int, Future] = {}  # seq id -> its matcher being built
        self.matchers: dict[int, tuple[object, int]] = {}  # seq id -> (matcher, output tokens consumed)

    def prepare(self, seq_id: int, guided: Guided) -> None:
        """Start building a sequence's matcher (on the background thread) if it has none."""
        if seq_id not in self.matchers and seq_id not in self.pending:
            self.pending[seq_id] = self.pool.submit(self.grammars.matcher, guided)

    def drop(self, seq_id: int) -> None:
        self.matchers.pop(seq_id, None)
        f = self.pending.pop(seq_id, None)
        if f is not None:
            f.cancel()

    def mask(self, seq_ids: list[int], guides: list[Guided], outputs: list[list[int]]) -> torch.Tensor:
        """[S, V] bool, True where a token is allowed, for these constrained rows; `outputs` are
        each sequence's generated tokens so far (the matcher consumes the ones it has not seen)."""
        # llguidance.torch's two helpers, inline: importing that module builds a torch.compile
        # kernel we do not use, which imports torch._dynamo: 0.8-1.6 s inside the first
        # constrained step, every sequence of the rank stalled with it
        bitmask = torch.full((len(seq_ids), (self.grammars.tokenizer.vocab_size + 31) // 32), -1,
                             dtype=torch.int32)  # bit j of word w: token 32w+j allowed
        for row, (seq_id, guided, out) in enumerate(zip(seq_ids, guides, outputs, strict=True)):
            m, seen = self._matcher(seq_id, guided)
            if len(out) > seen:
                if not m.consume_tokens(out[seen:]):
                    raise GrammarError(f"the output left the grammar: {m.get_error()}")
                self.matchers[seq_id] = (m, len(out))
            words = bitmask[row]
            m.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * words.element_size())
        return unpack(bitmask, self.grammars.tokenizer.vocab_size, self.vocab_size).to(self.device)

    def _matcher(self, seq_id: int, guided: Guided):
        if seq_id not in self.matchers:
            self.prepare(seq_id, guided)
            self.matchers[seq_id] = (self.pending.pop(seq_id).result(), 0)
        return self.matchers[seq_id]


_SHIFTS = torch.arange(32, dtype=torch.int32)


def unpack(bitmask: torch.Tensor, tokens: int, vocab_size: int) -> torch.Tensor:
    """A packed [S, ceil(tokens/32)] int32 bitmask (bit j of word w: token 32w+j) -> [S, V]
    bool; ids from `tokens` (the tokenizer's size) to V (the model's) are never allowed."""
    bits = (bitmask[:, :, None] >> _SHIFTS) & 1  # [S, W, 32]
    allowed = bits.view(bitmask.shape[0], -1).bool()[:, :tokens]
    if tokens < vocab_size:  # the model's vocabulary is padded past the tokenizer's
        pad = torch.zeros(allowed.shape[0], vocab_size - tokens, dtype=torch.bool)
        allowed = torch.cat([allowed, pad], 1)
    return allowed
