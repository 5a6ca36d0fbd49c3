"""Which device a worker computes on: chosen once, then passed to everything explicitly.

Every tensor this project makes names its device (`device=` on factories, `.to(device)` on
copies); nothing relies on `torch.set_default_device`, which is thread-local and so wrong in
exactly the places a server runs code: the engine's step thread, an expert rank's serving
thread, Ray's actor method threads.

    resolve_device("auto" | "cpu" | "gpu" | "cuda:1" | ...)  -> torch.device
    comm_backend(device)                                      -> "nccl" on CUDA, else "gloo"

Which GPU: Ray masks `CUDA_VISIBLE_DEVICES` to an actor's own GPU, so it sees one device,
`cuda:0`. Where several are visible (no masking: torchrun-style launches, or Ray's
`RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES`), Ray's assigned GPU id or `LOCAL_RANK` picks it.

Strict mode (`MOE_SERVE_STRICT_DEVICES=1`, used by the tests): `enter_thread()`, called by
every entry point that touches the model, sets the calling thread's default device to `meta`.
A tensor made without an explicit device then lands on `meta` and the step fails, so the
test suite proves the discipline in every thread rather than trusting it.
"""

from __future__ import annotations

import os
import threading

import torch

STRICT_ENV = "MOE_SERVE_STRICT_DEVICES"
_thread = threading.local()


class DeviceError(RuntimeError):
    """The requested device does not exist in this process."""


def resolve_device(accelerator: str = "auto") -> torch.device:
    """`auto`: the GPU if this process sees one, else the CPU; `gpu`: a GPU or an error;
    anything else is taken as a torch device string (`cpu`, `cuda:0`)."""
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator == "gpu":
        if not torch.cuda.is_available():
            raise DeviceError("accelerator 'gpu' was asked for, but this process sees no CUDA device "
                              f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
        return torch.device("cuda", _cuda_index())
    device = torch.device(accelerator)
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise DeviceError(f"device {accelerator!r} does not exist in this process")
    return device


def _cuda_index() -> int:
    count = torch.cuda.device_count()
    if count == 1:
        return 0
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    for gpu_id in _ray_gpu_ids():
        if str(gpu_id) in visible:
            return visible.index(str(gpu_id))
        if not visible and int(gpu_id) < count:
            return int(gpu_id)
    return int(os.environ.get("LOCAL_RANK", "0")) % count


def _ray_gpu_ids() -> list:
    try:
        import ray

        return list(ray.get_gpu_ids()) if ray.is_initialized() else []
    except Exception:  # not a Ray worker
        return []


def comm_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def enter_thread() -> None:
    """Call where a thread starts working on the model. A no-op unless strict mode is on."""
    if getattr(_thread, "entered", False) or os.environ.get(STRICT_ENV) != "1":
        return
    torch.set_default_device("meta")
    _thread.entered = True


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
