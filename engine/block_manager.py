"""KV blocks of one attention rank, content-addressed for prefix caching.

A sequence holds the blocks for positions [0, num_computed + chunk); block ids index the
rank's KV tensors. With prefix caching, a block whose tokens are all computed gets a hash of
its tokens chained with its prefix's hash (and the LoRA adapter, which changes K and V), as
vLLM does; a new sequence takes the longest run of cached blocks that starts its tokens and
prefills only the rest. Blocks are reference-counted: one in use by any sequence is never
handed out again. A block nobody uses goes to the free list, which is in LRU order: a cached
block stays findable there until the pool runs short and it is taken (evicted) for new
tokens. A sequence's blocks are freed tail first, so its tail is evicted before its prefix.

Sliding windows need nothing special here: the KV of every position is kept and the window
is a mask over positions, so a cached block means the same to every sequence that shares it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from engine.sequence import Sequence


def block_hash(parent: int, tokens: tuple[int, ...], extra: str) -> int:
    digest = hashlib.blake2b(repr((parent, tokens, extra)).encode(), digest_size=16).digest()
    return int.from_bytes(digest, "little")


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, caching: bool = True):
        self.num_blocks, self.block_size, self.caching = num_blocks, block_size, caching
        self.ref = [0] * num_blocks
        self.hash_of: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # hash -> block
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # oldest first
        self.queries = self.hits = 0  # prompt tokens looked up, and found cached
        self.evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks no sequence uses (cached ones included: they are evicted when needed)."""
        return len(self.free_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _take(self) -> int:
        block, _ = self.free_blocks.popitem(last=False)
        h = self.hash_of[block]
        if h is not None:  # evicted: its KV is about to be overwritten
            del self.cached[h]
            self.hash_of[block] = None
            self.evictions += 1
        self.ref[block] = 1
        return block

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow `seq` to hold `num_tokens` positions; False (and no change) if the pool is short."""
        need = self.blocks_for(num_tokens) - len(seq.blocks)
        if need > self.num_free:
            return False
        seq.blocks.extend(self._take() for _ in range(max(need, 0)))
        return True

    def free(self, seq: Sequence) -> None:
        for block in reversed(seq.blocks):  # the tail becomes the oldest: evicted first
            self.ref[block] -= 1
            if self.ref[block] == 0:
                self.free_blocks[block] = None
        seq.blocks = []

    # -- prefix caching -------------------------------------------------------------------------

    def _hash_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """Extend `seq.block_hashes` over the full blocks of its first `num_tokens` tokens (each
        block hashed once in the sequence's life); returns how many blocks that is."""
        n, bs = num_tokens // self.block_size, self.block_size
        if len(seq.block_hashes) < n:
            ids, extra = seq.all_ids, seq.lora[0] if seq.lora else ""
            for i in range(len(seq.block_hashes), n):
                parent = seq.block_hashes[-1] if seq.block_hashes else 0
                seq.block_hashes.append(block_hash(parent, tuple(ids[i * bs:(i + 1) * bs]), extra))
        return n

    def match(self, seq: Sequence) -> list[int]:
        """The cached blocks that start the sequence's tokens (at least one token is left to
        compute, for the logits)."""
        if not self.caching:
            return []
        found = []
        for h in seq.block_hashes[: self._hash_blocks(seq, seq.num_tokens - 1)]:
            block = self.cached.get(h)
            if block is None:
                break
            found.append(block)
        return found

    def acquire(self, seq: Sequence, blocks: list[int]) -> None:
        """Give a sequence with no blocks the cached prefix `blocks`."""
        for block in blocks:
            if self.ref[block] == 0:
                del self.free_blocks[block]
            self.ref[block] += 1
        seq.blocks = list(blocks)

    def commit(self, seq: Sequence, computed_before: int) -> None:
        """Make the blocks that the last step completed findable (after the step that wrote them):
        those between `computed_before` and `seq.num_computed` tokens, so a decode step that
        completes no block costs nothing."""
        if not self.caching or not seq.blocks:
            return
        for i in range(computed_before // self.block_size, self._hash_blocks(seq, seq.num_computed)):
            block, h = seq.blocks[i], seq.block_hashes[i]
            if self.hash_of[block] is None and h not in self.cached:
                self.cached[h], self.hash_of[block] = block, h

    def record(self, prompt_tokens: int, hit_tokens: int) -> None:
        self.queries += prompt_tokens
        self.hits += hit_tokens
