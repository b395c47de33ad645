"""Stages are sized to the cluster that will be: the shipped cluster files' node types, read as
the autoscaler reads them, size an empty cluster as a full one; without node types (a fixed
cluster, the local demo) the nodes up size it, as before. A stage that no node can hold says
so in one line, before anything waits."""

from pathlib import Path

import pytest
import yaml

from tokdist_ray.capacity import (
    WAIT_ENV,
    Capacity,
    ClusterCapacityError,
    NodeType,
    node_types_of,
    wait_for_nodes,
    wait_seconds,
)
from tokdist_ray.config import DistributedConfig
from tokdist_ray.training.ray_trainer import _with_cpus

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
EMPTY = ({"CPU": 0.0, "memory": 8e9},)  # a cloud cluster at start: its head, which runs no work


def shipped(name: str) -> Capacity:
    return Capacity(EMPTY, node_types_of(yaml.safe_load((CLUSTER / name).read_text())))


def test_an_empty_aws_cluster_is_sized_by_the_node_types_it_can_launch():
    aws = shipped("aws.yaml")
    assert [(t.name, t.max_count) for t in aws.node_types] == [("cpu_miners", 16), ("gpu_trainers", 8)]
    assert aws.cpu_workers(1) == 16 * 32  # the GPU nodes' CPUs do not count: no GPU node is launched to mine
    assert aws.gpu_replicas() == 8 * 4 and aws.gpu_replicas(2) == 8 * 2
    assert aws.gpu_replicas(accelerator_type="L40S") == 32 and aws.gpu_replicas(accelerator_type="A100") == 0
    assert aws.largest_cpu_node() == 32
    assert Capacity(EMPTY).cpu_workers(1) == 1 and Capacity(EMPTY).gpu_replicas() == 0  # what sized it before


def test_the_gcp_cluster_offers_its_a100s():
    gcp = shipped("gcp.yaml")
    assert gcp.gpu_replicas(accelerator_type="A100") > 0 and gcp.cpu_workers(1) > 1


def test_a_fixed_cluster_is_sized_by_its_nodes_up():
    nodes = ({"CPU": 2.0}, {"CPU": 8.0, "GPU": 2.0}, {"CPU": 4.0})
    fixed = Capacity(nodes)
    assert fixed.cpu_workers(1) == 14 and fixed.cpu_workers(2) == 7  # GPU nodes up are used for CPU work
    assert fixed.gpu_replicas() == 2 and fixed.largest_cpu_node() == 8


def test_cpu_workers_get_the_most_cpus_at_which_all_of_them_are_placed():
    laptop = Capacity(({"CPU": 2.0},))
    assert laptop.cpus_per_cpu_worker(1) == 2 and laptop.cpus_per_cpu_worker(2) == 1  # the demo's one worker: both cores
    assert laptop.cpus_per_cpu_worker(3) == 1  # more than fit: 1 each, and Ray Train waits as before
    fixed = Capacity(({"CPU": 8.0}, {"CPU": 4.0}))
    assert [fixed.cpus_per_cpu_worker(n) for n in (1, 2, 3, 4)] == [8, 4, 4, 2]
    aws = shipped("aws.yaml")  # an empty cluster: the CPU node type it launches, one worker per node
    assert aws.cpus_per_cpu_worker(16) == 32 and aws.cpus_per_cpu_worker(32) == 16
    # the distillation's "auto": 1 on a cluster that grows (a worker asking for a whole node could wait for
    # ever for CPUs another actor holds there) and with GPUs; a number given is kept
    assert _with_cpus(DistributedConfig(num_workers=16), aws).cpus_per_worker == 1
    assert _with_cpus(DistributedConfig(num_workers=4, use_gpu=True), laptop).cpus_per_worker == 1
    assert _with_cpus(DistributedConfig(num_workers=4, cpus_per_worker=3), aws).cpus_per_worker == 3


def test_a_node_type_is_capped_by_the_cluster_max_workers_and_the_head_is_no_worker_type():
    config = {"max_workers": 3, "head_node_type": "head",
              "available_node_types": {"head": {"resources": {"CPU": 4}, "max_workers": 0},
                                       "cpu": {"resources": {"CPU": 2}, "max_workers": 10},
                                       "any": {"resources": {"CPU": 1}}}}
    assert node_types_of(config) == (NodeType("cpu", {"CPU": 2}, 3), NodeType("any", {"CPU": 1}, 3))


def test_a_stage_no_node_can_hold_fails_at_once_in_one_line():
    aws = shipped("aws.yaml")
    with pytest.raises(ClusterCapacityError) as error:
        wait_for_nodes("generation (vLLM)", {"GPU": 8}, 2, aws, setting="generation.tensor_parallel_size")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("generation (vLLM) needs 2 worker(s) of {GPU: 8}, which no node of this cluster holds (nodes up: {CPU: 0}; ")
    assert "gpu_trainers {CPU: 48, GPU: 4, accelerator_type:L40S: 1} (up to 8)" in message  # what it offers
    assert message.endswith("; add a node type that has them to the cluster config, or lower generation.tensor_parallel_size")
    wait_for_nodes("mining", {"CPU": 1}, 4, Capacity(({"CPU": 2.0},)))  # a node up holds it: no wait, no Ray


def test_an_autoscaler_the_driver_cannot_see_may_still_launch_what_a_stage_needs():
    unseen = Capacity(EMPTY, unseen_autoscaler=True)  # KubeRay's autoscaler, in a container of its own
    assert unseen.may_launch({"GPU": 1}) and not Capacity(EMPTY).may_launch({"GPU": 1})
    assert unseen.cpu_workers(1) == 1  # sized by the nodes up, as before
    assert "node types it can launch: unknown to this driver" in unseen.describe()


def test_a_wait_that_is_no_number_is_refused_in_one_line(monkeypatch):
    monkeypatch.setenv(WAIT_ENV, "15m")
    with pytest.raises(ClusterCapacityError, match=r"^TOKDIST_RAY_NODE_WAIT_S must be a number of seconds, not '15m'$"):
        wait_seconds()


def test_a_stage_asks_for_each_worker_apart_so_a_cluster_too_small_for_all_still_grows(ray_session):
    import ray
    from ray.util.placement_group import placement_group_table

    from tokdist_ray.capacity import _pending_demand

    demand = _pending_demand({"CPU": 64.0, "GPU": 0.0}, 3)  # no node up holds one: pending, as on an empty cluster
    try:
        # Ray's autoscaler v2 places a group's bundles all or none: one group of 3 on a cluster
        # that can launch 2 such nodes would launch none
        assert [placement_group_table(g)["bundles"] for g in demand] == [{0: {"CPU": 64.0}}] * 3
        assert {placement_group_table(g)["state"] for g in demand} == {"PENDING"}
    finally:
        for group in demand:
            ray.util.remove_placement_group(group)
