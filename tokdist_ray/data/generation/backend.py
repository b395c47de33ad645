"""Which backend generates snippets on Ray, and how many engines it gets: vLLM replicas where
vLLM is installed and the cluster has (or its autoscaler can launch) GPUs, else transformers
on CPU actors; vLLM's replicas sized by the cluster's GPU nodes."""

from __future__ import annotations

import importlib.util
import logging

from tokdist_ray.capacity import Capacity, cluster_capacity
from tokdist_ray.config import GeneratedDataSource
from tokdist_ray.data.generation.requests import GPU_EXTRA_HINT
from tokdist_ray.errors import BackendUnavailableError

log = logging.getLogger("tokdist_ray")


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def cluster_has_gpus() -> bool:
    """Whether the cluster has GPU nodes or its autoscaler can launch them (an autoscaling
    cluster starts with none up); without Ray, whether this machine has a GPU."""
    import ray

    if ray.is_initialized():
        return cluster_capacity().gpu_replicas() > 0
    import torch

    return torch.cuda.is_available()


def resolve_backend(requested: str) -> str:
    """"vllm" or "transformers" for a Ray Data run; explains how to get vLLM when it is missing."""
    if requested == "transformers":
        return "transformers"
    if requested == "vllm":
        if not vllm_installed():
            raise BackendUnavailableError(
                f"backend='vllm' needs vLLM, which is not installed here: {GPU_EXTRA_HINT}; "
                "or use backend='transformers' (CPU actors) or 'auto'"
            )
        return "vllm"
    return "vllm" if vllm_installed() and cluster_has_gpus() else "transformers"


def replica_bundle(source: GeneratedDataSource) -> dict[str, float]:
    """What one vLLM replica needs of one node: its GPUs, of `accelerator_type` if set."""
    pinned = {f"accelerator_type:{source.accelerator_type}": 0.001} if source.accelerator_type else {}
    return {"GPU": source.tensor_parallel_size, **pinned}


def vllm_replicas(source: GeneratedDataSource, capacity: Capacity) -> int:
    """`source.concurrency`, or as many replicas as the cluster's GPU nodes hold once its
    autoscaler has launched all it can: per node, its GPUs (of `accelerator_type`, if set)
    divided by `tensor_parallel_size`; at least 1."""
    if source.concurrency is not None:
        return int(source.concurrency)
    replicas = max(1, capacity.gpu_replicas(source.tensor_parallel_size, source.accelerator_type))
    log.info("vLLM: %d engine replica(s) of %d GPU(s) each (generation.concurrency sets another number)",
             replicas, source.tensor_parallel_size)
    return replicas
