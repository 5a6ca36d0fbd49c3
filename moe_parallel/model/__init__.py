"""The Mixtral model as math: config, decoder, attention, KV cache, MoE block, experts (float,
quantized, packed for the native kernels), LoRA, tensor names."""
