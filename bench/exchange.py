"""One layer's exchange between an attention rank and its expert ranks, per transport.

    python -m bench.exchange [--rows 1 64 4096] [--hidden 512] [--iters 200] [--spin-us 0 20] [--ring-kib 2048]

A=1 attention rank and N=2 expert ranks as separate processes on this host, joined exactly as
an instance joins them (a gloo group, then `shm.setup`), exchanging through the data planes the
model uses (`dispatch.CollectivePlane` on gloo, `dispatch.ShmPlane`). Per round: the attention
rank posts R routed rows (header + dispatch), the expert ranks echo them back (combine), the
attention rank waits; the experts compute nothing, so the time is the exchange alone. Prints
microseconds per round (median, p90) for each transport and row count.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time
from datetime import timedelta

PARTS = ("gloo", "shm")


def _rank(rank: int, world: int, port: int, transport: str, rows: list[int], hidden: int, iters: int,
          spin_us: float, out, ring_kib: int = 2048) -> None:
    os.environ["MOE_SERVE_SHM_SPIN_US"] = str(spin_us)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from moe_parallel.parallel import shm
    from moe_parallel.parallel.dispatch import Op, Topology, make_plane

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    import deepspeed.comm as ds

    ds.init_distributed("gloo", auto_mpi_discovery=False, verbose=False)
    topo = Topology(1, world - 1, 8)
    seg = shm.setup(transport, rank, 1, world - 1, shm.available(), ring_kib << 10)
    plane = make_plane(topo, hidden, torch.float32, torch.device("cpu"), seg, rank, 60.0, "gloo")
    try:
        if rank == 0:
            results = {}
            for r in rows:
                x = torch.randn(r, hidden)
                counts = torch.zeros(topo.expert_ranks, topo.experts_per_rank, dtype=torch.int64)
                for i in range(r):  # rows spread over both expert ranks' first expert
                    counts[i % topo.expert_ranks, 0] += 1
                sizes = counts.sum(1).tolist()
                times = []
                for i in range(iters + 20):
                    y = torch.empty_like(x)
                    t = time.perf_counter()
                    plane.wait(plane.post(Op.LAYER, 0, 0, counts, x, y, sizes))
                    if i >= 20:
                        times.append(time.perf_counter() - t)
                    plane.control(Op.STEP_DONE)
                assert torch.equal(y, x), "the echo came back different"
                times.sort()
                results[r] = (statistics.median(times) * 1e6, times[int(0.9 * len(times))] * 1e6)
            plane.control(Op.SHUTDOWN)
            out.put(results)
        else:
            while True:
                op, _, _, counts, x = plane.receive()
                if op == Op.SHUTDOWN:
                    break
                if op == Op.LAYER:
                    plane.reply(x, [sum(c) for c in counts])
    finally:
        plane.close()
        dist.destroy_process_group()


def measure(transport: str, rows: list[int], hidden: int, iters: int, spin_us: float, experts: int = 2,
            ring_kib: int = 2048) -> dict:
    from moe_parallel.parallel.launch import free_port

    ctx = mp.get_context("spawn")
    out, port, world = ctx.Queue(), free_port(), 1 + experts
    procs = [ctx.Process(target=_rank, args=(r, world, port, transport, rows, hidden, iters, spin_us, out, ring_kib))
             for r in range(world)]
    for p in procs:
        p.start()
    try:
        return out.get(timeout=600)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()


def table(rows: list[int], hidden: int = 512, iters: int = 200, spins: list[float] | None = None,
          transports: list[str] | None = None, ring_kib: int = 2048) -> str:
    lines = [f"One layer's exchange, A=1 attention rank, N=2 expert ranks (echo), hidden {hidden}, float32, "
             f"microseconds per round trip (median / p90), {iters} rounds.", "",
             "| transport | spin us | " + " | ".join(f"{r} rows" for r in rows) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in rows) + " |"]
    for transport in transports or list(PARTS):
        for spin in (spins or [0.0]) if transport == "shm" else [0.0]:
            res = measure(transport, rows, hidden, iters, spin, ring_kib=ring_kib)
            lines.append(f"| {transport} | {spin:g} | " + " | ".join(f"{res[r][0]:.0f} / {res[r][1]:.0f}" for r in rows)
                         + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 64, 4096])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--spin-us", type=float, nargs="+", default=[0.0])
    ap.add_argument("--transports", nargs="+", default=list(PARTS), choices=PARTS)
    ap.add_argument("--ring-kib", type=int, default=2048, help="shm ring size (InstanceSpec.shm_ring_kib)")
    args = ap.parse_args(argv)
    print(table(args.rows, args.hidden, args.iters, args.spin_us, args.transports, args.ring_kib))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
