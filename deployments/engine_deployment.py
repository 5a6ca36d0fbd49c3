"""The engine deployment: each replica owns one whole model instance.

The replica's placement group (from the deployment's `placement_group_bundles`: bundle 0 for
the replica itself, then one bundle per worker) is where the instance's attention and expert
actors go, so Ray Serve scales and places whole instances. Every replica pushes its
statistics to the metrics hub once a second; `check_health` probes every worker, so a dead
actor gets the replica replaced.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import ray
from ray import serve

from cluster.instance import RayExecutor, RayInstance, Resources
from deployments import tracing
from deployments.config import parse_args
from deployments.outputs_channel import Outlets, RequestFailure
from engine.engine import EngineConfig
from engine.factory import make_engine, single_engine
from engine.outputs import EngineDeadError, RequestOutput
from engine.stats import EngineStats
from moe_parallel.contract import SamplingParams
from moe_parallel.loading import progress
from moe_parallel.parallel.workers import InstanceSpec

log = logging.getLogger(__name__)
PUSH_PERIOD_S = 1.0


class EngineDeployment:
    def __init__(self, args: dict, hub=None):
        self.args = parse_args(args)
        self.tracer = tracing.tracer(self.args.otlp_traces_endpoint, "engine")
        self.hub = hub
        self.replica = _replica_id()
        a = self.args
        config = EngineConfig(max_model_len=a.context_len, max_num_seqs=a.max_num_seqs,
                              max_num_batched_tokens=a.max_num_batched_tokens, micro_batches=a.micro_batches,
                              max_loras=a.lora_slots, enable_prefix_caching=a.enable_prefix_caching)
        lora = (a.lora_slots, a.max_lora_rank) if a.lora_slots else None
        cache = a.cache_spec()
        self.instance: RayInstance | None = None
        if a.layout == "single":
            progress.reporter = LoadingReport(hub, f"{self.replica}/0") if hub is not None else None
            self.engine = single_engine(a.model, a.dtype, cache, config, device=_device(a), quant=a.quant(),
                                        quantize_dense=a.quantize_dense, lora=lora, enforce_eager=a.enforce_eager)
        else:
            spec = InstanceSpec(a.model, a.layout, a.attention_workers, a.expert_groups, a.dtype, cache,
                                comm_timeout_s=a.comm_timeout_s, device=_device(a),
                                max_model_len=a.context_len, quant=a.quant(), quantize_dense=a.quantize_dense,
                                max_loras=a.lora_slots, max_lora_rank=a.max_lora_rank, exchange=a.exchange)
            pg = ray.util.get_current_placement_group()
            self.instance = RayInstance(spec, _resources(a), pg=pg, first_bundle=1 if pg else 0,
                                        name_prefix=f"moe-{self.replica}",
                                        loading=(lambda rank: LoadingReport(hub, f"{self.replica}/{rank}"))
                                        if hub is not None else None)
            self.engine = make_engine(RayExecutor(self.instance), a.model, config)
        self._pusher: asyncio.Task | None = None
        if hub is not None:
            hub.ready.remote(self.replica)  # /health answers ok from now on
        self.outlets = Outlets()

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       lora: tuple[str, str] | None = None, trace: bool = False,
                       sink: tuple[str, str] | None = None,
                       trace_context: dict[str, str] | None = None,
                       resume: dict[int, list[int]] | None = None) -> AsyncIterator[list[RequestOutput] | str]:
        """Streams lists of outputs: all that is ready each time (see AsyncEngine.generate_chunks);
        `trace`: stamp each output's hops (engine.trace). `sink`: the calling ingress's output
        hub (key, host); on this host the stream carries only the name of that ingress's outputs
        channel and ends when the request is done, the outputs going on the channel, one message
        per step for all of that ingress's requests (deployments/outputs_channel.py).
        `trace_context`: the ingress's span (W3C trace context), when tracing is on. `resume`:
        the request continues another replica's run of it (`AsyncEngine.add_request`)."""
        self._start_pushing()
        self.engine.start()
        chunks = self.engine.generate_chunks(request_id, prompt_ids, params, lora, trace, resume)
        completions = range(params.n) if resume is None else sorted(resume)
        spans = tracing.EngineSpans(self.tracer, request_id, trace_context, len(prompt_ids), completions) \
            if trace_context else None
        error = None
        outlet = self.outlets.get(sink)
        try:
            if outlet is None:
                async for chunk in chunks:
                    if spans is not None and spans.outputs(chunk):
                        spans.end()
                    if trace:
                        now = time.monotonic()
                        for out in chunk:
                            out.trace["replica_yield"] = now
                    yield chunk
                return
            yield outlet.name
            try:
                async for chunk in chunks:
                    if spans is not None and spans.outputs(chunk):
                        spans.end()
                    outlet.add(chunk)
            except Exception as exc:  # the request's own failure, in order with its outputs
                error = exc
                outlet.add([RequestFailure(request_id, exc)])
            outlet.flush()  # before the stream ends: the ingress has every output when it sees the end
        except BaseException as exc:
            if not isinstance(exc, GeneratorExit | asyncio.CancelledError):  # a client that left is no error
                error = exc
            raise
        finally:
            if spans is not None:
                spans.end(error)

    def unload_lora(self, name: str) -> None:
        self.engine.unload_lora(name)

    async def check_health(self) -> None:
        self._start_pushing()
        if self.engine.dead is not None:
            raise EngineDeadError(f"the model instance failed: {self.engine.dead}")
        self.engine.start()  # from the first probe on, an idle instance gets its heartbeats
        await self.engine.executor.check_health()

    async def stats(self) -> EngineStats:
        return await self.engine.snapshot()

    def kv_free_blocks(self) -> list[int]:
        return [b.num_free for b in self.engine.scheduler.blocks]

    def outputs_channels(self) -> list[dict]:
        """This replica's outputs channels, one per ingress process on its host: messages sent."""
        return [{"ingress": o.key, "messages": o.messages, "lost": o.lost} for o in self.outlets.by_key.values()]

    def workers(self) -> dict:
        """The Ray names of this replica's worker actors (operators use them with `ray.get_actor`)."""
        names = [] if self.instance is None else list(self.instance.names)
        return {"namespace": ray.get_runtime_context().namespace, "names": names}

    def _start_pushing(self) -> None:
        if self.hub is not None and (self._pusher is None or self._pusher.done()):
            self._pusher = asyncio.get_running_loop().create_task(self._push_forever())

    async def _push_forever(self) -> None:
        while True:
            try:
                await self.hub.report.remote(self.replica, await self.engine.snapshot())
            except Exception as exc:  # metrics are best effort; serving goes on
                log.debug("metrics push failed: %s", exc)
            await asyncio.sleep(PUSH_PERIOD_S)

    def __del__(self):
        if getattr(self, "outlets", None) is not None:
            self.outlets.close()
        if getattr(self, "instance", None) is not None:  # None too when __init__ failed before it
            try:
                self.instance.shutdown(timeout_s=5)
            except Exception:  # interpreter teardown: Ray kills the actors with their owner anyway
                pass


def uses_gpu(a) -> bool:
    """Whether the workers (or the single replica) get a GPU each: asked for, or `auto` on a GPU cluster."""
    return a.accelerator == "gpu" or (a.accelerator == "auto" and ray.cluster_resources().get("GPU", 0) >= 1)


def _device(a) -> str:
    return "gpu" if uses_gpu(a) else "cpu"


def _resources(a) -> Resources:
    gpu = uses_gpu(a)
    custom = {role: {name: 0.001} for role, name in (("attention", a.attention_resource),
                                                     ("expert", a.expert_resource)) if name}
    return Resources(num_cpus=a.cpus_per_worker, num_gpus=1.0 if gpu else 0.0, custom=custom)


def worker_bundles(a) -> list[dict[str, float]]:
    """One placement-group bundle per worker of the instance (the replica's own comes first)."""
    if a.layout == "single":
        return []
    spec = InstanceSpec(a.model, a.layout, a.attention_workers, a.expert_groups)
    return _resources(a).bundles(spec)


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside Serve (tests build the class directly)
        return "local"


class LoadingReport:
    """A worker's loading progress, told to the app's metrics hub (`progress.reporter`): what
    /health shows while the model loads. Picklable, so each rank actor gets its own."""

    def __init__(self, hub, prefix: str):
        self.hub, self.prefix = hub, prefix

    def __call__(self, part: str, done: int, total: int) -> None:
        self.hub.loading.remote(f"{self.prefix}/{part}", done, total)
