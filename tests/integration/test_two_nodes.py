"""The whole job on a simulated 2-node Ray cluster, tokens to evaluation: where each stage
ran, and that its model equals a one-node run's with the same settings."""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tests.conftest import REPO_ROOT
from tests.helpers import run_cli, tiny_job_args

pytestmark = [pytest.mark.ray, pytest.mark.slow]

JOB_ON_TWO_NODES = """
import json, os, sys
import ray
from ray.cluster_utils import Cluster

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
cluster.add_node(num_cpus=2)
try:
    cluster.wait_for_nodes()
    os.environ["RAY_ADDRESS"] = cluster.address  # the job joins it, as under `ray job submit`
    from tokdist_ray.job.cli import main
    code = main(["run", *json.loads(sys.argv[1])])
    print("RESULT " + json.dumps({"code": code, "alive": [n["NodeID"] for n in ray.nodes() if n["Alive"]]}))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def test_a_job_on_two_nodes_exports_the_model_of_a_one_node_run(ray_session, tiny_model_dir, job_corpus_dir,
                                                                  tmp_path, capsys):
    def args(run_dir):
        # the same CPUs per worker on both: "auto" gives a worker a whole 2-CPU node on two nodes and half of one
        # node's 2, and torch's reductions differ in the last bit with the thread count
        return tiny_job_args(tiny_model_dir(tied=False), job_corpus_dir, run_dir) + [
            "--distributed.num_workers", "2", "--distributed.cpus_per_worker", "1"]

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    two = subprocess.run([sys.executable, "-c", JOB_ON_TWO_NODES, json.dumps(args(tmp_path / "two"))], env=env,
                         capture_output=True, text=True, timeout=900)
    assert two.returncode == 0, two.stderr[-3000:]
    result = json.loads(next(line[7:] for line in two.stdout.splitlines() if line.startswith("RESULT ")))
    assert result["code"] == 0 and len(result["alive"]) == 2, two.stderr[-3000:]

    job = json.loads((tmp_path / "two" / "job.json").read_text())
    mined_on = set(job["outputs"]["snippets"]["report"]["mining"]["nodes"])
    report = json.loads((tmp_path / "two" / "model" / "report.json").read_text())
    trained_on = set(report["distributed"]["nodes"])
    evaluated_on = json.loads((tmp_path / "two" / "eval" / "eval.json").read_text())["node"]
    placement = {"mined": sorted(mined_on), "trained": sorted(trained_on), "evaluated": evaluated_on,
                 "nodes": result["alive"]}
    assert mined_on and mined_on | trained_on | {evaluated_on} <= set(result["alive"]), placement
    assert len(report["distributed"]["nodes"]) == 2  # one per rank

    code, err = run_cli(args(tmp_path / "one"), capsys)  # the test session's one-node instance
    assert code == 0, err
    two_nodes, one_node = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("two", "one"))
    assert two_nodes.keys() == one_node.keys()
    assert all(two_nodes[name].equal(one_node[name]) for name in one_node), placement
