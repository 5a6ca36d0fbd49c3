"""Ping-pong micro-batches in the `disaggregated` layout: decode step time for m = 1, 2, 3, 4.

    python -m bench.pingpong [--batches 8 32 64] [--steps 16] [--model DIR]

One instance (1 attention + 2 expert actors on Ray, one CPU each, as `bench.layouts` places
them) on bench-214m; every decode step of the batch is split into m micro-batches, so the
attention actor computes micro-batch i+1 while the expert actors compute micro-batch i. m = 1
is the plain step. The `single` layout in this process is measured in the same run as the
reference. Prints a table of step times and ratios (and writes bench/results/pingpong.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.layouts import CACHE, MAX_LEN, _vocab
from bench.steps import decode_run

RESULTS = Path(__file__).resolve().parent / "results"


def measure(path: Path, batches: list[int], ms: list[int], prompt_len: int, steps: int) -> dict:
    import ray

    from cluster.instance import RayInstance, Resources
    from moe_parallel.loading.loader import build_single
    from moe_parallel.parallel.workers import InstanceSpec

    runner = build_single(path, cache=CACHE, max_model_len=MAX_LEN)
    single = lambda batches_: [runner.execute(batches_[0])]  # noqa: E731
    decode_run(single, batches[0], prompt_len, 2, vocab=_vocab(path))  # warm-up: the first run pays set-up costs
    out = {("single", b): decode_run(single, b, prompt_len, steps, vocab=_vocab(path)) for b in batches}
    ray.init(num_cpus=3, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    try:
        spec = InstanceSpec(str(path), "disaggregated", 1, 2, cache=CACHE, max_model_len=MAX_LEN)
        inst = RayInstance(spec, Resources(num_cpus=1.0))
        try:
            actor = inst.attention_actors[0]

            def execute(batches_):
                return [ray.get(actor.execute.remote(batches_[0]))]

            for b in batches:
                for m in ms:
                    out[(m, b)] = decode_run(execute, b, prompt_len, steps, vocab=_vocab(path), micro_batches=m)
        finally:
            inst.shutdown()
    finally:
        ray.shutdown()
    return out


def table(results: dict, batches: list[int], ms: list[int]) -> str:
    lines = ["Decode step (ms) and output tok/s of the `disaggregated` layout (A=1, N=2 on Ray) with the step split "
             "into m micro-batches; `single` in process from the same run.", "",
             "| batch | " + " | ".join(f"m={m}" for m in ms) + " | single | best m vs m=1 | best m vs single |",
             "| ---: |" + " ---: |" * (len(ms) + 3)]
    for b in batches:
        steps = [results[(m, b)] for m in ms]
        best = min(steps)
        cells = " | ".join(f"{s * 1e3:.1f} ms, {b / s:.0f} tok/s" for s in steps)
        single = results[("single", b)]
        lines.append(f"| {b} | {cells} | {single * 1e3:.1f} ms, {b / single:.0f} tok/s | "
                     f"{steps[0] / best:.2f}x (m={ms[steps.index(best)]}) | {single / best:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from bench.models import bench_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32, 64])
    ap.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    results = measure(args.model or bench_model(), args.batches, args.micro_batches, args.prompt_len, args.steps)
    text = table(results, args.batches, args.micro_batches)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pingpong.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
