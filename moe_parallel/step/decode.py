"""The decode step on persistent buffers: no host sync from the step's start to its logits, and
on CUDA one captured graph per (batch, context) bucket.

A decode step (every chunk one token, plain logits) does not build its metadata from the
batch's Python lists (`metadata.from_batch`: each list a host-device copy on a GPU). Instead
the step's per-row integers (token, position, KV slot, and the block table) are written into
one host buffer, pinned on CUDA, and reach the device in one asynchronous copy into a twin
buffer that lives as long as the runner. Every index the attention needs (each row's context
slots, its causal and window mask, its rotary angles) is computed from those on the device
(`metadata.from_decode`). Nothing in the forward reads a device value
back, so on CUDA the whole forward, lm_head included, is captured as a graph and replayed:
rows are padded up to a batch bucket and contexts to a power-of-two number of blocks (one
graph per pair, sharing one memory pool). The ladder is captured when the cache is allocated,
smallest contexts first, within `CAPTURE_BUDGET_S` (a pair past it is captured on first
use, and logged). A padding row reads token 0 at position 0, writes its K/V into the cache's
scratch slot, and its logits are dropped; the experts' counts leave it out (`real` field).

Remote experts (the `disaggregated` attention rank) run this path eagerly: their all-to-all
needs the split sizes on the host, and a collective over gloo cannot be captured.

Shapes: B rows (padded), NB blocks per row (padded), L = NB x block size, V vocabulary.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

import torch

from moe_parallel.contract import SeqChunk
from moe_parallel.model.kv_cache import KVCache, slots_of
from moe_parallel.model.layers import Rotary
from moe_parallel.runtime.profile import section
from moe_parallel.runtime.syncs import host_side
from moe_parallel.step import metadata

log = logging.getLogger(__name__)

# Padded batch sizes with a graph of their own (vLLM captures the same kind of ladder)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)
_FIELDS = 4  # tokens, positions, slots, real (1; 0 for padding): a row each of the head, then the block table
# Seconds spent capturing the bucket ladder when the cache is allocated (the rest: on first use)
CAPTURE_BUDGET_S = float(os.environ.get("MOE_SERVE_GRAPH_CAPTURE_BUDGET_S", "120"))


def batch_bucket(n: int) -> int | None:
    """The smallest bucket holding `n` rows (None: more rows than any graph)."""
    return next((b for b in BATCH_BUCKETS if b >= n), None)


def blocks_bucket(n: int, limit: int) -> int:
    """`n` blocks rounded up to a power of two, at most `limit`."""
    return min(1 << max(0, n - 1).bit_length(), limit)


class DecodeBuffers:
    """One int64 buffer on the device and its host twin (pinned on CUDA), laid out as
    tokens [R], positions [R], slots [R], real [R], then the step's block table [B, NB] packed
    densely, so one contiguous copy carries the whole step and the views stay at fixed
    addresses. The host twin is rewritten only once the last step's copy out of it is done
    (`copied`, an event on CUDA): the step may be queued well before the device reaches it."""

    def __init__(self, rows: int, max_blocks: int, device: torch.device):
        self.rows, self.max_blocks, self.device = rows, max_blocks, device
        size = _FIELDS * rows + rows * max_blocks
        self.host = torch.zeros(size, dtype=torch.int64, device="cpu", pin_memory=device.type == "cuda")
        self.dev = torch.zeros(size, dtype=torch.int64, device=device)
        self.copied = torch.cuda.Event() if device.type == "cuda" else None
        self.copies = 0

    def field(self, i: int, b: int) -> torch.Tensor:
        return self.dev[i * self.rows : i * self.rows + b]

    def tables(self, b: int, nb: int) -> torch.Tensor:
        start = _FIELDS * self.rows
        return self.dev[start : start + b * nb].view(b, nb)

    def stage(self, chunks: list[SeqChunk], b: int, nb: int, block_size: int, scratch_slot: int) -> None:
        """Write the step's rows (padded to `b` rows and `nb` blocks) and send them to the device."""
        if self.copied is not None and self.copies:
            self.copied.synchronize()  # the previous step's copy has left the host buffer
        with host_side():  # host memory only (pinned on CUDA)
            n, r = len(chunks), self.rows
            pos = [c.start for c in chunks]
            head = self.host[: _FIELDS * r].view(_FIELDS, r)
            head[:, :b] = torch.tensor([[c.token_ids[0] for c in chunks] + [0] * (b - n),
                                        pos + [0] * (b - n),
                                        [scratch_slot] * b,
                                        [1] * n + [0] * (b - n)],
                                       device="cpu")
            table = [0] * (b * nb)
            for i, c in enumerate(chunks):
                width = min(len(c.block_table), nb)
                table[i * nb : i * nb + width] = c.block_table[:width]
            start = _FIELDS * r
            tables = self.host[start : start + b * nb].view(b, nb)
            tables.copy_(torch.tensor(table, device="cpu").view(b, nb))
            head[2, :n] = slots_of(tables, torch.arange(n, device="cpu"), head[1, :n], block_size)
        self.dev[: start + b * nb].copy_(self.host[: start + b * nb], non_blocking=True)
        if self.copied is not None:
            self.copied.record(torch.cuda.current_stream(self.device))
        self.copies += 1


def is_plain_decode(batch) -> bool:
    """Whether the step can take the decode path: every chunk one token, no per-position
    logits, no LoRA, no prompt scoring, no micro-batches."""
    return (bool(batch.chunks) and not batch.all_logits and batch.micro_batches == 1
            and all(len(c.token_ids) == 1 and not c.lora and not c.scored for c in batch.chunks))


class DecodeStep:
    """Runs decode steps for one runner: stages the rows, builds the metadata on the device,
    and runs the forward eagerly or, with `graphs`, through the bucket's CUDA graph.
    `experts` (the runner's `LocalExperts`, when the experts are in this process) is told
    which rows are real, so its counts leave the padding out."""

    def __init__(self, model, rotary: Rotary, dtype: torch.dtype, device: torch.device, max_blocks: int,
                 graphs: bool = False, pad: bool | None = None, experts=None):
        if graphs and device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.model, self.rotary, self.dtype, self.device = model, rotary, dtype, device
        self.max_blocks, self.graphs, self.experts = max_blocks, graphs, experts
        self.pad = graphs if pad is None else pad  # padding to buckets; tests turn it on without graphs
        self.buffers: DecodeBuffers | None = None
        # (rows, blocks) -> (graph, logits); None: that pair failed to capture and runs eagerly
        self.captured: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor] | None] = {}
        self.pool = None
        self.steps = 0  # decode steps run on this path

    def sizes(self, chunks: list[SeqChunk], block_size: int) -> tuple[int, int] | None:
        """(rows, blocks) of the step once padded; None when a chunk is beyond the buffers."""
        n = len(chunks)
        need = max(-(-c.end // block_size) for c in chunks)
        if need > self.max_blocks or any(c.end > len(c.block_table) * block_size for c in chunks):
            return None
        if not self.pad:
            return n, need
        b = batch_bucket(n)
        return (None if b is None else (b, blocks_bucket(need, self.max_blocks)))

    def __call__(self, chunks: list[SeqChunk], cache: KVCache) -> torch.Tensor | None:
        """Float32 logits [n, V] of the step's rows; None when the step does not fit the path."""
        logits = self._run(chunks, cache)
        self.steps += logits is not None
        return logits

    def _run(self, chunks: list[SeqChunk], cache: KVCache) -> torch.Tensor | None:
        sizes = self.sizes(chunks, cache.block_size)
        if sizes is None:
            return None
        b, nb = sizes
        self._ensure(b)
        with section("metadata"):
            self.buffers.stage(chunks, b, nb, cache.block_size, cache.scratch_slot)
        graph = self._graph(b, nb, cache) if self.graphs else None
        if graph is None:
            return self._forward(b, nb, cache)[: len(chunks)]
        graph[0].replay()
        return graph[1][: len(chunks)]

    def _graph(self, b: int, nb: int, cache: KVCache):
        """The pair's graph, captured now if it is not yet (None: it runs eagerly)."""
        if (b, nb) not in self.captured:
            self.captured[(b, nb)] = self._try_capture(b, nb, cache)
        return self.captured[(b, nb)]

    def _try_capture(self, b: int, nb: int, cache: KVCache):
        stream = torch.cuda.current_stream(self.device)
        try:
            return self._capture(b, nb, cache)
        except Exception:  # a kernel in the stack that syncs: this pair runs eagerly from now on
            log.exception("capturing the decode CUDA graph for %d rows x %d blocks failed; that bucket runs "
                          "eagerly", b, nb)
            torch.cuda.set_stream(stream)  # a failed capture can leave the thread on the capture stream
            torch.cuda.synchronize(self.device)
            return None

    def capture_ladder(self, cache: KVCache, budget_s: float = CAPTURE_BUDGET_S) -> int:
        """Capture every (batch bucket, blocks bucket) pair up to `max_blocks`, smallest
        contexts first, as long as `budget_s` lasts; returns how many were captured. The
        rows are all padding: their K/V go to the scratch slot, and the counts leave them out."""
        start, done = time.monotonic(), 0
        self._ensure(BATCH_BUCKETS[-1])
        for nb in blocks_ladder(self.max_blocks):
            for b in BATCH_BUCKETS:
                if time.monotonic() - start > budget_s:
                    log.info("decode graphs: %d captured in %.0f s (the budget); the rest on first use", done,
                             time.monotonic() - start)
                    return done
                self.buffers.stage([], b, nb, cache.block_size, cache.scratch_slot)
                done += self._graph(b, nb, cache) is not None
        log.info("decode graphs: %d captured in %.1f s", done, time.monotonic() - start)
        return done

    def _ensure(self, rows: int) -> None:
        if self.buffers is not None and self.buffers.rows >= rows:
            return
        grown = max(rows, 2 * self.buffers.rows if self.buffers is not None else 8)
        self.buffers = DecodeBuffers(grown, self.max_blocks, self.device)
        self.captured.clear()  # the graphs read the old buffers' addresses

    def _forward(self, b: int, nb: int, cache: KVCache) -> torch.Tensor:
        buf = self.buffers
        meta = metadata.from_decode(buf, b, nb, cache.block_size, self.model.config.sliding_window, self.rotary,
                                    self.dtype)
        counts = self.experts if self.pad else None  # unpadded, every row is real: nothing to mask
        if counts is not None:
            counts.real_rows = buf.field(3, b)
        try:
            hidden = self.model(buf.field(0, b), meta, cache)  # [B, D]
        finally:
            if counts is not None:
                counts.real_rows = None
        return self.model.logits(hidden)  # [B, V]

    def _capture(self, b: int, nb: int, cache: KVCache) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Capture the bucket's forward (after one warm-up run on a side stream, as CUDA asks).
        The warm-up computes the current step for real, so the replay that follows rewrites
        the same K/V; it is left out of the experts' counts, which the replay adds."""
        log.debug("capturing the decode graph for %d rows x %d blocks", b, nb)
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side), self._uncounted():
            self._forward(b, nb, cache)
        current.wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._forward(b, nb, cache)
        return graph, out

    def _uncounted(self):
        return contextlib.nullcontext() if self.experts is None else self.experts.uncounted()


def blocks_ladder(max_blocks: int) -> list[int]:
    """Every blocks bucket up to `max_blocks`, smallest first."""
    out, n = [], 1
    while True:
        out.append(blocks_bucket(n, max_blocks))
        if out[-1] >= max_blocks:
            return out
        n = out[-1] + 1
