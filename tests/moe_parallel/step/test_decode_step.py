"""The decode step on persistent buffers (`decode.py`): no host round trip from the step's start
to its logits, padded buckets (the CUDA graphs' shapes) that match transformers and leave
every real KV slot as the general path writes it, and CUDA graphs never on a CPU."""

from __future__ import annotations

import pytest
import torch

from bench.greedy import greedy
from moe_parallel.contract import SamplingParams, SeqChunk, StepBatch
from moe_parallel.loading.loader import build_single
from moe_parallel.model import attention
from moe_parallel.runtime.syncs import HostSyncs
from moe_parallel.step.cache_size import CacheSpec
from moe_parallel.step.decode import DecodeBuffers, DecodeStep, batch_bucket, blocks_bucket, blocks_ladder
from tests.moe_parallel.cases import PROMPTS, make
from tests.moe_parallel.model.test_tiled_attention import gqa_checkpoint
from tests.reference import reference_greedy, reference_logits

STEPS = 12


def _prefilled(path, params: SamplingParams, n: int = 3):
    """A runner with `n` prompts prefilled (block i for sequence i); the decode batch that follows."""
    runner = build_single(path, max_model_len=256)
    prompts = PROMPTS[:n]
    runner.execute(StepBatch(tuple(SeqChunk(i, tuple(p), 0, (2 * i, 2 * i + 1), sampling=params,
                                            prompt_len=len(p), seed=i) for i, p in enumerate(prompts))))
    decode = StepBatch(tuple(SeqChunk(i, (7,), len(p), (2 * i, 2 * i + 1), sampling=params, prompt_len=len(p),
                                      seed=i) for i, p in enumerate(prompts)))
    return runner, decode


@pytest.mark.parametrize("variant", ["mixtral", "sliding_window", "tiled"])
def test_decode_step_reads_nothing_back(tmp_path_factory, monkeypatch, variant):
    if variant == "tiled":
        monkeypatch.setattr(attention, "TILE_TOKENS", 8)
    path = make(tmp_path_factory.getbasetemp(), "mixtral" if variant == "tiled" else variant)
    greedy_params = SamplingParams(temperature=0, max_tokens=8)
    runner, decode = _prefilled(path, greedy_params)
    with HostSyncs() as syncs:
        runner.step(decode)
    assert syncs.calls == [] and runner.decode.steps == 1
    with HostSyncs() as syncs:  # and sampled: the tokens themselves are the one read
        runner.execute(decode)
    assert syncs.calls == ["tolist"]
    # sampling parameters (temperatures, k, p, min-p, the draws) go through the staging buffer
    for params in (SamplingParams(temperature=0.8, top_k=5, max_tokens=8),
                   SamplingParams(temperature=0.7, top_p=0.9, min_p=0.05, max_tokens=8),
                   SamplingParams(temperature=1.0, repetition_penalty=1.2, max_tokens=8)):
        runner, decode = _prefilled(path, params)
        with HostSyncs() as syncs:
            runner.execute(decode)
        assert syncs.calls == ["tolist"], params
    # the general path, same batch: the guard sees its round trips (so it can fail)
    runner, decode = _prefilled(path, greedy_params)
    runner.decode = None
    with HostSyncs() as syncs:
        runner.step(decode)
    assert "repeat_interleave" in syncs.reads and "tensor" in syncs.calls


def _collecting(runner, out: list):
    def step(batches):
        logits = [runner.step(b) for b in batches]
        if not batches[0].all_logits:
            out.append(logits[0])
        return logits
    return step


@pytest.mark.parametrize("variant", ["sliding_window", "gqa8", "tiled"])
def test_padded_decode_matches_transformers(tmp_path_factory, monkeypatch, variant):
    """Three sequences padded to a bucket of four rows and their contexts to a power of two of
    blocks, as the CUDA graphs run them: every decode step's logits match transformers at that
    position, the tokens are transformers' greedy ones, and the KV cache holds what the
    general path writes, the padding row's K/V in the scratch slot only."""
    root = tmp_path_factory.getbasetemp()
    if variant == "tiled":
        monkeypatch.setattr(attention, "TILE_TOKENS", 8)
    path = gqa_checkpoint(root, 8) if variant == "gqa8" else make(root, "sliding_window" if variant != "tiled"
                                                                      else "mixtral")
    prompts = PROMPTS[:3]
    small = CacheSpec(num_blocks=64)  # the KV comparisons below read the whole pool: not 1 GiB of it
    padded, general = build_single(path, cache=small, max_model_len=256), build_single(path, cache=small,
                                                                                      max_model_len=256)
    padded.decode.pad = True
    general.decode = None
    logits: list[torch.Tensor] = []
    result = greedy(_collecting(padded, logits), prompts, STEPS)
    assert padded.decode.steps == STEPS and padded.decode.buffers.rows >= batch_bucket(3) == 4
    for i, prompt in enumerate(prompts):
        assert result.tokens[i] == reference_greedy(str(path), prompt, STEPS)
        ref = reference_logits(str(path), prompt + result.tokens[i])[len(prompt):]  # [STEPS, V] decode positions
        ours = torch.stack([step[i] for step in logits])
        assert (ours - ref).abs().max().item() <= 1e-4
    greedy(lambda batches: [general.step(b) for b in batches], prompts, STEPS)
    real = padded.cache.scratch_slot
    for ours, theirs in ((padded.cache.k[:, :real], general.cache.k[:, :real]),
                         (padded.cache.v[:, :real], general.cache.v[:, :real])):
        assert torch.equal(ours != 0, theirs != 0)  # the same slots written, no other
        assert torch.allclose(ours, theirs, atol=1e-5)  # (products of 4 rows, not 3: last bits may differ)
    assert padded.cache.k[:, real].abs().sum() > 0 and general.cache.k[:, real].abs().sum() == 0


def test_buckets_and_what_does_not_fit(tiny_ckpt):
    assert [batch_bucket(n) for n in (1, 3, 8, 33, 256)] == [1, 4, 8, 48, 256] and batch_bucket(257) is None
    assert [blocks_bucket(n, 64) for n in (1, 2, 5, 64)] == [1, 2, 8, 64] and blocks_bucket(40, 48) == 48
    step = DecodeStep(None, None, torch.float32, torch.device("cpu"), max_blocks=4, pad=True)
    chunk = SeqChunk(0, (1,), 10, (0,))
    assert step.sizes([chunk] * 3, 16) == (4, 1)
    assert step.sizes([chunk] * 257, 16) is None  # more rows than any graph: the general path
    assert step.sizes([SeqChunk(0, (1,), 70, tuple(range(5)))], 16) is None  # beyond max_model_len's blocks
    assert step.sizes([SeqChunk(0, (1,), 16, (0,))], 16) is None  # a block table too short for the token
    # and the runner falls back: a step the path refuses still runs, on the general path
    runner = build_single(tiny_ckpt, max_model_len=32)
    batch = StepBatch((SeqChunk(0, (1,), 40, (0, 1, 2)),))
    assert runner.step(batch).shape == (1, runner.model.config.vocab_size) and runner.decode.steps == 0


def test_cuda_graphs_never_on_a_cpu(tiny_ckpt):
    runner = build_single(tiny_ckpt, max_model_len=64)
    assert not runner.graphs_possible() and not runner.decode.graphs and not runner.decode.pad
    assert build_single(tiny_ckpt, max_model_len=64, enforce_eager=True).enforce_eager
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        DecodeStep(runner.model, runner.rotary, torch.float32, torch.device("cpu"), 4, graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_decode_replays_the_eager_step(tmp_path_factory):
    path = make(tmp_path_factory.getbasetemp(), "mixtral")
    runs = {}
    for eager in (False, True):
        runner = build_single(path, torch.bfloat16, device="cuda:0", max_model_len=256, enforce_eager=eager)
        assert runner.decode.graphs == (not eager)
        logits: list[torch.Tensor] = []
        runs[eager] = greedy(_collecting(runner, logits), PROMPTS[:3], STEPS), logits
        if not eager:
            assert runner.decode.captured and runner.decode.steps == STEPS
    (graphed, g_logits), (eager_run, e_logits) = runs[False], runs[True]
    assert graphed.tokens == eager_run.tokens
    assert max((a - b).abs().max().item() for a, b in zip(g_logits, e_logits, strict=True)) <= 1e-2


def test_staging_buffer_hands_back_the_values_and_grows():
    from moe_parallel.runtime.staging import Staging

    staging = Staging(torch.device("cpu"), size=64)
    ints = staging.put(list(range(5)), torch.int64)
    floats = staging.put([0.5, -1.25], torch.float32)
    big = staging.put(list(range(100)), torch.int64)  # past the 64 bytes: a bigger buffer, the old kept
    assert ints.tolist() == list(range(5)) and floats.tolist() == [0.5, -1.25] and big.tolist() == list(range(100))
    assert staging.retired and staging.host.numel() >= 800
    staging.reset()
    assert not staging.retired and staging.put([7.0], torch.float64).tolist() == [7.0]
    assert ints.tolist() == list(range(5))  # what was handed out is the device's own copy


def test_padded_decode_counts_the_real_rows_only(tmp_path_factory):
    """The experts' token counts (the per-expert metric) leave out padding rows, which a graph
    bucket adds, and the start-up dummy step, which is not traffic."""
    path = make(tmp_path_factory.getbasetemp(), "mixtral")
    runner, decode = _prefilled(path, SamplingParams(temperature=0, max_tokens=8))
    experts, k = runner.local_experts(), runner.model.config.experts_per_token
    prompt_rows = sum(len(p) for p in PROMPTS[:3]) * k
    assert experts.tokens_per_expert.sum(1).tolist() == [prompt_rows] * runner.model.config.num_layers
    runner.decode.pad = True
    runner.step(decode)
    assert runner.decode.sizes(list(decode.chunks), 16)[0] == 4  # 3 rows padded to 4
    assert experts.tokens_per_expert.sum(1).tolist() == [prompt_rows + 3 * k] * runner.model.config.num_layers


def test_decode_buffers_are_rewritten_only_after_the_last_copy_left_them(monkeypatch):
    """On CUDA the host buffer's copy to the device is asynchronous: the next step must not
    overwrite it before the device has read it (an event, waited on before each rewrite)."""
    events: list[str] = []

    class Event:
        def synchronize(self):
            events.append("wait")

        def record(self, stream):
            events.append("copy queued")

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    buf = DecodeBuffers(4, 2, torch.device("cpu"))
    buf.copied = Event()
    chunk = SeqChunk(0, (5,), 3, (1,))
    buf.stage([chunk], 1, 1, 16, 99)
    buf.stage([chunk, chunk], 2, 1, 16, 99)
    assert events == ["copy queued", "wait", "copy queued"]
    assert buf.field(0, 2).tolist() == [5, 5] and buf.field(2, 2).tolist() == [19, 19]
    assert buf.field(3, 4).tolist() == [1, 1, 0, 0]  # real rows, then padding


def test_blocks_ladder_covers_every_bucket_up_to_the_limit():
    assert blocks_ladder(48) == [1, 2, 4, 8, 16, 32, 48] and blocks_ladder(1) == [1]
