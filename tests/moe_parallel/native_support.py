"""What the native-kernel tests share: the prebuilt library, without which a test module is
skipped (and fails in CI, where the Makefile builds it first)."""

from __future__ import annotations

import os

import pytest

from moe_parallel.native.paths import LIBRARY


def require_library() -> None:
    """Call at a test module's top: skip it (fail it in CI) when the library is not built."""
    if LIBRARY.exists():
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{LIBRARY} is missing: CI must build it (python -m moe_parallel.native.build)", pytrace=False)
    pytest.skip(f"{LIBRARY} is not built (python -m moe_parallel.native.build)", allow_module_level=True)
