"""The process's compute thread and its burst sections."""

from __future__ import annotations

import torch

from moe_parallel.runtime import compute


def test_a_burst_runs_on_the_burst_threads_and_gives_them_back():
    own = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        compute.set_burst(2)
        with compute.burst():
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 1
        compute.set_burst(0)  # not set (a process without a shared-memory instance): nothing changes
        with compute.burst():
            assert torch.get_num_threads() == 1
        torch.set_num_threads(3)
        compute.set_burst(2)  # fewer than the thread's own: the section keeps its own
        with compute.burst():
            assert torch.get_num_threads() == 3
    finally:
        compute.set_burst(0)
        torch.set_num_threads(own)


def test_run_hands_work_to_the_one_compute_thread():
    assert compute.run(compute.on_compute_thread)
    assert not compute.on_compute_thread()
