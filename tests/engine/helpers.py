"""Running requests through an engine and collecting what a client would see."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from engine.executor import InProcessExecutor


@dataclass
class Completion:
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    deltas: list[str] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None


async def collect(engine, request_id: str, prompt: list[int], params) -> list[Completion]:
    outs = [Completion() for _ in range(params.n)]
    async for o in engine.generate(request_id, prompt, params):
        c = outs[o.index]
        c.tokens += o.token_ids
        c.text += o.text
        c.deltas.append(o.text)
        c.logprobs += list(o.logprobs or ())
        c.finish_reason = o.finish_reason or c.finish_reason
    return outs


async def run_all(engine, prompts: list[list[int]], params) -> list[Completion]:
    results = await asyncio.gather(*[collect(engine, f"r{i}", p, params) for i, p in enumerate(prompts)])
    return [r[0] for r in results]


class RecordingExecutor(InProcessExecutor):
    """The in-process executor, remembering every batch it ran."""

    def __init__(self, runner):
        super().__init__(runner)
        self.batches = []

    async def execute(self, batches):
        self.batches.append(batches[0])
        return await super().execute(batches)
