"""`llmserve compress --job`: the same compression as a Kubernetes Job, on a GPU where one is given.

A pure builder: the request in, a batch/v1 Job out (no API calls; `kubectl apply -f -` submits
it). The Job runs `llmserve compress` in the compression image with the source, the output and an
optional corpus file inside one PersistentVolumeClaim mounted at `MOUNT`, so a tenant names paths
in a claim, never on a node. With `gpus > 0` the container asks for that many `gpu_resource`
(and tolerates the usual GPU taint); `llmserve compress` then trains on the GPU it sees through
CUDA (`methods.training_device`), the same code that runs on the CPU otherwise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from llmserve.operator.units import parse_quantity

MOUNT = "/work"
DEFAULT_IMAGE = "llmserve/compress:0.1.0"
# DNS-1123 label: what a Job's name must be (its pods get `<name>-<suffix>`, so at most 57).
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,55}[a-z0-9])?$")
_RESOURCE = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$")


class JobError(ValueError):
    pass


@dataclass
class JobRequest:
    name: str
    claim: str
    source: str  # paths inside the claim
    out: str
    methods: list[str]
    namespace: str = ""
    corpus: str = ""  # a file inside the claim; "" for the default corpus
    extra_args: list[str] = field(default_factory=list)  # further `llmserve compress` flags
    image: str = DEFAULT_IMAGE
    gpus: int = 1
    gpu_resource: str = "nvidia.com/gpu"
    cpu: str = "4"
    memory: str = "32Gi"
    deadline_seconds: int = 6 * 3600


def claim_path(value: str, what: str) -> str:
    """A relative path inside the claim, as it appears under MOUNT; no way out of the claim."""
    path = PurePosixPath(value)
    if not value or path.is_absolute() or any(part in ("..", "") for part in value.split("/")) or "\\" in value:
        raise JobError(f"{what} {value!r} must be a relative path inside the claim, without '..' "
                       "(the Job sees the claim at " + MOUNT + ")")
    return str(PurePosixPath(MOUNT) / path)


def render(req: JobRequest) -> dict:
    """The Job manifest for `req`; JobError names the bad field."""
    if not _NAME.match(req.name):
        raise JobError(f"job name {req.name!r} must be a DNS-1123 label of at most 57 characters")
    if not _NAME.match(req.claim):
        raise JobError(f"claim {req.claim!r} is not a PersistentVolumeClaim name")
    if req.gpus < 0 or not _RESOURCE.match(req.gpu_resource):
        raise JobError(f"gpus must be >= 0 and gpu resource a resource name, got {req.gpus} {req.gpu_resource!r}")
    for what, quantity in (("cpu", req.cpu), ("memory", req.memory)):
        try:
            valid = parse_quantity(quantity) > 0
        except ValueError:
            valid = False
        if not valid:
            raise JobError(f"{what} {quantity!r} is not a Kubernetes quantity")
    if not req.methods:
        raise JobError("at least one --method is needed")
    argv = ["llmserve", "compress", claim_path(req.source, "source"), "--out", claim_path(req.out, "--out")]
    for method in req.methods:
        argv += ["--method", method]
    if req.corpus:
        argv += ["--corpus", claim_path(req.corpus, "--corpus")]
    argv += req.extra_args
    limits = {"cpu": req.cpu, "memory": req.memory}
    tolerations = []
    if req.gpus:
        limits[req.gpu_resource] = str(req.gpus)
        tolerations = [{"key": req.gpu_resource, "operator": "Exists", "effect": "NoSchedule"}]
    labels = {"app.kubernetes.io/name": "llmserve-compress", "app.kubernetes.io/instance": req.name}
    pod = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,  # it talks to no API
        "securityContext": {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{
            "name": "compress",
            "image": req.image,
            "command": argv,
            # No hub downloads: models and corpus come from the claim. HOME and the caches on /tmp.
            "env": [{"name": "HOME", "value": "/tmp"}, {"name": "HF_HOME", "value": "/tmp/hf"},
                    {"name": "HF_HUB_OFFLINE", "value": "1"}, {"name": "TRANSFORMERS_OFFLINE", "value": "1"},
                    {"name": "PYTHONUNBUFFERED", "value": "1"}],
            "resources": {"requests": dict(limits), "limits": limits},
            "volumeMounts": [{"name": "work", "mountPath": MOUNT}, {"name": "tmp", "mountPath": "/tmp"}],
            "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]}},
            "terminationMessagePolicy": "FallbackToLogsOnError",  # the refusal's last lines
        }],
        "volumes": [{"name": "work", "persistentVolumeClaim": {"claimName": req.claim}},
                    {"name": "tmp", "emptyDir": {}}],
        "tolerations": tolerations,
    }
    metadata = {"name": req.name, "labels": labels}
    if req.namespace:
        metadata["namespace"] = req.namespace
    return {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": metadata,
        "spec": {
            "backoffLimit": 0,  # a refused gate or a bad method fails the same way again
            "activeDeadlineSeconds": req.deadline_seconds,
            "ttlSecondsAfterFinished": 7 * 24 * 3600,
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    }
