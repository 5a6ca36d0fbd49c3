"""The three layouts side by side on one decode load, and a profile of one decode step.

    python -m bench.layouts [--batch 16]

`single` runs in this process; `colocated` (ep=2, DeepSpeed's MoE layer) and `disaggregated`
(1 attention + 2 expert actors) run as Ray actors over gloo, driven one step at a time.
Reported: mean decode step time, tokens/s, both as ratios to `single`, and the share of the
step spent in all-to-all communication (on the attention ranks). The profile tables split one
decode step into its parts; the parts plus the unaccounted rest add up to the measured step.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.steps import decode_run
from moe_parallel import profile
from moe_parallel.cache_size import CacheSpec
from moe_parallel.layouts import build_single

CACHE = CacheSpec(num_blocks=512, block_size=16)
MAX_LEN = 1024  # the profiles' prompts plus their decode steps stay well inside
PARTS = ["metadata", "embedding", "attention", "norm", "router", "experts", "dispatch", "combine", "lm_head",
         "sampling"]


def _vocab(path: Path) -> int:
    from moe_parallel.config import ModelConfig

    return ModelConfig.from_dir(path).vocab_size


def measure_single(path: Path, batch: int, prompt_len: int, steps: int) -> dict:
    runner = build_single(path, cache=CACHE, max_model_len=MAX_LEN)
    execute = lambda batches: [runner.execute(batches[0])]  # noqa: E731
    decode_run(execute, batch, prompt_len, vocab=_vocab(path), steps=2)  # warm-up
    step = decode_run(execute, batch, prompt_len, vocab=_vocab(path), steps=steps)
    profiled = decode_run(execute, batch, prompt_len, vocab=_vocab(path), steps=steps,
                          on_timed=lambda: profile.enable(True))
    report = profile.report()
    profile.enable(False)
    return {"step": step, "profiled_step": profiled, "report": report, "steps": steps}


def measure_ray(path: Path, layout: str, batch: int, prompt_len: int, steps: int) -> dict:
    import ray

    from cluster.instance import RayInstance, Resources
    from moe_parallel.workers import InstanceSpec

    a, n = (2, 0) if layout == "colocated" else (1, 2)
    spec = InstanceSpec(str(path), layout, a, n, cache=CACHE, max_model_len=MAX_LEN)
    inst = RayInstance(spec, Resources(num_cpus=1.0))
    try:
        actors = inst.attention_actors

        def execute(batches):
            return ray.get([x.execute.remote(b) for x, b in zip(actors, batches, strict=True)])

        decode_run(execute, batch, prompt_len, vocab=_vocab(path), steps=2, ranks=a)
        step = decode_run(execute, batch, prompt_len, vocab=_vocab(path), steps=steps, ranks=a)
        profiled = decode_run(execute, batch, prompt_len, vocab=_vocab(path), steps=steps, ranks=a,
                              on_timed=lambda: ray.get([x.profile.remote(True) for x in inst.actors]))
        reports = ray.get([x.profile.remote(False) for x in inst.actors])
        return {"step": step, "profiled_step": profiled, "reports": reports, "attention_ranks": a,
                "steps": steps}
    finally:
        inst.shutdown()


def per_step(report: dict, name: str, steps: int) -> float:
    return report.get(name, (0.0, 0))[0] / steps


def layouts_table(batch: int, single: dict, others: dict[str, dict]) -> str:
    lines = [f"Decode steps at batch {batch}, float32; ratios to `single` measured in the same run.", "",
             "| layout | step (ms) | tok/s | step time vs single | tok/s vs single | all-to-all share of step |",
             "| --- | ---: | ---: | ---: | ---: | ---: |",
             f"| single (in process) | {single['step'] * 1e3:.1f} | {batch / single['step']:.1f} | 1.00x | 1.00x | - |"]
    for name, m in others.items():
        ranks = m["reports"][: m["attention_ranks"]]
        comm = sum(per_step(r, "comm", m["steps"]) for r in ranks) / len(ranks)
        lines.append(f"| {name} (Ray) | {m['step'] * 1e3:.1f} | {batch / m['step']:.1f} | "
                     f"{m['step'] / single['step']:.2f}x | {single['step'] / m['step']:.2f}x | "
                     f"{comm / m['profiled_step']:.0%} |")
    return "\n".join(lines) + "\n"


def profile_table(title: str, rows: list[tuple[str, float]], measured: float) -> str:
    lines = [title, "", "| part | ms per step | share |", "| --- | ---: | ---: |"]
    for name, sec in rows:
        lines.append(f"| {name} | {sec * 1e3:.2f} | {sec / measured:.0%} |")
    accounted = sum(sec for name, sec in rows if not name.startswith("  "))
    rest = measured - accounted
    lines.append(f"| unaccounted (residual adds, Python between parts) | {rest * 1e3:.2f} | {rest / measured:.0%} |")
    lines.append(f"| **measured step** | **{measured * 1e3:.2f}** | 100% |")
    return "\n".join(lines) + "\n", abs(rest) / measured


def single_profile(m: dict) -> tuple[str, float]:
    rows = [(p, per_step(m["report"], p, m["steps"])) for p in PARTS if m["report"].get(p, (0, 0))[1]]
    return profile_table("Profile of one decode step, `single` layout:", rows, m["profiled_step"])


def disaggregated_profile(m: dict) -> tuple[str, float]:
    att, experts = m["reports"][0], m["reports"][1:]
    s = m["steps"]
    rows = [(p, per_step(att, p, s)) for p in PARTS if att.get(p, (0, 0))[1]]
    rows.insert(rows.index(("dispatch", per_step(att, "dispatch", s))) + 1,
                ("  of which all-to-all calls (incl. waiting for experts)", per_step(att, "comm", s)))
    compute = max(per_step(r, "experts", s) for r in experts)
    rows.insert(rows.index(("dispatch", per_step(att, "dispatch", s))) + 2,
                ("  of which expert compute (slowest expert rank)", compute))
    rows.append(("Ray call overhead", m["profiled_step"] - per_step(att, "rank_step", s)))
    return profile_table("Profile of one decode step, `disaggregated` layout (A=1, N=2 on Ray):", rows,
                         m["profiled_step"])


def run(path: Path, batch: int, prompt_len: int, steps: int) -> tuple[str, list[float]]:
    import ray

    single = measure_single(path, batch, prompt_len, steps)
    ray.init(num_cpus=3, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    try:
        others = {name: measure_ray(path, name, batch, prompt_len, steps) for name in ("colocated", "disaggregated")}
    finally:
        ray.shutdown()
    text = layouts_table(batch, single, others)
    p1, r1 = single_profile(single)
    p2, r2 = disaggregated_profile(others["disaggregated"])
    return text + "\n" + p1 + "\n" + p2, [r1, r2]


def main(argv: list[str] | None = None) -> int:
    from bench.models import bench_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--model", type=Path, default=None)
    args = ap.parse_args(argv)
    text, rests = run(args.model or bench_model(), args.batch, args.prompt_len, args.steps)
    print(text)
    print("profiles add up to the measured step within " + ", ".join(f"{r:.1%}" for r in rests))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
