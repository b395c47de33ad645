"""A cluster that starts empty, as cloud clusters do (cluster/*.yaml: a head without CPUs,
min_workers 0): Ray's fake multi-node provider under Ray's own autoscaler launches node types
on demand on this machine. The job sizes its stages from the node types, not from the empty
head, asks for the nodes and runs on them, also while something else rewrites the
autoscaler's resource requests (Ray Data does, once a dataset has run).

Not ray.cluster_utils.AutoscalingCluster itself: its start and shutdown run `ray stop --force`,
which stops every Ray instance of this user on the machine (other test runs' too), and its
config template (fake_multi_node/example.yaml) is missing from Ray 2.60's wheel. The fixture
starts the same head (`ray start --head --autoscaling-config`, RAY_FAKE_CLUSTER=1) on ports
and a temp dir of its own, and stops exactly its processes. The drivers run in child
processes, apart from the test session's own Ray instance."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO_ROOT, free_ports
from tests.helpers import SENTENCES, WORDS

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CPU_NODE = {"CPU": 2}  # Ray Data needs 2 logical CPUs a node (DESIGN.md)
GPU_NODE = {"CPU": 2, "GPU": 1}  # a fake GPU: a resource the autoscaler places by, no device
NODE_TYPES = {
    "cpu": {"resources": CPU_NODE, "node_config": {}, "min_workers": 0, "max_workers": 2},
    "gpu": {"resources": GPU_NODE, "node_config": {}, "min_workers": 0, "max_workers": 1},
}


def _config(gcs_address: str) -> dict:
    """The fake provider's cluster config (fake_multi_node/example.yaml's keys): worker nodes
    join the GCS at `gcs_address`, not Ray's default port."""
    return {
        "cluster_name": "tokdist-fake", "max_workers": 3, "head_node_type": "ray.head.default",
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": {"ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
                                 **NODE_TYPES},
        "idle_timeout_minutes": 10,  # no node goes away during a test
        "upscaling_speed": 1.0, "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


@pytest.fixture
def autoscaling_cluster():
    """An empty autoscaling cluster (a head with 0 CPUs); yields its GCS address, the
    environment its drivers run in and its temp dir (its logs)."""
    temp = tempfile.mkdtemp(prefix="as", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = dict(os.environ, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", HF_HUB_OFFLINE="1",
               RAY_AUTH_MODE="disabled",  # its drivers need no token
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p))
    env.pop("RAY_ADDRESS", None)
    head, address = None, None
    try:
        head, address = _start_head(temp, env)
        yield address, env, temp
    finally:
        if head is not None:
            os.killpg(head.pid, signal.SIGTERM)
            try:
                head.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
        _kill_left(temp)  # worker nodes the autoscaler started, should any outlive the head
        shutil.rmtree(temp, ignore_errors=True)


def _start_head(temp: str, env: dict) -> tuple[subprocess.Popen, str]:
    """The head, with the fake provider's config: (its process, its GCS address). Its ports
    are probed free just before it binds them, and another process may take one first: it is
    started again once, on other ports."""
    import ray

    for attempt in range(2):
        port, dashboard, agent, agent_grpc, metrics, runtime_env = free_ports(6)
        address = f"{ray._private.services.get_node_ip_address()}:{port}"
        config = os.path.join(temp, "autoscaling.json")
        with open(config, "w") as f:
            json.dump(_config(address), f)
        log = os.path.join(temp, f"head-{attempt}.log")
        with open(log, "w") as out:
            head = subprocess.Popen(
                [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}",
                 "--num-cpus=0", f"--autoscaling-config={config}", f"--temp-dir={temp}", "--disable-usage-stats",
                 # a dashboard, as a cloud head has: Ray Train's placement-group cleaner asks its state API
                 "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                 # own ports: the defaults may be held by another head on the machine
                 f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
                 f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}"],
                env=dict(env, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0"), stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if _head_up(head, temp):
            return head, address
        _kill_left(temp)  # what the failed start left
    raise RuntimeError("the autoscaling cluster's head did not come up: " + Path(log).read_text()[-3000:])


def _head_up(head: subprocess.Popen, temp: str) -> bool:
    """Whether the head came up (`ray start` writes its address once it is), False if it
    exited first."""
    deadline = time.monotonic() + 180
    while not os.path.exists(os.path.join(temp, "ray_current_cluster")):
        if head.poll() is not None:
            return False
        if time.monotonic() > deadline:
            os.killpg(head.pid, signal.SIGKILL)
            raise RuntimeError("the autoscaling cluster's head did not come up in 180 s")
        time.sleep(0.5)
    return True


def _kill_left(temp: str) -> None:
    left = [p for p in psutil.process_iter(["cmdline"]) if any(temp in arg for arg in p.info["cmdline"] or [])]
    for process in left:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=10)


def _run(script: str, args: list, env: dict, temp: str, timeout: int = 600) -> dict:
    try:
        run = subprocess.run([sys.executable, "-c", script, *map(str, args)], env=env, capture_output=True,
                             text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:  # where it stood, and what the autoscaler did meanwhile
        pytest.fail(f"the driver ran past {timeout} s; its stderr's end:\n{_text(e.stderr)[-6000:]}\n"
                    f"the autoscaler's log's end:\n{_autoscaler_log(temp)[-4000:]}")
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(next(line[7:] for line in run.stdout.splitlines() if line.startswith("RESULT ")))


def _text(output: bytes | str | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def _autoscaler_log(temp: str) -> str:
    logs = Path(temp, "session_latest", "logs")
    return "".join(log.read_text(errors="replace") for log in sorted(logs.glob("monitor*.log")))


STAGES = """
import json, sys, threading, time
import ray, ray.data
from ray.autoscaler.sdk import request_resources
from tokdist_ray import capacity
from tokdist_ray.config import FileDataSource, GeneratedDataSource
from tokdist_ray.data.corpus import file_source
from tokdist_ray.data.generation import backend, ray_backend, vllm_backend
from tokdist_ray.data.mining.mining import mine_corpus
from tokdist_ray.raycluster import connect
from tokdist_ray.vocab.merges import expand_with_merges
from tokdist_ray.vocab.models import load_tokenizer

def nodes():
    return [{"id": n["NodeID"], "CPU": n["Resources"].get("CPU", 0), "GPU": n["Resources"].get("GPU", 0)}
            for n in ray.nodes() if n["Alive"]]

def refusal(stage, bundle, **kwargs):
    try:
        capacity.wait_for_nodes(stage, bundle, 1, **kwargs)
    except capacity.ClusterCapacityError as e:
        return str(e)

def overwrite_requests():  # as Ray Data's autoscaling coordinator does every 20 s, here at once
    while True:
        request_resources(bundles=[])
        time.sleep(0.05)

model, corpus, run_dir, words = sys.argv[1:5]
connect()  # RAY_ADDRESS is set: the job's own way in
threading.Thread(target=overwrite_requests, daemon=True).start()
seen = capacity.cluster_capacity()
result = {"before": nodes(), "node_types": [[t.name, t.resources, t.max_count] for t in seen.node_types],
          "miners": seen.cpu_workers(1), "gpu_replicas": seen.gpu_replicas(),
          "miners_by_nodes_up": capacity.Capacity(seen.nodes).cpu_workers(1)}
backend.vllm_installed = lambda: True  # vLLM is not installed here; the choice is what is tested
result["backend"] = backend.resolve_backend("auto")
result["infeasible"] = refusal("probe", {"TPU": 1})
result["timed_out"] = refusal("evaluation", {"CPU": 2}, timeout=0)
file_source.PART_BYTES = 2048  # parts enough for every miner of the small corpus
ray.data.DataContext.get_current().wait_for_min_actors_s = 300  # the pool starts once all its miners have nodes
expansion = expand_with_merges(load_tokenizer(model), json.loads(words))
mined = mine_corpus(FileDataSource([corpus]), expansion, 24, 10**6, out_dir=run_dir)
result["mining"] = {"workers": mined.work.workers, "nodes": mined.work.nodes, "documents": mined.stats.documents}
result["after_mining"] = nodes()
vllm_backend.vllm_stage = lambda *args: "vLLM stage"  # ray.data.llm's side, which needs vLLM
result["generation"] = ray_backend.generation_stage("vllm", model, GeneratedDataSource(), 24, [])
result["after_generation"] = nodes()
print("RESULT " + json.dumps(result))
"""


def test_an_empty_autoscaling_cluster_is_sized_by_its_node_types_and_grows_for_each_stage(
        autoscaling_cluster, tiny_model_dir, tmp_path):
    address, env, temp = autoscaling_cluster
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(48):  # about 30 kB: 2 kB parts for 4 miners
        (corpus / f"doc{i:02d}.txt").write_text(" ".join(SENTENCES[(i + k) % 4] for k in range(8)), encoding="utf-8")
    started = time.perf_counter()
    # a node that does not come up fails the stage in 3 minutes, not the test's 10
    result = _run(STAGES, [tiny_model_dir(), corpus, tmp_path / "run", json.dumps(WORDS)],
                  dict(env, RAY_ADDRESS=address, TOKDIST_RAY_NODE_WAIT_S="180"), temp)
    print(f"stages on the autoscaling cluster: {time.perf_counter() - started:.0f} s", json.dumps(result))

    # before any launch: an empty head, and the node types the autoscaler can launch
    assert [(n["CPU"], n["GPU"]) for n in result["before"]] == [(0, 0)]
    assert result["node_types"] == [[name, t["resources"], t["max_workers"]] for name, t in NODE_TYPES.items()]
    assert (result["miners"], result["gpu_replicas"], result["miners_by_nodes_up"]) == (4, 1, 1)
    assert result["backend"] == "vllm"  # from the GPU node type; no GPU was up
    for message in (result["infeasible"], result["timed_out"]):
        assert message and "\n" not in message
        assert "node types it can launch: cpu {CPU: 2} (up to 2), gpu {CPU: 2, GPU: 1} (up to 1)" in message
    assert result["infeasible"].startswith("probe needs 1 worker(s) of {TPU: 1}, which no node of this cluster holds")
    assert result["timed_out"].startswith("evaluation asked the autoscaler for 1 worker(s) of {CPU: 2} and no such "
                                          "node came up in 0 s")

    # mining launched the CPU nodes, no GPU node, and ran 4 miners on both
    cpu_nodes = {n["id"] for n in result["after_mining"] if (n["CPU"], n["GPU"]) == (2, 0)}
    assert len(cpu_nodes) == 2 and not any(n["GPU"] for n in result["after_mining"])
    assert result["mining"]["workers"] == 4 and result["mining"]["documents"] == 48
    assert set(result["mining"]["nodes"]) == cpu_nodes

    # the vLLM stage is sized from the GPU type and waited for a GPU node to come up, its
    # demand seen by the autoscaler although the requests were overwritten all along
    assert result["generation"] == ["vLLM stage", 1]
    assert [(n["CPU"], n["GPU"]) for n in result["after_generation"] if n["GPU"]] == [(2, 1)]


JOB = """
import json, sys
import ray
from tokdist_ray.job.cli import main

code = main(["run", *json.loads(sys.argv[1])])
nodes = {n["NodeID"]: {k: n["Resources"][k] for k in ("CPU", "GPU") if k in n["Resources"]}
         for n in ray.nodes() if n["Alive"]} if ray.is_initialized() else {}
print("RESULT " + json.dumps({"code": code, "nodes": nodes}))
"""


def test_the_job_on_an_empty_autoscaling_cluster_exports_the_model_of_a_one_node_run(
        autoscaling_cluster, tiny_model_dir, job_corpus_dir, tmp_path):
    from safetensors.torch import load_file

    from tests.helpers import tiny_job_args

    address, env, temp = autoscaling_cluster

    def job(run_dir, **extra):
        started = time.perf_counter()
        args = tiny_job_args(tiny_model_dir(tied=False), job_corpus_dir, run_dir) + ["--distributed.num_workers", "2"]
        result = _run(JOB, [json.dumps(args)], dict(env, **extra), temp)
        assert result["code"] == 0
        return result, time.perf_counter() - started

    (cluster, cluster_s), (one, one_s) = (job(tmp_path / "cluster", RAY_ADDRESS=address, TOKDIST_RAY_NODE_WAIT_S="180"),
                                           job(tmp_path / "one"))
    run = tmp_path / "cluster"
    placement = {
        "launched": cluster["nodes"],
        "mined": json.loads((run / "job.json").read_text())["outputs"]["snippets"]["report"]["mining"]["nodes"],
        "trained": json.loads((run / "model" / "report.json").read_text())["distributed"]["nodes"],
        "evaluated": json.loads((run / "eval" / "eval.json").read_text())["node"],
    }
    print(f"job on the autoscaling cluster {cluster_s:.0f} s, on one node {one_s:.0f} s:", json.dumps(placement))
    assert len(one["nodes"]) == 1  # the job's own local instance
    launched = {kind: {node for node, shape in cluster["nodes"].items() if shape == NODE_TYPES[kind]["resources"]}
                for kind in NODE_TYPES}
    # CPU work on CPU nodes; evaluation, a model pass, where the cluster's GPUs are (a node launched for it)
    assert set(placement["mined"]) | set(placement["trained"]) <= launched["cpu"], placement
    assert len(launched["gpu"]) == 1 and placement["evaluated"] in launched["gpu"], placement

    on_cluster, on_one_node = (load_file(tmp_path / name / "model" / "model.safetensors") for name in ("cluster", "one"))
    assert on_cluster.keys() == on_one_node.keys()
    assert all(on_cluster[name].equal(on_one_node[name]) for name in on_one_node), placement
