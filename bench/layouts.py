"""The layouts side by side on decode loads, per exchange, and a profile of one decode step.

    python -m bench.layouts [--batches 1 16 32] [--exchanges shm gloo]

`single` runs in this process; `colocated` (ep=2, DeepSpeed's MoE layer, gloo) and
`disaggregated` (1 attention + 2 expert actors, one thread each, on each exchange: shared
memory and gloo) run as Ray actors, driven one step at a time; each instance is started once
and runs every batch. Reported per batch: mean decode step time and tokens/s, as ratios to
`single` in the same run, and the exchange's share of the step: for `disaggregated`, the
attention rank's time in the data plane (posting, and waiting for the outputs) less the
expert ranks' compute as the attention rank waits for it (layer by layer, the later of the
expert ranks: the profile splits that into the slowest rank's total and the imbalance), so it
holds the moves, the wake-ups and the expert ranks' Python around their kernels; for
`colocated`, its all-to-all calls. The profile tables split one decode step
into its parts; the parts plus the unaccounted rest add up to the measured step.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.steps import decode_run
from moe_parallel.loading.loader import build_single
from moe_parallel.runtime import profile
from moe_parallel.step.cache_size import CacheSpec

CACHE = CacheSpec(num_blocks=512, block_size=16)
MAX_LEN = 1024  # the profiles' prompts plus their decode steps stay well inside
PARTS = ["metadata", "embedding", "layer (native)", "attention (native, with norms and router)", "attention", "norm",
         "router", "experts", "dispatch", "combine", "lm_head", "sampling"]
MESSAGES = {"shm": "1 each way per expert rank (header in front of the rows)",
            "gloo": "3 collectives (header, dispatch, combine)"}


def _vocab(path: Path) -> int:
    from moe_parallel.model.config import ModelConfig

    return ModelConfig.from_dir(path).vocab_size


def measure_single(path: Path, batches: list[int], prompt_len: int, steps: int) -> dict[int, dict]:
    runner = build_single(path, cache=CACHE, max_model_len=MAX_LEN)
    execute = lambda batches: [runner.execute(batches[0])]  # noqa: E731
    out = {}
    for batch in batches:
        decode_run(execute, batch, prompt_len, vocab=_vocab(path), steps=2)  # warm-up
        step = decode_run(execute, batch, prompt_len, vocab=_vocab(path), steps=steps)
        profiled = decode_run(execute, batch, prompt_len, vocab=_vocab(path), steps=steps,
                              on_timed=lambda: profile.enable(True))
        report = profile.report()
        profile.enable(False)
        out[batch] = {"step": step, "profiled_step": profiled, "report": report, "steps": steps}
    return out


def measure_ray(path: Path, layout: str, batches: list[int], prompt_len: int, steps: int,
                exchange: str = "auto") -> dict[int, dict]:
    import ray

    from cluster.instance import RayInstance, Resources
    from moe_parallel.parallel.workers import InstanceSpec

    a, n = (2, 0) if layout == "colocated" else (1, 2)
    spec = InstanceSpec(str(path), layout, a, n, cache=CACHE, max_model_len=MAX_LEN, exchange=exchange)
    inst = RayInstance(spec, Resources(num_cpus=1.0))
    try:
        kind = "/".join(sorted({i.get("exchange", "gloo") for i in inst.info}))

        def execute(batches):  # the engine's path: the step channels where they open, else Ray calls
            return inst.step(batches)

        out = {}
        for batch in batches:
            decode_run(execute, batch, prompt_len, vocab=_vocab(path), steps=2, ranks=a)
            step = decode_run(execute, batch, prompt_len, vocab=_vocab(path), steps=steps, ranks=a)
            profiled = decode_run(execute, batch, prompt_len, vocab=_vocab(path), steps=steps, ranks=a,
                                  on_timed=lambda: ray.get([x.profile.remote(True) for x in inst.actors]))
            samples = ray.get([x.profile_samples.remote() for x in inst.actors])
            reports = ray.get([x.profile.remote(False) for x in inst.actors])
            out[batch] = {"step": step, "profiled_step": profiled, "reports": reports, "attention_ranks": a,
                          "steps": steps, "exchange": kind, "layout": layout, "samples": samples}
        return out
    finally:
        inst.shutdown()


def per_step(report: dict, name: str, steps: int) -> float:
    return report.get(name, (0.0, 0))[0] / steps


def imbalance(m: dict) -> float:
    """Seconds per step the attention rank waits for the later of the expert ranks beyond the
    slowest rank's own total: the layers' maxima over the ranks, summed, less that total."""
    s, a = m["steps"], m["attention_ranks"]
    per_layer = [r.get("experts", []) for r in m.get("samples", [])[a:]]
    if m["layout"] != "disaggregated" or not per_layer or len({len(p) for p in per_layer}) != 1:
        return 0.0
    slowest = max(per_step(r, "experts", s) for r in m["reports"][a:])
    return sum(map(max, zip(*per_layer, strict=True))) / s - slowest


def exchange_time(m: dict) -> float:
    """Seconds per step of the exchange (see the module docstring)."""
    s, a = m["steps"], m["attention_ranks"]
    ranks, experts = m["reports"][:a], m["reports"][a:]
    if m["layout"] == "colocated":
        return sum(per_step(r, "comm", s) for r in ranks) / len(ranks)
    waited = sum(per_step(r, "dispatch", s) for r in ranks) / len(ranks)
    return max(0.0, waited - max(per_step(r, "experts", s) for r in experts) - imbalance(m))


def layouts_table(batch: int, single: dict, others: dict[str, dict]) -> str:
    lines = [f"Decode steps at batch {batch}, float32; ratios to `single` measured in the same run.", "",
             "| layout | exchange | messages per MoE layer | step (ms) | tok/s | tok/s vs single | "
             "exchange share of step |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |",
             f"| single (in process) | - | - | {single['step'] * 1e3:.1f} | {batch / single['step']:.1f} | "
             f"1.00x | - |"]
    for m in others.values():
        messages = MESSAGES.get(m["exchange"], "") if m["layout"] == "disaggregated" else "DeepSpeed-MoE all-to-alls"
        lines.append(f"| {m['layout']} (Ray) | {m['exchange']} | {messages} | {m['step'] * 1e3:.1f} | "
                     f"{batch / m['step']:.1f} | {single['step'] / m['step']:.2f}x | "
                     f"{exchange_time(m) / m['profiled_step']:.0%} |")
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


def single_profile(m: dict, batch: int) -> tuple[str, float]:
    rows = [(p, per_step(m["report"], p, m["steps"])) for p in PARTS if m["report"].get(p, (0, 0))[1]]
    return profile_table(f"Profile of one decode step at batch {batch}, `single` layout:", rows, m["profiled_step"])


def disaggregated_profile(m: dict, batch: int) -> tuple[str, float]:
    att, experts = m["reports"][0], m["reports"][1:]
    s = m["steps"]
    rows = [(p, per_step(att, p, s)) for p in PARTS if att.get(p, (0, 0))[1]]
    at = rows.index(("dispatch", per_step(att, "dispatch", s)))
    rows.insert(at + 1, ("  of which expert compute (slowest expert rank)",
                         max(per_step(r, "experts", s) for r in experts)))
    rows.insert(at + 2, ("  of which waiting for the later expert rank, layer by layer", imbalance(m)))
    rows.insert(at + 3, ("  of which the exchange (moves, wake-ups, expert-side Python)", exchange_time(m)))
    rows.append(("driver to rank and back (step channel or Ray call)",
                 m["profiled_step"] - per_step(att, "rank_step", s)))
    return profile_table(f"Profile of one decode step at batch {batch}, `disaggregated` layout (A=1, N=2 on Ray, "
                         f"{m['exchange']}):", rows, m["profiled_step"])


def run(path: Path, batches: list[int], prompt_len: int, steps: int,
        exchanges: tuple[str, ...] = ("shm", "gloo"), profile_batch: int = 16,
        colocated: bool = True) -> tuple[str, list[float]]:
    import ray

    single = measure_single(path, batches, prompt_len, steps)
    ray.init(num_cpus=3, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    try:
        others = {x: measure_ray(path, "disaggregated", batches, prompt_len, steps, x) for x in exchanges}
        if colocated:
            others["colocated"] = measure_ray(path, "colocated", batches, prompt_len, steps)
    finally:
        ray.shutdown()
    text = "\n".join(layouts_table(b, single[b], {k: v[b] for k, v in others.items()}) for b in batches)
    pb = profile_batch if profile_batch in batches else batches[-1]
    p1, r1 = single_profile(single[pb], pb)
    p2, r2 = disaggregated_profile(others[exchanges[0]][pb], pb)
    return text + "\n" + p1 + "\n" + p2, [r1, r2]


def main(argv: list[str] | None = None) -> int:
    from bench.models import bench_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 32])
    ap.add_argument("--exchanges", nargs="+", default=["shm", "gloo"], choices=["shm", "gloo"])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--no-colocated", action="store_true", help="leave the colocated layout out")
    args = ap.parse_args(argv)
    text, rests = run(args.model or bench_model(), args.batches, args.prompt_len, args.steps, tuple(args.exchanges),
                      colocated=not args.no_colocated)
    print(text)
    print("profiles add up to the measured step within " + ", ".join(f"{r:.1%}" for r in rests))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
