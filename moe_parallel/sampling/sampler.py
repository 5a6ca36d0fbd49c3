"""Sampling on the attention rank, on the logits' device: logits in, one token per sequence out.

Runs where the logits are, so only token ids (and the requested logprobs) cross to the host:
the `[B, V]` logits never do. Per sequence it keeps the tokens it has seen (for penalties).
Random draws are counter-based: the uniform number for the token at position p of a
sequence is a hash of (the sequence's seed, p), computed on the host and sent to the device
with the step's other per-row parameters. So a seeded request draws the same numbers whatever
shares its batch, on any device, and again after a preemption recomputes it; there is no
generator state to keep, move or lose.

Order of operations, as in vLLM: penalties (repetition on prompt and output, presence and
frequency on output) -> logit_bias -> min_tokens (stop ids masked) -> greedy argmax, or temperature ->
top-k -> top-p (over the top-k renormalised) -> min-p -> one inverse-CDF draw. Rows pay only
for what they ask: no sort where top-k and top-p are off, a `topk` (not a sort) where only
top-k is on, a full sort only for top-p. Logprobs are those of the raw model distribution.

Shapes: B sequences sampled this step, V vocabulary, S rows of one sampling path.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from moe_parallel.contract import SampleOutput, SamplingParams, SeqChunk
from moe_parallel.runtime.staging import Staging
from moe_parallel.sampling.guided import GrammarError, GuidedRows


@dataclass
class _SeqState:
    seed: int
    tokens: list[int] = field(default_factory=list)


def uniform(seed: int, position: int) -> float:
    """A uniform number in [0, 1) from (seed, position): the same on every host and device."""
    digest = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 11) / float(1 << 53)


class Sampler:
    def __init__(self, eos_token_ids: tuple[int, ...], device: torch.device | str = "cpu",
                 tokenizer_dir: str | None = None, vocab_size: int | None = None):
        self.eos = eos_token_ids
        self.device = torch.device(device)
        self.states: dict[int, _SeqState] = {}
        self.tokenizer_dir, self.vocab_size = tokenizer_dir, vocab_size
        self.guided: GuidedRows | None = None  # made on the first constrained request
        self.staging = Staging(self.device)  # per-row parameters reach the device without a wait

    def drop(self, seq_ids: tuple[int, ...]) -> None:
        for s in seq_ids:
            self.states.pop(s, None)
            if self.guided is not None:
                self.guided.drop(s)

    def prepare(self, chunks) -> list[SampleOutput]:
        """Start building the grammar matchers of constrained sequences new to this rank; a
        sequence whose grammar cannot be used fails here (the others run)."""
        failed = []
        for c in chunks:
            if c.guided is None:
                continue
            try:
                if self.guided is None:
                    if self.tokenizer_dir is None:
                        raise GrammarError("this model instance has no tokenizer for structured outputs")
                    self.guided = GuidedRows(self.tokenizer_dir, self.vocab_size, self.eos, self.device)
                self.guided.prepare(c.seq_id, c.guided)
            except Exception as exc:
                failed.append(SampleOutput(c.seq_id, -1, error=f"{type(exc).__name__}: {exc}"))
        return failed

    def observe(self, chunk: SeqChunk) -> None:
        """Record the chunk's tokens (each position once). A chunk from position 0 starts the
        sequence's state afresh (a preempted sequence rerunning, or an id this rank last saw
        from another engine): its tokens and grammar state are rebuilt from what it sends."""
        state = self.states.get(chunk.seq_id)
        if state is None or chunk.start == 0 or chunk.history is not None:
            state = self.states[chunk.seq_id] = _SeqState(chunk.seed, list(chunk.history or ()))
            if self.guided is not None:
                self.guided.drop(chunk.seq_id)
        known = len(state.tokens)
        if chunk.end > known:
            state.tokens.extend(chunk.token_ids[known - chunk.start:])

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, chunks: list[SeqChunk]) -> list[SampleOutput]:
        logits = logits.float()  # [B, V]
        self.staging.reset()
        params = [c.sampling for c in chunks]
        x = logits
        if any(p.has_penalties or p.min_tokens or p.logit_bias or p.bad_words or p.guided
               for p in params):  # only then are logits edited
            x = self._penalise(logits.clone(), chunks)
            self._bias(x, chunks)
            self._ban_words(x, chunks)
            self._mask_early_stop(x, chunks)
            self._constrain(x, chunks)
        tokens = self._choose(x, chunks)  # [B] on the device
        wanted = [p.logprobs for p in params if p.logprobs is not None]
        if not wanted:
            return [SampleOutput(c.seq_id, t) for c, t in zip(chunks, tokens.tolist(), strict=True)]
        return self._with_logprobs(logits, tokens, chunks, max(wanted))

    # -- logits edits -------------------------------------------------------------------------

    def _penalise(self, x: torch.Tensor, chunks: list[SeqChunk]) -> torch.Tensor:
        rows = [i for i, c in enumerate(chunks) if c.sampling.has_penalties]
        if not rows:
            return x
        ps = [chunks[i].sampling for i in rows]
        seen = [self.states[chunks[i].seq_id].tokens for i in rows]
        out = self._counts([s[chunks[i].prompt_len:] for i, s in zip(rows, seen, strict=True)], x.shape[1])
        prompt = self._counts([s[: chunks[i].prompt_len] for i, s in zip(rows, seen, strict=True)], x.shape[1])
        index = self._index(rows)
        xs = x.index_select(0, index)  # [S, V]
        rep = self._column([p.repetition_penalty for p in ps])
        used = (out > 0) | (prompt > 0)
        xs = torch.where(used, torch.where(xs > 0, xs / rep, xs * rep), xs)
        xs -= self._column([p.frequency_penalty for p in ps]) * out
        xs -= self._column([p.presence_penalty for p in ps]) * (out > 0)
        x[index] = xs
        return x

    def _counts(self, token_lists: list[list[int]], vocab: int) -> torch.Tensor:
        """[S, V] occurrence counts of each row's tokens (padding goes to a dropped extra column)."""
        width = max((len(t) for t in token_lists), default=0)
        ids = self.staging.put([i for t in token_lists for i in t + [vocab] * (width - len(t))],
                               torch.int64).view(len(token_lists), width)
        counts = torch.zeros(len(token_lists), vocab + 1, dtype=torch.float32, device=self.device)
        counts.scatter_add_(1, ids, torch.ones(ids.shape, dtype=torch.float32, device=self.device))
        return counts[:, :vocab]

    def _bias(self, x: torch.Tensor, chunks: list[SeqChunk]) -> None:
        rows, cols, values = [], [], []
        for i, c in enumerate(chunks):
            for token, bias in c.sampling.logit_bias:
                if 0 <= token < x.shape[1]:  # validated upstream; never index out
                    rows.append(i)
                    cols.append(token)
                    values.append(bias)
        if rows:
            index = self.staging.put(rows + cols, torch.int64).view(2, -1)
            x.index_put_((index[0], index[1]), self.staging.put(values, x.dtype), accumulate=True)

    def _mask_early_stop(self, x: torch.Tensor, chunks: list[SeqChunk]) -> None:
        rows, cols = [], []
        for i, c in enumerate(chunks):
            if len(self.states[c.seq_id].tokens) - c.prompt_len < c.sampling.min_tokens:
                stop = set(c.sampling.stop_token_ids) | (set() if c.sampling.ignore_eos else set(self.eos))
                ids = [t for t in sorted(stop) if 0 <= t < x.shape[1]]  # validated upstream; never index out
                rows += [i] * len(ids)
                cols += ids
        if rows:
            index = self.staging.put(rows + cols, torch.int64).view(2, -1)
            x[index[0], index[1]] = float("-inf")

    def _ban_words(self, x: torch.Tensor, chunks: list[SeqChunk]) -> None:
        """vLLM's bad_words: the last token of a banned sequence is masked where the output so
        far ends with the rest of it."""
        rows, cols = [], []
        for i, c in enumerate(chunks):
            if not c.sampling.bad_words:
                continue
            out = self.states[c.seq_id].tokens[c.prompt_len:]
            for word in c.sampling.bad_words:
                head = list(word[:-1])
                if len(out) >= len(head) and (not head or out[len(out) - len(head):] == head):
                    rows.append(i)
                    cols.append(word[-1])
        if rows:
            index = self.staging.put(rows + cols, torch.int64).view(2, -1)
            x[index[0], index[1]] = float("-inf")

    def _constrain(self, x: torch.Tensor, chunks: list[SeqChunk]) -> None:
        """Structured outputs: tokens the grammar does not allow next get -inf, in the rows that
        asked only. Should nothing be left (min_tokens hiding the end the grammar needs), the
        grammar wins: the end of sequence is allowed."""
        rows = [i for i, c in enumerate(chunks) if c.sampling.guided is not None]
        if not rows:
            return
        if self.guided is None:
            self.prepare([chunks[i] for i in rows])
        allowed = self.guided.mask([chunks[i].seq_id for i in rows], [chunks[i].sampling.guided for i in rows],
                                   [self.states[chunks[i].seq_id].tokens[chunks[i].prompt_len:] for i in rows])
        index = self._index(rows)
        xs = x[index].masked_fill(~allowed, float("-inf"))
        stuck = torch.isneginf(xs).all(-1)
        if bool(stuck.any()) and self.eos:
            xs[stuck, self.eos[0]] = 0.0
        x[index] = xs

    # -- choosing -----------------------------------------------------------------------------

    def _choose(self, x: torch.Tensor, chunks: list[SeqChunk]) -> torch.Tensor:
        # [B]; greedy rows keep this. `max(dim).indices` is argmax's answer (the first of equal
        # maxima, a NaN wins) at 0.5 ms for [64, 32000] on two threads, where argmax takes 1.3
        tokens = x.max(dim=-1).indices
        vocab = x.shape[1]
        paths: dict[str, list[int]] = {"plain": [], "top_k": [], "sorted": []}
        for i, c in enumerate(chunks):
            p = c.sampling
            if not p.greedy:
                paths[_path(p, vocab)].append(i)
        for path, rows in paths.items():
            if rows:
                index = self._index(rows)
                picked = getattr(self, f"_sample_{path}")(x.index_select(0, index), [chunks[i] for i in rows])
                tokens[index] = picked
        return tokens

    def _sample_plain(self, x: torch.Tensor, chunks: list[SeqChunk]) -> torch.Tensor:
        """Temperature and min-p only: the draw runs over the vocabulary in id order, no sort."""
        probs = torch.softmax(x / self._temperatures(chunks), dim=-1)  # [S, V]
        probs = self._min_p(probs, probs.amax(dim=-1, keepdim=True), chunks)
        return self._draw(probs, chunks)

    def _sample_top_k(self, x: torch.Tensor, chunks: list[SeqChunk]) -> torch.Tensor:
        """Top-k without top-p: `topk` of the largest k in the group, each row masked to its own k."""
        k = self.staging.put([c.sampling.top_k for c in chunks], torch.int64)[:, None]
        values, index = torch.topk(x, max(c.sampling.top_k for c in chunks), dim=-1)  # [S, k_max] descending
        ranks = torch.arange(values.shape[1], device=self.device)[None, :]
        values = values.masked_fill(ranks >= k, float("-inf"))
        probs = torch.softmax(values / self._temperatures(chunks), dim=-1)
        probs = self._min_p(probs, probs[:, :1], chunks)
        return index.gather(1, self._draw(probs, chunks)[:, None]).squeeze(1)

    def _sample_sorted(self, x: torch.Tensor, chunks: list[SeqChunk]) -> torch.Tensor:
        """Top-p (with or without top-k): one descending sort per row."""
        values, index = torch.sort(x / self._temperatures(chunks), dim=-1, descending=True)  # [S, V]
        ranks = torch.arange(values.shape[1], device=self.device)[None, :]
        k = self.staging.put([_top_k(c.sampling, x.shape[1]) for c in chunks], torch.int64)[:, None]
        probs = torch.softmax(values.masked_fill(ranks >= k, float("-inf")), dim=-1)
        top_p = self._column([c.sampling.top_p for c in chunks])
        drop = (probs.cumsum(-1) - probs) > top_p
        drop[:, 0] = False  # the most likely token always survives
        probs = self._min_p(probs.masked_fill(drop, 0.0), probs[:, :1], chunks)
        return index.gather(1, self._draw(probs, chunks)[:, None]).squeeze(1)

    def _min_p(self, probs: torch.Tensor, top: torch.Tensor, chunks: list[SeqChunk]) -> torch.Tensor:
        if not any(c.sampling.min_p for c in chunks):
            return probs
        keep = probs >= self._column([c.sampling.min_p for c in chunks]) * top
        return probs * keep  # the most likely token always passes (min_p <= 1)

    def _draw(self, probs: torch.Tensor, chunks: list[SeqChunk]) -> torch.Tensor:
        """One inverse-CDF draw per row from unnormalised probabilities [S, N] -> column index [S]."""
        # float64: u < 1 stays strictly below the total, so the pick is always a column of
        # positive probability (in float32 a u within 2^-25 of 1 would round to the total)
        cdf = probs.double().cumsum(-1)  # [S, N]
        u = self.staging.put([uniform(self.states[c.seq_id].seed, len(self.states[c.seq_id].tokens))
                              for c in chunks], torch.float64)[:, None]
        pick = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # first column whose CDF passes u
        return pick.squeeze(1).clamp(max=probs.shape[1] - 1)

    # -- outputs ------------------------------------------------------------------------------

    def _with_logprobs(self, logits: torch.Tensor, tokens: torch.Tensor, chunks: list[SeqChunk],
                       n: int) -> list[SampleOutput]:
        raw = torch.log_softmax(logits, dim=-1)  # [B, V]
        chosen = raw.gather(1, tokens[:, None])  # [B, 1]
        top_values, top_ids = torch.topk(raw, n, dim=-1) if n else (chosen[:, :0], tokens[:, None][:, :0])
        host = torch.cat([tokens[:, None].double(), chosen.double(), top_ids.double(), top_values.double()], 1)
        outs = []
        for c, row in zip(chunks, host.tolist(), strict=True):
            token, logprob, ids, values = int(row[0]), row[1], row[2:2 + n], row[2 + n:]
            k = c.sampling.logprobs
            if k is None:
                outs.append(SampleOutput(c.seq_id, token))
                continue
            alts = tuple((int(i), v) for i, v in zip(ids[:k], values[:k], strict=True))
            outs.append(SampleOutput(c.seq_id, token, logprob, alts))
        return outs

    def _column(self, values: list[float]) -> torch.Tensor:
        return self.staging.put(values, torch.float32)[:, None]  # [S, 1]

    def _temperatures(self, chunks: list[SeqChunk]) -> torch.Tensor:
        return self._column([c.sampling.temperature for c in chunks])

    def _index(self, rows: list[int]) -> torch.Tensor:
        return self.staging.put(rows, torch.int64)


@torch.inference_mode()
def score_prompts(logits: torch.Tensor, chunks: list[SeqChunk]) -> list[SampleOutput]:
    """Prompt logprobs from the logits of the chunks' scored positions [P, V] (chunk by chunk):
    each prompt token's log-probability under the raw model, its rank among the vocabulary
    (1 = most likely) and the chunk's N most likely alternatives."""
    device = logits.device
    raw = torch.log_softmax(logits.float(), dim=-1)  # [P, V]
    targets = torch.tensor([t for c in chunks for t in c.score_targets()], dtype=torch.int64, device=device)
    chosen = raw.gather(1, targets[:, None])  # [P, 1]
    ranks = (raw > chosen).sum(-1, keepdim=True) + 1
    n = max(c.prompt_logprobs for c in chunks)
    top_values, top_ids = torch.topk(raw, n, dim=-1) if n else (chosen[:, :0], targets[:, None][:, :0])
    host = torch.cat([targets[:, None].double(), chosen.double(), ranks.double(), top_ids.double(),
                      top_values.double()], 1).tolist()
    outs, at = [], 0
    for c in chunks:
        k, entries = c.prompt_logprobs, []
        for row in host[at:at + c.scored]:
            alts = tuple((int(i), v) for i, v in zip(row[3:3 + k], row[3 + n:3 + n + k], strict=True))
            entries.append((int(row[0]), row[1], int(row[2]), alts))
        at += c.scored
        outs.append(SampleOutput(c.seq_id, -1, prompt_logprobs=tuple(entries), prompt_start=c.start + 1,
                                 sampled=False))
    return outs


def _top_k(p: SamplingParams, vocab: int) -> int:
    return p.top_k if 0 < p.top_k < vocab else vocab


def _path(p: SamplingParams, vocab: int) -> str:
    if p.top_p < 1.0:
        return "sorted"
    return "top_k" if 0 < p.top_k < vocab else "plain"
