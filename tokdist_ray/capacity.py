"""What the Ray cluster can run: the nodes up now and the worker node types its autoscaler
can launch, so that a stage is sized to the cluster that will be, not to the one that happens
to be up (an autoscaling cluster starts with a head that has no CPUs).

Where the node types come from, first found wins:
  - the cluster config an autoscaler publishes in the GCS (`get_cluster_config()`: Ray's
    v2 autoscaler does in releases after 2.60, a hosted Ray may);
  - the config file of this cluster's autoscaler, read from its monitor's command line on
    this node: Ray 2.60's v1 and v2 autoscalers publish nothing, and `ray job submit` runs
    the driver on the head, beside the monitor (`ray up`: ~/ray_bootstrap_config.yaml);
  - none: the nodes up size the stages, as before: a fixed cluster, the local demo, or a
    cluster whose autoscaler this driver cannot see (KubeRay's runs in a container of its
    own), where a stage that fits no node up still asks for nodes and waits.

A stage whose workers fit no node up asks the autoscaler for them and waits for the first
node (`wait_for_nodes`), or says in one line what it asked for and what the cluster offers.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass

from tokdist_ray.errors import TokdistError
from tokdist_ray.raycluster import joins_cluster

log = logging.getLogger("tokdist_ray")

WAIT_ENV = "TOKDIST_RAY_NODE_WAIT_S"
DEFAULT_WAIT_S = 900.0  # a cloud GPU node pulls a large image before Ray starts on it
POLL_S = 1.0
FREE_CPU_WAIT_S = 10.0  # how long the CPUs that the stage before still releases are waited for
NOT_PLACING = ("memory", "object_store_memory")


class ClusterCapacityError(TokdistError, RuntimeError):
    """A stage's workers fit no node the cluster has or can launch, or none came up in time."""


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict[str, float]
    max_count: int  # nodes of it the autoscaler may run


@dataclass(frozen=True)
class Capacity:
    nodes: tuple[dict[str, float], ...]  # each node up: its resources
    node_types: tuple[NodeType, ...] = ()  # worker types the autoscaler can launch; () without one
    # a joined cluster whose node types this driver cannot read (KubeRay's autoscaler runs in
    # a container of its own): an autoscaler may still add nodes, so a stage waits for them
    unseen_autoscaler: bool = False

    def cpu_workers(self, cpus_per_worker: float) -> int:
        """Workers of `cpus_per_worker` CPUs for CPU work: as many as the nodes up hold, or the
        node types without GPUs at their max count (the autoscaler launches no GPU node for CPU
        work while a CPU type fits), whichever is more; at least 1."""
        up = sum(int(node.get("CPU", 0) // cpus_per_worker) for node in self.nodes)
        launchable = sum(int(t.resources.get("CPU", 0) // cpus_per_worker) * t.max_count
                         for t in self.node_types if not t.resources.get("GPU"))
        return max(1, up, launchable)

    def cpus_per_cpu_worker(self, workers: int) -> int:
        """The most CPUs each of `workers` CPU workers can have with all of them placed (as
        cpu_workers counts); 1 where even that many do not fit."""
        return next((c for c in range(self.largest_cpu_node(), 0, -1) if self.cpu_workers(c) >= workers), 1)

    def gpu_replicas(self, gpus_per_replica: int = 1, accelerator_type: str | None = None) -> int:
        """Replicas of `gpus_per_replica` GPUs on one node each (of `accelerator_type`, if set):
        as many as the nodes up hold, or the node types at their max count; 0 without GPUs."""
        def count(resources: dict) -> int:
            if accelerator_type and f"accelerator_type:{accelerator_type}" not in resources:
                return 0
            return int(resources.get("GPU", 0)) // gpus_per_replica

        return max(sum(count(node) for node in self.nodes),
                   sum(count(t.resources) * t.max_count for t in self.node_types))

    def largest_cpu_node(self) -> int:
        """The most CPUs one node for CPU work has or can have."""
        return int(max([node.get("CPU", 0) for node in self.nodes] + [self.largest_launchable_cpu_node()]))

    def largest_launchable_cpu_node(self) -> int:
        """The most CPUs of a node type without GPUs (as above); 0 without one."""
        return int(max((t.resources.get("CPU", 0) for t in self.node_types if t.max_count and not t.resources.get("GPU")),
                       default=0))

    def fits_up(self, bundle: dict[str, float]) -> bool:
        return any(fits(bundle, node) for node in self.nodes)

    def may_launch(self, bundle: dict[str, float]) -> bool:
        return self.unseen_autoscaler or any(t.max_count and fits(bundle, t.resources) for t in self.node_types)

    def describe(self) -> str:
        up = ", ".join(shape({"CPU": 0, **node}) for node in self.nodes) or "none"  # a head without CPUs too
        types = ", ".join(f"{t.name} {shape(t.resources)} (up to {t.max_count})" for t in self.node_types)
        if self.unseen_autoscaler:
            types = "unknown to this driver (no autoscaler config published, nor on its node)"
        return f"nodes up: {up}; node types it can launch: {types or 'none'}"


def fits(bundle: dict[str, float], resources: dict[str, float]) -> bool:
    return all(resources.get(name, 0) >= amount for name, amount in bundle.items())


def shape(resources: dict[str, float]) -> str:
    """CPUs and the resources that place work (GPUs, accelerator types, custom ones); not the
    memory every node has, nor Ray's per-node markers."""
    kept = {k: v for k, v in resources.items() if k not in NOT_PLACING and not k.startswith("node:")}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(kept.items())) + "}"


# ------------------------------------------------------------------ reading the cluster
def cluster_capacity() -> Capacity:
    """The running cluster's nodes up and the node types its autoscaler can launch."""
    node_types = published_node_types() or autoscaler_file_node_types()
    return Capacity(nodes_up(), node_types or (), unseen_autoscaler=node_types is None and joins_cluster())


def nodes_up() -> tuple[dict[str, float], ...]:
    import ray

    return tuple(dict(node["Resources"]) for node in ray.nodes() if node.get("Alive"))


def published_node_types() -> tuple[NodeType, ...] | None:
    from ray._private.state import state

    config = state.get_cluster_config()
    if config is None or not config.node_group_configs:
        return None
    return tuple(NodeType(group.name, dict(group.resources), _bounded(group.name, group.max_count))
                 for group in config.node_group_configs)


def _bounded(name: str, max_count: int) -> int:
    """A group without a max count (-1) is sized as one node: nothing says how many it can have."""
    if max_count >= 0:
        return max_count
    log.warning("the cluster's node type %s has no max count: stages size it as one node; set data.num_workers "
                "and generation.concurrency for more", name)
    return 1


def autoscaler_file_node_types() -> tuple[NodeType, ...] | None:
    import yaml

    path = autoscaling_config_path()
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        return node_types_of(yaml.safe_load(f))  # JSON is YAML too (Ray's test clusters write JSON)


def node_types_of(config: dict) -> tuple[NodeType, ...]:
    """The worker types of a cluster config (`ray up`'s YAML): resources as declared (the
    cluster files declare them), max count capped by the cluster's max_workers."""
    cap = config.get("max_workers")
    types = []
    for name, node_type in config.get("available_node_types", {}).items():
        if name == config.get("head_node_type"):
            continue
        counts = [c for c in (node_type.get("max_workers", cap), cap) if c is not None]
        types.append(NodeType(name, dict(node_type.get("resources", {})), min(counts, default=0)))
    return tuple(types)


def autoscaling_config_path() -> str | None:
    """The --autoscaling-config of the autoscaler monitor of the cluster this process is
    connected to, when the monitor runs on this node (found by the GCS port it serves)."""
    import psutil
    import ray

    port = ray.get_runtime_context().gcs_address.rsplit(":", 1)[1]
    for process in psutil.process_iter(["cmdline"]):
        args = process.info["cmdline"] or []
        if not any(arg.endswith("monitor.py") for arg in args[:3]):
            continue
        options = dict(arg[2:].split("=", 1) for arg in args if arg.startswith("--") and "=" in arg)
        if options.get("gcs-address", "").rsplit(":", 1)[-1] == port and options.get("autoscaling-config"):
            return os.path.expanduser(options["autoscaling-config"])
    return None


# ------------------------------------------------------------------ waiting for nodes
def wait_seconds() -> float:
    value = os.environ.get(WAIT_ENV, str(DEFAULT_WAIT_S))
    try:
        return float(value)
    except ValueError:
        raise ClusterCapacityError(f"{WAIT_ENV} must be a number of seconds, not {value!r}") from None


def free_cpus(capacity: Capacity, wanted: float) -> float:
    """The CPUs free now for work that wants `wanted` of them, or the most a node the autoscaler
    can launch has, whichever is more. Sizing work to them, not to the cluster's total, keeps
    CPUs an actor still holds (a pool another stage left alive) from keeping it waiting for
    ever. Ray frees a finished stage's CPUs (Ray Train's placement group, say) a moment after
    it ends: that moment is waited for, or the work would run on half the cores it could have."""
    import ray

    deadline = time.monotonic() + FREE_CPU_WAIT_S
    while True:
        free = max(ray.available_resources().get("CPU", 1), capacity.largest_launchable_cpu_node())
        if free >= wanted or time.monotonic() > deadline:
            return free
        time.sleep(0.5)


def wait_for_nodes(stage: str, bundle: dict[str, float], count: int, capacity: Capacity | None = None,
                   timeout: float | None = None, setting: str | None = None) -> None:
    """Returns once a node up fits one worker's `bundle` (at once where one does: a fixed
    cluster, the local demo). Otherwise asks the autoscaler for `count` of them and waits for
    the first node, up to `timeout` seconds (TOKDIST_RAY_NODE_WAIT_S, default 900); the
    stage starts there and grows as the others come up. Raises ClusterCapacityError when no
    node type can hold `bundle` (`setting`: the option that sets it, for the message), or
    none came up in time."""
    capacity = capacity or cluster_capacity()
    if capacity.fits_up(bundle):
        return
    asked = f"{count} worker(s) of {shape(bundle)}"
    if not capacity.may_launch(bundle):
        lower = f", or lower {setting}" if setting else ""
        raise ClusterCapacityError(f"{stage} needs {asked}, which no node of this cluster holds ({capacity.describe()}); "
                                   f"add a node type that has them to the cluster config{lower}")
    import ray

    timeout = wait_seconds() if timeout is None else timeout
    log.info("%s: asked the autoscaler for %s; waiting up to %.0f s for the first node", stage, asked, timeout)
    demand = _pending_demand(bundle, count)
    deadline = time.monotonic() + timeout
    try:
        while not any(fits(bundle, node) for node in nodes_up()):
            if time.monotonic() >= deadline:
                now = dataclasses.replace(capacity, nodes=nodes_up())
                raise ClusterCapacityError(
                    f"{stage} asked the autoscaler for {asked} and no such node came up in {timeout:.0f} s "
                    f"({now.describe()}); `ray status` on the head says why (a cloud quota, say); "
                    f"{WAIT_ENV}=<seconds> waits longer")
            time.sleep(POLL_S)
    finally:
        for group in demand:  # the stage's own workers ask from here on
            ray.util.remove_placement_group(group)


def _pending_demand(bundle: dict[str, float], count: int) -> list:
    """`count` placement groups of one `bundle` each: demand the autoscaler sees until they
    are placed, each on its own (v2 places a group's bundles all or none, so one group of
    more workers than the cluster can hold would launch nothing). Not `request_resources`:
    its floor is one per cluster, and Ray Data's autoscaling coordinator, alive once any
    dataset has run, rewrites it every 20 s with its own requests; a request it overwrote
    before the autoscaler read it left the stage waiting for a node never launched."""
    import ray

    return [ray.util.placement_group([{k: v for k, v in bundle.items() if v}]) for _ in range(count)]
