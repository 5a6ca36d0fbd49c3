"""The async engine: requests in, streams of text out, one model instance underneath.

`generate()` validates a request, splits it into its `n` sequences and hands them to the
scheduler; a single background task runs the step loop (schedule -> execute on the instance
-> apply sampled tokens, detokenise, check stops -> stream). New requests join between two
steps. A consumer that stops listening (a disconnected client) aborts its request, which
frees its KV blocks at once. If the instance fails, every in-flight request ends with
`EngineDeadError` and new ones are refused: the deployment above replaces the replica.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from engine.detokenizer import IncrementalDetokenizer, TextStream
from engine.executor import Executor
from engine.outputs import EngineDeadError, RequestOutput, SequenceError, TokenLogprob
from engine.scheduler import ScheduledStep, Scheduler, SchedulerConfig
from engine.sequence import Sequence, Status
from engine.stats import EngineStats
from moe_parallel.contract import InvalidRequest, SampleOutput, SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_model_len: int
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    micro_batches: int = 1
    max_loras: int = 0  # distinct LoRA adapters per attention rank and step (0: no LoRA)
    enable_prefix_caching: bool = True


@dataclass
class _Request:
    request_id: str
    seqs: list[Sequence]
    streams: dict[int, TextStream]  # by completion index
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    unfinished: int = 0
    arrival: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    last_token: dict[int, float] = field(default_factory=dict)  # per completion index
    trace: bool = False  # stamp each output with its hops (engine.trace)
    resumed: bool = False  # continues another replica's run of it (add_request's `resume`)


class AsyncEngine:
    def __init__(self, executor: Executor, tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...],
                 config: EngineConfig):
        self.executor, self.tokenizer, self.config = executor, tokenizer, config
        self.vocab_size, self.eos = vocab_size, set(eos_token_ids)
        self.scheduler = Scheduler(SchedulerConfig(
            num_blocks=executor.kv_blocks, block_size=executor.block_size, max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens, ranks=executor.ranks,
            micro_batches=config.micro_batches, max_loras=config.max_loras,
            prefix_caching=config.enable_prefix_caching))
        self.requests: dict[str, _Request] = {}
        self.dead: BaseException | None = None
        self.steps = 0
        self.stats = EngineStats()
        self._seq_ids = itertools.count()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        # the last step's times (scheduled, dispatched, executed) and each attention rank's
        # (start, end) where the executor knows them: traced outputs are stamped from these
        self._step_times: tuple[float, float, float, list[tuple[float, float]] | None] = (0.0, 0.0, 0.0, None)

    # -- requests ---------------------------------------------------------------------------

    def resolve_max_tokens(self, prompt_len: int, params: SamplingParams) -> int:
        return resolve_max_tokens(prompt_len, params.max_tokens, self.config.max_model_len)

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    lora: tuple[str, str] | None = None, trace: bool = False,
                    resume: dict[int, list[int]] | None = None) -> _Request:
        """`lora`: (adapter name, its directory) to generate with, or None for the base model;
        `trace`: stamp every output with the times it passed each hop (`engine.trace`).
        `resume`: the request continues where another replica left it: for each completion
        index still unfinished, the tokens it had generated. Those sequences start with these
        tokens as their output (the first step runs prompt and output, as after a preemption),
        so the draws, penalties, grammar, stop strings, min/max tokens and the detokenizer's
        held-back text all continue as if nothing had happened; the other indices are done."""
        if self.dead is not None:
            raise EngineDeadError(f"the model instance failed: {self.dead}")
        if request_id in self.requests:
            raise InvalidRequest(f"request id {request_id!r} is already in use")
        if not prompt_ids:
            raise InvalidRequest("the prompt must contain at least one token", param="prompt")
        bad = next((t for t in prompt_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"token id {bad} is out of range for a vocabulary of {self.vocab_size}",
                                 param="prompt")
        params.check_vocab(self.vocab_size)
        if lora is not None and not self.config.max_loras:
            raise InvalidRequest("this server was started without LoRA adapters", param="model")
        max_tokens = self.resolve_max_tokens(len(prompt_ids), params)
        so_far = self._check_resume(resume, params, max_tokens) if resume is not None else {}
        seqs = [Sequence(next(self._seq_ids), request_id, i, list(prompt_ids), params, _seed(params, i), max_tokens,
                         output_ids=list(so_far.get(i, ())), lora=lora)
                for i in (sorted(so_far) if resume is not None else range(params.n))]
        streams = {seq.index: self._text_stream(seq) for seq in seqs}  # before the scheduler sees them
        for seq in seqs:
            self.scheduler.add(seq)
        req = self.requests[request_id] = _Request(request_id, seqs, streams, unfinished=len(seqs), trace=trace,
                                                   resumed=resume is not None)
        if not req.resumed:  # a resumed request's prompt and first token were counted where it began
            self.stats.prompt_tokens += len(prompt_ids)
        if lora is not None:
            self.stats.lora_requests[lora[0]] = self.stats.lora_requests.get(lora[0], 0) + 1
        self._ensure_running()
        self._wake.set()
        return req

    def _check_resume(self, resume: dict[int, list[int]], params: SamplingParams,
                      max_tokens: int) -> dict[int, list[int]]:
        if not resume:
            raise InvalidRequest("resume: no unfinished completion to continue", param="resume")
        out = {}
        for index, tokens in resume.items():
            if not 0 <= index < params.n:
                raise InvalidRequest(f"resume: completion {index} is not one of the request's {params.n}",
                                     param="resume")
            if len(tokens) >= max(max_tokens, 1) or any(not 0 <= t < self.vocab_size for t in tokens):
                raise InvalidRequest(f"resume: completion {index} has {len(tokens)} tokens, or one out of the "
                                     f"vocabulary: it cannot be unfinished", param="resume")
            if any(self._stops(params, t, n_out) for n_out, t in enumerate(tokens, start=1)):
                raise InvalidRequest(f"resume: completion {index} holds a stop token: it was finished",
                                     param="resume")
            out[index] = list(tokens)
        return out

    def _stops(self, p: SamplingParams, token: int, n_out: int) -> bool:
        """Whether `token`, a completion's `n_out`-th, ends it as a stop token. Under a grammar,
        an end of sequence means the grammar is complete: it ends the output even before
        min_tokens (the sampler allows it only then)."""
        stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos)
        return token in stop_ids and (n_out > p.min_tokens - 1 or p.guided is not None)

    def _text_stream(self, seq: Sequence) -> TextStream:
        """The completion's detokenizer and stop-string state; a resumed one has its tokens so far
        replayed through it, so what it held back comes out with the next token, as it would have."""
        p = seq.params
        stream = TextStream(IncrementalDetokenizer(self.tokenizer, seq.prompt_ids, p.skip_special_tokens),
                            p.stop, p.include_stop_str_in_output)
        for n_out, token in enumerate(seq.output_ids, start=1):
            if stream.add(token, check_stop=n_out >= p.min_tokens).stopped:
                raise InvalidRequest(f"resume: completion {seq.index} ends in a stop string: it was finished",
                                     param="resume")
        return stream

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       lora: tuple[str, str] | None = None, trace: bool = False,
                       resume: dict[int, list[int]] | None = None) -> AsyncIterator[RequestOutput]:
        chunks = self.generate_chunks(request_id, prompt_ids, params, lora, trace, resume)
        try:
            async for chunk in chunks:
                for out in chunk:
                    yield out
        finally:
            await chunks.aclose()  # now, not at garbage collection: an early exit aborts at once

    async def generate_chunks(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                              lora: tuple[str, str] | None = None, trace: bool = False,
                              resume: dict[int, list[int]] | None = None) -> AsyncIterator[list[RequestOutput]]:
        """Everything produced since the consumer last looked, as one list: one item per wake-up
        instead of one per token, so per-item costs (streaming between Ray processes) do not
        grow with the load. `resume`: see `add_request`."""
        req = self.add_request(request_id, prompt_ids, params, lora, trace, resume)
        try:
            while req.unfinished:
                items = [await req.queue.get()]
                while not req.queue.empty():
                    items.append(req.queue.get_nowait())
                error = next((item for item in items if isinstance(item, BaseException)), None)
                items = [item for item in items if not isinstance(item, BaseException)]
                req.unfinished -= sum(item.finished for item in items)
                if items:
                    yield items
                if error is not None:
                    raise error
        finally:
            if req.unfinished:  # the consumer left early: free what the request holds
                self.abort(request_id)

    def unload_lora(self, name: str) -> None:
        """Forget an adapter: the ranks free its slot once no sequence of it is left (those that
        run finish with it)."""
        self.scheduler.drop_lora(name)

    def abort(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for seq in req.seqs:
            if seq.status is not Status.FINISHED:
                self.scheduler.finish(seq, "abort")
        self.stats.requests_finished["abort"] = self.stats.requests_finished.get("abort", 0) + 1

    # -- the step loop ------------------------------------------------------------------------

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    def start(self) -> None:
        """Run the step loop from now on, so an idle instance keeps sending heartbeats."""
        self._ensure_running()

    async def _run(self) -> None:
        beat = self.executor.heartbeat_s
        last = time.monotonic()
        try:
            while True:
                if beat is not None and time.monotonic() - last >= beat:
                    await self.executor.heartbeat()  # idle expert ranks time out without one
                    last = time.monotonic()
                if not self.scheduler.has_work():
                    self._wake.clear()
                    wait = None if beat is None else max(0.0, beat - (time.monotonic() - last))
                    try:
                        await asyncio.wait_for(self._wake.wait(), wait)
                    except TimeoutError:
                        pass
                    continue
                scheduled = time.monotonic()
                step = self.scheduler.schedule()
                if step.empty:
                    await asyncio.sleep(0.001)
                    continue
                self.scheduler.begin_step(step)
                try:
                    dispatched = time.monotonic()
                    results = await self.executor.execute(step.batches)
                    executed = time.monotonic()
                except Exception as exc:
                    if self.executor.step_errors_are_fatal:
                        raise
                    self._fail_step(step, exc)  # one process, no peers to fall out of step with
                    continue
                finally:
                    self.scheduler.end_step()
                last = time.monotonic()
                self.steps += 1
                self._step_times = (scheduled, dispatched, executed, getattr(self.executor, "rank_stamps", None))
                self._apply(step, results)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the instance is gone: fail everything in flight, refuse new work
            log.exception("model instance failed")
            self._fail(exc)

    def _apply(self, step: ScheduledStep, results: list[list[SampleOutput]]) -> None:
        for rank, seqs in enumerate(step.seqs):
            for seq in seqs:
                before, seq.num_computed = seq.num_computed, seq.num_computed + step.sizes[seq.seq_id]
                self.scheduler.commit(seq, before)
            by_id = {s.seq_id: s for s in seqs}
            for out in results[rank]:
                seq = by_id.get(out.seq_id)
                if seq is None or seq.status is not Status.RUNNING:
                    continue  # aborted while the step ran, or finished by a sibling's failure
                try:
                    if out.error is not None:
                        raise SequenceError(f"sampling failed: {out.error}")
                    if out.prompt_logprobs is not None:
                        _record_prompt_logprobs(seq, out)
                    if out.sampled:
                        self._on_token(seq, out, rank)
                except Exception as exc:  # this sequence's own failure: its request ends, no one else's
                    self._fail_request(seq, exc)

    def _fail_request(self, seq: Sequence, exc: BaseException) -> None:
        log.error("request %s failed", seq.request_id, exc_info=exc)
        req = self.requests.pop(seq.request_id, None)
        for s in (req.seqs if req is not None else [seq]):
            if s.status is not Status.FINISHED:
                self.scheduler.finish(s, "error")
        self.stats.requests_finished["error"] = self.stats.requests_finished.get("error", 0) + 1
        if req is not None:
            error = exc if isinstance(exc, SequenceError) else SequenceError(f"{type(exc).__name__}: {exc}")
            req.queue.put_nowait(error)

    def _fail_step(self, step: ScheduledStep, exc: BaseException) -> None:
        """A step that raised in an in-process instance: its sequences fail, the engine goes on."""
        for seqs in step.seqs:
            for seq in seqs:
                if seq.status is not Status.FINISHED:
                    self._fail_request(seq, exc)

    def _on_token(self, seq: Sequence, out: SampleOutput, rank: int = 0) -> None:
        req = self.requests.get(seq.request_id)
        if req is None:  # nobody is listening any more: stop decoding it and free its blocks
            self.scheduler.finish(seq, "abort")
            return
        prompt_lps = None
        if seq.params.prompt_logprobs is not None and not seq.output_ids:  # with the first piece
            if len(seq.prompt_logprobs) != len(seq.prompt_ids) - 1:
                raise SequenceError(f"prompt logprobs cover {len(seq.prompt_logprobs)} of "
                                    f"{len(seq.prompt_ids) - 1} positions")
            prompt_lps = (None, *seq.prompt_logprobs)
        if seq.max_tokens == 0:  # a scoring call: the prompt ran, nothing is generated
            self.scheduler.finish(seq, "length")
            req.queue.put_nowait(RequestOutput(seq.request_id, seq.index, (), "", None, "length",
                                               len(seq.prompt_ids), 0, prompt_lps, seq.cached_tokens or 0))
            self._finish_request(req, "length")
            return
        seq.output_ids.append(out.token_id)
        p, stream, n_out = seq.params, req.streams[seq.index], len(seq.output_ids)
        reason, text = None, ""
        if self._stops(p, out.token_id, n_out):
            reason = "stop"
        else:
            s = stream.add(out.token_id, check_stop=n_out >= p.min_tokens)
            text, reason = s.delta, ("stop" if s.stopped else None)
        if reason is None and n_out >= seq.max_tokens:
            reason = "length"
        if reason is not None:
            text += stream.flush()  # ended on EOS, a stop id or the length limit: release the held-back tail
            self.scheduler.finish(seq, reason)
        logprobs = None if out.logprob is None else (TokenLogprob(out.token_id, out.logprob, out.top_logprobs),)
        cached = (seq.cached_tokens or 0) if n_out == 1 else 0
        trace = None
        if req.trace:
            scheduled, dispatched, executed, ranks = self._step_times
            start, end = ranks[rank] if ranks else (dispatched, executed)
            trace = {"arrival": req.arrival, "scheduled": scheduled, "dispatched": dispatched, "rank_start": start,
                     "rank_end": end, "executed": executed, "queued": time.monotonic()}
        req.queue.put_nowait(RequestOutput(seq.request_id, seq.index, (out.token_id,), text, logprobs, reason,
                                           len(seq.prompt_ids), n_out, prompt_lps, cached, trace))
        self._record(req, seq, reason)
        if reason is not None:
            self._finish_request(req, None)

    def _finish_request(self, req: _Request, reason: str | None) -> None:
        """Once every completion of the request has finished: forget it, record its latency."""
        if reason is not None:
            self.stats.requests_finished[reason] = self.stats.requests_finished.get(reason, 0) + 1
        if all(s.status is Status.FINISHED for s in req.seqs):
            self.requests.pop(req.request_id, None)
            self.stats.e2e_latency.observe(time.monotonic() - req.arrival)

    def _record(self, req: _Request, seq: Sequence, reason: str | None) -> None:
        now = time.monotonic()
        self.stats.generation_tokens += 1
        if seq.lora is not None:
            self.stats.lora_tokens[seq.lora[0]] = self.stats.lora_tokens.get(seq.lora[0], 0) + 1
        if req.first_token is None:
            req.first_token = now
            if not req.resumed:
                self.stats.time_to_first_token.observe(now - req.arrival)
        if seq.index in req.last_token:
            self.stats.inter_token_latency.observe(now - req.last_token[seq.index])
        req.last_token[seq.index] = now
        if reason is not None:
            self.stats.requests_finished[reason] = self.stats.requests_finished.get(reason, 0) + 1

    async def snapshot(self) -> EngineStats:
        """The statistics with the gauges filled in (the experts' counts come from the instance)."""
        s, sched = self.stats, self.scheduler
        s.running, s.waiting, s.preemptions = len(sched.running), len(sched.waiting), sched.preemptions
        total = sum(b.num_blocks for b in sched.blocks)
        s.kv_usage = 1.0 - sum(b.num_free for b in sched.blocks) / total
        s.prefix_cache_queries = sum(b.queries for b in sched.blocks)
        s.prefix_cache_hits = sum(b.hits for b in sched.blocks)
        s.tokens_per_expert = await self.executor.expert_token_counts()
        return s

    def _fail(self, exc: BaseException) -> None:
        self.dead = exc
        for req in list(self.requests.values()):
            for seq in req.seqs:
                if seq.status is not Status.FINISHED:
                    self.scheduler.finish(seq, "abort")
            req.queue.put_nowait(EngineDeadError(f"the model instance failed: {exc}"))
        self.requests.clear()

    async def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.executor.shutdown()


class ContextLengthError(InvalidRequest):
    """The prompt plus the completion budget do not fit the model's context."""

    def __init__(self, message: str):
        super().__init__(message, param="max_tokens")


def resolve_max_tokens(prompt_len: int, max_tokens: int | None, limit: int) -> int:
    """The completion budget of a request, or a ValueError saying both numbers."""
    if max_tokens is None:
        if prompt_len >= limit:
            raise ContextLengthError(f"This model's maximum context length is {limit} tokens; the prompt has "
                             f"{prompt_len} tokens, which leaves no room for a completion.")
        return limit - prompt_len
    if prompt_len + max_tokens > limit:
        raise ContextLengthError(f"This model's maximum context length is {limit} tokens. However, you requested "
                         f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, "
                         f"{max_tokens} for the completion).")
    return max_tokens


def _record_prompt_logprobs(seq: Sequence, out: SampleOutput) -> None:
    """Keep a chunk's prompt logprobs; positions already kept (a preempted sequence running its
    prompt again) are skipped."""
    have = len(seq.prompt_logprobs) + 1  # the next prompt index without a logprob
    for i, (token, logprob, rank, top) in enumerate(out.prompt_logprobs, start=out.prompt_start):
        if i == have:
            seq.prompt_logprobs.append(TokenLogprob(token, logprob, top, rank))
            have += 1


def _seed(params: SamplingParams, index: int) -> int:
    if params.seed is None:
        return random.getrandbits(63)
    return hash((params.seed, index)) & (2**63 - 1)
