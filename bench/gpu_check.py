"""Every layout on one GPU against transformers, without Ray: the device check of the project.

    python -m bench.gpu_check              # on a CUDA machine
    python -m bench.gpu_check --smoke      # tiny shapes on the CPU: checks the script itself

Needs torch, transformers, safetensors and tokenizers; part (b) also needs DeepSpeed (and its
pure-Python dependencies), nothing else of the project's stack (no Ray, no Serve).

(a) `single` on the device: prefill logits and 32 greedy tokens against transformers on the same
    device, in float32 (same tokens; the largest logit difference is reported) and in bfloat16
    (the statistics of the CPU test: mean absolute error < 0.02, median per-position max < 0.1).
(b) `disaggregated` with 1 attention and 2 expert ranks, all three processes on the same device,
    over gloo (which stages CUDA tensors through the host for its all-to-all): the same tokens
    as transformers. One GPU cannot run NCCL between ranks; this proves that every tensor of the
    distributed path lives on the device.
(c) the engine at 64 concurrent sequences with the seed's sampling settings (temperature 0.7,
    top-k 50, top-p 0.95): all finish, none fails; a seeded request gives the same tokens alone
    and inside the crowd.
(d) decode tokens/s at batch 1, 64 and 256 against transformers `generate` on a Mixtral-shaped
    bfloat16 model (hidden 4096, 14336 intermediate, 8 experts top-2, 32/8 heads, `--layers`
    layers) whose weights both sides share, with CUDA graphs and without (`enforce_eager`),
    the card's measured read bandwidth and matmul rate, and the fraction of each the engine
    reaches (bandwidth at batch 1, matmul above).
(e) one attention layer of Mixtral's shape (32/8 heads of 128) in bfloat16, 8 sequences decoding
    at a 32,768-token context: the transient memory of the tiled attention against the
    whole-context gather (peak allocated above the baseline); and one decode step of `single`
    under `torch.cuda.set_sync_debug_mode("error")`: no host synchronisation.
(f) the start-up and decode paths a GPU user meets first: NCCL between two processes on two
    GPUs (skipped, with the reason, on one); `disaggregated` with its KV pool sized from
    `gpu_memory_utilization` (the dummy step runs through the expert ranks at start-up); a
    decode past 1,024 tokens of context with CUDA graphs on (same tokens as eager, graphs kept);
    int8 and int4 experts; decode steps queued without reading their results in between
    (the staged host buffers must not be overwritten under an asynchronous copy).

Prints one markdown table per part; exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from bench.greedy import greedy
from moe_parallel.contract import SamplingParams, SeqChunk, StepBatch
from moe_parallel.loading.checkpoint import TensorSource
from moe_parallel.loading.loader import build_single, load_dense
from moe_parallel.loading.tiny import tiny_config, write_checkpoint
from moe_parallel.model import attention
from moe_parallel.model.config import ModelConfig
from moe_parallel.model.experts import FloatExperts
from moe_parallel.model.kv_cache import KVCache
from moe_parallel.model.moe import LocalExperts
from moe_parallel.runtime.devices import synchronize
from moe_parallel.step import metadata
from moe_parallel.step.cache_size import CacheSpec
from moe_parallel.step.decode import DecodeStep
from moe_parallel.step.runner import ModelRunner

PROMPTS = [[1, 5, 9, 33, 70], [1, *range(10, 40)], [1, 100, 200, 50, 20, 7, 8, 9, 10, 11, 12, 13], [1, 42]]
STEPS = 32
GREEDY = SamplingParams(temperature=0.0, max_tokens=1 << 20, ignore_eos=True)


class Report:
    def __init__(self):
        self.lines: list[str] = []
        self.failures: list[str] = []

    def table(self, title: str, header: list[str], rows: list[list]) -> None:
        self.lines += ["", f"### {title}", "", "| " + " | ".join(header) + " |",
                       "|" + "|".join(" --- " for _ in header) + "|"]
        self.lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]

    def check(self, ok: bool, what: str) -> str:
        if not ok:
            self.failures.append(what)
        return "yes" if ok else "**NO**"


# -- (a) and (b): parity -----------------------------------------------------------------------

def reference(path: Path, dtype: torch.dtype, device: torch.device):
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").to(device).eval()
    model.generation_config.eos_token_id = None
    return model


@torch.inference_mode()
def reference_run(model, device: torch.device) -> tuple[list[torch.Tensor], list[list[int]]]:
    logits, tokens = [], []
    for p in PROMPTS:
        ids = torch.tensor([p], device=device)
        logits.append(model(ids).logits[0].float().cpu())
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS, do_sample=False,
                             pad_token_id=0)
        tokens.append(out[0, len(p):].tolist())
    return logits, tokens


def part_a(path: Path, device: torch.device, report: Report, ref32) -> None:
    rows = []
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        runner = build_single(path, dtype, CacheSpec(num_blocks=64), device=device, max_model_len=512)
        got = greedy(lambda batches, r=runner: [r.step(b).cpu() for b in batches], PROMPTS, STEPS)
        diffs = [(ours - ref).abs() for ours, ref in zip(got.prompt_logits, ref32[0], strict=True)]
        max_diff = max(d.max().item() for d in diffs)
        mean = max(d.mean().item() for d in diffs)
        median = torch.cat([d.max(dim=-1).values for d in diffs]).median().item()
        if dtype == torch.float32:
            ok = report.check(got.tokens == ref32[1], f"(a) single float32 tokens on {device}")
            rows.append([name, f"{max_diff:.2e}", f"{mean:.2e}", f"{median:.2e}", f"same tokens: {ok}"])
        else:
            ok = report.check(mean < 0.02 and median < 0.1, f"(a) single bfloat16 statistics on {device}")
            rows.append([name, f"{max_diff:.3f}", f"{mean:.4f}", f"{median:.4f}", f"mean < 0.02, median < 0.1: {ok}"])
        del runner
    report.table(f"(a) single on {device} vs transformers float32 on {device}",
                 ["dtype", "max abs logit diff", "mean abs diff (worst prompt)", "median per-position max", "check"],
                 rows)


def part_b(path: Path, device: torch.device, report: Report, ref32) -> None:
    try:
        from moe_parallel.parallel.launch import LocalInstance
        from moe_parallel.parallel.workers import InstanceSpec
    except ImportError as exc:
        report.check(False, f"(b) needs DeepSpeed: {exc}")
        return
    spec = InstanceSpec(str(path), "disaggregated", 1, 2, cache=CacheSpec(num_blocks=64), comm_timeout_s=120,
                        device=str(device), backend="gloo", max_model_len=512)
    start = time.perf_counter()
    with LocalInstance(spec) as inst:
        got = greedy(inst.step, PROMPTS, STEPS)
        devices = [i["device"] for i in inst.info]
    max_diff = max((o - r).abs().max().item() for o, r in zip(got.prompt_logits, ref32[0], strict=True))
    ok = report.check(got.tokens == ref32[1], "(b) disaggregated tokens")
    on_device = report.check(all(d == str(device) for d in devices), "(b) every rank on the device")
    report.table("(b) disaggregated A=1, N=2, one device, gloo", ["ranks' devices", "max abs logit diff",
                 "same tokens as transformers", "all on the device", "seconds"],
                 [[", ".join(devices), f"{max_diff:.2e}", ok, on_device, f"{time.perf_counter() - start:.1f}"]])


# -- (c): the engine with sampling ---------------------------------------------------------------

def part_c(path: Path, device: torch.device, report: Report) -> None:
    from engine.engine import EngineConfig
    from engine.executor import InProcessExecutor
    from engine.factory import make_engine

    def engine():
        runner = build_single(path, torch.bfloat16 if device.type == "cuda" else torch.float32,
                              CacheSpec(num_blocks=1024), device=device, max_model_len=512)
        return make_engine(InProcessExecutor(runner), path, EngineConfig(max_model_len=512, max_num_seqs=64))

    sampled = SamplingParams(temperature=0.7, top_k=50, top_p=0.95, max_tokens=48, ignore_eos=True)
    seeded = SamplingParams(temperature=0.7, top_k=50, top_p=0.95, max_tokens=48, ignore_eos=True, seed=1234)
    prompts = [[1, *range(10 + i, 40 + i)] for i in range(64)]

    async def run(e, rid, prompt, params):
        tokens, reason = [], None
        async for out in e.generate(rid, prompt, params):
            tokens += out.token_ids
            reason = out.finish_reason or reason
        return tokens, reason

    async def crowd():
        e = engine()
        jobs = [run(e, f"r{i}", p, sampled) for i, p in enumerate(prompts[1:])]
        return await asyncio.gather(run(e, "seeded", prompts[0], seeded), *jobs, return_exceptions=True)

    async def alone():
        return await run(engine(), "seeded", prompts[0], seeded)

    start = time.perf_counter()
    results = asyncio.run(crowd())
    seconds = time.perf_counter() - start
    errors = [r for r in results if isinstance(r, BaseException)]
    finished = [r for r in results if not isinstance(r, BaseException) and r[1] == "length" and len(r[0]) == 48]
    ok = report.check(not errors and len(finished) == 64, "(c) 64 sampled sequences")
    same = report.check(not errors and asyncio.run(alone())[0] == results[0][0], "(c) seeded request alone = crowded")
    report.table("(c) engine, 64 concurrent sequences, temperature 0.7, top-k 50, top-p 0.95",
                 ["finished", "errors", "all fine", "seeded alone = in the crowd", "tokens/s"],
                 [[len(finished), len(errors) and repr(errors[0])[:80], ok, same, f"{64 * 48 / seconds:.0f}"]])


# -- (d): throughput on a Mixtral-shaped model -------------------------------------------------------

def mixtral_shape(layers: int, smoke: bool) -> dict:
    if smoke:
        return dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2)
    return dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2)


def shared_models(shape: dict, dtype: torch.dtype, device: torch.device, kv_tokens: int, block_size: int = 16):
    """transformers' model with random weights on the device, and ours sharing its expert tensors
    (the dense part is copied: a few GB, where a second copy of the experts would not fit)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    hf_config = MixtralConfig(**shape, max_position_embeddings=4096, rope_theta=1e6)
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: a float32 build of a card-sized model would not fit
    try:
        with torch.device(device):  # transformers' own initialisation, scoped to the device
            hf = MixtralForCausalLM(hf_config).eval()
    finally:
        torch.set_default_dtype(before)
    hf.generation_config.eos_token_id = None
    c = ModelConfig.from_dict(hf_config.to_dict() | {"architectures": ["MixtralForCausalLM"]})
    dense = {k.replace(".mlp.gate.", ".block_sparse_moe.gate."): v for k, v in hf.state_dict().items()
             if ".experts." not in k}
    model = load_dense(TensorSource(dense), c, dtype, device)
    groups = [FloatExperts(layer.mlp.experts.gate_up_proj.data, layer.mlp.experts.down_proj.data, 0)
              for layer in hf.model.layers]  # the same tensors: w1 then w3 stacked, as ours
    experts = LocalExperts(groups)
    cache = KVCache(c.num_layers, -(-kv_tokens // block_size), block_size, c.num_kv_heads, c.head_dim, dtype, device)
    runner = ModelRunner(model, None, experts, device=device)
    runner.attach_cache(cache, 4096)
    return hf, runner, c


def engine_rate(runner: ModelRunner, batch: int, prompt_len: int, new_tokens: int, vocab: int) -> float:
    g = torch.Generator(device="cpu").manual_seed(0)
    prompts = [[1, *torch.randint(3, vocab, (prompt_len - 1,), generator=g).tolist()] for _ in range(batch)]
    per_seq = -(-(prompt_len + new_tokens + 1) // runner.cache.block_size)
    tables = [tuple(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch)]
    tokens, done = [list(p) for p in prompts], [0] * batch
    runner.sampler.states.clear()

    def step() -> None:
        chunks = tuple(SeqChunk(i, tuple(tokens[i][done[i]:]), done[i], tables[i], GREEDY, prompt_len, i)
                       for i in range(batch))
        for o in runner.execute(StepBatch(chunks)):
            done[o.seq_id] = len(tokens[o.seq_id])
            tokens[o.seq_id].append(o.token_id)

    step()  # the prefill, not timed: the rate is the decode steps'
    synchronize(runner.device)
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        step()
    synchronize(runner.device)
    return batch * (new_tokens - 1) / (time.perf_counter() - start)


def hf_rate(hf, batch: int, prompt_len: int, new_tokens: int, device: torch.device, vocab: int) -> float:
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(3, vocab, (batch, prompt_len), generator=g).to(device)
    synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=0)
    synchronize(device)
    assert out.shape[1] == prompt_len + new_tokens
    return batch * new_tokens / (time.perf_counter() - start)


def card_limits(device: torch.device, dtype: torch.dtype, smoke: bool) -> tuple[float, float]:
    """(read bandwidth in bytes/s, matmul rate in FLOP/s), measured on the device."""
    n_bytes = (64 if smoke else 4096) * 2**20
    x = torch.ones(n_bytes // dtype.itemsize, dtype=dtype, device=device)
    n = 256 if smoke else 8192
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)

    def best(fn) -> float:
        fn()
        synchronize(device)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - start)
        return min(times)

    return n_bytes / best(lambda: x.sum()), 2 * n**3 / best(lambda: a @ b)


def active_per_token(c: ModelConfig, dtype: torch.dtype) -> tuple[int, int]:
    d, q, kv = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    params = c.num_layers * (2 * d * q + 2 * d * kv + d * c.num_experts
                             + c.experts_per_token * 3 * d * c.intermediate_size) + c.vocab_size * d
    return params * dtype.itemsize, 2 * params


def part_d(device: torch.device, report: Report, args) -> None:
    dtype = torch.float32 if args.smoke else torch.bfloat16
    new_tokens, prompt_len = (4, 8) if args.smoke else (args.new_tokens, args.prompt_len)
    kv_tokens = max(args.batches) * (prompt_len + new_tokens + 32)
    hf, runner, c = shared_models(mixtral_shape(args.layers, args.smoke), dtype, device, kv_tokens)
    params = sum(p.numel() for p in hf.parameters())
    bw, mm = card_limits(device, dtype, args.smoke)
    bytes_tok, flops_tok = active_per_token(c, dtype)
    graphed = runner.decode  # CUDA graphs where possible (bfloat16 on CUDA)
    eager = DecodeStep(runner.model, runner.rotary, runner.dtype, device, graphed.max_blocks)
    rows, targets = [], []
    for batch in args.batches:
        rates = {}
        for name, decode in (("graphs", graphed), ("eager", eager)):
            runner.decode = decode
            engine_rate(runner, batch, prompt_len, 2, c.vocab_size)  # warm-up at the same shapes (captures)
            rates[name] = engine_rate(runner, batch, prompt_len, new_tokens, c.vocab_size)
        hf_rate(hf, batch, prompt_len, 2, device, c.vocab_size)
        theirs = hf_rate(hf, batch, prompt_len, new_tokens, device, c.vocab_size)
        ours = max(rates.values())
        fraction = ours * bytes_tok / bw if batch == 1 else ours * flops_tok / mm
        bound = "bandwidth" if batch == 1 else "matmul"
        graphs = f"{rates['graphs']:.1f}" if graphed.graphs else "n/a (off)"
        rows.append([batch, graphs, f"{rates['eager']:.1f}", f"{theirs:.1f}", f"{ours / theirs:.2f}x",
                     f"{fraction:.1%} of {bound}"])
        if batch == 1:
            met = report.check(args.smoke or fraction >= 0.7, f"(d) batch 1 at {fraction:.1%} of the bandwidth bound")
            targets.append(f"batch 1: {fraction:.1%} of the bandwidth bound (target >= 70%: {met}), "
                           f"{ours / theirs:.2f}x transformers (target >= 2x)")
    runner.decode = graphed
    report.table(f"(d) decode on {device}: {params / 1e9:.2f}B parameters in {str(dtype).split('.')[-1]}, "
                 f"{bytes_tok / 1e9:.2f} GB of active weights per token; measured read {bw / 1e9:.0f} GB/s, "
                 f"matmul {mm / 1e12:.1f} TFLOP/s",
                 ["batch", "engine tok/s, CUDA graphs", "engine tok/s, eager", "transformers tok/s",
                  "engine / transformers", "engine fraction of bound"], rows)
    report.lines += targets


def attention_memory(device: torch.device, smoke: bool, tile: int) -> tuple[int, torch.Tensor]:
    """Bytes one attention layer allocates above its inputs while 8 sequences decode at a long
    context (the largest single allocation on the CPU, where there is no peak counter)."""
    from torch.profiler import ProfilerActivity, profile

    from moe_parallel.model.attention import Attention
    from moe_parallel.model.layers import Rotary

    heads, kv_heads, head_dim, length, b = (8, 2, 64, 4096, 2) if smoke else (32, 8, 128, 32768, 8)
    dtype, bs = (torch.float32 if smoke else torch.bfloat16), 16
    c = ModelConfig.from_dict(tiny_config(num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                                          hidden_size=heads * head_dim))
    cache = KVCache(1, b * length // bs, bs, kv_heads, head_dim, dtype, device)
    g = torch.Generator(device=device).manual_seed(0)
    cache.k.normal_(generator=g)
    cache.v.normal_(generator=g)
    layer = Attention(c, 0).to(device=device, dtype=dtype)
    torch.nn.init.normal_(layer.qkv, std=0.02, generator=g)
    torch.nn.init.normal_(layer.o_proj.weight, std=0.02, generator=g)
    chunks = tuple(SeqChunk(i, (5,), length - 1, tuple(range(i * length // bs, (i + 1) * length // bs)))
                   for i in range(b))
    old, attention.TILE_TOKENS = attention.TILE_TOKENS, tile
    fused, attention.native_attention = attention.native_attention, lambda q: False  # the torch path's tiles
    try:
        meta = metadata.from_batch(StepBatch(chunks), bs, None, Rotary(head_dim, 1e6, device), dtype, device)
        x = torch.randn(b, c.hidden_size, dtype=dtype, device=device, generator=g)
        with torch.inference_mode():
            if device.type == "cuda":
                synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                out = layer(x, meta, cache)
                synchronize(device)
                return torch.cuda.max_memory_allocated(device) - base, out.float()
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                out = layer(x, meta, cache)
            return max(e.cpu_memory_usage for e in prof.events()), out.float()
    finally:
        attention.TILE_TOKENS, attention.native_attention = old, fused


def part_e(path: Path, device: torch.device, report: Report, smoke: bool) -> None:
    tiled, out_tiled = attention_memory(device, smoke, 256 if smoke else 1024)
    whole, out_whole = attention_memory(device, smoke, 1 << 30)
    err = (out_tiled - out_whole).abs().max().item()
    report.check(tiled < whole and err < 2e-2, f"(e) tiled attention: {tiled} bytes (whole-context gather "
                                               f"{whole}), outputs differ by {err:.2e}")
    rows = [["whole-context gather", f"{whole / 2**20:.1f}"], ["tiled", f"{tiled / 2**20:.1f}"]]
    report.table(f"(e) attention transient memory, one layer, {'2' if smoke else '8'} sequences decoding at a "
                 f"{'4,096' if smoke else '32,768'}-token context (outputs agree within {err:.1e})",
                 ["attention", "MiB above the inputs"], rows)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    runner = build_single(path, dtype, device=device, max_model_len=256, enforce_eager=True)
    runner.execute(StepBatch(tuple(SeqChunk(i, tuple(p), 0, (2 * i, 2 * i + 1), GREEDY, len(p))
                                   for i, p in enumerate(PROMPTS))))
    decode = StepBatch(tuple(SeqChunk(i, (7,), len(p), (2 * i, 2 * i + 1), GREEDY, len(p))
                             for i, p in enumerate(PROMPTS)))
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            runner.step(decode)
            found = "none"
        except RuntimeError as exc:
            found = str(exc).splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    else:
        from moe_parallel.runtime.syncs import HostSyncs

        with HostSyncs() as syncs:
            runner.step(decode)
        found = ", ".join(syncs.calls) or "none"
    report.check(found == "none" and runner.decode.steps == 1,
                 f"(e) host synchronisations in one decode step: {found}")
    report.lines.append(f"\n(e) host synchronisations in one decode step of `single` on {device}: {found}")


# -- (f): start-up, long-context graphs, quantized experts, queued steps -------------------------------

def part_f(path: Path, device: torch.device, report: Report, ref32, smoke: bool) -> None:
    from moe_parallel.parallel.launch import LocalInstance
    from moe_parallel.parallel.workers import InstanceSpec

    rows = []
    if device.type == "cuda" and torch.cuda.device_count() >= 2:
        spec = InstanceSpec(str(path), "disaggregated", 1, 1, cache=CacheSpec(num_blocks=64), device="gpu",
                            dtype="float32", max_model_len=512)
        with LocalInstance(spec) as inst:
            got = greedy(inst.step, PROMPTS, STEPS)
            devices = ", ".join(i["device"] for i in inst.info)
        rows.append(["NCCL, 2 processes on 2 GPUs", devices, report.check(got.tokens == ref32[1], "(f) NCCL tokens")])
    else:
        rows.append(["NCCL, 2 processes on 2 GPUs", "skipped: fewer than two GPUs", "-"])
    cache = CacheSpec(memory_gib=0.05) if device.type == "cpu" else CacheSpec(gpu_memory_utilization=0.3)
    spec = InstanceSpec(str(path), "disaggregated", 1, 2, cache=cache, device=str(device), backend="gloo",
                        dtype="float32", max_model_len=512, comm_timeout_s=120)
    with LocalInstance(spec) as inst:
        got = greedy(inst.step, PROMPTS, STEPS)
        blocks = inst.kv_blocks
    rows.append([f"disaggregated sized by the dummy step ({blocks} blocks)", str(device),
                 report.check(got.tokens == ref32[1], "(f) disaggregated sized by the dummy step: tokens")])
    rows.append(long_context_graphs(path, device, report, smoke))
    rows += quantized(path, device, report, ref32)
    rows.append(queued_steps(path, device, report))
    report.table("(f) start-up, long-context graphs, quantized experts, queued steps", ["case", "where", "ok"], rows)


def long_context_graphs(path: Path, device: torch.device, report: Report, smoke: bool) -> list:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vocab = ModelConfig.from_dir(path).vocab_size
    prompt = [1, *[(7 * i) % (vocab - 3) + 3 for i in range(1100)]]
    tokens = {}
    for eager in (True, False):
        runner = build_single(path, dtype, CacheSpec(num_blocks=256), device=device, max_model_len=2048,
                              enforce_eager=eager)
        tokens[eager] = greedy(lambda b, r=runner: [r.step(x).cpu() for x in b], [prompt], 8).tokens
        graphs = [k for k, v in runner.decode.captured.items() if v is not None and k[1] * 16 > 1024]
    if device.type != "cuda":
        return ["decode past 1,024 tokens, CUDA graphs", "n/a on a CPU", "-"]
    ok = report.check(tokens[True] == tokens[False] and runner.decode.graphs and bool(graphs),
                      "(f) long-context decode with graphs: same tokens, graphs kept")
    return [f"decode past 1,024 tokens, CUDA graphs ({len(graphs)} long-context graphs)", str(device), ok]


def quantized(path: Path, device: torch.device, report: Report, ref32) -> list[list]:
    from moe_parallel.model.quant import QuantConfig

    rows = []
    for scheme in ("int8", "int4"):
        runner = build_single(path, torch.float32, CacheSpec(num_blocks=64), device=device, max_model_len=512,
                              quant=QuantConfig(scheme, group_size=32))
        got = greedy(lambda b, r=runner: [r.step(x).cpu() for x in b], PROMPTS, 8)
        same = sum(a == b for t, r in zip(got.tokens, ref32[1], strict=True) for a, b in zip(t, r[:8], strict=True))
        rows.append([f"{scheme} experts: {same}/{8 * len(PROMPTS)} greedy tokens as float", str(device),
                     report.check(same > 0, f"(f) {scheme} experts run")])
    return rows


def queued_steps(path: Path, device: torch.device, report: Report) -> list:
    """The same decode steps with and without reading each one's logits before the next."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    outs = {}
    for read in (True, False):
        runner = build_single(path, dtype, CacheSpec(num_blocks=64), device=device, max_model_len=512)
        runner.step(StepBatch(tuple(SeqChunk(i, tuple(p), 0, tuple(range(4 * i, 4 * i + 4)))
                                    for i, p in enumerate(PROMPTS))))
        logits = []
        for step in range(8):
            batch = StepBatch(tuple(SeqChunk(i, (10 + step + i,), len(p) + step, tuple(range(4 * i, 4 * i + 4)))
                                    for i, p in enumerate(PROMPTS)))
            out = runner.step(batch).clone()
            logits.append(out.cpu() if read else out)
        outs[read] = torch.stack([x.cpu() for x in logits])
    ok = report.check(torch.equal(outs[True], outs[False]), "(f) queued decode steps = steps read one by one")
    return ["8 decode steps queued without reads = read one by one", str(device), ok]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    ap.add_argument("--parts", default="abcdef", help="which parts to run (default: all)")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda:0")
    report = Report()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    report.lines.append(f"Device: {name}; torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        path = write_checkpoint(Path(tmp) / "tiny", tiny_config())
        ref32 = reference_run(reference(path, torch.float32, device), device) if set("abf") & set(args.parts) else None
        parts = {"a": lambda: part_a(path, device, report, ref32), "b": lambda: part_b(path, device, report, ref32),
                 "c": lambda: part_c(path, device, report), "d": lambda: part_d(device, report, args),
                 "e": lambda: part_e(path, device, report, args.smoke),
                 "f": lambda: part_f(path, device, report, ref32, args.smoke)}
        for key in args.parts:
            start = time.perf_counter()
            try:
                parts[key]()
            except Exception:
                report.check(False, f"({key}) raised:\n{traceback.format_exc()}")
            print(f"part ({key}) done in {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print("\n".join(report.lines))
    print("\n" + ("ALL CHECKS PASSED" if not report.failures else "FAILED:\n" + "\n".join(report.failures)))
    return 1 if report.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
