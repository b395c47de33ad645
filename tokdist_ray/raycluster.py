"""The few things several stages ask of the Ray cluster."""

from __future__ import annotations

import sys


def ray_is_running() -> bool:
    """Whether this process is connected to Ray (without importing it)."""
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def connect() -> None:
    """Join the running cluster (`ray job submit`, RAY_ADDRESS) or start a local instance."""
    import logging

    import ray

    if not ray.is_initialized():  # Ray's INFO start-up lines stay in its session logs
        ray.init(logging_level=logging.WARNING)


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))

