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


def test_rayjob_submits_from_inside_the_head_pod_and_keeps_the_dashboard_private():
    job = yaml.safe_load((REPO / "cluster" / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and "expand_vocab.py" in job["spec"]["entrypoint"]
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    # a dashboard on 127.0.0.1 is reachable only from the head pod itself: the default
    # K8sJobMode submitter pod (calling the head service) could never submit the job
    assert job["spec"]["submissionMode"] == "SidecarMode"
    assert head["template"]["spec"]["restartPolicy"] == "Never"
