"""Executors run one engine step on a model instance: one batch per attention rank in,
each rank's sampled tokens out. The engine does not care where the ranks are.

| executor            | instance                                  |
| ------------------- | ----------------------------------------- |
| InProcessExecutor   | `single` layout in this process           |
| LocalProcessExecutor| `LocalInstance` (OS processes over pipes) |
| cluster.RayExecutor | Ray actors in a placement group           |
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Protocol

from moe_parallel.contract import SampleOutput, StepBatch
from moe_parallel.runtime import compute
from moe_parallel.step.runner import ModelRunner

if TYPE_CHECKING:  # the local-process launcher needs DeepSpeed; the in-process engine does not
    from moe_parallel.parallel.launch import LocalInstance


class Executor(Protocol):
    ranks: int
    kv_blocks: int  # per attention rank, as the ranks allocated them
    block_size: int
    heartbeat_s: float | None  # how often an idle instance must hear from its driver; None: never
    # whether a step that raises leaves the instance unusable (ranks out of step with each
    # other); in one process it does not, and only the step's sequences fail
    step_errors_are_fatal: bool

    async def execute(self, batches: list[StepBatch]) -> list[list[SampleOutput]]: ...

    async def heartbeat(self) -> None: ...

    async def check_health(self) -> None: ...

    async def expert_token_counts(self) -> list[list[int]]:
        """Tokens routed to each expert of each layer so far: [layer][expert]."""
        ...

    async def shutdown(self) -> None: ...


class InProcessExecutor:
    def __init__(self, runner: ModelRunner):
        self.runner, self.ranks = runner, 1
        self.kv_blocks, self.block_size = runner.cache.num_blocks, runner.cache.block_size
        self.heartbeat_s = None
        self.step_errors_are_fatal = False
        self.rank_stamps: list[tuple[float, float]] | None = None
        # Every step on the process's compute thread (where build_single loaded the model), so
        # the event loop keeps streaming while a step computes and one OpenMP team does it all
        self.thread = compute.executor()

    async def execute(self, batches: list[StepBatch]) -> list[list[SampleOutput]]:
        loop = asyncio.get_running_loop()
        return [await loop.run_in_executor(self.thread, self._execute, batches[0])]

    def _execute(self, batch: StepBatch) -> list[SampleOutput]:
        start = time.monotonic()
        out = self.runner.execute(batch)
        self.rank_stamps = [(start, time.monotonic())]  # the step on the compute thread (engine.trace)
        return out

    async def heartbeat(self) -> None:
        return None

    async def check_health(self) -> None:
        return None

    async def expert_token_counts(self) -> list[list[int]]:
        # on the step thread, between two steps: a device read from the event loop would stall
        # it until the device drains, and could break a CUDA graph capture in progress
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.thread, self.runner.expert_token_counts)

    async def shutdown(self) -> None:
        return None


class LocalProcessExecutor:
    def __init__(self, instance: LocalInstance):
        self.instance, self.ranks = instance, instance.spec.attention_ranks
        self.kv_blocks, self.block_size = instance.kv_blocks, instance.spec.cache.block_size
        self.heartbeat_s = None  # the instance sends its own while idle
        self.step_errors_are_fatal = True

    async def execute(self, batches: list[StepBatch]) -> list[list[SampleOutput]]:
        return await asyncio.to_thread(self.instance.call, "execute", [(b,) for b in batches])

    async def heartbeat(self) -> None:
        return None

    async def check_health(self) -> None:
        dead = [r for r, p in enumerate(self.instance.procs) if not p.is_alive()]
        if dead:
            raise RuntimeError(f"ranks {dead} of the model instance are not running")

    async def expert_token_counts(self) -> list[list[int]]:
        return []  # the local processes do not report them; the Ray instance does

    async def shutdown(self) -> None:
        await asyncio.to_thread(self.instance.close)
