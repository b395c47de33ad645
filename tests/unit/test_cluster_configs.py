"""The cluster launch files: Ray's own validation, dashboards kept off public addresses."""

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_cluster_yamls_pass_rays_validation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster" / name).read_text())
    validate_config(prepare_config(config))
    assert "127.0.0.1" in " ".join(config["head_start_ray_commands"])
    config["available_node_types"]["head"]["not_a_field"] = 1
    with pytest.raises(Exception):
        validate_config(prepare_config(config))


def test_rayjob_can_be_submitted_and_watched_and_keeps_the_dashboard_private():
    job = yaml.safe_load((REPO / "cluster" / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and "expand_vocab.py" in job["spec"]["entrypoint"]
    cluster = job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    # the submitter runs in the head pod (no separate pod that must reach the dashboard) ...
    assert job["spec"]["submissionMode"] == "SidecarMode"
    assert head["template"]["spec"]["restartPolicy"] == "Never"
    # ... but the operator polls the job's status through the head service in every mode,
    # so the dashboard must listen on the pod's address, not on 127.0.0.1
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    # private all the same: a cluster-internal service, no ingress, and Ray's token auth
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress", False)
    assert cluster["authOptions"]["mode"] == "token"
    assert tuple(int(p) for p in cluster["rayVersion"].split(".")[:2]) >= (2, 52), "token auth needs Ray >= 2.52"


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_cluster_images_run_the_cuda_and_ray_the_gpu_extra_installs(name):
    """The gpu extra's ray[llm] pins vLLM, which pins a torch built for CUDA 13 (Ray 2.60: vllm
    0.29.0, torch 2.13.0, CUDA 13.0): the nodes run the ray-llm image of a Ray the extra
    accepts, built for CUDA 13, on hosts whose driver runs CUDA 13 (>= 580)."""
    import tomllib
    from packaging.requirements import Requirement

    config = yaml.safe_load((REPO / "cluster" / name).read_text())
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    ray_llm = next(Requirement(r) for r in extra if Requirement(r).name == "ray")
    assert "llm" in ray_llm.extras
    repository, tag = config["docker"]["image"].split(":")
    ray_version, python, cuda = tag.split("-")
    assert repository == "rayproject/ray-llm" and cuda.startswith("cu13") and python.startswith("py3")
    assert ray_llm.specifier.contains(ray_version)
    assert not any("worker_image" in node.get("docker", {}) for node in config["available_node_types"].values())
    if name == "gcp.yaml":
        for node in config["available_node_types"].values():
            image = node["node_config"]["disks"][0]["initializeParams"]["sourceImage"]
            assert int(image.rsplit("nvidia-", 1)[1]) >= 580, image
