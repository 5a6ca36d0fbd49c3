"""Ranks fork from a server that has imported torch once, and still read the environment the
parent has when each rank starts (module-level settings included)."""

from __future__ import annotations

import sys

from moe_parallel.parallel import rank_start


def report(label: str, conn) -> None:
    """Runs in the rank: what it sees, sent back."""
    preloaded = "torch" in sys.modules  # before anything of the project imported it here
    from moe_parallel.model import attention

    conn.send((label, preloaded, attention.TILE_TOKENS))
    conn.close()


def _run(ctx, label: str):
    parent, child = ctx.Pipe()
    proc = rank_start.process(ctx, f"{__name__}.report", (label,), (child,), daemon=True)
    proc.start()
    child.close()
    try:
        assert parent.poll(120), "the rank did not answer"
        return parent.recv()
    finally:
        proc.join(30)


def test_each_rank_reads_the_environment_of_its_own_start(monkeypatch):
    ctx = rank_start.context()
    monkeypatch.setenv("MOE_SERVE_ATTENTION_TILE", "1024")
    first = _run(ctx, "first")  # starts the server, if no test has yet
    monkeypatch.setenv("MOE_SERVE_ATTENTION_TILE", "8")
    second = _run(ctx, "second")  # forked from the same server, started with 1024 or earlier
    assert first == ("first", True, 1024)
    assert second == ("second", True, 8)
