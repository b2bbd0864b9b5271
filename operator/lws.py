"""Multi-node replicas as LeaderWorkerSets: pure builders and how to read their status.

A revision whose replica spans several nodes (`spec.runtime.parallelism.nodes > 1`) is served by
one LeaderWorkerSet `<name>-<revision>` instead of a Deployment (docs/distributed.md). Each of its
groups is one replica: a leader pod (the same pod a Deployment would run: puller, Triton with the
vLLM model, predictor) and `nodes - 1` worker pods (puller, then vLLM's headless worker process for
their node rank), all rendered from the same revision. The LeaderWorkerSet controller recreates the
whole group when any member fails (a tensor-parallel engine cannot lose a rank), its pod webhook
gives every member `LWS_LEADER_ADDRESS` / `LWS_WORKER_INDEX`, and its scale subresource counts
groups. Services and metrics see the leaders only: the workers have no serving or metrics ports.
"""

from __future__ import annotations

import copy

from ..artifacts.manifest import WORKER_ENGINE_ARGS  # written by the puller next to config.pbtxt
from .render import (
    MODELS_DIR, RESTRICTED_CONTAINER, Images, _metadata, _nonempty, pod_spec,
)
from .spec import LABEL_REVISION, LABEL_SERVICE, LABEL_TRACK, STABLE, Spec, deployment_name, pod_labels

API_VERSION = "leaderworkerset.x-k8s.io/v1"
KIND = "LeaderWorkerSet"
PLURAL = "leaderworkersets"
# Labels and annotations of the LeaderWorkerSet API (sigs.k8s.io/lws api/leaderworkerset/v1).
LABEL_SET_NAME = "leaderworkerset.sigs.k8s.io/name"
LABEL_GROUP_INDEX = "leaderworkerset.sigs.k8s.io/group-index"
LABEL_WORKER_INDEX = "leaderworkerset.sigs.k8s.io/worker-index"
LABEL_GROUP_KEY = "leaderworkerset.sigs.k8s.io/group-key"
EXCLUSIVE_TOPOLOGY = "leaderworkerset.sigs.k8s.io/exclusive-topology"
# Ours: which member a pod is, for people and for selectors that want the leaders.
LABEL_ROLE = "llmserve.io/role"
LEADER, WORKER = "leader", "worker"
REQUIRED = "requiredDuringSchedulingIgnoredDuringExecution"


def version_dir(spec: Spec) -> str:
    """Where the puller leaves the verified version (the HF files vLLM loads)."""
    return f"{MODELS_DIR}/{spec.model}/{spec.version}"


def worker_command(spec: Spec) -> list[str]:
    """vLLM's own multi-node worker: the leader's engine arguments (the file the puller wrote
    from the artifact's engine.json and the spec's settings), its node rank, the leader's
    rendezvous, no API server."""
    return ["vllm", "serve", version_dir(spec), "--config", f"{MODELS_DIR}/{spec.model}/{WORKER_ENGINE_ARGS}",
            *spec.parallelism.worker_flags()]


def worker_container(spec: Spec, images: Images) -> dict:
    """The engine process of a worker node, with the same GPUs and image as the leader's Triton."""
    limits = dict(spec.resources.get("limits") or {})
    limits[spec.gpu_resource] = str(spec.gpus)
    return {
        "name": "vllm-worker",
        "image": images.triton(spec),
        "command": worker_command(spec),
        # vLLM and torch write caches under $HOME; the root filesystem is read-only.
        "env": [{"name": "HOME", "value": "/tmp"}],
        "volumeMounts": [
            {"name": "models", "mountPath": MODELS_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
        "securityContext": RESTRICTED_CONTAINER,
        "resources": _nonempty(requests=spec.resources.get("requests"), limits=limits),
    }


def _member_pod_spec(spec: Spec, images: Images, containers: list[dict] | None) -> dict:
    """A group member's pod: never on the node of another member of its group (each holds one
    node's share of the replica's GPUs; `nodes` means distinct nodes), by a required pod
    anti-affinity whose selector the API server completes with the pod's own group label
    (`matchLabelKeys`), added to whatever affinity the spec asks for."""
    out = pod_spec(spec, images, containers)
    apart = {"labelSelector": {"matchLabels": {LABEL_SERVICE: spec.name, LABEL_REVISION: spec.revision}},
             "matchLabelKeys": [LABEL_GROUP_KEY], "topologyKey": "kubernetes.io/hostname"}
    affinity = copy.deepcopy(spec.affinity)
    anti = affinity.setdefault("podAntiAffinity", {})
    anti[REQUIRED] = [*anti.get(REQUIRED, []), apart]
    out["affinity"] = affinity
    return out


def leader_worker_set(spec: Spec, images: Images, *, track: str = STABLE, replicas: int | None = None) -> dict:
    """The LeaderWorkerSet serving `spec.revision` on `track`: `replicas` groups of
    `parallelism.nodes` pods."""
    labels = pod_labels(spec.name, spec.version, spec.revision)
    metadata = _metadata(spec, deployment_name(spec.name, spec.revision), spec.version, track)
    metadata["labels"] = {**labels, LABEL_TRACK: track}
    if spec.parallelism.topology_key:
        metadata["annotations"] = {EXCLUSIVE_TOPOLOGY: spec.parallelism.topology_key}
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": metadata,
        "spec": {
            "replicas": spec.replicas if replicas is None else replicas,
            # Workers start with the leader: the leader's engine waits for every rank to join,
            # so it can never become ready first.
            "startupPolicy": "LeaderCreated",
            # Only an operator upgrade changes a revision's templates in place: a new group must be
            # ready before an old one goes, like the Deployment's maxSurge 1 / maxUnavailable 0.
            "rolloutStrategy": {"type": "RollingUpdate",
                                "rollingUpdateConfiguration": {"maxSurge": 1, "maxUnavailable": 0}},
            "leaderWorkerTemplate": {
                "size": spec.parallelism.nodes,
                # A rank that restarts cannot rejoin a running engine: recreate the whole group.
                "restartPolicy": "RecreateGroupOnPodRestart",
                "leaderTemplate": {"metadata": {"labels": {**labels, LABEL_ROLE: LEADER}},
                                   "spec": _member_pod_spec(spec, images, None)},
                "workerTemplate": {"metadata": {"labels": {**labels, LABEL_ROLE: WORKER}},
                                   "spec": _member_pod_spec(spec, images, [worker_container(spec, images)])},
            },
        },
    }


def counts(lws: dict | None) -> dict:
    """A LeaderWorkerSet's status in the shape status.py reads a Deployment's: groups, not pods.
    The controller counts a group ready only when its leader and every worker are ready."""
    status = (lws or {}).get("status") or {}
    meta = (lws or {}).get("metadata") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    return {
        "replicas": status.get("replicas", 0),
        "ready": status.get("readyReplicas", 0),
        "updated": status.get("updatedReplicas", 0),
        "available": status.get("readyReplicas", 0),
        # No top-level observedGeneration in a LeaderWorkerSet's status: its conditions carry one.
        "settled": lws is not None and any(c.get("observedGeneration", meta.get("generation", 1))
                                           >= meta.get("generation", 1) for c in conditions.values()),
        "deadline": False,
    }


def group_of(labels: dict) -> str:
    """`<LeaderWorkerSet>/<group index>` of a group member's pod labels, "" for any other pod."""
    if LABEL_SET_NAME in labels and LABEL_GROUP_INDEX in labels:
        return f"{labels[LABEL_SET_NAME]}/{labels[LABEL_GROUP_INDEX]}"
    return ""


def complete_groups(pods: list[dict], lws_name: str, size: int) -> int:
    """Groups of `lws_name` whose `size` members are all live and ready, from the pod summaries:
    a group missing a member (deleted, being recreated) is never counted, whatever the
    controller's status still says."""
    members: dict[str, int] = {}
    for pod in pods:
        group = pod.get("group") or ""
        if group.startswith(f"{lws_name}/") and pod["ready"] and not pod["deleting"]:
            members[group] = members.get(group, 0) + 1
    return sum(1 for n in members.values() if n >= size)
