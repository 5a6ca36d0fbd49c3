"""Logical KV blocks of one attention rank: a free list of fixed-size blocks.

A sequence holds the blocks for positions [0, num_computed + chunk); block ids index the
rank's KV tensors. Blocks go back on finish, abort and preemption; `num_free` is what the
tests count to prove nothing leaks.
"""

from __future__ import annotations

from collections import deque

from engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow `seq` to hold `num_tokens` positions; False (and no change) if the pool is short."""
        need = self.blocks_for(num_tokens) - len(seq.blocks)
        if need > self.num_free:
            return False
        seq.blocks.extend(self.free_blocks.popleft() for _ in range(max(need, 0)))
        return True

    def free(self, seq: Sequence) -> None:
        self.free_blocks.extend(seq.blocks)
        seq.blocks = []
