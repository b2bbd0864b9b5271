"""Desired children of an LLMService: pure functions from the spec to Kubernetes manifests.

No I/O and no clock: the same spec always renders the same manifests, so the apply layer can
compare them with what it observes and write nothing when they match. Rendered manifests carry
only fields the operator means to own (server-side apply semantics): no empty maps or lists, no
fields the API server would default differently.

Children of `<name>` (DESIGN §3):
- Deployment `<name>-<revision>` (`chat-v3-1a2b3c`): one per served revision, the stable one and
  during a rollout the canary; its pods load only that model version, and carry the revision.
- Service `<name>`: the entry point, the predictor's HTTP port on every ready pod of any track.
- Services `<name>-stable` and `<name>-canary`: Triton's HTTP/gRPC/metrics and the predictor of one
  track, selecting its revision (the canary one selects the stable revision when no rollout runs).
- PodDisruptionBudget `<name>`: voluntary evictions take at most one pod at a time.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from ..predictors.cli import predictor_command
from .tritoncmd import GRPC_PORT, HTTP_PORT, METRICS_PORT, tritonserver_command
from .spec import (
    API_VERSION, CANARY, DEFAULT_RUNTIME_IMAGES, KIND, LABEL_REVISION, LABEL_SERVICE, LABEL_TRACK, PROGRESS_MARGIN,
    STABLE, VLLM, Spec, child_labels, deployment_name, pod_labels, track_service_name,
)
from .units import parse_quantity

PREDICTOR_PORT = 8080
PULLER_CONTAINER = "model-puller"
# Where the puller writes what it installed (the kubelet's default path, set explicitly): the
# kubelet copies it into the pod's status, where the operator reads it (status.served_model()).
TERMINATION_MESSAGE_PATH = "/dev/termination-log"
MODELS_DIR, REPOSITORY_DIR = "/models", "/repository"
STARTUP_PROBE_PERIOD = 10
# The image's non-root user: tritonserver images run as triton-server (uid 1000); ours match.
RUN_AS_USER = 1000
# vLLM's tensor-parallel workers exchange activations through /dev/shm: at least this per GPU.
SHM_PER_PARALLEL_GPU = 1 << 30


@dataclass(frozen=True)
class Tracks:
    """The revisions to serve and their replicas (from `rollout.plan()`): each Spec is the
    LLMService seen with that revision's model/runtime/predictor."""

    stable: Spec
    stable_replicas: int
    canary: Spec | None = None
    canary_replicas: int = 0


@dataclass(frozen=True)
class Images:
    """Operator-wide images (chart values): the puller is the llmserve image itself; `runtime` is
    the Triton image per engine, used when spec.runtime.image is unset."""

    puller: str
    predictor: str
    runtime: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_RUNTIME_IMAGES))

    def triton(self, spec: Spec) -> str:
        return spec.image or self.runtime[spec.engine]


def owner_reference(spec: Spec) -> dict:
    """Makes the LLMService the controller of a child: the garbage collector deletes the child with it.

    No `blockOwnerDeletion`: it only orders foreground deletion, and where the
    OwnerReferencesPermissionEnforcement admission plugin runs, setting it needs `update` on
    llmservices/finalizers, a permission the operator otherwise has no use for (least privilege)."""
    return {"apiVersion": API_VERSION, "kind": KIND, "name": spec.name, "uid": spec.uid, "controller": True}


def _metadata(spec: Spec, name: str, version: int, track: str) -> dict:
    return {"name": name, "namespace": spec.namespace, "labels": child_labels(spec.name, version, track),
            "ownerReferences": [owner_reference(spec)]}


def _nonempty(**fields) -> dict:
    """Optional fields that have a value. The API server omits empty maps and lists, so sending
    them would look like drift on every comparison."""
    return {k: v for k, v in fields.items() if v not in ({}, [], None)}


RESTRICTED_CONTAINER = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def _http_probe(path: str, port: str, period: int, failures: int, timeout: int = 5) -> dict:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period,
            "failureThreshold": failures, "timeoutSeconds": timeout}


def puller_command(spec: Spec) -> list[str]:
    """`llmserve pull`: copy exactly one version into /models and verify it against its manifest,
    then report what it installed (or why not) in its termination message."""
    source = f"{REPOSITORY_DIR}/{spec.repository.path}".rstrip("/")
    cmd = ["llmserve", "pull", "--source", source, "--model", spec.model,
           "--version", str(spec.version), "--dest", MODELS_DIR, "--termination-message", TERMINATION_MESSAGE_PATH,
           # The pulled copy's config.pbtxt carries how this pod runs the model (docs/engines.md).
           "--engine", spec.engine, "--instance-kind", spec.instance_kind]
    if spec.engine_args:
        cmd += ["--engine-args", json.dumps(spec.engine_args, sort_keys=True, separators=(",", ":"))]
    return cmd + (["--sha256", spec.sha256] if spec.sha256 else [])


def shm_size(spec: Spec) -> str:
    """/dev/shm as asked, but at least 1Gi per GPU of the pod when a vLLM replica is sharded over
    several GPUs (its workers on this pod exchange activations through it)."""
    if spec.engine != VLLM or spec.parallelism.gpus_per_replica < 2 or spec.gpus < 1:
        return spec.shm_size
    floor = spec.gpus * SHM_PER_PARALLEL_GPU
    return spec.shm_size if parse_quantity(spec.shm_size) >= floor else f"{spec.gpus}Gi"


def _repository_volume(spec: Spec) -> dict:
    """The model repository's claim, read-only: the puller copies one version out of it."""
    return {"name": "repository", "persistentVolumeClaim": {"claimName": spec.repository.claim, "readOnly": True}}


def triton_container(spec: Spec, images: Images) -> dict:
    """Triton in explicit model-control mode; probes sized so a slow model load never restarts it.

    The startup probe asks for this exact model version and tolerates `startupTimeout` of loading;
    only after it passes do liveness (`/v2/health/live`) and readiness (`/v2/health/ready`, strict:
    every loaded model ready) start, so a loading pod is neither killed nor sent traffic.
    """
    limits = dict(spec.resources.get("limits") or {})
    if spec.gpus:
        limits[spec.gpu_resource] = str(spec.gpus)
    return {
        "name": "tritonserver",
        "image": images.triton(spec),
        "command": tritonserver_command(MODELS_DIR, [spec.model]),
        "ports": [
            {"name": "triton-http", "containerPort": HTTP_PORT, "protocol": "TCP"},
            {"name": "triton-grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        "startupProbe": _http_probe(f"/v2/models/{spec.model}/versions/{spec.version}/ready", "triton-http",
                                    STARTUP_PROBE_PERIOD,
                                    max(1, math.ceil(spec.startup_timeout / STARTUP_PROBE_PERIOD))),
        "readinessProbe": _http_probe("/v2/health/ready", "triton-http", 5, 3, timeout=3),
        "livenessProbe": _http_probe("/v2/health/live", "triton-http", 10, 6),
        "volumeMounts": [
            {"name": "models", "mountPath": MODELS_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
        "securityContext": RESTRICTED_CONTAINER,
        **_nonempty(resources=_nonempty(requests=spec.resources.get("requests"), limits=limits)),
    }


def predictor_container(spec: Spec, images: Images) -> dict:
    """The OpenAI / V2 predictor (issue 5) in front of Triton's gRPC port on localhost."""
    return {
        "name": "predictor",
        "image": spec.predictor_image or images.predictor,
        "command": predictor_command(f"localhost:{GRPC_PORT}", spec.model, http_port=PREDICTOR_PORT),
        "ports": [{"name": "http", "containerPort": PREDICTOR_PORT, "protocol": "TCP"}],
        "readinessProbe": _http_probe("/v2/health/ready", "http", 5, 3, timeout=3),
        "livenessProbe": _http_probe("/v2/health/live", "http", 10, 6),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": RESTRICTED_CONTAINER,
        **_nonempty(resources=_nonempty(**spec.predictor_resources)),
    }


def puller_container(spec: Spec, images: Images) -> dict:
    return {
        "name": PULLER_CONTAINER,
        "image": images.puller,
        "command": puller_command(spec),
        "terminationMessagePath": TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "File",
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
        "volumeMounts": [
            {"name": "repository", "mountPath": REPOSITORY_DIR, "readOnly": True},
            {"name": "models", "mountPath": MODELS_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "securityContext": RESTRICTED_CONTAINER,
    }


def pod_spec(spec: Spec, images: Images, containers: list[dict] | None = None) -> dict:
    """A serving pod: the puller fills /models, then `containers` (Triton and the predictor unless
    given: a multi-node worker runs its engine process instead) serve from it."""
    return {
        "automountServiceAccountToken": False,
        # Service links would inject ~7 variables per Service in the namespace into every pod.
        "enableServiceLinks": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS_USER, "runAsGroup": RUN_AS_USER,
                            "fsGroup": RUN_AS_USER, "seccompProfile": {"type": "RuntimeDefault"}},
        "initContainers": [puller_container(spec, images)],
        "containers": containers or [triton_container(spec, images), predictor_container(spec, images)],
        "volumes": [
            _repository_volume(spec),
            {"name": "models", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size(spec)}},
        ],
        **_nonempty(nodeSelector=spec.node_selector, tolerations=spec.tolerations, affinity=spec.affinity,
                    imagePullSecrets=spec.image_pull_secrets),
    }


def deployment(spec: Spec, images: Images, *, track: str = STABLE, replicas: int | None = None) -> dict:
    """The Deployment serving `spec.revision` on `track` with its share of the replicas."""
    labels = pod_labels(spec.name, spec.version, spec.revision)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {**_metadata(spec, deployment_name(spec.name, spec.revision), spec.version, track),
                     "labels": {**labels, LABEL_TRACK: track}},
        "spec": {
            "replicas": spec.replicas if replicas is None else replicas,
            "selector": {"matchLabels": {LABEL_SERVICE: spec.name, LABEL_REVISION: spec.revision}},
            "revisionHistoryLimit": 2,
            # A new pod must be Ready before an old one goes: a GPU-starved change stalls (and is
            # reported Unschedulable) rather than taking the service down.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "progressDeadlineSeconds": int(spec.startup_timeout) + PROGRESS_MARGIN,
            "template": {"metadata": {"labels": labels}, "spec": pod_spec(spec, images)},
        },
    }


def workload(spec: Spec, images: Images, *, track: str, replicas: int) -> dict:
    """What runs one revision's replicas: a Deployment of one-pod replicas, or a LeaderWorkerSet
    whose groups are the replicas of a model spanning several nodes (llmserve.operator.lws)."""
    if spec.parallelism.multi_node:
        from .lws import leader_worker_set  # lws builds on this module's pod templates

        return leader_worker_set(spec, images, track=track, replicas=replicas)
    return deployment(spec, images, track=track, replicas=replicas)


def _service_ports() -> list[dict]:
    """The predictor and Triton's own ports."""
    return [
        {"name": "http", "port": PREDICTOR_PORT, "targetPort": "http", "protocol": "TCP"},
        {"name": "triton-http", "port": HTTP_PORT, "targetPort": "triton-http", "protocol": "TCP"},
        {"name": "triton-grpc", "port": GRPC_PORT, "targetPort": "triton-grpc", "protocol": "TCP",
         "appProtocol": "grpc"},
        {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"},
    ]


def entry_service(spec: Spec) -> dict:
    """`<name>`: every ready pod of the service, whatever its track: without a gateway, the
    canary's share of traffic is its share of the ready pods. Without a rollout it is all a track
    Service would be, so a service gets its track Services only once a rollout needs them."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(spec, spec.name, spec.version, STABLE),
        "spec": {"selector": {LABEL_SERVICE: spec.name}, "ports": _service_ports()},
    }


def track_service(spec: Spec, track: str, revision: str) -> dict:
    """`<name>-<track>`: the pods of the revision serving `track` (a rollout's route backends)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(spec, track_service_name(spec.name, track), spec.version, track),
        "spec": {"selector": {LABEL_SERVICE: spec.name, LABEL_REVISION: revision}, "ports": _service_ports()},
    }


def disruption_budget(spec: Spec) -> dict:
    """At most one pod evicted at a time; pods that never became ready may always be evicted, so a
    broken version cannot block a node drain."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(spec, spec.name, spec.version, STABLE),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": {LABEL_SERVICE: spec.name}},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def desired_children(spec: Spec, images: Images, tracks: Tracks | None = None) -> list[dict]:
    """Every child the LLMService should have, in the order they are applied: Deployments before
    the Services that select them. `spec` is the LLMService as written (the stable revision's
    view during a rollout); `tracks` defaults to the spec's revision with all replicas."""
    tracks = tracks or Tracks(spec, spec.replicas)
    out = [workload(tracks.stable, images, track=STABLE, replicas=tracks.stable_replicas)]
    if tracks.canary is not None:
        out.append(workload(tracks.canary, images, track=CANARY, replicas=tracks.canary_replicas))
    return out + [entry_service(spec), track_service(spec, STABLE, tracks.stable.revision),
                  track_service(spec, CANARY, (tracks.canary or tracks.stable).revision), disruption_budget(spec)]
