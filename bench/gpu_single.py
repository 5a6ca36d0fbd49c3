"""The `single` layout against transformers on one GPU (no Ray, no DeepSpeed needed).

    python -m bench.gpu_single                 # on a CUDA machine: a Mixtral-shaped model in bfloat16
    python -m bench.gpu_single --smoke         # tiny shapes on CPU: checks the script itself

The model has Mixtral-8x7B's layer shape (hidden 4096, 14336 intermediate, 8 experts top-2,
32/8 heads) with `--layers` layers (16 by default: about 23B parameters, 47 GB in bfloat16).
transformers builds it with random weights on the device; the engine's model shares the very
same tensors (no second copy), so both run the same model. Reports output tokens/s at batch 1
and 64 for both, the bandwidth and bfloat16 matmul rate measured on the card in the same run,
and the fraction of each the engine reaches (batch 1: active-weight bytes per token per second
over the bandwidth; batch 64: active FLOPs per second over the matmul rate).
"""

from __future__ import annotations

import argparse
import time

import torch

from moe_parallel.batch import SeqChunk, StepBatch
from moe_parallel.config import ModelConfig
from moe_parallel.experts import ExpertGroup
from moe_parallel.kv_cache import KVCache
from moe_parallel.model import CausalLM
from moe_parallel.moe import LocalExperts
from moe_parallel.runner import ModelRunner
from moe_parallel.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=1 << 20, ignore_eos=True)


def mixtral_shape(layers: int, smoke: bool) -> dict:
    if smoke:
        return dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2)
    return dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2)


def build_models(shape: dict, dtype: torch.dtype, device: str, kv_tokens: int, block_size: int = 16):
    from transformers import MixtralConfig, MixtralForCausalLM

    hf_config = MixtralConfig(**shape, max_position_embeddings=4096, rope_theta=1e6)
    with torch.device(device):
        hf = MixtralForCausalLM(hf_config).to(dtype).eval()
    hf.generation_config.eos_token_id = None
    c = ModelConfig.from_dict(hf_config.to_dict() | {"architectures": ["MixtralForCausalLM"]})
    state = hf.state_dict()
    dense = {_our_name(k): v for k, v in state.items() if ".experts." not in k}
    with torch.device(device):
        model = CausalLM.from_dense_weights(c, dense)
        groups = [ExpertGroup(layer.mlp.experts.gate_up_proj.data, layer.mlp.experts.down_proj.data, 0)
                  for layer in hf.model.layers]  # the same tensors as transformers: w1 then w3, stacked
        for layer in model.model.layers:
            layer.block_sparse_moe.experts = LocalExperts(groups)
        cache = KVCache(c.num_layers, -(-kv_tokens // block_size), block_size, c.num_kv_heads, c.head_dim, dtype)
        runner = ModelRunner(model, cache)
    return hf, runner, c


def _our_name(hf_name: str) -> str:
    return hf_name.replace(".mlp.gate.", ".block_sparse_moe.gate.")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def engine_rate(runner: ModelRunner, batch: int, prompt_len: int, new_tokens: int, device: str,
                vocab: int) -> float:
    g = torch.Generator().manual_seed(0)
    prompts = [[1, *torch.randint(3, vocab, (prompt_len - 1,), generator=g).tolist()] for _ in range(batch)]
    per_seq = -(-(prompt_len + new_tokens + 1) // runner.cache.block_size)
    tables = [tuple(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch)]
    tokens, done = [list(p) for p in prompts], [0] * batch
    with torch.device(device):
        sync(device)
        start = time.perf_counter()
        for _ in range(new_tokens):
            chunks = tuple(SeqChunk(i, tuple(tokens[i][done[i]:]), done[i], tables[i], GREEDY, prompt_len, i)
                           for i in range(batch))
            outs = runner.execute(StepBatch(chunks))
            for o in outs:
                done[o.seq_id] = len(tokens[o.seq_id])
                tokens[o.seq_id].append(o.token_id)
        sync(device)
    return batch * new_tokens / (time.perf_counter() - start)


def hf_rate(hf, batch: int, prompt_len: int, new_tokens: int, device: str, vocab: int) -> float:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, prompt_len), generator=g).to(device)
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=0)
    sync(device)
    assert out.shape[1] == prompt_len + new_tokens
    return batch * new_tokens / (time.perf_counter() - start)


def card_limits(device: str, dtype: torch.dtype, smoke: bool) -> tuple[float, float]:
    """(read bandwidth in bytes/s, matmul rate in FLOP/s), measured on the device."""
    n_bytes = (64 if smoke else 4096) * 2**20
    x = torch.ones(n_bytes // 2, dtype=dtype, device=device)
    n = 256 if smoke else 8192
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)

    def best(fn) -> float:
        fn()
        sync(device)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - start)
        return min(times)

    return n_bytes / best(lambda: x.sum()), 2 * n**3 / best(lambda: a @ b)


def active_per_token(c: ModelConfig, dtype: torch.dtype) -> tuple[int, int]:
    size = torch.finfo(dtype).bits // 8
    d, q, kv = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    params = c.num_layers * (2 * d * q + 2 * d * kv + d * c.num_experts
                             + c.experts_per_token * 3 * d * c.intermediate_size) + c.vocab_size * d
    return params * size, 2 * params


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    args = ap.parse_args(argv)
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    new_tokens = 4 if args.smoke else args.new_tokens
    prompt_len = 8 if args.smoke else args.prompt_len
    kv_tokens = max(args.batches) * (prompt_len + new_tokens + 32)
    hf, runner, c = build_models(mixtral_shape(args.layers, args.smoke), dtype, device, kv_tokens)
    params = sum(p.numel() for p in hf.parameters())
    bw, mm = card_limits(device, dtype, args.smoke)
    bytes_tok, flops_tok = active_per_token(c, dtype)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke)"
    lines = [f"Device: {name}; model: {params / 1e9:.2f}B parameters in {str(dtype).split('.')[-1]}, "
             f"{bytes_tok / 1e9:.2f} GB of active weights per token. Measured: read {bw / 1e9:.0f} GB/s, "
             f"matmul {mm / 1e12:.1f} TFLOP/s.", "",
             "| batch | engine tok/s | transformers tok/s | engine / transformers | engine fraction of bound |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    for batch in args.batches:
        engine_rate(runner, batch, prompt_len, 2, device, c.vocab_size)  # warm-up
        ours = engine_rate(runner, batch, prompt_len, new_tokens, device, c.vocab_size)
        theirs = hf_rate(hf, batch, prompt_len, new_tokens, device, c.vocab_size)
        fraction = ours * bytes_tok / bw if batch == 1 else ours * flops_tok / mm
        bound = "bandwidth" if batch == 1 else "matmul"
        lines.append(f"| {batch} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f}x | {fraction:.1%} of {bound} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
