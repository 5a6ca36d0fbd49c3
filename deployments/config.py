"""The application's arguments (`args:` in serve_config.yaml), validated when the app is built.

Unknown or mistyped fields fail fast with a message naming the field, before any replica or
worker starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from deployments.limits import Limits
from moe_parallel.loading.loader import resolve_dtype, resolve_quant
from moe_parallel.model.config import CheckpointError, ModelConfig
from moe_parallel.model.lora import LoraError, read_adapter
from moe_parallel.model.quant import QuantConfig
from moe_parallel.step.cache_size import CacheSpec, check_fits, cpu_blocks


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="checkpoint directory in the Hugging Face Hub layout")
    served_model_name: str | None = Field(default=None, description="name clients use; default: the directory name")
    layout: Literal["disaggregated", "colocated", "single"] = "disaggregated"
    attention_workers: int = Field(default=1, ge=1)
    expert_groups: int = Field(default=2, ge=1)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="auto: the checkpoint's torch_dtype (bfloat16 for Mixtral; float16 runs as "
                                    "bfloat16 on CPUs; float32 on CPUs when the checkpoint records none)")
    max_model_len: int | None = Field(default=None, ge=16)
    max_num_seqs: int = Field(default=64, ge=1)
    enable_prefix_caching: bool = Field(default=True, description="reuse the KV of prompt prefixes seen before")
    enforce_eager: bool = Field(default=False, description="no CUDA graphs for decode (layout single on a GPU, "
                                                           "bfloat16; never used on CPU)")
    max_num_batched_tokens: int = Field(default=512, ge=16)
    lora_modules: dict[str, str] = Field(default_factory=dict,
                                         description="LoRA adapters served by name: {name: PEFT adapter directory}")
    max_loras: int = Field(default=4, ge=1, description="LoRA adapters resident at once per attention worker")
    max_lora_rank: int = Field(default=16, ge=1, le=256)
    enable_lora_loading: bool = Field(default=False, description="allow /v1/load_lora_adapter and "
                                                                 "/v1/unload_lora_adapter")
    micro_batches: int = Field(default=1, ge=1, le=8, description="ping-pong micro-batches per step (disaggregated); "
                                                                  "1 = off, the measured best on CPU with gloo")
    kv_cache_blocks: int | None = Field(default=None, ge=1,
                                        description="KV blocks per attention worker; default: sized from memory")
    kv_cache_memory_gib: float | None = Field(default=None, gt=0,
                                              description="CPU workers: memory for the KV cache and a step's "
                                                          "activations per attention worker (default 1 GiB); GPU "
                                                          "workers size theirs from gpu_memory_utilization")
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1,
                                          description="share of each GPU the worker may use; KV takes what is left")
    block_size: int = Field(default=16, ge=1)
    quantization: Literal["auto", "none", "int8", "int4"] = Field(
        default="auto", description="experts' weight-only quantization; auto: the checkpoint's own "
                                    "(compressed-tensors) or none")
    group_size: Literal[32, 64, 128, 256] = Field(default=128, description="int4 group size (online quantization)")
    quantize_dense: bool = Field(default=False, description="quantize attention projections and lm_head too")
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    cpus_per_worker: float = Field(default=0.5, gt=0)
    comm_timeout_s: float = Field(default=60.0, gt=0)
    exchange: Literal["auto", "gloo", "shm"] = Field(
        default="auto", description="disaggregated: how attention and expert workers exchange rows; auto: "
                                    "shared memory where all of a replica's workers are CPU workers on one host")
    attention_resource: str | None = Field(default=None, description="custom Ray resource of attention nodes")
    expert_resource: str | None = Field(default=None, description="custom Ray resource of expert nodes")
    api_key_env: str = Field(default="MOE_SERVE_API_KEY", description="environment variable holding the API key")
    api_key: str | None = Field(default=None, description="the key itself (prefer api_key_env, fed from a secret)")
    metrics_require_key: bool = Field(default=True, description="GET /metrics needs the API key too, when one is set")
    limits: Limits = Field(default_factory=Limits, description="bounds on every request (README: Limits)")
    stream_keepalive_s: float = Field(default=5.0, gt=0,
                                      description="a stream still waiting for its first token sends a keep-alive "
                                                  "after this long and as often again, so proxies with idle "
                                                  "timeouts keep it open")
    otlp_traces_endpoint: str | None = Field(
        default=None, description="OpenTelemetry traces of each request, sent over OTLP/HTTP to this endpoint "
                                  "(e.g. http://collector:4318/v1/traces); none: no tracing")
    log_format: Literal["text", "json"] = Field(default="text", description="the replicas' log lines: text, or "
                                                "one JSON object per line (Serve's encoding)")
    resume_timeout_s: float = Field(
        default=60.0, ge=0, description="a request whose engine replica is lost (its instance failed, it died, or "
                                        "it was stopped while draining) resumes on a healthy replica from its tokens "
                                        "so far, if one takes it within this long; 0: it fails with an error frame")
    drain_timeout_s: float = Field(
        default=30.0, ge=0, description="an engine replica being stopped (scaled down, updated) gets this long "
                                        "to finish its requests (Serve's graceful_shutdown_timeout_s); those "
                                        "still running then resume on another replica")
    stream_keepalive: Literal["chunk", "comment", "off"] = Field(
        default="chunk", description="the keep-alive's form: a data chunk with no choices (what OpenAI's usage chunk "
                                     "is: every client reads it, vllm bench serve included), an SSE comment, or none")

    @model_validator(mode="after")
    def _check_model(self) -> AppArgs:
        try:
            c = ModelConfig.from_dir(self.model)
        except CheckpointError as exc:
            raise ValueError(f"model: {exc}") from None
        if self.layout == "disaggregated" and c.num_experts % self.expert_groups:
            raise ValueError(f"expert_groups={self.expert_groups} does not divide the model's "
                             f"{c.num_experts} experts per layer")
        if self.layout == "colocated" and c.num_experts % self.attention_workers:
            raise ValueError(f"attention_workers={self.attention_workers} (the expert-parallel size of the colocated "
                             f"layout) does not divide the model's {c.num_experts} experts per layer")
        if self.max_model_len and self.max_model_len > c.max_position_embeddings:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's max_position_embeddings="
                             f"{c.max_position_embeddings}")
        try:
            quant = self.quant()
        except ValueError as exc:
            raise ValueError(f"quantization: {exc}") from None
        if quant.scheme == "int4" and (c.hidden_size % quant.group_size or c.intermediate_size % quant.group_size):
            raise ValueError(f"group_size={quant.group_size} does not divide the model's hidden_size={c.hidden_size} "
                             f"and intermediate_size={c.intermediate_size}")
        try:
            quant.check_shape(c.intermediate_size, c.hidden_size, "w1/w3")
            quant.check_shape(c.hidden_size, c.intermediate_size, "w2")
        except ValueError as exc:
            raise ValueError(f"quantization: {exc}") from None
        for name, path in self.lora_modules.items():
            try:
                read_adapter(path, c, self.max_lora_rank, name, tensors=False)
            except LoraError as exc:
                raise ValueError(f"lora_modules.{name}: {exc}") from None
        if self.quantize_dense and not quant.enabled:
            raise ValueError("quantize_dense needs quantization int8 or int4")
        blocks = self.kv_cache_blocks
        if blocks is None and self.accelerator == "cpu":
            blocks = cpu_blocks(self.cache_spec(), c, resolve_dtype(self.dtype, self.model, "cpu"))
        if blocks is not None:  # the workers measure, and refuse the same way when they start
            check_fits(blocks, self.block_size, self.max_model_len or c.max_position_embeddings)
        return self

    @property
    def lora_slots(self) -> int:
        """LoRA slots per attention worker: 0 when the app serves no adapters and loads none."""
        return self.max_loras if (self.lora_modules or self.enable_lora_loading) else 0

    def quant(self) -> QuantConfig:
        return resolve_quant(self.model, self.quantization, self.group_size)

    def cache_spec(self) -> CacheSpec:
        return CacheSpec(num_blocks=self.kv_cache_blocks, block_size=self.block_size,
                         memory_gib=self.kv_cache_memory_gib, gpu_memory_utilization=self.gpu_memory_utilization,
                         max_num_batched_tokens=self.max_num_batched_tokens)

    @property
    def name(self) -> str:
        return self.served_model_name or Path(self.model).name

    @property
    def context_len(self) -> int:
        return self.max_model_len or ModelConfig.from_dir(self.model).max_position_embeddings

    @property
    def world(self) -> int:
        if self.layout == "single":
            return 0
        return self.attention_workers + (self.expert_groups if self.layout == "disaggregated" else 0)


def parse_args(raw: dict) -> AppArgs:
    """Validate; raise ValueError with one line per problem, each naming its field."""
    try:
        return AppArgs(**raw)
    except ValidationError as exc:
        lines = []
        for e in exc.errors():
            msg = e["msg"].removeprefix("Value error, ")
            field = ".".join(str(p) for p in e["loc"])
            lines.append(f"{field}: {msg}" if field else msg)
        raise ValueError("invalid application args: " + "; ".join(lines)) from None
    except CheckpointError as exc:
        raise ValueError(f"invalid application args: model: {exc}") from None
