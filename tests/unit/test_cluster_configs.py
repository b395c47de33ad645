"""The VM cluster files (cluster/aws.yaml, cluster/gcp.yaml) launch as shipped, apart from the
values a user fills in: Ray's own validation (the schema `ray up` applies) passes, every worker
type declares what its machine offers (Ray's GCP provider fills in nothing, so a type without CPU
or GPU is never launched), run_dir is on storage every node mounts, the hub token comes from the
submitter's shell, dashboards stay on localhost. Broken copies of each file must fail."""

import copy
import re
import subprocess
from pathlib import Path

import jsonschema
import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from ray._private.ray_constants import DEFAULT_OBJECT_STORE_MEMORY_PROPORTION
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.util.accelerators.accelerators import NVIDIA_A100, NVIDIA_L40S

REPO = Path(__file__).resolve().parents[2]
VM_FILES = ["aws.yaml", "gcp.yaml"]
SHARED = "/shared"  # where every node sees run_dir's filesystem (jobs/configs: /shared/tokdist/...)

# The published shapes (AWS and Google Cloud machine-type tables) of the types the files use:
# vCPUs, memory in GiB (Google's "GB" are GiB: memoryMb 32768 for n2-standard-8), GPUs and
# their Ray accelerator type. A file naming another type fails until its shape is added here.
MACHINES = {
    "m6i.2xlarge": (8, 32, 0, None),
    "c6i.8xlarge": (32, 64, 0, None),
    "g6e.12xlarge": (48, 384, 4, NVIDIA_L40S),
    "n2-standard-8": (8, 32, 0, None),
    "c3-standard-44": (44, 176, 0, None),
    "a2-highgpu-4g": (48, 340, 4, NVIDIA_A100),
}


class ClusterConfigError(ValueError):
    """What Ray's schema lets through but leaves a cluster that cannot run the job."""


def load(name: str) -> dict:
    return yaml.safe_load((REPO / "cluster" / name).read_text())


def machine_type(node: dict) -> str | None:
    return node["node_config"].get("InstanceType") or node["node_config"].get("machineType")


def expected_resources(machine: str) -> dict:
    """What a worker of this machine type offers Ray: memory as Ray's AWS provider computes it
    (the machine's, less the object store's share)."""
    cpus, gib, gpus, gpu_type = MACHINES[machine]
    resources = {"CPU": cpus, "memory": int(gib * 2**30 * (1 - DEFAULT_OBJECT_STORE_MEMORY_PROPORTION))}
    if gpus:
        resources |= {"GPU": gpus, f"accelerator_type:{gpu_type}": 1}
    return resources


def initialization_commands(config: dict, node_type: str) -> list[str]:
    """The host commands a node of this type runs: its own list replaces the global one (the
    head always takes the global one, as `ray up` does)."""
    node = config["available_node_types"][node_type]
    if node_type != config["head_node_type"] and "initialization_commands" in node:
        return node["initialization_commands"]
    return config["initialization_commands"]


def check_vm_cluster(config: dict) -> None:
    """Ray's validation (jsonschema.ValidationError), then ours (ClusterConfigError)."""
    validate_config(prepare_config(copy.deepcopy(config)))
    for name, node in config["available_node_types"].items():
        machine = machine_type(node)
        if machine not in MACHINES:
            raise ClusterConfigError(f"{name}: machine type {machine!r} is not in MACHINES")
        declared = node["resources"]
        if name == config["head_node_type"]:
            if declared.get("CPU") != 0:
                raise ClusterConfigError(f"{name}: the head must declare CPU: 0 (it runs no work), got {declared}")
        elif declared != expected_resources(machine):
            raise ClusterConfigError(
                f"{name} ({machine}) declares resources {declared}; the machine offers {expected_resources(machine)}"
            )
        mounts = [c for c in initialization_commands(config, name) if re.search(rf"\bmount\b.* {SHARED};", c)]
        if not mounts:
            raise ClusterConfigError(f"{name}: no initialization command mounts the shared filesystem at {SHARED}")
    if f"--volume={SHARED}:{SHARED}" not in config["docker"]["run_options"]:
        raise ClusterConfigError(f"the container does not see the hosts' {SHARED}")


@pytest.mark.parametrize("name", VM_FILES)
def test_cluster_yamls_pass_rays_validation_and_ours(name):
    config = load(name)
    check_vm_cluster(config)
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])


def set_resources(node_type, resources):
    def mutate(config):
        config["available_node_types"][node_type]["resources"] = resources

    return mutate


def drop_gpu(config):
    del config["available_node_types"]["gpu_trainers"]["resources"]["GPU"]


def misspell_node_key(config):
    node = config["available_node_types"]["gpu_trainers"]
    node["max_worker"] = node.pop("max_workers")


def misspell_top_key(config):
    config["head_start_ray_comands"] = config.pop("head_start_ray_commands")


def misspell_machine_key(config):
    node_config = config["available_node_types"]["cpu_miners"]["node_config"]
    key = "InstanceType" if "InstanceType" in node_config else "machineType"
    node_config[key[:-1]] = node_config.pop(key)


def unknown_field(config):
    config["available_node_types"]["head"]["not_a_field"] = 1


def drop_resources(config):
    del config["available_node_types"]["cpu_miners"]["resources"]


def drop_mount(config):
    config["initialization_commands"] = []


def drop_container_mount(config):
    config["docker"]["run_options"].remove(f"--volume={SHARED}:{SHARED}")


BROKEN = {
    # Ray's schema catches these
    "unknown field": (unknown_field, jsonschema.ValidationError, r"'not_a_field' was unexpected"),
    "misspelt top-level key": (
        misspell_top_key,
        jsonschema.ValidationError,
        r"'head_start_ray_comands' was unexpected",
    ),
    "misspelt node type key": (misspell_node_key, jsonschema.ValidationError, r"'max_worker' was unexpected"),
    "node type without resources": (drop_resources, jsonschema.ValidationError, r"'resources' is a required property"),
    # Ray's schema lets these through; the cluster then never launches the type, or runs without run_dir
    "worker type with empty resources": (
        set_resources("gpu_trainers", {}),
        ClusterConfigError,
        r"gpu_trainers \(.*\) declares resources \{\}",
    ),
    "GPU type without GPU": (
        drop_gpu,
        ClusterConfigError,
        r"gpu_trainers \([^)]*\) declares resources \{(?![^}]*'GPU')[^}]*\}; the machine offers \{.*'GPU': 4",
    ),
    "CPU count off": (
        set_resources("cpu_miners", {"CPU": 1}),
        ClusterConfigError,
        r"cpu_miners \([^)]*\) declares resources \{'CPU': 1\}; the machine offers \{'CPU': (32|44),",
    ),
    "misspelt machine type key": (misspell_machine_key, ClusterConfigError, r"cpu_miners: machine type None"),
    "no shared mount": (drop_mount, ClusterConfigError, r"head: no initialization command mounts"),
    "container without the mount": (drop_container_mount, ClusterConfigError, r"container does not see"),
}


@pytest.mark.parametrize("name", VM_FILES)
@pytest.mark.parametrize("breakage", list(BROKEN))
def test_broken_copies_fail_validation(name, breakage):
    mutate, error, message = BROKEN[breakage]
    config = load(name)
    mutate(config)
    with pytest.raises(error, match=message):
        check_vm_cluster(config)


@pytest.mark.parametrize("name", VM_FILES)
def test_rays_schema_alone_passes_a_worker_type_without_resources(name):
    """Why check_vm_cluster goes beyond Ray's validation: `resources: {}` passes it, and on GCP
    the autoscaler then never launches that type."""
    config = load(name)
    set_resources("gpu_trainers", {})(config)
    validate_config(prepare_config(config))


@pytest.mark.parametrize("name", VM_FILES)
def test_every_worker_type_declares_cpu_and_the_gpus_of_its_machine(name):
    config = load(name)
    workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    assert workers
    for node_type, node in workers.items():
        cpus, _, gpus, _ = MACHINES[machine_type(node)]
        assert node["resources"].get("CPU") == cpus, node_type
        assert node["resources"].get("GPU", 0) == gpus, node_type
    assert any(node["resources"].get("GPU") for node in workers.values()), "the job distills on GPUs"


@pytest.mark.parametrize("name", VM_FILES)
def test_shared_mount_commands_parse_and_wait_for_gpus(name):
    config = load(name)
    for node_type in config["available_node_types"]:
        for command in initialization_commands(config, node_type):
            assert subprocess.run(["bash", "-n", "-c", command]).returncode == 0, command
    if config["provider"]["type"] == "gcp":
        # Ray adds `--gpus all` only if nvidia-smi works when the container starts
        assert "nvidia-smi" in initialization_commands(config, "gpu_trainers")[-1]


def test_cluster_run_dirs_are_under_the_shared_mount():
    """Configs meant for a cluster (an absolute run_dir) write where every node and pod sees it."""
    run_dirs = {
        p.name: str(yaml.safe_load(p.read_text())["run_dir"]) for p in (REPO / "jobs" / "configs").glob("*.yaml")
    }
    absolute = {name: run_dir for name, run_dir in run_dirs.items() if run_dir.startswith("/")}
    assert "llama31_8b_german.yaml" in absolute
    for name, run_dir in absolute.items():
        assert run_dir.startswith(f"{SHARED}/"), (name, run_dir)


@pytest.mark.parametrize("name", VM_FILES)
def test_hub_token_comes_from_the_submitters_shell(name):
    """The submit command in the file's header, expanded by bash as the user's shell would, hands
    HF_TOKEN to the job's runtime env; the token itself is in no file."""
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args

    text = (REPO / "cluster" / name).read_text()
    quoted = re.search(r'--runtime-env-json ("(?:[^"\\]|\\.)*")', text)
    assert quoted, "the header shows how to pass HF_TOKEN"
    fake = "hf_fakeTokenForTheTest0123456789"
    expanded = subprocess.run(
        ["bash", "-c", f"printf %s {quoted.group(1)}"],
        env={"HF_TOKEN": fake, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    runtime_env = parse_runtime_env_args(runtime_env_json=expanded, working_dir=".")
    assert runtime_env == {"env_vars": {"HF_TOKEN": fake}, "working_dir": "."}


@pytest.mark.parametrize("path", sorted((REPO / "cluster").iterdir()), ids=lambda p: p.name)
def test_no_secrets_in_cluster_files(path):
    text = path.read_text()
    assert not re.search(r"hf_[A-Za-z0-9]{20,}", text), "a hub token"
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), "an AWS access key"
    assert not re.search(r"HF_TOKEN\s*[:=]\s*['\"]?hf_", text)


@pytest.mark.parametrize("name", VM_FILES)
def test_cluster_images_run_the_cuda_and_ray_the_gpu_extra_installs(name):
    """The gpu extra's ray[llm] pins vLLM, which pins a torch built for CUDA 13 (Ray 2.60: vllm
    0.29.0, torch 2.13.0, CUDA 13.0): the nodes run the ray-llm image of a Ray the extra
    accepts, built for CUDA 13, on hosts whose driver runs CUDA 13 (>= 580)."""
    config = load(name)
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


def test_gpu_extra_admits_no_ray_whose_vllm_refuses_transformers_5():
    """ray[llm] 2.54 and 2.55 ask for vllm >= 0.15 / >= 0.18 (transformers < 5); 2.56 pins vllm
    0.22.0, the first to take transformers 5, which the base dependencies require."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    ray_llm = next(Requirement(r) for r in project["optional-dependencies"]["gpu"] if Requirement(r).name == "ray")
    transformers = next(Requirement(r) for r in project["dependencies"] if Requirement(r).name == "transformers")
    assert not transformers.specifier.contains("4.57.3"), "the floor below was set for transformers >= 5"
    assert not ray_llm.specifier.contains("2.55.1") and ray_llm.specifier.contains("2.56.0")


def test_local_cluster_script_parses_and_keeps_the_dashboard_local():
    script = (REPO / "cluster" / "local_cluster.sh").read_text()
    assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0
    assert "--dashboard-host=127.0.0.1" in script
