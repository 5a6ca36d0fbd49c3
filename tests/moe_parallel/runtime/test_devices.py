"""Device discipline: every tensor names its device, in every thread that touches the model.

Strict mode (`MOE_SERVE_STRICT_DEVICES=1`) sets the default device to `meta` in each thread
as it enters the model's code (main thread, the engine's step thread, an expert rank's serving
thread, pipe workers, Ray's actor threads). A tensor made without an explicit device then lands
on `meta`, which cannot compute, so the tokens below could not match transformers' unless
every factory call named the worker's device (`cpu` here, given explicitly).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.greedy import greedy
from moe_parallel.loading.loader import build_single
from moe_parallel.parallel.launch import LocalInstance
from moe_parallel.parallel.workers import InstanceSpec
from moe_parallel.runtime.devices import STRICT_ENV, DeviceError, resolve_device
from moe_parallel.step.cache_size import CacheSpec
from tests.reference import reference_greedy

ROOT = Path(__file__).resolve().parents[3]
PROMPTS = [[1, 5, 9, 33, 70], [1, *range(10, 30)]]
DECODE = 8

SINGLE_UNDER_META = """
import asyncio, json, sys, threading, torch
from engine.engine import EngineConfig
from engine.executor import InProcessExecutor
from engine.factory import make_engine
from moe_parallel.step.cache_size import CacheSpec
from moe_parallel.runtime.devices import enter_thread
from moe_parallel.loading.loader import build_single
from moe_parallel.contract import SamplingParams

path, prompts = sys.argv[1], json.loads(sys.argv[2])
enter_thread()
assert torch.empty(1).device.type == "meta"  # the guard is on in this thread
runner = build_single(path, cache=CacheSpec(64, 16), device="cpu", max_model_len=256)
engine = make_engine(InProcessExecutor(runner), path, EngineConfig(max_model_len=256))

async def run(prompt, params):
    out = []
    async for o in engine.generate(str(len(prompt)) + str(params.temperature), prompt, params):
        out += o.token_ids
    return out

async def main():
    greedy = SamplingParams(temperature=0, max_tokens=1 + {decode}, ignore_eos=True)
    sampled = SamplingParams(temperature=0.7, top_k=50, top_p=0.95, min_p=0.01, seed=3, repetition_penalty=1.2,
                             presence_penalty=0.3, min_tokens=3, logprobs=2, max_tokens=6)
    plain = SamplingParams(temperature=1.0, seed=4, max_tokens=6)
    results = await asyncio.gather(*[run(p, greedy) for p in prompts], run(prompts[0], sampled),
                                   run(prompts[1], plain))
    return results

results = asyncio.run(main())
# the step thread entered the guard by itself (through the runner), not because we asked it to
step_thread = engine.executor.thread.submit(lambda: str(torch.empty(1).device)).result()
print(json.dumps({{"greedy": results[:len(prompts)], "sampled": results[len(prompts):],
                  "step_thread": step_thread}}), flush=True)
# as the ranks do (launch._rank_main): no interpreter teardown with the step thread's OpenMP team
# alive; under load it once aborted here ("terminate called without an active exception")
# after every result was out
import os
os._exit(0)
"""


def _reference(path) -> list[list[int]]:
    return [reference_greedy(str(path), p, 1 + DECODE) for p in PROMPTS]


def test_single_engine_under_meta_default_matches_transformers(tiny_ckpt):
    code = SINGLE_UNDER_META.format(decode=DECODE)
    env = os.environ | {STRICT_ENV: "1"}
    out = subprocess.run([sys.executable, "-c", code, str(tiny_ckpt), json.dumps(PROMPTS)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["step_thread"] == "meta"  # the step thread ran under the guard too
    assert got["greedy"] == _reference(tiny_ckpt)
    assert [len(t) for t in got["sampled"]] == [6, 6]


@pytest.mark.parametrize(("layout", "a", "n"), [("disaggregated", 1, 2), ("colocated", 2, 0)])
def test_process_layouts_under_meta_default_match_transformers(tiny_ckpt, monkeypatch, layout, a, n):
    monkeypatch.setenv(STRICT_ENV, "1")  # inherited by every rank's process
    spec = InstanceSpec(str(tiny_ckpt), layout, a, n, cache=CacheSpec(64, 16), comm_timeout_s=30, device="cpu",
                        max_model_len=256)
    with LocalInstance(spec) as inst:
        result = greedy(inst.step, PROMPTS, 1 + DECODE, ranks=a)  # the prefill's token, then the decodes'
        devices = {i["device"] for i in inst.info}
    assert result.tokens == _reference(tiny_ckpt)
    assert devices == {"cpu"}


def test_ray_instance_under_meta_default_matches_transformers(tiny_ckpt, ray_local, monkeypatch):
    """Ray's actor method threads and the expert serving thread, driven by the engine."""
    from cluster.instance import RayExecutor, RayInstance
    from engine.engine import EngineConfig
    from engine.factory import make_engine
    from moe_parallel.contract import SamplingParams

    monkeypatch.setenv(STRICT_ENV, "1")  # forwarded to the actors through their runtime_env
    spec = InstanceSpec(str(tiny_ckpt), "disaggregated", 1, 2, cache=CacheSpec(64, 16), comm_timeout_s=30,
                        device="cpu", max_model_len=256)
    instance = RayInstance(spec)
    try:
        engine = make_engine(RayExecutor(instance), tiny_ckpt, EngineConfig(max_model_len=256))

        async def run(i, prompt):
            out = []
            params = SamplingParams(temperature=0, max_tokens=1 + DECODE, ignore_eos=True)
            async for o in engine.generate(f"r{i}", prompt, params):
                out += o.token_ids
            return out

        async def main():
            return await asyncio.gather(*[run(i, p) for i, p in enumerate(PROMPTS)])

        assert asyncio.run(main()) == _reference(tiny_ckpt)
    finally:
        instance.shutdown()


def test_a_gpu_that_is_not_there_is_a_clear_error(tiny_ckpt):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(DeviceError, match="accelerator 'gpu' was asked for, but this process sees no CUDA"):
        build_single(tiny_ckpt, device="gpu")
    assert resolve_device("auto") == torch.device("cpu")


def test_local_ranks_get_distinct_gpus_where_several_are_visible(monkeypatch):
    """A launch that shows every GPU to every rank (local processes, torchrun-style): each rank
    takes GPU LOCAL_RANK, which the launcher sets; before, all of them took cuda:0."""
    from moe_parallel.parallel.launch import local_rank_env

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "0")  # restored after the test; local_rank_env overwrites it
    devices = []
    for rank in range(4):
        local_rank_env(rank, 4)
        devices.append(resolve_device("gpu"))
    assert devices == [torch.device("cuda", r) for r in range(4)]


def test_dtype_auto_is_the_checkpoints_as_vllm_picks_it(tmp_path, tiny_ckpt):
    from deployments.config import AppArgs
    from moe_parallel.loading.loader import resolve_dtype

    def ckpt(stored):
        path = tmp_path / str(stored)
        path.mkdir()
        raw = json.loads((tiny_ckpt / "config.json").read_text())
        raw.pop("torch_dtype", None)
        if stored:
            raw["torch_dtype"] = stored
        (path / "config.json").write_text(json.dumps(raw))
        return path

    table = {("bfloat16", "cuda"): torch.bfloat16, ("bfloat16", "cpu"): torch.bfloat16,
             ("float16", "cuda"): torch.float16, ("float16", "cpu"): torch.bfloat16,
             (None, "cuda"): torch.bfloat16, (None, "cpu"): torch.float32,
             ("float32", "cuda"): torch.float32}
    paths = {stored: ckpt(stored) for stored in {s for s, _ in table}}
    assert {key: resolve_dtype("auto", paths[key[0]], key[1]) for key in table} == table
    assert resolve_dtype("float32", paths["bfloat16"], "cuda") == torch.float32  # asked for: kept
    assert AppArgs(model=str(tiny_ckpt)).dtype == "auto" == InstanceSpec(str(tiny_ckpt)).dtype
    assert build_single(tiny_ckpt, "auto", cache=CacheSpec(64, 16), max_model_len=64).dtype == torch.float32
    with pytest.raises(ValueError, match="dtype 'half' is not one of auto, float32"):
        resolve_dtype("half", tiny_ckpt, "cpu")
