"""Where the native library's sources are and where it is built and loaded from (build.py and
kernels.py both use these; kept apart so that `python -m moe_parallel.native.build` does not import
the module it runs through the package)."""

from pathlib import Path

CSRC = Path(__file__).resolve().parent / "csrc"
BUILD = Path(__file__).resolve().parent / "_build"  # not in git: add `moe_parallel/native/_build/` to .gitignore
LIBRARY = BUILD / "libmoe_serve_kernels.so"
