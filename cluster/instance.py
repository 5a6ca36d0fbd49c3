"""A model instance on Ray: one placement group holding A attention actors and N expert actors.

Ray is the control plane: it places the actors (one GPU per bundle on a GPU cluster, a share
of a CPU on a laptop), runs the rendezvous (rank 0 reports its node address and a free
port, then every actor joins the `deepspeed.comm` group with a timeout), carries one call per
attention actor per step, and probes health. The data plane between the actors is
`deepspeed.comm`. Shutdown leaves no actor behind, nor the placement group when the instance
made it (inside a Ray Serve replica the group belongs to the replica).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, wait

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.plan import Resources
from moe_parallel.contract import SampleOutput, StepBatch
from moe_parallel.loading import progress
from moe_parallel.parallel import rank_start, shm
from moe_parallel.parallel.dispatch import heartbeat_period
from moe_parallel.parallel.launch import free_port
from moe_parallel.parallel.workers import (
    AttentionWorker,
    InstanceSpec,
    build_expert_server,
    close_comm,
    exchange_kind,
    init_comm,
)
from moe_parallel.runtime import compute
from moe_parallel.runtime.devices import STRICT_ENV, enter_thread

log = logging.getLogger(__name__)
STEP_CHANNEL_ENV = "MOE_SERVE_STEP_CHANNEL"  # "0": every step is a Ray actor call


class RankActor:
    """One rank of the instance. Ray runs the methods on threads of its own (`max_concurrency=2`,
    so health probes get through during a step); every method that touches the model hands it
    to the process's compute thread (`moe_parallel.runtime.compute`: loading, steps, heartbeats, and an
    expert rank's serving loop), so one OpenMP team does all of the rank's tensor work."""

    def __init__(self, spec: InstanceSpec, rank: int, threads: int, loading=None):
        """`loading`: a `progress` reporter for this rank's loading (the app's hub), or None."""
        compute.executor(max(1, threads))
        if loading is not None:
            progress.reporter = loading
        self.spec, self.rank = spec, rank
        self.worker: AttentionWorker | None = None
        self.serving: Future | None = None
        self.failure: str | None = None

    def address(self) -> tuple[str, int]:
        ip = ray.util.get_node_ip_address()
        return ip, free_port(ip)

    def setup(self, addr: str, port: int) -> dict:
        return compute.run(self._setup, addr, port)

    def _setup(self, addr: str, port: int) -> dict:
        enter_thread()
        device = init_comm(self.spec, self.rank, addr, port)
        if self.spec.is_attention(self.rank):
            self.worker = AttentionWorker(self.spec, self.rank, device)
            return self.worker.info()
        server = build_expert_server(self.spec, self.rank, device)
        self.server = server
        return {"tensors_read": server.tensors_read, "device": str(device), "exchange": exchange_kind()}

    def allocate_cache(self) -> int:
        """Attention ranks, once the expert ranks serve: size and allocate the KV pool."""
        return compute.run(self.worker.allocate_cache)

    def start_serving(self) -> None:
        """Expert ranks: serve the data plane, once every rank is set up (an attention rank may
        load for longer than comm_timeout_s, and the header wait is timed)."""
        self.serving = compute.submit(self._serve)

    def _serve(self) -> None:
        try:
            self.server.serve()
        except Exception as exc:  # reported by health(); the attention ranks see PeerLost
            self.failure = f"{type(exc).__name__}: {exc}"

    def execute(self, batch: StepBatch) -> list[SampleOutput]:
        from moe_parallel.runtime.profile import section

        with section("rank_step"):
            return compute.run(self.worker.execute, batch)

    def heartbeat(self) -> None:
        compute.run(self.worker.heartbeat)

    def host(self) -> str:
        return socket.gethostname()

    def pid(self) -> int:
        return os.getpid()

    def open_step_channel(self, name: str) -> None:
        """Attention ranks: take steps from the driver through the shared-memory channel `name`
        (a loop on a thread of its own, waiting in a futex) instead of one Ray call each."""
        channel = shm.Channel.open(name)
        threading.Thread(target=self._step_loop, args=(channel,), name="step-channel", daemon=True).start()

    def _step_loop(self, channel: shm.Channel) -> None:
        while True:
            try:
                batch = channel.recv()
            except shm.PeerLost:  # the driver closed the channel or is gone
                return
            start = time.monotonic()
            try:
                reply = ("ok", self.execute(batch), (start, time.monotonic()))
            except Exception as exc:  # the driver raises it, as it would a failed actor call
                reply = ("error", f"rank {self.rank}: {type(exc).__name__}: {exc}", None)
            try:
                channel.send(reply)
            except shm.PeerLost:
                return

    def health(self) -> dict:
        if self.failure:
            raise RuntimeError(f"rank {self.rank} failed: {self.failure}")
        if self.serving is not None and self.serving.done():
            raise RuntimeError(f"expert rank {self.rank} stopped serving")
        stats = {"rank": self.rank, "role": "attention" if self.worker else "expert"}
        if self.worker is None:
            stats["tokens_per_expert"] = self.server.tokens_per_expert.tolist()
            stats["heartbeats"] = self.server.heartbeats
            stats["first_expert"] = self.server.groups[0].first_expert
        return stats

    def profile(self, enable: bool | None = None) -> dict[str, tuple[float, int]]:
        """Turn step profiling on (reset) or off; return the sections timed since."""
        from moe_parallel.runtime import profile

        return profile.swap(enable)

    def profile_samples(self) -> dict[str, list[float]]:
        """The kept occurrences of the sections timed since profiling was last turned on."""
        from moe_parallel.runtime import profile

        return profile.samples()

    def shutdown(self) -> None:
        if self.worker is not None:
            compute.run(self.worker.shutdown)
        if self.serving is not None:
            wait([self.serving], timeout=10)
        close_comm()


class RayInstance:
    def __init__(self, spec: InstanceSpec, resources: Resources | None = None, pg: PlacementGroup | None = None,
                 first_bundle: int = 0, setup_timeout_s: float = 300.0, name_prefix: str | None = None,
                 loading: Callable[[str], object] | None = None):
        """`loading(rank)`: the reporter of rank `rank`'s loading progress (picklable), if any."""
        self.spec, self.loading = spec, loading
        self.names = [f"{name_prefix}-rank{r}" for r in range(spec.world)] if name_prefix else []
        self.resources = resources or Resources.auto(spec.world)
        self.owns_pg = pg is None
        self.pg = pg or placement_group(self.resources.bundles(spec), strategy="PACK")
        self.actors: list = []
        self.channels: list[shm.Channel] = []
        self._channel_lock = threading.Lock()
        # per attention rank, when it had the last step's batch and when it was done (one
        # monotonic clock per host: engine.trace); None where the steps are Ray calls
        self.rank_stamps: list[tuple[float, float]] | None = None
        try:
            ray.get(self.pg.ready(), timeout=setup_timeout_s)
            self._start(first_bundle, setup_timeout_s)
        except BaseException:
            self.shutdown()
            raise

    def _start(self, first_bundle: int, timeout_s: float) -> None:
        remote = ray.remote(RankActor)
        threads = max(1, int(self.resources.num_cpus))
        for rank in range(self.spec.world):
            strategy = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=first_bundle + rank)
            role = "attention" if self.spec.is_attention(rank) else "expert"
            options = dict(num_cpus=self.resources.num_cpus, num_gpus=self.resources.num_gpus,
                           resources=self.resources.custom.get(role, {}), scheduling_strategy=strategy,
                           max_concurrency=2)
            env = {k: os.environ.get(k, v) for k, v in rank_start.RANK_ENV.items()}  # before torch loads there
            if os.environ.get(STRICT_ENV):  # the tests' device check reaches the actors too
                env[STRICT_ENV] = os.environ[STRICT_ENV]
            options["runtime_env"] = {"env_vars": env}
            if self.names:
                options["name"] = self.names[rank]
            reporter = self.loading(rank) if self.loading is not None else None
            self.actors.append(remote.options(**options).remote(self.spec, rank, threads, reporter))
        addr, port = ray.get(self.actors[0].address.remote(), timeout=timeout_s)
        self.info = ray.get([a.setup.remote(addr, port) for a in self.actors], timeout=timeout_s)
        ray.get([a.start_serving.remote() for a in self.actors[self.spec.attention_ranks:]], timeout=timeout_s)
        # sizing the KV pool runs a dummy step through the expert ranks: only once they serve
        blocks = ray.get([a.allocate_cache.remote() for a in self.attention_actors], timeout=timeout_s)
        self.tensors_read = [i["tensors_read"] for i in self.info]
        # each rank sized its own pool (GPUs differ in free memory): schedule to the smallest
        self.kv_blocks = min(blocks)
        self.channels = self._open_channels(timeout_s)

    def _open_channels(self, timeout_s: float) -> list[shm.Channel]:
        """Shared-memory step channels to the attention actors where they run on this host's
        CPUs (their exchange is shm) and MOE_SERVE_STEP_CHANNEL is not 0; else none (Ray calls)."""
        if os.environ.get(STEP_CHANNEL_ENV, "1") == "0" or shm.available():
            return []
        ranks = self.attention_actors
        if any(i.get("exchange") != "shm" for i in self.info[: len(ranks)]):
            return []
        if set(ray.get([a.host.remote() for a in ranks], timeout=timeout_s)) != {socket.gethostname()}:
            return []
        channels = []
        try:
            for a in ranks:
                name = shm.PREFIX + "steps_" + uuid.uuid4().hex
                channels.append(shm.Channel.create(name))
                try:
                    ray.get(a.open_step_channel.remote(name), timeout=timeout_s)
                finally:
                    shm.Segment.unlink(name)
        except Exception as exc:  # keep the Ray calls
            log.warning("steps stay Ray calls: opening a step channel failed: %s", exc)
            for c in channels:
                c.close()
            return []
        return channels

    def step(self, batches: list[StepBatch]) -> list[list[SampleOutput]]:
        """One step on every attention rank (blocking): through the step channels where they are
        open, else one Ray call per rank."""
        if not self.channels:
            return ray.get([a.execute.remote(b) for a, b in zip(self.attention_actors, batches, strict=True)])
        self.send_step(batches)
        return self.recv_step()

    def send_step(self, batches: list[StepBatch]) -> None:
        """Hand a step to the ranks' channels without waiting for it (the rings hold a step's
        batch, so this does not block); `recv_step` waits for the outputs. A channel carries one
        step at a time, request then reply: the lock is held from here to the end of recv_step."""
        self._channel_lock.acquire()
        try:
            for c, b in zip(self.channels, batches, strict=True):
                c.send(b)
        except BaseException:
            self._channel_lock.release()
            raise

    def recv_step(self) -> list[list[SampleOutput]]:
        try:
            replies = [c.recv() for c in self.channels]
        finally:
            self._channel_lock.release()
        failed = [value for kind, value, _ in replies if kind == "error"]
        if failed:
            raise RuntimeError("; ".join(failed))
        self.rank_stamps = [stamps for _, _, stamps in replies]
        return [value for _, value, _ in replies]

    @property
    def attention_actors(self) -> list:
        return self.actors[: self.spec.attention_ranks]

    def health(self, timeout_s: float = 30.0) -> list[dict]:
        return ray.get([a.health.remote() for a in self.actors], timeout=timeout_s)

    def shutdown(self, timeout_s: float = 30.0) -> None:
        for c in self.channels:
            c.close()  # the ranks' step loops see it and end
        self.channels = []
        if self.actors:
            try:
                ray.get([a.shutdown.remote() for a in self.attention_actors], timeout=timeout_s)
            except Exception:  # a broken instance cannot shut down cleanly; kill it below
                pass
            for a in self.actors:
                ray.kill(a, no_restart=True)
            self.actors = []
        if self.owns_pg and self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None


class RayExecutor:
    """The engine's view of a `RayInstance`: one actor call per attention rank per step."""

    def __init__(self, instance: RayInstance):
        self.instance, self.ranks = instance, instance.spec.attention_ranks
        self.kv_blocks, self.block_size = instance.kv_blocks, instance.spec.cache.block_size
        self.heartbeat_s = heartbeat_period(instance.spec.comm_timeout_s)
        self.step_errors_are_fatal = True

    async def execute(self, batches: list[StepBatch]) -> list[list[SampleOutput]]:
        if self.instance.channels:
            # the batches go out from the event loop itself, so the ranks start at once (a thread
            # would first wait for the GIL while the loop streams the last step's tokens:
            # bench.hops' "engine -> attention rank"); the wait for the outputs is off the loop
            self.instance.send_step(batches)
            return await asyncio.to_thread(self.instance.recv_step)
        refs = [a.execute.remote(b) for a, b in zip(self.instance.attention_actors, batches, strict=True)]
        return list(await asyncio.gather(*refs))

    @property
    def rank_stamps(self) -> list[tuple[float, float]] | None:
        return self.instance.rank_stamps  # set by the step channels only

    async def heartbeat(self) -> None:
        await asyncio.gather(*[a.heartbeat.remote() for a in self.instance.attention_actors])

    async def check_health(self, timeout_s: float = 30.0) -> list[dict]:
        refs = [a.health.remote() for a in self.instance.actors]
        return list(await asyncio.wait_for(asyncio.gather(*refs), timeout_s))

    async def expert_token_counts(self) -> list[list[int]]:
        """Each expert rank's counts placed at its experts' columns: [layer][expert]."""
        health = await self.check_health()
        experts = [h for h in health if h["role"] == "expert"]
        if not experts:
            return []
        return [sum((h["tokens_per_expert"][layer] for h in experts), []) for layer in
                range(len(experts[0]["tokens_per_expert"]))]

    async def shutdown(self) -> None:
        await asyncio.to_thread(self.instance.shutdown)
