"""vLLM's own serving benchmark client (`vllm bench serve`) against this server's HTTP route.

    python -m bench.vllm_client [--model DIR] [--keepalive chunk comment] [--max-num-seqs 8]
    python -m bench.vllm_client --against-vllm [--max-num-seqs 64]     # bench-214m, both servers

Starts the app (Ray on loopback, `disaggregated`) on the model (the tiny one by default), with
few engine slots and a short `stream_keepalive_s`, so most of the client's streams wait in the
queue and get keep-alives before their first token; then runs vLLM's client from `make
bench-peers`' virtualenv (random dataset, 32-token prompts, 64 output tokens, EOS ignored, 64
prompts at concurrency 32) once per keep-alive form, and prints its counts and latencies. The
client strips every network read before it splits SSE messages, so a keep-alive that is an SSE
comment on its own glues itself to every later frame of the stream, which then counts as failed.

`--against-vllm` runs the same client against `vllm serve` too, on the same model (bench-214m by
default, float32) with the same `max_num_seqs`, one server after the other: TTFT, TPOT and ITL
as vLLM's own client measures them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
CLIENT = ("import sys; from vllm.benchmarks.serve import add_cli_args, main; "
          "from vllm.utils.argparse_utils import FlexibleArgumentParser; "
          "p = FlexibleArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))")


def serve(model: Path, keepalive: str, max_num_seqs: int) -> str:
    from ray import serve as ray_serve

    from deployments.app import make_app

    args = {"model": str(model), "served_model_name": "bench", "layout": "disaggregated", "max_model_len": 512,
            "max_num_seqs": max_num_seqs, "kv_cache_blocks": 256, "cpus_per_worker": 0.5,
            "stream_keepalive": keepalive, "stream_keepalive_s": 0.5}
    ray_serve.run(make_app(args, {"num_replicas": 1, "max_ongoing_requests": 128}), name=keepalive,
                  route_prefix=f"/{keepalive}")
    return keepalive


def run_client(url: str, model: Path, out: Path, prompts: int, concurrency: int) -> dict:
    cmd = [str(PEERS_PYTHON), "-c", CLIENT, "--backend", "openai", "--base-url", url, "--endpoint",
           "/v1/completions", "--model", "bench", "--tokenizer", str(model), "--dataset-name", "random",
           "--random-input-len", "32", "--random-output-len", "64", "--num-prompts", str(prompts),
           "--max-concurrency", str(concurrency), "--ignore-eos", "--save-result", "--result-dir", str(out.parent),
           "--result-filename", out.name, "--percentile-metrics", "ttft,tpot,itl", "--disable-tqdm"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"vllm bench serve failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def vllm_server(model: Path, max_num_seqs: int, out: Path, prompts: int, concurrency: int) -> dict:
    from bench.peers import _wait, vllm_env
    from moe_parallel.parallel.launch import free_port

    port = free_port()
    cmd = [str(PEERS_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--dtype",
           "float32", "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "512",
           "--served-model-name", "bench", "--max-num-seqs", str(max_num_seqs)]
    server = subprocess.Popen(cmd, env=vllm_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(url, server)
        run_client(url, model, out.with_name("warmup.json"), 4, 1)
        return run_client(url, model, out, prompts, concurrency)
    finally:
        server.terminate()
        server.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="checkpoint dir (default: a fresh tiny model)")
    p.add_argument("--keepalive", nargs="+", default=["chunk", "comment"], choices=["chunk", "comment", "off"])
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--against-vllm", action="store_true", help="also `vllm serve`; bench-214m by default")
    args = p.parse_args(argv)
    if args.against_vllm:
        args.keepalive = args.keepalive[:1]
    if not PEERS_PYTHON.exists():
        print("vLLM's virtualenv is missing: run `make bench-peers` first", file=sys.stderr)
        return 2
    import ray
    from ray import serve as ray_serve

    from cluster import serve_env
    from moe_parallel.loading.tiny import write_checkpoint
    from moe_parallel.parallel.launch import free_port

    tmp = Path(tempfile.mkdtemp())
    model = args.model
    if model is None and args.against_vllm:
        from bench.models import bench_model

        model = bench_model()
    elif model is None:
        model = tmp / "tiny"
        write_checkpoint(model)
    rows = []
    if args.against_vllm:  # first, alone on the machine
        rows.append(("vllm serve", vllm_server(model, args.max_num_seqs, tmp / "vllm.json", args.prompts,
                                               args.concurrency)))
    with serve_env.applied():
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    port = free_port()
    ray_serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        for mode in args.keepalive:
            prefix = serve(model, mode, args.max_num_seqs)
            url = f"http://127.0.0.1:{port}/{prefix}"
            deadline = time.monotonic() + 300
            while httpx.get(f"{url}/health", timeout=5).status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.5)
            url = serve_env.api_url(f"http://127.0.0.1:{port}", prefix)  # the ingress replica's own port, as shipped
            if args.against_vllm:
                run_client(url, model, tmp / "warmup.json", 4, 1)
            r = run_client(url, model, tmp / f"{mode}.json", args.prompts, args.concurrency)
            rows.append((f"this project, keep-alive {mode}", r))
            ray_serve.delete(prefix)
    finally:
        ray_serve.shutdown()
        ray.shutdown()
    print(f"`vllm bench serve` on {model.name}: random dataset, 32-token prompts, 64 output tokens, "
          f"{args.prompts} prompts at concurrency {args.concurrency}, `max_num_seqs: {args.max_num_seqs}`; "
          "this project's keep-alive after 0.5 s without a token\n")
    print("| server | completed | failed | TTFT median ms | TPOT median ms | ITL median ms | output tok/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for mode, r in rows:
        failed = r.get("failed", args.prompts - r["completed"])
        print(f"| {mode} | {r['completed']} | {failed} | {r['median_ttft_ms']:.1f} | {r['median_tpot_ms']:.1f} | "
              f"{r['median_itl_ms']:.1f} | {r['output_throughput']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
