"""Placement planning: how one model instance is split over GPUs, and what each actor asks Ray for.

Given a model's config, a dtype and the GPUs at hand (one pool, or one pool for attention and
another for experts), the plan picks the number of expert ranks (the smallest divisor of the
expert count whose share of expert weights fits one expert GPU, unless given) and the
attention ranks (1 unless given), then reports for every rank the bytes of weights it holds,
and for attention ranks the KV-cache room left and how many tokens it holds. Impossible
requests are refused with the reason (`PlanError`).

Memory model per GPU, the engine's own (`moe_parallel/step/cache_size.py`): usable = memory x
`gpu_memory_utilization` - activation headroom (the engine measures it with a dummy step; the
plan estimates it); weights must fit in it, and on attention ranks the rest is KV cache, in
whole blocks of `block_size` tokens, as the engine allocates it. The weight bytes are those the
engine's ranks hold (a test loads a rank and counts).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moe_parallel.loading.loader import DTYPES
from moe_parallel.model.config import ModelConfig
from moe_parallel.model.quant import NO_QUANT, QuantConfig, matrix_bytes
from moe_parallel.step.cache_size import CacheSpec, blocks_for_budget

GIB = 1024**3
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Resources:
    """What each rank's actor asks Ray for."""

    num_cpus: float = 0.5
    num_gpus: float = 0.0
    # per role ("attention", "expert"): custom resources that pin its actors to a node pool
    custom: dict[str, dict[str, float]] = field(default_factory=dict)

    def bundle(self, role: str = "attention") -> dict[str, float]:
        b = {"CPU": self.num_cpus} | self.custom.get(role, {})
        if self.num_gpus:
            b["GPU"] = self.num_gpus
        return b

    def bundles(self, spec) -> list[dict[str, float]]:
        """One placement-group bundle per rank of an `InstanceSpec`."""
        return [self.bundle("attention" if spec.is_attention(r) else "expert") for r in range(spec.world)]

    @classmethod
    def auto(cls, world: int) -> Resources:
        """One GPU per rank where the cluster has GPUs, else a share of the CPUs."""
        import ray

        if ray.cluster_resources().get("GPU", 0) >= 1:
            return cls(num_cpus=1.0, num_gpus=1.0)
        return cls(num_cpus=min(1.0, max(0.1, ray.cluster_resources().get("CPU", 1) / (world + 1))))


class PlanError(ValueError):
    """No placement satisfies the request; the message says why."""


@dataclass(frozen=True)
class GpuPool:
    count: int
    memory_gib: float
    name: str = "gpu"

    def usable_bytes(self, utilization: float, headroom_gib: float) -> int:
        return int(self.memory_gib * GIB * utilization - headroom_gib * GIB)


@dataclass(frozen=True)
class RankPlan:
    role: str  # "attention" or "expert"
    rank: int
    pool: str
    weight_bytes: int
    experts: tuple[int, int] | None = None  # [first, last] expert ids held
    kv_bytes: int = 0
    kv_tokens: int = 0
    resources: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    model: str
    dtype: str
    attention_ranks: int
    expert_ranks: int
    ranks: tuple[RankPlan, ...]
    kv_bytes_per_token: int
    instances: int  # whole instances the GPUs can hold
    quantization: str = "none"  # of the experts

    @property
    def world(self) -> int:
        return self.attention_ranks + self.expert_ranks


def dense_bytes(c: ModelConfig, dtype: str, quant: QuantConfig = NO_QUANT) -> int:
    """The attention rank's weights; with `quant` (quantize_dense), its attention projections
    and lm_head quantized as the engine holds them, the rest (embeddings, gates, norms) in dtype."""
    d, q, kv = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    per_layer = d * q * 2 + d * kv * 2 + d * c.num_experts + 2 * d
    vocab = c.vocab_size * d * (1 if c.tie_word_embeddings else 2)
    total = (c.num_layers * per_layer + vocab + d) * BYTES[dtype]
    if not quant.enabled:
        return total
    projections = matrix_bytes(q + 2 * kv, d, quant) + matrix_bytes(d, q, quant)
    total += c.num_layers * (projections - (d * q * 2 + d * kv * 2) * BYTES[dtype])
    if not c.tie_word_embeddings:
        total += matrix_bytes(c.vocab_size, d, quant) - c.vocab_size * d * BYTES[dtype]
    return total


def expert_bytes(c: ModelConfig, dtype: str, quant: QuantConfig = NO_QUANT, scale_bytes: int = 2) -> int:
    """One expert, all layers: float in `dtype`, or quantized codes plus their scales (as the
    engine's `QuantMatrix` holds them: w13 fused, then w2; scales of 2 bytes, or 4 where int8 and
    int4 experts run on the native CPU kernels, which keep them (and int4's biases) in float32)."""
    d, f = c.hidden_size, c.intermediate_size
    if not quant.enabled:
        return 3 * d * f * c.num_layers * BYTES[dtype]
    return (matrix_bytes(2 * f, d, quant, scale_bytes) + matrix_bytes(d, f, quant, scale_bytes)) * c.num_layers


def model_bytes(c: ModelConfig, bits: int, group_size: int = 128) -> int:
    """The whole model (dense and experts) with every weight at `bits` (16, 8 or 4): the
    figures of Mixtral's memory table (scales included at 8 and 4 bits)."""
    params = (dense_bytes(c, "float32") // 4) + c.num_experts * expert_bytes(c, "float32") // 4
    if bits == 16:
        return params * 2
    return int(params * QuantConfig("int8" if bits == 8 else "int4", group_size=group_size).bytes_per_weight())


def smallest_instances(c: ModelConfig, dtype: str, gpu_memory_gib: float, utilization: float = 0.9,
                       headroom_gib: float = 2.0) -> list[tuple[str, int, int]]:
    """Per expert quantization: (scheme, expert ranks, GPUs of one instance) on GPUs of this size."""
    rows = []
    pool = GpuPool(1, gpu_memory_gib)
    for scheme in ("none", "int8", "int4"):
        try:
            n = _fewest_expert_ranks(c, dtype, pool, utilization, headroom_gib, QuantConfig(scheme))
        except PlanError:
            continue
        rows.append((scheme, n, n + 1))
    return rows


def make_plan(c: ModelConfig, dtype: str, attention_pool: GpuPool, expert_pool: GpuPool | None = None,
              attention_ranks: int | None = None, expert_ranks: int | None = None,
              gpu_memory_utilization: float = 0.9, headroom_gib: float = 2.0, max_model_len: int | None = None,
              name: str = "model", block_size: int = 16, quant: QuantConfig = NO_QUANT,
              quantize_dense: bool = False) -> Plan:
    util = gpu_memory_utilization
    if dtype not in BYTES:
        raise PlanError(f"dtype {dtype!r} is not one of {', '.join(BYTES)}")
    shared = expert_pool is None
    expert_pool = expert_pool or attention_pool
    a = attention_ranks or 1
    n = expert_ranks or _fewest_expert_ranks(c, dtype, expert_pool, util, headroom_gib, quant)
    if c.num_experts % n:
        raise PlanError(f"{n} expert ranks do not divide the model's {c.num_experts} experts per layer")
    per_expert_rank = expert_bytes(c, dtype, quant) * (c.num_experts // n)
    usable_e = expert_pool.usable_bytes(util, headroom_gib)
    if per_expert_rank > usable_e:
        raise PlanError(f"an expert rank holding {c.num_experts // n} experts needs {per_expert_rank / GIB:.1f} GiB "
                        f"of weights but a {expert_pool.memory_gib:g} GiB GPU leaves {usable_e / GIB:.1f} GiB")
    dense = dense_bytes(c, dtype, quant if quantize_dense else NO_QUANT)
    usable_a = attention_pool.usable_bytes(util, headroom_gib)
    if dense > usable_a:
        raise PlanError(f"an attention rank needs {dense / GIB:.1f} GiB of dense weights but a "
                        f"{attention_pool.memory_gib:g} GiB GPU leaves {usable_a / GIB:.1f} GiB")
    per_token = c.kv_bytes_per_token(BYTES[dtype])
    kv_room = usable_a - dense
    kv_tokens = blocks_for_budget(CacheSpec(block_size=block_size), c, DTYPES[dtype], kv_room) * block_size
    need = max_model_len or c.max_position_embeddings
    if kv_tokens < need:
        raise PlanError(f"an attention rank has room for {kv_tokens} KV tokens, fewer than one "
                        f"sequence of {need} tokens")
    instances = _instances(a, n, attention_pool, expert_pool, shared)
    if instances < 1:
        have = f"{attention_pool.count} GPUs" if shared else \
            f"{attention_pool.count} attention GPUs and {expert_pool.count} expert GPUs"
        raise PlanError(f"one instance needs {a} attention + {n} expert GPUs; there are {have}")
    # the same bundles the engine reserves for its placement group; with two pools, a custom
    # resource that each pool's nodes advertise pins every actor to its own GPUs
    custom = {} if shared else {"attention": {attention_pool.name: 1}, "expert": {expert_pool.name: 1}}
    res = Resources(num_cpus=1.0, num_gpus=1.0, custom=custom)
    ranks = [RankPlan("attention", r, attention_pool.name, dense, kv_bytes=kv_tokens * per_token, kv_tokens=kv_tokens,
                      resources=res.bundle("attention")) for r in range(a)]
    x = c.num_experts // n
    ranks += [RankPlan("expert", a + j, expert_pool.name, per_expert_rank, experts=(j * x, (j + 1) * x - 1),
                       resources=res.bundle("expert")) for j in range(n)]
    return Plan(name, dtype, a, n, tuple(ranks), per_token, instances, quant.scheme)


def _fewest_expert_ranks(c: ModelConfig, dtype: str, pool: GpuPool, util: float, headroom_gib: float,
                         quant: QuantConfig = NO_QUANT) -> int:
    usable = pool.usable_bytes(util, headroom_gib)
    for n in range(1, c.num_experts + 1):
        if c.num_experts % n == 0 and expert_bytes(c, dtype, quant) * (c.num_experts // n) <= usable:
            return n
    raise PlanError(f"even one expert per rank ({expert_bytes(c, dtype, quant) / GIB:.1f} GiB) does not fit a "
                    f"{pool.memory_gib:g} GiB GPU")


def _instances(a: int, n: int, attention_pool: GpuPool, expert_pool: GpuPool, shared: bool) -> int:
    if shared:
        return attention_pool.count // (a + n)
    return min(attention_pool.count // a, expert_pool.count // n)


def render(plan: Plan) -> str:
    experts = "" if plan.quantization == "none" else f", experts in {plan.quantization}"
    lines = [f"Plan for {plan.model} in {plan.dtype}{experts}: {plan.attention_ranks} attention + "
             f"{plan.expert_ranks} expert ranks per instance; {plan.instances} instance(s) fit.",
             "",
             "| rank | role | GPU pool | experts | weights (GiB) | KV cache (GiB) | KV tokens | placement bundle |",
             "| ---: | --- | --- | --- | ---: | ---: | ---: | --- |"]
    for r in plan.ranks:
        experts = f"{r.experts[0]}-{r.experts[1]}" if r.experts else "-"
        kv = f"{r.kv_bytes / GIB:.1f}" if r.role == "attention" else "-"
        tokens = f"{r.kv_tokens:,}" if r.role == "attention" else "-"
        bundle = ", ".join(f"{k}: {v:g}" for k, v in r.resources.items())
        lines.append(f"| {r.rank} | {r.role} | {r.pool} | {experts} | {r.weight_bytes / GIB:.2f} | {kv} | {tokens} | "
                     f"{bundle} |")
    lines.append("")
    lines.append(f"KV cache: {plan.kv_bytes_per_token / 1024:.0f} KiB per token.")
    return "\n".join(lines)


def render_memory(c: ModelConfig, dtype: str, gpu_memory_gib: float) -> str:
    """The model's weights at 16, 8 and 4 bits, and the smallest instance for each expert format."""
    lines = ["Weights of the whole model (every weight at that width; scales included):", "",
             "| bits | weights (GB) |", "| ---: | ---: |"]
    lines += [f"| {bits} | {model_bytes(c, bits) / 1e9:.1f} |" for bits in (16, 8, 4)]
    lines += ["", f"Smallest instance on {gpu_memory_gib:g} GiB GPUs (dense part in {dtype}):", "",
              "| experts | expert ranks | GPUs per instance | GiB per expert rank |", "| --- | ---: | ---: | ---: |"]
    for scheme, n, gpus in smallest_instances(c, dtype, gpu_memory_gib):
        per_rank = expert_bytes(c, dtype, QuantConfig(scheme)) * (c.num_experts // n)
        lines.append(f"| {dtype if scheme == 'none' else scheme} | {n} | {gpus} | {per_rank / GIB:.1f} |")
    return "\n".join(lines)
