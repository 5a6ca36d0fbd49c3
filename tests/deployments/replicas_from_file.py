"""A Serve autoscaling policy for tests: the replica count is what a file says, so a test
scales a deployment up or down at the moment it chooses (Serve then starts or drains
replicas exactly as the autoscaler would)."""

from __future__ import annotations

from pathlib import Path


class ReplicasFromFile:
    def __init__(self, path: str):
        self.path = Path(path)

    def __call__(self, ctx) -> tuple[int, dict]:
        try:
            return int(self.path.read_text().strip()), {}
        except (OSError, ValueError):
            return ctx.target_num_replicas, {}
