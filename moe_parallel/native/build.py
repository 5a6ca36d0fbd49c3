"""Builds the native MoE kernels ahead of time: moe_parallel/native/csrc/*.cpp -> _build/libmoe_serve_kernels.so.

    python -m moe_parallel.native.build [--jobs N] [--force]

One object per translation unit, each with its own ISA flags (the AVX2 and AVX-512 units get their
-m flags, the dispatcher, driver and op registration none, so the library loads on any x86-64 and
picks its kernels at run time), compiled with g++ (or $CXX) against the running interpreter's
torch headers and C++ ABI, then linked against torch's libraries with OpenMP. An object newer than
its source and every header is reused, unless --force or the torch version or compiler changed
since the last build (_build/stamp.txt). Prints the build time; a missing compiler or a failed
step exits non-zero with one line saying which (after the compiler's own output).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from moe_parallel.native.paths import BUILD, CSRC, LIBRARY

AVX2 = ["-mavx2", "-mfma", "-mf16c"]
AVX512 = [*AVX2, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
UNITS: dict[str, list[str]] = {  # source -> its extra flags
    "ops.cpp": [],
    "moe.cpp": ["-fopenmp"],
    "attention.cpp": ["-fopenmp"],
    "rotary.cpp": ["-fopenmp"],
    "pack.cpp": ["-fopenmp"],
    "dispatch.cpp": [],
    "shm.cpp": [],
    "exchange.cpp": [],
    "kernels_generic.cpp": [],
    "kernels_avx2.cpp": AVX2,
    "kernels_avx512.cpp": AVX512,
    "kernels_avx512_bf16.cpp": [*AVX512, "-mavx512bf16"],
    "kernels_amx.cpp": [*AVX512, "-mavx512bf16", "-mamx-tile", "-mamx-bf16"],
}
X86_ONLY = ("kernels_avx2.cpp", "kernels_avx512.cpp", "kernels_avx512_bf16.cpp", "kernels_amx.cpp")
COMMON = ["-O3", "-std=c++20", "-fPIC", "-fvisibility=hidden", "-DNDEBUG", "-Wall", "-Wno-unused-function"]


class BuildError(RuntimeError):
    pass


def torch_flags() -> tuple[list[str], list[str], str]:
    """Compile and link flags for the torch this interpreter runs, and its version."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        raise BuildError(f"torch is not importable in {sys.executable}: {e}") from e

    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libs = [f"-L{p}" for p in cpp_extension.library_paths()]
    return [abi, *includes], [*libs, "-lc10", "-ltorch_cpu", "-ltorch"], torch.__version__


def stale(obj: Path, src: Path, headers: list[Path]) -> bool:
    if not obj.exists():
        return True
    built = obj.stat().st_mtime
    return any(p.stat().st_mtime > built for p in (src, *headers))


def run(cmd: list[str], what: str) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        sys.stderr.write(out.stdout + out.stderr)
        raise BuildError(f"{what} failed (exit {out.returncode}): {' '.join(cmd[:3])} ...")


LOAD_TIME = (".init_array", ".ctors", ".preinit_array")


def load_time_sections(obj: Path) -> list[str]:
    """The sections of an ELF object that make code run when the library loads (static
    initializers). A unit compiled for an ISA must have none: that code would run with the
    unit's instructions on every CPU, before the dispatcher has chosen (an AVX-512 table built
    at load is a SIGILL on an AVX2 machine)."""
    data = obj.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:  # not a 64-bit ELF object: nothing to say
        return []
    end = "<" if data[5] == 1 else ">"
    shoff = struct.unpack_from(end + "Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", data, 0x3A)
    headers = [struct.unpack_from(end + "IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_at = headers[shstrndx][4]

    def name(h) -> str:
        start = names_at + h[0]
        return data[start:data.index(b"\0", start)].decode()

    return sorted({n for n in map(name, headers) if n.startswith(LOAD_TIME)})


def compile_unit(cxx: str, name: str, flags: list[str], force: bool) -> bool:
    src, obj = CSRC / name, BUILD / (name.removesuffix(".cpp") + ".o")
    if not force and not stale(obj, src, sorted(CSRC.glob("*.h"))):
        return False
    run([cxx, *COMMON, *flags, "-c", str(src), "-o", str(obj)], f"compiling {name}")
    if name in X86_ONLY and (found := load_time_sections(obj)):
        obj.unlink()
        raise BuildError(f"{name} runs code when the library loads ({', '.join(found)}): an ISA unit "
                         "must have no static initializers (make its tables constexpr data)")
    return True


def build(jobs: int = 2, force: bool = False) -> int:
    """Compiles what is stale and links; returns how many units were compiled."""
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise BuildError(f"no C++ compiler: {cxx!r} is not on PATH (install g++ or set CXX)")
    BUILD.mkdir(parents=True, exist_ok=True)
    cflags, ldflags, version = torch_flags()
    stamp, want = BUILD / "stamp.txt", f"torch {version}, {cxx} {' '.join(COMMON)}\n"
    force = force or not stamp.exists() or stamp.read_text() != want
    units = {n: f for n, f in UNITS.items() if platform.machine() in ("x86_64", "AMD64") or n not in X86_ONLY}
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        futures = [pool.submit(compile_unit, cxx, name, [*cflags, *extra], force) for name, extra in units.items()]
        rebuilt = [f.result() for f in futures]
    if any(rebuilt) or not LIBRARY.exists():
        tmp = LIBRARY.with_suffix(".so.tmp")
        objs = [str(BUILD / (n.removesuffix(".cpp") + ".o")) for n in units]
        run([cxx, "-shared", "-fopenmp", *objs, "-o", str(tmp), *ldflags], "linking")
        os.replace(tmp, LIBRARY)  # a process holding the old library keeps its inode
    stamp.write_text(want)
    return sum(rebuilt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--force", action="store_true", help="recompile every unit")
    args = parser.parse_args()
    start = time.perf_counter()
    try:
        compiled = build(args.jobs, args.force)
    except BuildError as e:
        sys.exit(f"moe_parallel.native.build: {e}")
    took = time.perf_counter() - start
    print(f"built {LIBRARY} ({compiled} units compiled) in {took:.1f} s" if compiled else
          f"{LIBRARY} is up to date (checked in {took:.1f} s)")


if __name__ == "__main__":
    main()
