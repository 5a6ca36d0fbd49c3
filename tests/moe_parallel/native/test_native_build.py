"""The library loads on any x86-64: a unit compiled for an ISA runs no code at load time (a
static initializer built with AVX-512 flags is a SIGILL on an AVX2 CPU before any kernel is
chosen). The build refuses such a unit; the built objects have none."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from moe_parallel.native import build
from moe_parallel.native.paths import BUILD

needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ on this machine")


@needs_gxx
def test_a_static_initializer_is_found(tmp_path):
    src = tmp_path / "unit.cpp"
    src.write_text("static int f() { return 3; }\nint table = f();\n"
                   "constexpr int kData[2] = {1, 2};\nint get(int i) { return kData[i]; }\n")
    with_init = tmp_path / "with_init.o"
    subprocess.run(["g++", "-O2", "-c", str(src), "-o", str(with_init)], check=True)
    assert build.load_time_sections(with_init) == [".init_array"]
    src.write_text("constexpr int kData[2] = {1, 2};\nint get(int i) { return kData[i]; }\n")
    without = tmp_path / "without.o"
    subprocess.run(["g++", "-O2", "-c", str(src), "-o", str(without)], check=True)
    assert build.load_time_sections(without) == []


def test_the_built_isa_units_run_nothing_at_load():
    objects = [BUILD / (n.removesuffix(".cpp") + ".o") for n in build.X86_ONLY]
    present = [o for o in objects if o.exists()]
    if not present:
        pytest.skip("the native library is not built here")
    for obj in present:
        assert build.load_time_sections(obj) == [], obj.name
