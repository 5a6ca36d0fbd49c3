"""The native decode layer (model/native_layer.py, `native.decode_layer`): every decode step's
logits against transformers' MixtralForCausalLM on the sequence so far, the layer's Python path
against it, the expert counts, and the steps it must leave to the Python path."""

from __future__ import annotations

import pytest
import torch

from bench.greedy import _run, _Seq
from moe_parallel import native
from moe_parallel.loading.loader import build_single
from moe_parallel.model import native_layer
from moe_parallel.model.config import ModelConfig
from moe_parallel.model.quant import NO_QUANT, QuantConfig
from tests.moe_parallel.cases import PROMPTS, make
from tests.moe_parallel.native_support import require_library
from tests.reference import reference_logits

require_library()

STEPS = 12


@pytest.fixture
def calls(monkeypatch):
    """How many times the native layer ran."""
    seen = []
    real = native.decode_layer

    def counted(*args, **kwargs):
        seen.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(native, "decode_layer", counted)
    return seen


def decode(path, dtype=torch.float32, enabled=True, quant=NO_QUANT):
    """Greedy decode of PROMPTS as one batch: (tokens per prompt, each decode step's logits
    [STEPS, V] per prompt, the runner's expert counts)."""
    runner = build_single(path, dtype, max_model_len=128, quant=quant)
    step = lambda batches: [runner.step(b) for b in batches]  # noqa: E731
    seqs = [_Seq(i, list(p), tuple(range(4 * i, 4 * i + 4))) for i, p in enumerate(PROMPTS)]
    before, native_layer.ENABLED = native_layer.ENABLED, enabled
    try:
        logits = _run(step, seqs, 1, all_logits=True)
        tokens, steps = [[] for _ in seqs], [[] for _ in seqs]
        for _ in range(STEPS):
            for s in seqs:
                s.tokens.append(int(logits[s.seq_id][-1].argmax()))
                tokens[s.seq_id].append(s.tokens[-1])
            logits = _run(step, seqs, 1, all_logits=False)
            for s in seqs:
                steps[s.seq_id].append(logits[s.seq_id][0])
    finally:
        native_layer.ENABLED = before
    return tokens, [torch.stack(x) for x in steps], runner.local_experts().tokens_per_expert.clone()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_experts_run_in_the_native_layer(tiny_ckpt, calls, dtype):
    """int8 experts packed for the native kernels: each decode layer is still one native call
    (the int8 scales passed along), with the tokens and logits of the Python path over the same
    packed experts."""

    if not native.has_q8():
        pytest.skip(f"{native.isa()} has no int8 products (its int8 experts run on torch's kernels)")
    int8 = QuantConfig("int8")
    tokens, logits, counts = decode(tiny_ckpt, dtype, quant=int8)
    assert len(calls) == STEPS * ModelConfig.from_dir(tiny_ckpt).num_layers
    ref_tokens, ref_logits, ref_counts = decode(tiny_ckpt, dtype, enabled=False, quant=int8)
    assert tokens == ref_tokens and torch.equal(counts, ref_counts)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for a, b in zip(logits, ref_logits, strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("variant", ["mixtral", "sliding_window", "e4_k1", "e6_k3"])
def test_every_decode_step_matches_transformers(tmp_path_factory, variant, calls):
    path = make(tmp_path_factory.getbasetemp(), variant)
    tokens, steps, _ = decode(path)
    layers = build_single(path, max_model_len=16).model.config.num_layers
    assert len(calls) == STEPS * layers  # every layer of every decode step, none of the prefill
    for prompt, toks, got in zip(PROMPTS, tokens, steps, strict=True):
        ref = reference_logits(str(path), prompt + toks)[len(prompt):]  # the logits after each fed token
        torch.testing.assert_close(got, ref[: STEPS], atol=1e-4, rtol=0)


def test_the_python_path_gives_the_same_steps_and_counts(tmp_path_factory, calls):
    path = make(tmp_path_factory.getbasetemp(), "mixtral")
    tokens, steps, counts = decode(path)
    ran = len(calls)
    tokens_py, steps_py, counts_py = decode(path, enabled=False)
    assert ran > 0 and len(calls) == ran  # the second run never took it
    assert tokens == tokens_py and torch.equal(counts, counts_py)
    for a, b in zip(steps, steps_py, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_bfloat16_decode_stays_with_its_python_path(tmp_path_factory, calls):
    """Same kernels and roundings; the norms' sums of squares run in another order, so a logit
    may move by a bfloat16 ulp of an activation: bounded like the other bfloat16 tests."""
    path = make(tmp_path_factory.getbasetemp(), "mixtral")
    _, steps, _ = decode(path, torch.bfloat16)
    assert calls
    _, steps_py, _ = decode(path, torch.bfloat16, enabled=False)
    first = torch.stack([s[0] for s in steps]) - torch.stack([s[0] for s in steps_py])
    assert first.abs().mean() < 0.02  # the first decode step: same tokens fed on both paths


def test_layers_not_packed_for_it_keep_the_python_path(tmp_path_factory):
    path = make(tmp_path_factory.getbasetemp(), "mixtral")
    runner = build_single(path, max_model_len=64)
    layer = runner.model.model.layers[0]
    assert native_layer.plan(layer) is not None
    layer.self_attn.qkv = layer.self_attn.qkv.packed  # not a NativeMatrix
    assert native_layer.plan(layer) is None


class Elsewhere:
    """An experts backend that is not `LocalExperts` (as `disaggregated`'s remote experts are
    not): the native layer stops at the routing and hands the rows over."""

    def __init__(self, local):
        self.local = local

    def start(self, layer, micro_batch, x, weights, ids):
        return self.local.start(layer, micro_batch, x, weights, ids)


def test_the_attention_block_hands_remote_experts_the_rows_transformers_routes(tmp_path_factory, monkeypatch):
    path = make(tmp_path_factory.getbasetemp(), "e6_k3")
    seen = []
    real = native.decode_attention_block
    monkeypatch.setattr(native, "decode_attention_block", lambda *a: seen.append(1) or real(*a))
    runner = build_single(path, max_model_len=128)
    runner.model.attach_experts(Elsewhere(runner.local_experts()))
    step = lambda batches: [runner.step(b) for b in batches]  # noqa: E731
    seqs = [_Seq(i, list(p), tuple(range(4 * i, 4 * i + 4))) for i, p in enumerate(PROMPTS)]
    logits = _run(step, seqs, 1, all_logits=True)
    got = [[] for _ in seqs]
    for _ in range(4):
        for s in seqs:
            s.tokens.append(int(logits[s.seq_id][-1].argmax()))
        logits = _run(step, seqs, 1, all_logits=False)
        for s in seqs:
            got[s.seq_id].append(logits[s.seq_id][0])
    assert len(seen) == 4 * runner.model.config.num_layers
    for prompt, s, steps in zip(PROMPTS, seqs, got, strict=True):
        ref = reference_logits(str(path), s.tokens)[len(prompt):]
        torch.testing.assert_close(torch.stack(steps), ref, atol=1e-4, rtol=0)
