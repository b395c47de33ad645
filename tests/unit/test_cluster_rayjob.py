"""cluster/rayjob.yaml: its documents pass a schema of the KubeRay v1 RayJob CRD (and of the
core PersistentVolumeClaim), every Ray pod mounts the one ReadWriteMany claim at run_dir's
/shared and reads the hub token from a Secret, the job can be submitted and watched while the
dashboard stays private. Broken copies must fail.

No copy of KubeRay's CRD (ray.io_rayjobs.yaml) is installed here: no installed package ships
it and none is a dependency, so SCHEMA below restates, as JSON schema, the part of the CRD's
openAPIV3Schema (KubeRay 1.5, ray.io/v1) and of the core/v1 pod types this file can use: field
names, types, enums, required keys. It is stricter than the API server in one way: unknown
fields are errors (the API server drops them, or refuses them under `kubectl apply
--validate=strict`), so a misspelt key fails here instead of being silently ignored. A field
the file starts using is added here, from the CRD."""

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SHARED = "/shared"
HUB_TOKEN = "HF_TOKEN"

STR = {"type": "string"}
INT = {"type": "integer"}
BOOL = {"type": "boolean"}
NUMBER = {"type": "number"}
OBJECT = {"type": "object"}  # a part the file does not use: its fields are not checked
STR_MAP = {"type": "object", "additionalProperties": STR}
# resource.Quantity, as the CRD writes it
QUANTITY = {
    "anyOf": [
        {"type": "integer"},
        {
            "type": "string",
            "pattern": r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$",
        },
    ]
}


def obj(required=(), **properties):
    return {"type": "object", "additionalProperties": False, "required": list(required), "properties": properties}


def array(items, **more):
    return {"type": "array", "items": items, **more}


def one_of_these(schema, count):
    """An object with `count` keys: a name and exactly one source (env valueFrom, volumes)."""
    return {**schema, "minProperties": count, "maxProperties": count}


KEY_REF = obj(["key"], name=STR, key=STR, optional=BOOL)
ENV_VAR = obj(
    ["name"],
    name=STR,
    value=STR,
    valueFrom=one_of_these(
        obj(
            secretKeyRef=KEY_REF,
            configMapKeyRef=KEY_REF,
            fieldRef=obj(["fieldPath"], apiVersion=STR, fieldPath=STR),
            resourceFieldRef=obj(["resource"], containerName=STR, resource=STR, divisor=QUANTITY),
        ),
        1,
    ),
)
CONTAINER = obj(
    ["name"],
    name=STR,
    image=STR,
    imagePullPolicy={"enum": ["Always", "IfNotPresent", "Never"]},
    command=array(STR),
    args=array(STR),
    workingDir=STR,
    env=array(ENV_VAR),
    envFrom=array(obj(prefix=STR, secretRef=obj(name=STR, optional=BOOL), configMapRef=obj(name=STR, optional=BOOL))),
    resources=obj(
        limits={"type": "object", "additionalProperties": QUANTITY},
        requests={"type": "object", "additionalProperties": QUANTITY},
    ),
    volumeMounts=array(obj(["name", "mountPath"], name=STR, mountPath=STR, readOnly=BOOL, subPath=STR)),
    ports=array(obj(["containerPort"], name=STR, containerPort=INT, protocol=STR)),
    securityContext=obj(
        runAsUser=INT,
        runAsGroup=INT,
        runAsNonRoot=BOOL,
        privileged=BOOL,
        allowPrivilegeEscalation=BOOL,
        readOnlyRootFilesystem=BOOL,
        capabilities=obj(add=array(STR), drop=array(STR)),
    ),
    lifecycle=OBJECT,
    readinessProbe=OBJECT,
    livenessProbe=OBJECT,
)
VOLUME = one_of_these(
    obj(
        ["name"],
        name=STR,
        persistentVolumeClaim=obj(["claimName"], claimName=STR, readOnly=BOOL),
        emptyDir=obj(medium=STR, sizeLimit=QUANTITY),
        secret=obj(secretName=STR, optional=BOOL, defaultMode=INT),
        configMap=obj(name=STR, optional=BOOL, defaultMode=INT),
        nfs=obj(["server", "path"], server=STR, path=STR, readOnly=BOOL),
    ),
    2,
)
POD_TEMPLATE = obj(
    metadata=obj(labels=STR_MAP, annotations=STR_MAP),
    spec=obj(
        ["containers"],
        containers=array(CONTAINER, minItems=1),
        initContainers=array(CONTAINER),
        volumes=array(VOLUME),
        restartPolicy={"enum": ["Always", "OnFailure", "Never"]},
        nodeSelector=STR_MAP,
        tolerations=array(OBJECT),
        affinity=OBJECT,
        serviceAccountName=STR,
        imagePullSecrets=array(obj(name=STR)),
        securityContext=OBJECT,
        priorityClassName=STR,
        terminationGracePeriodSeconds=INT,
    ),
)
METADATA = obj(
    ["name"],
    name={"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
    namespace=STR,
    labels=STR_MAP,
    annotations=STR_MAP,
)
RAY_START_PARAMS = STR_MAP  # map[string]string in the CRD: `num-cpus: 0` unquoted is refused
WORKER_GROUP = obj(
    ["groupName"],
    groupName=STR,
    replicas=INT,
    minReplicas=INT,
    maxReplicas=INT,
    numOfHosts=INT,
    idleTimeoutSeconds=INT,
    suspend=BOOL,
    rayStartParams=RAY_START_PARAMS,
    template=POD_TEMPLATE,
    scaleStrategy=obj(workersToDelete=array(STR)),
)
RAY_CLUSTER_SPEC = obj(
    ["headGroupSpec"],
    rayVersion=STR,
    authOptions=obj(mode={"enum": ["disabled", "token"]}),
    enableInTreeAutoscaling=BOOL,
    autoscalerOptions=OBJECT,
    gcsFaultToleranceOptions=OBJECT,
    headServiceAnnotations=STR_MAP,
    suspend=BOOL,
    managedBy=STR,
    headGroupSpec=obj(
        ["template"],
        serviceType={"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
        enableIngress=BOOL,
        headService=OBJECT,
        rayStartParams=RAY_START_PARAMS,
        template=POD_TEMPLATE,
    ),
    workerGroupSpecs=array(WORKER_GROUP),
)
RAYJOB = obj(
    ["apiVersion", "kind", "metadata", "spec"],
    apiVersion={"const": "ray.io/v1"},
    kind={"const": "RayJob"},
    metadata=METADATA,
    spec=obj(
        entrypoint=STR,
        submissionMode={"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
        shutdownAfterJobFinishes=BOOL,
        ttlSecondsAfterFinished=INT,
        activeDeadlineSeconds=INT,
        backoffLimit=INT,
        suspend=BOOL,
        jobId=STR,
        runtimeEnvYAML=STR,
        metadata=STR_MAP,
        entrypointNumCpus=NUMBER,
        entrypointNumGpus=NUMBER,
        entrypointResources=STR,
        clusterSelector=STR_MAP,
        managedBy=STR,
        deletionStrategy=OBJECT,
        submitterPodTemplate=POD_TEMPLATE,
        submitterConfig=obj(backoffLimit=INT),
        rayClusterSpec=RAY_CLUSTER_SPEC,
    ),
)
PVC = obj(
    ["apiVersion", "kind", "metadata", "spec"],
    apiVersion={"const": "v1"},
    kind={"const": "PersistentVolumeClaim"},
    metadata=METADATA,
    spec=obj(
        ["accessModes", "resources"],
        accessModes=array({"enum": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]}, minItems=1),
        storageClassName=STR,
        volumeMode={"enum": ["Filesystem", "Block"]},
        volumeName=STR,
        selector=OBJECT,
        resources=obj(["requests"], requests=obj(["storage"], storage=QUANTITY)),
    ),
)
SCHEMA = {"RayJob": RAYJOB, "PersistentVolumeClaim": PVC}


class ClusterConfigError(ValueError):
    """What the CRD lets through but leaves a RayJob that cannot run the job."""


def load() -> list[dict]:
    return list(yaml.safe_load_all((REPO / "cluster" / "rayjob.yaml").read_text()))


def ray_pods(job: dict) -> dict[str, dict]:
    cluster = job["spec"]["rayClusterSpec"]
    pods = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    pods |= {group["groupName"]: group["template"]["spec"] for group in cluster.get("workerGroupSpecs", [])}
    return pods


def check_rayjob(docs: list[dict]) -> None:
    """The schema (jsonschema.ValidationError), then ours (ClusterConfigError)."""
    for doc in docs:
        if doc.get("kind") not in SCHEMA:
            raise ClusterConfigError(f"unexpected document kind {doc.get('kind')!r}")
        jsonschema.Draft202012Validator(SCHEMA[doc["kind"]]).validate(doc)
    claims = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    for pod_name, pod in ray_pods(job).items():
        ray = pod["containers"][0]  # KubeRay runs Ray in the first container
        limits = ray.get("resources", {}).get("limits", {})
        if not {"cpu", "memory"} <= limits.keys():
            # without limits Ray takes the whole Kubernetes node's CPUs and memory as its own
            raise ClusterConfigError(f"{pod_name}: the Ray container sets no cpu and memory limits: {limits}")
        token = [e for e in ray.get("env", []) if e["name"] == HUB_TOKEN]
        if not token or "secretKeyRef" not in token[0].get("valueFrom", {}):
            raise ClusterConfigError(f"{pod_name}: {HUB_TOKEN} must come from a Secret (valueFrom.secretKeyRef)")
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mounted = [m for m in ray.get("volumeMounts", []) if m["mountPath"] == SHARED]
        source = volumes.get(mounted[0]["name"], {}) if mounted else {}
        claim = source.get("persistentVolumeClaim", {}).get("claimName")
        if claim not in claims or "ReadWriteMany" not in claims[claim]["spec"]["accessModes"]:
            raise ClusterConfigError(f"{pod_name}: {SHARED} is not the ReadWriteMany claim of this file")
    if not any("nvidia.com/gpu" in p["containers"][0]["resources"]["limits"] for p in ray_pods(job).values()):
        raise ClusterConfigError("no worker group has GPUs: the job distills on GPUs")


def test_rayjob_passes_the_crd_schema_and_ours():
    docs = load()
    check_rayjob(docs)
    assert [d["kind"] for d in docs] == ["PersistentVolumeClaim", "RayJob"]  # the claim exists before the pods


def job_of(docs):
    return next(d for d in docs if d["kind"] == "RayJob")


def group(docs, name):
    return next(g for g in job_of(docs)["spec"]["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == name)


def unknown_field(docs):
    job_of(docs)["spec"]["rayClusterSpec"]["headGroupSpec"]["notAField"] = 1


def misspell_key(docs):
    cluster = job_of(docs)["spec"]["rayClusterSpec"]
    cluster["workerGroupSpec"] = cluster.pop("workerGroupSpecs")


def misspell_pod_key(docs):
    container = group(docs, "gpu-trainers")["template"]["spec"]["containers"][0]
    container["volumeMount"] = container.pop("volumeMounts")


def unquoted_start_param(docs):
    job_of(docs)["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0


def bad_submission_mode(docs):
    job_of(docs)["spec"]["submissionMode"] = "Sidecar"


def no_resources(docs):
    del group(docs, "cpu-miners")["template"]["spec"]["containers"][0]["resources"]


def no_gpus(docs):
    del group(docs, "gpu-trainers")["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]


def token_in_the_file(docs):
    container = group(docs, "gpu-trainers")["template"]["spec"]["containers"][0]
    container["env"] = [{"name": HUB_TOKEN, "value": "hf_aTokenWrittenIntoTheManifest"}]


def token_with_two_sources(docs):
    env = group(docs, "gpu-trainers")["template"]["spec"]["containers"][0]["env"][0]
    env["valueFrom"]["configMapKeyRef"] = {"name": "x", "key": HUB_TOKEN}


def unmounted_worker(docs):
    del group(docs, "cpu-miners")["template"]["spec"]["containers"][0]["volumeMounts"]


def single_node_claim(docs):
    next(d for d in docs if d["kind"] == "PersistentVolumeClaim")["spec"]["accessModes"] = ["ReadWriteOnce"]


BROKEN = {
    # the CRD's schema catches these
    "unknown field": (unknown_field, jsonschema.ValidationError, r"'notAField' was unexpected"),
    "misspelt key": (misspell_key, jsonschema.ValidationError, r"'workerGroupSpec' was unexpected"),
    "misspelt pod key": (misspell_pod_key, jsonschema.ValidationError, r"'volumeMount' was unexpected"),
    "rayStartParams value not a string": (
        unquoted_start_param,
        jsonschema.ValidationError,
        r"0 is not of type 'string'",
    ),
    "unknown submission mode": (bad_submission_mode, jsonschema.ValidationError, r"'Sidecar' is not one of"),
    "env var with two sources": (token_with_two_sources, jsonschema.ValidationError, r"has too many properties"),
    # the schema lets these through; the job then cannot run
    "worker group without resources": (no_resources, ClusterConfigError, r"cpu-miners: the Ray container sets no cpu"),
    "no GPUs anywhere": (no_gpus, ClusterConfigError, r"no worker group has GPUs"),
    "hub token written in the file": (token_in_the_file, ClusterConfigError, r"gpu-trainers: HF_TOKEN must come from"),
    "worker without run_dir's volume": (unmounted_worker, ClusterConfigError, r"cpu-miners: /shared is not"),
    "claim one node can mount": (single_node_claim, ClusterConfigError, r"head: /shared is not the ReadWriteMany"),
}


@pytest.mark.parametrize("breakage", list(BROKEN))
def test_broken_copies_fail_validation(breakage):
    mutate, error, message = BROKEN[breakage]
    docs = copy.deepcopy(load())
    mutate(docs)
    with pytest.raises(error, match=message):
        check_rayjob(docs)


def test_rayjob_can_be_submitted_and_watched_and_keeps_the_dashboard_private():
    job = job_of(load())
    assert "expand_vocab.py" in job["spec"]["entrypoint"]
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


def test_the_config_it_runs_writes_run_dir_on_the_claim():
    job = job_of(load())
    config_path = re.search(r"--config /app/(\S+)", job["spec"]["entrypoint"]).group(1)
    run_dir = yaml.safe_load((REPO / config_path).read_text())["run_dir"]
    assert run_dir.startswith(f"{SHARED}/")
    # run_dir's parent is made writable for the image's `ray` user before Ray starts on the head
    (init,) = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["initContainers"]
    assert str(Path(run_dir).parent) in " ".join(init["command"])
