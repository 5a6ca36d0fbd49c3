"""The Mixtral decoder, written as the math; where the experts run is plugged in.

    h = x + attention(norm(x));  x = h + moe(norm(h))      per layer
    logits = lm_head(norm(x))

`CausalLM.run` is the one forward: the step's tokens as one or more micro-batches, layer by
layer and within a layer micro-batch by micro-batch. A micro-batch waits for its previous
layer's MoE only when its attention needs it, so with remote experts the attention rank
computes micro-batch i+1 while the expert ranks compute micro-batch i (ping-pong):

    attention  | a0 a1 .. | a0 a1 .. |            layer L, then L+1
    experts    |    e0 e1 |    e0 e1 |            (one layer behind, per micro-batch)

With one micro-batch (and always with local experts) it is the plain forward.

Module names follow the Hub checkpoint's tensor names, so the dense weights load by name.
`CausalLM.empty` builds the model on the meta device, then allocates its parameters
(uninitialised) on the worker's device; `destinations()` says where each checkpoint tensor
goes, and the loader streams them there one by one. No memory or time goes to random
initialisation, and no second copy of the weights ever exists.

Shapes: T tokens in the step, D hidden, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moe_parallel.model import native_layer
from moe_parallel.model.attention import Attention, AttentionMetadata
from moe_parallel.model.config import ModelConfig
from moe_parallel.model.kv_cache import KVCache
from moe_parallel.model.layers import RMSNorm, linear, materialize
from moe_parallel.model.moe import Done, ExpertsBackend, Handle, SparseMoE
from moe_parallel.model.quant import NO_QUANT, QuantConfig, QuantMatrix, QuantSink
from moe_parallel.runtime import compute
from moe_parallel.runtime.profile import timed


class QuantLinear(nn.Module):
    """A bias-free linear layer whose weight is a quantized matrix (`weight` is what `linear` takes)."""

    def __init__(self, weight: QuantMatrix):
        super().__init__()
        self.weight = weight

    def sink(self) -> QuantSink:
        return QuantSink(self.weight, 0, (self.weight.rows, self.weight.cols))


class DecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c, layer)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.block_sparse_moe: nn.Module = SparseMoE(c, layer)
        self.native_plan: native_layer.LayerPlan | None | bool = False  # False: not planned yet

    def start(self, x: torch.Tensor, meta: AttentionMetadata, cache: KVCache,
              micro_batch: int = 0) -> LayerOutput | Done:
        """The layer of micro-batch `micro_batch`: attention now, the MoE started; `wait()` gives x.
        A plain decode step on weights packed for the native kernels is one call (native_layer.py)."""
        if native_layer.step_fits(x, meta):
            if self.native_plan is False:  # planned at the first decode step: after loading swapped the weights
                self.native_plan = native_layer.plan(self)
            if self.native_plan is not None:
                out = native_layer.start(self.native_plan, self.self_attn.layer, micro_batch, x, meta, cache,
                                         self.self_attn)
                if out is not None:
                    return out if isinstance(out, Done) else LayerOutput(*out)
        h = x + self.self_attn(self.input_layernorm(x), meta, cache)
        return LayerOutput(h, self.block_sparse_moe.start(self.post_attention_layernorm(h), micro_batch))


@dataclass(frozen=True)
class LayerOutput:
    h: torch.Tensor  # [T, D] the residual after attention
    moe: Handle  # the MoE of norm(h), on its way

    def wait(self) -> torch.Tensor:
        return self.h + self.moe.wait()


class Decoder(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        # its weight given, not initialised: nn.Embedding's normal_ on the meta device (where
        # models are built, `CausalLM.empty`) imports torch._dynamo, 1.4 s of a rank's start
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size, _weight=torch.empty(c.vocab_size, c.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(c, i) for i in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class CausalLM(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.config = c
        self.model = Decoder(c)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)

    @classmethod
    def empty(cls, c: ModelConfig, dtype: torch.dtype, device: torch.device,
              quant: QuantConfig = NO_QUANT) -> CausalLM:
        """Parameters allocated on `device`, uninitialised: fill them through `destinations()`.
        With `quant`, the attention projections and lm_head are quantized matrices instead (the
        router gates, norms and embeddings stay in `dtype`)."""
        with torch.device("meta"):
            model = cls(c).to(dtype)
        if quant.enabled:
            model._quantize_dense(quant, dtype, device)
        materialize(model, device)
        if c.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        return model.requires_grad_(False).eval()

    def _quantize_dense(self, quant: QuantConfig, dtype: torch.dtype, device: torch.device) -> None:
        c = self.config
        for layer in self.model.layers:
            attn = layer.self_attn
            rows, cols = attn.qkv.shape
            for name, n in zip(("q_proj", "k_proj", "v_proj"), attn.split, strict=True):
                quant.check_shape(n, cols, name)
            quant.check_shape(c.hidden_size, attn.o_proj.in_features, "o_proj")
            del attn.qkv
            attn.qkv = QuantMatrix(rows, cols, quant, device, dtype)
            attn.o_proj = QuantLinear(QuantMatrix(c.hidden_size, attn.o_proj.in_features, quant, device, dtype))
        if not c.tie_word_embeddings:  # a tied lm_head is the embedding table: it stays as it is
            quant.check_shape(c.vocab_size, c.hidden_size, "lm_head")
            self.lm_head = QuantLinear(QuantMatrix(c.vocab_size, c.hidden_size, quant, device, dtype))

    def destinations(self) -> dict[str, torch.Tensor]:
        """Checkpoint tensor name -> the parameter (or slice of one, or quantizing sink) it is loaded into."""
        out = {name: p for name, p in self.named_parameters() if not name.endswith(".qkv")}
        if self.config.tie_word_embeddings:
            out.pop("lm_head.weight", None)
        for i, layer in enumerate(self.model.layers):
            out |= {f"model.layers.{i}.self_attn.{k}.weight": v for k, v in layer.self_attn.projections().items()}
            if isinstance(layer.self_attn.o_proj, QuantLinear):
                out[f"model.layers.{i}.self_attn.o_proj.weight"] = layer.self_attn.o_proj.sink()
        if isinstance(self.lm_head, QuantLinear):
            out["lm_head.weight"] = self.lm_head.sink()
        return out

    def attach_experts(self, backend: ExpertsBackend) -> None:
        """Where every layer's experts run (the loader's choice)."""
        for layer in self.model.layers:
            layer.block_sparse_moe.experts = backend

    def forward(self, token_ids: torch.Tensor, meta: AttentionMetadata, cache: KVCache) -> torch.Tensor:
        """The step's tokens [T] as one micro-batch; returns the final-norm hidden [T, D]."""
        return self.run([(token_ids, meta)], cache)

    def run(self, parts: list[tuple[torch.Tensor, AttentionMetadata]], cache: KVCache) -> torch.Tensor:
        """Micro-batches [(token ids [T_i], metadata)] through every layer; final-norm hidden [T, D]."""
        xs: list[Handle] = [Done(self.embed(tokens)) for tokens, _ in parts]  # [T_i, D] each
        for layer in self.model.layers:
            for i, (_, meta) in enumerate(parts):
                xs[i] = layer.start(xs[i].wait(), meta, cache, i)
        hidden = [x.wait() for x in xs]
        return self.model.norm(hidden[0] if len(hidden) == 1 else torch.cat(hidden))

    @timed("embedding")
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(token_ids)

    @timed("lm_head")
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [T, V] of hidden states [T, D] (on the burst threads: `compute.burst`)."""
        with compute.burst():
            return linear(hidden, self.lm_head.weight).float()
