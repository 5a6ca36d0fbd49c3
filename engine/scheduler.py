"""Continuous batching: which chunks of which sequences run in the next step.

Each step, per attention rank, under a token budget (`max_num_batched_tokens`):
1. running sequences first, oldest first: a decode step is a chunk of one token, an
   unfinished prefill continues with the next chunk of its prompt;
2. then waiting sequences (preempted ones first, then new arrivals) while the budget,
   `max_num_seqs` and the KV pool allow; a new sequence goes to whichever attention rank has
   room (most free blocks first), so one full rank does not hold back the others. A long prompt
   is cut into chunks, so it never holds back everybody else's decoding for more than one chunk.
When the pool cannot grow a running sequence, the latest-arrived running sequence on that rank
is preempted (vLLM's FCFS order): its blocks are freed and it is recomputed from its tokens
later. Arrival order, not position in the running list, so a sequence that was preempted and
came back is not the next victim again while newer ones run.

A sequence finished while a step that contains it is running (an abort) keeps its blocks
until the step is over (`begin_step`/`end_step`): the step may still write into them.

Prefix caching (`block_manager.py`): a waiting sequence goes to the rank holding the longest
cached prefix of its tokens (then the emptiest), takes those blocks and prefills only the rest;
blocks become findable when the step that computed them is over (`commit`). The choices of an
`n > 1` request after the first wait while the first is still prefilling, then share its
prompt blocks. Sequences that ask for prompt logprobs compute their whole prompt.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.sequence import Sequence, Status
from moe_parallel.contract import InvalidRequest, SeqChunk, StepBatch


@dataclass(frozen=True)
class SchedulerConfig:
    num_blocks: int  # per attention rank
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    ranks: int = 1
    micro_batches: int = 1  # ping-pong micro-batches per step (disaggregated); fewer when fewer sequences run
    max_loras: int = 0  # distinct LoRA adapters per rank and step (a rank's resident slots); 0: no LoRA
    prefix_caching: bool = True


@dataclass
class ScheduledStep:
    batches: list[StepBatch]
    seqs: list[list[Sequence]]  # per rank, in chunk order
    sizes: dict[int, int] = field(default_factory=dict)  # seq_id -> chunk length
    admitted: set[int] = field(default_factory=set)  # seq ids admitted in this step

    @property
    def empty(self) -> bool:
        return not any(self.seqs)


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.blocks = [BlockManager(config.num_blocks, config.block_size, config.prefix_caching)
                       for _ in range(config.ranks)]
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.freed: list[list[int]] = [[] for _ in range(config.ranks)]  # seq ids to tell each rank about
        self.preemptions = 0
        self.lora_drops: list[list[str]] = [[] for _ in range(config.ranks)]  # adapters each rank may free
        self.unloading: set[str] = set()  # adapters to free once no sequence of theirs is left
        self.in_flight: set[int] = set()  # seq ids of the step being executed
        self.deferred: list[Sequence] = []  # finished while in flight: released at end_step

    def add(self, seq: Sequence) -> None:
        if self.blocks[0].blocks_for(seq.max_len) > self.config.num_blocks:
            raise InvalidRequest(f"a sequence of up to {seq.max_len} tokens does not fit in the KV cache "
                             f"({self.config.num_blocks * self.config.block_size} tokens per rank)")
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = Status.FINISHED, reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.seq_id in self.in_flight:
            self.deferred.append(seq)
        else:
            self._release(seq)

    def begin_step(self, step: ScheduledStep) -> None:
        self.in_flight = {s.seq_id for seqs in step.seqs for s in seqs}

    def end_step(self) -> None:
        self.in_flight = set()
        deferred, self.deferred = self.deferred, []
        for seq in deferred:
            self._release(seq)

    def schedule(self) -> ScheduledStep:
        budget = [self.config.max_num_batched_tokens] * self.config.ranks
        step = ScheduledStep(batches=[], seqs=[[] for _ in range(self.config.ranks)])
        for seq in list(self.running):
            if seq.status is Status.RUNNING:
                self._schedule_running(seq, budget, step)
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            if not self._admit(self.waiting[0], budget, step):
                break
        self._release_unloaded()
        # every rank of a step uses the same m: its collectives must line up
        m = max(1, min(self.config.micro_batches, max(len(s) for s in step.seqs)))
        step.batches = [self._batch(r, step, m) for r in range(self.config.ranks)]
        return step

    def drop_lora(self, name: str) -> None:
        self.unloading.add(name)

    def _release_unloaded(self) -> None:
        for name in list(self.unloading):
            if not any(s.lora and s.lora[0] == name for s in (*self.running, *self.waiting)):
                self.unloading.discard(name)
                for drops in self.lora_drops:
                    drops.append(name)

    def _lora_fits(self, seq: Sequence, rank: int, step: ScheduledStep) -> bool:
        """A rank holds `max_loras` adapters at once: a step may not ask it for more."""
        if seq.lora is None:
            return True
        names = {s.lora[0] for s in step.seqs[rank] if s.lora}
        return seq.lora[0] in names or len(names) < self.config.max_loras

    def _schedule_running(self, seq: Sequence, budget: list[int], step: ScheduledStep) -> None:
        r = seq.rank
        n = min(seq.num_tokens - seq.num_computed, budget[r])
        if n <= 0 or not self._lora_fits(seq, r, step):
            return
        while not self.blocks[r].allocate(seq, seq.num_computed + n):
            victim = max((s for s in self.running if s.rank == r), key=lambda s: s.seq_id)  # latest arrival
            self._preempt(victim, budget, step)
            if victim is seq:
                return
        self._take(seq, n, budget, step)

    def commit(self, seq: Sequence, computed_before: int) -> None:
        """After a step: the sequence's newly completed blocks become findable in the cache."""
        if seq.rank is not None and seq.status is Status.RUNNING:
            self.blocks[seq.rank].commit(seq, computed_before)

    def _sibling_prefilling(self, seq: Sequence) -> bool:
        return self.config.prefix_caching and any(
            s.request_id == seq.request_id and s.num_computed < len(s.prompt_ids) for s in self.running)

    def _admit(self, seq: Sequence, budget: list[int], step: ScheduledStep) -> bool:
        if seq.index and self._sibling_prefilling(seq):
            return False  # wait for the prompt's blocks, then share them
        # a new sequence goes to the rank holding the longest cached prefix of its tokens, then
        # to the emptiest; a preempted one also (its sampler state is rebuilt where it lands)
        scoring = seq.params.prompt_logprobs is not None
        hits = [[] if scoring else self.blocks[r].match(seq) for r in range(self.config.ranks)]
        ranks = sorted(range(self.config.ranks), key=lambda i: (-len(hits[i]), -self.blocks[i].num_free))
        for r in ranks:
            cached = len(hits[r]) * self.config.block_size
            n = min(seq.num_tokens - cached, budget[r])
            if n <= 0 or not self._lora_fits(seq, r, step):
                continue
            self.blocks[r].acquire(seq, hits[r])
            if self.blocks[r].allocate(seq, cached + n):
                break
            self.blocks[r].free(seq)
        else:
            return False
        if seq.cached_tokens is None:  # the prompt's first admission: what the cache saved it
            seq.cached_tokens = min(cached, len(seq.prompt_ids))  # a resumed one's output may be cached too
            self.blocks[r].record(len(seq.prompt_ids), seq.cached_tokens)
        seq.num_computed = cached
        step.admitted.add(seq.seq_id)
        self.waiting.popleft()
        seq.rank, seq.status = r, Status.RUNNING
        self.running.append(seq)
        self._take(seq, n, budget, step)
        return True

    def _take(self, seq: Sequence, n: int, budget: list[int], step: ScheduledStep) -> None:
        budget[seq.rank] -= n
        step.seqs[seq.rank].append(seq)
        step.sizes[seq.seq_id] = n

    def _preempt(self, seq: Sequence, budget: list[int], step: ScheduledStep) -> None:
        if seq.seq_id in step.sizes:  # already in this step: take it back out
            budget[seq.rank] += step.sizes.pop(seq.seq_id)
            step.seqs[seq.rank].remove(seq)
        self.running.remove(seq)
        self.blocks[seq.rank].free(seq)
        self.freed[seq.rank].append(seq.seq_id)  # it may come back on another rank: drop its state here
        seq.num_computed, seq.status = 0, Status.WAITING
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def _batch(self, rank: int, step: ScheduledStep, micro_batches: int) -> StepBatch:
        chunks = []
        for seq in step.seqs[rank]:
            n = step.sizes[seq.seq_id]
            end = seq.num_computed + n
            sample = end == seq.num_tokens
            scoring = seq.params.prompt_logprobs if seq.num_computed < len(seq.prompt_ids) - 1 else None
            history = tuple(seq.all_ids[:seq.num_computed]) if seq.seq_id in step.admitted and seq.num_computed \
                else None
            chunks.append(SeqChunk(seq.seq_id, tuple(seq.all_ids[seq.num_computed:end]), seq.num_computed,
                                   tuple(seq.blocks), seq.params if sample else None, len(seq.prompt_ids),
                                   seq.seed, seq.lora[0] if seq.lora else None, scoring,
                                   seq.prompt_ids[end] if end < len(seq.prompt_ids) else -1, seq.params.guided,
                                   history))
        finished, self.freed[rank] = tuple(self.freed[rank]), []
        drops, self.lora_drops[rank] = tuple(self.lora_drops[rank]), []
        loras = tuple(sorted({seq.lora for seq in step.seqs[rank] if seq.lora}))
        return StepBatch(tuple(chunks), finished=finished, micro_batches=micro_batches, loras=loras,
                         drop_loras=drops)

    def _release(self, seq: Sequence) -> None:
        if seq.rank is not None:
            self.blocks[seq.rank].free(seq)
            self.freed[seq.rank].append(seq.seq_id)
