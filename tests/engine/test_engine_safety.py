"""What one request cannot do to the engine or to other requests, and the engine's own defects
that a hostile or unlucky request used to hit. Most tests script the model's tokens (no model),
so each case is exact."""

from __future__ import annotations

import asyncio

import pytest

from engine.engine import EngineConfig
from engine.factory import make_engine
from engine.outputs import SequenceError
from engine.scheduler import Scheduler, SchedulerConfig
from engine.sequence import Sequence, Status
from moe_parallel.contract import InvalidRequest, SampleOutput, SamplingParams
from tests.engine.helpers import collect

EOS = 2


def byte_id(ch: str) -> int:
    return 3 + ord(ch)  # the tiny model's byte-level vocabulary: <unk>, <s>, </s>, then bytes


class ScriptedExecutor:
    """An instance that answers each sequence from a script; `gate` holds steps until set."""

    ranks, kv_blocks, block_size, heartbeat_s, step_errors_are_fatal = 1, 64, 4, None, False

    def __init__(self, script=None, gate: asyncio.Event | None = None, fail_steps: int = 0):
        self.script = script or (lambda seq_id, k: byte_id("abcdefgh"[k % 8]))
        self.gate, self.fail_steps = gate, fail_steps
        self.steps = []

    async def execute(self, batches):
        self.steps.append(batches[0])
        await asyncio.sleep(0)  # like a real instance, give the event loop a turn
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_steps:
            self.fail_steps -= 1
            raise RuntimeError("injected step failure")
        return [[SampleOutput(c.seq_id, self.script(c.seq_id, c.end - c.prompt_len))
                 for c in batches[0].chunks if c.sampling is not None]]

    async def heartbeat(self):
        return None

    async def check_health(self):
        return None

    async def expert_token_counts(self):
        return []

    async def shutdown(self):
        return None


def engine_with(tiny_ckpt, executor, **config):
    return make_engine(executor, tiny_ckpt, EngineConfig(**({"max_model_len": 128} | config)))


def test_text_held_back_for_a_stop_string_is_delivered_when_eos_ends_the_completion(tiny_ckpt):
    tokens = [byte_id("x"), byte_id("a"), EOS]
    engine = engine_with(tiny_ckpt, ScriptedExecutor(lambda s, k: tokens[k]))
    out = asyncio.run(collect(engine, "r", [1, 5], SamplingParams(temperature=0, stop=("ab",), max_tokens=8)))[0]
    assert (out.text, out.finish_reason) == ("xa", "stop")


def test_abort_during_a_running_step_frees_blocks_only_after_the_step(tiny_ckpt):
    async def main():
        gate = asyncio.Event()
        gate.set()
        engine = engine_with(tiny_ckpt, ScriptedExecutor(gate=gate))
        blocks = engine.scheduler.blocks[0]
        stream = engine.generate("r", [1, *range(5, 15)], SamplingParams(temperature=0, max_tokens=50))
        await anext(stream)  # prefill done, decoding
        gate.clear()
        await asyncio.sleep(0.05)  # the engine is now inside a step, held at the gate
        assert engine.scheduler.in_flight
        held = blocks.num_free
        await stream.aclose()  # the client leaves mid-step
        during = blocks.num_free
        gate.set()
        while engine.scheduler.in_flight:
            await asyncio.sleep(0.001)
        return held, during, blocks.num_free, blocks.num_blocks

    held, during, after, total = asyncio.run(main())
    assert held < total
    assert during == held  # the running step may still write into them: not yet reusable
    assert after == total


def test_a_sequence_whose_request_vanished_is_stopped_not_decoded_forever(tiny_ckpt):
    async def main():
        engine = engine_with(tiny_ckpt, ScriptedExecutor())
        engine.add_request("r", [1, 5, 6], SamplingParams(temperature=0, max_tokens=100))
        while len(engine.executor.steps) < 3:
            await asyncio.sleep(0)
        engine.requests.pop("r")  # orphaned: no request record any more
        steps = len(engine.executor.steps)
        for _ in range(50):
            await asyncio.sleep(0.001)
        return engine, len(engine.executor.steps) - steps

    engine, more = asyncio.run(main())
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert engine.scheduler.blocks[0].num_free == engine.scheduler.blocks[0].num_blocks
    assert more <= 1  # the step already under way, then nothing


def test_one_requests_failure_is_its_own(tiny_ckpt, monkeypatch):
    """An exception while handling one sequence (here: its detokenisation) fails that request
    only; the others finish with their tokens and the engine stays up."""
    from engine import engine as engine_module

    real = engine_module.TextStream

    class Exploding(real):
        def add(self, token_id, check_stop=True):
            if self.stop == ("boom",) and token_id == byte_id("c"):
                raise RuntimeError("injected detokenizer failure")
            return super().add(token_id, check_stop)

    monkeypatch.setattr(engine_module, "TextStream", Exploding)

    async def main():
        engine = engine_with(tiny_ckpt, ScriptedExecutor())
        ok = SamplingParams(temperature=0, max_tokens=6)
        bad = SamplingParams(temperature=0, max_tokens=6, stop=("boom",))
        results = await asyncio.gather(collect(engine, "a", [1, 5], ok), collect(engine, "bad", [1, 6], bad),
                                       collect(engine, "b", [1, 7], ok), return_exceptions=True)
        after = await collect(engine, "c", [1, 8], ok)
        return engine, results, after

    engine, (a, bad, b), after = asyncio.run(main())
    assert isinstance(bad, SequenceError) and "injected detokenizer failure" in str(bad)
    assert a[0].text == b[0].text == after[0].text == "abcdef"
    assert engine.dead is None
    assert engine.scheduler.blocks[0].num_free == engine.scheduler.blocks[0].num_blocks


def test_a_step_that_raises_in_process_fails_its_requests_not_the_engine(tiny_ckpt):
    async def main():
        engine = engine_with(tiny_ckpt, ScriptedExecutor(fail_steps=1))
        first = await asyncio.gather(collect(engine, "a", [1, 5], SamplingParams(temperature=0, max_tokens=4)),
                                     return_exceptions=True)
        second = await collect(engine, "b", [1, 6], SamplingParams(temperature=0, max_tokens=4))
        return engine, first[0], second[0]

    engine, first, second = asyncio.run(main())
    assert isinstance(first, SequenceError)
    assert second.text == "abcd" and engine.dead is None


def test_sampling_failure_of_one_row_fails_only_that_request(tiny_ckpt, monkeypatch):
    """On the real model: the sampler raises for one sequence's draws; the batch is re-sampled
    row by row, that request fails, the others get the tokens they get alone."""
    from moe_parallel.sampling import sampler as sampler_module
    from tests.engine.test_engine import engine_for

    real = sampler_module.uniform

    def uniform(seed, position):
        if seed == 666:
            raise RuntimeError("injected sampler failure")
        return real(seed, position)

    monkeypatch.setattr(sampler_module, "uniform", uniform)
    monkeypatch.setattr("engine.engine._seed", lambda params, index: params.seed if params.seed is not None else 1)
    good = SamplingParams(temperature=0.8, seed=5, max_tokens=8, ignore_eos=True)

    async def main():
        alone = await collect(engine_for(tiny_ckpt), "x", [1, 5, 6, 7], good)
        engine = engine_for(tiny_ckpt)
        bad = SamplingParams(temperature=0.8, seed=666, max_tokens=8, ignore_eos=True)
        crowd = await asyncio.gather(collect(engine, "x", [1, 5, 6, 7], good), collect(engine, "y", [1, 9], bad),
                                     return_exceptions=True)
        return alone, crowd, engine

    alone, (crowded, failed), engine = asyncio.run(main())
    assert isinstance(failed, SequenceError) and "injected sampler failure" in str(failed)
    assert crowded[0].tokens == alone[0].tokens
    assert engine.dead is None


@pytest.mark.parametrize("ids", [(-1000000000,), (-1,), (259,), (10**12,)])
def test_stop_token_ids_outside_the_vocabulary_are_refused(tiny_ckpt, ids):
    engine = engine_with(tiny_ckpt, ScriptedExecutor())

    async def main():
        await collect(engine, "r", [1, 5], SamplingParams(min_tokens=1, stop_token_ids=ids))

    with pytest.raises(InvalidRequest, match="stop_token_ids: token id .* outside the vocabulary") as err:
        asyncio.run(main())
    assert err.value.param == "stop_token_ids"
    assert engine.dead is None and not engine.scheduler.waiting


# -- the scheduler's policies -------------------------------------------------------------------


def seq(seq_id: int, prompt: int, max_tokens: int = 8) -> Sequence:
    return Sequence(seq_id, f"r{seq_id}", 0, [1] * prompt, SamplingParams(temperature=0), 0, max_tokens)


def test_a_new_sequence_goes_to_any_rank_with_room():
    """Rank 0 has the most free blocks but no token budget left this step (a long prefill took
    it); the next sequence must go to rank 1 rather than wait behind rank 0."""
    sched = Scheduler(SchedulerConfig(num_blocks=64, block_size=4, max_num_batched_tokens=16, ranks=2))
    for _ in range(10):  # rank 1 fuller, so rank 0 stays the emptiest and is tried first
        sched.blocks[1].free_blocks.popitem(last=False)
    long = seq(0, 40)
    sched.add(long)
    sched.schedule()  # long takes rank 0 (emptiest) and its whole budget, chunk after chunk
    sched.add(seq(1, 3))
    step = sched.schedule()
    assert [s.seq_id for s in step.seqs[0]] == [0] and [s.seq_id for s in step.seqs[1]] == [1]


def test_preemption_takes_the_latest_arrival_not_the_latest_readmitted():
    """A (0) and C (2) run; B (1) was preempted earlier and re-admitted, so it is last in the
    running list. When the pool runs out again, C, the latest arrival, must go, not B."""
    sched = Scheduler(SchedulerConfig(num_blocks=6, block_size=4, max_num_batched_tokens=64))
    a, b, c = seq(0, 4), seq(1, 4), seq(2, 4)
    for s in (a, c, b):  # running order as after B's re-admission
        sched.blocks[0].allocate(s, 8)
        s.rank, s.status, s.num_computed = 0, Status.RUNNING, 8
        s.output_ids = [5] * 5
        sched.running.append(s)
    # every sequence now needs a third block for its 9th token, and none is free
    step = sched.schedule()
    assert c.status is Status.WAITING and b.status is Status.RUNNING
    assert {s.seq_id for s in step.seqs[0]} == {0, 1}
