"""Prometheus metrics of the whole application, gathered from every engine replica.

Each engine replica pushes its `EngineStats` to the `MetricsHub` deployment about once a
second; `/metrics` renders the sum over replicas in the Prometheus text format. Counters and
histograms of replicas that went away are kept (a counter never goes down); gauges count only
replicas heard from recently. Names follow vLLM's meanings under the `moe_serve:` prefix, plus
the tokens routed to each expert of each layer.
"""

from __future__ import annotations

import copy
import time

from ray import serve

from engine.stats import EngineStats, Histogram

PREFIX = "moe_serve"
GAUGE_TTL_S = 10.0


def merge(snapshots: list[EngineStats], live: list[bool]) -> EngineStats:
    total = EngineStats()
    for s, is_live in zip(snapshots, live, strict=True):
        for name in ("time_to_first_token", "inter_token_latency", "e2e_latency"):
            getattr(total, name).merge(getattr(s, name))
        total.prompt_tokens += s.prompt_tokens
        total.generation_tokens += s.generation_tokens
        total.preemptions += s.preemptions
        total.prefix_cache_queries += s.prefix_cache_queries
        total.prefix_cache_hits += s.prefix_cache_hits
        for reason, n in s.requests_finished.items():
            total.requests_finished[reason] = total.requests_finished.get(reason, 0) + n
        for name, n in s.lora_requests.items():
            total.lora_requests[name] = total.lora_requests.get(name, 0) + n
        for name, n in s.lora_tokens.items():
            total.lora_tokens[name] = total.lora_tokens.get(name, 0) + n
        total.tokens_per_expert = _add_grid(total.tokens_per_expert, s.tokens_per_expert)
        if is_live:
            total.running += s.running
            total.waiting += s.waiting
            total.kv_usage = max(total.kv_usage, s.kv_usage)
    return total


def _add_grid(a: list[list[int]], b: list[list[int]]) -> list[list[int]]:
    if not a:
        return [list(row) for row in b]
    if not b:
        return a
    return [[x + y for x, y in zip(ra, rb, strict=True)] for ra, rb in zip(a, b, strict=True)]


def render(s: EngineStats, model: str, info: dict[str, str] | None = None, resumes: Histogram | None = None) -> str:
    label = f'model_name="{model}"'
    out: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        out.append(f"# HELP {PREFIX}:{name} {help_}")
        out.append(f"# TYPE {PREFIX}:{name} {kind}")
        out.extend(f"{PREFIX}:{name}{suffix} {value}" for suffix, value in samples)

    described = "".join(f',{k}="{v}"' for k, v in sorted((info or {}).items()))
    metric("model_info", "gauge", "The served model: layout, dtype and the experts' quantization (always 1).",
           [(f"{{{label}{described}}}", 1)])

    metric("num_requests_running", "gauge", "Sequences in the running batch.", [(f"{{{label}}}", s.running)])
    metric("num_requests_waiting", "gauge", "Sequences waiting to be scheduled.", [(f"{{{label}}}", s.waiting)])
    metric("kv_cache_usage_perc", "gauge", "Fraction of KV-cache blocks in use (1 = full).",
           [(f"{{{label}}}", round(s.kv_usage, 6))])
    metric("prompt_tokens_total", "counter", "Prompt tokens processed.", [(f"{{{label}}}", s.prompt_tokens)])
    metric("generation_tokens_total", "counter", "Tokens generated.", [(f"{{{label}}}", s.generation_tokens)])
    metric("prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.",
           [(f"{{{label}}}", s.prefix_cache_queries)])
    metric("prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.",
           [(f"{{{label}}}", s.prefix_cache_hits)])
    metric("num_preemptions_total", "counter", "Sequences preempted for lack of KV blocks.",
           [(f"{{{label}}}", s.preemptions)])
    metric("request_success_total", "counter", "Finished requests by finish reason.",
           [(f'{{{label},finished_reason="{r}"}}', n) for r, n in sorted(s.requests_finished.items())])
    for name, help_ in (("time_to_first_token_seconds", "Time to first token."),
                        ("inter_token_latency_seconds", "Time between two tokens of one completion."),
                        ("e2e_request_latency_seconds", "Request arrival to finish.")):
        h = {"time_to_first_token_seconds": s.time_to_first_token, "inter_token_latency_seconds":
             s.inter_token_latency, "e2e_request_latency_seconds": s.e2e_latency}[name]
        metric(name, "histogram", help_, _histogram_samples(h, label))
    metric("lora_requests_total", "counter", "Requests served with each LoRA adapter.",
           [(f'{{{label},lora_name="{n}"}}', v) for n, v in sorted(s.lora_requests.items())])
    metric("lora_generation_tokens_total", "counter", "Tokens generated with each LoRA adapter.",
           [(f'{{{label},lora_name="{n}"}}', v) for n, v in sorted(s.lora_tokens.items())])
    resumes = resumes or Histogram()
    metric("requests_resumed_total", "counter", "Requests resumed on another replica after theirs was lost.",
           [(f"{{{label}}}", resumes.count)])
    metric("resume_seconds", "histogram", "From the loss of a request's replica to its next output elsewhere.",
           _histogram_samples(resumes, label))
    metric("expert_tokens_total", "counter", "Tokens routed to each expert of each layer.",
           [(f'{{{label},layer="{i}",expert="{e}"}}', n) for i, row in enumerate(s.tokens_per_expert)
            for e, n in enumerate(row)])
    return "\n".join(out) + "\n"


def _histogram_samples(h: Histogram, label: str) -> list[tuple[str, float]]:
    samples, running = [], 0
    for bound, n in zip((*h.buckets, "+Inf"), h.counts, strict=True):
        running += n
        samples.append((f'_bucket{{{label},le="{bound}"}}', running))
    return samples + [(f"_sum{{{label}}}", round(h.total, 6)), (f"_count{{{label}}}", h.count)]


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class MetricsHub:
    def __init__(self, model: str, info: dict[str, str] | None = None):
        self.model, self.info = model, info or {}
        self.reports: dict[str, tuple[float, EngineStats]] = {}
        self.parts: dict[str, tuple[int, int]] = {}
        self.ready_replicas: dict[str, float] = {}  # replica -> when its model was up
        self.resumes = Histogram()  # told by the ingresses (deployments/resume.py)

    def resumed(self, seconds: float) -> None:
        """An ingress resumed a request on another replica, `seconds` after its replica was lost."""
        self.resumes.observe(seconds)

    def report(self, replica: str, stats: EngineStats) -> None:
        self.reports[replica] = (time.monotonic(), copy.deepcopy(stats))

    def loading(self, part: str, done: int, total: int) -> None:
        """A worker's loading of one part (`<replica>/<rank>/<part>`): bytes done of its total."""
        self.parts[part] = (done, total)

    def ready(self, replica: str) -> None:
        self.ready_replicas[replica] = time.monotonic()
        self.parts = {k: v for k, v in self.parts.items() if not k.startswith(f"{replica}/")}  # its loading is done

    def health(self) -> dict:
        """Ready while an engine replica that has its model up is heard from (its statistics,
        within GAUGE_TTL_S of the last; a replica just up has that long for its first push);
        until then the fraction loaded over the parts that have started (a part reports its
        size when it starts)."""
        now = time.monotonic()
        if any(now - max(up, self.reports.get(r, (0.0,))[0]) < GAUGE_TTL_S for r, up in self.ready_replicas.items()):
            return {"ready": True}
        done, total = sum(d for d, _ in self.parts.values()), sum(t for _, t in self.parts.values())
        return {"ready": False, "loading": round(done / total, 4) if total else 0.0}

    def render(self) -> str:
        now = time.monotonic()
        entries = list(self.reports.values())
        merged = merge([s for _, s in entries], [now - t < GAUGE_TTL_S for t, _ in entries])
        return render(merged, self.model, self.info, self.resumes)

