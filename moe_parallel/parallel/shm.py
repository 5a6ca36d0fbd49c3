"""The same-host exchange: one shared-memory segment per instance, a byte ring per rank pair.

When every rank of a `disaggregated` instance runs on the CPU of one host, the header, dispatch
and combine of a layer go through shared memory instead of gloo's TCP loopback (a fixed cost per
call whatever its size, three calls a layer; docs/architecture.md). Layout of the segment (`Segment`):

    page 0     magic, world, A, N, ring capacity; per rank its pid and a `closed` flag
    rings      for attention rank a and expert rank j: ring a->j (headers and routed rows),
               then ring j->a (the expert outputs), each 128 control bytes + `cap` data bytes

A ring is single-producer single-consumer (csrc/shm.cpp): monotonic byte counts, the data
copied in and out with memcpy, a waiting side spinning briefly and then sleeping on a futex,
so on two cores a waiting rank leaves its core to the one that computes.

Life cycle (`setup`, called by every rank right after joining the instance's gloo group, which
it uses only for this hand-shake): rank 0 creates the segment under a fresh name in /dev/shm,
every other rank opens it by name (a Ray actor on the same node can), and once every rank has
it mapped rank 0 unlinks the name. So the name exists only during start-up; a rank killed later
leaves nothing in /dev/shm (its mapping goes with it), crashes included.

Failure: a peer is lost when it has set its `closed` flag, when its process is gone (its pid in
page 0), or when the ring it should advance has not moved for `comm_timeout_s` (a stuck rank)
- each a `PeerLost` in the waiting rank within that time.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import struct
import time
import uuid
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
PREFIX = "moe_serve_"
MAGIC = 0x4D4F455345524D31  # b"MOESERM1"
PAGE = 4096
CTL = 128  # control bytes of a ring (csrc/shm.cpp RingCtl)
SLICE_S = 0.05  # longest sleep between two liveness checks
SPIN_US = float(os.environ.get("MOE_SERVE_SHM_SPIN_US", "0"))  # spin before sleeping: 0, by bench.exchange
EXCHANGES = ("auto", "gloo", "shm")


class ProtocolError(RuntimeError):
    """The ranks of a model instance disagree about what comes next, or a message is malformed."""


class PeerLost(RuntimeError):
    """An exchange with the other ranks failed: one died, hung past the timeout, or left.
    (Both errors are the data plane's, whichever transport: `dispatch` raises them too.)"""


_lib: ctypes.CDLL | None = None


def library() -> ctypes.CDLL:
    """The ring primitives of the native library (built by `make`; the kernels' mode does not matter)."""
    global _lib
    if _lib is None:
        from moe_parallel.native.paths import LIBRARY

        if not LIBRARY.exists():
            raise OSError(f"{LIBRARY} is not built (run `python -m moe_parallel.native.build`)")
        lib = ctypes.CDLL(str(LIBRARY))  # torch (imported above) provides what it links against
        p, u64, i64 = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int64
        for name in ("moe_ring_write", "moe_ring_read"):
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = [p, p, u64, p, u64, i64, i64], i64
        lib.moe_ring_ready.argtypes, lib.moe_ring_ready.restype = [p], u64
        lib.moe_ring_ctl_bytes.restype = u64
        if lib.moe_ring_ctl_bytes() != CTL:
            raise OSError("the native library's ring layout does not match this module")
        _lib = lib
    return _lib


def available() -> str:
    """'' when this process can use the shared-memory exchange, else why not."""
    if not os.path.isdir(SHM_DIR):
        return f"{SHM_DIR} does not exist"
    try:
        library()
    except OSError as e:
        return str(e)
    return ""


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")  # a zombie has exited; only its parent has not reaped it yet
    except (FileNotFoundError, IndexError):
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True


class Segment:
    """One instance's mapped segment (see the module docstring for its layout)."""

    _HEAD = struct.Struct("<6Q")  # magic, world, attention ranks, expert ranks, ring capacity, total bytes

    def __init__(self, fd: int, size: int):
        import mmap

        self.mm = mmap.mmap(fd, size)
        os.close(fd)
        self.size = size
        self.buf = torch.frombuffer(self.mm, dtype=torch.uint8)
        self.base = self.buf.data_ptr()
        magic, self.world, self.attention, self.experts, self.cap, total = self._HEAD.unpack_from(self.mm, 0)
        if magic != MAGIC or total != size:
            raise OSError("not a moe_serve exchange segment (or another version's)")
        self.words = self.buf[: PAGE].view(torch.int64)  # pids at [8, 8+world), closed flags after
        self.rank: int | None = None

    @staticmethod
    def size_for(world: int, attention: int, experts: int, cap: int) -> int:
        if 8 + 2 * world > PAGE // 8:
            raise ValueError(f"{world} ranks do not fit a segment's first page")
        return PAGE + 2 * attention * experts * (CTL + cap)

    @classmethod
    def create(cls, name: str, attention: int, experts: int, cap: int) -> Segment:
        cap = -(-cap // 64) * 64
        world = attention + experts
        size = cls.size_for(world, attention, experts, cap)
        st = os.statvfs(SHM_DIR)
        free = st.f_bavail * st.f_frsize
        if free < size:
            raise OSError(f"the exchange needs {size / 2**20:.1f} MiB of {SHM_DIR}, {free / 2**20:.1f} MiB are free")
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)  # every page now, or ENOSPC here: never a SIGBUS mid-step
            head = bytearray(PAGE)
            cls._HEAD.pack_into(head, 0, MAGIC, world, attention, experts, cap, size)
            os.pwrite(fd, bytes(head), 0)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        try:
            return cls(fd, size)
        except BaseException:
            os.unlink(path)
            raise

    @classmethod
    def open(cls, name: str) -> Segment:
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
        return cls(fd, os.fstat(fd).st_size)

    @staticmethod
    def unlink(name: str) -> None:
        try:
            os.unlink(os.path.join(SHM_DIR, name))
        except FileNotFoundError:
            pass

    def join(self, rank: int) -> None:
        self.rank = rank
        self.words[8 + rank] = os.getpid()
        self.words[8 + self.world + rank] = 0

    def ring(self, attention_rank: int, expert_index: int, to_expert: bool, timeout_s: float) -> Ring:
        pair = attention_rank * self.experts + expert_index
        offset = PAGE + (2 * pair + (0 if to_expert else 1)) * (CTL + self.cap)
        peer = self.attention + expert_index if self.rank == attention_rank else attention_rank
        return Ring(self, offset, peer, timeout_s)

    def check(self, peer: int) -> None:
        """Raise PeerLost if rank `peer` has left or its process is gone."""
        if int(self.words[8 + self.world + peer]):
            raise PeerLost(f"rank {peer} left the instance")
        pid = int(self.words[8 + peer])
        if pid and not _pid_alive(pid):
            raise PeerLost(f"rank {peer} (pid {pid}) exited")

    def close(self) -> None:
        """Leave: peers waiting on this rank see it at once. The mapping stays until the last
        reference goes (a ring wait on another thread may still be reading it)."""
        if self.rank is not None:
            self.words[8 + self.world + self.rank] = 1


def _check_address(ptr: int, n: int) -> None:
    if n and not ptr:  # a tensor with no storage (on `meta`, say): a clear error, not a crash in memcpy
        raise ValueError("the shared-memory exchange got a tensor without CPU storage")


class Ring:
    """One direction between two ranks. `send`/`recv` block (with liveness checks and the
    timeout) until every byte has moved; `poll` moves what is there without waiting."""

    def __init__(self, seg: Segment, offset: int, peer: int, timeout_s: float):
        self.seg, self.peer, self.timeout_s = seg, peer, timeout_s
        self.ctl, self.data, self.cap = seg.base + offset, seg.base + offset + CTL, seg.cap
        self.lib = library()
        self.spin_ns = int(SPIN_US * 1000)

    def send(self, ptr: int, n: int, what: str, stuck: Callable[[], None] | None = None) -> None:
        """Write n bytes from address ptr. `stuck` runs whenever the ring is full (an attention rank
        drains its incoming rings there), and the wait between is short when it is given."""
        _check_address(ptr, n)
        done, last = 0, time.monotonic()
        slice_ns = 1_000_000 if stuck else int(SLICE_S * 1e9)
        while done < n:
            got = self.lib.moe_ring_write(self.ctl, self.data, self.cap, ptr + done, n - done, self.spin_ns, slice_ns)
            done += got
            if done == n:
                return
            last = self._waited(got, last, what)
            if stuck is not None:
                stuck()

    def recv(self, ptr: int, n: int, what: str, timeout_s: float | None = None) -> None:
        _check_address(ptr, n)
        done, last = 0, time.monotonic()
        slice_ns = int(SLICE_S * 1e9)
        while done < n:
            got = self.lib.moe_ring_read(self.ctl, self.data, self.cap, ptr + done, n - done, self.spin_ns, slice_ns)
            done += got
            if done == n:
                return
            last = self._waited(got, last, what, timeout_s)

    def poll(self, ptr: int, n: int) -> int:
        """Read up to n bytes that are already there; returns how many."""
        return self.lib.moe_ring_read(self.ctl, self.data, self.cap, ptr, n, 0, 0) if n else 0

    def _waited(self, got: int, last: float, what: str, timeout_s: float | None = None) -> float:
        now = time.monotonic()
        if got:
            return now
        self.seg.check(self.peer)
        limit = self.timeout_s if timeout_s is None else timeout_s
        if now - last > limit:
            raise PeerLost(f"{what} exchange with rank {self.peer}: no progress for {limit:.0f}s (stuck or gone)")
        return last


def setup(exchange: str, rank: int, attention: int, experts: int, eligible: str, ring_bytes: int) -> Segment | None:
    """Every rank of a disaggregated instance on gloo, right after joining its group: agree on the
    exchange and, for shm, create (rank 0) / open (the others) / unlink (rank 0, once all have it
    mapped) the segment. `eligible` is '' where this rank could use it, else why not. Returns the
    joined segment, or None for gloo. Raises ValueError when exchange='shm' cannot be had."""
    import torch.distributed as dist

    if exchange not in EXCHANGES:
        raise ValueError(f"exchange {exchange!r} is not one of {', '.join(EXCHANGES)}")
    if exchange == "gloo":
        return None
    world = attention + experts
    facts: list = [None] * world
    dist.all_gather_object(facts, (socket.gethostname(), eligible))
    why = next((f"rank {r}: {e}" for r, (_, e) in enumerate(facts) if e), "")
    if not why and len({h for h, _ in facts}) > 1:
        why = "the ranks are on more than one host"
    name, seg = PREFIX + uuid.uuid4().hex, None
    if not why:
        made = [""]
        if rank == 0:
            try:
                seg = Segment.create(name, attention, experts, ring_bytes)
            except OSError as e:
                made[0] = f"creating {SHM_DIR}/{name}: {e}"
            made.append(name)
        else:
            made.append("")
        dist.broadcast_object_list(made, src=0)
        why, name = made
    if not why:
        opened = ""
        if rank != 0:
            try:
                seg = Segment.open(name)
            except OSError as e:
                opened = f"rank {rank} cannot open {SHM_DIR}/{name}: {e}"
        results: list = [None] * world
        dist.all_gather_object(results, opened)  # every rank has it mapped (or says why not)
        if rank == 0:
            Segment.unlink(name)
        why = next((r for r in results if r), "")
    if why:
        if seg is not None:
            seg.close()
        if exchange == "shm":
            raise ValueError(f"exchange: shm is not possible here: {why}")
        log.info("exchange auto -> gloo: %s", why)
        return None
    seg.join(rank)
    dist.barrier()  # every pid is in page 0 before anyone waits on a peer
    return seg


def leftovers() -> list[str]:
    """Names of this project's segments present in /dev/shm (a test counts them)."""
    try:
        return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(PREFIX))
    except FileNotFoundError:
        return []


class Channel:
    """Pickled messages between two processes of one host (the engine and an attention actor's
    step channel; an engine replica and an ingress's outputs channel): a segment of its own with
    one ring each way, framed as an 8-byte length and the bytes. One side creates it (slot 0),
    the other opens it by name (slot 1), and the name is unlinked once both have it. Waiting is
    the rings' futex wait, so an idle channel costs no CPU; a receiver checks its peer's pid every
    `SLICE_S`. `label` and `sides` (creator, opener) name them in a lost peer's error."""

    _LEN = struct.Struct("<Q")

    def __init__(self, seg: Segment, slot: int, label: str = "step channel",
                 sides: tuple[str, str] = ("the driver", "the rank")):
        seg.join(slot)
        self.seg, self.slot, self.label, self.sides = seg, slot, label, sides
        forever = float("inf")  # a step may take as long as it takes; a dead peer is seen by its pid
        self.out = seg.ring(0, 0, slot == 0, forever)
        self.inc = seg.ring(0, 0, slot == 1, forever)
        self._len = ctypes.create_string_buffer(self._LEN.size)

    @classmethod
    def create(cls, name: str, cap: int = 1 << 20, **names) -> Channel:
        return cls(Segment.create(name, 1, 1, cap), 0, **names)

    @classmethod
    def open(cls, name: str, **names) -> Channel:
        return cls(Segment.open(name), 1, **names)

    def send(self, obj) -> None:
        import pickle

        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        self._LEN.pack_into(self._len, 0, len(data))
        try:
            self.out.send(ctypes.addressof(self._len), self._LEN.size, "message length")
            self.out.send(ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value, len(data), "message")
        except PeerLost as exc:
            raise self._lost() from exc

    def recv(self):
        import pickle

        try:
            self.inc.recv(ctypes.addressof(self._len), self._LEN.size, "message length")
            (n,) = self._LEN.unpack_from(self._len, 0)
            buf = bytearray(n)
            if n:
                self.inc.recv(ctypes.addressof((ctypes.c_char * n).from_buffer(buf)), n, "message")
        except PeerLost as exc:
            raise self._lost() from exc
        return pickle.loads(buf)

    def _lost(self) -> PeerLost:
        other = 1 - self.slot
        return PeerLost(f"{self.label}: {self.sides[other]} (pid {int(self.seg.words[8 + other])}) exited or left")

    def close(self) -> None:
        self.seg.close()
